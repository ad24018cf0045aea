"""The op table of the broker: for each request op, the service that serves it.

The loop (server.py) decodes a request, checks that root-only ops come from
root, and hands it here; it knows requests and fds, not resources. Each
service serves one op, in order:
- OPEN: files/ through core/dispatch.py (the opener, the workers, the fast
  path's table);
- EXPLAIN, STATUS: answered from the policy and the loop's counters;
- SOCKET: net/service.py creates the socket as root for the client;
- TUN, NETCONF: net/netconf.py creates leased devices and makes changes
  over rtnetlink, answering when the kernel has.
A service that sends fds first reserves them in the fd budget (the loop's
`reserve`), so a client that leaves its replies unread cannot make the
broker hold more for it. Adding an op adds a row here (docs/design.md,
"Adding a request kind").
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Protocol

from privbroker import protocol as proto
from privbroker import unix

from ..net.netconf import NetService
from ..net.service import SocketService
from .answers import admin_reply
from .connection import Connection, credential_mismatch
from .dispatch import Dispatcher

# A service: serves one request of its op for a connection, given the
# credentials check's verdict ("" when they agree) and the sender's pid.
Route = Callable[[Connection, proto.Request, str, int], None]


class Loop(Protocol):
    """What the services ask of the loop (core/server.py)."""

    def reserve(
        self, conn: Connection, req: proto.Request, mismatch: str, pid: int, nfds: int
    ) -> bool:
        """Charge `nfds` to the fd budget, or park the request (False)."""

    def send(self, conn: Connection, data: bytes, fds: list[int], reserved: int) -> None:
        """Queue a reply with its fds; what was reserved and not used is refunded."""

    def settle(self, conn: Connection) -> None:
        """Watch the connection for what it can do next, if it is still open."""

    def refuse(self, conn: Connection, ident: int, code: int, reason: str) -> None:
        """An ERROR reply to a request refused as a whole; the connection lives on."""

    def violation(self, conn: Connection, what: str) -> None:
        """Log a protocol violation and close the connection, with no reply."""


class Services:
    """The op table and the services in it."""

    def __init__(
        self,
        loop: Loop,
        dispatch: Dispatcher,
        sockets: SocketService,
        net: NetService,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._loop = loop
        self._dispatch = dispatch
        self.sockets = sockets
        self.net = net
        self._status = status
        self.stats = dispatch.stats
        self._routes: dict[proto.Op, Route] = {
            proto.Op.OPEN: self._open,
            proto.Op.EXPLAIN: self._admin,
            proto.Op.STATUS: self._admin,
            proto.Op.SOCKET: self._socket,
            proto.Op.TUN: self._tun,
            proto.Op.NETCONF: self._netconf,
            proto.Op.DECLARE: self._declare,
        }
        assert self._routes.keys() == proto.REQUESTS.keys()

    def handle(self, conn: Connection, data: bytes, cred: unix.Ucred | None) -> None:
        """Decode one datagram and serve it, refuse it, or close its connection.

        A malformed message is a protocol violation (the connection closes,
        with no reply); a well-formed one of an op this broker does not know
        is refused with EOPNOTSUPP and the connection lives on. Credentials
        that disagree with the connection's (docs/security.md, invariant 4)
        are handed to the service, which denies with them.
        """
        loop = self._loop
        try:
            request = proto.decode_request(data)
        except proto.UnsupportedVersion as exc:
            reply = proto.encode_reply(proto.ErrorReply(exc.id, errno.EPROTO, str(exc)))
            loop.send(conn, reply, [], 0)
            return loop.violation(conn, str(exc))
        except proto.UnknownOperation as exc:
            # Well formed, from a newer client most likely: say so, keep serving.
            self.stats["unsupported_ops"] += 1
            return loop.refuse(conn, exc.id, errno.EOPNOTSUPP, str(exc))
        except proto.ProtocolError as exc:
            return loop.violation(conn, str(exc))
        if cred is None:
            return loop.violation(conn, "request without SCM_CREDENTIALS")
        if request.root_only and conn.peer.uid != 0:
            what = f"{request.op.name.lower()} is for root only"
            return loop.refuse(conn, request.id, errno.EPERM, what)
        self.serve(conn, request, credential_mismatch(cred, conn.peer), cred.pid)

    def serve(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        self._routes[req.op](conn, req, mismatch, pid)

    def _open(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        assert isinstance(req, proto.OpenRequest)  # routed here by its op
        if self._loop.reserve(conn, req, mismatch, pid, len(req.items)):
            self._dispatch.open(conn, req, mismatch, pid)
            self._loop.settle(conn)

    def _admin(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        reply = admin_reply(self._dispatch.policy, req, mismatch, self._status)
        self._loop.send(conn, proto.encode_reply(reply), [], 0)

    def _tun(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        assert isinstance(req, proto.TunRequest)  # routed here by its op
        if self._loop.reserve(conn, req, mismatch, pid, 1):
            self.net.serve_tun(conn, req, mismatch)  # answers, with the fd, when made

    def _netconf(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        assert isinstance(req, proto.NetconfRequest)  # routed here by its op
        self.net.serve_netconf(conn, req, mismatch)  # answers when the kernel has

    def _declare(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        assert isinstance(req, proto.DeclareRequest)  # routed here by its op
        conn.declared = req.program  # recorded as the client's claim; it grants nothing
        self._loop.send(conn, proto.encode_reply(proto.DeclareReply(req.id)), [], 0)

    def drop_connection(self, conn: Connection) -> None:
        """The connection closed: its workers' opens and its leases end."""
        self._dispatch.drop_connection(conn)
        self.net.drop_connection(conn)

    def _socket(self, conn: Connection, req: proto.Request, mismatch: str, pid: int) -> None:
        assert isinstance(req, proto.SocketRequest)  # routed here by its op
        if self._loop.reserve(conn, req, mismatch, pid, 1):
            data, fds = self.sockets.serve(conn, req, mismatch)
            self._loop.send(conn, data, fds, 1)
            self._loop.settle(conn)
