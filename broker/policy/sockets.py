"""The policy's vocabulary for sockets: a rule's entries, and how a rule judges a request.

Pure: no I/O, stdlib only. Each parser takes one string and returns a value
or raises ValueError with a message an administrator can act on (the loader
prefixes it with `FILE:LINE: rule 'NAME':`); str() of a value, or
format_address for a network, prints it back to text that parses to an
equal value. Requests and their text live in privbroker.protocol.targets (client side too:
privopen and explain name sockets the same way).

A rule's `sockets` entries (`parse_spec`):
    tcp:PORT  tcp:LO-HI  udp:PORT  udp:LO-HI   ports 1-65535, LO <= HI
    icmp  icmp6                               ICMP datagram ("ping") sockets, IPv4 / IPv6
    raw:PROTO                                 raw sockets of one IP protocol, IPv4 or IPv6;
                                              PROTO a name of PROTOCOLS or 1-254
    tun:GLOB  tap:GLOB                        devices whose name matches GLOB
`addresses` (`parse_address`): addresses or networks, strictly ("192.0.2.1/24"
is an error); "::" and "0.0.0.0" are the wildcard addresses themselves, not
"any" (that is "::/0", "0.0.0.0/0"). Binding "::" also receives IPv4 unless
the client asks for v6only (Linux's default), so a rule granting "::" grants
that. `interfaces` (`parse_interface`): fnmatch globs (`*`, `?`, `[...]`,
case-sensitive) over device names; the socket must be bound to a match.

`SocketGrant.matches` is the rule's test: kind, then port / protocol /
device name, then address (tcp, udp) and interface. An IPv4-mapped IPv6
address (::ffff:a.b.c.d) is judged as the IPv4 address it carries, so a rule
cannot be dodged by spelling an IPv4 bind the IPv6 way. A deny rule judges
conservatively (see `matches`). raw:0 and raw:255 cannot be written, so no
rule grants IPPROTO_RAW (docs/security.md, invariant 11).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, cast

from privbroker.protocol.targets import (
    IFNAMSIZ,
    NAME_CHARS,
    PROTOCOLS,
    SocketTarget,
    check_ifname,
    parse_port,
    parse_protocol,
    parse_socket_target,
    protocol_name,
)

__all__ = [
    "PROTOCOLS",
    "SocketGrant",
    "SocketSpec",
    "SocketTarget",
    "check_ifname",
    "format_address",
    "parse_address",
    "parse_interface",
    "parse_socket_target",
    "parse_spec",
    "warnings_for",
]

# Ports whose holder other systems trust: (low, high, why), for warnings_for.
_TRUSTED_PORTS = (
    (111, 111, "port 111 is rpcbind's: its holder can answer for every RPC service"),
    (2049, 2049, "port 2049 is NFS's: its holder can pose as the NFS server"),
    (512, 1023, "ports 512-1023: rsh-style services trust the source port as proof of root"),
)
_NOT_IN_GLOB = frozenset("/:%@")  # see socktarget.NAME_CHARS; a glob may hold * ? [ ]
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")

SpecKind = Literal["tcp", "udp", "icmp", "icmp6", "raw", "tun", "tap"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_interface(glob: str) -> str:
    """A device-name glob (`interfaces`, tun:GLOB), checked; returned as written."""
    if type(glob) is not str or not NAME_CHARS.fullmatch(glob) or _NOT_IN_GLOB.intersection(glob):
        raise ValueError(f"{glob!r} is not a device name glob: printable ASCII without / : % @")
    fewest, i = 0, 0  # the fewest characters a matching name has
    while i < len(glob):
        i += 1
        if glob[i - 1] == "[":
            # fnmatch's rules: a ']' first in the class (after any '!') is a member.
            j = i + 1 if glob[i : i + 1] == "!" else i
            j = glob.find("]", j + 1 if glob[j : j + 1] == "]" else j)
            if j < 0:
                raise ValueError(f"unbalanced '[' in {glob!r}")
            i = j + 1
        fewest += glob[i - 1] != "*"
    if fewest >= IFNAMSIZ:
        raise ValueError(f"{glob!r} can never match: device names have at most 15 characters")
    return glob


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """One `sockets` entry: ports for tcp/udp, a protocol for raw, a glob for tun/tap."""

    kind: SpecKind
    low: int = 0
    high: int = 0
    protocol: int = 0
    glob: str = ""

    def __str__(self) -> str:
        if self.kind in ("tcp", "udp"):
            return f"{self.kind}:{self.low}" + (f"-{self.high}" if self.high != self.low else "")
        if self.kind == "raw":
            return f"raw:{protocol_name(self.protocol)}"
        return f"{self.kind}:{self.glob}" if self.glob else self.kind


def _spec_ports(kind: SpecKind, arg: str | None, text: str) -> SocketSpec:
    match = _PORTS.fullmatch(arg or "")
    if match is None:
        raise ValueError(f"{text!r} needs a port or a range, as {kind}:80 or {kind}:8000-8100")
    low = parse_port(match[1], repr(text))
    high = parse_port(match[2], repr(text)) if match[2] else low
    if low > high:
        raise ValueError(f"{text!r}: the range is backwards; write {kind}:{high}-{low}")
    return SocketSpec(kind, low, high)


def _spec_bare(kind: SpecKind, arg: str | None, text: str) -> SocketSpec:
    if arg is not None:
        raise ValueError(f"{text!r}: ICMP sockets have no port or protocol; write {kind}")
    return SocketSpec(kind)


def _spec_raw(kind: SpecKind, arg: str | None, text: str) -> SocketSpec:
    if not arg:
        raise ValueError(f"{text!r} needs an IP protocol, as raw:icmp or raw:17")
    return SocketSpec(kind, protocol=parse_protocol(arg, repr(text)))


def _spec_device(kind: SpecKind, arg: str | None, text: str) -> SocketSpec:
    if not arg:
        raise ValueError(f"{text!r} needs a device name or glob, as {kind}:vpn*")
    return SocketSpec(kind, glob=parse_interface(arg))


_SPEC_PARSERS: dict[str, Callable[[SpecKind, str | None, str], SocketSpec]] = {
    "tcp": _spec_ports, "udp": _spec_ports, "icmp": _spec_bare, "icmp6": _spec_bare,
    "raw": _spec_raw, "tun": _spec_device, "tap": _spec_device,
}  # fmt: skip


def parse_spec(text: str) -> SocketSpec:
    """One `sockets` entry ("tcp:80", "raw:icmp", "tun:vpn*", ...); ValueError if invalid."""
    if type(text) is not str:
        raise ValueError(f'expected a string such as "tcp:80", not {text!r}')
    kind, colon, arg = text.partition(":")
    parser = _SPEC_PARSERS.get(kind)
    if parser is None:
        raise ValueError(
            f"unknown socket kind in {text!r}: expected tcp:PORT, udp:PORT, icmp, icmp6, "
            "raw:PROTO, tun:GLOB or tap:GLOB"
        )
    return parser(cast(SpecKind, kind), arg if colon else None, text)


def parse_address(text: str) -> Network:
    """One `addresses` entry: an address (a /32 or /128 network) or a strict network."""
    if type(text) is not str or "%" in text:
        raise ValueError(f"{text!r}: addresses here take no zone; restrict devices with interfaces")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address or network (as 192.0.2.1, 192.0.2.0/24, ::, fe80::/10)"
        ) from None
    raise ValueError(
        f"{text!r} has host bits set: write {loose} for the network, "
        f"or {text.partition('/')[0]} for one address"
    )


def format_address(net: Network) -> str:
    """An `addresses` entry as parse_address reads it back ("192.0.2.1", not "192.0.2.1/32")."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def warnings_for(spec: SocketSpec) -> list[str]:
    """What an administrator should know before granting `spec` (empty when nothing)."""
    if spec.kind == "raw":
        name = protocol_name(spec.protocol)
        return [
            f"{spec}: the holder can forge {name} packets (IP_HDRINCL, any source address) "
            f"and sees every {name} packet of this network namespace"
        ]
    if spec.kind in ("tcp", "udp"):
        return [
            f"{spec}: {why}" for lo, hi, why in _TRUSTED_PORTS if lo <= spec.high and spec.low <= hi
        ]
    return []


