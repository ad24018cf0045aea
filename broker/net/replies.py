"""Parse the kernel's rtnetlink datagrams into `Reply` objects. No I/O.

Framing is checked before any payload is read: each message's length must
cover its header and fit in what is left of the datagram, or the whole datagram
is refused with ValueError (the kernel never sends that; a caller treats it as
a broken socket). Payloads are decoded by pyroute2's classes (`RECORD_CLASSES`
maps a message type to its class and to the small frozen record the broker
keeps), so no pyroute2 object leaves this module.

NLMSG_ERROR carries an errno, a copy of the request's header (only the header:
the sockets set NETLINK_CAP_ACK) and, under NLM_F_ACK_TLVS, the extended ack;
the attributes start after the echoed request, which pyroute2's nlmsgerr does
not skip, so `_error` cuts the echo out and decodes the rest with nlmsgerr.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from socket import AF_INET
from typing import Any

from . import messages as m

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_ERRNO = struct.Struct("=i")


def _align(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class Link:
    ifindex: int
    name: str
    up: bool
    mtu: int | None


@dataclass(frozen=True)
class Address:
    ifindex: int
    interface: IPv4Interface | IPv6Interface


@dataclass(frozen=True)
class Route:
    dst: IPv4Network | IPv6Network
    oif: int | None
    gateway: IPv4Address | IPv6Address | None
    metric: int | None
    table: int


Record = Link | Address | Route


@dataclass(frozen=True)
class Reply:
    """One message from the kernel.

    `errno` is set on NLMSG_ERROR and NLMSG_DONE (positive; 0 is an ACK), `text`
    is the extended-ack message where the kernel gave one, `record` the payload of
    a link, address or route message.
    """

    type: int
    flags: int
    seq: int
    pid: int
    errno: int | None = None
    text: str | None = None
    record: Record | None = None


def _link(msg: Any) -> Link:
    return Link(
        ifindex=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        up=bool(msg["flags"] & m.IFF_UP),
        mtu=msg.get_attr("IFLA_MTU"),
    )


def _address(msg: Any) -> Address:
    # IFA_LOCAL is the address itself on IPv4; IPv6 sends IFA_ADDRESS only.
    ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return Address(ifindex=msg["index"], interface=ip_interface(f"{ip}/{msg['prefixlen']}"))


def _route(msg: Any) -> Route:
    zero = "0.0.0.0" if msg["family"] == AF_INET else "::"
    dst = msg.get_attr("RTA_DST") or zero
    gateway = msg.get_attr("RTA_GATEWAY")
    return Route(
        dst=ip_network(f"{dst}/{msg['dst_len']}"),
        oif=msg.get_attr("RTA_OIF"),
        gateway=ip_address(gateway) if gateway else None,
        metric=msg.get_attr("RTA_PRIORITY"),
        table=msg.get_attr("RTA_TABLE") or msg["table"],
    )


# message type -> (pyroute2 class name, record maker)
RECORD_CLASSES: dict[int, tuple[str, Callable[[Any], Record]]] = {
    m.RTM_NEWLINK: ("ifinfmsg", _link),
    m.RTM_DELLINK: ("ifinfmsg", _link),
    m.RTM_NEWADDR: ("ifaddrmsg", _address),
    m.RTM_NEWROUTE: ("rtmsg", _route),
}


def _ext_ack(header: bytes, code: int, tlvs: bytes) -> str | None:
    if not tlvs:
        return None
    # A message of the shape nlmsgerr decodes: header, errno, then the attributes.
    _, mtype, flags, seq, pid = _HEADER.unpack(header)
    data = _HEADER.pack(20 + len(tlvs), mtype, flags, seq, pid) + _ERRNO.pack(code) + tlvs
    err = m.pyroute2_classes().nlmsgerr(data)
    err.decode()
    text = err.get_attr("NLMSGERR_ATTR_MSG")
    return str(text) if text else None


def _error(data: bytes, flags: int) -> tuple[int, str | None]:
    if len(data) < 20:
        raise ValueError("NLMSG_ERROR shorter than its errno")
    (code,) = _ERRNO.unpack_from(data, 16)
    tlvs = b""
    if flags & m.NLM_F_ACK_TLVS:
        if flags & m.NLM_F_CAPPED:
            echoed = _HEADER.size
        elif len(data) >= 20 + _HEADER.size:
            echoed = _align(_HEADER.unpack_from(data, 20)[0])
        else:
            raise ValueError("NLMSG_ERROR without the request it answers")
        tlvs = data[20 + echoed :]
    return -code, _ext_ack(data[:16], code, tlvs)


def _done(data: bytes, flags: int) -> tuple[int, str | None]:
    # A dump's end: an int (0, or a negative errno if the dump failed), then the ack TLVs.
    if len(data) < 20:
        return 0, None  # old kernels sent a bare header
    (code,) = _ERRNO.unpack_from(data, 16)
    tlvs = data[20:] if flags & m.NLM_F_ACK_TLVS else b""
    return -code, _ext_ack(data[:16], code, tlvs)


def _one(data: bytes) -> Reply:
    _, mtype, flags, seq, pid = _HEADER.unpack_from(data)
    if mtype == m.NLMSG_ERROR:
        errno, text = _error(data, flags)
        return Reply(mtype, flags, seq, pid, errno=errno, text=text)
    if mtype == m.NLMSG_DONE:
        errno, text = _done(data, flags)
        return Reply(mtype, flags, seq, pid, errno=errno, text=text)
    known = RECORD_CLASSES.get(mtype)
    if known is None:  # NOOP, OVERRUN, anything newer: carried, not interpreted
        return Reply(mtype, flags, seq, pid)
    cls, make = known
    msg = getattr(m.pyroute2_classes(), cls)(data)
    msg.decode()
    return Reply(mtype, flags, seq, pid, record=make(msg))


def parse(datagram: bytes) -> list[Reply]:
    """Every message in one datagram, in order.

    Raises:
        ValueError: a length that does not frame a message inside the datagram.
    """
    replies = []
    offset = 0
    while offset < len(datagram):
        if len(datagram) - offset < _HEADER.size:
            raise ValueError(f"{len(datagram) - offset} trailing bytes, less than a header")
        (length,) = struct.unpack_from("=I", datagram, offset)
        if not _HEADER.size <= length <= len(datagram) - offset:
            raise ValueError(f"message length {length} at offset {offset} does not fit")
        replies.append(_one(datagram[offset : offset + length]))
        offset += _align(length)
    return replies
