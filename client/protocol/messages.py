"""The protocol's vocabulary: operations, access words, open modes, paths, and one
frozen dataclass per message. No I/O; the bytes are in codec.py."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeAlias

from .access import Access
from .limits import (
    VERSION,
)


class ProtocolError(Exception):
    """Bytes that are not a valid privbroker message."""


class UnsupportedVersion(ProtocolError):
    """A well-formed message from a different protocol version."""

    def __init__(self, version: int, ident: int) -> None:
        super().__init__(f"protocol version {version} not supported; this side speaks {VERSION}")
        self.version = version
        self.id = ident


class UnknownOperation(ProtocolError):
    """A well-formed message of an operation this side does not know (EOPNOTSUPP).

    A broker answers it with an ERROR reply and keeps the connection: the
    sender is most likely a newer client, not a violator."""

    def __init__(self, op: int, ident: int) -> None:
        super().__init__(f"operation {op} is not supported by this broker")
        self.op = op
        self.id = ident


class Op(enum.IntEnum):
    OPEN = 1
    EXPLAIN = 2
    STATUS = 3
    ERROR = 4
    SOCKET = 5
    TUN = 6
    NETCONF = 7
    DECLARE = 8


# ------------------------------------------------------------------ replies
# Each message class names its operation (`op`); a request class also names
# the reply that answers it, whether only root may send it, and whether it
# is safe to resend after a lost connection. The tables at the end map each
# op to its class, and the codec (codec.py), the clients' call rules
# (calls.py) and the broker's loop (broker/core/server.py) look requests up
# there: adding an operation adds a class here and an entry in the table.


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one open: errno 0 means an fd rides on the reply."""

    errno: int = 0
    denied: bool = False
    reason: str = ""
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class OpenReply:
    op: ClassVar[Op] = Op.OPEN
    id: int
    results: tuple[Result, ...]

    @property
    def nfds(self) -> int:
        return sum(1 for r in self.results if r.errno == 0)


@dataclass(frozen=True, slots=True)
class ExplainReply:
    op: ClassVar[Op] = Op.EXPLAIN
    id: int
    allowed: bool
    rule: str | None
    reason: str
    near_rule: str | None = None
    near_reason: str = ""


