"""The error queue on real sockets, in network namespaces the tests make.

Every test with traffic runs in `fresh_netns()` (lo up, ping sockets allowed); the path MTU
tests route through a router namespace whose far link is narrow, so the router's own kernel
sends "fragmentation needed" and "packet too big". The parser is also fuzzed on its own.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privbroker import errqueue
from privbroker.errqueue import Origin, SocketError
from tests.support.netns import (
    Chain,
    fresh_netns,
    in_named_netns,
    named_netns,
    router_chain,
)

NARROW_MTU = 1280  # the IPv6 minimum, so one link serves both families
WAIT = 5.0  # seconds to wait for an error the kernel is bound to send; never reached
UDP4_OVERHEAD = 20 + 8
UDP6_OVERHEAD = 40 + 8


@pytest.fixture
def netns() -> Iterator[None]:
    with fresh_netns():
        yield


@pytest.fixture
def chain(netns: None) -> Iterator[Chain]:
    with router_chain(NARROW_MTU) as c:
        yield c


def wait_error(sock: socket.socket, timeout: float = WAIT) -> None:
    """Wait until the socket has an error queued (POLLERR is always reported)."""
    poller = select.poll()
    poller.register(sock, 0)
    assert poller.poll(timeout * 1000), "no error arrived"


def udp(family: socket.AddressFamily, peer: tuple[str, int], mode: str = "do") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    errqueue.enable_recverr(sock)
    errqueue.set_pmtu_discover(sock, mode)  # type: ignore[arg-type]
    sock.connect(peer)
    return sock


def far_listener(chain: Chain, family: socket.AddressFamily) -> socket.socket:
    with in_named_netns(chain.far):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((chain.far4 if family == socket.AF_INET else chain.far6, 0))
    sock.settimeout(WAIT)
    return sock


# -- the README's example: find the path MTU as tracepath does, then send within it --------


def probe_path_mtu(sock: socket.socket, mtu: int = 1500, wait: float = 1.0) -> int:
    """Send DF probes to sock's peer, shrinking to the MTU each error names, until one passes."""
    errqueue.enable_recverr(sock)
    errqueue.set_pmtu_discover(sock, "do")
    overhead = UDP4_OVERHEAD if sock.family == socket.AF_INET else UDP6_OVERHEAD
    poller = select.poll()
    poller.register(sock, 0)  # POLLERR: an error is queued
    while True:
        try:
            sock.send(bytes(mtu - overhead))  # DF set: a router must refuse, not fragment
        except OSError as e:  # the kernel already knows a smaller path MTU (and queued it)
            if e.errno != errno.EMSGSIZE:
                raise
        if not poller.poll(wait * 1000):  # no error within the wait: the probe went through
            return mtu
        for err in errqueue.read_errors(sock):
            if err.errno != errno.EMSGSIZE:
                raise OSError(err.errno, str(err))
            mtu = err.info  # "fragmentation needed" / "packet too big" carry the next-hop MTU


