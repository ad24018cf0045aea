"""Attacks on the SOCKET fast path (broker/net/_fastsock.c, net/fastsock.py): can
the C code be made to hand over anything the Python broker (net/service.py,
net/sockets.py, policy/netdecide.py) would not?

Every integration test runs a real broker in a fresh network namespace and
asks as nobody (forked, tests/support/privs.py) or as root from the test
process. Each request that matters is asked several times on one
connection, so the first is judged in Python and the rest reach the C code
(`fast_sockets` in status says they did). What is checked is what the
kernel and the broker did: the fd's owner, what the socket is (bound,
listening, options), the errno, the broker's fd table, its fd budget, its
threads' filesystem ids, and its audit log. The native serve() is also
driven on its own, from socket pairs, for the paths a client cannot reach
at will (send failures, a full queue).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import random
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from privbroker import protocol as proto
from privbroker import unix
from privbroker.broker.files import fastpath
from privbroker.broker.net import fastsock
from privbroker.protocol.targets import parse_socket_target
from tests.adversarial._util import (
    TALLY,
    audit_records,
    broker_healthy,
    fd_count,
    outcome,
    raw_socket,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.support import sockinfo
from tests.support.netns import fresh_netns, ip
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.running import status

pytestmark = [
    pytest.mark.adversarial,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and uids"),
    pytest.mark.skipif(not fastpath.available(), reason="privbroker.broker.files._fast not built"),
]

_ids = itertools.count(1)
GROUP = 4343  # a group the group rule grants
OTHER_GID = 4344  # a primary gid of nobody's that no rule names
Ask = tuple[Any, ...]  # (target, backlog, v6only, reuse_port), trailing ones optional

POLICY = f"""
version = 1

[[deny]]
name = "never 127.0.0.9"
sockets = ["tcp:80"]
addresses = ["127.0.0.9"]

[[allow]]
name = "web"
users = [0, {NOBODY}]
sockets = ["tcp:80", "tcp:443", "udp:53"]

[[allow]]
name = "on the test devices"
users = [{NOBODY}]
sockets = ["tcp:81", "udp:68"]
interfaces = ["fst*"]

[[allow]]
name = "the group's port"
groups = [{GROUP}]
sockets = ["tcp:82", "udp:82"]
"""


@pytest.fixture
def ns() -> Iterator[None]:
    with fresh_netns():
        ip("link", "add", "fst0", "type", "veth", "peer", "name", "fst1")
        ip("link", "set", "fst0", "up")
        ip("addr", "add", "fe80::7/64", "dev", "fst0", "nodad")
        yield


@pytest.fixture
def broker(ns: None, launch: Callable[..., Any]) -> Any:
    return launch(POLICY)


# ------------------------------------------------------------------ helpers


def fast_count(b: Any) -> int:
    return int(status(b.name)["fast_sockets"])


def status_of(b: Any) -> dict[str, Any]:
    return status(b.name)


def encode(ask: Ask, rid: int | None = None) -> bytes:
    target, *opts = ask
    req = proto.SocketRequest(next(_ids) if rid is None else rid, target, *opts)
    return proto.encode_request(req)


def reply_of(s: socket.socket) -> tuple[proto.SocketReply | None, list[int]]:
    data, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 253, creds=True)
    if not data:
        unix.close_fds(fds)
        return None, []
    rep = proto.decode_reply(data)
    assert isinstance(rep, proto.SocketReply), rep
    assert len(fds) == (rep.result.errno == 0), (rep, fds)
    return rep, fds


def ask_on(s: socket.socket, ask: Ask) -> tuple[proto.Result, int | None]:
    """One SOCKET round trip: (result, fd or None)."""
    data = encode(ask)
    rid = msgpack.unpackb(data)[2]
    unix.send_message(s, data)
    rep, fds = reply_of(s)
    assert rep is not None, f"the broker closed the connection on {ask!r}"
    if rep.id != rid:
        unix.close_fds(fds)
        raise AssertionError(f"reply {rep.id} to request {rid}")
    return rep.result, (fds[0] if fds else None)


def warm(s: socket.socket, ask: Ask, times: int) -> None:
    """Ask `times` times on `s`, each answered with a socket (closed): the
    first judged in Python, the rest from the fast table."""
    for _ in range(times):
        res, fd = ask_on(s, ask)
        assert fd is not None, res
        os.close(fd)


def describe(fd: int) -> dict[str, Any]:
    """What the kernel says of a socket (and close it)."""
    with socket.socket(fileno=fd) as sock:
        return sockinfo.describe(sock)


def answers(name: str, asks: list[Ask], rounds: int) -> list[tuple[Any, ...]]:
    """On one connection, each ask `rounds` times: (ask, errno, denied, socket)."""
    out = []
    with raw_socket(name) as s:
        for ask in asks:
            for _ in range(rounds):
                res, fd = ask_on(s, ask)
                out.append((ask, res.errno, res.denied, None if fd is None else describe(fd)))
    return out


def fs_ids(pid: int) -> set[tuple[str, str]]:
    """(fsuid, fsgid) of each thread of pid."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            out.add((fields["Uid"].split()[3], fields["Gid"].split()[3]))
    return out


