"""What a network configuration call means, whichever client carries it: shared by
the sync and asyncio clients (netapi.py, aio_netapi.py) and privbroker.net, as
netcalls.py is for sockets.

add_address, del_address, set_link, add_route and del_route each become one
NETCONF request (docs/protocol.md), which the broker judges, builds into an
rtnetlink message from the checked fields alone, and answers once the kernel
has acknowledged it:

- Rule 1 (validation before I/O): the builders raise ValueError for anything
  the broker would refuse as malformed (EINVAL), using the ipaddress module:
  a device name the kernel would not accept, an address that does not parse,
  a destination with host bits set, a gateway of the other family, an MTU
  outside 68-65535, a metric or table outside the kernel's u32, a set_link
  that changes nothing. Values go out in their canonical text
  ("fd00:8::2/64", never "fd00:8:0::2/64"), which is what the policy judges
  and the audit records.
- Rule 2 (errno is the vocabulary): `check_result` turns the reply into None
  or the exception: PolicyDenied for a denial, else the OSError subclass for
  the kernel's errno with its text as `ip` prints it ("File exists",
  "Invalid argument: Invalid prefix for given prefix length."), and the
  device (or, for a route, the destination) as `filename`.

What is only the policy's to say (which devices, which CIDRs, which MTUs,
whether a route may name only a gateway) is left to the broker: its answer
is a PolicyDenied with the reason and the rule. Pure: no I/O here.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from .errors import PolicyDenied, ProtocolError
from .protocol import NetconfReply, NetconfRequest, Reply, Result
from .protocol.limits import MAX_IFNAME_CHARS, MAX_U32

__all__ = [
    "MAX_MTU",
    "MIN_MTU",
    "NetconfCall",
    "address_call",
    "check_ifname",
    "check_mtu",
    "check_result",
    "kernel_error",
    "link_call",
    "route_call",
]

MIN_MTU = 68  # IPv4's minimum datagram (RFC 791); the kernel's ETH_MIN_MTU
MAX_MTU = 65535  # an IP packet's total length field is 16 bits
RT_TABLE_UNSPEC = 0  # the wire's "main" (None here): never asked for by number
RT_TABLE_LOCAL = 255  # the kernel's own local and broadcast routes: the broker never touches them

Interface = str | ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = str | ipaddress.IPv4Network | ipaddress.IPv6Network
Gateway = str | ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class NetconfCall:
    """A checked network configuration call, ready to send.

    `subject` names what it is about in an error (the exception's filename):
    the device, or for a route its destination."""

    action: str
    subject: str
    ifname: str = ""
    address: str = ""
    up: bool | None = None
    mtu: int = 0
    via: str = ""
    metric: int = -1
    table: int = 0

    def make(self, ident: int) -> NetconfRequest:
        return NetconfRequest(
            ident,
            self.action,
            self.ifname,
            self.address,
            self.up,
            self.mtu,
            self.via,
            self.metric,
            self.table,
        )


# ------------------------------------------------------------ arguments


def check_ifname(name: object, what: str = "ifname") -> str:
    """A device name as the kernel accepts it (dev_valid_name); ValueError if not."""
    if type(name) is not str:
        raise ValueError(f"{what} must be a device name such as 'vpn0' (a str), not {name!r}")
    if not name or name in (".", "..") or len(name) > MAX_IFNAME_CHARS:
        raise ValueError(f"{what} {name!r}: a device name is 1 to {MAX_IFNAME_CHARS} characters")
    if not (name.isascii() and name.isprintable()) or any(c in name for c in "/:% \t"):
        raise ValueError(
            f"{what} {name!r}: a device name is printable ASCII without '/', ':', '%' or spaces"
        )
    return name


def check_mtu(mtu: object) -> int:
    if type(mtu) is not int or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"mtu must be an int from {MIN_MTU} to {MAX_MTU}, or None, not {mtu!r}")
    return mtu


def _u32(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= MAX_U32:
        raise ValueError(f"{what} must be an int from {low} to {MAX_U32}, or None, not {value!r}")
    return value


def _no_zone(text: str, what: str) -> None:
    if "%" in text:
        raise ValueError(f"{what} {text!r}: no '%zone' here; the device is given by name")


def _interface(address: object) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if isinstance(address, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        _no_zone(str(address), "address")
        return address
    if type(address) is not str:
        raise ValueError(f"address must be a str such as '10.8.0.2/24', not {address!r}")
    _no_zone(address, "address")
    try:
        return ipaddress.ip_interface(address)
    except ValueError:
        raise ValueError(
            f"{address!r} is not an address with a prefix length, such as '10.8.0.2/24' or "
            "'fd00:8::2/64' (numeric only: no names are looked up)"
        ) from None


def _network(dst: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(dst, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return dst
    if type(dst) is not str:
        raise ValueError(f"dst must be a str such as '10.9.0.0/16', not {dst!r}")
    _no_zone(dst, "dst")
    try:
        return ipaddress.ip_network(dst)
    except ValueError as exc:
        why = str(exc)
    try:  # host bits set: say which network was probably meant
        why += f"; did you mean {ipaddress.ip_network(dst, strict=False)}?"
    except ValueError:
        why += " (numeric only: no names are looked up)"
    raise ValueError(f"dst {dst!r} is not a network such as '10.9.0.0/16': {why}")


def _gateway(
    via: object, dst: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(via, ipaddress.IPv4Address | ipaddress.IPv6Address):
        _no_zone(str(via), "via")
        gateway = via
    elif type(via) is str:
        _no_zone(via, "via")
        try:
            gateway = ipaddress.ip_address(via)
        except ValueError:
            raise ValueError(f"via {via!r} is not an IP address such as '10.8.0.1'") from None
    else:
        raise ValueError(f"via must be a str such as '10.8.0.1', or None, not {via!r}")
    if gateway.version != dst.version:
        raise ValueError(f"via {gateway} and dst {dst} are of different IP versions")
    return gateway


# --------------------------------------------------------------- calls


def address_call(action: str, ifname: object, address: object) -> NetconfCall:
    """A checked add_address or del_address: `address` with its prefix on `ifname`."""
    assert action in ("add_address", "del_address")
    device = check_ifname(ifname)
    return NetconfCall(action, device, ifname=device, address=_interface(address).with_prefixlen)


def link_call(ifname: object, up: object = None, mtu: object = None) -> NetconfCall:
    """A checked set_link: up or down, and/or an MTU; at least one of them."""
    device = check_ifname(ifname)
    if up is not None and type(up) is not bool:
        raise ValueError(f"up must be True, False or None, not {up!r}")
    if up is None and mtu is None:
        raise ValueError("set_link changes nothing: give up=True/False, mtu=N, or both")
    return NetconfCall(
        "set_link", device, ifname=device, up=up, mtu=0 if mtu is None else check_mtu(mtu)
    )


def route_call(
    action: str, dst: object, dev: object = None, via: object = None,
    metric: object = None, table: object = None,
) -> NetconfCall:  # fmt: skip
    """A checked add_route or del_route: a unicast route to `dst` by a device and/or a gateway."""
    assert action in ("add_route", "del_route")
    network = _network(dst)
    device = "" if dev is None else check_ifname(dev, "dev")
    gateway = "" if via is None else str(_gateway(via, network))
    if not device and not gateway:
        raise ValueError(f"a route to {network} needs dev= (the device), via= (a gateway), or both")
    number = RT_TABLE_UNSPEC if table is None else _u32(table, "table", low=1)
    if number == RT_TABLE_LOCAL:
        raise ValueError("table 255 (local) holds the kernel's own routes: it is not offered")
    return NetconfCall(
        action,
        str(network),
        ifname=device,
        address=str(network),
        via=gateway,
        metric=-1 if metric is None else _u32(metric, "metric"),
        table=number,
    )


# --------------------------------------------------------------- replies


def kernel_error(subject: str, result: Result) -> OSError:
    """The exception for a failed result: PolicyDenied, else the errno's OSError subclass.

    The message is what `ip` prints: the errno's text, then the kernel's
    extended-ack message when it sent one ("File exists", "Invalid argument:
    Nexthop has invalid gateway.")."""
    if result.denied:
        return PolicyDenied(subject, result.reason, result.rule)
    text = os.strerror(result.errno)
    reason = result.reason
    if not reason or reason.lower() == text.lower() or reason.lower().endswith(f": {text.lower()}"):
        message = text  # nothing the errno and the filename do not already say
    elif reason.lower().startswith(text.lower()):
        message = reason  # already "strerror: extack", as the broker writes a kernel refusal
    else:
        message = f"{text}: {reason}"
    # OSError's constructor picks the subclass from the errno, as os.open does.
    return OSError(result.errno, message, subject)


def check_result(call: NetconfCall, reply: Reply) -> None:
    """None when the kernel acknowledged `call`; else its exception.

    Raises:
        PolicyDenied: the policy refused (reason and rule from the broker).
        OSError: the kernel's (or the broker's EINVAL/ENODEV) errno, as its subclass.
        ProtocolError: the reply is not a NETCONF reply.
    """
    if not isinstance(reply, NetconfReply):
        raise ProtocolError(f"{type(reply).__name__} to a network configuration request")
    if reply.result.errno:
        raise kernel_error(call.subject, reply.result)
