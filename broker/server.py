"""The broker's event loop: connections, limits, timeouts, dispatch.

One thread runs an epoll loop over the listening socket, a signal wake-up fd
and every connection. Each connection's state lives in one `Connection`
object; whatever a client does can only ever close that connection (STYLE 9).

Rules the loop keeps:
- Identity is read once, at accept (peer.py). Every request's SCM_CREDENTIALS
  must agree with it, or the request is denied (invariant 4).
- A request is read only when the connection has no unsent reply: a client
  that stops reading its replies stops being read (back-pressure), and the
  idle timeout eventually drops it. Replies hold their fds until sent.
- Fds a client sends are never accepted: the receive buffer has room for
  credentials only, so the kernel discards any SCM_RIGHTS (and we see
  MSG_CTRUNC, a protocol violation) (invariant 5).
- Malformed input is logged with the peer's credentials and closes that
  connection without a reply; a denial or a failed open is a reply.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import select
import signal
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass

from client import protocol as proto
from client import unix

from . import systemd
from .audit import AuditLog
from .decision import Decision, FileType, Subject
from .opener import Opened, Opener
from .peer import Peer, StalePeer, read_peer
from .policy import Policy, PolicyError, decide, explain, load_policy

log = logging.getLogger("privbroker")

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
# Accept at most this many connections per loop turn, so a connect flood
# cannot starve the clients already connected.
_ACCEPT_BURST = 64


@dataclass(frozen=True)
class Limits:
    """The broker's resource limits; every one is a `serve` option."""

    max_connections: int = 4096
    max_connections_per_uid: int = 256
    idle_timeout: float = 60.0
    backlog: int = 128