def reload_to(b: Any, text: str) -> None:
    before = status_of(b)["policy_loaded"]
    b.policy.write_text(text)
    b.proc.send_signal(1)
    assert wait_for(lambda: status_of(b)["policy_loaded"] != before, 15), b.log_text()[-2000:]


# ------------------------------------------------- the same as Python, always

# Spellings, options and refusals: each is asked three times on one connection.
ASKS: list[Ask] = [
    ("tcp:127.0.0.1:80",),
    ("tcp:127.0.0.1:080",),  # the same target, spelled otherwise
    ("tcp:127.0.0.1:00080",),
    ("tcp:127.0.0.9:80",),  # denied
    ("tcp:[::ffff:127.0.0.9]:80",),  # denied, as IPv4
    ("tcp:[::ffff:127.0.0.1]:80",),
    ("tcp:127.0.0.1:80", 1),
    ("tcp:127.0.0.1:80", proto.MAX_BACKLOG),
    ("tcp:127.0.0.1:80", 0, None, True),
    ("tcp:127.0.0.1:80", 0, True),  # v6only on IPv4: EINVAL
    ("tcp:[::]:443", 0, True),
    ("tcp:[::]:443", 0, False),
    ("tcp:[::]:443",),
    ("tcp:[::1]:443", 5, True, True),
    ("tcp:[0:0:0:0:0:0:0:1]:443", 0, True),
    ("udp:127.0.0.1:53",),
    ("udp:127.0.0.1:53", 5),  # a backlog on UDP: EINVAL
    ("udp:[::]:53", 0, True, True),
    ("tcp:0.0.0.0:81@fst0",),
    ("tcp:0.0.0.0:81@fst1",),
    ("tcp:0.0.0.0:81",),  # the rule binds to a device: denied without one
    ("tcp:0.0.0.0:81@lo",),  # not a device the rule names
    ("udp:[fe80::7]:68@fst0",),
    ("tcp:[fe80::7%fst0]:80",),
    ("tcp:127.0.0.1:80@lo",),
    ("tcp:127.0.0.1:８０",),  # fullwidth digits
    ("tcp:１２７.0.0.1:80",),
    ("TCP:127.0.0.1:80",),
    ("tcp:127.0.0.1:80 ",),
    ("tcp:127.0.0.1:80\x00",),
    ("tcp:127.0.0.1:80@lo\u200b",),
    ("tcp:127.0.0.1:80" + " " * 112,),  # 128 characters
    ("€" * 43,),  # 43 characters, 129 bytes
    ("tcp:127.0.0.1:82",),  # the group's: nobody has not the group
    ("icmp",),
    ("raw:icmp",),
]


@pytest.mark.timeout(240)
def test_the_fast_broker_answers_every_request_as_the_python_one(
    ns: None, launch: Callable[..., Any]
) -> None:
    """The same requests to a broker with the fast path and one without: the
    same errno, the same denial, and the very same socket (owner, kind,
    listening, bound address, device, options, backlog), every time."""
    fast = launch(POLICY)
    slow = launch(POLICY, "--no-fast-path")
    before = fast_count(fast)
    got_fast = run_as(NOBODY, NOGROUP, answers, fast.name, ASKS, 3, timeout=200)
    gained = fast_count(fast) - before
    got_slow = run_as(NOBODY, NOGROUP, answers, slow.name, ASKS, 3, timeout=200)
    assert fast_count(slow) == 0
    TALLY["fast sockets: compared with Python"] += gained
    for f, s in zip(got_fast, got_slow, strict=True):
        assert f == s, f"the fast broker answered {f}, the Python one {s}"
    handed = [a for a in got_fast if a[3] is not None]
    assert handed and all(a[3]["owner"] == (NOBODY, NOGROUP) for a in handed)
    assert all(a[3]["mark"] == 0 and a[3]["cloexec"] for a in handed)
    assert all(a[3]["listening"] == (a[3]["kind"][1] == socket.SOCK_STREAM) for a in handed)
    assert gained >= 20, f"only {gained} requests reached the C code"
    broker_healthy(fast)
    broker_healthy(slow)


