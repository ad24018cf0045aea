"""broker.sockets on real sockets, each test in a fresh network namespace it makes.

Nothing leaves the namespace: every peer is the loopback or a veth pair
the test creates. What the kernel made is checked with the kernel's own
answers: getsockopt, fstat (a socket's inode carries its owner) and `ss`.
"""

from __future__ import annotations

import copy
import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from privbroker.broker.net import sockets
from privbroker.broker.policy import sockets as sockspec
from privbroker.protocol.targets import SocketTarget, parse_socket_target
from tests.support.netns import fresh_netns, ip, sysctl

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make namespaces")


@pytest.fixture(autouse=True)
def ns() -> Iterator[None]:
    with fresh_netns(ping_group_range="0 0"):
        yield


@pytest.fixture
def device() -> str:
    """A device d0, up, with fe80::1 on it (no DAD, so it is usable at once).

    One end of a veth pair whose both ends stay in the namespace (this
    kernel has no dummy driver).
    """
    ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ip("link", "set", "d0", "up")
    ip("link", "set", "d1", "up")
    ip("addr", "add", "fe80::1/64", "dev", "d0", "nodad")
    return "d0"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fs_ids() -> tuple[int, int]:
    """This thread's (fsuid, fsgid), the fourth field of /proc's Uid: and Gid: lines."""
    with open("/proc/thread-self/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])


def make(target: str, **options: object) -> socket.socket:
    """create_socket as uid/gid nobody, wrapped so the test closes it."""
    fd = sockets.create_socket(parse_socket_target(target), uid=NOBODY, gid=NOBODY, **options)  # type: ignore[arg-type]
    return socket.socket(fileno=fd)


def read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read())


def ss(*args: str) -> str:
    return subprocess.run(["ss", *args], check=True, capture_output=True, text=True).stdout


def test_tcp_port_80_on_any_v6_address_listens_for_both_families_as_the_client() -> None:
    with make("tcp:[::]:80") as server:
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not os.get_inheritable(server.fileno())  # CLOEXEC
        st = os.fstat(server.fileno())
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        line = next(line for line in ss("-tlnep").splitlines() if ":80 " in line)
        assert f"uid:{NOBODY}" in line, line
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.connect((host, 80))
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
    assert fs_ids() == (0, 0)


def test_backlog_reaches_listen_and_defaults_to_the_system_maximum() -> None:
    somaxconn = read_int("/proc/sys/net/core/somaxconn")
    with make("tcp:127.0.0.1:81", backlog=7), make("tcp:127.0.0.1:82"):
        queues = {line.split()[3]: int(line.split()[2]) for line in ss("-tln").splitlines()[1:]}
        assert queues["127.0.0.1:81"] == 7
        assert queues["127.0.0.1:82"] == somaxconn


def test_v6only_refuses_ipv4_and_none_keeps_the_kernel_default() -> None:
    with make("tcp:[::]:80", v6only=True) as server:
        assert server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with socket.socket(socket.AF_INET) as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", 80))
        with socket.socket(socket.AF_INET6) as client:
            client.connect(("::1", 80))
    with make("tcp:[::]:80") as server:
        default = read_int("/proc/sys/net/ipv6/bindv6only")
        assert server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == default


def test_udp_53_receives_a_datagram() -> None:
    with make("udp:127.0.0.1:53") as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM
        assert os.fstat(server.fileno()).st_uid == NOBODY
        c.bind(("127.0.0.1", 0))
        c.sendto(b"query", ("127.0.0.1", 53))
        data, peer = server.recvfrom(100)
        assert data == b"query" and peer == c.getsockname()


# family: (echo request type, echo reply type, option level, RECVERR, MTU_DISCOVER)
ECHO = {
    socket.AF_INET: (8, 0, socket.IPPROTO_IP, sockets.IP_RECVERR, sockets.IP_MTU_DISCOVER),
    socket.AF_INET6: (
        128, 129, socket.IPPROTO_IPV6, sockets.IPV6_RECVERR, sockets.IPV6_MTU_DISCOVER
    ),
}  # fmt: skip


def ping(sock: socket.socket, host: str, request_type: int) -> bytes:
    # A ping socket fills in the checksum and the id (its "port"): send type, code, seq.
    sock.sendto(struct.pack("!BBHHH", request_type, 0, 0, 0, 1) + b"privbroker", (host, 0))
    sock.settimeout(5)
    return sock.recv(100)


