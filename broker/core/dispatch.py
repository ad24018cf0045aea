"""What the broker does with a decoded request: open, explain, status.

An open request holds up to MAX_BATCH items. Each is first tried inline, on
the loop's thread, in the opener's non-blocking mode; an item that might
block (a cold dentry cache, a network filesystem, a device) goes to a worker
thread instead. Items are tried a slice of time at a time (`slice_s`): a
batch left unfinished waits in `partial` until the loop gives its uid
another turn (`resume`; core/fairness.py), so one batch never holds the
loop for long. The reply is sent when every item has an outcome, with the
fds in item order. An item whose worker has not answered within the open
timeout gets ETIMEDOUT; whatever that worker opens later is closed on arrival
(the request has been "abandoned"), so no fd outlives its request.

The policy is read once per request (`self.policy` at arrival): a reload that
lands while a request waits for a worker does not change the rules it is
judged by halfway.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from privbroker import protocol as proto
from privbroker import unix
from privbroker.protocol.codec import encode_result

from ..files.fastpath import FastTable
from ..files.opener import Opener
from ..files.steps import Opened, WouldBlock
from ..policy.decide import Policy
from ..policy.decision import Decision, FileType, Subject
from .answers import (
    DECISION_CACHE_PATH,
    DECISION_CACHE_SIZE,
    DECISION_CACHE_SUBJECTS,
    judge_with_cache,
)
from .audit import AuditLog
from .connection import Connection
from .workers import Workers

log = logging.getLogger("privbroker")

SendFn = Callable[[Connection, bytes, list[int], int], None]  # conn, datagram, fds, fds reserved
# What the native fast path (broker/files/_fast.c) may answer for one client under
# one policy: (path, access value) -> (open flags, hard links allowed, the
# packed allowing result, its rule).


class PendingOpen:
    """An open request waiting for its workers."""

    __slots__ = (
        "abandoned",
        "conn",
        "deadline",
        "fast",
        "fds",
        "id",
        "items",
        "jobs",
        "judge",
        "mismatch",
        "results",
        "started",
        "tried",
        "waiting",
    )

    def __init__(
        self,
        conn: Connection,
        request: proto.OpenRequest,
        deadline: float,
        fast: FastTable,
        judge: Callable[[str, proto.Access, FileType | None], Decision],
        mismatch: str,
    ) -> None:
        self.conn = conn
        self.judge = judge  # under the policy at arrival, for every item
        self.mismatch = mismatch
        self.tried = 0  # items tried so far (inline, or handed to a worker)
        self.fast = fast  # the client's fast table under the policy that judges this
        self.id = request.id
        self.items = request.items
        self.started = time.perf_counter()
        self.results: list[proto.Result | None] = [None] * len(request.items)
        self.fds: list[int] = [-1] * len(request.items)
        self.waiting = 0
        self.deadline = deadline
        self.abandoned = False

    def drop(self) -> None:
        """The connection is gone or the reply was sent: close what is still ours."""
        self.abandoned = True
        unix.close_fds([fd for fd in self.fds if fd >= 0])
        self.fds = [-1] * len(self.fds)


class Dispatcher:
    def __init__(
        self,
        policy: Policy,
        opener: Opener,
        audit: AuditLog,
        send: SendFn,
        wake: Callable[[], None],
        *,
        workers: int = 8,
        open_timeout: float = 10.0,
        slice_s: float = float("inf"),
    ) -> None:
        self.policy = policy
        self._cached_policy = policy
        # subject -> (path, access bits, id of the file type) -> decision
        self._cache: dict[Subject, dict[tuple[str, int, int], Decision]] = {}
        self._fast: dict[Subject, FastTable] = {}
        self.opener = opener
        self.audit = audit
        self.stats: Counter[str] = Counter()
        self.open_timeout = open_timeout
        self.slice_s = slice_s
        self.workers = Workers(workers)
        self.pending: set[PendingOpen] = set()
        # Open requests with items not tried yet, waiting for their uid's turn.
        self.partial: dict[Connection, PendingOpen] = {}
        self._send = send
        self._wake = wake
        self._done: deque[
            tuple[PendingOpen, int, int, Opened | BaseException, proto.OpenItem, float]
        ] = deque()

    # ------------------------------------------------------------------ opens

    def _policy(self) -> Policy:
        policy = self.policy
        if policy is not self._cached_policy:  # a reload: old answers no longer hold
            self._cache = {}
            self._fast = {}
            self._cached_policy = policy
        return policy

    def fast_table(self, subject: Subject) -> FastTable:
        """The fast path's answers for `subject` under the current policy."""
        self._policy()
        table = self._fast.get(subject)
        if table is None:
            if len(self._fast) >= DECISION_CACHE_SUBJECTS:
                self._fast.clear()
            table = self._fast[subject] = {}
        return table

    def open(self, conn: Connection, request: proto.OpenRequest, mismatch: str, pid: int) -> None:
        policy = self._policy()
        fast = self.fast_table(conn.subject)
        cache = self._cache.get(conn.subject)
        if cache is None:
            if len(self._cache) >= DECISION_CACHE_SUBJECTS:
                self._cache.clear()
            cache = self._cache[conn.subject] = {}
        judge = judge_with_cache(policy, conn.subject, cache)
        deadline = time.monotonic() + self.open_timeout
        self._advance(PendingOpen(conn, request, deadline, fast, judge, mismatch))

    def resume(self, conn: Connection) -> None:
        """Try the next slice of `conn`'s open request in `partial`."""
        self._advance(self.partial.pop(conn))

    def _advance(self, p: PendingOpen) -> None:
        """Try p's items from p.tried on for slice_s at most (one at least);
        then wait in `partial`, or for the workers, or reply."""
        conn, items, judge, mismatch = p.conn, p.items, p.judge, p.mismatch
        peer = conn.peer
        first = i = p.tried
        end = time.perf_counter() + self.slice_s
        while i < len(items):
            start = time.perf_counter()
            if start >= end and i > first:
                break
            item = items[i]
            i += 1
            if mismatch:
                opened = Opened(-1, proto.Result(errno.EACCES, True, mismatch, None))
            else:
                try:
                    opened = self.opener.open(
                        judge, item, peer.uid, peer.gid, inline=True, who=conn.subject
                    )
                except WouldBlock:
                    if self.workers.busy[peer.uid] >= self.workers.per_uid:
                        opened = Opened(
                            -1,
                            proto.Result(
                                errno.EAGAIN,
                                False,
                                f"uid {peer.uid} has too many slow opens in flight; try again",
                            ),
                        )
                    else:
                        self._submit(p, i - 1, item, judge, start)
                        continue
            self._settle(p, i - 1, item, opened, start)
        p.tried = i
        if i < len(items):
            self.partial[conn] = p
        elif p.waiting:
            self.pending.add(p)
            conn.pending.add(p)
        else:
            self._reply(p)

    def _submit(
        self,
        p: PendingOpen,
        i: int,
        item: proto.OpenItem,
        judge: Callable[[str, proto.Access, FileType | None], Decision],
        start: float,
    ) -> None:
        uid, gid, who = p.conn.peer.uid, p.conn.peer.gid, p.conn.subject
        p.waiting += 1
        self.stats["worker_opens"] += 1

        def done(
            outcome: Opened | BaseException,
        ) -> None:  # on the worker thread: queue, wake, no more
            self._done.append((p, i, uid, outcome, item, start))
            self._wake()

        self.workers.submit(uid, lambda: self.opener.open(judge, item, uid, gid, who=who), done)

    def collect(self) -> None:
        """Take in what the workers finished (on the loop's thread)."""
        while self._done:
            p, i, uid, outcome, item, start = self._done.popleft()
            self.workers.finished(uid)
            if not isinstance(outcome, Opened):
                log.error("open of %s failed in a worker: %r", item.path, outcome)
                outcome = Opened(-1, proto.Result(errno.EIO, False, "internal error"))
            if p.abandoned:
                # Answered already (timed out), or the client left: what was
                # opened is closed, and the audit log says so.
                self._account(p.conn, item, outcome, time.perf_counter() - start, late=True)
                if outcome.fd >= 0:
                    unix.close_fds([outcome.fd])
                continue
            p.waiting -= 1
            self._settle(p, i, item, outcome, start)
            if not p.waiting and p.tried == len(p.items):  # (else _advance replies)
                self._finish(p)

    def expire(self, now: float) -> None:
        """Answer ETIMEDOUT for items whose workers are past the open timeout."""
        for p in [p for p in self.pending if now >= p.deadline]:
            for i, result in enumerate(p.results):
                if result is None:
                    timeout = proto.Result(
                        errno.ETIMEDOUT,
                        False,
                        f"the open took longer than {self.open_timeout:g} s "
                        "(a stalled filesystem or device?)",
                    )
                    p.results[i] = timeout
                    self.stats["timeouts"] += 1
                    took = time.perf_counter() - p.started
                    self._account(p.conn, p.items[i], Opened(-1, timeout), took)
            p.waiting = 0
            self._finish(p)

    def _finish(self, p: PendingOpen) -> None:
        self.pending.discard(p)
        p.conn.pending.discard(p)
        self._reply(p)

    def _settle(
        self, p: PendingOpen, i: int, item: proto.OpenItem, opened: Opened, start: float
    ) -> None:
        p.results[i] = opened.result
        p.fds[i] = opened.fd
        if opened.fast is not None and len(item.path) <= DECISION_CACHE_PATH:
            if len(p.fast) >= DECISION_CACHE_SIZE:
                p.fast.clear()
            r = opened.result
            p.fast[item.path, item.access._value_] = (*opened.fast, encode_result(r), r.rule)
        self._account(p.conn, item, opened, time.perf_counter() - start)

    def _reply(self, p: PendingOpen) -> None:
        results = tuple(r or proto.Result(errno.EIO, False, "no outcome") for r in p.results)
        fds = [fd for fd, r in zip(p.fds, results, strict=True) if fd >= 0 and r.errno == 0]
        try:
            data = proto.encode_reply(proto.OpenReply(p.id, results))
        except Exception:
            p.drop()
            raise
        p.fds = [-1] * len(p.fds)  # the send owns them now
        p.abandoned = True  # late workers (after a timeout) close what they open
        self._send(p.conn, data, fds, len(p.results))

    def drop_connection(self, conn: Connection) -> None:
        """A connection closed with requests still at the workers, or partial."""
        partial = self.partial.pop(conn, None)
        if partial is not None:
            partial.drop()
        for p in list(conn.pending):
            self.pending.discard(p)
            p.drop()
        conn.pending.clear()

    def _account(
        self,
        conn: Connection,
        item: proto.OpenItem,
        opened: Opened,
        took: float,
        late: bool = False,
    ) -> None:
        """Count the outcome and write its audit record.

        `late`: a worker finished after the request was answered (timed out)
        or its client left; the fd, if any, is closed and never sent. Counted
        once already (as the timeout), so only the audit record is written.
        """
        r = opened.result
        verdict = "allow" if r.errno == 0 else ("deny" if r.denied else "error")
        if not late:
            self.stats[_COUNTER[verdict]] += 1
        if self.audit.enabled:
            self._record(conn, item.path, item.access, opened, verdict, took, late)

    def audit_fast(
        self, conn: Connection, items: list[tuple[tuple[str, int], str | None]], took: float
    ) -> None:
        """Audit the opens the fast path made and sent, in `took` s: their
        (path, access) and rule."""
        each = took / len(items)
        for (path, access), rule in items:
            opened = Opened(-1, proto.Result(rule=rule), path, FileType.FILE)
            self._record(conn, path, proto.Access(access), opened, "allow", each, False)

    def _record(
        self,
        conn: Connection,
        path: str,
        access: proto.Access,
        opened: Opened,
        verdict: str,
        took: float,
        late: bool,
    ) -> None:
        p, r = conn.peer, opened.result
        self.audit.record(
            {
                "late": late,
                "uid": p.uid,
                "gid": p.gid,
                "groups": list(p.groups),
                "pid": p.pid,
                "exe": conn.exe,
                "declared": conn.declared,  # the client's words, not the kernel's
                "path": path,
                "real_path": opened.real_path,
                "access": access.words(),
                "type": opened.ftype.value if opened.ftype else None,
                "decision": verdict,
                "rule": r.rule,
                "errno": r.errno,
                "error": errno.errorcode.get(r.errno) if r.errno else None,
                "reason": r.reason,
                "created": opened.created,
                "duration_us": round(took * 1e6, 1),
            }
        )


_COUNTER = {"allow": "allowed", "deny": "denied", "error": "failed"}
