"""The broker's event loop: connections, limits, timeouts, dispatch.

One thread runs an epoll loop over the listening socket, a signal wake-up fd
and every connection. Each connection's state lives in one `Connection`
object; whatever a client does can only ever close that connection
(docs/protocol.md, "Two kinds of failure").

Rules the loop keeps:
- Identity is read once, at accept (peer.py). Every request's SCM_CREDENTIALS
  must agree with it, or the request is denied (invariant 4).
- A request is read only when the connection has no unsent reply: a client
  that stops reading its replies stops being read (back-pressure), and the
  idle timeout eventually drops it. Replies hold their fds until sent.
- Work is shared round-robin by uid: a turn of the loop serves what epoll
  reported at once only while no one waits, for QUANTUM at most, then one
  round of the connections waiting in turn (exchange.py, fairness.py);
  while any wait, the loop polls without sleeping.
- Fds a client sends are never accepted: the receive buffer has room for
  credentials only, so the kernel discards any SCM_RIGHTS (and we see
  MSG_CTRUNC, a protocol violation) (invariant 5).
- Malformed input is logged with the peer's credentials and closes that
  connection without a reply; a denial or a failed open is a reply.
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..files import fastpath
from ..files.opener import Opener
from ..net.leasefile import RECORD_DIR
from ..net.netconf import NetService
from ..net.service import SocketService
from ..policy.decide import Policy, load_policy
from . import systemd
from .audit import AuditLog
from .budget import FdBudget
from .connection import Connection, Limits, who
from .dispatch import Dispatcher
from .exchange import _IN, Exchange
from .fairness import QUANTUM, Rounds
from .listen import accept_some, drain
from .peer import StalePeer, read_peer
from .procs import Shared
from .reload import Reloader, freeze_heap, start_reload, take_reload
from .routes import Services
from .status import counted, status_fields, status_line

log = logging.getLogger("privbroker")


# Accept at most this many connections per loop turn, so a connect flood
# cannot starve the clients already connected.
_ACCEPT_BURST = 64


class Broker(Exchange):
    """Serves one policy on one listening socket until `stop()`."""

    def __init__(
        self,
        policy_path: str,
        *,
        limits: Limits | None = None,
        audit: AuditLog | None = None,
        opener: Opener | None = None,
        fast: bool = True,
        shared: Shared | None = None,
        policy: Policy | None = None,  # already loaded from policy_path
        lease_dir: Path = RECORD_DIR,
    ) -> None:
        self.listener: socket.socket | None = None
        self.policy_path = policy_path
        self.limits = limits or Limits()
        self.audit = audit or AuditLog(None)
        self.opener = opener or Opener()
        policy = policy or load_policy(policy_path)
        self.started = time.time()
        self.policy_loaded = self.started
        self.last_reload_error = ""
        self.conns: dict[int, Connection] = {}
        self.per_uid: Counter[int] = Counter()
        self._stopping = False
        self._reload_wanted = False
        self._accept_paused_until = 0.0
        self._ep = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.dispatch = Dispatcher(
            policy,
            self.opener,
            self.audit,
            self._send,
            self._wake,
            workers=self.limits.workers,
            open_timeout=self.limits.open_timeout,
            slice_s=QUANTUM,  # a batch is served a slice per turn (fairness.py)
        )
        self.stats = self.dispatch.stats
        self.reloader = Reloader(policy_path, policy, self._wake)
        # What harden kept (admin/run.py); None: nothing dropped (net/caps.py).
        self.caps_held: frozenset[int] | None = None
        self.shared = shared  # with other processes on the listener (procs.py)
        self.budget = FdBudget.for_process(shared.processes if shared else 1)
        self._parked: dict[Connection, int] = {}
        self._rounds: Rounds[Connection] = Rounds(_uid_of)
        self.fast = (
            fastpath.start(self, self.opener.mounts, self.budget, self.audit.enabled)
            if fast
            else None
        )
        # The services, by the op of the request each one serves (routes.py).
        sockets = SocketService(
            lambda: self.dispatch.policy,
            self.audit,
            self.stats,
            self.dispatch.fast_table if self.fast is not None else None,
        )
        net = NetService(lambda: self.dispatch.policy, self.audit, self.stats, lease_dir)
        self.services = Services(self, self.dispatch, sockets, net, lambda: status_fields(self))
        net.prepare()
        self._own: dict[int, Callable[[], None]] = {}  # the loop's own fds and their handlers
        freeze_heap()

    @property
    def policy(self) -> Policy:
        return self.dispatch.policy

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def request_reload(self) -> None:
        """Reload the policy, and reopen the audit file (logrotate's postrotate
        may send SIGHUP); also what --processes' supervisor calls on SIGHUP."""
        self.audit.reopen()
        self._reload_wanted = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the broker cleanly; SIGHUP reloads the policy and
        reopens the audit file; SIGUSR1 reopens the audit file (logrotate)."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())

        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        signal.signal(signal.SIGUSR1, lambda *_: self.audit.reopen())

    def serve_forever(self, listener: socket.socket) -> None:
        """Serve on `listener` until stop(); the caller keeps owning the listener."""
        self.listener = listener
        listener.setblocking(False)
        conns, poll, rounds, clock = self.conns, self._ep.poll, self._rounds, time.perf_counter
        # The loop's own fds, and what each one's readiness means. (The mount
        # table is read again by whoever sees it changed: the opener, _fast.)
        own = self._own
        own[listener.fileno()] = lambda: self._accept(listener)
        for fd, handler in (
            (self._wake_r.fileno(), lambda: drain(self._wake_r)),
            (self.reloader.fileno(), lambda: self.reloader.on_readable(time.monotonic())),
        ):
            if fd >= 0:  # -1: no inotify (the reloader polls)
                self.watch_fd(fd, handler)
        self.services.net.start(self)  # before listening: orphans go first
        self._listen(True)
        next_sweep = time.monotonic() + 1.0
        watchdog = systemd.watchdog_interval()
        tick = min(1.0, watchdog) if watchdog else 1.0
        systemd.notify("READY=1", f"STATUS={status_line(self)}")
        try:
            while not self._stopping:
                timeout = 0.05 if self.reloader.settling else tick
                if self._parked:
                    timeout = 0.02  # look again soon whether the client read its fds
                if self.dispatch.workers.waiting:
                    timeout = min(timeout, 0.1)  # opens queued: are the workers stalled?
                if rounds:
                    timeout = 0  # connections wait in turn: serve them, news or not
                events = poll(timeout)
                self._direct_until = clock() + QUANTUM
                for fd, ev in events:
                    if (conn := conns.get(fd)) is not None:
                        self._guarded(conn, ev)
                    elif fd in own:
                        self._guarded_own(own[fd])
                if rounds:
                    self._serve_round()
                self._housekeep()
                now = time.monotonic()
                if self._reload_wanted or self.reloader.tick(now):
                    self._reload_wanted = False
                    start_reload(self.reloader)
                take_reload(self)
                if now >= next_sweep:
                    next_sweep = now + tick
                    self._sweep(now)
                    if watchdog and (not self.shared or self.shared.all_ticking(3.0)):
                        systemd.notify("WATCHDOG=1")  # every process's loop is turning
        finally:
            systemd.notify("STOPPING=1")
            self._shutdown()

    def watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        """Call handler() whenever `fd` is readable (a service's own fd)."""
        self._ep.register(fd, select.EPOLLIN)
        self._own[fd] = handler

    def watch_exit(self, conn: Connection) -> None:
        """Close `conn` when its process exits, even if another process holds
        its socket: what was leased to it ends with it (pidfd, Linux 6.5+)."""
        pidfd = conn.peer.pidfd
        if pidfd is not None and pidfd not in self._own and self.conns.get(conn.fd) is conn:
            self.watch_fd(pidfd, lambda: self._close(conn))

    def _guarded_own(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except Exception:
            log.exception("internal error in the loop's own work")
            self.stats["internal_errors"] += 1

    def _housekeep(self) -> None:
        """Work the loop does between events; a bug here must not stop the broker."""
        try:
            self.dispatch.collect()
            if self.dispatch.workers.waiting:
                self.dispatch.workers.rebalance()
            if self._parked:
                self._unpark()
        except Exception:
            log.exception("internal error between events")
            self.stats["internal_errors"] += 1

    def _shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.dispatch.workers.stop()
        self.services.net.close()
        self.reloader.close()
        self.budget.close()
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()

    def _sweep(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._listen(True)
        if self.shared:
            self.shared.publish(counted(self))
        self.dispatch.expire(now)
        self.budget.sweep()
        self._rounds.forget_debts()
        limit = self.limits.idle_timeout
        idle = [c for c in self.conns.values() if now - c.last_active > limit and not c.pending]
        for conn in idle:
            log.info("closing idle connection from %s", who(conn.peer))
            self.stats["idle_closed"] += 1
            self._close(conn)

    def _accept(self, listener: socket.socket) -> None:
        socks, pause = accept_some(listener, _ACCEPT_BURST)
        for sock in socks:
            self._admit(sock)
        if pause:
            log.warning("accept: %s; pausing accepts for 0.5 s", pause)
            self.stats["accept_errors"] += 1
            self._accept_paused_until = time.monotonic() + 0.5
            self._listen(False)

    def _listen(self, on: bool) -> None:
        # EPOLLEXCLUSIVE: a connection wakes one of the processes sharing the
        # listener. It forbids EPOLL_CTL_MOD: a pause is a removal.
        assert self.listener is not None
        if not on:
            return self._ep.unregister(self.listener)
        self._ep.register(
            self.listener, select.EPOLLIN | (select.EPOLLEXCLUSIVE if self.shared else 0)
        )

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = read_peer(sock)
        except (StalePeer, OSError) as exc:
            # Whoever holds the socket now is not the process the kernel
            # vouched for at connect(); nothing it sends is served.
            log.info("dropping a connection whose peer cannot be pinned: %s", exc)
            self.stats["stale_peers"] += 1
            sock.close()
            return
        why = self.limits.refusal(len(self.conns), self.per_uid[peer.uid], peer.uid)
        if why:
            log.warning("refusing connection from %s: %s", who(peer), why)
            self.stats["refused_connections"] += 1
            peer.close()
            sock.close()
            return
        conn = Connection(sock, peer, time.monotonic())
        self.conns[conn.fd] = conn
        self.per_uid[peer.uid] += 1
        self.stats["connections"] += 1
        self._ep.register(conn.fd, _IN)
        conn.mask = _IN

    def _close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        self.per_uid[conn.peer.uid] -= 1
        if not self.per_uid[conn.peer.uid]:
            del self.per_uid[conn.peer.uid]
        with contextlib.suppress(OSError):
            self._ep.unregister(conn.fd)
        pidfd = conn.peer.pidfd
        if pidfd is not None and self._own.pop(pidfd, None) is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(pidfd)
        self.services.drop_connection(conn)
        self._parked.pop(conn, None)
        self._rounds.discard(conn)
        conn.close(keep_socket=self.budget.closing(conn))

    def violation(self, conn: Connection, what: str) -> None:
        log.warning("protocol violation by %s: %s; closing", who(conn.peer), what)
        self.stats["protocol_errors"] += 1
        self._close(conn)


def _uid_of(conn: Connection) -> int:
    return conn.peer.uid