@dataclass(frozen=True, slots=True)
class SocketGrant:
    """What one rule's `sockets`, `addresses` and `interfaces` grant (or, in a deny rule, refuse).

    `networks` judge the bind address of tcp and udp (icmp and raw sockets
    are not bound), `interfaces` the device of every kind but tun/tap (the
    request's `interface`, else the zone of its link-local address: a
    numeric scope id must be turned into its name first); an empty tuple
    means any.
    """

    specs: tuple[SocketSpec, ...]
    networks: tuple[Network, ...] = ()
    interfaces: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls, sockets: Iterable[str], addresses: Iterable[str] = (), interfaces: Iterable[str] = ()
    ) -> SocketGrant:
        return cls(
            tuple(map(parse_spec, sockets)),
            tuple(map(parse_address, addresses)),
            tuple(map(parse_interface, interfaces)),
        )

    def matches(self, req: SocketTarget, *, deny: bool = False) -> tuple[bool, str]:
        """(True, "") when the rule covers `req`, else (False, why not, for the client).

        With `deny`, judge as a deny rule: what could touch a refused address
        or device counts, so a wildcard address is in every network of its
        family ("::" in IPv4 ones too, as dual-stack) and no device is every device.
        """
        kind = req.spec_kind
        specs = [s for s in self.specs if s.kind == kind]
        if not specs:
            return False, f"{kind} is not in {_listing(self.specs)}"
        if not any(_SPEC_TESTS[kind](s, req) for s in specs):
            return False, f"{_MISSED[kind](req)} {_listing(specs)}"
        if self.networks and kind in ("tcp", "udp"):
            ip = ipaddress.ip_address(req.address)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # the kernel binds ::ffff:a.b.c.d as a.b.c.d
            wild = deny and ip.is_unspecified
            if not any(ip in n or (wild and n.version <= ip.version) for n in self.networks):
                nets = ", ".join(map(format_address, self.networks))
                return False, f"address {ip} is not in {nets}"
        if self.interfaces and kind not in ("tun", "tap"):
            # A link-local address's zone binds the socket to that device too.
            device = req.interface or req.zone
            globs = ", ".join(self.interfaces)
            if not device and not deny:
                return False, f"no interface given: this rule binds to one matching {globs}"
            if device and not any(fnmatch.fnmatchcase(device, g) for g in self.interfaces):
                return False, f"interface {device} does not match {globs}"
        return True, ""


def _listing(specs: Iterable[SocketSpec]) -> str:
    return ", ".join(map(str, specs))


_SPEC_TESTS: dict[str, Callable[[SocketSpec, SocketTarget], bool]] = {
    "tcp": lambda s, r: s.low <= r.port <= s.high,
    "udp": lambda s, r: s.low <= r.port <= s.high,
    "icmp": lambda s, r: True,
    "icmp6": lambda s, r: True,
    "raw": lambda s, r: s.protocol == r.protocol,
    "tun": lambda s, r: fnmatch.fnmatchcase(r.name, s.glob),
    "tap": lambda s, r: fnmatch.fnmatchcase(r.name, s.glob),
}
# The start of a reason when no spec of the request's kind covers it (icmp always is).
_MISSED: dict[str, Callable[[SocketTarget], str]] = {
    "tcp": lambda r: f"port {r.port} is not in",
    "udp": lambda r: f"port {r.port} is not in",
    "raw": lambda r: f"protocol {protocol_name(r.protocol)} is not in",
    "tun": lambda r: f"device {r.name} does not match",
    "tap": lambda r: f"device {r.name} does not match",
}
