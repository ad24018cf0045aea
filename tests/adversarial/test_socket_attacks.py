"""Attacks on SOCKET (invariants 4, 5, 6, 9, 11, 13), as any local user, on a real broker.

Every test makes a fresh network namespace and starts the broker inside it;
nothing leaves the namespace. Clients speak the raw protocol from forked
children that dropped to nobody (tests/support/privs.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import operator
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from privbroker import protocol as proto
from privbroker import unix
from tests.adversarial._util import (
    as_nobody,
    audit_records,
    broker_healthy,
    outcome,
    raw_socket,
    stable_fd_count,
    wait_for,
)
from tests.support.netns import fresh_netns, ip
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = [
    pytest.mark.adversarial,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and uids"),
]
_ids = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)
SO_MARK, IP_TRANSPARENT = 36, 19
NET_CAPS, CAP_SYS_ADMIN = (10, 12, 13), 21  # NET_BIND_SERVICE, NET_ADMIN, NET_RAW


@pytest.fixture
def ns() -> Iterator[None]:
    with fresh_netns(ping_group_range="0 0"):
        yield


def make_d0() -> str:
    """A device d0 with fe80::1 (one end of a veth pair kept in the namespace)."""
    ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ip("link", "set", "d0", "up")
    ip("addr", "add", "fe80::1/64", "dev", "d0", "nodad")
    return "d0"


@pytest.fixture
def d0(ns: None) -> str:
    return make_d0()


def policy(*rules: str) -> str:
    return "version = 1\n" + "\n".join(rules)


def allow(name: str, sockets: str, extra: str = "", kind: str = "allow") -> str:
    who = f"users = [{NOBODY}]" if kind == "allow" else ""
    return f'[[{kind}]]\nname = "{name}"\n{who}\nsockets = {sockets}\n{extra}\n'


def deny(name: str, sockets: str, extra: str = "") -> str:
    return allow(name, sockets, extra, "deny")


def ask(s: socket.socket, target: str, backlog: int = 0, v6only: bool | None = None,
        reuse_port: bool = False) -> tuple[proto.Result, int | None]:  # fmt: skip
    """One SOCKET round trip: (result, fd or None)."""
    rid = next(_ids)
    req = proto.SocketRequest(rid, target, backlog, v6only, reuse_port)
    unix.send_message(s, proto.encode_request(req))
    data, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 253, creds=True)
    assert data, f"broker closed the connection on {target!r}"
    rep = proto.decode_reply(data)
    if not (isinstance(rep, proto.SocketReply) and rep.id == rid):
        unix.close_fds(fds)
        raise AssertionError(f"unexpected reply {rep!r} to {target!r}")
    assert len(fds) == (rep.result.errno == 0), (rep, fds)
    return rep.result, (fds[0] if fds else None)


def outcomes(name: str, cases: list[tuple[Any, ...]]) -> list[tuple[str, int, bool, str]]:
    """In a child as nobody: (target, errno, denied, fd-closed) per case, on one connection."""

    def run() -> list[tuple[str, int, bool, str]]:
        out = []
        with raw_socket(name) as s:
            for target, *opts in cases:
                res, fd = ask(s, target, *opts)
                unix.close_fds([fd] if fd is not None else [])
                out.append((target, res.errno, res.denied, res.reason))
        return out

    return as_nobody(run)


def threads(pid: int, main_only: bool = False) -> list[dict[str, str]]:
    """/proc/PID/task/TID/status of each thread (ids and capabilities are per thread)."""
    out = []
    for tid in [str(pid)] if main_only else os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out.append(dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line))
    return out


def fs_ids_and_caps(pid: int) -> set[tuple[str, str, bool]]:
    return {(t["Uid"].split()[3], t["Gid"].split()[3], t["CapEff"] == t["CapPrm"])
            for t in threads(pid)}  # fmt: skip


def caps(pid: int, key: str, main_only: bool = False) -> int:
    """The union of `key` over the threads of pid."""
    return functools.reduce(operator.or_, (int(t[key], 16) for t in threads(pid, main_only)))


def sockets_of(uid: int) -> int:
    """How many UDP sockets in this namespace belong to uid (the kernel's uid column)."""
    n = 0
    for table in ("udp", "udp6"):
        with open(f"/proc/net/{table}") as f:
            n += sum(1 for line in list(f)[1:] if int(line.split()[7]) == uid)
    return n


# ----------------------------------------------------------- address spellings


def test_no_spelling_walks_around_an_ipv4_deny(ns: None, launch: Any) -> None:
    b = launch(policy(
        deny("not the loopback", '["tcp:80"]', 'addresses = ["127.0.0.0/8"]'),
        allow("web", '["tcp:80"]'),
    ))  # fmt: skip
    spellings = ["tcp:127.0.0.1:80", "tcp:0.0.0.0:80", "tcp:[::]:80", "tcp:[::ffff:127.0.0.1]:80",
                 "tcp:[::ffff:7f00:1]:80", "tcp:[::ffff:0.0.0.0]:80", "tcp:[::FFFF:127.0.0.1]:80",
                 "tcp:[0:0:0:0:0:ffff:7f00:1]:80", "tcp:127.000.0.1:80", "tcp:127.1:80",
                 "tcp:2130706433:80", "tcp:[::ffff:127.0.0.1%1]:80", "tcp:[::]:080"]  # fmt: skip
    cases: list[tuple[Any, ...]] = [(t,) for t in spellings]
    cases += [("tcp:[::]:80", 0, True), ("tcp:[::ffff:127.0.0.1]:80", 0, False)]
    got = outcomes(b.name, cases)
    handed = [(t, r) for t, e, _, r in got if e == 0]
    assert not handed, f"sockets handed over despite the deny: {handed}"
    assert all(d for t, e, d, _ in got if e == errno.EACCES), got
    broker_healthy(b)


def test_ipv6_any_does_not_grant_the_ipv4_wildcard(ns: None, launch: Any) -> None:
    """A rule for IPv4 127.0.0.1 and IPv6 anywhere: "::" without v6only is 0.0.0.0 too."""
    b = launch(policy(allow("v4 loopback, v6 all", '["tcp:80"]',
                            'addresses = ["127.0.0.1", "::/0"]')))  # fmt: skip

    def run() -> tuple[int, int | None]:
        with raw_socket(b.name) as s:
            res, fd = ask(s, "tcp:[::]:80")
            if fd is None:
                return res.errno, None
            with socket.socket(fileno=fd) as srv:
                return 0, srv.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)

    code, v6only = as_nobody(run)
    assert code != 0 or v6only == 1, (
        "tcp:[::]:80 handed over dual-stack: it receives on every IPv4 address, "
        "which the rule (127.0.0.1 for IPv4) does not grant"
    )


