"""Attacks on leased tun/tap devices and the rtnetlink changes the broker makes
for a client (TUN, NETCONF; docs/security.md invariant 12). Each test runs a
real broker inside a fresh network namespace; attackers run as nobody."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privbroker import protocol as proto
from privbroker import unix
from privbroker.api import Client
from tests.adversarial._util import as_nobody, audit_records, broker_healthy, outcome, raw_socket
from tests.support.netns import addresses, fresh_netns, ip, links, routes
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = [pytest.mark.adversarial, pytest.mark.timeout(120)]

TUNSETPERSIST, TUNSETOWNER = 0x400454CB, 0x400454CC
VICTIM = 65533
POLICY = f"""\
version = 1

[[allow]]
name = "vpn"
users = ["nobody"]
sockets = ["tun:vpn*", "tap:lab*"]
network = ["address", "link", "route"]
routes = ["10.8.0.0/16", "fd00:8::/32"]   # route destinations (and addresses) must fall within
mtu = [1280, 9000]
max_devices = 2

[[allow]]
name = "shared"
users = ["nobody"]
network = ["address", "link"]
interfaces = ["shared0"]
addresses = ["10.7.0.0/24"]
mtu = [1280, 1500]

[[allow]]
name = "victim"
users = [{VICTIM}]
sockets = ["tun:vic*"]
network = ["link"]
"""


@pytest.fixture
def broker(start_broker: Any, tmp_path: Path) -> Iterator[Any]:
    with fresh_netns():
        ip("link", "add", "shared0", "type", "veth", "peer", "name", "shared1")
        ip("link", "set", "shared0", "up")
        yield start_broker(POLICY, "--lease-dir", str(tmp_path / "leases"))


def tun(name: str = "vpn%d", mtu: int = 0, tap: bool = False) -> Callable[[int], proto.Request]:
    return lambda i: proto.TunRequest(i, name, tap, mtu)


def conf(action: str, **kw: Any) -> Callable[[int], proto.Request]:
    return lambda i: proto.NetconfRequest(i, action, **kw)


def ask(name: str, *reqs: Callable[[int], proto.Request]) -> list[tuple[int, str, Any]]:
    """On one connection: each request's (errno, reason, device name); fds kept to the end."""
    out, held = [], []
    with Client(name) as client:
        for make in reqs:
            reply, fds = client._request(make, 10.0)
            held += fds
            r = reply.result  # type: ignore[union-attr]
            out.append((r.errno, r.reason, getattr(reply, "name", None)))
    for fd in held:
        os.close(fd)
    return out


def codes(got: list[tuple[int, str, Any]]) -> list[int]:
    return [g[0] for g in got]