@pytest.mark.parametrize(("target", "host"), [("icmp", "127.0.0.1"), ("icmp6", "::1")])
def test_icmp_echo_round_trip_with_the_error_queue_and_pmtu_want(target: str, host: str) -> None:
    with make(target) as sock:
        request, reply, level, recverr, mtu_discover = ECHO[sock.family]
        assert sock.getsockopt(level, recverr) == 1
        assert sock.getsockopt(level, mtu_discover) == 1  # IP_PMTUDISC_WANT
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == sock.proto
        assert os.fstat(sock.fileno()).st_uid == NOBODY
        answer = ping(sock, host, request)
        assert answer[0] == reply and answer.endswith(b"privbroker")


def test_icmp_needs_root_in_ping_group_range() -> None:
    assert sockets.ping_range_allows_root()
    sysctl("net.ipv4.ping_group_range", "1 0")  # the kernel's default: no one
    assert not sockets.ping_range_allows_root()
    before = fd_count()
    with pytest.raises(PermissionError):
        make("icmp")
    assert fd_count() == before
    assert fs_ids() == (0, 0)


def test_raw_icmp_socket_sees_icmp_and_has_no_header_included() -> None:
    with make("raw:icmp") as raw, make("icmp") as pinger:
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_RAW
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_ICMP
        assert raw.getsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL) == 0
        assert os.fstat(raw.fileno()).st_uid == NOBODY
        ping(pinger, "127.0.0.1", 8)
        raw.settimeout(5)
        packet = raw.recv(200)  # the IPv4 header, then the echo request
        assert packet[0] >> 4 == 4 and packet[9] == socket.IPPROTO_ICMP
        assert packet.endswith(b"privbroker")
    with make("raw6:icmpv6") as raw6:
        assert raw6.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_ICMPV6


def test_raw_255_is_refused_before_any_socket_exists() -> None:
    with pytest.raises(ValueError, match="IPPROTO_RAW"):
        parse_socket_target("raw:255")
    req = copy.copy(parse_socket_target("raw:icmp"))  # a copy: parsed targets are shared
    object.__setattr__(req, "protocol", 255)  # past SocketTarget's own check
    before = fd_count()
    with pytest.raises(ValueError, match="IPPROTO_RAW"):
        sockets.create_socket(req, uid=NOBODY, gid=NOBODY)
    assert fd_count() == before


def test_bind_to_device(device: str) -> None:
    for target, options in (("udp:0.0.0.0:53", {"interface": device}), (f"icmp@{device}", {})):
        with make(target, **options) as sock:
            name = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            assert name.rstrip(b"\0") == device.encode()
    with pytest.raises(ValueError, match="disagrees"):
        make(f"udp:0.0.0.0:53@{device}", interface="lo")


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_link_local_bind_with_a_scope(device: str, kind: str) -> None:
    index = socket.if_nametoindex(device)
    for zone in (device, str(index)):
        with make(f"{kind}:[fe80::1%{zone}]:547") as sock:
            host, port, _, scope_id = sock.getsockname()
            assert (host.partition("%")[0], port, scope_id) == ("fe80::1", 547, index)
    with make(f"{kind}:[fe80::1]:547@{device}") as sock:  # the device alone scopes it too
        assert sock.getsockname()[3] == index


def errno_of(call: Callable[[], object]) -> int:
    before = fd_count()
    with pytest.raises(OSError) as info:
        call()
    assert fd_count() == before, "an error path leaked an fd"
    assert fs_ids() == (0, 0), "an error path left the filesystem ids changed"
    return info.value.errno or 0


def test_kernel_errors_come_back_as_oserror_and_close_what_was_opened(device: str) -> None:
    assert errno_of(lambda: make("tcp:192.0.2.1:80")) == errno.EADDRNOTAVAIL
    assert errno_of(lambda: make("udp:[2001:db8::1]:53")) == errno.EADDRNOTAVAIL
    assert errno_of(lambda: make("udp:0.0.0.0:53@nosuchdev")) == errno.ENODEV
    assert errno_of(lambda: make("udp:[fe80::1%nosuchdev]:547")) == errno.ENODEV
    assert errno_of(lambda: make("udp:[fe80::1%9999]:547")) == errno.ENODEV
    with make("tcp:[::]:80"):
        assert errno_of(lambda: make("tcp:[::]:80")) == errno.EADDRINUSE
        assert errno_of(lambda: make("tcp:0.0.0.0:80")) == errno.EADDRINUSE


