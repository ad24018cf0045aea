"""target_for and the socket calls' checks (client/netcalls.py): pure, tables and hypothesis.

Every address the socket module would bind (numeric) becomes a target text that
parse_socket_target reads back to the same target and prints back equal; anything
else is a ValueError before any I/O.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privbroker import netcalls
from privbroker.net import target_for
from privbroker.protocol import MAX_BACKLOG, SocketRequest
from privbroker.protocol.targets import SocketTarget, parse_socket_target

TCP, UDP = socket.SOCK_STREAM, socket.SOCK_DGRAM


@pytest.mark.parametrize(
    ("address", "type", "interface", "text"),
    [
        (("::", 443), TCP, None, "tcp:[::]:443"),
        (("0.0.0.0", 53), UDP, None, "udp:0.0.0.0:53"),
        (("127.0.0.1", 80), TCP, None, "tcp:127.0.0.1:80"),
        (("fe80::1%eth0", 547), UDP, None, "udp:[fe80::1%eth0]:547"),
        (("fe80::1%7", 547), UDP, None, "udp:[fe80::1%7]:547"),  # a numeric zone is a scope id
        (("fe80::1", 547, 0, 3), UDP, None, "udp:[fe80::1%3]:547"),
        (("fe80::1", 547, 12345, 3), UDP, None, "udp:[fe80::1%3]:547"),  # flowinfo: ignored
        (("fe80::1%eth0", 547, 0, 0), UDP, None, "udp:[fe80::1%eth0]:547"),
        (("fe80::1", 547), UDP, "eth0", "udp:[fe80::1]:547@eth0"),  # the device scopes it
        (("::", 443, 0), TCP, None, "tcp:[::]:443"),  # a 3-tuple, as bind() takes
        (("::1", 65535), TCP, None, "tcp:[::1]:65535"),
        (("0:0::0", 1), TCP, None, "tcp:[::]:1"),  # normalised as ipaddress writes it
        (("2001:DB8::1", 80), TCP, None, "tcp:[2001:db8::1]:80"),
        (("::ffff:192.0.2.1", 80), TCP, None, "tcp:[::ffff:c000:201]:80"),
        (("0.0.0.0", 80), TCP, "eth0", "tcp:0.0.0.0:80@eth0"),
        (("::", 443), socket.SocketKind.SOCK_STREAM, "lo", "tcp:[::]:443@lo"),
    ],
)
def test_target_for_table(
    address: tuple[object, ...], type: int, interface: str | None, text: str
) -> None:
    assert target_for(address, type, interface) == text
    assert str(parse_socket_target(text)) == text


@pytest.mark.parametrize(
    ("address", "type", "interface", "words"),
    [
        (("localhost", 80), TCP, None, "no DNS"),
        (("example.org", 443), TCP, None, "numeric addresses only"),
        (("", 80), TCP, None, "'0.0.0.0' or '::'"),
        (("[::1]", 80), TCP, None, "not an IP address"),
        (("::", 0), TCP, None, "port 0"),
        (("::", 65536), TCP, None, "outside 1-65535"),
        (("::", -1), TCP, None, "outside 1-65535"),
        (("::", "80"), TCP, None, "must be an int"),
        (("::", True), TCP, None, "must be an int"),
        (("::", 80.0), TCP, None, "must be an int"),
        ((b"::", 80), TCP, None, "must be a str"),
        ((None, 80), TCP, None, "must be a str"),
        (("::", 80), socket.SOCK_RAW, None, "SOCK_STREAM"),
        (("::", 80), socket.SOCK_SEQPACKET, None, "SOCK_STREAM"),
        (("::", 80), TCP | socket.SOCK_NONBLOCK, None, "SOCK_STREAM"),
        (("::", 80), True, None, "SOCK_STREAM"),
        (("::", 80), "tcp", None, "SOCK_STREAM"),
        (("::", 80), [1], None, "SOCK_STREAM"),
        ("0.0.0.0:80", TCP, None, "a tuple"),
        (["0.0.0.0", 80], TCP, None, "a tuple"),
        (("::",), TCP, None, "a tuple"),
        (("::", 80, 0, 0, 0), TCP, None, "a tuple"),
        (("1.2.3.4", 80, 0, 0), TCP, None, "(host, port) pair"),
        (("1.2.3.4%eth0", 80), TCP, None, "only an IPv6 address takes a zone"),
        (("fe80::1%", 80), TCP, None, "takes a zone"),
        (("fe80::1%eth0", 80, 0, 3), TCP, None, "zone twice"),
        (("fe80::1", 80), TCP, None, "link-local"),  # no zone, no device
        (("fe80::1%0", 80), TCP, None, "link-local"),  # zone 0 is none
        (("::1", 80, 0, 3), TCP, None, "not link-local"),
        (("::1%eth0", 80), TCP, None, "not link-local"),
        (("fe80::1", 80, -1, 3), TCP, None, "flowinfo"),
        (("fe80::1", 80, 2**20, 3), TCP, None, "flowinfo"),
        (("fe80::1", 80, 0, 2**32), TCP, None, "scope_id"),
        (("fe80::1", 80, 0, "3"), TCP, None, "scope_id"),
        (("fe80::1%a:b", 80), TCP, None, "not valid"),
        (("fe80::1%a]b", 80), TCP, None, "not valid"),
        (("fe80::1%e@x", 80), TCP, None, "not valid"),
        (("fe80::1%" + "e" * 16, 80), TCP, None, "at most 15"),
        (("::", 80), TCP, "", "device name"),
        (("::", 80), TCP, 3, "device name"),
        (("::", 80), TCP, "eth0:1", "not valid"),
        (("::", 80), TCP, "eth@0", "not valid"),
        (("::", 80), TCP, "eth*", "not valid"),
        (("::", 80), TCP, "a" * 16, "at most 15"),
    ],
)
def test_target_for_refuses(address: object, type: object, interface: object, words: str) -> None:
    with pytest.raises(ValueError, match=r"(?s).*" + re.escape(words)):
        target_for(address, type, interface)  # type: ignore[arg-type]


# ------------------------------------------------------------- hypothesis

ports = st.integers(1, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6_plain = st.ip_addresses(v=6).filter(lambda ip: not ip.is_link_local)
link_local = st.integers(0, 2**64 - 1).map(lambda low: ipaddress.IPv6Address((0xFE80 << 112) | low))
names = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/:%@*?[]"),
    min_size=1,
    max_size=15,
).filter(lambda n: n not in (".", "..") and not n.isdigit())  # digits: a scope id
devices = st.none() | names
types = st.sampled_from([TCP, UDP])


def _spellings(ip: ipaddress.IPv6Address) -> st.SearchStrategy[str]:
    """An address as a program may write it: canonical, exploded, upper case."""
    return st.sampled_from([str(ip), ip.exploded, ip.exploded.upper(), str(ip).upper()])


@st.composite
def addresses(draw: st.DrawFn) -> tuple[object, ...]:
    """Any tuple bind() takes for a numeric address the policy could grant."""
    choice = draw(st.sampled_from(["v4", "v6", "v6-3", "v6-4", "ll-zone", "ll-scope"]))
    port = draw(ports)
    if choice == "v4":
        return (draw(v4), port)
    if choice in ("v6", "v6-3", "v6-4"):
        host = draw(v6_plain.flatmap(_spellings))
        extra = {"v6": (), "v6-3": (draw(st.integers(0, 2**20 - 1)),), "v6-4": (0, 0)}[choice]
        return (host, port, *extra)
    host = draw(link_local.flatmap(_spellings))
    if choice == "ll-zone":
        zone = draw(names | st.integers(1, 2**32 - 1).map(str))
        return (f"{host}%{zone}", port)
    return (host, port, draw(st.integers(0, 2**20 - 1)), draw(st.integers(1, 2**32 - 1)))


@given(addresses(), types, devices)
def test_every_valid_address_gives_a_text_that_reads_back(
    address: tuple[object, ...], type: int, interface: str | None
) -> None:
    text = target_for(address, type, interface)
    target = parse_socket_target(text)
    assert str(target) == text
    assert target.kind == ("tcp" if type == TCP else "udp")
    assert target.port == address[1]
    host = str(address[0]).partition("%")[0]
    assert ipaddress.ip_address(target.address) == ipaddress.ip_address(host)
    assert target.family == (socket.AF_INET if "." in host and ":" not in host else socket.AF_INET6)
    assert target.interface == (interface or "")
    if len(address) == 4 and address[3]:
        assert target.scope_id == address[3]


@given(st.text(max_size=40), ports, types)
def test_any_host_text_is_a_target_or_a_value_error(host: str, port: int, type: int) -> None:
    try:
        text = target_for((host, port), type)
    except ValueError:
        return
    assert str(parse_socket_target(text)) == text


@given(
    st.tuples(st.one_of(st.text(), st.integers(), st.none()), st.one_of(st.integers(), st.text()))
)
def test_anything_else_is_a_value_error_or_a_target(address: tuple[object, object]) -> None:
    try:
        text = target_for(address)
    except ValueError:
        return
    assert str(parse_socket_target(text)) == text


@given(ports.filter(lambda p: p > 0), st.integers().filter(lambda p: not 1 <= p <= 65535))
def test_ports_outside_the_range_are_refused(good: int, bad: int) -> None:
    assert target_for(("::", good)) == f"tcp:[::]:{good}"
    with pytest.raises(ValueError):
        target_for(("::", bad))


# ---------------------------------------------------------------- options


def test_bind_call_defaults_ask_for_the_kernel_defaults() -> None:
    call = netcalls.bind_call(("::", 443))
    assert call.make(9) == SocketRequest(9, "tcp:[::]:443", 0, None, False)
    assert call.text == "tcp:[::]:443"


def test_bind_call_carries_its_options() -> None:
    call = netcalls.bind_call(("::", 443), TCP, 16, True, "lo", True)
    assert call.make(1) == SocketRequest(1, "tcp:[::]:443@lo", 16, True, True)
    assert netcalls.bind_call(("::", 53), UDP, v6only=False).make(2).v6only is False


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"address": ("0.0.0.0", 53), "type": UDP, "backlog": 5}, "UDP socket does not listen"),
        ({"address": ("::", 80), "backlog": 0}, "None asks for the system's maximum"),
        ({"address": ("::", 80), "backlog": MAX_BACKLOG + 1}, "outside"),
        ({"address": ("::", 80), "backlog": True}, "an int or None"),
        ({"address": ("::", 80), "backlog": 5.0}, "an int or None"),
        ({"address": ("0.0.0.0", 80), "v6only": True}, "IPv6 address only"),
        ({"address": ("::", 80), "v6only": 1}, "True, False or None"),
        ({"address": ("::", 80), "reuse_port": 1}, "True or False"),
        ({"address": ("::", 80), "reuse_port": None}, "True or False"),
    ],
)
def test_bind_call_refuses_options_that_do_not_apply(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        netcalls.bind_call(**kwargs)  # type: ignore[arg-type]


def test_backlog_bounds_are_accepted() -> None:
    assert netcalls.bind_call(("::", 80), backlog=1).backlog == 1
    assert netcalls.bind_call(("::", 80), backlog=MAX_BACKLOG).backlog == MAX_BACKLOG


@pytest.mark.parametrize(
    ("family", "interface", "text"),
    [
        (socket.AF_INET, None, "icmp"),
        (socket.AF_INET6, None, "icmp6"),
        (socket.AF_INET, "eth0", "icmp@eth0"),
        (socket.AF_INET6, "lo", "icmp6@lo"),
    ],
)
def test_icmp_call(family: int, interface: str | None, text: str) -> None:
    call = netcalls.icmp_call(family, interface)
    assert call.make(4) == SocketRequest(4, text, 0, None, False)


@pytest.mark.parametrize(
    ("family", "proto", "interface", "text"),
    [
        (socket.AF_INET, socket.IPPROTO_ICMP, None, "raw:icmp"),
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, None, "raw6:icmpv6"),
        (socket.AF_INET, 17, "eth0", "raw:udp@eth0"),
        (socket.AF_INET, 253, None, "raw:253"),
        (socket.AF_INET6, 1, None, "raw6:icmp"),
    ],
)
def test_raw_call(family: int, proto: int, interface: str | None, text: str) -> None:
    assert netcalls.raw_call(family, proto, interface).text == text


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: netcalls.icmp_call(socket.AF_UNIX), "AF_INET or socket.AF_INET6"),
        (lambda: netcalls.icmp_call(True), "AF_INET or socket.AF_INET6"),  # type: ignore[arg-type]
        (lambda: netcalls.icmp_call("inet"), "AF_INET or"),  # type: ignore[arg-type]
        (lambda: netcalls.icmp_call(socket.AF_INET, "bad:name"), "not valid"),
        (lambda: netcalls.raw_call(socket.AF_INET, 255), "IPPROTO_RAW"),
        (lambda: netcalls.raw_call(socket.AF_INET, 0), "IPPROTO_IP"),
        (lambda: netcalls.raw_call(socket.AF_INET, 256), "0-255"),
        (lambda: netcalls.raw_call(socket.AF_INET, -1), "protocol"),
        (lambda: netcalls.raw_call(socket.AF_INET, "icmp"), "IP protocol number"),  # type: ignore[arg-type]
        (lambda: netcalls.raw_call(socket.AF_INET, True), "IP protocol number"),
        (lambda: netcalls.raw_call(socket.AF_PACKET, 1), "AF_INET"),
    ],
)
def test_icmp_and_raw_calls_refuse(call: object, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    "text", ["tcp:[::]:443", "udp:0.0.0.0:53", "udp:[fe80::1%eth0]:547", "tcp:0.0.0.0:80@lo"]
)
def test_target_call_takes_tcp_and_udp(text: str) -> None:
    assert netcalls.target_call(parse_socket_target(text)).text == text


@pytest.mark.parametrize("text", ["icmp", "icmp6", "raw:icmp", "tun:vpn0"])
def test_target_call_refuses_other_kinds(text: str) -> None:
    with pytest.raises(ValueError, match="only tcp and udp"):
        netcalls.target_call(parse_socket_target(text))


def test_a_target_is_canonical_whatever_the_spelling() -> None:
    spelled = target_for(("0000:0000:0000:0000:0000:0000:0000:0001", 80))
    assert (
        spelled == target_for(("::1", 80)) == str(SocketTarget("tcp", socket.AF_INET6, 80, "::1"))
    )


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ((("::", 443),), (("::", 443.0),)),  # equal keys to a dict; 443.0 is no port
        ((("::", 443),), (("::", True),)),
        ((("::", 1),), (("::", True),)),
        ((("::", 443), socket.SOCK_STREAM), (("::", 443), True)),
        ((("::", 443), socket.SOCK_STREAM, 1), (("::", 443), socket.SOCK_STREAM, True)),
        ((("::", 443), socket.SOCK_STREAM, None, True), (("::", 443), socket.SOCK_STREAM, None, 1)),
        (
            (("::", 443), socket.SOCK_STREAM, None, None, None, True),
            (("::", 443), socket.SOCK_STREAM, None, None, None, 1),
        ),
    ],
)
def test_a_kept_call_is_never_given_for_arguments_of_another_type(
    good: tuple[object, ...], bad: tuple[object, ...]
) -> None:
    """bind_call keeps checked calls; a key equal in value but not in type is checked anew."""
    for _ in range(2):
        assert netcalls.bind_call(*good)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            netcalls.bind_call(*bad)  # type: ignore[arg-type]


def test_a_kept_call_is_the_checked_one_and_unhashable_arguments_are_refused() -> None:
    first = netcalls.bind_call(("fe80::1%eth0", 547), socket.SOCK_DGRAM)
    assert netcalls.bind_call(("fe80::1%eth0", 547), socket.SOCK_DGRAM) == first
    assert first.text == "udp:[fe80::1%eth0]:547"
    with pytest.raises(ValueError, match="port must be an int"):
        netcalls.bind_call(("::", [443]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="address must be a tuple"):
        netcalls.bind_call(["::", 443])  # type: ignore[arg-type]
