"""open_tun, add_address, set_link, add_route and the rest end to end, through the
public API: a real broker in a network namespace the test makes, clients as
nobody (forked, dropped; tests/support/privs.py), the kernel's own view read
with `ip -j`. The broker side alone is judged in test_tun_service.py; here the
client's: the calls, the TunDevice, the exceptions, the lease's lifetime.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import privbroker.aio
from privbroker import Client, PolicyDenied, ProtocolError, net
from privbroker.aio import AsyncClient
from privbroker.broker.net import tun
from privbroker.protocol import Result, TunReply
from privbroker.tun import TunCall, TunDevice, device_for
from tests.net.conftest import needs_root
from tests.net.test_tun_service import POLICY, addresses, checksum, links, routes
from tests.support.netns import fresh_netns
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = needs_root


@pytest.fixture
def broker(start_broker: Any, tmp_path: Path) -> Iterator[str]:
    with fresh_netns():
        yield start_broker(POLICY, "--lease-dir", str(tmp_path / "leases")).name


def as_nobody(fn: Any, *args: Any) -> Any:
    return run_as(NOBODY, NOGROUP, fn, *args)


def echo_request(src: str, dst: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"privbroker"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + icmp


def echo_reply(dev: TunDevice, ident: int) -> tuple[str, str]:
    """(source, destination) of the kernel's ICMP echo reply with this id, read from dev."""
    deadline = time.monotonic() + 5
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([dev], [], [], left)[0]:
            break
        packet = dev.read()
        echo_reply = packet[0] >> 4 == 4 and packet[9] == 1 and packet[20] == 0
        if echo_reply and struct.unpack("!H", packet[24:26])[0] == ident:
            return socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    raise AssertionError("no echo reply came out of the device")


def wait_gone(dev: str) -> bool:
    deadline = time.monotonic() + 5
    while dev in links() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dev not in links()


# --------------------------------------------------------------- the VPN flow


def vpn(name: str) -> dict[str, Any]:
    """The README's VPN-style client, on privbroker.net's shared client."""
    dev = net.open_tun("vpn%d", mtu=1400, socket=name)
    net.add_address(dev.name, "10.8.0.2/24", socket=name)
    net.set_link(dev.name, up=True, socket=name)
    net.add_route("10.9.0.0/16", dev=dev.name, socket=name)
    # Packets written into the device arrive from the tunnel: the peer (10.8.0.1)
    # and a host behind it (10.9.5.5, whose reply needs the route) ping us.
    peer = dev.write(echo_request("10.8.0.1", "10.8.0.2", 41))
    replies = [echo_reply(dev, 41)]
    dev.write(echo_request("10.9.5.5", "10.8.0.2", 42))
    replies.append(echo_reply(dev, 42))
    state = {
        "dev": dev.name,
        "ifindex": (dev.ifindex, socket.if_nametoindex(dev.name)),
        "repr": repr(dev),
        "written": peer,
        "replies": replies,
        "mtu": links()[dev.name]["mtu"],
        "addresses": addresses(dev.name),
        "routes": routes(),
        "operstate": links()[dev.name]["flags"],
    }
    dev.close()
    return state


@pytest.mark.timeout(60)
def test_a_vpn_style_client_as_nobody(broker: str) -> None:
    state = as_nobody(vpn, broker)
    assert state["dev"] == "vpn0" and state["ifindex"][0] == state["ifindex"][1]
    assert state["repr"].startswith("<TunDevice tun 'vpn0' ifindex=")
    assert state["written"] == 38  # the whole packet: 20 + 8 + 10
    assert state["replies"] == [("10.8.0.2", "10.8.0.1"), ("10.8.0.2", "10.9.5.5")]
    assert state["mtu"] == 1400 and "10.8.0.2/24" in state["addresses"]
    assert "10.9.0.0/16" in state["routes"] and "UP" in state["operstate"]
    # The process is gone: its lease ends, the broker deletes the device and its route.
    assert wait_gone("vpn0") and "10.9.0.0/16" not in routes()


