"""The socket fast path (broker/net/_fastsock.c, net/fastsock.py) against the
Python broker it stands in for.

The first bind_privileged of a request is made by the Python broker, which
records it; the same request again is made in C. Every test here asks twice
and compares what the kernel says of both sockets (owner, family, type,
protocol, listening, bound address, device, options, backlog, close-on-exec),
and reads `fast_sockets` in status to know the C code really answered the
second. Then what must never be fast: a denial, a reload that takes the
grant away, a zone, a kernel refusal (the Python broker gives its errno), a
table entry that is not a TCP or UDP socket (serve() on its own), and a
message the fast decoder reads differently from the codec (hypothesis).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privbroker import Client, PolicyDenied
from privbroker import protocol as proto
from privbroker.broker.files import fastpath
from privbroker.broker.net import fastsock
from privbroker.protocol.targets import parse_socket_target
from tests.support.netns import fresh_netns, ip
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.running import status, wait_for
from tests.support.sockinfo import describe

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make namespaces"),
    pytest.mark.skipif(not fastpath.available(), reason="privbroker.broker.files._fast not built"),
]

POLICY = f"""
version = 1

[[allow]]
name = "web"
users = [{NOBODY}]
sockets = ["tcp:80", "tcp:443", "udp:53", "udp:547"]

[[allow]]
name = "IPv6 only"
users = [{NOBODY}]
sockets = ["tcp:8443"]
addresses = ["::"]