def _owned(name: str) -> list[tuple[int, int]]:
    out = []
    with raw_socket(name) as s:
        for _ in range(3):
            res, fd = ask_on(s, ("udp:127.0.0.1:53",))
            assert fd is not None, res
            st = os.fstat(fd)
            out.append((st.st_uid, st.st_gid))
            os.close(fd)
    return out


def test_a_fast_socket_belongs_to_the_client_and_the_broker_stays_root(broker: Any) -> None:
    """Owned by the client's uid and primary gid (not a supplementary one, not
    root's); every thread of the broker has its filesystem ids back at 0."""
    before = fast_count(broker)
    got = run_as(NOBODY, OTHER_GID, _owned, broker.name, groups=(GROUP,))
    assert got == [(NOBODY, OTHER_GID)] * 3
    assert fast_count(broker) == before + 2
    assert fs_ids(broker.proc.pid) == {("0", "0")}
    broker_healthy(broker)


# ---------------------------------------------------------- other subjects


def _try(name: str, ask: Ask, rounds: int = 3) -> list[tuple[int, tuple[int, int] | None]]:
    out: list[tuple[int, tuple[int, int] | None]] = []
    with raw_socket(name) as s:
        for _ in range(rounds):
            res, fd = ask_on(s, ask)
            if fd is None:
                out.append((res.errno, None))
            else:
                st = os.fstat(fd)
                os.close(fd)
                out.append((0, (st.st_uid, st.st_gid)))
    return out


def test_a_group_grant_is_never_handed_to_a_subject_without_the_group(broker: Any) -> None:
    """The group rule's socket made hot by nobody with the group: nobody without
    it (same uid and gid), and another uid, are denied every time."""
    ask: Ask = ("tcp:127.0.0.1:82",)
    before = fast_count(broker)
    hot = run_as(NOBODY, NOGROUP, _try, broker.name, ask, groups=(GROUP,))
    assert hot == [(0, (NOBODY, NOGROUP))] * 3
    assert fast_count(broker) == before + 2
    assert run_as(NOBODY, NOGROUP, _try, broker.name, ask) == [(13, None)] * 3
    assert run_as(NOBODY - 1, NOGROUP, _try, broker.name, ask) == [(13, None)] * 3
    # nobody with the group as primary gid: allowed, and the socket is that gid's
    assert run_as(NOBODY, GROUP, _try, broker.name, ask) == [(0, (NOBODY, GROUP))] * 3
    assert fast_count(broker) == before + 4
    broker_healthy(broker)


def _send_with_creds(s: socket.socket, data: bytes, uid: int, gid: int) -> None:
    creds = struct.pack("iII", os.getpid(), uid, gid)
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])


def test_credentials_that_disagree_are_denied_not_served_fast(broker: Any) -> None:
    """Root's connection, hot; then the same request with SCM_CREDENTIALS of
    another uid, or only another gid: EACCES, no socket, nothing fast."""
    ask: Ask = ("tcp:127.0.0.1:80",)
    with raw_socket(broker.name) as s:
        warm(s, ask, 3)
        before = fast_count(broker)
        for uid, gid in [(NOBODY, 0), (0, NOGROUP), (NOBODY, NOGROUP)] * 3:
            _send_with_creds(s, encode(ask), uid, gid)
            rep, fds = reply_of(s)
            unix.close_fds(fds)
            assert rep is not None and rep.result.errno == 13 and rep.result.denied, rep
            assert not fds
        assert fast_count(broker) == before
        res, fd = ask_on(s, ask)  # and the connection's own credentials: fast again
        assert fd is not None, res
        os.close(fd)
        assert fast_count(broker) == before + 1
    broker_healthy(broker)