# ---------------------------------------------------------- what is handed over


def test_a_listening_socket_cannot_connect_out_from_the_privileged_port(
    ns: None, launch: Any
) -> None:
    """Un-listening it (SHUT_RD, connect(AF_UNSPEC)) must not leave a bound socket
    that connects out from port 80 (invariant 11's reason for listening)."""
    b = launch(policy(allow("web", '["tcp:80"]')))
    unspec = struct.pack("H14x", socket.AF_UNSPEC)

    def run() -> list[tuple[str, int]]:
        out = []
        with raw_socket(b.name) as s:
            for target, far in [("tcp:127.0.0.1:80", "127.0.0.1"), ("tcp:[::]:80", "::1")]:
                fd = ask(s, target)[1]
                assert fd is not None
                with socket.socket(fileno=fd) as sock:
                    try:
                        if "::" in target and _libc.connect(fd, unspec, len(unspec)):
                            raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
                        sock.shutdown(socket.SHUT_RD)
                        sock.settimeout(5)
                        sock.connect((far, 9000))
                        out.append((target, 0))
                    except OSError as exc:
                        out.append((target, exc.errno or -1))
        return out

    v6 = socket.create_server(("::1", 9000), family=socket.AF_INET6)
    with socket.create_server(("127.0.0.1", 9000)), v6:
        got = as_nobody(run)
    assert all(code != 0 for _, code in got), f"connected out from port 80: {got}"


def test_owned_by_the_client_and_no_reuseport_hijack(ns: None, launch: Any) -> None:
    b = launch(policy(allow("dns", '["udp:53", "tcp:80"]')))
    root_dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    root_dns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    root_dns.bind(("127.0.0.1", 53))

    def run() -> tuple[int, tuple[int, int]]:
        with raw_socket(b.name) as s:
            hijack, fd = ask(s, "udp:127.0.0.1:53", reuse_port=True)
            unix.close_fds([fd] if fd is not None else [])
            res, fd = ask(s, "tcp:127.0.0.1:80")
        assert fd is not None, res
        st = os.fstat(fd)
        os.close(fd)
        return hijack.errno, (st.st_uid, st.st_gid)

    with root_dns:
        hijack, owner = as_nobody(run)
    assert hijack == errno.EADDRINUSE, "joined root's SO_REUSEPORT group on udp:53"
    assert owner == (NOBODY, NOGROUP)