def ipv6(name: str) -> dict[str, Any]:
    with Client(name) as client:
        dev = client.net.open_tun("vpn%d")
        client.net.add_address(dev.name, "fd00:8::2/64")
        client.net.set_link(dev.name, up=True)
        client.net.add_route("fd00:9::/64", dev=dev.name, metric=10)
        seen = {"added": addresses(dev.name), "routes": routes()}
        client.net.del_route("fd00:9::/64", dev=dev.name, metric=10)
        client.net.del_address(dev.name, "fd00:8::2/64")
        seen |= {"deleted": addresses(dev.name), "routes_after": routes()}
        dev.close()
    return seen


@pytest.mark.timeout(60)
def test_ipv6_address_and_route(broker: str) -> None:
    seen = as_nobody(ipv6, broker)
    assert "fd00:8::2/64" in seen["added"] and "fd00:9::/64" in seen["routes"]
    assert "fd00:8::2/64" not in seen["deleted"] and "fd00:9::/64" not in seen["routes_after"]


def tap(name: str) -> tuple[str, bool, str, str]:
    with Client(name) as client, client.net.open_tun("lab%d", tap=True) as dev:
        return dev.name, dev.tap, repr(dev), links()[dev.name]["link_type"]


@pytest.mark.timeout(60)
def test_a_tap_device(broker: str) -> None:
    name, is_tap, text, link_type = as_nobody(tap, broker)
    assert (name, is_tap, link_type) == ("lab0", True, "ether")
    assert text.startswith("<TunDevice tap 'lab0'")


# --------------------------------------------------------------- errors