def test_reuse_port_lets_two_sockets_share_a_port() -> None:
    with make("udp:[::]:53", reuse_port=True) as a, make("udp:[::]:53", reuse_port=True) as b:
        for sock in (a, b):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("udp:0.0.0.0:53", {"backlog": 5}, "only TCP takes one"),
        ("tcp:0.0.0.0:80", {"backlog": -1}, "only TCP takes one, 0-"),
        ("tcp:0.0.0.0:80", {"v6only": True}, "v6only applies to IPv6"),
        ("icmp6", {"v6only": False}, "v6only applies to IPv6"),
        ("icmp", {"reuse_port": True}, "reuse_port applies to TCP and UDP"),
        ("udp:0.0.0.0:53", {"interface": "a b"}, "interface 'a b' is not valid"),
        ("udp:0.0.0.0:53", {"uid": -1}, "outside 0.."),
        ("udp:0.0.0.0:53", {"gid": 2**32 - 1}, "outside 0.."),
        ("tun:vpn0", {}, "tun is not a socket"),
    ],
)
def test_options_that_do_not_apply_are_refused(
    target: str, options: dict[str, object], message: str
) -> None:
    before = fd_count()
    ids: dict[str, object] = {"uid": NOBODY, "gid": NOBODY}
    with pytest.raises(ValueError, match=message):
        sockets.create_socket(parse_socket_target(target), **{**ids, **options})  # type: ignore[arg-type]
    assert fd_count() == before


def test_a_socket_other_than_asked_is_closed_not_handed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Make the kernel's answer disagree with the table: the check must catch it.
    real = sockets._TYPES["udp"]
    monkeypatch.setitem(sockets._TYPES, "udp", lambda r: (socket.SOCK_DGRAM, 0))
    assert errno_of(lambda: make("udp:127.0.0.1:53")) == errno.EPROTO
    monkeypatch.setitem(sockets._TYPES, "udp", real)
    with make("udp:127.0.0.1:53"):  # the same port is free again: the first was closed
        pass


def test_fs_ids_change_for_this_thread_only_and_are_checked() -> None:
    # The other thread must exist before: a new thread starts with its creator's ids.
    seen: list[tuple[int, int]] = []
    asked, answered = threading.Event(), threading.Event()

    def other() -> None:
        asked.wait(10)
        seen.append(fs_ids())
        answered.set()

    thread = threading.Thread(target=other)
    thread.start()
    with sockets._owned_by(NOBODY, 1234):
        assert fs_ids() == (NOBODY, 1234)
        asked.set()
        answered.wait(10)
    thread.join()
    assert seen == [(0, 0)] and fs_ids() == (0, 0)
    with pytest.raises(PermissionError):
        sockets._set_fs_id(lambda value: 0, 5)  # a call that never changes anything


def test_needed_capabilities() -> None:
    def caps(*texts: str, **kw: object) -> set[int]:
        return sockets.needed_capabilities(map(sockspec.parse_spec, texts), **kw)  # type: ignore[arg-type]

    assert caps("tcp:80") == {sockets.CAP_NET_BIND_SERVICE}
    assert caps("udp:1000-2000") == {sockets.CAP_NET_BIND_SERVICE}
    assert caps("tcp:8000-8100") == set()
    assert caps("tcp:80", port_start=80) == set()
    assert caps("icmp", "icmp6") == set()
    assert caps("raw:icmp") == {sockets.CAP_NET_RAW}
    assert caps("tun:vpn*", "tap:t*") == {sockets.CAP_NET_ADMIN}
    assert caps(network=True) == {sockets.CAP_NET_ADMIN}
    sysctl("net.ipv4.ip_unprivileged_port_start", "80")
    assert sockets.unprivileged_port_start() == 80
    assert caps("tcp:80") == set()


def test_the_broker_thread_keeps_its_ids_while_a_client_socket_is_made() -> None:
    req = SocketTarget("udp", socket.AF_INET, 53, "127.0.0.1")
    fd = sockets.create_socket(req, uid=NOBODY, gid=NOBODY)
    os.close(fd)
    assert fs_ids() == (0, 0)


def test_a_tcp_socket_that_does_not_listen_is_never_handed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket.socket, "listen", lambda self, backlog: None)
    assert errno_of(lambda: make("tcp:127.0.0.1:80")) == errno.EPROTO
    monkeypatch.undo()
    with make("tcp:127.0.0.1:80") as sock:  # the bound one was closed: the port is free
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_ids_that_cannot_be_set_back_stop_the_broker() -> None:
    """If this thread cannot be root again after acting as a client (here the
    process's uids changed inside the block, which takes root's right to set
    fsuid 0 away), _owned_by raises IdsLost, which no per-request handler
    catches (it is no Exception): the broker stops."""
    from privbroker.broker.libc import IdsLost
    from tests.support.privs import run_as

    def child() -> str:
        try:
            with sockets._owned_by(NOBODY, NOBODY):
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
        except IdsLost as exc:
            return str(exc)
        return "set back"

    assert "could not be set back to 0" in run_as(0, 0, child)
    assert not issubclass(IdsLost, Exception)