def test_no_option_needing_a_capability_and_the_device_sticks(ns: None, launch: Any) -> None:
    b = launch(policy(allow("ping", '["raw:icmp", "udp:20000-20999"]', 'interfaces = ["lo"]')))
    opts = [(socket.SOL_SOCKET, SO_MARK, 1), (socket.SOL_SOCKET, socket.SO_PRIORITY, 7),
            (socket.IPPROTO_IP, IP_TRANSPARENT, 1), (socket.IPPROTO_IP, socket.IP_HDRINCL, 1),
            (socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b""),
            (socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"d1")]  # fmt: skip
    others = ["raw:icmp", "udp:127.0.0.1:20001", "raw:255@lo", "raw:0@lo", "raw6:255@lo",
              "raw:256@lo", "raw:tcp@lo", "udp:127.0.0.1:21000@lo"]  # fmt: skip

    def run() -> tuple[list[Any], list[Any], list[Any]]:
        on, set_, refused = [], [], []
        with raw_socket(b.name) as s:
            for target in ("raw:icmp@lo", "udp:127.0.0.1:20001@lo"):
                res, fd = ask(s, target)
                assert fd is not None, (target, res)
                with socket.socket(fileno=fd) as k:
                    on += [(target, o) for lvl, o, _ in opts[:4] if k.getsockopt(lvl, o)]
                    for lvl, o, value in opts[:3] + opts[4:]:  # HDRINCL: the raw grant allows it
                        with contextlib.suppress(OSError):
                            k.setsockopt(lvl, o, value)
                            set_.append((target, o, value))
            refused = [(t, ask(s, t)[0].errno) for t in others]
        return on, set_, refused

    on, set_, refused = as_nobody(run)
    assert on == [] and set_ == [], f"options needing a capability: set {on}, settable {set_}"
    assert [t for t, code in refused if code == 0] == [], refused


def test_zone_and_device_that_disagree_never_hand_over(d0: str, launch: Any) -> None:
    b = launch(policy(deny("not on d0", '["tcp:80"]', 'interfaces = ["d0"]'),
                      allow("web", '["tcp:80", "udp:547"]')))  # fmt: skip
    idx = socket.if_nametoindex(d0)
    targets = [f"tcp:[fe80::1%{d0}]:80", f"tcp:[fe80::1%{idx}]:80", f"tcp:[fe80::1%{d0}]:80@lo",
               f"tcp:[fe80::1%{idx}]:80@lo", f"udp:[fe80::1%{d0}]:547@lo",
               f"udp:[fe80::1%{idx}]:547@lo", "tcp:[fe80::1]:80@lo"]  # fmt: skip
    got = outcomes(b.name, [(t,) for t in targets])
    assert [t for t, e, _, _ in got if e == 0] == [], got
    broker_healthy(b)


# ------------------------------------------------------ broker state and errors


def test_fs_ids_never_leak_and_errors_leak_no_fd(launch: Any) -> None:
    """socket() failing inside the setfsuid block (ICMP outside ping_group_range),
    kernel errors after it (EADDRINUSE, ENODEV, EPROTO), refusals: no fd stays in
    the broker and every thread is back to fs ids 0 with its capabilities."""
    with fresh_netns(ping_group_range="1 0"):
        make_d0()
        b = launch(policy(allow("all", '["tcp:80", "udp:20000-20999", "icmp", "icmp6"]')))
        taken = socket.create_server(("127.0.0.1", 80))
        bad = [("icmp",), ("icmp6",), ("tcp:127.0.0.1:80",), ("udp:127.0.0.1:20001@nosuch",),
               ("tcp:[fe80::1%d0]:80@lo",), ("tcp:[fe80::1%4294967295]:80",),
               ("udp:127.0.0.1:20001", 5), ("tcp:127.0.0.1:80", 0, True), ("tun:x",),
               ("tcp:[::1]:81",), ("udp:192.0.2.1:20001",), ("icmp", 0, None, True)]  # fmt: skip
        outcomes(b.name, [("udp:127.0.0.1:20002",)])  # warm up
        base = stable_fd_count(b.proc.pid)
        for _ in range(20):
            got = outcomes(b.name, bad)
            assert all(e != 0 for _, e, _, _ in got), got
        assert stable_fd_count(b.proc.pid) == base
        assert fs_ids_and_caps(b.proc.pid) == {("0", "0", True)}
        assert outcomes(b.name, [("udp:127.0.0.1:20003",)])[0][1] == 0
        assert fs_ids_and_caps(b.proc.pid) == {("0", "0", True)}
        taken.close()
        broker_healthy(b)


