"""rtnetlink requests, built from validated fields. No I/O.

Every request the broker sends is one of the `Kind`s below, built by the
builder the `BUILDERS` table names from a frozen fields object whose
constructor has already checked types and ranges. There is no way to hand this
module bytes or attribute lists to forward: that is invariant 12 ("network
configuration is done by the broker from validated fields"). Whether the
policy allows the change is decided elsewhere, before a fields object reaches
`build`.

pyroute2's message classes (ifinfmsg, ifaddrmsg, rtmsg, nlmsgerr) do the
encoding and decoding; they are imported on first use only, because importing
pyroute2 costs tens of milliseconds and must not be paid by a broker whose
policy has no network rules. The constants below are the kernel's ABI values,
copied so that importing this module loads nothing.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from socket import AF_INET, AF_INET6, AF_UNSPEC
from types import SimpleNamespace
from typing import Any

from .fields import AddressFields, Dump, LinkFields, LinkRef, RouteFields

# Netlink header flags and message types (linux/netlink.h, linux/rtnetlink.h).
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x200, 0x400, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFF_UP = 0x1
IFA_F_NODAD = 0x2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTPROT_STATIC = 4  # marks the broker's routes: `ip route add` uses RTPROT_BOOT
RTN_UNICAST = 1
RT_TABLE_UNSPEC = 0


class Kind(enum.Enum):
    """One request the broker may send; `BUILDERS` maps each to its builder."""

    ADD_ADDRESS = "add_address"
    DEL_ADDRESS = "del_address"
    SET_LINK = "set_link"
    DEL_LINK = "del_link"
    GET_LINK = "get_link"
    ADD_ROUTE = "add_route"
    DEL_ROUTE = "del_route"
    DUMP_LINKS = "dump_links"
    DUMP_ADDRESSES = "dump_addresses"
    DUMP_ROUTES = "dump_routes"


@dataclass(frozen=True)
class Request:
    """A message ready to encode but for its sequence number."""

    kind: Kind
    type: int
    flags: int
    body: Any  # a pyroute2 message object, fields and attrs set

    @property
    def dump(self) -> bool:
        return self.flags & NLM_F_DUMP == NLM_F_DUMP


@functools.cache
def pyroute2_classes() -> SimpleNamespace:
    # Imported here, not at the top: see the module docstring.
    from pyroute2.netlink import nlmsgerr  # type: ignore[import-untyped]
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # type: ignore[import-untyped]
    from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

    return SimpleNamespace(ifinfmsg=ifinfmsg, ifaddrmsg=ifaddrmsg, rtmsg=rtmsg, nlmsgerr=nlmsgerr)


def _address(kind: Kind, f: AddressFields) -> Request:
    m = pyroute2_classes().ifaddrmsg()
    ip = f.interface.ip
    m["family"] = AF_INET if ip.version == 4 else AF_INET6
    m["prefixlen"] = f.interface.network.prefixlen
    m["flags"] = IFA_F_NODAD if f.nodad else 0
    m["scope"] = RT_SCOPE_UNIVERSE
    m["index"] = f.ifindex
    if ip.version == 4:
        # Both, as `ip addr add` sends them: IFA_LOCAL is the address, IFA_ADDRESS the peer
        # (the same on a non-point-to-point link); the kernel matches both on delete.
        m["attrs"] = [("IFA_LOCAL", str(ip)), ("IFA_ADDRESS", str(ip))]
    else:
        m["attrs"] = [("IFA_ADDRESS", str(ip))]
    if f.nodad:
        m["attrs"].append(("IFA_FLAGS", IFA_F_NODAD))
    if kind is Kind.ADD_ADDRESS:
        # EXCL: an address that already existed is not ours, so it must not enter an undo log.
        return Request(kind, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, m)
    return Request(kind, RTM_DELADDR, 0, m)


def _set_link(kind: Kind, f: LinkFields) -> Request:
    m = pyroute2_classes().ifinfmsg()
    m["family"] = AF_UNSPEC
    m["index"] = f.ifindex
    # ifi_change says which flag bits to touch; the others stay as they are.
    m["flags"] = IFF_UP if f.up else 0
    m["change"] = IFF_UP if f.up is not None else 0
    m["attrs"] = [] if f.mtu is None else [("IFLA_MTU", f.mtu)]
    # RTM_SETLINK, not RTM_NEWLINK: it can change a device and never create one.
    return Request(kind, RTM_SETLINK, 0, m)


def _link_ref(kind: Kind, f: LinkRef) -> Request:
    m = pyroute2_classes().ifinfmsg()
    m["family"] = AF_UNSPEC
    m["index"] = f.ifindex or 0
    m["attrs"] = [("IFLA_IFNAME", f.name)] if f.name is not None else []
    if kind is Kind.DEL_LINK:
        if f.ifindex is None:
            raise ValueError("a device is deleted by its index, never by a name alone")
        return Request(kind, RTM_DELLINK, 0, m)
    return Request(kind, RTM_GETLINK, 0, m)


def _route(kind: Kind, f: RouteFields) -> Request:
    m = pyroute2_classes().rtmsg()
    m["family"] = AF_INET if f.dst.version == 4 else AF_INET6
    m["dst_len"] = f.dst.prefixlen
    # Tables above 255 do not fit rtm_table: RT_TABLE_UNSPEC there, RTA_TABLE says which.
    m["table"] = f.table if f.table < 256 else RT_TABLE_UNSPEC
    m["proto"] = RTPROT_STATIC
    m["type"] = RTN_UNICAST
    attrs: list[tuple[str, object]] = [("RTA_TABLE", f.table)]
    if f.dst.prefixlen:
        attrs.append(("RTA_DST", str(f.dst.network_address)))
    if f.oif is not None:
        attrs.append(("RTA_OIF", f.oif))
    if f.gateway is not None:
        attrs.append(("RTA_GATEWAY", str(f.gateway)))
    if f.metric is not None:
        attrs.append(("RTA_PRIORITY", f.metric))
    m["attrs"] = attrs
    if kind is Kind.ADD_ROUTE:
        m["scope"] = RT_SCOPE_UNIVERSE if f.gateway is not None else RT_SCOPE_LINK
        return Request(kind, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, m)
    # As `ip route del` does: scope NOWHERE matches any scope; protocol STATIC and type
    # unicast keep a delete from touching a route the broker did not add.
    m["scope"] = RT_SCOPE_NOWHERE
    return Request(kind, RTM_DELROUTE, 0, m)


def _dump(kind: Kind, f: Dump) -> Request:
    cls, rtm = _DUMPS[kind]
    m = getattr(pyroute2_classes(), cls)()
    m["family"] = f.family
    return Request(kind, rtm, NLM_F_DUMP, m)


_DUMPS = {
    Kind.DUMP_LINKS: ("ifinfmsg", RTM_GETLINK),
    Kind.DUMP_ADDRESSES: ("ifaddrmsg", RTM_GETADDR),
    Kind.DUMP_ROUTES: ("rtmsg", RTM_GETROUTE),
}

# kind -> (the fields class it takes, its builder).
BUILDERS: dict[Kind, tuple[type, Callable[[Kind, Any], Request]]] = {
    Kind.ADD_ADDRESS: (AddressFields, _address),
    Kind.DEL_ADDRESS: (AddressFields, _address),
    Kind.SET_LINK: (LinkFields, _set_link),
    Kind.DEL_LINK: (LinkRef, _link_ref),
    Kind.GET_LINK: (LinkRef, _link_ref),
    Kind.ADD_ROUTE: (RouteFields, _route),
    Kind.DEL_ROUTE: (RouteFields, _route),
    Kind.DUMP_LINKS: (Dump, _dump),
    Kind.DUMP_ADDRESSES: (Dump, _dump),
    Kind.DUMP_ROUTES: (Dump, _dump),
}


def build(kind: Kind, fields: object) -> Request:
    """The request for `kind` from its fields object.

    Raises:
        TypeError: `fields` is not the class this kind takes (never coerced).
    """
    cls, builder = BUILDERS[kind]
    if type(fields) is not cls:
        raise TypeError(f"{kind.value} takes {cls.__name__}, not {type(fields).__name__}")
    return builder(kind, fields)


def encode(request: Request, seq: int) -> bytes:
    """The datagram for `request`: always NLM_F_REQUEST|NLM_F_ACK, so every request ends
    in an NLMSG_ERROR (or NLMSG_DONE for a dump) that the sender can wait for."""
    m = request.body
    m["header"]["type"] = request.type
    m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | request.flags
    m["header"]["sequence_number"] = seq
    m["header"]["pid"] = 0
    m.encode()
    return bytes(m.data)
