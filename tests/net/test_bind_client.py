"""bind_privileged, icmp_socket and raw_socket end to end: a real broker, clients as nobody.

Each test makes a fresh network namespace (lo up, ping sockets for gid 0 only)
and starts a broker inside it: the broker process is a child of the thread
that entered the namespace, so it lives there, and so does its abstract
socket. The clients are forked children of that thread that drop to nobody
(65534) before calling the client library; what they saw comes back pickled
(tests/support/privs.py). Nothing leaves the namespace: every peer is on
loopback or a veth pair the test made. What the kernel made is checked with
its own answers: getsockopt, fstat (a socket's inode carries its owner), ss.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import privbroker
from privbroker import Client, PolicyDenied
from privbroker.net import read_errors
from tests.support.netns import fresh_netns, ip
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make namespaces")

POLICY = f"""
version = 1

[[allow]]
name = "web"
users = [{NOBODY}]
sockets = ["tcp:80", "udp:53", "udp:547", "icmp", "icmp6"]

[[allow]]
name = "raw"
users = [{NOBODY}]
sockets = ["raw:icmp"]

[[allow]]
name = "loopback only"
users = [{NOBODY}]
sockets = ["tcp:444"]
addresses = ["127.0.0.1"]

[[allow]]
name = "on lo"
users = [{NOBODY}]
sockets = ["udp:67"]
interfaces = ["lo"]

[[deny]]
name = "no rpcbind"
sockets = ["udp:111", "tcp:111"]
"""


@pytest.fixture
def broker(start_broker: Callable[..., Any]) -> Iterator[str]:
    """A fresh namespace with a broker serving POLICY in it; yields the broker's socket name."""
    with fresh_netns(ping_group_range="0 0"):
        yield start_broker(POLICY).name


def as_nobody(fn: Callable[..., Any], *args: Any) -> Any:
    return run_as(NOBODY, NOGROUP, fn, *args)


def ss(*args: str) -> str:
    return subprocess.run(["ss", *args], check=True, capture_output=True, text=True).stdout