[[allow]]
name = "on the test device"
users = [{NOBODY}]
sockets = ["tcp:81", "udp:68"]
interfaces = ["fst*"]
"""


@pytest.fixture
def broker(start_broker: Callable[..., Any]) -> Iterator[Any]:
    with fresh_netns():
        ip("link", "add", "fst0", "type", "veth", "peer", "name", "fst1")
        ip("link", "set", "fst0", "up")
        ip("addr", "add", "fe80::7/64", "dev", "fst0", "nodad")
        yield start_broker(POLICY)


def twice(name: str, address: tuple[Any, ...], **kw: Any) -> tuple[dict[str, Any], ...]:
    """bind_privileged twice as nobody, each socket described and closed."""

    def child() -> tuple[dict[str, Any], ...]:
        out = []
        with Client(name) as c:
            for _ in range(2):
                with c.bind_privileged(address, **kw) as s:
                    out.append(describe(s))
        return tuple(out)

    got: tuple[dict[str, Any], ...] = run_as(NOBODY, NOGROUP, child)
    return got


CASES = [
    (("127.0.0.1", 80), {}),
    (("0.0.0.0", 443), {"backlog": 7, "reuse_port": True}),
    (("::", 80), {}),
    (("::1", 443), {"v6only": True}),
    (("::", 443), {"v6only": False, "backlog": 3}),
    (("127.0.0.1", 53), {"type": socket.SOCK_DGRAM}),
    (("::", 547), {"type": socket.SOCK_DGRAM, "v6only": True, "reuse_port": True}),
    (("0.0.0.0", 81), {"interface": "fst0"}),
    (("::", 68), {"type": socket.SOCK_DGRAM, "interface": "fst0"}),
]


@pytest.mark.parametrize(("address", "kw"), CASES)
def test_the_fast_socket_is_the_python_one(broker: Any, address: Any, kw: Any) -> None:
    before = status(broker.name)["fast_sockets"]
    first, second = twice(broker.name, address, **kw)
    assert status(broker.name)["fast_sockets"] == before + 1  # the second, in C
    assert first == second
    assert first["owner"] == (NOBODY, NOGROUP) and first["cloexec"]
    assert first["mark"] == 0 and first["priority"] == 0
    assert first["listening"] == (kw.get("type", socket.SOCK_STREAM) == socket.SOCK_STREAM)
    if "backlog" in kw:
        assert first["backlog"] == kw["backlog"]


def audit_records(broker: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(broker.audit).read_text().splitlines()]


def test_a_fast_socket_is_audited_as_a_python_one(broker: Any) -> None:
    twice(broker.name, ("::", 443), v6only=True, backlog=9)
    got = wait_for(
        lambda: (
            (r := [x for x in audit_records(broker) if x.get("request") == "socket"])
            and len(r) == 2
            and r
        )
    )
    drop = ("duration_us", "time", "time_iso", "seq")
    first, second = ({k: v for k, v in r.items() if k not in drop} for r in got)
    assert first == second
    assert first["decision"] == "allow" and first["rule"] == "web"
    assert first["address"] == "::" and first["port"] == 443 and first["v6only"] is True
    assert first["backlog"] == 9 and first["uid"] == NOBODY


def test_a_port_in_use_is_the_kernels_errno_from_either_path(broker: Any) -> None:
    def child() -> tuple[int, int]:
        with Client(broker.name) as c:
            c.bind_privileged(("127.0.0.1", 80)).close()  # recorded
            held = c.bind_privileged(("127.0.0.1", 80))  # fast
            try:
                c.bind_privileged(("127.0.0.1", 80))
            except OSError as exc:
                code = exc.errno
            else:
                raise AssertionError("a second listener on one port")
            held.close()
            with c.bind_privileged(("127.0.0.1", 80)) as again:  # fast again, nothing leaked
                return code, again.getsockname()[1]

    before = status(broker.name)
    assert run_as(NOBODY, NOGROUP, child) == (errno.EADDRINUSE, 80)
    after = status(broker.name)
    assert after["fast_sockets"] == before["fast_sockets"] + 2
    assert after["failed"] == before["failed"] + 1


def test_a_reload_takes_a_fast_grant_away(broker: Any) -> None:
    twice(broker.name, ("127.0.0.1", 443))
    loaded = status(broker.name)["policy_loaded"]
    broker.policy.write_text(POLICY.replace('"tcp:443", ', ""))
    broker.proc.send_signal(1)  # SIGHUP
    wait_for(lambda: status(broker.name)["policy_loaded"] != loaded)

    def child() -> str:
        with Client(broker.name) as c:
            try:
                c.bind_privileged(("127.0.0.1", 443)).close()
            except PolicyDenied as exc:
                return str(exc)
        return "allowed"

    assert "443" in run_as(NOBODY, NOGROUP, child)


def test_a_denial_and_a_zone_are_never_fast(broker: Any) -> None:
    def child() -> list[str]:
        out = []
        with Client(broker.name) as c:
            for _ in range(3):
                try:
                    c.bind_privileged(("127.0.0.1", 8443)).close()
                except PolicyDenied:
                    out.append("denied")
                with c.bind_privileged(("fe80::7%fst0", 547), socket.SOCK_DGRAM) as s:
                    host, _, _, scope = s.getsockname()
                    out.append(f"{host}%{socket.if_indextoname(scope)}")
                # Link-local on a device, no zone: the kernel scopes it (Python checks that).
                with c.bind_privileged(("fe80::7", 68), socket.SOCK_DGRAM, interface="fst0") as s:
                    host, _, _, scope = s.getsockname()
                    out.append(f"{host}%{socket.if_indextoname(scope)}")
        return out

    before = status(broker.name)["fast_sockets"]
    got = run_as(NOBODY, NOGROUP, child)
    assert got == ["denied", "fe80::7%fst0", "fe80::7%fst0"] * 3
    assert status(broker.name)["fast_sockets"] == before


def test_v6only_is_judged_as_asked_on_either_path(broker: Any) -> None:
    """`[::]` with v6only takes no IPv4, so a rule granting only "::" grants it;
    without v6only the same socket would take IPv4 too, and is denied."""

    def child() -> list[object]:
        out: list[object] = []
        with Client(broker.name) as c:
            for _ in range(2):
                try:
                    c.bind_privileged(("::", 8443)).close()
                except PolicyDenied as exc:
                    out.append("IPv4 too" in str(exc) and "v6only" in str(exc))
                with c.bind_privileged(("::", 8443), v6only=True) as s:
                    out.append(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        return out

    before = status(broker.name)["fast_sockets"]
    assert run_as(NOBODY, NOGROUP, child) == [True, 1, True, 1]
    assert status(broker.name)["fast_sockets"] == before + 1


def test_another_uid_never_gets_nobodys_answer(broker: Any) -> None:
    twice(broker.name, ("127.0.0.1", 80))

    def child() -> bool:
        with Client(broker.name) as c:
            try:
                c.bind_privileged(("127.0.0.1", 80)).close()
            except PolicyDenied:
                return False
        return True

    assert run_as(NOBODY - 1, NOGROUP - 1, child) is False


# ------------------------------------------------------ serve() on its own


@pytest.fixture
def native() -> Any:
    return fastpath.configure()


def _serve(native: Any, table: dict[Any, Any], req: proto.SocketRequest) -> Any:
    """One request through serve(), from a client socket pair, as uid 0."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel adds them
        a.sendmsg([proto.encode_request(req)])
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            got = native.serve(b.fileno(), 0, 0, table, (), mountinfo.fileno(), 10, 10, True)
        if got[0] == 2 and got[3]:
            for fd in got[3]:
                os.close(fd)
        if got[0] == 2 and got[2] is None:
            _, _, fds = _recv(a)
            for fd in fds:
                os.close(fd)
        return got


