"""The TUN and NETCONF services: devices leased to a connection, and the changes
the broker makes over rtnetlink on a client's behalf (docs/security.md,
invariant 12).

TUN: the name pattern is judged before anything is made (with "%d" read as
"0"), the device is created (tun.py: new, not persistent, IFF_NO_PI), the
actual name is judged again (a denial deletes the device at once), and the
device joins the connection's lease before its fd is sent. NETCONF: the
request's fields are parsed into addresses and networks, judged with the
connection's lease in view (policy/netdecide.py), built into a message from
those fields alone (fields.py, messages.py: never a pass-through), and sent
on the broker's own rtnetlink socket. The reply goes out when the kernel
acknowledges, with its errno and extended-ack message: the loop never waits
on the kernel (invariant 6).

A lease ends with its connection, and the loop closes a connection whose
process has exited (its pidfd). Then every change made for it on devices it
does not lease is undone, newest first, and its devices are deleted
(RTM_DELLINK), whatever the holder did to them (TUNSETPERSIST, TUNSETOWNER).
The link monitor (monitor.py) tells when a device goes away for another
reason, and the lease forgets it. A record of each lease's devices is kept on
disk (leasefile.py), so that a restarted broker deletes what the last one
left (`start`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from privbroker import protocol as proto
from privbroker.protocol.targets import SocketTarget

from ..core.audit import AuditLog
from ..core.connection import Connection
from ..policy.netdecide import decide_netop, socket_rule
from ..policy.rules import Policy
from . import leasefile, tun
from .fields import LinkFields, LinkRef
from .leases import Lease
from .messages import Kind
from .monitor import LinkEvent, LinkMonitor
from .netops import kernel_text, logged, needs_network, parse, vars_of
from .replies import Link
from .rtnl import Rtnl

log = logging.getLogger("privbroker")

DEFAULT_MAX_DEVICES = 4  # per uid, where the rule says no max_devices
# Requests of one connection waiting for the kernel: the rtnetlink socket's
# own bound (Rtnl's MAX_PENDING) is shared by all, so no client may take it.
MAX_IN_FLIGHT = 8


class Loop(Protocol):
    """What the network services ask of the loop (core/server.py)."""

    def send(self, conn: Connection, data: bytes, fds: list[int], reserved: int) -> None: ...

    def settle(self, conn: Connection) -> None: ...

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None: ...

    def watch_exit(self, conn: Connection) -> None: ...


class NetService:
    """Serves TUN and NETCONF for the loop and keeps the leases."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        audit: AuditLog,
        stats: Counter[str],
        record_dir: Path = leasefile.RECORD_DIR,
    ) -> None:
        self._policy = policy
        self._audit = audit
        self._stats = stats
        self._record_dir = record_dir
        self._rtnl: Rtnl | None = None
        self._monitor: LinkMonitor | None = None
        self._loop: Loop | None = None
        self._leases: dict[Connection, tuple[str, Lease]] = {}
        self._keys = (f"{os.getpid()}-{n}" for n in itertools.count())
        self._in_flight: Counter[Connection] = Counter()
        # Connections closed with requests still at the kernel: what those do
        # is undone as soon as the kernel says it was done.
        self._closed: set[Connection] = set()
        self._lock = -1

    # ------------------------------------------------------------ life

    def prepare(self) -> None:
        """When the policy needs them, open the rtnetlink sockets and delete what
        a broker before this one left: before the broker listens, so that no
        client meets an orphan (waits on the kernel: start-up only)."""
        if needs_network(self._policy()):
            self._open(cleanup=True)

    def start(self, loop: Loop) -> None:
        """Serve from `loop`: its epoll watches the rtnetlink sockets."""
        self._loop = loop
        self._watch()

    def _open(self, cleanup: bool = False) -> None:
        if self._rtnl is not None:
            return
        self._rtnl = Rtnl()
        if cleanup:  # waits on the kernel: at start-up only, never from the loop
            done = leasefile.cleanup_orphans(self._rtnl, self._record_dir, skip=leasefile.held)
            if done.deleted:
                log.warning("deleted %d devices a previous broker leased", len(done.deleted))
        self._lock = leasefile.hold(self._record_dir)  # our records are a live broker's
        self._monitor = LinkMonitor(self._on_link)
        self._watch()

    def _watch(self) -> None:
        if self._loop is not None and self._rtnl is not None and self._monitor is not None:
            self._loop.watch_fd(self._rtnl.fileno(), self._rtnl.on_readable)
            self._loop.watch_fd(self._monitor.fileno(), self._monitor.on_readable)

    def close(self) -> None:
        """At shutdown, after every connection closed (and its undo was sent)."""
        for sock in (self._monitor, self._rtnl):
            if sock is not None:
                sock.close()
        self._rtnl = self._monitor = None
        if self._lock >= 0:
            (self._record_dir / f"{os.getpid()}.lock").unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = -1

    def status(self) -> dict[str, object]:
        devices = [
            f"{d.name} ({conn.peer.uid})"
            for conn, (_, lease) in self._leases.items()
            for d in lease.devices
        ]
        return {"leased_devices": devices, "leases": len(self._leases)}

    def _submit(
        self,
        conn: Connection,
        kind: Kind,
        fields: object,
        done: Callable[[int, str | None, list[Any]], None],
        previous: LinkFields | None = None,
    ) -> None:
        """Send one request for `conn`; `done` runs when the kernel answers. A
        connection at MAX_IN_FLIGHT, or a full socket, gets EAGAIN at once. If
        `conn` closes first, the change is undone when it lands (`previous`:
        what a link change replaced)."""
        assert self._rtnl is not None
        if self._in_flight[conn] >= MAX_IN_FLIGHT:
            return done(errno.EAGAIN, "too many network requests in flight on this connection", [])

        def finished(code: int, ext: str | None, records: list[Any]) -> None:
            self._in_flight[conn] -= 1
            if self._in_flight[conn] <= 0:
                del self._in_flight[conn]
            if conn in self._closed:
                if conn not in self._in_flight:
                    self._closed.discard(conn)
                return self._late(kind, fields, code, previous)
            done(code, ext, records)

        try:
            self._rtnl.submit(kind, fields, finished)
        except OSError as exc:
            return done(exc.errno or errno.EIO, None, [])
        self._in_flight[conn] += 1

    def _late(self, kind: Kind, fields: object, code: int, previous: LinkFields | None) -> None:
        """An answer for a connection that closed meanwhile: undo what it did
        (a change on a device it leased goes with the device)."""
        if code or kind is Kind.GET_LINK:
            return  # nothing was changed (a GET_LINK's SET_LINK is never sent)
        undo = Lease()
        self._record(undo, kind, fields, previous)
        for op in undo.undo_plan():
            assert self._rtnl is not None
            self._rtnl.submit(op.kind, op.fields, logged(f"undo {op.kind.name} (late)"))

    def drop_connection(self, conn: Connection) -> None:
        """The connection closed: undo what was done for it, newest first."""
        if conn in self._in_flight:
            self._closed.add(conn)
        held = self._leases.pop(conn, None)
        if held is None:
            return
        key, lease = held
        for op in lease.undo_plan():
            assert self._rtnl is not None
            try:
                self._rtnl.submit(op.kind, op.fields, logged(f"undo {op.kind.name} for {key}"))
            except OSError as exc:
                log.error("cannot undo %s for lease %s: %s", op.kind.name, key, exc)
        leasefile.remove(self._record_dir, key)

    def _on_link(self, event: LinkEvent) -> None:
        if not event.deleted:
            return
        for key, lease in self._leases.values():
            if lease.forget_device(event.ifindex) is not None:
                log.info("leased device %s went away; lease %s forgets it", event.name, key)
                leasefile.write(self._record_dir, key, lease.devices)

    def _lease(self, conn: Connection) -> tuple[str, Lease]:
        held = self._leases.get(conn)
        if held is None:
            held = self._leases[conn] = (next(self._keys), Lease())
            assert self._loop is not None
            self._loop.watch_exit(conn)
        return held

    # ------------------------------------------------------------- TUN

    def serve_tun(self, conn: Connection, req: proto.TunRequest, mismatch: str) -> None:
        start = time.perf_counter()

        def answer(result: proto.Result, name: str = "", ifindex: int = 0, fd: int = -1) -> None:
            self._account(conn, "tun", vars_of(req), result, start)
            data = proto.encode_reply(proto.TunReply(req.id, result, name, ifindex))
            assert self._loop is not None
            self._loop.send(conn, data, [fd] if fd >= 0 else [], 1)
            self._loop.settle(conn)

        kind: Literal["tun", "tap"] = "tap" if req.tap else "tun"
        if mismatch:
            return answer(proto.Result(errno.EACCES, True, mismatch))
        try:
            tun.check_pattern(req.name)
            first = SocketTarget(kind, name=req.name.replace("%d", "0"))
        except ValueError as exc:
            return answer(proto.Result(errno.EINVAL, False, f"{req.name!r}: {exc}"))
        why, rule = self._judge_device(conn, first, req.mtu)
        if why is not None:
            return answer(why)
        self._open()
        try:
            made = tun.create(req.name, tap=req.tap)
        except OSError as exc:
            return answer(
                proto.Result(exc.errno or errno.EIO, False, f"{kind} {req.name}: {exc.strerror}")
            )
        # The kernel picked the name: judge it too; a denial undoes the device now.
        why, rule = self._judge_device(conn, SocketTarget(kind, name=made.name), req.mtu)
        if why is not None:
            self._delete(made.ifindex, made.fd)
            return answer(why)
        key, lease = self._lease(conn)
        lease.device_created(made.ifindex, made.name)
        leasefile.write(self._record_dir, key, lease.devices)
        text = f"{kind} {made.name} leased by rule '{rule}'"
        if not req.mtu:
            return answer(proto.Result(0, False, text, rule), made.name, made.ifindex, made.fd)

        def mtu_set(code: int, ext: str | None, _records: list[Any]) -> None:
            if code:  # no device with an MTU the client did not ask for: delete it now
                held = self._leases.get(conn)
                if held is not None and held[1].forget_device(made.ifindex) is not None:
                    leasefile.write(self._record_dir, held[0], held[1].devices)
                self._delete(made.ifindex, made.fd)
                return answer(proto.Result(code, False, kernel_text(code, ext), rule))
            answer(proto.Result(0, False, text, rule), made.name, made.ifindex, made.fd)

        self._submit(conn, Kind.SET_LINK, LinkFields(made.ifindex, mtu=req.mtu), mtu_set)

    def _judge_device(
        self, conn: Connection, target: SocketTarget, mtu: int
    ) -> tuple[proto.Result | None, str | None]:
        decision, rule = socket_rule(self._policy(), conn.subject, target)
        if rule is None:
            return proto.Result(errno.EACCES, True, decision.reason, decision.rule), None
        limit = rule.max_devices or DEFAULT_MAX_DEVICES
        uid = conn.peer.uid
        held = sum(len(ls.devices) for c, (_, ls) in self._leases.items() if c.peer.uid == uid)
        if held >= limit:
            why = f"uid {uid} already leases {held} devices; rule '{rule.name}' allows {limit}"
            return proto.Result(errno.EACCES, True, why, rule.name), None
        if mtu and rule.mtu is not None and not rule.mtu[0] <= mtu <= rule.mtu[1]:
            why = f"mtu {mtu} is outside {rule.mtu[0]}-{rule.mtu[1]} (rule '{rule.name}')"
            return proto.Result(errno.EACCES, True, why, rule.name), None
        return None, rule.name

    def _delete(self, ifindex: int, fd: int) -> None:
        os.close(fd)
        assert self._rtnl is not None
        self._rtnl.submit(Kind.DEL_LINK, LinkRef(ifindex=ifindex), logged("delete a denied device"))

    # --------------------------------------------------------- NETCONF

    def serve_netconf(self, conn: Connection, req: proto.NetconfRequest, mismatch: str) -> None:
        start = time.perf_counter()

        def answer(result: proto.Result) -> None:
            self._account(conn, req.action, vars_of(req), result, start)
            assert self._loop is not None
            self._loop.send(conn, proto.encode_reply(proto.NetconfReply(req.id, result)), [], 0)
            self._loop.settle(conn)

        if mismatch:
            return answer(proto.Result(errno.EACCES, True, mismatch))
        lease = self._leases.get(conn, ("", Lease()))[1]
        try:
            op, kind, fields = parse(req, lease)
        except ValueError as exc:
            return answer(proto.Result(errno.EINVAL, False, str(exc)))
        except OSError as exc:
            return answer(
                proto.Result(exc.errno or errno.ENODEV, False, f"{req.ifname}: {exc.strerror}")
            )
        decision = decide_netop(self._policy(), conn.subject, op)
        if not decision.allowed:
            return answer(proto.Result(errno.EACCES, True, decision.reason, decision.rule))
        self._open()

        def done(code: int, ext: str | None, _records: list[Any]) -> None:
            if code:
                return answer(proto.Result(code, False, kernel_text(code, ext), decision.rule))
            if conn in self._leases or not op.leased:
                self._record(self._lease(conn)[1], kind, fields, previous)
            answer(proto.Result(0, False, decision.reason, decision.rule))

        previous: LinkFields | None = None
        if kind is Kind.SET_LINK and not op.leased:
            # A device the client does not lease: learn what to restore, then change it.
            def learned(code: int, ext: str | None, records: list[Any]) -> None:
                nonlocal previous
                link = next((r for r in records if isinstance(r, Link)), None)
                if code or link is None:
                    return answer(proto.Result(code or errno.ENODEV, False, kernel_text(code, ext)))
                assert isinstance(fields, LinkFields)
                previous = LinkFields(
                    link.ifindex,
                    up=None if fields.up is None else link.up,
                    mtu=None if fields.mtu is None else link.mtu,
                )
                self._submit(conn, kind, fields, done, previous)

            assert isinstance(fields, LinkFields)
            self._submit(conn, Kind.GET_LINK, LinkRef(ifindex=fields.ifindex), learned)
            return
        self._submit(conn, kind, fields, done)

    @staticmethod
    def _record(lease: Lease, kind: Kind, fields: object, previous: LinkFields | None) -> None:
        """Log a change the kernel made in `lease`, for its undo."""
        if kind is Kind.ADD_ADDRESS:
            lease.address_added(fields)  # type: ignore[arg-type]
        elif kind is Kind.DEL_ADDRESS:
            lease.address_deleted(fields)  # type: ignore[arg-type]
        elif kind is Kind.ADD_ROUTE:
            lease.route_added(fields)  # type: ignore[arg-type]
        elif kind is Kind.DEL_ROUTE:
            lease.route_deleted(fields)  # type: ignore[arg-type]
        elif previous is not None:
            lease.link_changed(previous)

    def _account(
        self, conn: Connection, what: str, args: dict[str, object], r: proto.Result, start: float
    ) -> None:
        verdict = "allow" if r.errno == 0 else ("deny" if r.denied else "error")
        self._stats[{"allow": "allowed", "deny": "denied", "error": "failed"}[verdict]] += 1
        if not self._audit.enabled:
            return
        p = conn.peer
        self._audit.record(
            {
                "uid": p.uid,
                "gid": p.gid,
                "groups": list(p.groups),
                "pid": p.pid,
                "exe": conn.exe,
                "declared": conn.declared,  # the client's words, not the kernel's
                "request": what,
                "target": " ".join(f"{k}={v}" for k, v in args.items()),
                **args,
                "decision": verdict,
                "rule": r.rule,
                "errno": r.errno,
                "error": errno.errorcode.get(r.errno) if r.errno else None,
                "reason": r.reason,
                "duration_us": round((time.perf_counter() - start) * 1e6, 1),
            }
        )
