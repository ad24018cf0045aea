"""What a socket call means, whichever client carries it: shared by api.py, aio.py,
net.py and privopen, as calls.py is for files.

A privileged socket is asked for by its target text (privbroker.protocol.targets,
"tcp:[::]:443", "icmp6", "raw:icmp", each optionally "@DEV"), which is also what
the policy judges and the audit records. This module turns the socket module's
vocabulary into that text and the broker's answer back into a `socket.socket`:

- Rule 1 (validation before I/O): `bind_call`, `icmp_call`, `raw_call` and
  `target_call` raise ValueError for anything the broker would refuse as
  malformed: a hostname (a privileged call does no DNS: what the policy judges
  must be the address the kernel binds), port 0 or out of range, a socket type
  other than SOCK_STREAM or SOCK_DGRAM, options that do not apply (a backlog
  for UDP, v6only for IPv4). Every target is built as a `SocketTarget`, printed
  and parsed back (`parse_socket_target`) before it is sent, so what goes out
  is exactly the canonical text the broker will parse.
- Rule 2 (every fd has one owner, docs/security.md invariant 5): `socket_for`
  owns the fds it is given: they end up in the returned socket, or closed.
- `%name` zones are kept as names: the broker resolves them in its own (the
  socket's) network namespace, and a pure function asks no kernel.

No I/O here but wrapping a received fd.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import protocol, unix
from .errors import ProtocolError, error_for_result
from .protocol import Reply, SocketReply, SocketRequest, fastwire
from .protocol.targets import MAX_SCOPE, Kind, SocketTarget, parse_socket_target

__all__ = ["SocketCall", "bind_call", "icmp_call", "raw_call", "target_call", "target_for"]

# What bind() takes, as the socket module spells it: (host, port) for IPv4;
# (host, port[, flowinfo[, scope_id]]) for IPv6.
Address = tuple[Any, ...]

MAX_FLOWINFO = 2**20 - 1  # sin6_flowinfo's flow label is 20 bits (bind ignores it)
_KINDS: dict[int, Kind] = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}
_FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}
_NUMBER = re.compile(r"[0-9]{1,10}")
# What the broker hands over for each kind: (type, protocol), checked on arrival.
_MADE: dict[str, Callable[[SocketTarget], tuple[int, int]]] = {
    "tcp": lambda t: (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "udp": lambda t: (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
    "icmp": lambda t: (
        socket.SOCK_DGRAM,
        socket.IPPROTO_ICMP if t.family == socket.AF_INET else socket.IPPROTO_ICMPV6,
    ),
    "raw": lambda t: (socket.SOCK_RAW, t.protocol),
}


@dataclass(frozen=True, slots=True)
class SocketCall:
    """A checked socket call: the target and the request options, ready to send."""

    target: SocketTarget
    backlog: int = 0  # the wire's 0: the system's maximum (net.core.somaxconn)
    v6only: bool | None = None
    reuse_port: bool = False
    # The request's bytes after its id (fastwire.socket_body), packed once.
    body: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", fastwire.socket_body(self.make(0)))

    @property
    def text(self) -> str:
        return str(self.target)

    def make(self, ident: int) -> SocketRequest:
        return SocketRequest(ident, self.text, self.backlog, self.v6only, self.reuse_port)


# ------------------------------------------------------------- targets


def _canonical(target: SocketTarget) -> SocketTarget:
    """`target`, after checking that its text parses back to it (Rule 1)."""
    if parse_socket_target(str(target)) != target:  # pragma: no cover - a targets.py bug
        raise ValueError(f"{target} does not read back as the socket asked for")
    return target


def _interface(interface: object) -> str:
    if interface is None:
        return ""
    if not isinstance(interface, str) or not interface:
        raise ValueError(f"interface must be a device name such as 'eth0', or None: {interface!r}")
    return interface


def _ip(host: object) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """The address and the zone ('%eth0', '%2') of a numeric host, else ValueError."""
    if not isinstance(host, str):
        raise ValueError(f"the host must be a str such as '::' or '0.0.0.0', not {host!r}")
    if not host:
        raise ValueError("'' (any address) has no family here: write '0.0.0.0' or '::'")
    address, percent, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address: a privileged call takes numeric addresses only and "
            "looks up no names (no DNS: the policy judges the address that is bound); resolve "
            "the name first, e.g. with socket.getaddrinfo"
        ) from None
    if percent and (ip.version == 4 or not zone):
        raise ValueError(f"{host!r}: only an IPv6 address takes a zone, as 'fe80::1%eth0'")
    return ip, zone


def _u32(value: object, what: str, top: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise ValueError(f"{what} must be an int from 0 to {top}, not {value!r}")
    return value


def bind_target(address: Address, type: int, interface: str | None) -> SocketTarget:
    """The checked target of bind_privileged(address, type, interface=...); ValueError if none."""
    if not isinstance(type, int) or isinstance(type, bool) or type not in _KINDS:
        raise ValueError(
            f"type must be socket.SOCK_STREAM (TCP) or socket.SOCK_DGRAM (UDP), not {type!r}"
        )
    if not isinstance(address, tuple) or not 2 <= len(address) <= 4:
        raise ValueError(
            f"address must be a tuple as bind() takes, ('::', 443) or "
            f"('fe80::1', 547, 0, scope_id), not {address!r}"
        )
    ip, zone = _ip(address[0])
    port = address[1]
    if not isinstance(port, int) or isinstance(port, bool):
        raise ValueError(f"the port must be an int, not {port!r}")
    if port == 0:
        raise ValueError(
            "port 0 asks the kernel for any free port, which needs no privilege: bind it yourself"
        )
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    scope_id = 0
    if ip.version == 4:
        if len(address) != 2:
            raise ValueError(f"an IPv4 address is a (host, port) pair, not {address!r}")
        family = socket.AF_INET
    else:
        family = socket.AF_INET6
        if len(address) > 2:
            _u32(address[2], "flowinfo", MAX_FLOWINFO)  # bind() ignores it, as the kernel does
        if len(address) > 3:
            scope_id = _u32(address[3], "scope_id", MAX_SCOPE)
        if zone and scope_id:
            raise ValueError(f"{address!r} names the zone twice: give '%zone' or a scope id")
        if _NUMBER.fullmatch(zone):  # '%2' is a scope id, as getaddrinfo reads it
            scope_id, zone = int(zone), ""
    return _canonical(
        SocketTarget(_KINDS[type], family, port, str(ip), scope_id, zone, _interface(interface))
    )


def target_for(
    address: Address, type: int = socket.SOCK_STREAM, interface: str | None = None
) -> str:
    """The target text the broker is asked for, for what bind() would take.

    Pure: no I/O, no name lookup. `target_for(("::", 443))` is "tcp:[::]:443";
    `target_for(("0.0.0.0", 53), socket.SOCK_DGRAM)` is "udp:0.0.0.0:53";
    `target_for(("fe80::1%eth0", 547), socket.SOCK_DGRAM)` is "udp:[fe80::1%eth0]:547";
    a 4-tuple's scope id becomes a zone number ("[fe80::1%2]"); `interface`
    adds "@DEV".

    Raises:
        ValueError: a hostname, a bad port, type or interface (the message says which).
    """
    return str(bind_target(address, type, interface))


def _family(family: object) -> int:
    if not isinstance(family, int) or isinstance(family, bool) or family not in _FAMILIES:
        raise ValueError(f"family must be socket.AF_INET or socket.AF_INET6, not {family!r}")
    return family


# --------------------------------------------------------------- calls


def bind_call(
    address: Address,
    type: int = socket.SOCK_STREAM,
    backlog: int | None = None,
    v6only: bool | None = None,
    interface: str | None = None,
    reuse_port: bool = False,
) -> SocketCall:
    """A checked bind_privileged call; ValueError (before any I/O) if it cannot be made.

    A server binds the same few addresses again and again: the checked call
    is kept (it is immutable) for arguments of the same values *and types*
    (443 and 443.0, or True and 1, are equal keys to a dict but not the same
    call: one is refused), so a repeated bind does no parsing.
    """
    kinds = tuple(map(_type_of, address)) if _type_of(address) is tuple else None
    try:
        return _bind_call(address, kinds, type, backlog, v6only, interface, reuse_port)
    except TypeError:  # an unhashable argument: checked (and refused) without the cache
        return _options(bind_target(address, type, interface), backlog, v6only, reuse_port)


_type_of = type  # `type` is bind_call's argument, as socket.socket names it


@functools.lru_cache(maxsize=256, typed=True)
def _bind_call(
    address: Address,
    kinds: tuple[object, ...] | None,
    type: int,
    backlog: int | None,
    v6only: bool | None,
    interface: str | None,
    reuse_port: bool,
) -> SocketCall:
    return _options(bind_target(address, type, interface), backlog, v6only, reuse_port)


def target_call(target: SocketTarget) -> SocketCall:
    """A tcp or udp target as parsed from text (privopen), with the default options."""
    if target.kind not in ("tcp", "udp"):
        raise ValueError(f"{target}: only tcp and udp targets are bound here")
    return SocketCall(_canonical(target))


def icmp_call(family: int = socket.AF_INET, interface: str | None = None) -> SocketCall:
    """A checked icmp_socket call (an ICMP or ICMPv6 datagram socket)."""
    target = SocketTarget("icmp", _family(family), interface=_interface(interface))
    return SocketCall(_canonical(target))


def raw_call(family: int, proto: int, interface: str | None = None) -> SocketCall:
    """A checked raw_socket call: one IP protocol, 1-254 (255, IPPROTO_RAW, never)."""
    six = "6" if _family(family) == socket.AF_INET6 else ""
    if not isinstance(proto, int) or isinstance(proto, bool):
        raise ValueError(
            f"proto must be an IP protocol number such as socket.IPPROTO_ICMP: {proto!r}"
        )
    device = _interface(interface)
    # The text's own parser gives the reasons (raw:255 and raw:0 are never granted).
    return SocketCall(
        _canonical(parse_socket_target(f"raw{six}:{proto}{'@' * bool(device)}{device}"))
    )


def _options(
    target: SocketTarget, backlog: int | None, v6only: bool | None, reuse_port: bool
) -> SocketCall:
    if backlog is not None:
        if target.kind != "tcp":
            raise ValueError("only a TCP socket takes a backlog: a UDP socket does not listen")
        if not isinstance(backlog, int) or isinstance(backlog, bool):
            raise ValueError(f"backlog must be an int or None, not {backlog!r}")
        if not 1 <= backlog <= protocol.MAX_BACKLOG:
            raise ValueError(
                f"backlog {backlog} is outside 1-{protocol.MAX_BACKLOG}; None asks for the "
                "system's maximum (net.core.somaxconn)"
            )
    if v6only is not None:
        if not isinstance(v6only, bool):
            raise ValueError(f"v6only must be True, False or None, not {v6only!r}")
        if target.family != socket.AF_INET6:
            raise ValueError("v6only applies to an IPv6 address only")
    if not isinstance(reuse_port, bool):
        raise ValueError(f"reuse_port must be True or False, not {reuse_port!r}")
    return SocketCall(target, backlog or 0, v6only, reuse_port)


# --------------------------------------------------------------- replies


def socket_for(call: SocketCall, reply: Reply, fds: list[int]) -> socket.socket:
    """The socket of a checked SOCKET reply (calls.check_reply), or its exception.

    Owns `fds`: each is in the returned socket or closed when this raises.
    The socket's family, type and protocol are read from the fd and must be
    the ones asked for.

    Raises:
        PolicyDenied: the policy refused (reason and rule from the broker).
        OSError: the kernel's error, the subclass for its errno (EADDRINUSE ...).
        ProtocolError: the broker sent another kind of socket.
    """
    try:
        if not isinstance(reply, SocketReply):
            raise ProtocolError(f"{type(reply).__name__} to a socket request")
        if reply.result.errno:
            raise error_for_result(call.text, reply.result)
        if len(fds) != 1:
            raise ProtocolError(f"{len(fds)} fds for one socket")
        try:
            sock = socket.socket(fileno=fds[0])  # family, type and protocol read from the fd
        except OSError as exc:
            raise ProtocolError(f"the broker sent an fd that is no socket for {call.text}") from exc
    except BaseException:
        unix.close_fds(fds)
        raise
    made = (sock.family, sock.type, sock.proto)
    want = (call.target.family, *_MADE[call.target.kind](call.target))
    if made != want:
        sock.close()
        raise ProtocolError(f"the broker sent a socket {made} for {call.text}, not {want}")
    return sock