@dataclass(frozen=True, slots=True)
class StatusReply:
    op: ClassVar[Op] = Op.STATUS
    id: int
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The request as a whole was refused (EPERM, EOPNOTSUPP, EPROTO, ...)."""

    op: ClassVar[Op] = Op.ERROR
    id: int
    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class SocketReply:
    """The outcome of a SOCKET request: errno 0 means the socket rides on it."""

    op: ClassVar[Op] = Op.SOCKET
    id: int
    result: Result

    @property
    def nfds(self) -> int:
        return 0 if self.result.errno else 1


@dataclass(frozen=True, slots=True)
class TunReply:
    """The outcome of a TUN request: errno 0 means the device's fd rides on it,
    with the name the kernel gave the device and its index."""

    op: ClassVar[Op] = Op.TUN
    id: int
    result: Result
    name: str = ""
    ifindex: int = 0

    @property
    def nfds(self) -> int:
        return 0 if self.result.errno else 1


@dataclass(frozen=True, slots=True)
class NetconfReply:
    """The kernel's answer to a NETCONF change: errno 0 once it acknowledged;
    else its errno, with its extended-ack message in the reason."""

    op: ClassVar[Op] = Op.NETCONF
    id: int
    result: Result


@dataclass(frozen=True, slots=True)
class DeclareReply:
    """The broker took note of the declared program."""

    op: ClassVar[Op] = Op.DECLARE
    id: int


Reply: TypeAlias = (
    OpenReply
    | ExplainReply
    | StatusReply
    | ErrorReply
    | SocketReply
    | TunReply
    | NetconfReply
    | DeclareReply
)


# ----------------------------------------------------------------- requests

# A resent open that creates or truncates could undo what the first one did.
_UNSAFE_TO_RESEND = int(Access.CREATE | Access.TRUNCATE)


@dataclass(frozen=True, slots=True)
class OpenItem:
    path: str
    access: Access
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """Open 1..MAX_BATCH paths; the reply has one result per path, and the fds."""

    op: ClassVar[Op] = Op.OPEN
    reply: ClassVar[type[Reply]] = OpenReply
    root_only: ClassVar[bool] = False
    id: int
    items: tuple[OpenItem, ...]

    def retry_safe(self) -> bool:
        return not any(int(i.access) & _UNSAFE_TO_RESEND for i in self.items)


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """What the policy would decide for (uid, gids, path, access): root only."""

    op: ClassVar[Op] = Op.EXPLAIN
    reply: ClassVar[type[Reply]] = ExplainReply
    root_only: ClassVar[bool] = True
    id: int
    uid: int
    gids: tuple[int, ...]
    path: str
    access: Access

    def retry_safe(self) -> bool:
        return True  # changes nothing


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """What the running broker is doing: root only."""

    op: ClassVar[Op] = Op.STATUS
    reply: ClassVar[type[Reply]] = StatusReply
    root_only: ClassVar[bool] = True
    id: int

    def retry_safe(self) -> bool:
        return True  # changes nothing


@dataclass(frozen=True, slots=True)
class SocketRequest:
    """A privileged socket: the broker creates it as the target says and the
    policy grants, and hands it over (docs/protocol.md, "SOCKET").

    `target` is written as privbroker.protocol.targets prints a SocketTarget
    ("tcp:[::]:443", "udp:0.0.0.0:53@eth0", "icmp6", "raw:icmp"); the broker
    parses it, so a malformed target is an EINVAL reply, not a violation.
    `backlog` 0 is the system's maximum; `v6only` None keeps the kernel's
    default (dual-stack)."""

    op: ClassVar[Op] = Op.SOCKET
    reply: ClassVar[type[Reply]] = SocketReply
    root_only: ClassVar[bool] = False
    id: int
    target: str
    backlog: int = 0
    v6only: bool | None = None
    reuse_port: bool = False

    def retry_safe(self) -> bool:
        return True  # an undelivered socket is closed with the connection: nothing stays bound


@dataclass(frozen=True, slots=True)
class TunRequest:
    """A new tun (or tap) device leased to this connection (docs/protocol.md, "TUN").

    `name` may be a kernel pattern ("vpn%d"); `mtu` 0 keeps the default. The
    device is the client's until its connection or process ends; then the
    broker deletes it, whatever the holder did to it."""

    op: ClassVar[Op] = Op.TUN
    reply: ClassVar[type[Reply]] = TunReply
    root_only: ClassVar[bool] = False
    id: int
    name: str
    tap: bool = False
    mtu: int = 0

    def retry_safe(self) -> bool:
        return True  # an undelivered device is deleted with the connection


# What a NETCONF request may do.
NETCONF_ACTIONS = ("add_address", "del_address", "set_link", "add_route", "del_route")


@dataclass(frozen=True, slots=True)
class NetconfRequest:
    """A change the broker makes over rtnetlink for the client (docs/protocol.md,
    "NETCONF"). `action` is one of NETCONF_ACTIONS; the fields it uses:
    add_address/del_address: ifname, address ("10.8.0.2/24");
    set_link: ifname, up (None: unchanged), mtu (0: unchanged);
    add_route/del_route: address (the destination, "10.9.0.0/16"), ifname
    (the device, "" for none), via ("" for none), metric (-1 for none),
    table (0 for main). Checked by the broker: a malformed value is EINVAL."""

    op: ClassVar[Op] = Op.NETCONF
    reply: ClassVar[type[Reply]] = NetconfReply
    root_only: ClassVar[bool] = False
    id: int
    action: str
    ifname: str = ""
    address: str = ""
    up: bool | None = None
    mtu: int = 0
    via: str = ""
    metric: int = -1
    table: int = 0

    def retry_safe(self) -> bool:
        return False  # an add done twice fails the second time (EEXIST)


@dataclass(frozen=True, slots=True)
class DeclareRequest:
    """The program this connection's requests are for, in the client's words
    (privopen declares the command it will exec). The broker records it in
    the audit as declared by the client, beside the executable the kernel
    names; it grants nothing and is judged by nothing."""

    op: ClassVar[Op] = Op.DECLARE
    reply: ClassVar[type[Reply]] = DeclareReply
    root_only: ClassVar[bool] = False
    id: int
    program: str

    def retry_safe(self) -> bool:
        return True


Request: TypeAlias = (
    OpenRequest
    | ExplainRequest
    | StatusRequest
    | SocketRequest
    | TunRequest
    | NetconfRequest
    | DeclareRequest
)

# The op tables: every request and reply class, by its op.
REQUESTS: Mapping[Op, type[Request]] = MappingProxyType(
    {
        cls.op: cls
        for cls in (
            OpenRequest,
            ExplainRequest,
            StatusRequest,
            SocketRequest,
            TunRequest,
            NetconfRequest,
            DeclareRequest,
        )
    }
)
REPLIES: Mapping[Op, type[Reply]] = MappingProxyType(
    {
        cls.op: cls
        for cls in (
            OpenReply,
            ExplainReply,
            StatusReply,
            ErrorReply,
            SocketReply,
            TunReply,
            NetconfReply,
            DeclareReply,
        )
    }
)
