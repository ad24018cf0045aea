"""tun and tap devices made by `tun.create`, and a packet through one both ways."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import time
from ipaddress import ip_interface

import pytest

from privbroker.broker.net import tun
from privbroker.broker.net.fields import AddressFields, LinkFields, LinkRef
from privbroker.broker.net.messages import Kind
from privbroker.broker.net.rtnl import Rtnl
from tests.net.conftest import TUNSETPERSIST, ip_json, link_names, needs_root

pytestmark = [pytest.mark.timeout(30)]


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "a b", "a:b", "x" * 16, "vpn%d%d", "vpn%s", "100%", "tün", "a\nb", 7],
)
def test_bad_names_are_refused_before_any_syscall(name: object) -> None:
    with pytest.raises(ValueError):
        tun.check_pattern(name)


@pytest.mark.parametrize("name", ["vpn%d", "x" * 15, "tap0", "%d", "a.b-c_d"])
def test_good_names(name: str) -> None:
    assert tun.check_pattern(name) == name


@needs_root
@pytest.mark.parametrize("tap", [False, True])
def test_create_with_a_pattern(ns: None, tap: bool) -> None:
    first = tun.create("vpn%d", tap=tap)
    second = tun.create("vpn%d", tap=tap)
    try:
        assert (first.name, second.name) == ("vpn0", "vpn1")
        (link,) = ip_json("-d", "link", "show", "dev", "vpn0")
        assert link["ifindex"] == first.ifindex
        info = link["linkinfo"]["info_data"]
        assert info["type"] == ("tap" if tap else "tun")
        assert (info["pi"], info["vnet_hdr"], info["persist"]) == (False, False, False)
        assert os.get_inheritable(first.fd) is False  # O_CLOEXEC
    finally:
        os.close(first.fd)
        os.close(second.fd)
    assert not {"vpn0", "vpn1"} & link_names()  # not persistent: the last close ends them


@needs_root
def test_an_existing_name_is_never_attached_to(ns: None) -> None:
    # IFF_TUN_EXCL: a device of that name (someone's persistent tun) is refused, not handed out.
    held = tun.create("busy0")
    try:
        with pytest.raises(OSError) as e:
            tun.create("busy0")
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(held.fd)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


@needs_root
def test_a_tun_fd_carries_a_packet_both_ways(ns: None) -> None:
    dev = tun.create("vpn%d")
    try:
        with Rtnl() as r:
            r.call(Kind.ADD_ADDRESS, AddressFields(dev.ifindex, ip_interface("10.8.0.1/24")))
            r.call(Kind.SET_LINK, LinkFields(dev.ifindex, up=True))
        ours, peer = bytes([10, 8, 0, 1]), bytes([10, 8, 0, 2])
        payload = b"privbroker tun test"
        os.write(dev.fd, echo_request(peer, ours, 0x4242, 7, payload))
        deadline = time.monotonic() + 5
        reply = None
        while reply is None and time.monotonic() < deadline:
            if not select.select([dev.fd], [], [], 0.5)[0]:
                continue
            packet = os.read(dev.fd, 65536)
            # Other packets (IPv6 router solicitations, MLD) may come first: skip them.
            if packet[0] >> 4 == 4 and packet[9] == 1 and packet[20] == 0:
                reply = packet
        assert reply is not None, "no echo reply from the kernel"
        assert (reply[12:16], reply[16:20]) == (ours, peer)
        assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
        assert struct.unpack("!HH", reply[24:28]) == (0x4242, 7)
        assert reply[28:] == payload
    finally:
        os.close(dev.fd)


@needs_root
def test_rtm_dellink_ends_a_device_its_holder_made_persistent(ns: None) -> None:
    dev = tun.create("lease%d")
    pid = os.fork()
    if pid == 0:  # pragma: no cover (reports through its exit status)
        code = 1
        try:  # the holder, unprivileged, makes the device outlive its fd: no capability needed
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fcntl.ioctl(dev.fd, TUNSETPERSIST, 1)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    try:
        (link,) = ip_json("-d", "link", "show", "dev", dev.name)
        assert link["linkinfo"]["info_data"]["persist"] is True
        with Rtnl() as r:
            r.call(Kind.DEL_LINK, LinkRef(ifindex=dev.ifindex))
        assert dev.name not in link_names()
        with pytest.raises(OSError) as e:
            os.read(dev.fd, 100)
        assert e.value.errno == errno.EBADFD
    finally:
        os.close(dev.fd)