def test_a_reload_revokes_a_fast_grant_on_an_open_connection(broker: Any) -> None:
    """On one connection held across reloads: a deny added, a rule narrowed,
    a rule taken away; each time no socket, and nothing fast."""
    ask: Ask = ("tcp:127.0.0.1:443", 0, None, True)
    revoked = [
        POLICY + '\n[[deny]]\nname = "no 443"\nsockets = ["tcp:443"]\n',
        POLICY.replace('"tcp:443", ', ""),
        POLICY.replace("users = [0, ", "users = ["),
    ]
    with raw_socket(broker.name) as s:
        for text in revoked:
            reload_to(broker, POLICY)
            for _ in range(3):
                res, fd = ask_on(s, ask)
                assert fd is not None, res
                os.close(fd)
            before = fast_count(broker)
            reload_to(broker, text)
            for _ in range(3):
                res, fd = ask_on(s, ask)
                if fd is not None:
                    os.close(fd)
                assert (res.errno, fd) == (13, None), (text, res)
            assert fast_count(broker) == before
    broker_healthy(broker)


# ------------------------------------------------------------ the audit log


def _fast_then_report(name: str, n: int) -> int:
    with raw_socket(name) as s:
        for _ in range(n):
            res, fd = ask_on(s, ("tcp:[::1]:443", 3, True, False))
            assert fd is not None, res
            os.close(fd)
    return os.getpid()


def test_every_fast_socket_is_audited_with_the_connection_that_got_it(broker: Any) -> None:
    """Another process of the same subject is served from the first one's
    table at once; every socket has its allow record, with its own pid."""
    before = fast_count(broker)
    pid_a = run_as(NOBODY, NOGROUP, _fast_then_report, broker.name, 2)
    pid_b = run_as(NOBODY, NOGROUP, _fast_then_report, broker.name, 3)
    assert fast_count(broker) == before + 4  # all three of b's were fast

    def mine(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in recs if r.get("target") == "tcp:[::1]:443"]

    recs = mine(audit_records(broker, lambda r: len(mine(r)) >= 5, 15))
    assert [r["pid"] for r in recs] == [pid_a] * 2 + [pid_b] * 3, recs
    for r in recs:
        assert (r["decision"], r["rule"], r["uid"], r["gid"]) == ("allow", "web", NOBODY, NOGROUP)
        assert (r["address"], r["port"], r["backlog"], r["v6only"]) == ("::1", 443, 3, True)


# ------------------------------------------------------------ the wire


def _str8(text: bytes) -> bytes:
    return b"\xd9" + bytes([len(text)]) + text


def _str16(text: bytes) -> bytes:
    return b"\xda" + len(text).to_bytes(2, "big") + text


def _fix(text: bytes) -> bytes:
    return bytes([0xA0 | len(text)]) + text


T = b"tcp:127.0.0.1:80"
V, OP = bytes([proto.VERSION]), bytes([int(proto.Op.SOCKET)])


def msg(
    head: bytes = b"\x97",
    version: bytes = V,
    op: bytes = OP,
    rid: bytes = b"\x07",
    target: bytes = _fix(T),
    rest: bytes = b"\x00\xc0\xc2",
) -> bytes:
    """A SOCKET datagram from its encoded parts (backlog, v6only, reuse_port in `rest`)."""
    return head + version + op + rid + target + rest


def uint64(n: int) -> bytes:
    return b"\xcf" + n.to_bytes(8, "big")


# (what, datagram, served): True, a socket for request id 7 (or the id given);
# False, the connection is closed and nothing handed over.
ENCODINGS: list[tuple[str, bytes, bool | int]] = [
    ("plain", msg(), True),
    ("array16", msg(head=b"\xdc\x00\x07"), True),
    ("str8 target", msg(target=_str8(T)), True),
    ("str16 target", msg(target=_str16(T)), True),
    (
        "wide ints",
        msg(
            version=b"\xcc" + V,
            op=b"\xcd\x00" + OP,
            rid=uint64(7),
            rest=b"\xce\x00\x00\x00\x00\xc0\xc2",
        ),
        True,
    ),
    ("id 0", msg(rid=b"\x00"), 0),
    ("id MAX_ID", msg(rid=uint64(proto.MAX_ID)), proto.MAX_ID),
    ("id MAX_ID + 1", msg(rid=uint64(proto.MAX_ID + 1)), False),
    ("id negative", msg(rid=b"\xff"), False),
    ("id float", msg(rid=b"\xcb" + struct.pack(">d", 7.0)), False),
    ("trailing byte", msg(rest=b"\x00\xc0\xc2\xc0"), False),
    ("8 fields", msg(head=b"\x98", rest=b"\x00\xc0\xc2\xc0"), False),
    ("cut short", msg(rest=b"\x00\xc0"), False),
    ("v6only 0", msg(rest=b"\x00\x00\xc2"), False),
    ("reuse_port nil", msg(rest=b"\x00\xc0\xc0"), False),
    ("reuse_port 1", msg(rest=b"\x00\xc0\x01"), False),
    ("backlog true", msg(rest=b"\xc3\xc0\xc2"), False),
    ("backlog -1", msg(rest=b"\xff\xc0\xc2"), False),
    ("backlog 65536", msg(rest=b"\xce\x00\x01\x00\x00\xc0\xc2"), False),
    ("target bin", msg(target=b"\xc4" + bytes([len(T)]) + T), False),
    ("target bad utf-8", msg(target=_fix(T[:-1] + b"\xff")), False),
    ("target surrogate", msg(target=_fix(T + b"\xed\xa0\x80")), False),
]


