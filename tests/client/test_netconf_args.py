"""The network configuration calls before any I/O, and their replies: no broker.

tun_call, address_call, link_call and route_call check every argument (Rule 1
of netconf.py and tun.py): what they accept goes out as canonical text, what
they refuse is a ValueError naming it, raised by the public calls before they
so much as connect (the socket names here have no broker). check_result and
device_for turn replies into None, a device, or the exception, and device_for
closes the fds it was given whenever it raises.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
from collections.abc import Callable
from typing import Any

import pytest

import privbroker.aio
import privbroker.net
from privbroker import Client, PolicyDenied, ProtocolError
from privbroker.aio import AsyncClient
from privbroker.netconf import address_call, check_result, kernel_error, link_call, route_call
from privbroker.protocol import NetconfReply, NetconfRequest, Result, SocketReply, TunReply
from privbroker.tun import TunCall, TunDevice, device_for, tun_call

NO_BROKER = "privbroker-test-nobody-listens-here"

# ------------------------------------------------------------ what goes out


def test_address_calls_send_canonical_text() -> None:
    call = address_call("add_address", "vpn0", "fd00:8:0::2/64")
    assert call.make(7) == NetconfRequest(7, "add_address", "vpn0", "fd00:8::2/64")
    assert call.subject == "vpn0"
    assert address_call("del_address", "vpn0", "10.8.0.2").address == "10.8.0.2/32"
    obj = ipaddress.ip_interface("10.8.0.2/24")
    assert address_call("add_address", "vpn0", obj).address == "10.8.0.2/24"


def test_link_and_route_calls() -> None:
    assert link_call("vpn0", up=True).make(1) == NetconfRequest(1, "set_link", "vpn0", up=True)
    assert link_call("vpn0", mtu=1400).make(1) == NetconfRequest(1, "set_link", "vpn0", mtu=1400)
    assert link_call("vpn0", False, 68).make(1).up is False
    route = route_call("add_route", "10.9.0.0/16", "vpn0")
    assert route.make(3) == NetconfRequest(3, "add_route", "vpn0", "10.9.0.0/16")
    assert (route.subject, route.metric, route.table, route.via) == ("10.9.0.0/16", -1, 0, "")
    full = route_call("del_route", "fd00:9:0::/64", "vpn0", "fd00:8::1", 0, 100)
    assert full.make(4) == NetconfRequest(
        4, "del_route", "vpn0", "fd00:9::/64", via="fd00:8::1", metric=0, table=100
    )
    gateway_only = route_call("add_route", ipaddress.ip_network("10.9.1.0/24"), via="10.8.0.7")
    assert (gateway_only.ifname, gateway_only.via) == ("", "10.8.0.7")  # the policy's to judge
    assert route_call("add_route", "0.0.0.0/0", "vpn0", metric=2**32 - 1).metric == 2**32 - 1


def test_tun_calls() -> None:
    assert tun_call().make(1) == proto_tun(1, "tun%d")
    assert tun_call("vpn%d", mtu=1400).mtu == 1400
    assert tun_call("lab0", tap=True) == TunCall("lab0", True, 0)
    assert tun_call("x%dy", mtu=None).mtu == 0


def proto_tun(ident: int, name: str, tap: bool = False, mtu: int = 0) -> Any:
    from privbroker.protocol import TunRequest

    return TunRequest(ident, name, tap, mtu)


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("vpn%d", "vpn0", True),
        ("vpn%d", "vpn12", True),
        ("vpn%d", "vpn", False),
        ("vpn%d", "vpnx", False),
        ("vpn%d", "xvpn0", False),
        ("v%d.x", "v3.x", True),
        ("v%d.x", "v3ax", False),  # the '.' is literal
        ("lab0", "lab0", True),
        ("lab0", "lab1", False),
    ],
)
def test_a_reply_name_must_fit_the_pattern(pattern: str, name: str, ok: bool) -> None:
    assert TunCall(pattern).matches(name) is ok


# ------------------------------------------------------------ what is refused

BAD_NAMES: list[object] = [
    "",
    ".",
    "..",
    "x" * 16,
    "vpn 0",
    "vpn/0",
    "vpn:0",
    "vpn%0",
    "vpné",
    "vpn\n",
    None,
    b"vpn0",
    3,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_device_names(name: object) -> None:
    for call in (
        lambda: address_call("add_address", name, "10.8.0.2/24"),
        lambda: link_call(name, up=True),
        lambda: route_call("add_route", "10.9.0.0/16", name),
    ):
        with pytest.raises(ValueError, match=r"dev|ifname"):
            call()


@pytest.mark.parametrize(
    "name", ["", "x" * 16, "vpn%d%d", "vpn%s", "vpn%", "a b", "a/b", "a:b", "é", None, 1]
)
def test_bad_tun_names(name: object) -> None:
    with pytest.raises(ValueError, match="name"):
        tun_call(name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tap": 1}, "tap"),
        ({"tap": None}, "tap"),
        ({"mtu": 67}, "mtu"),
        ({"mtu": 65536}, "mtu"),
        ({"mtu": 0}, "mtu"),
        ({"mtu": True}, "mtu"),
        ({"mtu": 1400.0}, "mtu"),
    ],
)
def test_bad_tun_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tun_call("vpn%d", **kwargs)


@pytest.mark.parametrize(
    "address",
    ["vpn.example", "10.8.0.2/33", "10.8.0.256/24", "fe80::1%eth0/64", "", None, 167772162],
)
def test_bad_addresses(address: object) -> None:
    with pytest.raises(ValueError, match="address"):
        address_call("add_address", "vpn0", address)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "changes nothing"),
        ({"up": 1}, "up must be"),
        ({"up": "yes"}, "up must be"),
        ({"mtu": 67}, "mtu"),
        ({"mtu": 65536}, "mtu"),
        ({"mtu": "1400"}, "mtu"),
        ({"up": True, "mtu": -1}, "mtu"),
    ],
)
def test_bad_link_changes(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        link_call("vpn0", **kwargs)


@pytest.mark.parametrize(
    ("dst", "kwargs", "match"),
    [
        ("10.9.0.1/16", {"dev": "vpn0"}, "did you mean 10.9.0.0/16"),
        ("10.9.0.0/33", {"dev": "vpn0"}, "not a network"),
        ("example.net", {"dev": "vpn0"}, "no names are looked up"),
        (None, {"dev": "vpn0"}, "dst must be"),
        ("10.9.0.0/16", {}, "needs dev="),
        ("10.9.0.0/16", {"via": "fd00:8::1"}, "different IP versions"),
        ("fd00:9::/64", {"via": ipaddress.ip_address("10.8.0.1")}, "different IP versions"),
        ("fd00:9::/64", {"via": "fe80::1%vpn0"}, "zone"),
        ("10.9.0.0/16", {"via": "gw.example"}, "not an IP address"),
        ("10.9.0.0/16", {"via": 167772161}, "via must be"),
        ("10.9.0.0/16", {"dev": "vpn0", "metric": -1}, "metric"),
        ("10.9.0.0/16", {"dev": "vpn0", "metric": 2**32}, "metric"),
        ("10.9.0.0/16", {"dev": "vpn0", "metric": True}, "metric"),
        ("10.9.0.0/16", {"dev": "vpn0", "table": 0}, "table"),
        ("10.9.0.0/16", {"dev": "vpn0", "table": 255}, "local"),
        ("10.9.0.0/16", {"dev": "vpn0", "table": 2**32}, "table"),
        ("10.9.0.0/16", {"dev": "vpn0", "table": "main"}, "table"),
    ],
)
def test_bad_routes(dst: object, kwargs: dict[str, Any], match: str) -> None:
    for action in ("add_route", "del_route"):
        with pytest.raises(ValueError, match=match):
            route_call(action, dst, **kwargs)


# ------------------------------------------- the public calls: ValueError, no I/O

SYNC_BAD: list[Callable[[Any], object]] = [
    lambda net: net.open_tun("vpn%d%d"),
    lambda net: net.open_tun("vpn%d", mtu=10),
    lambda net: net.add_address("vpn0", "10.8.0.2/40"),
    lambda net: net.del_address("x" * 16, "10.8.0.2/24"),
    lambda net: net.set_link("vpn0"),
    lambda net: net.add_route("10.9.0.1/16", dev="vpn0"),
    lambda net: net.del_route("10.9.0.0/16", dev="vpn0", table=255),
]


@pytest.mark.parametrize("call", SYNC_BAD)
def test_module_level_calls_raise_before_connecting(call: Callable[[Any], object]) -> None:
    class Named:  # privbroker.net's functions, with a socket where no broker listens
        def __getattr__(self, attr: str) -> Callable[..., object]:
            fn = getattr(privbroker.net, attr)
            return lambda *a, **kw: fn(*a, socket=NO_BROKER, **kw)

    with pytest.raises(ValueError):
        call(Named())


@pytest.mark.parametrize("call", SYNC_BAD)
def test_client_net_calls_raise_before_connecting(call: Callable[[Any], object]) -> None:
    with Client(NO_BROKER) as client:
        with pytest.raises(ValueError):
            call(client.net)
        assert client._sock is None  # never connected


def test_a_bad_timeout_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="timeout"):
        privbroker.net.add_address("vpn0", "10.8.0.2/24", socket=NO_BROKER, timeout=0)


def test_async_calls_raise_before_connecting() -> None:
    async def main() -> list[str]:
        seen = []
        client = AsyncClient(NO_BROKER)
        for coro in (
            privbroker.aio.open_tun("a b", socket=NO_BROKER),
            privbroker.aio.add_address("vpn0", "nope", socket=NO_BROKER),
            privbroker.aio.set_link("vpn0", socket=NO_BROKER),
            privbroker.aio.add_route("10.9.0.0/16", socket=NO_BROKER),
            privbroker.aio.del_route("10.9.0.0/16", dev="vpn0", metric=-5, socket=NO_BROKER),
            privbroker.aio.del_address("vpn0", "10.8.0.2/24", socket=NO_BROKER, timeout=-1),
            client.net.open_tun(mtu=70000),
            client.net.add_address("vpn0", "10.8.0.2/99"),
            client.net.del_address("", "10.8.0.2/24"),
            client.net.set_link("vpn0", up=None, mtu=None),
            client.net.add_route("10.9.0.0/16", dev="vpn0", via="fd00::1"),
            client.net.del_route("fd00:9::1/64", dev="vpn0"),
        ):
            with pytest.raises(ValueError) as info:
                await coro
            seen.append(str(info.value))
        assert client._link is None  # never connected
        return seen

    assert len(asyncio.run(main())) == 12


def test_net_namespaces_hold_no_cycle() -> None:
    client = Client(NO_BROKER)
    assert client.net is not client.net  # made per use, stored nowhere
    assert "ClientNet" in repr(client.net)


# ------------------------------------------------------------ replies


def test_an_acknowledged_change_returns_none() -> None:
    call = address_call("add_address", "vpn0", "10.8.0.2/24")
    assert check_result(call, NetconfReply(1, Result(0, False, "allowed", "vpn"))) is None


def test_a_kernel_refusal_is_its_oserror_subclass() -> None:
    call = address_call("add_address", "vpn0", "10.8.0.2/24")
    with pytest.raises(FileExistsError) as info:
        check_result(call, NetconfReply(1, Result(errno.EEXIST, False, "File exists", "vpn")))
    assert (info.value.errno, info.value.filename, info.value.strerror) == (
        errno.EEXIST,
        "vpn0",
        "File exists",
    )


def test_a_denial_is_policy_denied_with_reason_and_rule() -> None:
    call = route_call("add_route", "10.10.0.0/16", "vpn0")
    reply = NetconfReply(1, Result(errno.EACCES, True, "10.10.0.0/16 is not within", "vpn"))
    with pytest.raises(PolicyDenied) as info:
        check_result(call, reply)
    assert isinstance(info.value, PermissionError)
    assert (info.value.filename, info.value.rule) == ("10.10.0.0/16", "vpn")
    assert "not within" in info.value.reason


@pytest.mark.parametrize(
    ("code", "reason", "message"),
    [
        (errno.EEXIST, "", "File exists"),
        (errno.EEXIST, "File exists", "File exists"),
        (
            errno.EINVAL,
            "Invalid argument: Invalid prefix for given prefix length.",
            "Invalid argument: Invalid prefix for given prefix length.",
        ),
        (errno.ENODEV, "nosuch0: No such device", "No such device"),
        (errno.EINVAL, "'x': invalid device name", "Invalid argument: 'x': invalid device name"),
        (
            errno.ENETUNREACH,
            "Nexthop has invalid gateway.",
            "Network is unreachable: Nexthop has invalid gateway.",
        ),
    ],
)  # fmt: skip
def test_the_message_is_what_ip_prints(code: int, reason: str, message: str) -> None:
    exc = kernel_error("vpn0", Result(code, False, reason))
    assert (exc.errno, exc.strerror, exc.filename) == (code, message, "vpn0")
    assert type(exc) is type(OSError(code, "x"))


def test_another_reply_kind_is_a_protocol_error() -> None:
    call = link_call("vpn0", up=True)
    with pytest.raises(ProtocolError):
        check_result(call, SocketReply(1, Result()))


# ------------------------------------------------------------ devices


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_a_fd_that_is_not_a_tun_device_is_closed() -> None:
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)  # a character device, but not tun
    for fd in (r, null):
        with pytest.raises(ProtocolError, match="not /dev/net/tun"):
            device_for(TunCall("vpn%d"), TunReply(1, Result(), "vpn0", 5), [fd])
        assert closed(fd)
    os.close(w)


@pytest.mark.parametrize(
    ("reply", "nfds", "error"),
    [
        (TunReply(1, Result(), "evil0", 5), 1, ProtocolError),  # not a name vpn%d gives
        (TunReply(1, Result(), "vpn0", 0), 1, ProtocolError),  # no ifindex
        (TunReply(1, Result(), "vpn0", 5), 2, ProtocolError),
        (SocketReply(1, Result()), 1, ProtocolError),
        (TunReply(1, Result(errno.EACCES, True, "no rule grants tun:evil0")), 0, PolicyDenied),
        (TunReply(1, Result(errno.EBUSY, False, "tun vpn0: Device or resource busy")), 0, OSError),
    ],
)  # fmt: skip
def test_device_for_refuses_and_closes(reply: Any, nfds: int, error: type[Exception]) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(nfds)]
    with pytest.raises(error) as info:
        device_for(TunCall("vpn%d"), reply, fds)
    assert all(closed(fd) for fd in fds)
    if error is not ProtocolError:
        assert info.value.filename == "vpn%d"  # type: ignore[attr-defined]
    if error is OSError:
        assert isinstance(info.value, BlockingIOError | OSError)
        assert info.value.errno == errno.EBUSY  # type: ignore[attr-defined]
        assert info.value.strerror == "Device or resource busy"  # type: ignore[attr-defined]


def test_a_device_closes_its_fd_once() -> None:
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    dev = TunDevice(fd, "vpn0", 5, False)
    assert (dev.fileno(), dev.closed) == (fd, False)
    assert repr(dev) == f"<TunDevice tun 'vpn0' ifindex=5 fd={fd}>"
    with dev:
        assert dev.write(b"x") == 1
    assert closed(fd) and dev.fileno() == -1 and dev.closed
    dev.close()  # again: nothing, and no other fd that took the number is closed
    assert "closed" in repr(dev)
    with pytest.raises(ValueError, match="closed device vpn0"):
        dev.read()
    with pytest.raises(ValueError, match="closed device"):
        dev.write(b"x")


def test_a_dropped_device_closes_its_fd() -> None:
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    dev = TunDevice(fd, "lab0", 5, True)
    assert "tap 'lab0'" in repr(dev)
    del dev
    assert closed(fd)
