"""The SOCKET service: judge a socket request, create the socket as root for
the client, and answer with it.

The loop (core/server.py) routes Op.SOCKET here once the fd budget has room
for the one fd the reply may carry. Each step can only end in a reply:

1. credentials that disagree with the connection's: denied (invariant 4);
2. the target text is parsed (protocol/targets.py) into its one canonical
   form; a malformed one is EINVAL. A link-local zone given by number is
   turned into its device name first, so rules on `interfaces` judge names;
3. the policy decides on that form (policy/netdecide.py): a denial is
   EACCES with the reason and the rule;
4. net/sockets.py creates exactly that socket, owned by the client, TCP
   already listening, with no option that needs a capability
   (invariant 11); a kernel refusal (EADDRINUSE, ...) is that errno.
Creating a socket never blocks, so it runs on the loop's thread. Every
decision is audited: family, type, address, port and device.

An allowed request whose socket was made is recorded in the client's fast
table (net/fastsock.py): the same request again is then made and answered
by the native fast path (net/_fastsock.c), and audited here (audit_fast).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from privbroker import protocol as proto
from privbroker.protocol.targets import SocketTarget, parse_socket_target

from ..core.answers import DECISION_CACHE_SIZE
from ..core.audit import AuditLog
from ..core.connection import Connection
from ..files.fastpath import FastTable
from ..policy.decision import Subject
from ..policy.netdecide import decide_socket
from ..policy.rules import Policy
from . import fastsock, sockets

_VERDICTS = {"allow": "allowed", "deny": "denied", "error": "failed"}
_FAMILIES: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}


class SocketService:
    """Serves SOCKET requests for the loop; holds no state of its own."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        audit: AuditLog,
        stats: Counter[str],
        fast_table: Callable[[Subject], FastTable] | None = None,
    ) -> None:
        self._policy = policy
        self._audit = audit
        self._stats = stats
        # The client's fast table under the current policy (core/dispatch.py),
        # None when the broker runs without the fast path.
        self._fast_table = fast_table

    def serve(
        self, conn: Connection, req: proto.SocketRequest, mismatch: str
    ) -> tuple[bytes, list[int]]:
        """The reply's bytes and its fds (one socket, or none), which the caller sends."""
        start = time.perf_counter()
        target: SocketTarget | None = None
        fd = -1
        try:
            target = parse_socket_target(req.target)
            if target.scope_id:  # rules judge device names: the zone by its name
                target = replace(target, scope_id=0, zone=socket.if_indextoname(target.scope_id))
            result, fd = self._judge_and_make(conn, conn.subject, target, req, mismatch)
        except ValueError as exc:
            result = proto.Result(errno.EINVAL, False, f"{req.target!r}: {exc}")
        except OSError:  # if_indextoname
            assert target is not None
            result = proto.Result(errno.ENODEV, False, f"no device has index {target.scope_id}")
        verdict = "allow" if result.errno == 0 else ("deny" if result.denied else "error")
        self._stats[_VERDICTS[verdict]] += 1
        if self._audit.enabled:
            self._record(conn, req, target, result, verdict, time.perf_counter() - start)
        try:
            if fd >= 0 and self._fast_table is not None:
                assert target is not None and not mismatch
                self._remember(conn.subject, req, target, result)
            data = proto.encode_reply(proto.SocketReply(req.id, result))
        except BaseException:
            if fd >= 0:
                os.close(fd)  # invariant 5: the fd is ours until it is returned
            raise
        return data, [fd] if fd >= 0 else []

    def _remember(
        self, subject: Subject, req: proto.SocketRequest, target: SocketTarget, result: proto.Result
    ) -> None:
        """Record an allowed request whose socket was made, for the fast path."""
        assert self._fast_table is not None
        if (entry := fastsock.entry(req, target, result)) is not None:
            table = self._fast_table(subject)  # the current policy's (dispatch.py)
            if len(table) >= DECISION_CACHE_SIZE:
                table.clear()
            table[fastsock.key(req)] = entry

    def audit_fast(self, conn: Connection, info: fastsock.Fast, took: float) -> None:
        """Audit a socket the fast path made and sent, in `took` s, as serve() would have."""
        self._record(conn, info.request, info.target, info.result, "allow", took)

    def _judge_and_make(
        self,
        conn: Connection,
        subject: Subject,
        target: SocketTarget,
        req: proto.SocketRequest,
        mismatch: str,
    ) -> tuple[proto.Result, int]:
        if mismatch:
            return proto.Result(errno.EACCES, True, mismatch), -1
        if target.kind in ("tun", "tap"):
            return proto.Result(
                errno.EINVAL, False, f"{target} is a device: ask for it with open_tun"
            ), -1
        if target.scope_id:
            try:
                zone = socket.if_indextoname(target.scope_id)
            except OSError:
                return proto.Result(
                    errno.ENODEV, False, f"no device has index {target.scope_id}"
                ), -1
            target = replace(target, scope_id=0, zone=zone)
        decision = decide_socket(self._policy(), subject, target, v6only=req.v6only)
        if not decision.allowed:
            return proto.Result(errno.EACCES, True, decision.reason, decision.rule), -1
        peer = conn.peer
        try:
            fd = sockets.create_socket(
                target,
                uid=peer.uid,
                gid=peer.gid,
                backlog=req.backlog or None,
                v6only=req.v6only,
                reuse_port=req.reuse_port,
            )
        except OSError as exc:
            code = exc.errno or errno.EIO
            # The client prints the errno's own text with the target: nothing to add.
            return proto.Result(code, False, "", decision.rule), -1
        return proto.Result(0, False, decision.reason, decision.rule), fd

    def _record(
        self,
        conn: Connection,
        req: proto.SocketRequest,
        target: SocketTarget | None,
        result: proto.Result,
        verdict: str,
        took: float,
    ) -> None:
        p = conn.peer
        fields: dict[str, object] = {
            "uid": p.uid,
            "gid": p.gid,
            "groups": list(p.groups),
            "pid": p.pid,
            "exe": conn.exe,
            "declared": conn.declared,  # the client's words, not the kernel's
            "request": "socket",
            "target": req.target,
            "decision": verdict,
            "rule": result.rule,
            "errno": result.errno,
            "error": errno.errorcode.get(result.errno) if result.errno else None,
            "reason": result.reason,
            "duration_us": round(took * 1e6, 1),
        }
        if target is not None:
            fields.update(
                kind=target.kind,
                family=_FAMILIES.get(target.family),
                address=target.address or None,
                port=target.port or None,
                protocol=target.protocol or None,
                interface=target.interface or target.zone or None,
                backlog=req.backlog or None,
                v6only=req.v6only,
                reuse_port=req.reuse_port,
            )
        self._audit.record(fields)
