"""The fields of each rtnetlink request, checked when they are made. Pure.

A fields object is the only input `messages.build` accepts, so every value
that reaches the kernel went through one of these constructors: types are
exact (an `IPv4Interface`, not a string), integers are inside the kernel's
field widths, families agree, and nothing the broker must never do can be
expressed (no RT_TABLE_LOCAL, no table 0, no delete by name). These are
structural checks only; the policy (which device, which CIDR, which MTU
range) is judged before a fields object is made (invariant 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from socket import AF_INET, AF_INET6, AF_UNSPEC

IFNAMSIZ = 16  # the kernel's name buffer, NUL included
MAX_IFINDEX = 2**31 - 1  # ifi_index is a signed int
MAX_U32 = 2**32 - 1
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255  # the kernel's own local/broadcast routes: never touched by the broker


def _ifindex(value: object, what: str = "ifindex") -> int:
    # bool is an int subclass; a True ifindex is a bug, not device 1.
    if type(value) is not int or not 0 < value <= MAX_IFINDEX:
        raise ValueError(f"{what} must be an int in 1..{MAX_IFINDEX}, not {value!r}")
    return value


def _u32(value: object, what: str, low: int = 0) -> None:
    if type(value) is not int or not low <= value <= MAX_U32:
        raise ValueError(f"{what} must be an int in {low}..{MAX_U32}, not {value!r}")


def check_ifname(name: object) -> str:
    """A device name as the kernel accepts it (dev_valid_name), without patterns.

    Raises:
        ValueError: not a str of 1..15 printable ASCII characters; contains '/', ':',
            '%' or whitespace; or is '.' or '..'.
    """
    if type(name) is not str or not name or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    if not name.isascii() or not name.isprintable() or len(name) >= IFNAMSIZ:
        raise ValueError(f"invalid interface name {name!r}")
    if any(c in name for c in "/:% \t"):
        raise ValueError(f"invalid interface name {name!r}")
    return name


@dataclass(frozen=True)
class AddressFields:
    """An address on a device: `ip addr add|del INTERFACE dev IFINDEX`.

    `nodad` (IPv6 only) skips duplicate address detection, so the address is
    usable at once: sensible on a tun device (no neighbours to collide with) and
    what keeps tests deterministic.
    """

    ifindex: int
    interface: IPv4Interface | IPv6Interface
    nodad: bool = False

    def __post_init__(self) -> None:
        _ifindex(self.ifindex)
        if type(self.interface) not in (IPv4Interface, IPv6Interface):
            raise ValueError(
                f"address must be an IPv4Interface or IPv6Interface: {self.interface!r}"
            )
        if type(self.nodad) is not bool or (self.nodad and self.interface.version == 4):
            raise ValueError("nodad is a bool, and only for IPv6")


@dataclass(frozen=True)
class LinkFields:
    """A change to a device: up or down, and/or an MTU (`ip link set`)."""

    ifindex: int
    up: bool | None = None
    mtu: int | None = None

    def __post_init__(self) -> None:
        _ifindex(self.ifindex)
        if self.up is None and self.mtu is None:
            raise ValueError("a link change needs up or mtu")
        if self.up is not None and type(self.up) is not bool:
            raise ValueError(f"up must be a bool, not {self.up!r}")
        if self.mtu is not None:
            # The device's own min/max are the kernel's to judge (it answers with extack).
            _u32(self.mtu, "mtu", low=1)


@dataclass(frozen=True)
class LinkRef:
    """One device, by index or by name (exactly one): get it, or delete it by index."""

    ifindex: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.ifindex is None) == (self.name is None):
            raise ValueError("a device is named by ifindex or by name, exactly one")
        if self.ifindex is not None:
            _ifindex(self.ifindex)
        else:
            check_ifname(self.name)


@dataclass(frozen=True)
class RouteFields:
    """A unicast route: `ip route add|del DST [dev OIF] [via GATEWAY] [metric M] [table T]`."""

    dst: IPv4Network | IPv6Network
    oif: int | None = None
    gateway: IPv4Address | IPv6Address | None = None
    metric: int | None = None
    table: int = RT_TABLE_MAIN

    def __post_init__(self) -> None:
        if type(self.dst) not in (IPv4Network, IPv6Network):
            raise ValueError(f"dst must be an IPv4Network or IPv6Network: {self.dst!r}")
        if self.oif is None and self.gateway is None:
            raise ValueError("a route needs a device (oif), a gateway, or both")
        if self.oif is not None:
            _ifindex(self.oif, "oif")
        if self.gateway is not None:
            if type(self.gateway) not in (IPv4Address, IPv6Address):
                raise ValueError(f"gateway must be an IPv4Address or IPv6Address: {self.gateway!r}")
            if self.gateway.version != self.dst.version:
                raise ValueError("gateway and destination are of different families")
        if self.metric is not None:
            _u32(self.metric, "metric")
        _u32(self.table, "table", low=1)
        if self.table == RT_TABLE_LOCAL:
            raise ValueError("the local table (255) is the kernel's")

    @property
    def family(self) -> int:
        return AF_INET if self.dst.version == 4 else AF_INET6


@dataclass(frozen=True)
class Dump:
    """A dump of every link, address or route of one family (AF_UNSPEC: all)."""

    family: int = AF_UNSPEC

    def __post_init__(self) -> None:
        if self.family not in (AF_UNSPEC, AF_INET, AF_INET6):
            raise ValueError(f"family must be AF_UNSPEC, AF_INET or AF_INET6: {self.family!r}")
