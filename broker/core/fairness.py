"""Fairness: the loop's work shared round-robin by uid (docs/security.md, invariant 6).

The loop (exchange.py) hands a connection with work to wait here instead of
serving it at once when others are already waiting, and then serves
`Rounds.round` by round: each uid with work has its turn once per round, and
within a uid its connections take turns, one request at a time (a large
batch is served a slice per turn, dispatch.py, and finished before the
uid's next connection is read, so a uid's own requests complete in order
rather than all late). A turn lasts while the uid has credit left: each
round adds QUANTUM seconds, what the loop spends serving the uid is taken
off (deficit round robin). So a uid with a backlog of 250-item batches on
256 connections gets QUANTUM per round, as a uid with one request does,
and the others wait for one round, not for the backlog. Work that cannot be
cut (a batch the C fast path answers whole) leaves the uid in debt, and it
sits out rounds until the others have had as much.

A uid new to the rounds goes first in the next one: an interactive client's
request waits for the slice in progress, not for the whole round. A uid that
runs out of work keeps its debt (forget_debts lets it go, every second or so)
but not its credit: nobody saves up time while idle.

Pure bookkeeping: no I/O, no clock of its own (the loop passes one), so it is
tested directly (tests/core/test_fairness.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

# Seconds of loop time a uid gets per round, and the slice of a batch served
# per turn. A client's request waits for about the slice in progress: this
# is what another uid's flood adds to its round trip (a few items of a denied
# batch; tests/bench, section 9). Smaller costs the flood more rounds.
QUANTUM = 25e-6

T = TypeVar("T", bound=Hashable)


class Rounds(Generic[T]):
    """Connections (or anything with an owner) with work, by owner, in turn.

    `owner(item)` is the uid the item's work is charged to.
    """

    def __init__(self, owner: Callable[[T], int], quantum: float = QUANTUM) -> None:
        self.quantum = quantum
        self._owner = owner
        self.queued: set[T] = set()  # waiting here (read by the loop directly: it is hot)
        self.ring: deque[int] = deque()  # owners with work, in the order of their turns
        self._queues: dict[int, deque[T]] = {}
        self._credit: dict[int, float] = {}  # an owner's balance; negative: in debt

    def __bool__(self) -> bool:
        return bool(self.ring)

    def __len__(self) -> int:
        return len(self.queued)

    def add(self, item: T) -> None:
        """Queue `item` behind its owner's others; an owner new here goes first."""
        if item in self.queued:
            return
        self.queued.add(item)
        uid = self._owner(item)
        queue = self._queues.get(uid)
        if queue is None:
            queue = self._queues[uid] = deque()
            self.ring.appendleft(uid)
        queue.append(item)

    def discard(self, item: T) -> None:
        """Forget `item` (its connection closed); also while it is being served."""
        if item in self.queued:
            self.queued.discard(item)
            with contextlib.suppress(ValueError):  # not there while being served
                self._queues[self._owner(item)].remove(item)
            # An owner left with an empty queue leaves the ring at its turn.

    def round(self, serve: Callable[[T], bool], clock: Callable[[], float]) -> None:
        """Each owner with work, once, while its credit lasts: `serve(item)`
        does one piece of the item's work and says whether its batch goes on
        (then the item stays first of its owner's; otherwise it leaves, and
        the loop adds it again when epoll reports more); `clock` in seconds."""
        ring, queues, credit, queued = self.ring, self._queues, self._credit, self.queued
        for _ in range(len(ring)):
            uid = ring.popleft()
            queue = queues[uid]
            have = credit.pop(uid, 0.0) + self.quantum
            while have > 0 and queue:
                item = queue.popleft()
                start = clock()
                more = serve(item)
                have -= clock() - start
                if more and item in queued:  # (not discarded by serve)
                    queue.appendleft(item)  # a batch is finished before the next
                else:
                    queued.discard(item)
            if queue:
                ring.append(uid)
            else:
                del queues[uid]
            if have <= 0:
                credit[uid] = have  # a debt is kept; credit is not

    def forget_debts(self) -> None:
        """Let the debts of owners with no work go (periodically: memory stays
        bounded by the owners with work)."""
        self._credit = {uid: c for uid, c in self._credit.items() if uid in self._queues}