def test_malformed_socket_messages_close_only_their_connection(ns: None, launch: Any) -> None:
    b = launch(policy(allow("web", '["tcp:80", "udp:20000-20999"]')))
    t = "tcp:127.0.0.1:80"
    bodies = [[123, 0, None, False], [t, -1, None, False], [t, 65536, None, False],
              [t, 0, "yes", False], [t, 0, None, 1], [t, 0, None], [t, 0, None, False, 0],
              ["t" * 129, 0, None, False], [t.encode(), 0, None, False], [t, True, None, False],
              [[t], 0, None, False], [t, 0.0, None, False]]  # fmt: skip

    def run() -> list[str]:
        with raw_socket(b.name) as bystander:
            out = []
            for body in bodies:
                with raw_socket(b.name) as s:
                    unix.send_message(s, msgpack.packb([1, 5, 7, *body], use_bin_type=True))
                    out.append(outcome(s)[0])
            res, fd = ask(bystander, "udp:127.0.0.1:20001")
            unix.close_fds([fd] if fd is not None else [])
            return [*out, str(res.errno)]

    assert as_nobody(run) == ["closed"] * len(bodies) + ["0"]
    semantic = ["tcp:127.0.0.1:0", "tcp:127.0.0.1", "tcp:[fe80::1]:80", "tcp:::1:80", "tun:x",
                "tcp:127.0.0.1:80@a/b", "tcp:127.0.0.1:80@" + "x" * 16, "raw:ipv6-icmp", "",
                "tcp:[::1%lo]:80", "udp:[fe80::1%0]:20001", "tcp:127.0.0.1:65536"]  # fmt: skip
    opts = [("udp:127.0.0.1:20001", 5), ("tcp:127.0.0.1:80", 0, True)]
    got = outcomes(b.name, [(t,) for t in semantic] + opts)
    assert [(t, e) for t, e, d, _ in got if e != errno.EINVAL or d] == [], got
    broker_healthy(b)


def test_credentials_that_differ_only_in_gid_are_denied(ns: None, launch: Any) -> None:
    b = launch(policy(allow("web", '["tcp:80"]')))
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def connect_and_pass() -> None:
        with raw_socket(b.name) as s:
            unix.send_message(there, b"x", [s.fileno()])

    as_nobody(connect_and_pass)
    _, fds, _ = unix.recv_message(here, 16, 1)
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(10)  # the child's timeout left the description non-blocking

    def use() -> tuple[int, bool]:
        res, fd = ask(conn, "tcp:127.0.0.1:80")
        unix.close_fds([fd] if fd is not None else [])
        return res.errno, res.denied

    try:  # the same uid, another gid: denied; the same ids: served
        assert run_as(NOBODY, 4242, use) == (errno.EACCES, True)
        assert run_as(NOBODY, NOGROUP, use) == (0, False)
    finally:
        conn.close()
        here.close()
        there.close()
    recs = audit_records(b, lambda r: sum(x.get("request") == "socket" for x in r) >= 2)
    assert [r["decision"] for r in recs if r.get("request") == "socket"][:2] == ["deny", "allow"]


def test_explain_of_a_socket_is_root_only(ns: None, launch: Any) -> None:
    b = launch(policy(allow("web", '["tcp:80"]')))

    def run() -> tuple[str, Any]:
        with raw_socket(b.name) as s:
            req = proto.ExplainRequest(9, 0, (0,), "tcp:[::]:80", proto.Access.READ)
            unix.send_message(s, proto.encode_request(req))
            kind, reply, _ = outcome(s)
            return kind, reply

    kind, reply = as_nobody(run)
    assert kind == "reply" and isinstance(reply, proto.ErrorReply), reply
    assert reply.errno == errno.EPERM


def test_a_denied_port_tells_nothing_about_it(ns: None, launch: Any) -> None:
    b = launch(policy(allow("web", '["tcp:80"]')))
    v6 = socket.create_server(("::1", 9998), family=socket.AF_INET6)
    with socket.create_server(("127.0.0.1", 9999)), v6:
        targets = ["tcp:127.0.0.1:9999", "tcp:127.0.0.1:9997", "tcp:[::1]:9998"]
        got = outcomes(b.name, [(t,) for t in targets])
    assert {(e, d) for _, e, d, _ in got} == {(errno.EACCES, True)}, got
    assert len({r for *_, r in got}) == 3 and all("999" in r for *_, r in got)


