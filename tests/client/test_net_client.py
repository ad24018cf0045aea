"""Client, AsyncClient and the module-level socket calls against a stand-in broker.

The stand-in (tests/support/standin.py) answers SOCKET requests with sockets it
makes itself on loopback (the port asked for is not bound: no policy, no
privilege here), or with the failures a test chooses; the real broker's side
is tested in tests/net/. Every test checks, through `no_fd_leak`, that the
process holds the same fds afterwards: a received socket is either returned or
closed, whatever went wrong (docs/security.md, invariant 5).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import privbroker
import privbroker.aio
import privbroker.net
from privbroker import Client, PolicyDenied, ProtocolError, protocol
from privbroker.aio import AsyncClient
from privbroker.protocol import Result, SocketReply, SocketRequest
from privbroker.protocol.targets import parse_socket_target
from tests.support.netns import fresh_netns
from tests.support.standin import StandIn, default_handler

pytestmark = pytest.mark.usefixtures("no_fd_leak")

_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM, "icmp": socket.SOCK_DGRAM}


def make_like(target: str) -> socket.socket:
    """A socket of the target's family and kind, on loopback: what the broker would send."""
    t = parse_socket_target(target)
    if t.kind == "raw":
        return socket.socket(t.family, socket.SOCK_RAW, t.protocol)
    if t.kind == "icmp":
        v4 = t.family == socket.AF_INET
        return socket.socket(
            t.family, socket.SOCK_DGRAM, socket.IPPROTO_ICMP if v4 else socket.IPPROTO_ICMPV6
        )
    sock = socket.socket(t.family, _TYPES[t.kind])
    sock.bind(("127.0.0.1" if t.family == socket.AF_INET else "::1", 0))
    if t.kind == "tcp":
        sock.listen()
    return sock


def serve_sockets(req: protocol.Request) -> Any:
    if isinstance(req, SocketRequest):
        return SocketReply(req.id, Result()), [make_like(req.target).detach()]
    return default_handler(req)


def answering(result: Result, fds: Callable[[], list[int]] = list) -> Callable[..., Any]:
    def handler(req: protocol.Request) -> Any:
        assert isinstance(req, SocketRequest)
        return SocketReply(req.id, result), fds()

    return handler


@pytest.fixture
def sockets() -> Iterator[StandIn]:
    with StandIn(serve_sockets) as s:
        yield s


def accepts(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


# ----------------------------------------------------------- results


def test_bind_privileged_returns_the_socket_sent(sockets: StandIn) -> None:
    with Client(sockets.name) as c, c.bind_privileged(("::", 443)) as sock:
        assert (sock.family, sock.type) == (socket.AF_INET6, socket.SOCK_STREAM)
        assert accepts(sock)
        assert not os.get_inheritable(sock.fileno())
        assert sock.gettimeout() is None  # blocking, as the broker made it
    assert sockets.requests == [SocketRequest(1, "tcp:[::]:443", 0, None, False)]


def test_options_reach_the_broker(sockets: StandIn) -> None:
    with Client(sockets.name) as c:
        c.bind_privileged(("::", 443), backlog=16, v6only=True, interface="lo").close()
        c.bind_privileged(("0.0.0.0", 53), socket.SOCK_DGRAM, reuse_port=True).close()
        c.bind_privileged(("fe80::1", 547, 0, 2), socket.SOCK_DGRAM).close()
    assert [(r.target, r.backlog, r.v6only, r.reuse_port) for r in sockets.requests] == [  # type: ignore[union-attr]
        ("tcp:[::]:443@lo", 16, True, False),
        ("udp:0.0.0.0:53", 0, None, True),
        ("udp:[fe80::1%2]:547", 0, None, False),
    ]


def test_raw_socket_and_icmp_socket() -> None:
    with fresh_netns(ping_group_range="0 0"), StandIn(serve_sockets) as inside:
        with Client(inside.name) as c:
            with c.raw_socket(socket.AF_INET, socket.IPPROTO_ICMP) as raw:
                assert (raw.type, raw.proto) == (socket.SOCK_RAW, socket.IPPROTO_ICMP)
            with c.icmp_socket(socket.AF_INET6, interface="lo") as ping:
                assert (ping.family, ping.type, ping.proto) == (
                    socket.AF_INET6,
                    socket.SOCK_DGRAM,
                    socket.IPPROTO_ICMPV6,
                )
        assert [r.target for r in inside.requests] == ["raw:icmp", "icmp6@lo"]  # type: ignore[union-attr]


def test_module_level_calls_use_the_shared_client(sockets: StandIn) -> None:
    with privbroker.bind_privileged(("127.0.0.1", 80), socket=sockets.name, timeout=3) as s:
        assert accepts(s)
    with privbroker.net.bind_privileged(("::", 53), socket.SOCK_DGRAM, socket=sockets.name) as u:
        assert u.type == socket.SOCK_DGRAM
    assert sockets.connections == 1  # one shared connection for both
    assert privbroker.net.target_for(("::", 53), socket.SOCK_DGRAM) == "udp:[::]:53"
    from privbroker import shared

    shared._shared.pop(sockets.name).close()


def test_a_denial_is_policy_denied_with_reason_and_rule() -> None:
    denial = Result(errno.EACCES, True, "port 81 is not in rule 'web' (tcp:80)", "web")
    with (
        StandIn(answering(denial)) as s,
        Client(s.name) as c,
        pytest.raises(PolicyDenied) as info,
    ):
        c.bind_privileged(("::", 81))
    assert info.value.filename == "tcp:[::]:81"
    assert info.value.reason == denial.reason
    assert info.value.rule == "web"
    assert "port 81" in str(info.value)


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        (errno.EADDRINUSE, OSError),
        (errno.EADDRNOTAVAIL, OSError),
        (errno.ENODEV, OSError),
        (errno.EACCES, PermissionError),  # the kernel's, not the policy's
        (errno.EPERM, PermissionError),
    ],
)
def test_kernel_errors_are_their_oserror(code: int, exc_type: type[OSError]) -> None:
    with (
        StandIn(answering(Result(code, False, "", None))) as s,
        Client(s.name) as c,
        pytest.raises(exc_type) as info,
    ):
        c.bind_privileged(("0.0.0.0", 80))
    assert not isinstance(info.value, PolicyDenied)
    assert info.value.errno == code
    assert info.value.filename == "tcp:0.0.0.0:80"