# -- unreachable ports, on loopback -------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "host", "origin", "icmp_type", "icmp_code"),
    [
        (socket.AF_INET, "127.0.0.1", Origin.ICMP, 3, 3),
        (socket.AF_INET6, "::1", Origin.ICMP6, 1, 4),
    ],
)
def test_port_unreachable(
    netns: None,
    family: socket.AddressFamily,
    host: str,
    origin: Origin,
    icmp_type: int,
    icmp_code: int,
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    with udp(family, (host, port), "want") as sock:
        sock.send(b"hello, anyone?")
        wait_error(sock)
        (err,) = errqueue.read_errors(sock)
        assert err == SocketError(
            errno=errno.ECONNREFUSED,
            origin=origin,
            type=icmp_type,
            code=icmp_code,
            info=0,
            data=0,
            offender=host,
            payload=b"hello, anyone?",
        )
        assert "ECONNREFUSED" in str(err) and f"from {host}" in str(err)
        assert errqueue.read_errors(sock) == []


def test_truncated_control_data_is_reported_not_dropped(
    netns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with udp(socket.AF_INET, ("127.0.0.1", 9), "want") as sock:
        for n in range(2):
            sock.send(b"%d" % n)
            # The kernel queues the error and sets the pending one together; reading the
            # pending one (SO_ERROR) clears it alone, so the next send goes out and POLLERR
            # can't tell us the second error came: the pending error does.
            deadline = time.monotonic() + WAIT
            while sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNREFUSED:
                assert time.monotonic() < deadline, "no error arrived"
                time.sleep(0.001)
        monkeypatch.setattr(errqueue, "ANCILLARY_SIZE", socket.CMSG_LEN(20))
        with pytest.raises(OSError) as info:
            errqueue.read_errors(sock)
        assert info.value.errno == errno.ENOBUFS
        monkeypatch.undo()
        (rest,) = errqueue.read_errors(sock)  # only the truncated entry was lost
        assert rest.payload == b"1" and rest.errno == errno.ECONNREFUSED


def test_fresh_netns_is_left_on_exit() -> None:
    def current() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    home = current()
    with fresh_netns():
        inside = current()
        assert inside != home
        with named_netns("t") as name:
            with in_named_netns(name):
                assert current() not in (home, inside)
            assert current() == inside
        assert name not in os.listdir("/run/netns")
    assert current() == home


def test_empty_queue_does_not_block(netns: None) -> None:
    for timeout in (None, 0.0, 30.0):
        with udp(socket.AF_INET, ("127.0.0.1", 9)) as sock:
            sock.settimeout(timeout)
            started = time.monotonic()
            assert errqueue.read_errors(sock) == []
            assert time.monotonic() - started < 5  # a generous bound: only a wait fails it
            assert sock.gettimeout() == timeout


def test_read_errors_leaves_the_socket_open_and_its_mode_alone(netns: None) -> None:
    with udp(socket.AF_INET, ("127.0.0.1", 9)) as sock:
        sock.settimeout(3.0)
        errqueue.read_errors(sock)
        assert sock.fileno() >= 0 and sock.gettimeout() == 3.0
        assert sock.getpeername() == ("127.0.0.1", 9)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_path_mtu_unconnected_raises_enotconn(family: socket.AddressFamily) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock, pytest.raises(OSError) as info:
        errqueue.path_mtu(sock)
    assert info.value.errno == errno.ENOTCONN


def test_not_an_ip_socket() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(OSError) as info:
        errqueue.path_mtu(a)
    assert info.value.errno == errno.EAFNOSUPPORT


def test_unknown_pmtu_mode() -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="mode"):
        errqueue.set_pmtu_discover(sock, "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("family", "mode", "expected"),
    [(socket.AF_INET, m, v) for m, v in errqueue.PMTUDISC.items()]
    + [(socket.AF_INET6, m, v) for m, v in errqueue.PMTUDISC.items()],
)
def test_pmtu_modes_reach_the_kernel(
    family: socket.AddressFamily, mode: str, expected: int
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        errqueue.set_pmtu_discover(sock, mode)  # type: ignore[arg-type]
        level, opt = (0, 10) if family == socket.AF_INET else (41, 23)
        assert sock.getsockopt(level, opt) == expected
        errqueue.enable_recverr(sock)
        assert sock.getsockopt(level, 11 if family == socket.AF_INET else 25) == 1


# -- ping sockets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "proto", "host", "echo", "reply"),
    [
        (socket.AF_INET, socket.IPPROTO_ICMP, "127.0.0.1", 8, 0),
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, "::1", 128, 129),
    ],
)
def test_ping_socket_echo(
    netns: None, family: socket.AddressFamily, proto: int, host: str, echo: int, reply: int
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM, proto) as sock:
        errqueue.enable_recverr(sock)
        errqueue.set_pmtu_discover(sock, "want")
        sock.settimeout(WAIT)
        # type, code, checksum, id, sequence: the kernel fills in the checksum and the id.
        sock.sendto(struct.pack("!BBHHH", echo, 0, 0, 0, 7) + b"ping", (host, 0))
        answer = sock.recv(1024)
        assert answer[0] == reply and answer[1] == 0
        assert struct.unpack("!H", answer[6:8]) == (7,) and answer[8:] == b"ping"
        assert errqueue.read_errors(sock) == []


# -- path MTU through a router namespace ---------------------------------------------------


@pytest.mark.parametrize(
    ("family", "origin", "icmp_type", "icmp_code"),
    [(socket.AF_INET, Origin.ICMP, 3, 4), (socket.AF_INET6, Origin.ICMP6, 2, 0)],
)
def test_router_reports_the_lower_mtu(
    chain: Chain, family: socket.AddressFamily, origin: Origin, icmp_type: int, icmp_code: int
) -> None:
    v4 = family == socket.AF_INET
    far, router = (chain.far4, chain.router4) if v4 else (chain.far6, chain.router6)
    payload = bytes(range(256)) * 5 + bytes(120)  # 1400 bytes
    with udp(family, (far, 9)) as sock:
        assert errqueue.path_mtu(sock) == 1500
        sock.send(payload)
        wait_error(sock)
        (err,) = errqueue.read_errors(sock)
        assert (err.errno, err.origin, err.type, err.code) == (
            errno.EMSGSIZE,
            origin,
            icmp_type,
            icmp_code,
        )
        assert err.info == NARROW_MTU and err.offender == router
        # The router quotes only the start of the datagram (to 576 or 1280 bytes in all).
        assert 0 < len(err.payload) < len(payload)
        assert err.payload == payload[: len(err.payload)]
        assert errqueue.path_mtu(sock) == NARROW_MTU
        # With "do", the kernel now refuses the same size itself and queues a local error.
        with pytest.raises(OSError) as info:
            sock.send(payload)
        assert info.value.errno == errno.EMSGSIZE
        (local,) = errqueue.read_errors(sock)
        assert (local.errno, local.origin, local.info, local.offender) == (
            errno.EMSGSIZE,
            Origin.LOCAL,
            NARROW_MTU,
            None,
        )


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_probe_then_send_within_the_path_mtu(chain: Chain, family: socket.AddressFamily) -> None:
    with far_listener(chain, family) as listener, socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(listener.getsockname()[:2])
        mtu = probe_path_mtu(sock, wait=2.0)
        assert mtu == NARROW_MTU == errqueue.path_mtu(sock)
        overhead = UDP4_OVERHEAD if family == socket.AF_INET else UDP6_OVERHEAD
        received = listener.recv(65535)  # the probe that went through
        assert len(received) == mtu - overhead
        sock.send(b"x" * (mtu - overhead))
        assert listener.recv(65535) == b"x" * (mtu - overhead)