def _recv(sock: socket.socket) -> tuple[bytes, Any, list[int]]:
    msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds = [int.from_bytes(d[i : i + 4], "little") for _, _, d in anc for i in range(0, len(d), 4)]
    return msg, anc, fds


def _entry(text: str, **kw: Any) -> tuple[Any, Any]:
    req = proto.SocketRequest(1, text, **kw)
    made = fastsock.entry(req, parse_socket_target(text), proto.Result(rule="r"))
    assert made is not None
    return fastsock.key(req), made


def test_serve_makes_the_recorded_socket(native: Any) -> None:
    with fresh_netns():
        key, entry = _entry("tcp:127.0.0.1:80")
        got = _serve(native, {key: entry}, proto.SocketRequest(5, "tcp:127.0.0.1:80"))
        assert got[0] == 2 and got[1] == 1 and got[4] is entry[-1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (1, socket.SOCK_RAW),  # whatever the table says: never a raw socket
        (2, socket.IPPROTO_RAW),
        (2, socket.IPPROTO_UDP),  # a TCP type with UDP's protocol
        (6, -1),  # TCP that would not listen
        (9, 0),  # TCP without SO_REUSEADDR: not what the Python broker makes
        (0, socket.AF_UNIX),
        (3, b"\x7f\x00\x00"),  # an address of the wrong length
        (5, b"lo\x00x"),
        (5, b"x" * 16),  # longer than IFNAMSIZ allows
        (7, 1),  # v6only on IPv4
        (10, "not bytes"),
    ],
)
def test_serve_refuses_an_entry_it_may_not_make(native: Any, field: int, value: Any) -> None:
    with fresh_netns():
        key, entry = _entry("tcp:127.0.0.1:80")
        bad = (*entry[:field], value, *entry[field + 1 :])
        got = _serve(native, {key: bad}, proto.SocketRequest(5, "tcp:127.0.0.1:80"))
        assert got[0] == 0  # back to Python, as received
        assert proto.decode_request(got[1]) == proto.SocketRequest(5, "tcp:127.0.0.1:80")


def test_serve_finds_only_the_exact_request(native: Any) -> None:
    with fresh_netns():
        key, entry = _entry("tcp:127.0.0.1:80")
        for other in (
            proto.SocketRequest(5, "tcp:127.0.0.1:80", backlog=5),
            proto.SocketRequest(5, "tcp:127.0.0.1:80", reuse_port=True),
            proto.SocketRequest(5, "tcp:127.0.0.1:81"),
        ):
            assert _serve(native, {key: entry}, other)[0] == 0


# ------------------------------------------------------ the decoder


_requests = st.builds(
    proto.SocketRequest,
    st.integers(0, proto.MAX_ID),
    st.text(min_size=0, max_size=proto.MAX_TARGET_CHARS + 2),
    st.integers(0, proto.MAX_BACKLOG),
    st.sampled_from([None, True, False]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(_requests)
def test_the_fast_decoder_reads_what_the_codec_writes(req: proto.SocketRequest) -> None:
    try:
        data = proto.encode_request(req)
    except ValueError:
        return  # the codec refuses to write it
    got = fastpath.configure().decode_socket(data)
    if not req.target or len(req.target.encode()) > proto.MAX_TARGET_CHARS:
        assert got is None  # no real target is empty or past 128 bytes: Python's to judge
        return
    assert got == (req.id, fastsock.key(req))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | _requests.map(lambda r: proto.encode_request(r)[:-1]))
def test_the_fast_decoder_never_reads_more_than_the_codec(data: bytes) -> None:
    got = fastpath.configure().decode_socket(data)
    if got is None:
        return
    req = proto.decode_request(data)  # what the fast decoder read, the codec must read the same
    assert isinstance(req, proto.SocketRequest)
    assert (req.id, fastsock.key(req)) == got
