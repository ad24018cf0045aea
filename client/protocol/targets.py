"""One socket a client asks for (`SocketTarget`), and the text that names one.

Pure: no I/O, stdlib only. A `SocketTarget` checks itself when built and
has one canonical form: the fields its kind does not use stay zero or
empty, the address is written as ipaddress writes it. The policy
(broker/policy/sockets.py) judges that form and broker/net/sockets.py creates exactly it,
so what was judged is what is created (docs/security.md, invariant 11).

Target syntax (`parse_socket_target`, for `privbroker explain` and privopen;
str() of a request prints it back):
    tcp:0.0.0.0:80  udp:127.0.0.1:53  tcp:[::]:443  udp:[fe80::1%eth0]:547
    icmp  icmp6  raw:PROTO (IPv4)  raw6:PROTO (IPv6)  tun:NAME  tap:NAME
IPv6 addresses go in brackets, with a zone (a device name or index) that
only a link-local address takes. Any target but tun/tap may end in `@DEV`:
the socket is bound to that device (SO_BINDTODEVICE). PROTO is a name of
PROTOCOLS or a number 1-254: raw:0 and raw:255 are never granted (255 is
IPPROTO_RAW, which sends with IP_HDRINCL: the holder writes the IP header).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

IFNAMSIZ = 16  # the kernel's buffer for a device name, NUL included: names are 1-15 characters
MAX_SCOPE = 2**32 - 1  # sin6_scope_id is a u32
# IANA protocol numbers by the names /etc/protocols gives them (icmpv6 for its
# "ipv6-icmp"); any other protocol is written as its number.
PROTOCOLS = {
    "icmp": 1, "igmp": 2, "ipip": 4, "tcp": 6, "udp": 17, "ipv6": 41, "gre": 47, "esp": 50,
    "ah": 51, "icmpv6": 58, "ospf": 89, "pim": 103, "vrrp": 112, "l2tp": 115, "sctp": 132,
    "udplite": 136,
}  # fmt: skip
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
REFUSED_PROTOCOLS = {
    0: "raw:0 is IPPROTO_IP, which the kernel refuses for raw sockets: name the IP protocol",
    255: "raw:255 is IPPROTO_RAW, which sends with IP_HDRINCL (the holder writes the whole "
    "IP header, any source address): it cannot be granted",
}
# Characters of a device name here: the kernel's (no '/', ':', space) less
# '%' (a name the kernel picks) and '@' (the target syntax's separator), and
# for exact names the glob characters, so a name never reads as a pattern.
NAME_CHARS = re.compile(r"[!-~]+")
_NOT_IN_NAME = frozenset("/:%@*?[]")
_NUMBER = re.compile(r"[0-9]{1,10}")
_PORT = re.compile(r"[0-9]{1,5}")

Kind = Literal["tcp", "udp", "icmp", "raw", "tun", "tap"]
_INET = (socket.AF_INET, socket.AF_INET6)


def check_ifname(name: str, what: str = "device name") -> str:
    """`name` if it is a device name the broker accepts, else ValueError."""
    if not NAME_CHARS.fullmatch(name) or _NOT_IN_NAME.intersection(name):
        raise ValueError(f"{what} {name!r} is not valid: printable ASCII without / : % @ * ? [ ]")
    if len(name) >= IFNAMSIZ or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not valid: at most {IFNAMSIZ - 1} characters")
    return name


def parse_port(text: str, where: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{where}: port {port} is outside 1-65535")
    return port


def parse_protocol(text: str, where: str) -> int:
    """An IP protocol by name or number, never 0 or 255 (see REFUSED_PROTOCOLS)."""
    if _NUMBER.fullmatch(text):
        number = int(text)
        if number > 255:
            raise ValueError(f"{where}: IP protocol numbers are 0-255, not {number}")
    elif text in PROTOCOLS:
        number = PROTOCOLS[text]
    else:
        raise ValueError(
            f"{where}: unknown protocol {text!r}: a number or one of {list(PROTOCOLS)}"
        )
    if number in REFUSED_PROTOCOLS:
        raise ValueError(f"{where}: {REFUSED_PROTOCOLS[number]}")
    return number


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


@dataclass(frozen=True, slots=True)
class SocketTarget:
    """One socket a client asks for, in its one canonical form (checked when built).

    tcp/udp: `family`, `port` and `address` (normalised by ipaddress, without
    its zone); a link-local IPv6 address needs `scope_id`, `zone` (a device
    name, resolved by the caller) or `interface`. icmp: `family`. raw:
    `family` and `protocol`. tun/tap: `name`, family 0. `interface`, for all
    but tun/tap, is the device the socket is bound to. Fields a kind does not
    use stay zero or empty.
    """

    kind: Kind
    family: int = 0
    port: int = 0
    address: str = ""
    scope_id: int = 0
    zone: str = ""
    interface: str = ""
    protocol: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("family", "port", "scope_id", "protocol"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an int, not {value!r}")
        for key in ("kind", "address", "zone", "interface", "name"):
            if type(getattr(self, key)) is not str:
                raise ValueError(f"{key} must be a str, not {getattr(self, key)!r}")
        check = _REQUEST_CHECKS.get(self.kind)
        if check is None:
            raise ValueError(f"unknown socket kind {self.kind!r}")
        if self.family not in ((0,) if self.kind in ("tun", "tap") else _INET):
            raise ValueError(f"family {self.family} is not one a {self.kind} socket takes")
        used = check(self)
        unused = [key for key in _FIELDS if key not in used and getattr(self, key)]
        if unused:
            raise ValueError(f"a {self.kind} request takes no {', '.join(unused)}")
        if self.interface:
            check_ifname(self.interface, "interface")

    def __str__(self) -> str:
        six = self.family == socket.AF_INET6
        if self.kind in ("tcp", "udp"):
            zone = self.zone or (str(self.scope_id) if self.scope_id else "")
            host = f"[{self.address}{'%' * bool(zone)}{zone}]" if six else self.address
            text = f"{self.kind}:{host}:{self.port}"
        elif self.kind == "icmp":
            text = "icmp6" if six else "icmp"
        elif self.kind == "raw":
            text = f"raw{'6' * six}:{protocol_name(self.protocol)}"
        else:
            text = f"{self.kind}:{self.name}"
        return f"{text}@{self.interface}" if self.interface else text

    @property
    def spec_kind(self) -> str:
        """The `sockets` kind that grants this request (icmp6 for an IPv6 icmp)."""
        return "icmp6" if self.kind == "icmp" and self.family == socket.AF_INET6 else self.kind


_FIELDS = ("port", "address", "scope_id", "zone", "interface", "protocol", "name")


def _check_bind(req: SocketTarget) -> tuple[str, ...]:
    if not 1 <= req.port <= 65535:
        raise ValueError(f"port {req.port} is outside 1-65535")
    version = 4 if req.family == socket.AF_INET else 6
    try:
        ip = ipaddress.ip_address(req.address)
    except ValueError:
        raise ValueError(f"{req.address!r} is not an IP address") from None
    if ip.version != version or str(ip) != req.address:
        raise ValueError(f"{req.address!r} is not an IPv{version} address written as {ip}")
    link_local = version == 6 and ip.is_link_local
    if not 0 <= req.scope_id <= MAX_SCOPE or (req.scope_id and req.zone):
        raise ValueError(f"scope id {req.scope_id} is not a u32, or a zone is given too")
    if (req.scope_id or req.zone) and not link_local:
        raise ValueError(f"{req.address} is not link-local (fe80::/10): it takes no zone")
    if link_local and not (req.scope_id or req.zone or req.interface):
        raise ValueError(f"{req.address} is link-local: name its device, as [{ip}%eth0]")
    if req.zone:
        check_ifname(req.zone, "zone")
    return ("port", "address", "scope_id", "zone", "interface")


def _check_raw(req: SocketTarget) -> tuple[str, ...]:
    if not 0 <= req.protocol <= 255 or req.protocol in REFUSED_PROTOCOLS:
        refused = REFUSED_PROTOCOLS.get(req.protocol, "IP protocol numbers are 0-255")
        raise ValueError(f"protocol {req.protocol}: {refused}")
    return ("protocol", "interface")


def _check_device(req: SocketTarget) -> tuple[str, ...]:
    check_ifname(req.name)
    return ("name",)


_REQUEST_CHECKS: dict[str, Callable[[SocketTarget], tuple[str, ...]]] = {
    "tcp": _check_bind, "udp": _check_bind, "icmp": lambda req: ("interface",),
    "raw": _check_raw, "tun": _check_device, "tap": _check_device,
}  # fmt: skip


def _target_bind(kind: str, rest: str | None, device: str, text: str) -> SocketTarget:
    host, colon, port = (rest or "").rpartition(":")
    if not colon or not _PORT.fullmatch(port):
        raise ValueError(f"{text!r} needs ADDRESS:PORT, as {kind}:0.0.0.0:80 or {kind}:[::]:443")
    family, scope_id, zone = socket.AF_INET, 0, ""
    if host.startswith("[") and host.endswith("]"):
        family = socket.AF_INET6
        host, percent, zone = host[1:-1].partition("%")
        if _NUMBER.fullmatch(zone):
            scope_id, zone = int(zone), ""
        if percent and not (scope_id or zone):
            raise ValueError(f"{text!r}: an empty or zero zone; name the device, as %eth0")
    elif ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, as {kind}:[::1]:{port}")
    version = 4 if family == socket.AF_INET else 6
    try:
        address = str(ipaddress.IPv4Address(host) if version == 4 else ipaddress.IPv6Address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv{version} address") from None
    port_number = parse_port(port, repr(text))
    return SocketTarget(
        cast(Kind, kind), family, port_number, address, scope_id, zone, interface=device
    )


def _target_other(kind: str, rest: str | None, device: str, text: str) -> SocketTarget:
    family = socket.AF_INET6 if kind in ("icmp6", "raw6") else socket.AF_INET
    if kind in ("icmp", "icmp6"):
        if rest is not None:
            raise ValueError(f"{text!r}: ICMP sockets have no port or address; write {kind}")
        return SocketTarget("icmp", family, interface=device)
    if not rest:
        what = (
            "an IP protocol, as raw:icmp" if kind in ("raw", "raw6") else f"a name, as {kind}:vpn0"
        )
        raise ValueError(f"{text!r} needs {what}")
    if kind in ("raw", "raw6"):
        protocol = parse_protocol(rest, repr(text))
        return SocketTarget("raw", family, protocol=protocol, interface=device)
    return SocketTarget(cast(Kind, kind), name=check_ifname(rest))


_TARGET_PARSERS: dict[str, Callable[[str, str | None, str, str], SocketTarget]] = {
    "tcp": _target_bind, "udp": _target_bind, "icmp": _target_other, "icmp6": _target_other,
    "raw": _target_other, "raw6": _target_other, "tun": _target_other, "tap": _target_other,
}  # fmt: skip


@functools.lru_cache(maxsize=256)
def parse_socket_target(text: str) -> SocketTarget:
    """A request as written for explain and privopen ("tcp:[::]:443", "icmp6", "tun:vpn0").

    Pure, and a program binds a handful of targets: answers are remembered
    (a malformed text raises every time; nothing is cached for it).

    Raises:
        ValueError: the text is not a target; the message says what is expected.
    """
    if type(text) is not str:
        raise ValueError(f'expected a string such as "tcp:[::]:443", not {text!r}')
    body, at, device = text.partition("@")
    kind, colon, rest = body.partition(":")
    parser = _TARGET_PARSERS.get(kind)
    if parser is None:
        raise ValueError(
            f"unknown socket kind in {text!r}: expected tcp:ADDRESS:PORT, udp:ADDRESS:PORT, "
            "icmp, icmp6, raw:PROTO, raw6:PROTO, tun:NAME or tap:NAME"
        )
    if at:
        if kind in ("tun", "tap"):
            raise ValueError(f"{text!r}: a {kind} device is not bound to a device")
        check_ifname(device, "interface")
    return parser(kind, rest if colon else None, device, text)