def refusals(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Client(name) as client, client.net.open_tun("vpn%d") as dev:
        client.net.add_address(dev.name, "10.8.0.2/24")
        client.net.set_link(dev.name, up=True)
        for key, call in {
            "route": lambda: client.net.add_route("10.10.0.0/16", dev=dev.name),
            "gateway": lambda: client.net.add_route("10.9.1.0/24", via="10.8.0.7"),
            "device": lambda: client.net.open_tun("evil%d"),
            "mtu": lambda: client.net.set_link(dev.name, mtu=9500),
            "other": lambda: client.net.set_link("lo", up=False),
            "twice": lambda: client.net.add_address(dev.name, "10.8.0.2/24"),
            "missing": lambda: client.net.del_address(dev.name, "10.8.0.3/24"),
            "nodev": lambda: client.net.add_address("nosuch0", "10.8.0.2/24"),
        }.items():
            try:
                call()
            except OSError as exc:
                out[key] = (
                    type(exc).__name__,
                    exc.errno,
                    exc.filename,
                    exc.strerror,
                    getattr(exc, "reason", None),
                    getattr(exc, "rule", None),
                )
        # After all that, the connection is still the lease's: the device is still usable.
        client.net.add_route("10.9.0.0/16", dev=dev.name)
        out["routes"] = routes()
    return out


@pytest.mark.timeout(60)
def test_denials_and_kernel_refusals(broker: str) -> None:
    got = as_nobody(refusals, broker)
    kind, code, filename, _, reason, rule = got["route"]
    assert (kind, code, filename, rule) == ("PolicyDenied", errno.EACCES, "10.10.0.0/16", "vpn")
    assert "10.10.0.0/16" in reason
    assert got["gateway"][0] == "PolicyDenied" and "must name its device" in got["gateway"][4]
    assert got["device"][:3] == ("PolicyDenied", errno.EACCES, "evil%d") and got["device"][4]
    assert got["mtu"][0] == "PolicyDenied" and "mtu 9500" in got["mtu"][4]
    assert got["other"][0] == "PolicyDenied" and "lo" in got["other"][4]
    assert got["twice"][:3] == ("FileExistsError", errno.EEXIST, "vpn0")
    assert got["twice"][3] in ("File exists", "File exists: ipv4: Address already assigned")
    assert got["missing"][1] == errno.EADDRNOTAVAIL and got["missing"][2] == "vpn0"
    assert got["nodev"][:3] == ("OSError", errno.ENODEV, "nosuch0")
    assert "10.9.0.0/16" in got["routes"]


# --------------------------------------------------------------- leases and fds


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_and_lifetime(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = Client(name)
    with pytest.raises(PolicyDenied):  # connects: the connection's fd is counted before
        client.net.set_link("lo", up=True)
    before = fd_count()
    dev = client.net.open_tun("vpn%d")
    out["during"] = fd_count() - before
    fd = dev.fileno()
    dev.close()
    dev.close()  # once only
    out["after"] = fd_count() - before
    out["closed"] = (dev.fileno(), dev.closed, fd)
    try:
        dev.read()
    except ValueError as exc:
        out["read"] = str(exc)
    client.close()
    # A device outlives the reference to its client: it keeps the connection (the lease).
    kept = Client(name).net.open_tun("vpn%d")
    gc.collect()
    time.sleep(0.3)  # time for a broker to delete it, had the connection closed
    out["kept"] = (kept.name, kept.name in links())
    kept.close()
    return out


@pytest.mark.timeout(60)
def test_a_device_closes_its_fd_once_and_keeps_its_lease(broker: str) -> None:
    got = as_nobody(fds_and_lifetime, broker)
    assert got["during"] == 1 and got["after"] == 0
    assert got["closed"][:2] == (-1, True) and "closed device" in got["read"]
    assert got["kept"][1] is True
    assert wait_gone(got["kept"][0])


def closing(name: str) -> tuple[str, bool, str]:
    with Client(name) as client:
        dev = client.net.open_tun("vpn%d")
        there = dev.name in links()
    # The connection closed, the fd still open: the broker deletes the device anyway.
    deadline = time.monotonic() + 5
    while dev.name in links() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        dev.write(echo_request("10.8.0.1", "10.8.0.2", 1))
        error = "none"
    except OSError as exc:
        error = errno.errorcode[exc.errno or 0]
    dev.close()
    return dev.name, there, error


@pytest.mark.timeout(60)
def test_a_lease_ends_with_its_clients_connection(broker: str) -> None:
    name, there, error = as_nobody(closing, broker)
    assert (name, there, error) == ("vpn0", True, "EBADFD")
    assert "vpn0" not in links()


# --------------------------------------------------------------- asyncio


def async_session(name: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        dev = await privbroker.aio.open_tun("vpn%d", mtu=1280, socket=name)
        await privbroker.aio.add_address(dev.name, "10.8.0.2/24", socket=name)
        async with AsyncClient(name) as client:
            other = await client.net.open_tun("vpn%d")
            await client.net.add_address(other.name, "fd00:8::5/64")
            seen = {
                "names": (dev.name, other.name),
                "addresses": (addresses(dev.name), addresses(other.name)),
                "mtu": links()[dev.name]["mtu"],
            }
            other.close()
        dev.close()
        return seen

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_the_async_api(broker: str) -> None:
    seen = as_nobody(async_session, broker)
    assert seen["names"] == ("vpn0", "vpn1") and seen["mtu"] == 1280
    assert seen["addresses"] == (["10.8.0.2/24"], ["fd00:8::5/64"])


# --------------------------------------------------------------- the received fd


@pytest.mark.parametrize(
    ("call", "reply_name", "match"),
    [
        (TunCall("tst%d"), "tst9", "attached to 'tst0'"),  # the reply lies about the name
        (TunCall("tst%d", tap=True), "tst0", "flags"),  # a tun, not a tap
    ],
)
def test_a_tun_fd_attached_otherwise_than_the_reply_says(
    tundev: tun.Created, call: TunCall, reply_name: str, match: str
) -> None:
    fd = os.dup(tundev.fd)
    with pytest.raises(ProtocolError, match=match):
        device_for(call, TunReply(1, Result(), reply_name, tundev.ifindex), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_a_real_tun_fd_becomes_a_device(tundev: tun.Created) -> None:
    dev = device_for(
        TunCall("tst%d"), TunReply(1, Result(), tundev.name, tundev.ifindex), [os.dup(tundev.fd)]
    )
    with dev:
        assert (dev.name, dev.ifindex, dev.tap) == (tundev.name, tundev.ifindex, False)