# ------------------------------------------------------- budget, caps, audit


def test_socket_replies_are_counted_in_the_fd_budget(ns: None, launch: Any) -> None:
    """Sockets sent but unread are bounded per uid, like OPEN's fds (core/budget.py)."""
    b = launch(policy(allow("many", '["udp:20000-20999"]')), nofile=1024)
    per_uid, n_conns, per_conn = 250, 10, 40  # FdBudget: max(MAX_BATCH, 1024 // 2 // 4)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def flood() -> None:
        for i in range(n_conns):
            with raw_socket(b.name) as s:
                for j in range(per_conn):
                    port = 20000 + i * per_conn + j
                    req = proto.SocketRequest(j, f"udp:127.0.0.1:{port}")
                    unix.send_message(s, proto.encode_request(req))
                unix.send_message(there, b"x", [s.fileno()])

    as_nobody(flood)
    held = [socket.socket(fileno=unix.recv_message(here, 16, 1)[1][0]) for _ in range(n_conns)]
    time.sleep(1.5)
    made = sockets_of(NOBODY)
    got, left, end = 0, dict.fromkeys(held, per_conn), time.monotonic() + 30
    while left and time.monotonic() < end:  # read them all at once: the budget is per uid
        for s in select.select(list(left), [], [], 1)[0]:
            _, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 253, creds=True)
            got += len(fds)
            unix.close_fds(fds)
            left[s] -= 1
            if not left[s]:
                del left[s]
    for s in [*held, here, there]:
        s.close()
    assert made <= per_uid, f"{made} sockets in flight for one uid; the budget is {per_uid}"
    assert got == n_conns * per_conn
    broker_healthy(b)


def test_a_reload_cannot_widen_the_capabilities(ns: None, launch: Any) -> None:
    b = launch(policy(allow("high", '["tcp:8080"]')))
    pid = b.proc.pid
    main = [caps(pid, key, main_only=True) for key in ("CapEff", "CapPrm", "CapBnd")]
    assert not [c for c in NET_CAPS for held in main if held >> c & 1], [hex(h) for h in main]
    b.policy.write_text(policy(allow("low", '["tcp:80", "raw:icmp"]')))
    os.kill(pid, signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in b.log_text(), 10), b.log_text()
    got = outcomes(b.name, [("tcp:127.0.0.1:80",), ("raw:icmp",), ("tcp:127.0.0.1:8080",)])
    assert [(e, d) for _, e, d, _ in got] == [(errno.EACCES, True)] * 2 + [(0, False)], got
    assert [caps(pid, key, main_only=True) for key in ("CapEff", "CapPrm", "CapBnd")] == main
    broker_healthy(b)


def test_no_thread_keeps_a_capability_the_policy_does_not_need(ns: None, launch: Any) -> None:
    """Capabilities are per thread: one started before drop_to keeps root's full set."""
    b = launch(policy(allow("high", '["tcp:8080"]')))
    for key in ("CapEff", "CapPrm", "CapBnd"):
        held = caps(b.proc.pid, key)
        too_many = [c for c in (*NET_CAPS, CAP_SYS_ADMIN) if held >> c & 1]
        assert not too_many, f"a broker thread holds {key}={held:#x}: {too_many}"


def test_every_socket_decision_is_audited_with_its_device(d0: str, launch: Any) -> None:
    b = launch(policy(allow("dhcp", '["udp:547"]', 'interfaces = ["d0"]')))
    idx = socket.if_nametoindex(d0)
    targets = [f"udp:[fe80::1%{idx}]:547", f"udp:[fe80::1%{d0}]:547", "udp:[::]:547",
               "udp:[::]:547@d0", "nonsense"]  # fmt: skip
    got = outcomes(b.name, [(t,) for t in targets])
    assert [e for _, e, _, _ in got][:2] == [0, 0], got
    recs = audit_records(b, lambda r: len([x for x in r if x.get("request") == "socket"]) >= 5)
    recs = [r for r in recs if r.get("request") == "socket"]
    assert [r["target"] for r in recs] == targets
    devices = [(r["target"], r["interface"]) for r in recs if r["decision"] == "allow"]
    assert devices == [(t, d0) for t in targets[:2] + targets[3:4]], "the device is missing"