def cloexec(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def exchange(server: socket.socket, family: int, host: str, port: int) -> tuple[bytes, str]:
    """Connect from host to the listening server, accept (no listen() called), say hello."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect((host, port))
        server.settimeout(5)
        conn, peer = server.accept()
        with conn:
            client.sendall(b"hello")
            data = conn.recv(5)
        # The client closes first, so TIME_WAIT is on its ephemeral port, not on the server's.
    return data, peer[0]


# ------------------------------------------------------------------- TCP


def _tcp_80_dual_stack(name: str) -> dict[str, Any]:
    with privbroker.bind_privileged(("::", 80), socket=name) as server:
        seen = {
            "family": server.family,
            "listening": listening(server),
            "cloexec": cloexec(server),
            "owner": os.fstat(server.fileno()).st_uid,
            "ss": [
                line for line in ss("-tlne").splitlines()[1:] if line.split()[3].endswith(":80")
            ],
            "v4": exchange(server, socket.AF_INET, "127.0.0.1", 80),
            "v6": exchange(server, socket.AF_INET6, "::1", 80),
        }
    return seen


def test_tcp_80_on_any_v6_address_accepts_ipv4_and_ipv6_as_nobody(broker: str) -> None:
    seen = as_nobody(_tcp_80_dual_stack, broker)
    assert seen["family"] == socket.AF_INET6
    assert seen["listening"]  # handed over listening, never merely bound
    assert seen["cloexec"]
    assert seen["owner"] == NOBODY
    assert len(seen["ss"]) == 1 and f"uid:{NOBODY}" in seen["ss"][0], seen["ss"]
    assert seen["v4"] == (b"hello", "::ffff:127.0.0.1")
    assert seen["v6"] == (b"hello", "::1")


def _v6only(name: str) -> tuple[str, tuple[bytes, str]]:
    with privbroker.bind_privileged(("::", 80), v6only=True, socket=name) as server:
        try:
            exchange(server, socket.AF_INET, "127.0.0.1", 80)
            v4 = "connected"
        except ConnectionRefusedError:
            v4 = "refused"
        return v4, exchange(server, socket.AF_INET6, "::1", 80)


def test_v6only_refuses_ipv4(broker: str) -> None:
    assert as_nobody(_v6only, broker) == ("refused", (b"hello", "::1"))


def _owned_by_nobody_while_held(name: str) -> list[str]:
    with Client(name) as c, c.bind_privileged(("0.0.0.0", 80), backlog=5):
        return [line for line in ss("-tlnep").splitlines()[1:] if line.split()[3] == "0.0.0.0:80"]


def test_ss_shows_the_listener_as_nobodys_with_its_backlog(broker: str) -> None:
    (line,) = as_nobody(_owned_by_nobody_while_held, broker)
    assert f"uid:{NOBODY}" in line
    assert line.split()[2] == "5"  # Send-Q of a listener is its backlog


# ------------------------------------------------------------------- UDP


def _udp_53(name: str) -> dict[str, Any]:
    with (
        privbroker.bind_privileged(("0.0.0.0", 53), socket.SOCK_DGRAM, socket=name) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.bind(("127.0.0.1", 0))
        client.sendto(b"query", ("127.0.0.1", 53))
        server.settimeout(5)
        data, peer = server.recvfrom(100)
        return {
            "data": data,
            "from_client": peer == client.getsockname(),
            "name": server.getsockname(),
            "type": server.type,
            "owner": os.fstat(server.fileno()).st_uid,
            "cloexec": cloexec(server),
        }


def test_udp_53_receives_a_datagram(broker: str) -> None:
    seen = as_nobody(_udp_53, broker)
    assert seen["data"] == b"query" and seen["from_client"]
    assert seen["name"] == ("0.0.0.0", 53)
    assert seen["type"] == socket.SOCK_DGRAM
    assert seen["owner"] == NOBODY and seen["cloexec"]


def _link_local(name: str, index: int) -> list[tuple[Any, ...]]:
    names = []
    for address in (("fe80::1%d0", 547), ("fe80::1", 547, 0, index)):
        with privbroker.bind_privileged(address, socket.SOCK_DGRAM, socket=name) as s:
            names.append(s.getsockname())
    return names


def test_link_local_with_a_zone_name_or_a_scope_id(broker: str) -> None:
    ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ip("link", "set", "d0", "up")
    ip("link", "set", "d1", "up")
    ip("addr", "add", "fe80::1/64", "dev", "d0", "nodad")
    index = socket.if_nametoindex("d0")
    assert as_nobody(_link_local, broker, index) == [("fe80::1", 547, 0, index)] * 2


# ------------------------------------------------------------------ ICMP


def _ping(name: str, family: int, host: str) -> dict[str, Any]:
    request = 8 if family == socket.AF_INET else 128
    with privbroker.icmp_socket(family, socket=name) as sock:
        # A ping socket fills in the checksum and the id: send type, code, seq.
        sock.sendto(struct.pack("!BBHHH", request, 0, 0, 0, 7) + b"privbroker", (host, 0))
        sock.settimeout(5)
        answer = sock.recv(100)
        return {
            "type": answer[0],
            "seq": struct.unpack("!H", answer[6:8])[0],
            "payload": answer[8:],
            "proto": sock.proto,
            "owner": os.fstat(sock.fileno()).st_uid,
            "errors": read_errors(sock),
        }


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_icmp_echo_round_trip(broker: str, family: int, host: str) -> None:
    seen = as_nobody(_ping, broker, family, host)
    assert seen["type"] == (0 if family == socket.AF_INET else 129)
    assert (seen["seq"], seen["payload"]) == (7, b"privbroker")
    assert seen["proto"] == (
        socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    )
    assert seen["owner"] == NOBODY
    assert seen["errors"] == []  # the error queue is readable, and empty


# ------------------------------------------------------------------- raw


def _raw(name: str) -> dict[str, Any]:
    with Client(name) as c, c.raw_socket(socket.AF_INET, socket.IPPROTO_ICMP) as raw:
        # It sees the host's ICMP: our own ping's echo reply among it.
        with c.icmp_socket() as ping:
            ping.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 9) + b"raw-check", ("127.0.0.1", 0))
        raw.settimeout(5)
        seen_types = set()
        for _ in range(4):
            packet = raw.recv(200)
            header = (packet[0] & 0x0F) * 4  # a raw IPv4 socket receives the IP header
            seen_types.add(packet[header])
            if {0, 8} <= seen_types:
                break
        return {
            "type": raw.type,
            "proto": raw.proto,
            "hdrincl": raw.getsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL),
            "seen": sorted(seen_types),
            "owner": os.fstat(raw.fileno()).st_uid,
        }


def test_raw_socket_under_its_rule(broker: str) -> None:
    seen = as_nobody(_raw, broker)
    assert (seen["type"], seen["proto"], seen["hdrincl"]) == (socket.SOCK_RAW, 1, 0)
    assert seen["seen"] == [0, 8]  # echo request and reply
    assert seen["owner"] == NOBODY


# --------------------------------------------------------------- denials


def _denial(name: str, call: Callable[[Client], socket.socket]) -> tuple[str, str, str]:
    with Client(name) as c:
        try:
            call(c).close()
        except PolicyDenied as exc:
            return type(exc).__name__, exc.reason, str(exc.filename)
    return "allowed", "", ""


@pytest.mark.parametrize(
    ("call", "target", "words"),
    [
        (lambda c: c.bind_privileged(("::", 81)), "tcp:[::]:81", "81"),  # an ungranted port
        (lambda c: c.bind_privileged(("0.0.0.0", 54), socket.SOCK_DGRAM), "udp:0.0.0.0:54", "54"),
        (lambda c: c.bind_privileged(("0.0.0.0", 80), socket.SOCK_DGRAM), "udp:0.0.0.0:80", "udp"),
        (lambda c: c.bind_privileged(("0.0.0.0", 444)), "tcp:0.0.0.0:444", "0.0.0.0"),  # address
        (lambda c: c.bind_privileged(("::1", 444)), "tcp:[::1]:444", "::1"),  # family
        (lambda c: c.bind_privileged(("0.0.0.0", 67), socket.SOCK_DGRAM), "udp:0.0.0.0:67", "67"),
        (
            lambda c: c.bind_privileged(("0.0.0.0", 67), socket.SOCK_DGRAM, interface="d9"),
            "udp:0.0.0.0:67@d9",
            "d9",
        ),  # an ungranted interface
        (
            lambda c: c.bind_privileged(("0.0.0.0", 111), socket.SOCK_DGRAM),
            "udp:0.0.0.0:111",
            "rpcbind",
        ),
        (
            lambda c: c.raw_socket(socket.AF_INET, socket.IPPROTO_UDP),
            "raw:udp",
            "raw:udp",
        ),  # protocol
        (lambda c: c.raw_socket(socket.AF_INET6, socket.IPPROTO_ICMPV6), "raw6:icmpv6", "icmpv6"),
    ],
)
def test_what_no_rule_grants_is_denied_with_a_reason(
    broker: str, call: Callable[[Client], socket.socket], target: str, words: str
) -> None:
    kind, reason, filename = as_nobody(_denial, broker, call)
    assert kind == "PolicyDenied", (kind, reason)
    assert filename == target
    assert words in reason, reason


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.bind_privileged(("0.0.0.0", 444)),  # the port is granted, not the address
        lambda c: c.bind_privileged(("::1", 444)),  # nor the family
    ],
)
def test_the_reason_names_the_rule_that_came_nearest(
    broker: str, call: Callable[[Client], socket.socket]
) -> None:
    kind, reason, _ = as_nobody(_denial, broker, call)
    assert kind == "PolicyDenied"
    assert "'loopback only'" in reason, reason


def _interface_granted(name: str) -> str:
    with privbroker.bind_privileged(
        ("0.0.0.0", 67), socket.SOCK_DGRAM, interface="lo", socket=name
    ) as s:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0").decode()


def test_an_interfaces_rule_grants_the_socket_bound_to_its_device(broker: str) -> None:
    assert as_nobody(_interface_granted, broker) == "lo"


def _denied_for_root(name: str) -> str:
    try:
        privbroker.bind_privileged(("::", 80), socket=name).close()
    except PolicyDenied as exc:
        return exc.reason
    return "allowed"


def test_root_is_judged_like_anyone(broker: str) -> None:
    # The rules name nobody: a root client is denied by default too.
    assert "no rule allows user root (0)" in run_as(0, 0, _denied_for_root, broker)


def _in_use(name: str) -> tuple[int | None, bool]:
    with Client(name) as c, c.bind_privileged(("::", 80)):
        try:
            c.bind_privileged(("::", 80)).close()
        except OSError as exc:
            return exc.errno, isinstance(exc, PolicyDenied)
    return None, False


def test_a_kernel_error_is_its_oserror(broker: str) -> None:
    assert as_nobody(_in_use, broker) == (errno.EADDRINUSE, False)
