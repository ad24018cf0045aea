"""The socket policy vocabulary: tables of entries, targets, requests and matches, and fuzzing.

Pure: nothing here opens a socket. The hypothesis properties are the
parsers' contract: any string gives a value or a ValueError, never another
exception, and a value prints back to text that parses to an equal value.
"""

from __future__ import annotations

import ipaddress
from socket import AF_INET, AF_INET6

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privbroker.broker.policy import sockets as sockspec
from privbroker.broker.policy.sockets import SocketGrant, SocketSpec
from privbroker.protocol.targets import SocketTarget, parse_socket_target

SPECS = [
    # text, parsed, printed back
    ("tcp:80", SocketSpec("tcp", 80, 80), "tcp:80"),
    ("udp:53", SocketSpec("udp", 53, 53), "udp:53"),
    ("tcp:8000-8100", SocketSpec("tcp", 8000, 8100), "tcp:8000-8100"),
    ("tcp:80-80", SocketSpec("tcp", 80, 80), "tcp:80"),
    ("tcp:080", SocketSpec("tcp", 80, 80), "tcp:80"),
    ("udp:1-65535", SocketSpec("udp", 1, 65535), "udp:1-65535"),
    ("icmp", SocketSpec("icmp"), "icmp"),
    ("icmp6", SocketSpec("icmp6"), "icmp6"),
    ("raw:icmp", SocketSpec("raw", protocol=1), "raw:icmp"),
    ("raw:1", SocketSpec("raw", protocol=1), "raw:icmp"),
    ("raw:17", SocketSpec("raw", protocol=17), "raw:udp"),
    ("raw:icmpv6", SocketSpec("raw", protocol=58), "raw:icmpv6"),
    ("raw:254", SocketSpec("raw", protocol=254), "raw:254"),
    ("tun:vpn*", SocketSpec("tun", glob="vpn*"), "tun:vpn*"),
    ("tap:tap[0-9]", SocketSpec("tap", glob="tap[0-9]"), "tap:tap[0-9]"),
    ("tun:a[]]b", SocketSpec("tun", glob="a[]]b"), "tun:a[]]b"),
    ("tun:a[!]]b", SocketSpec("tun", glob="a[!]]b"), "tun:a[!]]b"),
    ("tun:" + "x" * 15, SocketSpec("tun", glob="x" * 15), "tun:" + "x" * 15),
    ("tun:" + "x" * 14 + "*", SocketSpec("tun", glob="x" * 14 + "*"), "tun:" + "x" * 14 + "*"),
]

BAD_SPECS = [
    ("tcp", "needs a port or a range, as tcp:80"),
    ("tcp:", "needs a port"),
    ("tcp:http", "needs a port"),
    ("tcp:+80", "needs a port"),
    ("tcp: 80", "needs a port"),
    ("tcp:80-", "needs a port"),
    ("tcp:1-2-3", "needs a port"),
    ("tcp:\u0668\u0660", "needs a port"),  # Arabic-Indic digits: int() would take them
    ("tcp:0", "port 0 is outside 1-65535"),
    ("udp:65536", "port 65536 is outside 1-65535"),
    ("tcp:1-65536", "port 65536 is outside 1-65535"),
    ("tcp:100-90", "the range is backwards; write tcp:90-100"),
    ("sctp:80", "unknown socket kind in 'sctp:80'"),
    ("TCP:80", "unknown socket kind"),
    ("", "unknown socket kind"),
    ("icmp:1", "ICMP sockets have no port or protocol; write icmp"),
    ("icmp6:", "write icmp6"),
    ("raw", "needs an IP protocol, as raw:icmp"),
    ("raw:", "needs an IP protocol"),
    ("raw:0", "IPPROTO_IP"),
    ("raw:255", "IPPROTO_RAW, which sends with IP_HDRINCL"),
    ("raw:256", "IP protocol numbers are 0-255, not 256"),
    ("raw:ICMP", "unknown protocol 'ICMP'"),
    ("raw:-1", "unknown protocol"),
    ("tun", "needs a device name or glob, as tun:vpn*"),
    ("tap:", "needs a device name or glob"),
    ("tun:a/b", "is not a device name glob"),
    ("tun:a b", "is not a device name glob"),
    ("tun:a:b", "is not a device name glob"),
    ("tun:vpn%d", "is not a device name glob"),
    ("tun:a@b", "is not a device name glob"),
    ("tun:\u00e9", "is not a device name glob"),
    ("tun:[ab", "unbalanced '[' in '[ab'"),
    ("tun:[]", "unbalanced '['"),
    ("tun:[!]", "unbalanced '['"),
    ("tun:" + "x" * 16, "can never match: device names have at most 15 characters"),
    ("tun:" + "[ab]" * 16, "can never match"),
    (80, "expected a string"),
]