def in_child(fn: Callable[[], None], uid: int = NOBODY) -> int:
    """Fork; the child drops to `uid` and runs fn (which may keep running); the pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(uid)
            fn()
        finally:
            os._exit(0)
    return pid


def lease_and_hold(name: str, w: int, *ioctls: int) -> Callable[[], None]:
    """A child body: lease a tun, apply `ioctls` to its fd, report its name, wait."""

    def body() -> None:
        client = Client(name)
        reply, fds = client._request(tun(), 10.0)
        for req in ioctls:
            fcntl.ioctl(fds[0], req, 1)
        os.write(w, reply.name.encode())  # type: ignore[union-attr]
        time.sleep(60)

    return body


def reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_foreign_devices_are_never_configured(broker: Any) -> None:
    ip("tuntap", "add", "vpn7", "mode", "tun")  # root's device: matches the tun glob
    r, w = os.pipe()
    other = in_child(lease_and_hold(broker.name, w))  # vpn0, leased on another connection
    dev = os.read(r, 32).decode()
    try:
        got = as_nobody(
            ask,
            broker.name,
            tun("vpn7"),  # an existing device: IFF_TUN_EXCL, never attached nor leased
            conf("add_address", ifname="vpn7", address="10.8.0.1/24"),
            conf("add_address", ifname=dev, address="10.8.0.1/24"),
            conf("set_link", ifname=dev, up=True),
            conf("add_route", ifname=dev, address="10.8.1.0/24"),
            conf("set_link", ifname="lo", up=False),
            conf("set_link", ifname="shared1", mtu=1300),  # the peer of a named device
            conf("set_link", ifname="vpn*", up=True),
            conf("add_route", address="10.8.2.0/24", via="10.8.0.7"),
        )
    finally:
        reap(other)
    assert got[0][0] == errno.EBUSY and "vpn7" in links()
    assert codes(got[1:7]) == [errno.EACCES] * 6 and got[7][0] in (errno.ENODEV, errno.EACCES)
    assert got[8][0] == errno.EACCES and "10.8.1.0/24" not in routes()
    assert links()["lo"]["operstate"] != "DOWN" and links()["shared1"]["mtu"] == 1500
    assert addresses("vpn7") == [] and "vpn7" in links()  # nor deleted as someone's lease


def test_address_prefix_cannot_widen_the_routes(broker: Any) -> None:
    # The rule has no `addresses`: DESIGN.md says addresses must then fall within `routes`.
    # 10.8.0.1/8 is inside 10.8.0.0/16, but the kernel adds the connected route 10.0.0.0/8.
    got = as_nobody(
        ask,
        broker.name,
        tun(),
        conf("add_address", ifname="vpn0", address="10.8.0.1/8"),
        conf("add_address", ifname="vpn0", address="192.0.2.1/24"),
        conf("add_address", ifname="vpn0", address="::ffff:10.8.0.1/96"),
    )
    assert got[0][0] == 0
    assert codes(got[1:]) == [errno.EACCES] * 3, got
    assert not {"10.0.0.0/8", "192.0.2.0/24"} & set(routes())


def test_routes_stay_inside_the_cidrs_and_the_main_tables(broker: Any) -> None:
    got = as_nobody(
        ask,
        broker.name,
        tun(),
        conf("add_address", ifname="vpn0", address="10.8.0.1/24"),
        conf("set_link", ifname="vpn0", up=True),
        conf("add_route", ifname="vpn0", address="0.0.0.0/0"),
        conf("add_route", ifname="vpn0", address="0.0.0.0/0", via="10.8.0.7"),
        conf("add_route", ifname="vpn0", address="10.0.0.0/8"),
        conf("add_route", ifname="vpn0", address="::ffff:10.8.0.0/120"),
        conf("add_route", ifname="vpn0", address="10.8.5.0/24", via="192.0.2.1"),
        conf("add_route", ifname="vpn0", address="10.8.6.0/24", table=255),
        conf("add_route", ifname="vpn0", address="10.8.7.0/24", table=0),
        conf("del_route", ifname="vpn0", address="10.8.0.0/24"),  # the kernel's own route
    )
    assert codes(got[:3]) == [0, 0, 0]
    assert codes(got[3:8]) == [errno.EACCES] * 5, got
    assert got[8][0] == errno.EINVAL and got[9][0] == 0  # table 0 is main
    assert got[10][0] == errno.ESRCH  # proto static: the broker deletes only its kind
    assert "default" not in routes() and "10.8.6.0/24" not in routes()


def test_mtu_is_bounded_on_both_paths(broker: Any) -> None:
    got = as_nobody(
        ask,
        broker.name,
        tun(mtu=100),
        tun(mtu=2**32 - 1),
        tun(mtu=1400),
        conf("set_link", ifname="vpn0", mtu=9001),
        conf("set_link", ifname="vpn0", mtu=1279),
        conf("set_link", ifname="shared0", mtu=1600),  # within vpn's range, not shared's
        conf("set_link", ifname="shared0", mtu=1400),
    )
    assert codes(got) == [errno.EACCES] * 2 + [0] + [errno.EACCES] * 3 + [0], got
    time.sleep(0.5)  # the connection is gone: shared0 gets its MTU back
    assert links()["shared0"]["mtu"] == 1500


def test_max_devices_holds_across_connections_and_processes(broker: Any) -> None:
    def grab(name: str) -> int:
        clients = [Client(name) for _ in range(3)]
        got = [c._request(tun(), 10.0)[0].result.errno for c in clients]  # type: ignore[union-attr]
        time.sleep(1.0)  # hold them while the sibling asks
        return got.count(0)

    r, w = os.pipe()
    pids = [in_child(lambda: os.write(w, bytes([grab(broker.name)]))) for _ in range(2)]
    assert sum(os.read(r, 1)[0] for _ in pids) <= 2
    for pid in pids:
        os.waitpid(pid, 0)


def pass_on_and_exit(name: str) -> tuple[str, list[int]]:
    """A child leases a tun, makes it persistent and its own, passes its connection
    and the device's fd here, and exits; the device name and the fds kept."""
    r, w = os.pipe()
    keep_r, keep_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def holder() -> None:
        client = Client(name)
        reply, fds = client._request(tun(), 10.0)
        fcntl.ioctl(fds[0], TUNSETPERSIST, 1)
        fcntl.ioctl(fds[0], TUNSETOWNER, NOBODY)
        unix.send_message(keep_w, b"x", [client._sock.fileno(), fds[0]])  # type: ignore[attr-defined]
        os.write(w, reply.name.encode())  # type: ignore[union-attr]

    os.waitpid(in_child(holder), 0)
    dev = os.read(r, 32).decode()
    kept = unix.recv_message(keep_r, 16, 8)[1]
    for fd in (r, w, keep_r.detach(), keep_w.detach()):
        os.close(fd)
    return dev, kept