def _encodings(name: str) -> list[tuple[str, str, int | None, int]]:
    """Make the target hot on one connection; then each encoding on its own
    connection: (what, outcome, reply id, fds)."""
    out = []
    with raw_socket(name) as s:
        for _ in range(3):
            res, fd = ask_on(s, ("tcp:127.0.0.1:80",))
            assert fd is not None, res
            os.close(fd)
    for what, data, _ in ENCODINGS:
        with raw_socket(name) as s:
            unix.send_message(s, data)
            kind, rep, nfds = outcome(s)
            out.append((what, kind, getattr(rep, "id", None), nfds))
    return out


def test_unusual_and_malformed_encodings_are_read_as_the_codec_reads_them(
    broker: Any,
) -> None:
    """After the request is hot: what msgpack-python also reads is served (the
    id echoed, up to MAX_ID); what the codec refuses closes the connection and
    hands nothing over, whatever the fast decoder makes of it."""
    got = run_as(NOBODY, NOGROUP, _encodings, broker.name)
    for (what, kind, rid, nfds), (_, _, served) in zip(got, ENCODINGS, strict=True):
        if served is False:
            assert (kind, nfds) == ("closed", 0), what
        else:
            want = 7 if served is True else served
            assert (kind, rid, nfds) == ("reply", want, 1), what
    broker_healthy(broker)


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    b = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b))
        b[i] = rng.choice([b[i] ^ (1 << rng.randrange(8)), rng.randrange(256)])
    return bytes(b)


def _what(fd: int) -> tuple[str, int, int]:
    """(address, port, listening) of a socket handed over (and close it)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        return ("not a socket", 0, 0)
    with socket.socket(fileno=fd) as sock:
        host, port = sock.getsockname()[:2]
        return host, port, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def _fuzz(name: str, seed: int, n: int) -> list[tuple[str, int, int]]:
    """Mutated hot requests, reconnecting after each closed connection:
    every socket handed over, as (address, port, listening)."""
    rng = random.Random(seed)
    seeds = [encode(a, 7) for a in [("tcp:127.0.0.1:80",), ("udp:127.0.0.1:53", 0, None, True)]]
    handed = []
    s = raw_socket(name)
    try:
        for data in seeds * 3:
            unix.send_message(s, data)
            unix.close_fds(reply_of(s)[1])
        for _ in range(n):
            data = _mutate(rng, seeds)
            try:
                unix.send_message(s, data)
            except (BrokenPipeError, ConnectionResetError):  # closed after an ERROR reply
                s.close()
                s = raw_socket(name)
                unix.send_message(s, data)
            try:
                data, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 253, creds=True)
            except (ConnectionResetError, BrokenPipeError):
                data, fds = b"", []
            handed += [_what(fd) for fd in fds]
            if not data:
                s.close()
                s = raw_socket(name)
    finally:
        s.close()
    return handed


@pytest.mark.timeout(180)
def test_mutated_hot_requests_never_get_a_socket_the_policy_does_not_grant(
    broker: Any,
) -> None:
    """Random byte mutations of two hot requests: the broker lives, and every
    socket it handed over is one nobody may have (tcp 80 listening but not on
    127.0.0.9, tcp 443 listening, udp 53 bound), and its fd table is back
    where it was."""
    baseline = stable_fd_count(broker.proc.pid)
    handed = run_as(NOBODY, NOGROUP, _fuzz, broker.name, 1234, 300, timeout=170)
    TALLY["fast sockets: mutated requests"] += 600
    for host, port, listening in handed:
        assert (port, bool(listening)) in {(80, True), (443, True), (53, False)}, handed
        assert (host, port) not in {("127.0.0.9", 80), ("::ffff:127.0.0.9", 80)}, handed
    assert settle_fds(broker.proc.pid, baseline) <= baseline
    broker_healthy(broker)


# ------------------------------------------------------------ fds and leaks


def _in_use(name: str, n: int) -> list[int]:
    ask: Ask = ("udp:127.0.0.1:53",)
    with raw_socket(name) as s:
        for _ in range(3):
            res, fd = ask_on(s, ask)
            assert fd is not None, res
            os.close(fd)
        res, fd = ask_on(s, ask)  # held while the same request is asked again
        assert fd is not None, res
        with socket.socket(fileno=fd):
            return [ask_on(s, ask)[0].errno for _ in range(n)]


def test_a_port_in_use_is_refused_by_both_paths_with_nothing_left_open(broker: Any) -> None:
    """EADDRINUSE for a hot request, many times: the errno every time, no
    socket, the broker's fd table unchanged."""
    baseline = stable_fd_count(broker.proc.pid)
    got = run_as(NOBODY, NOGROUP, _in_use, broker.name, 200)
    assert got == [98] * 200  # EADDRINUSE
    assert settle_fds(broker.proc.pid, baseline) <= baseline
    broker_healthy(broker)