@pytest.mark.parametrize(("text", "spec", "printed"), SPECS)
def test_spec(text: str, spec: SocketSpec, printed: str) -> None:
    assert sockspec.parse_spec(text) == spec
    assert str(spec) == printed
    assert sockspec.parse_spec(printed) == spec


@pytest.mark.parametrize(("text", "message"), BAD_SPECS)
def test_bad_spec(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        sockspec.parse_spec(text)
    assert message in str(info.value)


ADDRESSES = [
    ("::", "::/128", "::"),
    ("0.0.0.0", "0.0.0.0/32", "0.0.0.0"),
    ("192.0.2.1", "192.0.2.1/32", "192.0.2.1"),
    ("192.0.2.0/24", "192.0.2.0/24", "192.0.2.0/24"),
    ("192.0.2.0/255.255.255.0", "192.0.2.0/24", "192.0.2.0/24"),
    ("fe80::/10", "fe80::/10", "fe80::/10"),
    ("::/0", "::/0", "::/0"),
    ("2001:DB8::/32", "2001:db8::/32", "2001:db8::/32"),
]

BAD_ADDRESSES = [
    ("192.0.2.1/24", "has host bits set: write 192.0.2.0/24 for the network, or 192.0.2.1"),
    ("fe80::1/10", "write fe80::/10 for the network, or fe80::1 for one address"),
    ("fe80::1%eth0", "addresses here take no zone; restrict devices with interfaces"),
    ("example.com", "is not an IP address or network"),
    ("192.0.2.0/33", "is not an IP address or network"),
    ("", "is not an IP address or network"),
    (" 192.0.2.1", "is not an IP address or network"),
    (3232235777, "take no zone"),
]


@pytest.mark.parametrize(("text", "network", "printed"), ADDRESSES)
def test_address(text: str, network: str, printed: str) -> None:
    net = sockspec.parse_address(text)
    assert net == ipaddress.ip_network(network)
    assert sockspec.format_address(net) == printed


@pytest.mark.parametrize(("text", "message"), BAD_ADDRESSES)
def test_bad_address(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        sockspec.parse_address(text)
    assert message in str(info.value)


@pytest.mark.parametrize("glob", ["eth0", "eth*", "en[ops]*", "?", "*", "x" * 15, "a[!b]"])
def test_interface(glob: str) -> None:
    assert sockspec.parse_interface(glob) == glob


@pytest.mark.parametrize("glob", ["", "eth 0", "eth/0", "eth:1", "x" * 16, "eth[0", "a@b", None])
def test_bad_interface(glob: str) -> None:
    with pytest.raises(ValueError):
        sockspec.parse_interface(glob)


WARNINGS = [
    ("tcp:80", []),
    ("tcp:1024-2048", []),
    ("icmp", []),
    ("tun:vpn*", []),
    ("tcp:111", ["tcp:111: port 111 is rpcbind's"]),
    ("udp:2049", ["udp:2049: port 2049 is NFS's"]),
    ("tcp:513", ["tcp:513: ports 512-1023: rsh-style services trust the source port"]),
    ("udp:1023-1030", ["ports 512-1023"]),
    ("tcp:1-65535", ["port 111", "port 2049", "ports 512-1023"]),
    ("raw:icmp", ["raw:icmp: the holder can forge icmp packets", "sees every icmp packet"]),
    ("raw:200", ["raw:200: the holder can forge 200 packets"]),
]


@pytest.mark.parametrize(("text", "fragments"), WARNINGS)
def test_warnings(text: str, fragments: list[str]) -> None:
    found = sockspec.warnings_for(sockspec.parse_spec(text))
    assert len(found) == (1 if text.startswith("raw:") else len(fragments))
    for fragment in fragments:
        assert any(fragment in w for w in found), (fragment, found)


TARGETS = [
    # text, request, printed back
    ("tcp:0.0.0.0:80", SocketTarget("tcp", AF_INET, 80, "0.0.0.0"), "tcp:0.0.0.0:80"),
    ("tcp:0.0.0.0:080", SocketTarget("tcp", AF_INET, 80, "0.0.0.0"), "tcp:0.0.0.0:80"),
    ("tcp:[::]:443", SocketTarget("tcp", AF_INET6, 443, "::"), "tcp:[::]:443"),
    ("tcp:[0::0]:443", SocketTarget("tcp", AF_INET6, 443, "::"), "tcp:[::]:443"),
    ("udp:127.0.0.1:53", SocketTarget("udp", AF_INET, 53, "127.0.0.1"), "udp:127.0.0.1:53"),
    (
        "udp:[fe80::1%eth0]:547",
        SocketTarget("udp", AF_INET6, 547, "fe80::1", zone="eth0"),
        "udp:[fe80::1%eth0]:547",
    ),
    (
        "udp:[fe80::1%03]:547",
        SocketTarget("udp", AF_INET6, 547, "fe80::1", scope_id=3),
        "udp:[fe80::1%3]:547",
    ),
    (
        "tcp:[fe80::1]:80@eth0",
        SocketTarget("tcp", AF_INET6, 80, "fe80::1", interface="eth0"),
        "tcp:[fe80::1]:80@eth0",
    ),
    (
        "tcp:[::ffff:192.0.2.1]:80",
        SocketTarget("tcp", AF_INET6, 80, str(ipaddress.IPv6Address("::ffff:192.0.2.1"))),
        f"tcp:[{ipaddress.IPv6Address('::ffff:192.0.2.1')}]:80",
    ),
    (
        "tcp:[::]:443@eth0",
        SocketTarget("tcp", AF_INET6, 443, "::", interface="eth0"),
        "tcp:[::]:443@eth0",
    ),
    ("icmp", SocketTarget("icmp", AF_INET), "icmp"),
    ("icmp6", SocketTarget("icmp", AF_INET6), "icmp6"),
    ("icmp@eth0", SocketTarget("icmp", AF_INET, interface="eth0"), "icmp@eth0"),
    ("raw:icmp", SocketTarget("raw", AF_INET, protocol=1), "raw:icmp"),
    ("raw:17", SocketTarget("raw", AF_INET, protocol=17), "raw:udp"),
    ("raw6:icmpv6", SocketTarget("raw", AF_INET6, protocol=58), "raw6:icmpv6"),
    ("raw6:200@d0", SocketTarget("raw", AF_INET6, protocol=200, interface="d0"), "raw6:200@d0"),
    ("tun:vpn0", SocketTarget("tun", name="vpn0"), "tun:vpn0"),
    ("tap:tap0", SocketTarget("tap", name="tap0"), "tap:tap0"),
]

BAD_TARGETS = [
    ("tcp", "needs ADDRESS:PORT, as tcp:0.0.0.0:80 or tcp:[::]:443"),
    ("tcp:", "needs ADDRESS:PORT"),
    ("tcp:80", "needs ADDRESS:PORT"),
    ("tcp:0.0.0.0:", "needs ADDRESS:PORT"),
    ("tcp:[::]:x", "needs ADDRESS:PORT"),
    ("tcp:0.0.0.0:0", "port 0 is outside 1-65535"),
    ("udp:0.0.0.0:65536", "port 65536 is outside 1-65535"),
    ("tcp:::443", "write IPv6 addresses in brackets, as tcp:[::1]:443"),
    ("tcp:[::1:80", "write IPv6 addresses in brackets"),
    ("tcp:[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
    ("tcp:localhost:80", "'localhost' is not an IPv4 address"),
    ("tcp:01.2.3.4:80", "is not an IPv4 address"),
    ("tcp:[fe80::1]:80", "fe80::1 is link-local: name its device, as [fe80::1%eth0]"),
    ("tcp:[::1%eth0]:80", "::1 is not link-local (fe80::/10): it takes no zone"),
    ("tcp:[fe80::1%]:80", "an empty or zero zone"),
    ("tcp:[fe80::1%0]:80", "an empty or zero zone"),
    ("tcp:[fe80::1%a/b]:80", "zone 'a/b' is not valid"),
    ("tcp:[fe80::1%4294967296]:80", "is not a u32"),
    ("tcp:0.0.0.0:80@", "interface '' is not valid"),
    ("tcp:0.0.0.0:80@a b", "interface 'a b' is not valid"),
    ("udp:[::]:53@x@y", "interface 'x@y' is not valid"),
    ("udp:[::]:53@" + "x" * 16, "at most 15 characters"),
    ("icmp:", "ICMP sockets have no port or address; write icmp"),
    ("icmp6:x", "write icmp6"),
    ("raw", "needs an IP protocol, as raw:icmp"),
    ("raw6:", "needs an IP protocol"),
    ("raw:255", "IPPROTO_RAW"),
    ("raw6:0", "IPPROTO_IP"),
    ("tun", "needs a name, as tun:vpn0"),
    ("tap:", "needs a name, as tap:vpn0"),
    ("tun:vpn*", "device name 'vpn*' is not valid"),
    ("tun:.", "at most 15 characters"),
    ("tun:vpn0@eth0", "a tun device is not bound to a device"),
    ("sctp:1", "unknown socket kind in 'sctp:1'"),
    ("", "unknown socket kind"),
    (443, "expected a string"),
]


@pytest.mark.parametrize(("text", "request_", "printed"), TARGETS)
def test_target(text: str, request_: SocketTarget, printed: str) -> None:
    assert parse_socket_target(text) == request_
    assert str(request_) == printed
    assert parse_socket_target(printed) == request_


@pytest.mark.parametrize(("text", "message"), BAD_TARGETS)
def test_bad_target(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_socket_target(text)
    assert message in str(info.value)


BAD_REQUESTS = [
    # SocketTarget(**fields), message: what a direct (wire) construction may not hold
    ({"kind": "tcp"}, "family 0 is not one a tcp socket takes"),
    ({"kind": "tun", "family": AF_INET, "name": "x"}, "family 2 is not one a tun"),
    ({"kind": "tun", "family": 99, "name": "x"}, "family 99"),
    ({"kind": "sctp", "family": AF_INET}, "unknown socket kind 'sctp'"),
    ({"kind": "tcp", "family": AF_INET, "port": "80", "address": "1.2.3.4"}, "port must be an int"),
    ({"kind": "tcp", "family": AF_INET, "port": True, "address": "1.2.3.4"}, "must be an int"),
    (
        {"kind": "tcp", "family": AF_INET, "port": 80, "address": b"1.2.3.4"},
        "address must be a str",
    ),
    ({"kind": "icmp", "family": AF_INET, "port": 1}, "a icmp request takes no port"),
    ({"kind": "icmp", "family": AF_INET, "address": "::"}, "takes no address"),
    ({"kind": "raw", "family": AF_INET, "protocol": 300}, "IP protocol numbers are 0-255"),
    ({"kind": "raw", "family": AF_INET, "protocol": 255}, "IPPROTO_RAW"),
    ({"kind": "raw", "family": AF_INET6, "protocol": 6, "port": 1}, "takes no port"),
    ({"kind": "tcp", "family": AF_INET, "port": 0, "address": "1.2.3.4"}, "port 0 is outside"),
    ({"kind": "tcp", "family": AF_INET, "port": 80, "address": "x"}, "'x' is not an IP address"),
    ({"kind": "tcp", "family": AF_INET, "port": 80, "address": "::"}, "not an IPv4 address"),
    ({"kind": "tcp", "family": AF_INET6, "port": 80, "address": "::0"}, "written as ::"),
    ({"kind": "tcp", "family": AF_INET, "port": 80, "address": "1.2.3.4", "scope_id": 1}, "link"),
    (
        {"kind": "tcp", "family": AF_INET6, "port": 80, "address": "fe80::1", "scope_id": 2**32},
        "is not a u32",
    ),
    (
        {
            "kind": "tcp",
            "family": AF_INET6,
            "port": 80,
            "address": "fe80::1",
            "scope_id": 1,
            "zone": "x",
        },
        "a zone is given too",
    ),
    (
        {"kind": "tcp", "family": AF_INET6, "port": 80, "address": "fe80::1", "zone": "a/b"},
        "zone 'a/b' is not valid",
    ),
    (
        {"kind": "tcp", "family": AF_INET, "port": 80, "address": "1.2.3.4", "interface": "a b"},
        "interface 'a b' is not valid",
    ),
    ({"kind": "tun", "name": ""}, "device name '' is not valid"),
    ({"kind": "tun", "name": "x", "interface": "y"}, "a tun request takes no interface"),
    ({"kind": "tap", "name": "x", "protocol": 6}, "takes no protocol"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_REQUESTS)
def test_bad_request(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        SocketTarget(**fields)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_request_with_a_numeric_scope_prints_it() -> None:
    req = SocketTarget("tcp", AF_INET6, 80, "fe80::1", scope_id=5)
    assert str(req) == "tcp:[fe80::1%5]:80"
    assert req.spec_kind == "tcp"
    assert SocketTarget("icmp", AF_INET6).spec_kind == "icmp6"


_PORT_RULE = (["tcp:80", "tcp:443"], [], [])
MATCHES = [
    # (sockets, addresses, interfaces), target, deny, (matched, reason)
    (_PORT_RULE, "tcp:0.0.0.0:80", False, (True, "")),
    (_PORT_RULE, "tcp:[::]:443", False, (True, "")),
    (_PORT_RULE, "tcp:0.0.0.0:8080", False, (False, "port 8080 is not in tcp:80, tcp:443")),
    ((["tcp:8000-8100"], [], []), "tcp:[::1]:8100", False, (True, "")),
    ((["tcp:8000-8100"], [], []), "tcp:[::1]:8101", False, (False, "port 8101 is not in")),
    ((["udp:53"], [], []), "tcp:0.0.0.0:53", False, (False, "tcp is not in udp:53")),
    ((["udp:53", "tcp:80"], [], []), "udp:0.0.0.0:80", False, (False, "port 80 is not in udp:53")),
    (
        (["tcp:80"], ["192.0.2.0/24"], []),
        "tcp:10.0.0.1:80",
        False,
        (False, "address 10.0.0.1 is not in 192.0.2.0/24"),
    ),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:192.0.2.9:80", False, (True, "")),
    # An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:[::ffff:192.0.2.5]:80", False, (True, "")),
    (
        (["tcp:80"], ["192.0.2.0/24"], []),
        "tcp:[::ffff:10.0.0.1]:80",
        False,
        (False, "address 10.0.0.1 is not in 192.0.2.0/24"),
    ),
    ((["tcp:80"], ["::ffff:0:0/96"], []), "tcp:[::ffff:10.0.0.1]:80", False, (False, "10.0.0.1")),
    # "::" and "0.0.0.0" are the wildcard addresses themselves, not "any".
    ((["tcp:80"], ["::"], []), "tcp:[::]:80", False, (True, "")),
    ((["tcp:80"], ["::"], []), "tcp:0.0.0.0:80", False, (False, "address 0.0.0.0 is not in ::")),
    ((["tcp:80"], ["0.0.0.0"], []), "tcp:[::]:80", False, (False, "address :: is not in 0.0.0.0")),
    ((["tcp:80"], ["::"], []), "tcp:[::1]:80", False, (False, "address ::1 is not in ::")),
    ((["udp:547"], ["fe80::/10"], []), "udp:[fe80::1%d0]:547", False, (True, "")),
    ((["tcp:80"], [], ["eth*"]), "tcp:0.0.0.0:80@eth1", False, (True, "")),
    (
        (["tcp:80"], [], ["eth*"]),
        "tcp:0.0.0.0:80@wlan0",
        False,
        (False, "interface wlan0 does not match eth*"),
    ),
    (
        (["tcp:80"], [], ["eth0", "br?"]),
        "tcp:0.0.0.0:80@eth1",
        False,
        (False, "interface eth1 does not match eth0, br?"),
    ),
    (
        (["tcp:80"], [], ["eth*"]),
        "tcp:0.0.0.0:80",
        False,
        (False, "no interface given: this rule binds to one matching eth*"),
    ),
    ((["udp:547"], [], ["eth*"]), "udp:[fe80::1%eth0]:547", False, (True, "")),
    (
        (["udp:547"], [], ["eth*"]),
        "udp:[fe80::1%wlan0]:547",
        False,
        (False, "interface wlan0 does not match eth*"),
    ),
    ((["udp:547"], [], ["eth*"]), "udp:[fe80::1%3]:547", False, (False, "no interface given")),
    ((["icmp"], [], []), "icmp", False, (True, "")),
    ((["icmp"], [], []), "icmp6", False, (False, "icmp6 is not in icmp")),
    ((["icmp6"], [], []), "icmp6", False, (True, "")),
    ((["icmp6"], [], []), "icmp", False, (False, "icmp is not in icmp6")),
    # addresses judge only what is bound; interfaces every socket.
    ((["icmp"], ["192.0.2.0/24"], []), "icmp", False, (True, "")),
    ((["icmp"], [], ["eth*"]), "icmp@eth0", False, (True, "")),
    ((["icmp"], [], ["eth*"]), "icmp", False, (False, "no interface given")),
    ((["raw:icmp"], [], []), "raw:icmp", False, (True, "")),
    ((["raw:icmp"], [], []), "raw6:1", False, (True, "")),
    ((["raw:icmp"], [], []), "raw:udp", False, (False, "protocol udp is not in raw:icmp")),
    ((["raw:icmp"], [], []), "raw:200", False, (False, "protocol 200 is not in raw:icmp")),
    ((["raw:icmp"], [], []), "icmp", False, (False, "icmp is not in raw:icmp")),
    ((["tun:vpn*"], [], []), "tun:vpn0", False, (True, "")),
    ((["tun:vpn*"], [], ["eth*"]), "tun:vpn0", False, (True, "")),
    ((["tun:vpn*"], [], []), "tun:eth0", False, (False, "device eth0 does not match tun:vpn*")),
    ((["tun:vpn*"], [], []), "tap:vpn0", False, (False, "tap is not in tun:vpn*")),
    ((["tap:Vpn*"], [], []), "tap:vpn0", False, (False, "device vpn0 does not match tap:Vpn*")),
    # A deny rule judges what could touch what it refuses.
    ((["udp:111"], [], []), "udp:0.0.0.0:111", True, (True, "")),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:0.0.0.0:80", True, (True, "")),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:[::]:80", True, (True, "")),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:[::ffff:0.0.0.0]:80", True, (True, "")),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:127.0.0.1:80", True, (False, "127.0.0.1")),
    ((["tcp:80"], ["192.0.2.0/24"], []), "tcp:[::1]:80", True, (False, "address ::1 is not")),
    ((["tcp:80"], ["2001:db8::/32"], []), "tcp:0.0.0.0:80", True, (False, "address 0.0.0.0")),
    ((["tcp:80"], ["2001:db8::/32"], []), "tcp:[::]:80", True, (True, "")),
    ((["tcp:80"], [], ["eth0"]), "tcp:0.0.0.0:80", True, (True, "")),
    ((["tcp:80"], [], ["eth0"]), "tcp:0.0.0.0:80@eth1", True, (False, "interface eth1")),
]


@pytest.mark.parametrize(("rule", "target", "deny", "expected"), MATCHES)
def test_matches(
    rule: tuple[list[str], list[str], list[str]],
    target: str,
    deny: bool,
    expected: tuple[bool, str],
) -> None:
    grant = SocketGrant.parse(*rule)
    matched, reason = grant.matches(parse_socket_target(target), deny=deny)
    assert matched is expected[0]
    assert (reason == "") if matched else (expected[1] in reason), reason


def test_grant_parse_refuses_a_bad_entry() -> None:
    with pytest.raises(ValueError, match="host bits"):
        SocketGrant.parse(["tcp:80"], ["192.0.2.1/24"])
    with pytest.raises(ValueError, match="unbalanced"):
        SocketGrant.parse(["tcp:80"], [], ["eth[0"])
    assert SocketGrant.parse(["tcp:80"]) == SocketGrant((SocketSpec("tcp", 80, 80),))


# Fuzzing: structured text near the grammar, and any text at all.
_name = st.from_regex(r"[a-z0-9*?\[\]!%@:/. -]{0,17}", fullmatch=True)
_spec_text = st.one_of(
    st.text(max_size=24),
    st.builds(
        lambda k, sep, arg: k + sep + arg,
        st.sampled_from(["tcp", "udp", "icmp", "icmp6", "raw", "tun", "tap", "x"]),
        st.sampled_from(["", ":"]),
        st.one_of(
            st.from_regex(r"[0-9]{1,6}(-[0-9]{1,6})?", fullmatch=True),
            st.sampled_from(list(sockspec.PROTOCOLS)),
            _name,
        ),
    ),
)


@given(_spec_text)
def test_any_spec_text_parses_or_raises_value_error(text: str) -> None:
    try:
        spec = sockspec.parse_spec(text)
    except ValueError:
        return
    assert sockspec.parse_spec(str(spec)) == spec
    assert all(isinstance(w, str) for w in sockspec.warnings_for(spec))


_address_text = st.one_of(
    st.text(max_size=45),
    st.ip_addresses().map(str),
    st.builds(lambda ip, n: f"{ip}/{n}", st.ip_addresses(), st.integers(0, 130)),
)


@given(_address_text)
def test_any_address_text_parses_or_raises_value_error(text: str) -> None:
    try:
        net = sockspec.parse_address(text)
    except ValueError:
        return
    assert sockspec.parse_address(sockspec.format_address(net)) == net


@given(st.one_of(st.text(max_size=20), _name), st.from_regex(r"[a-z0-9]{1,15}", fullmatch=True))
def test_any_interface_glob_is_checked_or_refused(glob: str, name: str) -> None:
    try:
        sockspec.parse_interface(glob)
    except ValueError:
        return
    SocketGrant.parse(["icmp"], [], [glob]).matches(SocketTarget("icmp", AF_INET, interface=name))


def _bind_text(kind: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    host = str(ip) if ip.version == 4 else f"[{ip}{zone}]"
    return f"{kind}:{host}"


_target_text = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda head, port, dev: f"{head}:{port}{dev}",
        st.builds(
            _bind_text,
            st.sampled_from(["tcp", "udp"]),
            st.one_of(st.ip_addresses(), st.just(ipaddress.IPv6Address("fe80::1"))),
            st.sampled_from(["", "%", "%0", "%7", "%eth0", "%a b"]),
        ),
        st.integers(-1, 70000),
        st.sampled_from(["", "@eth0", "@", "@a/b"]),
    ),
    st.builds(
        lambda kind, rest: kind + rest,
        st.sampled_from(["icmp", "icmp6", "raw", "raw6", "tun", "tap"]),
        st.one_of(st.just(""), st.builds(lambda x: ":" + x, _name)),
    ),
)


@given(_target_text)
def test_any_target_text_parses_or_raises_value_error(text: str) -> None:
    try:
        req = parse_socket_target(text)
    except ValueError:
        return
    assert parse_socket_target(str(req)) == req


_grant = st.builds(
    SocketGrant.parse,
    st.lists(
        st.sampled_from(["tcp:80", "tcp:1-1023", "udp:53", "icmp", "icmp6", "raw:icmp", "tun:v*"]),
        min_size=1,
    ),
    st.lists(st.sampled_from(["::", "0.0.0.0", "192.0.2.0/24", "fe80::/10", "::/0"])),
    st.lists(st.sampled_from(["eth*", "lo", "d?"])),
)


@given(_grant, _target_text, st.booleans())
def test_matching_answers_with_a_reason_exactly_when_it_refuses(
    grant: SocketGrant, text: str, deny: bool
) -> None:
    try:
        req = parse_socket_target(text)
    except ValueError:
        return
    matched, reason = grant.matches(req, deny=deny)
    assert matched == (reason == "")
    if not deny and matched:
        # What an allow rule grants, the same rule as a deny rule refuses.
        assert grant.matches(req, deny=True) == (True, "")


@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 65535))
def test_a_port_matches_exactly_its_ranges(low: int, high: int, port: int) -> None:
    low, high = min(low, high), max(low, high)
    grant = SocketGrant.parse([f"udp:{low}-{high}"])
    assert grant.matches(SocketTarget("udp", AF_INET, port, "0.0.0.0"))[0] == (low <= port <= high)