class Connection:
    """One client: its socket, its kernel identity, its unsent reply."""

    __slots__ = ("exe", "fd", "last_active", "outbox", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.exe = peer.exe()
        self.last_active = now
        # (datagram, fds the broker still owns) waiting for the client to read.
        self.outbox: deque[tuple[bytes, list[int]]] = deque()

    def close(self) -> None:
        while self.outbox:
            unix.close_fds(self.outbox.popleft()[1])
        self.peer.close()
        self.sock.close()


class Broker:
    """Serves one policy on one listening socket until `stop()`."""

    def __init__(
        self,
        policy_path: str,
        *,
        limits: Limits | None = None,
        audit: AuditLog | None = None,
        opener: Opener | None = None,
    ) -> None:
        self.listener: socket.socket | None = None
        self.policy_path = policy_path
        self.limits = limits or Limits()
        self.audit = audit or AuditLog(None)
        self.opener = opener or Opener()
        self.policy: Policy = load_policy(policy_path)
        self.started = time.time()
        self.policy_loaded = self.started
        self.last_reload_error = ""
        self.stats: Counter[str] = Counter()
        self.conns: dict[int, Connection] = {}
        self.per_uid: Counter[int] = Counter()
        self._stopping = False
        self._reload_wanted = False
        self._accept_paused_until = 0.0
        self._ep = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ---------------------------------------------------------------- control

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def request_reload(self) -> None:
        self._reload_wanted = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def reload(self) -> bool:
        """Load the policy file again; keep the old policy if the new one is invalid."""
        self.stats["reloads"] += 1
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")
        try:
            return self._reload()
        finally:
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def status_line(self) -> str:
        """One line for systemctl status."""
        s = self.stats
        line = (f"{self.policy.rule_count} rules, {len(self.conns)} connections, "
                f"{s['allowed']} allowed, {s['denied']} denied")
        if self.last_reload_error:
            line += "; last reload refused (see log)"
        return line

    def _reload(self) -> bool:
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as exc:
            self.stats["reload_failures"] += 1
            self.last_reload_error = str(exc)
            log.error("policy reload refused, old policy keeps serving:\n%s", exc)
            return False
        except OSError as exc:
            self.stats["reload_failures"] += 1
            self.last_reload_error = f"{self.policy_path}: {exc.strerror}"
            log.error("policy reload refused: %s", self.last_reload_error)
            return False
        # Requests are handled one at a time on this thread, so the swap falls
        # between two requests: each is judged wholly by one policy.
        self.policy = policy
        self.policy_loaded = time.time()
        self.last_reload_error = ""
        log.info("policy reloaded from %s: %d rules", self.policy_path, policy.rule_count)
        return True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the broker cleanly; SIGHUP reloads the policy."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # ------------------------------------------------------------------- loop

    def serve_forever(self, listener: socket.socket) -> None:
        """Serve on `listener` until stop(); the caller keeps owning the listener."""
        self.listener = listener
        listener.setblocking(False)
        self._ep.register(listener.fileno(), select.EPOLLIN)
        self._ep.register(self._wake_r.fileno(), select.EPOLLIN)
        next_sweep = time.monotonic() + 1.0
        watchdog = systemd.watchdog_interval()
        tick = min(1.0, watchdog) if watchdog else 1.0
        systemd.notify("READY=1", f"STATUS={self.status_line()}")
        try:
            while not self._stopping:
                for fd, events in self._ep.poll(tick):
                    if fd == listener.fileno():
                        self._accept(listener)
                    elif fd == self._wake_r.fileno():
                        self._drain_wake()
                    else:
                        conn = self.conns.get(fd)
                        if conn is not None:
                            self._on_event(conn, events)
                if self._reload_wanted:
                    self._reload_wanted = False
                    self.reload()
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + tick
                    self._sweep(now)
                    if watchdog:
                        systemd.notify("WATCHDOG=1")
        finally:
            systemd.notify("STOPPING=1")
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()

    def _sweep(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            if self.listener is not None:
                self._ep.modify(self.listener.fileno(), select.EPOLLIN)
        limit = self.limits.idle_timeout
        for conn in [c for c in self.conns.values() if now - c.last_active > limit]:
            log.info("closing idle connection from %s", _who(conn.peer))
            self.stats["idle_closed"] += 1
            self._close(conn)

    # ------------------------------------------------------------ connections

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: the listener stays readable, so stop watching
                    # it for a moment instead of spinning on EMFILE.
                    log.warning("accept: %s; pausing accepts for 0.5 s", exc.strerror)
                    self.stats["accept_errors"] += 1
                    self._accept_paused_until = time.monotonic() + 0.5
                    self._ep.modify(listener.fileno(), 0)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPERM):
                    continue
                raise
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            peer = read_peer(sock)
        except (StalePeer, OSError) as exc:
            log.info("dropping a connection whose peer cannot be read: %s", exc)
            sock.close()
            return
        why = ""
        if len(self.conns) >= self.limits.max_connections:
            why = f"{len(self.conns)} connections, the broker's limit"
        elif self.per_uid[peer.uid] >= self.limits.max_connections_per_uid:
            why = f"uid {peer.uid} has {self.per_uid[peer.uid]} connections, the per-uid limit"
        if why:
            log.warning("refusing connection from %s: %s", _who(peer), why)
            self.stats["refused_connections"] += 1
            peer.close()
            sock.close()
            return
        conn = Connection(sock, peer, time.monotonic())
        self.conns[conn.fd] = conn
        self.per_uid[peer.uid] += 1
        self.stats["connections"] += 1
        self._ep.register(conn.fd, _IN)

    def _close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        self.per_uid[conn.peer.uid] -= 1
        if not self.per_uid[conn.peer.uid]:
            del self.per_uid[conn.peer.uid]
        try:
            self._ep.unregister(conn.fd)
        except OSError:
            pass
        conn.close()

    def _violation(self, conn: Connection, what: str) -> None:
        log.warning("protocol violation by %s: %s; closing", _who(conn.peer), what)
        self.stats["protocol_errors"] += 1
        self._close(conn)

    def _on_event(self, conn: Connection, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush(conn)
            if conn.fd not in self.conns:
                return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP):
            if conn.outbox:
                if events & (select.EPOLLHUP | select.EPOLLERR):
                    self._close(conn)
                return
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data, _fds, cred = unix.recv_message(
                conn.sock, proto.MAX_REQUEST_BYTES, 0, creds=True
            )
        except BlockingIOError:
            return
        except unix.TruncatedMessage as exc:
            return self._violation(conn, str(exc))
        except OSError:
            return self._close(conn)
        if not data:
            return self._close(conn)  # EOF: the client hung up
        conn.last_active = time.monotonic()
        self.stats["requests"] += 1
        try:
            request = proto.decode_request(data)
        except proto.UnsupportedVersion as exc:
            self._send(conn, proto.encode_reply(proto.ErrorReply(exc.id, errno.EPROTO, str(exc))))
            return self._violation(conn, str(exc))
        except proto.ProtocolError as exc:
            return self._violation(conn, str(exc))
        if cred is None:
            return self._violation(conn, "request without SCM_CREDENTIALS")
        mismatch = ""
        if (cred.uid, cred.gid) != (conn.peer.uid, conn.peer.gid):
            mismatch = (
                f"the request's credentials (uid {cred.uid}, gid {cred.gid}) differ from "
                f"the connection's (uid {conn.peer.uid}, gid {conn.peer.gid}): the socket "
                "was passed on or its owner changed identity; connect again"
            )
        if isinstance(request, proto.OpenRequest):
            self._serve_open(conn, request, mismatch, cred.pid)
        elif mismatch:
            self._send(conn, proto.encode_reply(
                proto.ErrorReply(request.id, errno.EACCES, mismatch)))
        elif isinstance(request, proto.ExplainRequest):
            self._send(conn, proto.encode_reply(self._explain(conn, request)))
        else:
            self._send(conn, proto.encode_reply(self._status(conn, request)))

    # --------------------------------------------------------------- requests

    def _serve_open(
        self, conn: Connection, request: proto.OpenRequest, mismatch: str, pid: int
    ) -> None:
        peer = conn.peer
        subject = peer.subject
        policy = self.policy

        def judge(path: str, access: proto.Access, ftype: FileType | None) -> Decision:
            return decide(policy, subject, path, access, ftype)

        results: list[proto.Result] = []
        fds: list[int] = []
        for item in request.items:
            start = time.perf_counter()
            if mismatch:
                opened = Opened(-1, proto.Result(errno.EACCES, True, mismatch, None))
            else:
                opened = self.opener.open(judge, item, peer.uid, peer.gid)
            results.append(opened.result)
            if opened.fd >= 0:
                fds.append(opened.fd)
            self._account(conn, pid, item, opened, time.perf_counter() - start)
        try:
            data = proto.encode_reply(proto.OpenReply(request.id, tuple(results)))
        except Exception:
            unix.close_fds(fds)
            raise
        self._send(conn, data, fds)

    def _account(
        self, conn: Connection, pid: int, item: proto.OpenItem, opened: Opened, took: float
    ) -> None:
        r = opened.result
        verdict = "allow" if r.errno == 0 else ("deny" if r.denied else "error")
        self.stats[{"allow": "allowed", "deny": "denied", "error": "failed"}[verdict]] += 1
        if self.audit.enabled:
            p = conn.peer
            self.audit.record({
                "uid": p.uid, "gid": p.gid, "groups": list(p.groups), "pid": p.pid,
                "sender_pid": pid, "exe": conn.exe, "path": item.path,
                "real_path": opened.real_path, "access": item.access.words(),
                "type": opened.ftype.value if opened.ftype else None,
                "decision": verdict, "rule": r.rule, "errno": r.errno,
                "error": errno.errorcode.get(r.errno) if r.errno else None,
                "reason": r.reason, "created": opened.created,
                "duration_us": round(took * 1e6, 1),
            })

    def _explain(self, conn: Connection, req: proto.ExplainRequest) -> proto.Reply:
        if conn.peer.uid != 0:
            return proto.ErrorReply(req.id, errno.EPERM, "explain is for root only")
        gid = req.gids[0] if req.gids else _primary_gid(req.uid)
        subject = Subject(req.uid, gid, frozenset((gid, *req.gids)))
        ex = explain(self.policy, subject, req.path, req.access)
        d = ex.decision
        return proto.ExplainReply(req.id, d.allowed, d.rule, d.reason, ex.near_rule, ex.near_reason)

    def _status(self, conn: Connection, req: proto.StatusRequest) -> proto.Reply:
        if conn.peer.uid != 0:
            return proto.ErrorReply(req.id, errno.EPERM, "status is for root only")
        return proto.StatusReply(req.id, self.status_fields())

    def status_fields(self) -> dict[str, object]:
        now = time.time()
        fields: dict[str, object] = {
            "pid": os.getpid(),
            "version": proto.__version__,
            "uptime_s": round(now - self.started, 1),
            "policy": self.policy_path,
            "policy_loaded": self.policy_loaded,
            "rules": self.policy.rule_count,
            "connections_open": len(self.conns),
            "audit_dropped": self.audit.dropped,
            "last_reload_error": self.last_reload_error,
        }
        for key in ("connections", "refused_connections", "idle_closed", "requests",
                    "allowed", "denied", "failed", "protocol_errors", "reloads",
                    "reload_failures", "accept_errors"):
            fields[key] = self.stats[key]
        return fields

    # ---------------------------------------------------------------- replies

    def _send(self, conn: Connection, data: bytes, fds: list[int] | None = None) -> None:
        """Queue a reply; the broker owns `fds` until the kernel has them."""
        conn.outbox.append((data, fds or []))
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        while conn.outbox:
            data, fds = conn.outbox[0]
            try:
                unix.send_message(conn.sock, data, fds)
            except BlockingIOError:
                # The client is not reading: wait for room, read nothing more.
                self._ep.modify(conn.fd, _OUT)
                return
            except OSError as exc:
                log.info("dropping %s: send failed: %s", _who(conn.peer), exc.strerror)
                self._close(conn)
                return
            conn.outbox.popleft()
            unix.close_fds(fds)
        self._ep.modify(conn.fd, _IN)


def _who(peer: Peer) -> str:
    return f"uid {peer.uid} gid {peer.gid} pid {peer.pid}"


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def bind_listener(name: str, backlog: int = Limits.backlog) -> socket.socket:
    """Bind and listen on the abstract name; refuse clearly if it is taken.

    Raises:
        OSError: EADDRINUSE with a message naming the squatter's uid and pid
            when it can be learned.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # Accepted connections inherit SO_PASSCRED, so every request carries
    # kernel-checked credentials from the first datagram on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        sock.bind(unix.abstract_address(name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"abstract socket @{name} is already bound by "
                          f"another process ({_holder(name)}); is a broker already running, "
                          "or is someone squatting the name?") from None
        raise
    sock.listen(backlog)
    return sock


def _holder(name: str) -> str:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(0.5)
    try:
        probe.connect(unix.abstract_address(name))
        cred = unix.peer_cred(probe)
        return f"uid {cred.uid}, pid {cred.pid}"
    except OSError:
        return "owner unknown"
    finally:
        probe.close()
