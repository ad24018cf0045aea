"""TUN and NETCONF through a real broker, in a network namespace the test makes:
devices leased to a client running as nobody, configured within the rules,
carrying packets, and gone with the client (also after SIGKILL and after
TUNSETPERSIST), and after a broker restart no orphan left.

Requests are sent with the protocol's own messages over the client's
connection (Client._request), so these tests judge the broker alone."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privbroker import protocol as proto
from privbroker.api import Client
from tests.support.netns import addresses, fresh_netns, ip, links, routes
from tests.support.privs import NOBODY, NOGROUP, run_as

TUNSETPERSIST = 0x400454CB

POLICY = """\
version = 1

[[allow]]
name = "vpn"
users = ["nobody"]
sockets = ["tun:vpn*", "tap:lab*"]
network = ["address", "link", "route"]
addresses = ["10.8.0.0/24", "fd00:8::/64"]
routes = ["10.9.0.0/16", "fd00:9::/64"]
mtu = [1280, 9000]
max_devices = 2

[[allow]]
name = "the shared veth"
users = ["nobody"]
network = ["address", "link"]
interfaces = ["shared0"]
addresses = ["10.7.0.0/24"]
mtu = [1280, 1500]
"""


@pytest.fixture
def netns_broker(start_broker: Any, tmp_path: Path) -> Iterator[Any]:
    with fresh_netns():
        yield start_broker(POLICY, "--lease-dir", str(tmp_path / "leases"))


def ask(name: str, *requests: Callable[[int], proto.Request]) -> list[tuple[Any, ...]]:
    """In a child: send each request on one connection; the replies as plain tuples.
    Device fds are kept until the end: a tun device goes with its last fd."""
    out, held = [], []
    with Client(name) as client:
        for make in requests:
            reply, fds = client._request(make, 10.0)
            held += fds
            result = reply.result  # type: ignore[union-attr]
            out.append((result.errno, result.reason, getattr(reply, "name", None), len(fds)))
    for fd in held:
        os.close(fd)
    return out


def tun(name: str = "vpn%d", mtu: int = 0, tap: bool = False) -> Callable[[int], proto.Request]:
    return lambda i: proto.TunRequest(i, name, tap, mtu)


def conf(action: str, **kw: Any) -> Callable[[int], proto.Request]:
    return lambda i: proto.NetconfRequest(i, action, **kw)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def echo_request(src: str, dst: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"privbroker"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def vpn_session(name: str) -> dict[str, Any]:
    """As nobody: a tun device configured through the broker carries an echo both ways."""
    with Client(name) as client:
        reply, fds = client._request(tun(mtu=1400), 10.0)
        assert isinstance(reply, proto.TunReply) and reply.result.errno == 0, reply
        dev, fd = reply.name, fds[0]
        answers = []
        for make in (
            conf("add_address", ifname=dev, address="10.8.0.1/24"),
            conf("set_link", ifname=dev, up=True),
            conf("add_route", ifname=dev, address="10.9.0.0/16"),
        ):
            answers.append(client._request(make, 10.0)[0].result.errno)  # type: ignore[union-attr]
        os.write(fd, echo_request("10.8.0.2", "10.8.0.1", 77))  # from the far end, to us
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            packet = os.read(fd, 2048)
            if packet[9] == 1 and packet[20] == 0:  # ICMP echo reply
                break
        state = {
            "dev": dev,
            "answers": answers,
            "reply_to": socket.inet_ntoa(packet[16:20]),
            "ident": struct.unpack("!H", packet[24:26])[0],
            "mtu": links()[dev]["mtu"],
            "addresses": addresses(dev),
            "routes": routes(),
            "owner": os.getuid(),
        }
        os.close(fd)
        return state


@pytest.mark.timeout(60)
def test_a_leased_tun_is_configured_and_carries_packets_both_ways(netns_broker: Any) -> None:
    state = run_as(NOBODY, NOGROUP, vpn_session, netns_broker.name)
    assert state["answers"] == [0, 0, 0]
    assert (state["reply_to"], state["ident"]) == ("10.8.0.2", 77)  # the kernel answered
    assert state["mtu"] == 1400 and "10.8.0.1/24" in state["addresses"]
    assert "10.9.0.0/16" in state["routes"]
    time.sleep(0.5)  # the client is gone: the broker deletes its device and routes
    assert state["dev"] not in links() and "10.9.0.0/16" not in routes()


@pytest.mark.timeout(60)
def test_denials_name_what_the_rule_lacks(netns_broker: Any) -> None:
    def session(name: str) -> list[tuple[Any, ...]]:
        return ask(
            name,
            tun("evil%d"),
            tun("vpn%d", mtu=100),
            tun("vpn%d"),
            conf("add_address", ifname="vpn0", address="192.0.2.1/24"),
            conf("add_address", ifname="vpn0", address="10.8.0.9/16"),
            conf("add_route", ifname="vpn0", address="0.0.0.0/0"),
            conf("add_route", address="10.9.1.0/24", via="10.8.0.7"),
            conf("set_link", ifname="vpn0", mtu=9500),
            conf("set_link", ifname="lo", up=False),
            conf("add_address", ifname="nosuch0", address="10.8.0.2/24"),
            conf("add_address", ifname="vpn0", address="not an address"),
        )

    got = run_as(NOBODY, NOGROUP, session, netns_broker.name)
    codes = [g[0] for g in got]
    assert codes[2] == 0 and got[2][2] == "vpn0"
    assert codes[:2] == [13, 13] and "evil0" in got[0][1] and "mtu 100" in got[1][1]
    assert codes[3:9] == [13] * 6
    assert "192.0.2.0/24 is not within" in got[3][1] or "192.0.2.1/24" in got[3][1]
    assert "10.8.0.9/16" in got[4][1]  # its whole network must fall within
    assert "0.0.0.0/0" in got[5][1]
    assert "must name its device" in got[6][1]
    assert "mtu 9500" in got[7][1] and "lo is not a device" in got[8][1]
    assert codes[9:] == [19, 22]  # ENODEV, EINVAL: nothing was asked of the kernel
    assert "lo" in links() and links()["lo"]["operstate"] != "DOWN"


@pytest.mark.timeout(60)
def test_max_devices_per_uid_and_a_tap(netns_broker: Any) -> None:
    got = run_as(NOBODY, NOGROUP, ask, netns_broker.name, tun(), tun("lab%d", tap=True), tun())
    assert [g[0] for g in got[:2]] == [0, 0] and got[1][2] == "lab0"
    assert got[2][0] == 13 and "allows 2" in got[2][1]


def holder(name: str, ready_w: int) -> None:
    """A client that leases a device, makes it persistent, and waits to be killed."""
    with Client(name) as client:
        reply, fds = client._request(tun(), 10.0)
        fcntl.ioctl(fds[0], TUNSETPERSIST, 1)
        dev = reply.name  # type: ignore[union-attr]
        for make in (
            conf("add_address", ifname=dev, address="10.8.0.1/24"),
            conf("set_link", ifname=dev, up=True),  # a route needs the device up
            conf("add_route", ifname=dev, address="10.9.0.0/16"),
        ):
            assert client._request(make, 10.0)[0].result.errno == 0  # type: ignore[union-attr]
        os.write(ready_w, reply.name.encode())  # type: ignore[union-attr]
        time.sleep(60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_client_leaves_nothing_even_persistent(netns_broker: Any, how: str) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            holder(netns_broker.name, w)
        finally:
            os._exit(0)
    os.close(w)
    dev = os.read(r, 32).decode()
    os.close(r)
    assert dev in links() and "10.9.0.0/16" in routes()
    os.kill(pid, getattr(signal, how))
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 5
    while dev in links() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dev not in links() and "10.9.0.0/16" not in routes()


@pytest.mark.timeout(60)
def test_changes_on_a_named_device_are_undone_in_reverse(netns_broker: Any) -> None:
    ip("link", "add", "shared0", "type", "veth", "peer", "name", "shared1")
    ip("link", "set", "shared0", "mtu", "1500")
    got = run_as(
        NOBODY,
        NOGROUP,
        ask,
        netns_broker.name,
        conf("add_address", ifname="shared0", address="10.7.0.5/24"),
        conf("set_link", ifname="shared0", mtu=1400),
        conf("set_link", ifname="shared0", mtu=1300),
        conf("set_link", ifname="shared1", mtu=1300),  # not named by the rule
    )
    assert [g[0] for g in got] == [0, 0, 0, 13]
    time.sleep(0.5)
    assert "10.7.0.5/24" not in addresses("shared0")  # undone at the client's end
    assert links()["shared0"]["mtu"] == 1500  # back to what it was before the first change


@pytest.mark.timeout(90)
def test_a_restarted_broker_deletes_what_the_last_one_leased(
    start_broker: Any, tmp_path: Path
) -> None:
    leases = tmp_path / "leases"
    with fresh_netns():
        first = start_broker(POLICY, "--lease-dir", str(leases))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(NOGROUP)
                os.setuid(NOBODY)
                holder(first.name, w)
            finally:
                os._exit(0)
        os.close(w)
        dev = os.read(r, 32).decode()
        os.close(r)
        first.proc.kill()  # the broker dies first: nothing undoes the lease
        first.proc.wait()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert dev in links()  # persistent, and no one left to delete it
        assert list(leases.glob("*.json"))
        start_broker(POLICY, "--lease-dir", str(leases))
        assert dev not in links()
        assert not list(leases.glob("*.json"))


@pytest.mark.timeout(60)
def test_a_device_deleted_by_root_is_forgotten(netns_broker: Any) -> None:
    def session(name: str, w: int) -> int:
        with Client(name) as client:
            reply, _held = client._request(tun(), 10.0)  # the fd stays open
            os.write(w, reply.name.encode())  # type: ignore[union-attr]
            time.sleep(1.0)  # root deletes it meanwhile
            status = client._request(tun(), 10.0)[0]  # still within max_devices: 2
            again = client._request(tun(), 10.0)[0]
            return status.result.errno + 100 * again.result.errno  # type: ignore[union-attr]

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            code = session(netns_broker.name, w)
        finally:
            os._exit(code)
    os.close(w)
    dev = os.read(r, 32).decode()
    ip("link", "del", dev)
    _, status = os.waitpid(pid, 0)
    # Had the deleted device stayed leased, the second new one would be over max_devices.
    assert os.waitstatus_to_exitcode(status) == 0