def _on_device(name: str) -> list[int]:
    out = []
    with raw_socket(name) as s:
        for _ in range(3):
            res, fd = ask_on(s, ("tcp:0.0.0.0:81@fst0",))
            out.append(res.errno)
            if fd is not None:
                os.close(fd)
    return out


def test_a_deleted_device_is_enodev_and_a_new_one_of_that_name_is_served(
    broker: Any,
) -> None:
    baseline = stable_fd_count(broker.proc.pid)
    assert run_as(NOBODY, NOGROUP, _on_device, broker.name) == [0, 0, 0]
    ip("link", "del", "fst0")
    before = fast_count(broker)
    assert run_as(NOBODY, NOGROUP, _on_device, broker.name) == [19, 19, 19]  # ENODEV
    assert fast_count(broker) == before
    ip("link", "add", "fst0", "type", "veth", "peer", "name", "fst1")
    assert run_as(NOBODY, NOGROUP, _on_device, broker.name) == [0, 0, 0]
    assert settle_fds(broker.proc.pid, baseline) <= baseline
    broker_healthy(broker)


def _connect(name: str) -> socket.socket:
    """raw_socket, waiting while the broker's listen backlog is full."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return raw_socket(name)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _hang_ups(name: str, n: int, ask: Ask) -> None:
    with raw_socket(name) as s:
        for _ in range(3):
            res, fd = ask_on(s, ask)
            assert fd is not None, res
            os.close(fd)
    for i in range(n):
        s = _connect(name)
        unix.send_message(s, encode(ask))
        if i % 2:
            s.shutdown(socket.SHUT_RD)  # the reply cannot be queued to it
        s.close()


def test_clients_that_hang_up_mid_request_leave_no_fd(broker: Any) -> None:
    """Connect, send a hot request, close at once (or shut down reading first),
    many times: the broker's fd table and its unread count return to where
    they were, and it still serves."""
    baseline = stable_fd_count(broker.proc.pid)
    ask: Ask = ("udp:[::]:53", 0, True, True)
    run_as(NOBODY, NOGROUP, _hang_ups, broker.name, 300, ask, timeout=120)
    assert settle_fds(broker.proc.pid, baseline) <= baseline, fd_count(broker.proc.pid)
    assert wait_for(lambda: status_of(broker)["fds_unread_by_clients"] == 0, 15)
    assert run_as(NOBODY, NOGROUP, _try, broker.name, ask, 1) == [(0, (NOBODY, NOGROUP))]
    broker_healthy(broker)


def _pile_up(name: str, conns: int, ready_w: int, release_r: int, then: str) -> dict[str, int]:
    """As nobody, on `conns` connections: make a UDP reuse_port socket hot,
    then send it without reading until the kernel says stop; on release, read
    every reply (checking each socket) or hang up."""
    ask: Ask = ("udp:127.0.0.1:53", 0, None, True)
    socks = [raw_socket(name) for _ in range(conns)]
    for s in socks:
        for _ in range(3):
            res, fd = ask_on(s, ask)
            assert fd is not None, res
            os.close(fd)
        s.setblocking(False)
    data = encode(ask, 9)
    sent = dict.fromkeys(socks, 0)
    deadline = time.monotonic() + 10
    for s in socks:
        while sent[s] < 2000 and time.monotonic() < deadline:
            try:
                unix.send_message(s, data)
            except BlockingIOError:
                if not select.select([], [s], [], 0.3)[1]:
                    break
                continue
            sent[s] += 1
    os.write(ready_w, b"r")
    select.select([release_r], [], [], 60)
    read = dict.fromkeys(socks, 0)
    bad = 0
    while then == "read" and read != sent:
        ready = select.select([s for s in socks if read[s] < sent[s]], [], [], 15)[0]
        assert ready, f"replies stopped: {list(read.values())} of {list(sent.values())}"
        for s in ready:
            s.setblocking(True)
            rep, fds = reply_of(s)
            s.setblocking(False)
            assert rep is not None and rep.id == 9 and len(fds) == 1, rep
            with socket.socket(fileno=fds[0]) as got:
                st = os.fstat(got.fileno())
                if (st.st_uid, got.getsockname(), got.type) != (
                    NOBODY,
                    ("127.0.0.1", 53),
                    socket.SOCK_DGRAM,
                ):
                    bad += 1
            read[s] += 1
    for s in socks:
        s.close()
    return {"sent": sum(sent.values()), "read": sum(read.values()), "bad": bad}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("then", ["read", "hang-up"])
def test_unread_fast_sockets_stay_within_the_fd_budget(
    ns: None, launch: Callable[..., Any], then: str
) -> None:
    """Three connections pipeline a hot socket request and read nothing: the
    fds in flight to the uid never pass the budget (250 under RLIMIT_NOFILE
    512), the fast path does most of the work, the broker's own fd table
    stays small; once read (or hung up), everything returns to zero."""
    b = launch(POLICY, nofile=512)
    baseline = stable_fd_count(b.proc.pid)
    fast0 = fast_count(b)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    unread: list[int] = []
    held: list[int] = []

    def sample() -> None:
        unread.append(int(status_of(b)["fds_unread_by_clients"]))
        held.append(fd_count(b.proc.pid))

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(
                run_as, NOBODY, NOGROUP, _pile_up, b.name, 3, ready_w, release_r, then,
                timeout=120,
            )  # fmt: skip
            while not select.select([ready_r], [], [], 0.05)[0]:
                assert not job.done(), job.result()
                sample()
            for _ in range(10):
                sample()
                time.sleep(0.05)
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    fast = fast_count(b) - fast0
    TALLY["fast sockets: unread replies"] += stats["sent"]
    assert max(unread) <= proto.MAX_BATCH, f"{max(unread)} fds in flight to one uid"
    assert unread[-1] == proto.MAX_BATCH, f"the budget was never reached: {unread[-10:]}"
    assert fast >= proto.MAX_BATCH, f"only {fast} were fast"
    assert max(held) <= baseline + 3 * 2 + 6, f"the broker held {max(held)} (of {baseline})"
    assert wait_for(lambda: status_of(b)["fds_unread_by_clients"] == 0, 15), status_of(b)
    if then == "read":
        assert stats["read"] == stats["sent"] > proto.MAX_BATCH and stats["bad"] == 0, stats
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


# ------------------------------------------------------- serve() on its own


@pytest.fixture
def native() -> Any:
    return fastpath.configure()


def _thread_fs_ids() -> tuple[str, str]:
    with open("/proc/thread-self/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return fields["Uid"].split()[3], fields["Gid"].split()[3]


def _table(text: str, **kw: Any) -> dict[Any, Any]:
    req = proto.SocketRequest(1, text, **kw)
    made = fastsock.entry(req, parse_socket_target(text), proto.Result(rule="r"))
    assert made is not None
    return {fastsock.key(req): made}


def _own_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def _pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        yield a, b


def _serve_as(native: Any, b: socket.socket, table: dict[Any, Any], uid: int, gid: int) -> Any:
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        return native.serve(b.fileno(), uid, gid, table, (), mountinfo.fileno(), 10, 10, True)


def test_serve_makes_it_as_the_client_and_puts_root_back_on_every_path(native: Any) -> None:
    """serve() for uid/gid nobody (the request carrying nobody's credentials):
    made, refused by the kernel (EADDRINUSE), refused for a missing device:
    the thread's fsuid/fsgid are 0 after each, the socket made is nobody's,
    and no fd is left open in this process."""
    with fresh_netns():
        ip("link", "add", "fsx0", "type", "veth", "peer", "name", "fsx1")
        tables = {
            "ok": _table("tcp:127.0.0.1:80"),
            "dev": _table("tcp:127.0.0.1:81@fsx0"),
        }
        ip("link", "del", "fsx0")
        fds0 = _own_fds()
        with _pair() as (a, b):
            _send_with_creds(a, encode(("tcp:127.0.0.1:80",), 5), NOBODY, NOGROUP)
            got = _serve_as(native, b, tables["ok"], NOBODY, NOGROUP)
            assert _thread_fs_ids() == ("0", "0")
            assert got[0] == 2 and got[2] is None, got
            rep, fds = reply_of(a)
            assert rep is not None and rep.id == 5 and len(fds) == 1
            held = socket.socket(fileno=fds[0])
            st = os.fstat(held.fileno())
            assert (st.st_uid, st.st_gid) == (NOBODY, NOGROUP)
            try:
                for table, text in [(tables["ok"], "tcp:127.0.0.1:80"),
                                    (tables["dev"], "tcp:127.0.0.1:81@fsx0")]:  # fmt: skip
                    _send_with_creds(a, encode((text,), 6), NOBODY, NOGROUP)
                    got = _serve_as(native, b, table, NOBODY, NOGROUP)
                    assert _thread_fs_ids() == ("0", "0")
                    assert got[0] == 0, got  # back to Python, as received
            finally:
                held.close()
        assert _own_fds() == fds0


@pytest.mark.parametrize("how", ["peer closed", "queue full"])
def test_serve_gives_an_unsent_socket_to_its_caller_and_nothing_else(native: Any, how: str) -> None:
    """When the reply cannot be sent (the client closed; its queue is full),
    serve() returns the reply and exactly one fd, a listening socket of the
    client's; nothing else stays open."""
    with fresh_netns():
        table = _table("tcp:127.0.0.1:80", backlog=4)
        fds0 = _own_fds()
        with _pair() as (a, b):
            if how == "queue full":
                b.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        b.send(b"x" * 4096)
            _send_with_creds(a, encode(("tcp:127.0.0.1:80", 4), 8), NOBODY, NOGROUP)
            if how == "peer closed":
                a.shutdown(socket.SHUT_RDWR)
            got = _serve_as(native, b, table, NOBODY, NOGROUP)
            assert _thread_fs_ids() == ("0", "0")
            assert got[0] == 2 and got[1] == 1 and isinstance(got[2], bytes), got
            assert isinstance(got[3], list) and len(got[3]) == 1, got
            rep = proto.decode_reply(got[2])
            assert isinstance(rep, proto.SocketReply) and rep.id == 8 and rep.result.errno == 0
            with socket.socket(fileno=got[3][0]) as made:
                st = os.fstat(made.fileno())
                assert (st.st_uid, st.st_gid) == (NOBODY, NOGROUP)
                assert made.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                assert made.getsockname() == ("127.0.0.1", 80)
        assert _own_fds() == fds0


def test_serve_over_the_budget_makes_nothing(native: Any) -> None:
    """No room in the fd budget (and replies unread): back to Python, no socket
    made (the port stays free), no fd open."""
    with fresh_netns():
        table = _table("udp:127.0.0.1:53")
        fds0 = _own_fds()
        with _pair() as (a, b):
            b.send(b"unread")  # SIOCOUTQ is not 0: the earlier replies are not read
            _send_with_creds(a, encode(("udp:127.0.0.1:53",), 3), NOBODY, NOGROUP)
            with open("/proc/self/mountinfo", "rb") as mi:
                got = native.serve(b.fileno(), NOBODY, NOGROUP, table, (), mi.fileno(), 0, 1, True)
            assert got[0] == 0, got
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 53))  # nothing holds the port
        assert _own_fds() == fds0


def test_a_fast_socket_never_joins_another_uids_reuse_port_group(broker: Any) -> None:
    """Both uids made a UDP reuse_port request hot; while root holds one (made
    in C), nobody's same request is EADDRINUSE every time (the kernel keeps
    reuse_port groups to one owner: the sockets really are each uid's), and
    served once root lets go."""
    ask: Ask = ("udp:127.0.0.1:53", 0, None, True)
    assert run_as(NOBODY, NOGROUP, _try, broker.name, ask) == [(0, (NOBODY, NOGROUP))] * 3
    with raw_socket(broker.name) as s:
        warm(s, ask, 2)
        before = fast_count(broker)
        res, fd = ask_on(s, ask)
        assert fd is not None and fast_count(broker) == before + 1, res
        with socket.socket(fileno=fd) as held:
            assert os.fstat(held.fileno()).st_uid == 0
            assert run_as(NOBODY, NOGROUP, _try, broker.name, ask) == [(98, None)] * 3
    assert run_as(NOBODY, NOGROUP, _try, broker.name, ask) == [(0, (NOBODY, NOGROUP))] * 3
    broker_healthy(broker)
