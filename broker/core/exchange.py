"""The exchange on each connection: reading requests in turn, back-pressure,
the fd budget, and sending replies with their fds. Part of the loop
(server.py's Broker takes it in); it knows requests and fds, not what they
are for.

Rules kept here:
- Work is shared round-robin by uid (fairness.py, docs/design.md "Fairness").
  A readable connection is served at once only while no one waits and the
  loop turn is young; otherwise it waits in `_rounds` for its uid's turn,
  unwatched meanwhile (epoll would only report it again), and a batch is
  served a slice at a time (dispatch.py). Every connection with work left
  is served in later rounds, with no new event needed: the loop polls
  without waiting while anyone waits here.
- A request is read only when the connection has no unsent reply and no
  request parked for fds: a client that stops reading its replies stops
  being read (back-pressure), and the idle timeout eventually drops it.
- The fds a reply may bring are charged to the budget before anything is
  opened or made (`reserve`); a request that does not fit is parked, with
  nothing held for it, until the client reads what it was sent.
- Replies hold their fds until the kernel has them; a connection closed
  meanwhile closes them (docs/security.md, invariant 5).
"""

from __future__ import annotations

import logging
import select
import time
from collections import Counter
from typing import TYPE_CHECKING

from privbroker import protocol as proto
from privbroker import unix

from ..files.fastpath import FastPath, FastTable
from ..policy.decision import Subject
from .connection import Connection, Limits, who
from .fairness import Rounds

if TYPE_CHECKING:
    from ..net import fastsock
    from .budget import FdBudget
    from .dispatch import Dispatcher
    from .routes import Services

log = logging.getLogger("privbroker")

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT


class Exchange:
    """Reading and sending for the loop; the Broker (server.py) provides these."""

    conns: dict[int, Connection]
    fast: FastPath | None
    stats: Counter[str]
    services: Services
    dispatch: Dispatcher
    limits: Limits
    budget: FdBudget
    _ep: select.epoll
    # Requests waiting for fds (budget.py): the connection and what it needs.
    _parked: dict[Connection, int]
    _rounds: Rounds[Connection]  # connections with work, waiting for their uid's turn
    _direct_until = 0.0  # perf_counter: serve at once until then, if no one waits

    def _close(self, conn: Connection) -> None:
        raise NotImplementedError

    def violation(self, conn: Connection, what: str) -> None:
        raise NotImplementedError

    def _guarded(self, conn: Connection, events: int) -> None:
        """Handle one connection's events; a bug there costs that connection only."""
        try:
            self._on_event(conn, events)
        except Exception:
            log.exception("internal error serving %s; closing its connection", who(conn.peer))
            self.stats["internal_errors"] += 1
            self._close(conn)

    def _on_event(self, conn: Connection, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush(conn)
            if conn.fd not in self.conns:
                return
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self._close(conn)  # nothing more can be sent to it
        elif events & select.EPOLLIN:
            rounds = self._rounds
            if conn in rounds.queued:
                self._watch(conn, 0)  # waiting for its turn: no need to hear it again
            elif not self._readable(conn):
                return
            elif rounds.ring or time.perf_counter() > self._direct_until:
                rounds.add(conn)  # others first, or this turn has served its share
            else:
                self._read(conn)
                if conn in self.dispatch.partial:
                    rounds.add(conn)  # the rest of its batch in later rounds

    def _serve_round(self) -> None:
        """One round of the connections waiting in turn (fairness.py)."""
        self._rounds.round(self._serve, time.perf_counter)

    def _serve(self, conn: Connection) -> bool:
        """One piece of `conn`'s work: the next slice of its batch, its request
        parked for fds, or a new request; True if its batch goes on."""
        if self.conns.get(conn.fd) is not conn:
            return False
        partial = self.dispatch.partial
        try:
            if conn in partial:
                self.dispatch.resume(conn)
                self.settle(conn)
            elif conn.deferred is not None:  # the fds it waited for fit now (_unpark)
                (request, mismatch, pid), conn.deferred = conn.deferred, None
                self.services.serve(conn, request, mismatch, pid)
            elif self._readable(conn):
                self._read(conn)
            if conn in partial:
                return True
            if self.conns.get(conn.fd) is conn:
                self._rearm(conn)  # watched again: epoll tells when it has more
        except Exception:
            log.exception("internal error serving %s; closing its connection", who(conn.peer))
            self.stats["internal_errors"] += 1
            self._close(conn)
        return False

    def _readable(self, conn: Connection) -> bool:
        return (
            not conn.outbox
            and conn.deferred is None
            and len(conn.pending) < self.limits.max_pending
            and conn not in self.dispatch.partial
        )

    def _rearm(self, conn: Connection) -> None:
        """Watch for what the connection can do next: room to send, or a request."""
        if conn.outbox:
            mask = _OUT
        elif self._readable(conn):
            mask = _IN
        else:
            mask = 0  # at the pending limit: only hang-ups and errors (always reported)
        self._watch(conn, mask)

    def _watch(self, conn: Connection, mask: int) -> None:
        if mask != conn.mask:  # an epoll_ctl only when something changes
            self._ep.modify(conn.fd, mask)
            conn.mask = mask

    def _read(self, conn: Connection) -> None:
        try:
            if self.fast is None:
                data, _, cred = unix.recv_message(conn.sock, proto.MAX_REQUEST_BYTES, 0, creds=True)
            elif (got := self.fast.receive(conn)) is None:
                return  # answered by the fast path
            else:
                data, cred = got
        except BlockingIOError:
            return
        except unix.TruncatedMessage as exc:
            return self.violation(conn, str(exc))
        except OSError:
            return self._close(conn)
        if not data:
            return self._close(conn)  # EOF: the client hung up
        conn.last_active = time.monotonic()
        self.stats["requests"] += 1
        self.services.handle(conn, data, cred)

    def refuse(self, conn: Connection, ident: int, code: int, reason: str) -> None:
        """Refuse a request as a whole: an ERROR reply, and the connection lives on."""
        self._send(conn, proto.encode_reply(proto.ErrorReply(ident, code, reason)))

    # What the fast path is given (files/fastpath.py, Loop).
    def fast_table(self, subject: Subject) -> FastTable:
        return self.dispatch.fast_table(subject)

    def audit_fast(
        self, conn: Connection, items: list[tuple[tuple[str, int], str | None]], took: float
    ) -> None:
        self.dispatch.audit_fast(conn, items, took)

    def audit_fast_socket(self, conn: Connection, info: fastsock.Fast, took: float) -> None:
        self.services.sockets.audit_fast(conn, info, took)

    def send(self, conn: Connection, data: bytes, fds: list[int], reserved: int) -> None:
        self._send(conn, data, fds, reserved)

    def reserve(
        self, conn: Connection, req: proto.Request, mismatch: str, pid: int, nfds: int
    ) -> bool:
        """Charge the fds a reply may bring to the budget before anything is
        opened or made; False when they do not fit: the request then waits,
        with nothing held for it, until the client has read its earlier fds
        (core/budget.py), and is routed again by _unpark."""
        if not self.budget.fits(conn, nfds):
            conn.deferred = (req, mismatch, pid)
            self._parked[conn] = nfds
            self._watch(conn, 0)
            return False
        self.budget.charge(conn, nfds)
        return True

    def settle(self, conn: Connection) -> None:
        if conn.fd in self.conns and not conn.outbox:
            self._rearm(conn)

    def _send(
        self, conn: Connection, data: bytes, fds: list[int] | None = None, reserved: int = 0
    ) -> None:
        """Queue a reply; the broker owns `fds` until the kernel has them (also
        the fast path's way to send a reply it could not send at once).
        What _open reserved for it and `fds` does not use goes back to the budget."""
        fds = fds or []
        self.budget.refund(conn, reserved - len(fds))
        if self.conns.get(conn.fd) is not conn:  # closed meanwhile: the fds are still ours
            return unix.close_fds(fds)
        conn.outbox.append((data, fds))
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        while conn.outbox:
            data, fds = conn.outbox[0]
            try:
                unix.send_message(conn.sock, data, fds)
            except BlockingIOError:
                # The client is not reading: wait for room, read nothing more.
                self._watch(conn, _OUT)
                return
            except OSError as exc:
                log.info("dropping %s: send failed: %s", who(conn.peer), exc.strerror)
                self._close(conn)
                return
            conn.outbox.popleft()
            unix.close_fds(fds)
        self._rearm(conn)

    def _unpark(self) -> None:
        """Parked requests whose fds fit now wait for their uid's turn again."""
        for conn, nfds in list(self._parked.items()):
            if self.budget.fits(conn, nfds):
                del self._parked[conn]
                self._rounds.add(conn)