def gone(dev: str) -> bool:
    deadline = time.monotonic() + 5
    while dev in links() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dev not in links()


def test_lease_ends_with_the_process_whatever_it_did(broker: Any) -> None:
    dev, kept = pass_on_and_exit(broker.name)  # the socket lives on elsewhere: pidfd ends it
    try:
        assert gone(dev)
    finally:
        unix.close_fds(kept)


def test_a_change_is_undone_even_if_the_connection_closes_before_the_ack(broker: Any) -> None:
    # A change on a named device, then at once a malformed message: the broker closes the
    # connection before it reads the kernel's ACK of the change.
    def fire_and_hang_up(name: str) -> str:
        s = raw_socket(name)
        req = proto.NetconfRequest(1, "add_address", ifname="shared0", address="10.7.0.5/24")
        unix.send_message(s, proto.encode_request(req), [])
        unix.send_message(s, b"\xc1", [])
        state = outcome(s)[0]
        s.close()
        return state

    assert as_nobody(fire_and_hang_up, broker.name) == "closed"
    # Then the usual lease: its process exits while another holds the connection.
    dev, kept = pass_on_and_exit(broker.name)
    try:
        assert gone(dev), "the lease outlived its process"
    finally:
        unix.close_fds(kept)
    assert "10.7.0.5/24" not in addresses("shared0")
    broker_healthy(broker)


def test_restart_is_not_fooled_by_a_reused_broker_pid(start_broker: Any, tmp_path: Path) -> None:
    # pid_max is often 32768: any user can fork until the dead broker's pid comes round
    # again, and run something whose command line says "privbroker". Here root takes the
    # shortcut (ns_last_pid); the squatter itself runs as nobody.
    with fresh_netns():
        leases = tmp_path / "leases"
        first = start_broker(POLICY, "--lease-dir", str(leases))
        r, w = os.pipe()
        holder = in_child(lease_and_hold(first.name, w, TUNSETPERSIST))
        dev = os.read(r, 32).decode()
        old = int(next(leases.glob("*.json")).stem.split("-")[0])
        first.proc.kill()
        first.proc.wait()
        reap(holder)
        squatter = occupy(old)
        try:
            start_broker(POLICY, "--lease-dir", str(leases))
            assert dev not in links(), f"orphan {dev} kept: pid {old} is a nobody's `sleep`"
        finally:
            reap(squatter)


def occupy(target: int) -> int:
    """A process of nobody at pid `target`, argv "privbroker 60"."""
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(target - 1))
        pid = os.fork()
        if pid == 0:
            try:
                if os.getpid() == target:
                    os.setgroups([])
                    os.setgid(NOGROUP)
                    os.setuid(NOBODY)
                    os.execv("/bin/sleep", ["privbroker", "60"])
            finally:
                os._exit(0)
        if pid == target:
            return pid
        os.waitpid(pid, 0)
    pytest.skip(f"could not get pid {target}")


