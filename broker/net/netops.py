"""The pieces of the network services that are not the service: a NETCONF
request parsed into the policy's view and its message's fields, audit
fields, the kernel's refusal as `ip` prints it, and whose lease records are
a live broker's (net/netconf.py uses them)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
from collections.abc import Callable
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any

from privbroker import protocol as proto

from ..policy.netdecide import NetOp
from ..policy.rules import Policy
from .fields import RT_TABLE_MAIN, AddressFields, LinkFields, RouteFields
from .leases import Lease
from .messages import Kind

log = logging.getLogger("privbroker")

ACTIONS = {
    "add_address": ("address", Kind.ADD_ADDRESS),
    "del_address": ("address", Kind.DEL_ADDRESS),
    "set_link": ("link", Kind.SET_LINK),
    "add_route": ("route", Kind.ADD_ROUTE),
    "del_route": ("route", Kind.DEL_ROUTE),
}


def parse(req: proto.NetconfRequest, lease: Lease) -> tuple[NetOp, Kind, object]:
    """The policy's view of a request and the fields of its message (ValueError, OSError)."""
    word, kind = ACTIONS[req.action]
    if "%" in req.address or "%" in req.via:
        raise ValueError("addresses take no scope (%...): name the device with ifname")
    ifindex = socket.if_nametoindex(req.ifname) if req.ifname else None
    leased = ifindex is not None and lease.leases(ifindex)
    what = req.action.replace("_", " ")
    if word == "address":
        iface = ip_interface(req.address)
        if ifindex is None:
            raise ValueError("an address needs its device (ifname)")
        op = NetOp(
            word,
            f"{what} {iface.with_prefixlen} on {req.ifname}",
            req.ifname,
            leased,
            address=iface,
        )
        return op, kind, AddressFields(ifindex, iface, nodad=iface.version == 6 and leased)
    if word == "link":
        if ifindex is None:
            raise ValueError("a link change needs its device (ifname)")
        fields = LinkFields(ifindex, up=req.up, mtu=req.mtu or None)
        change = ", ".join(
            f"{k} {v}" for k, v in (("up", req.up), ("mtu", req.mtu or None)) if v is not None
        )
        op = NetOp(word, f"set {req.ifname} {change}", req.ifname, leased, mtu=req.mtu or None)
        return op, kind, fields
    dst = ip_network(req.address)
    via = ip_address(req.via) if req.via else None
    metric = None if req.metric < 0 else req.metric
    route = RouteFields(dst, ifindex, via, metric, req.table or RT_TABLE_MAIN)
    where = (f" dev {req.ifname}" if req.ifname else "") + (f" via {via}" if via else "")
    op = NetOp(word, f"{what} {dst}{where}", req.ifname, leased, dst=dst, via=via)
    return op, kind, route


def vars_of(req: proto.TunRequest | proto.NetconfRequest) -> dict[str, object]:
    """The request's fields that were given, for the audit record."""
    given = {}
    for f in dataclasses.fields(req):
        value = getattr(req, f.name)
        # By type and value: False is not the default 0, nor 0 the default -1.
        if f.name != "id" and (type(value) is not type(f.default) or value != f.default):
            given[f.name] = value
    return given


def kernel_text(code: int, ext: str | None) -> str:
    """What `ip` prints for a refusal: the errno's text and the kernel's extended ack."""
    text = os.strerror(code)
    return f"{text}: {ext}" if ext else text


def logged(what: str) -> Callable[[int, str | None, list[Any]], None]:
    def done(code: int, ext: str | None, _records: list[Any]) -> None:
        if code and code != errno.ENODEV:
            log.warning("%s: %s", what, kernel_text(code, ext))

    return done


def needs_network(policy: Policy) -> bool:
    """Whether the policy grants tun/tap devices or network operations."""
    return any(
        rule.network or any(s.kind in ("tun", "tap") for s in rule.grant.specs)
        for rule in policy.net_allow
    )
