"""Pure: fields validation, request building and encoding, reply parsing. No kernel."""

from __future__ import annotations

import struct
import subprocess
import sys
from ipaddress import ip_address, ip_interface, ip_network
from socket import AF_INET, AF_INET6
from typing import Any

import pytest

from privbroker.broker.net import messages as m
from privbroker.broker.net import replies
from privbroker.broker.net.fields import (
    AddressFields,
    Dump,
    LinkFields,
    LinkRef,
    RouteFields,
    check_ifname,
)

V4 = ip_interface("10.8.0.1/24")
NET = ip_network("10.9.0.0/16")


@pytest.mark.parametrize(
    "make",
    [
        lambda: AddressFields(0, V4),
        lambda: AddressFields(True, V4),
        lambda: AddressFields(2**31, V4),
        lambda: AddressFields(1, "10.8.0.1/24"),
        lambda: AddressFields(1, V4, nodad=True),  # DAD is IPv6's
        lambda: AddressFields(1, ip_interface("fd00::1/64"), nodad=1),
        lambda: LinkFields(1),
        lambda: LinkFields(1, up=1),
        lambda: LinkFields(1, mtu=0),
        lambda: LinkFields(1, mtu=2**32),
        lambda: LinkRef(),
        lambda: LinkRef(ifindex=1, name="lo"),
        lambda: LinkRef(name="a/b"),
        lambda: RouteFields(NET),
        lambda: RouteFields("10.9.0.0/16", oif=1),
        lambda: RouteFields(NET, oif=-1),
        lambda: RouteFields(NET, gateway="10.8.0.2"),
        lambda: RouteFields(NET, gateway=ip_address("fd00::1")),
        lambda: RouteFields(NET, oif=1, metric=-1),
        lambda: RouteFields(NET, oif=1, table=0),
        lambda: RouteFields(NET, oif=1, table=255),
        lambda: RouteFields(NET, oif=1, table=2**32),
        lambda: Dump(family=17),
    ],
)
def test_fields_refuse_what_must_not_reach_the_kernel(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("name", ["", ".", "..", "a b", "a:b", "a%d", "x" * 16, "é", None])
def test_interface_names(name: object) -> None:
    with pytest.raises(ValueError):
        check_ifname(name)


def test_build_takes_only_its_own_fields_class() -> None:
    with pytest.raises(TypeError):
        m.build(m.Kind.ADD_ADDRESS, LinkFields(1, up=True))
    with pytest.raises(ValueError):
        m.build(m.Kind.DEL_LINK, LinkRef(name="vpn0"))  # never delete by a name alone


def decode(cls: str, data: bytes) -> Any:
    msg = getattr(m.pyroute2_classes(), cls)(data)
    msg.decode()
    return msg


def test_address_request_encoding() -> None:
    data = m.encode(m.build(m.Kind.ADD_ADDRESS, AddressFields(5, V4)), seq=42)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert (length, mtype, seq, pid) == (len(data), m.RTM_NEWADDR, 42, 0)
    assert flags == m.NLM_F_REQUEST | m.NLM_F_ACK | m.NLM_F_CREATE | m.NLM_F_EXCL
    msg = decode("ifaddrmsg", data)
    assert (msg["family"], msg["prefixlen"], msg["index"]) == (AF_INET, 24, 5)
    assert msg.get_attr("IFA_LOCAL") == msg.get_attr("IFA_ADDRESS") == "10.8.0.1"
    six = m.build(m.Kind.DEL_ADDRESS, AddressFields(5, ip_interface("fd00::1/64"), nodad=True))
    msg = decode("ifaddrmsg", m.encode(six, seq=1))
    assert msg["family"] == AF_INET6 and msg["flags"] == m.IFA_F_NODAD
    assert msg.get_attr("IFA_LOCAL") is None and msg.get_attr("IFA_FLAGS") == m.IFA_F_NODAD


def test_link_request_touches_only_what_it_names() -> None:
    msg = decode("ifinfmsg", m.encode(m.build(m.Kind.SET_LINK, LinkFields(3, mtu=1400)), 1))
    assert (msg["index"], msg["change"], msg.get_attr("IFLA_MTU")) == (3, 0, 1400)
    msg = decode("ifinfmsg", m.encode(m.build(m.Kind.SET_LINK, LinkFields(3, up=False)), 1))
    assert (msg["flags"], msg["change"], msg.get_attr("IFLA_MTU")) == (0, m.IFF_UP, None)


def test_route_request_encoding() -> None:
    fields = RouteFields(NET, gateway=ip_address("10.8.0.2"), metric=9, table=1000)
    data = m.encode(m.build(m.Kind.ADD_ROUTE, fields), 1)
    msg = decode("rtmsg", data)
    assert (msg["table"], msg.get_attr("RTA_TABLE")) == (0, 1000)
    assert (msg["proto"], msg["scope"], msg["type"]) == (m.RTPROT_STATIC, 0, m.RTN_UNICAST)
    assert (msg.get_attr("RTA_DST"), msg["dst_len"]) == ("10.9.0.0", 16)
    assert (msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_PRIORITY")) == ("10.8.0.2", 9)
    default = RouteFields(ip_network("0.0.0.0/0"), oif=4)
    msg = decode("rtmsg", m.encode(m.build(m.Kind.DEL_ROUTE, default), 1))
    assert msg.get_attr("RTA_DST") is None and msg["scope"] == m.RT_SCOPE_NOWHERE
    assert (msg["table"], msg.get_attr("RTA_OIF")) == (254, 4)


def test_dump_requests() -> None:
    for kind, rtm in [
        (m.Kind.DUMP_LINKS, m.RTM_GETLINK),
        (m.Kind.DUMP_ADDRESSES, m.RTM_GETADDR),
        (m.Kind.DUMP_ROUTES, m.RTM_GETROUTE),
    ]:
        request = m.build(kind, Dump(AF_INET6))
        assert request.dump and request.type == rtm


def header(length: int, mtype: int, flags: int, seq: int = 7, pid: int = 99) -> bytes:
    return struct.pack("=IHHII", length, mtype, flags, seq, pid)


def ext_ack(text: bytes) -> bytes:
    payload = text + b"\0"
    attr = struct.pack("=HH", 4 + len(payload), 1) + payload  # NLMSGERR_ATTR_MSG
    return attr + b"\0" * (-len(attr) % 4)


def test_error_with_extended_ack_behind_a_capped_echo() -> None:
    tlv = ext_ack(b"ipv4: Device not found")
    body = struct.pack("=i", -19) + header(40, m.RTM_NEWADDR, 0x605) + tlv
    flags = m.NLM_F_CAPPED | m.NLM_F_ACK_TLVS
    (reply,) = replies.parse(header(16 + len(body), m.NLMSG_ERROR, flags) + body)
    assert (reply.errno, reply.text, reply.seq, reply.pid) == (19, "ipv4: Device not found", 7, 99)


def test_error_with_the_whole_request_echoed() -> None:
    echoed = header(24, m.RTM_NEWLINK, 5) + b"\1" * 8
    body = struct.pack("=i", -22) + echoed + ext_ack(b"bad")
    (reply,) = replies.parse(header(16 + len(body), m.NLMSG_ERROR, m.NLM_F_ACK_TLVS) + body)
    assert (reply.errno, reply.text) == (22, "bad")


def test_ack_done_and_unknown_types() -> None:
    ack = header(36, m.NLMSG_ERROR, m.NLM_F_CAPPED) + struct.pack("=i", 0) + header(16, 16, 5)
    done = header(20, m.NLMSG_DONE, m.NLM_F_MULTI) + struct.pack("=i", -4)
    bare_done = header(16, m.NLMSG_DONE, m.NLM_F_MULTI)
    noop = header(16, m.NLMSG_NOOP, 0)
    got = replies.parse(ack + done + bare_done + noop)
    assert [(r.type, r.errno, r.text) for r in got] == [
        (m.NLMSG_ERROR, 0, None),
        (m.NLMSG_DONE, 4, None),
        (m.NLMSG_DONE, 0, None),
        (m.NLMSG_NOOP, None, None),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\0" * 8,  # less than a header
        header(15, m.NLMSG_DONE, 0),  # a length below the header's
        header(64, m.NLMSG_DONE, 0),  # a length past the datagram
        header(16, m.NLMSG_ERROR, 0),  # an error without its errno
        header(20, m.NLMSG_ERROR, m.NLM_F_ACK_TLVS) + struct.pack("=i", -1),  # no echo
    ],
)
def test_framing_is_checked_before_payloads(data: bytes) -> None:
    with pytest.raises(ValueError):
        replies.parse(data)


def test_importing_the_modules_loads_no_pyroute2() -> None:
    code = (
        "import sys; import privbroker.broker.net.rtnl, privbroker.broker.net.monitor, "
        "privbroker.broker.net.tun, privbroker.broker.net.leases, privbroker.broker.net.leasefile; "
        "assert not [n for n in sys.modules if n.startswith('pyroute2')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
