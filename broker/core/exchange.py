"""The exchange on each connection: reading requests, back-pressure, the fd
budget, and sending replies with their fds. Part of the loop (server.py's
Broker takes it in); it knows requests and fds, not what they are for.

Rules kept here:
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

if TYPE_CHECKING:
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
    _parked: set[Connection]

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
        elif events & select.EPOLLIN and self._readable(conn):
            self._read(conn)

    def _readable(self, conn: Connection) -> bool:
        return (
            not conn.outbox
            and conn.deferred is None
            and len(conn.pending) < self.limits.max_pending
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
            self._parked.add(conn)
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
        parked, self._parked = self._parked, set()
        for conn in parked:
            if conn.fd in self.conns and conn.deferred is not None:
                (request, mismatch, pid), conn.deferred = conn.deferred, None
                self.services.serve(conn, request, mismatch, pid)