# -- the parser, pure ------------------------------------------------------------------------


def ee(errno_: int, origin: int, type_: int, code: int, info: int, data: int) -> bytes:
    return struct.pack("=IBBBBII", errno_, origin, type_, code, 0, info, data)


def sin(addr: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_pton(socket.AF_INET, addr))


def sin6(addr: str, scope: int = 0) -> bytes:
    raw = socket.inet_pton(socket.AF_INET6, addr)
    return struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, raw, scope)


def test_parse_v6_offenders() -> None:
    msg = errqueue.parse_extended_err(41, 25, ee(90, 3, 2, 0, 1280, 0) + sin6("fe80::1", 3))
    assert msg.offender == "fe80::1%3" and msg.info == 1280 and msg.origin is Origin.ICMP6
    mapped = errqueue.parse_extended_err(41, 25, ee(111, 2, 3, 3, 0, 0) + sin6("::ffff:1.2.3.4"))
    assert mapped.offender == "::ffff:102:304" and mapped.origin is Origin.ICMP


def test_parse_local_error_has_no_offender() -> None:
    msg = errqueue.parse_extended_err(0, 11, ee(90, 1, 0, 0, 1280, 0) + bytes(16), b"abc")
    assert msg.offender is None and msg.origin is Origin.LOCAL and msg.payload == b"abc"
    assert " from " not in str(msg)


def test_parse_unknown_origin_keeps_its_number() -> None:
    msg = errqueue.parse_extended_err(0, 11, ee(5, 200, 0, 0, 0, 0) + sin("192.0.2.9"))
    assert msg.origin == 200 and msg.origin.name == "ORIGIN_200"
    assert msg.offender == "192.0.2.9"


@pytest.mark.parametrize(
    ("level", "type_", "data", "match"),
    [
        (0, 25, ee(0, 0, 0, 0, 0, 0) + bytes(16), "not an error"),
        (41, 11, ee(0, 0, 0, 0, 0, 0) + bytes(28), "not an error"),
        (1, 11, ee(0, 0, 0, 0, 0, 0) + bytes(28), "not an error"),
        (0, 11, ee(0, 0, 0, 0, 0, 0) + bytes(15), "need 32"),
        (41, 25, ee(0, 0, 0, 0, 0, 0) + sin("192.0.2.1") + bytes(11), "need 44"),
        (0, 11, ee(0, 2, 0, 0, 0, 0) + sin6("::1")[:16], "family"),
        (41, 25, ee(0, 2, 0, 0, 0, 0) + sin("192.0.2.1") + bytes(12), "family"),
    ],
)
def test_parse_rejects(level: int, type_: int, data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        errqueue.parse_extended_err(level, type_, data)


@given(
    level=st.sampled_from([0, 41, 1, -1, 2**31]),
    type_=st.sampled_from([11, 25, 0, 999]),
    data=st.binary(max_size=80),
    payload=st.binary(max_size=16),
)
def test_parse_any_bytes_gives_an_error_or_valueerror(
    level: int, type_: int, data: bytes, payload: bytes
) -> None:
    try:
        msg = errqueue.parse_extended_err(level, type_, data, payload)
    except ValueError:
        return
    assert isinstance(msg, SocketError) and msg.payload == payload
    assert isinstance(msg.origin, Origin) and str(msg)


@given(
    level=st.sampled_from([0, 41]),
    head=st.tuples(*[st.integers(0, 255)] * 4, *[st.integers(0, 2**32 - 1)] * 3),
    tail=st.binary(max_size=8),
)
def test_parse_well_formed_round_trips(level: int, head: tuple[int, ...], tail: bytes) -> None:
    origin, type_, code, pad, errno_, info, data = head
    raw = struct.pack("=IBBBBII", errno_, origin, type_, code, pad, info, data)
    addr = sin("198.51.100.7") if level == 0 else sin6("2001:db8::7")
    msg = errqueue.parse_extended_err(level, 11 if level == 0 else 25, raw + addr + tail)
    assert (msg.errno, msg.origin, msg.type, msg.code, msg.info, msg.data) == (
        errno_,
        origin,
        type_,
        code,
        info,
        data,
    )
    assert msg.offender == ("198.51.100.7" if level == 0 else "2001:db8::7")