def test_one_uid_cannot_starve_others_of_the_rtnetlink_socket(broker: Any) -> None:
    # nobody floods harmless, allowed changes on 200 connections, 8 in flight each
    # (one uid may have 256): everyone shares one rtnetlink socket with 256 slots.
    def flood(name: str, seconds: float) -> int:
        socks: list[socket.socket] = []
        while len(socks) < 200:
            try:
                socks.append(raw_socket(name))
            except BlockingIOError:  # the listen backlog is full: let the broker accept
                time.sleep(0.01)
        req = proto.encode_request(
            proto.NetconfRequest(1, "del_address", ifname="shared0", address="10.7.0.9/24")
        )
        for s in socks:
            for _ in range(8):
                unix.send_message(s, req, [])
        end, answered = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            for s in select.select(socks, [], [], 0.1)[0]:
                s.recv(4096)
                unix.send_message(s, req, [])
                answered += 1
        return answered

    def victim(name: str) -> list[int]:
        time.sleep(1.0)
        with Client(name) as c:
            dev = c._request(tun("vic%d"), 10.0)[0].name  # type: ignore[union-attr]
            ups = [conf("set_link", ifname=dev, up=i % 2 == 0) for i in range(300)]
            return [c._request(u, 10.0)[0].result.errno for u in ups]  # type: ignore[union-attr]

    r, w = os.pipe()
    attacker = in_child(lambda: os.write(w, str(flood(broker.name, 6.0)).encode()))
    try:
        got = run_as(VICTIM, NOGROUP, victim, broker.name, timeout=60)
    finally:
        os.waitpid(attacker, 0)
    os.close(w)
    assert int(os.read(r, 32) or b"0") > 1000  # the flood was served meanwhile
    assert set(got) == {0}, f"{got.count(errno.EAGAIN)} of {len(got)} EAGAIN"
    broker_healthy(broker)


def test_malformed_and_semantic_errors(broker: Any) -> None:
    def session(name: str) -> list[Any]:
        bad = [  # the codec refuses these: the connection closes, nothing else
            [1, 7, 1, "drop_link", "lo", "", None, 0, "", -1, 0],
            [1, 7, 1, "set_link", 5, "", None, 0, "", -1, 0],
            [1, 7, 1, "set_link", "lo", "", "yes", 0, "", -1, 0],
            [1, 7, 1, "add_route", "lo", "", None, 0, "", -2, 0],
            [1, 7, 1, "add_route", "lo", "", None, 0, "", -1, 2**32],
            [1, 6, 1, "vpn%d", False, -1],
            [1, 6, 1, "x" * 64, False, 0],
        ]
        import msgpack

        out: list[Any] = []
        for body in bad:
            s = raw_socket(name)
            unix.send_message(s, msgpack.packb(body), [])
            out.append(outcome(s)[0])
            s.close()
        out.append(
            ask(
                name,
                tun("vpn%d%d"),
                tun("vpn/x"),
                tun(""),
                conf("add_address", ifname="lo", address="10.8.0.1/33"),
                conf("add_address", ifname="lo\0x", address="10.8.0.1/24"),
                conf("add_route", ifname="lo", address="10.8.0.0/24", via="::1"),
                conf("add_address", ifname="", address="10.8.0.1/24"),
                tun(),
                conf("add_route", ifname="vpn0", address="fd00:8:1::%x/64"),  # scoped: no EIO
            )
        )
        return out

    got = as_nobody(session, broker.name)
    assert got[:7] == ["closed"] * 7
    assert codes(got[7][:7]) == [errno.EINVAL] * 7, got[7]
    assert got[7][7][0] == 0 and got[7][8][0] == errno.EINVAL, got[7][8]
    broker_healthy(broker)


def test_audit_names_every_argument(broker: Any) -> None:
    got = as_nobody(ask, broker.name, conf("set_link", ifname="shared0", up=False))
    assert got[0][0] == 0
    recs = audit_records(broker, lambda rs: any(r.get("request") == "set_link" for r in rs))
    rec = next(r for r in recs if r.get("request") == "set_link")
    assert rec["decision"] == "allow" and rec["uid"] == NOBODY
    assert "shared0" in rec["target"] and "up=False" in rec["target"], rec