# ------------------------------------------------- what must not leak an fd


def _udp() -> list[int]:
    return [socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()]


def _pipe() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


@pytest.mark.parametrize(
    ("result", "fds", "words"),
    [
        (Result(), _udp, "sent a socket"),  # a UDP socket for a TCP request
        (Result(), _pipe, "no socket"),
        (Result(), lambda: _udp() + _udp(), "2 fds"),
        (Result(), list, "0 fds"),
        (Result(errno.EADDRINUSE), _udp, "1 fds"),  # a failure with an fd
    ],
)
def test_a_wrong_reply_is_a_protocol_error_and_its_fds_are_closed(
    result: Result, fds: Callable[[], list[int]], words: str
) -> None:
    with (
        StandIn(answering(result, fds)) as s,
        Client(s.name) as c,
        pytest.raises(ProtocolError, match=words),
    ):
        c.bind_privileged(("::", 443))


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.bind_privileged(("localhost", 80)),
        lambda c: c.bind_privileged(("::", 0)),
        lambda c: c.bind_privileged(("::", 80), socket.SOCK_RAW),
        lambda c: c.bind_privileged(("0.0.0.0", 53), socket.SOCK_DGRAM, backlog=4),
        lambda c: c.bind_privileged(("0.0.0.0", 80), v6only=True),
        lambda c: c.icmp_socket(socket.AF_UNIX),
        lambda c: c.raw_socket(socket.AF_INET, 255),
    ],
)
def test_invalid_calls_fail_before_any_io(sockets: StandIn, call: Callable[[Client], Any]) -> None:
    with Client(sockets.name) as c, pytest.raises(ValueError):
        call(c)
    assert sockets.connections == 0


def test_module_level_invalid_timeout_is_a_value_error(sockets: StandIn) -> None:
    with pytest.raises(ValueError):
        privbroker.icmp_socket(socket=sockets.name, timeout=0)
    assert sockets.connections == 0


# ----------------------------------------------------------------- asyncio


def test_async_client_returns_sockets_and_raises_denials() -> None:
    denial = Result(errno.EACCES, True, "udp:53 is denied by rule 'no dns'", "no dns")

    def handler(req: protocol.Request) -> Any:
        assert isinstance(req, SocketRequest)
        if req.target.startswith("udp"):
            return SocketReply(req.id, denial), []
        return serve_sockets(req)

    async def main(name: str) -> None:
        async with AsyncClient(name) as c:
            with await c.bind_privileged(("::", 443), backlog=8) as sock:
                assert accepts(sock)
            with pytest.raises(PolicyDenied) as info:
                await c.bind_privileged(("0.0.0.0", 53), socket.SOCK_DGRAM)
            assert info.value.rule == "no dns"
            with pytest.raises(ValueError):
                await c.bind_privileged(("example.org", 443))
            with await c.raw_socket(socket.AF_INET6, socket.IPPROTO_ICMPV6) as raw:
                assert raw.type == socket.SOCK_RAW

    with StandIn(handler) as s:
        asyncio.run(main(s.name))
        assert [r.target for r in s.requests] == [  # type: ignore[union-attr]
            "tcp:[::]:443",
            "udp:0.0.0.0:53",
            "raw6:icmpv6",
        ]


def test_aio_module_level_calls(sockets: StandIn) -> None:
    async def main() -> None:
        with await privbroker.aio.bind_privileged(("127.0.0.1", 80), socket=sockets.name) as s:
            assert accepts(s)
            # An asyncio server takes the socket as it is.
            server = await asyncio.start_server(lambda r, w: None, sock=s)
            server.close()
            await server.wait_closed()
        with await privbroker.aio.raw_socket(socket.AF_INET, 17, socket=sockets.name) as r:
            assert r.proto == socket.IPPROTO_UDP
        with pytest.raises(ValueError):
            await privbroker.aio.icmp_socket(socket.AF_PACKET, socket=sockets.name)
        await privbroker.aio._shared_client(sockets.name).close()

    asyncio.run(main())
    assert [r.target for r in sockets.requests] == ["tcp:127.0.0.1:80", "raw:udp"]  # type: ignore[union-attr]


def test_public_names() -> None:
    for name in ("bind_privileged", "icmp_socket", "raw_socket"):
        assert name in privbroker.__all__
        assert name in privbroker.aio.__all__
        assert getattr(privbroker, name) is getattr(privbroker.net, name)
    for name in ("read_errors", "path_mtu", "SocketError", "Origin", "target_for"):
        assert name in privbroker.net.__all__
    for name in ("set_pmtu_discover", "enable_recverr"):
        assert hasattr(privbroker.net, name)
