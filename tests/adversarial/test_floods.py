"""fd floods, connection floods and fd exhaustion (invariants 5 and 6).

- Clients send fds to the broker (up to 253 per message, SCM_RIGHTS, many
  messages on many connections): the broker keeps none of them (its fd table
  never shows them, and once our copies are closed every pipe's write end
  sees EPIPE: no read end survives anywhere) and its fd count returns to its
  baseline.
- One uid opens thousands of connections at once: each is accepted or refused
  cleanly (EOF), the per-uid limit holds exactly, another uid keeps being
  served, and the broker's fd count returns to its baseline.
- The broker runs out of fds (RLIMIT_NOFILE 64): it does not spin on EMFILE,
  and it recovers when the flood goes away.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import resource
import select
import socket
import struct
import time
from pathlib import Path

import msgpack
import pytest

from privbroker import protocol as proto
from privbroker import unix
from privbroker.protocol import Access
from tests.adversarial._util import (
    TALLY,
    Prober,
    Raw,
    as_nobody,
    broker_healthy,
    cpu_seconds,
    fd_count,
    fd_targets,
    probe_policy,
    settle_fds,
    stable_fd_count,
    wait_for,
)

pytestmark = pytest.mark.adversarial


policy = probe_policy  # a read rule for the probe, for root and nobody


@pytest.fixture(autouse=True)
def many_fds() -> None:
    """Room for thousands of sockets in the test process (and its children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4200:
        pytest.skip("RLIMIT_NOFILE hard limit too low for the flood")


def warm(b, probe: Path) -> int:  # type: ignore[no-untyped-def]
    with Raw(b.name) as raw:
        _, fds = raw.open([(str(probe), Access.READ)])
        for fd in fds:
            os.close(fd)
    return stable_fd_count(b.proc.pid)


# ------------------------------------------------------------------- fd floods

FD_WAVES = 20
CONNS_PER_WAVE = 20
MSGS_PER_CONN = 6  # 20 x 6 x ~130 fds stays under nobody's own in-flight limit


def flood_fds(name: str, reads: list[int], probe: str) -> dict[str, int]:
    """As nobody: send the pipe read ends, 1 to 253 per message, on many connections."""
    stats = {
        "connections": 0,
        "messages": 0,
        "fds": 0,
        "closed": 0,
        "kernel_refused": 0,
        "unsent": 0,
    }
    request = proto.encode_request(proto.OpenRequest(1, (proto.OpenItem(probe, Access.READ),)))
    bodies = [request, b"\xc1junk", msgpack.packb([1, 3, 1])]
    sizes = [253, 1, 17, 253, 128]
    for wave in range(FD_WAVES):
        socks = []
        for c in range(CONNS_PER_WAVE):
            raw = Raw(name, timeout=10)
            stats["connections"] += 1
            raw.sock.setblocking(False)
            sent = 0
            for m in range(MSGS_PER_CONN):
                n = sizes[(wave + c + m) % len(sizes)]
                try:
                    raw.send(bodies[m % len(bodies)], reads[:n])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    break
                except OSError as exc:
                    if exc.errno != errno.ETOOMANYREFS:  # nobody's own in-flight limit
                        raise
                    stats["kernel_refused"] += 1
                    break
                stats["messages"] += 1
                stats["fds"] += n
                sent += 1
            if sent:
                socks.append(raw)
            else:  # nothing went through (nobody's in-flight limit): nothing to judge
                stats["unsent"] += 1
                raw.close()
        for raw in socks:  # the broker must close every one (fds are a violation)
            raw.sock.setblocking(True)
            raw.sock.settimeout(10)
            reply, fds = raw.recv()
            assert reply is None and not fds, f"a reply to a message with fds: {reply!r}"
            stats["closed"] += 1
            raw.close()
    return stats


def test_fd_flood_leaves_nothing_in_the_broker(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe))
    baseline = warm(b, probe)
    pipes = [os.pipe() for _ in range(253)]
    reads, writes = [r for r, _ in pipes], [w for _, w in pipes]
    ours = {os.readlink(f"/proc/self/fd/{r}") for r in reads}
    held: set[str] = set()
    try:
        with (
            Prober(b.name, str(probe), b"probe\n") as prober,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            job = pool.submit(as_nobody, flood_fds, b.name, reads, str(probe))
            while not job.done():  # sample the broker's fd table during the flood
                held |= set(fd_targets(b.proc.pid).values()) & ours
                time.sleep(0.01)
            stats = job.result()
        prober.check()
        held |= set(fd_targets(b.proc.pid).values()) & ours
        assert not held, f"the broker held fds a client sent: {held}"
        print(f"fd flood: {stats}")
        TALLY["fd flood: messages with fds"] += stats["messages"]
        TALLY["fd flood: fds sent"] += stats["fds"]
        TALLY["connections opened"] += stats["connections"]
        assert stats["closed"] + stats["unsent"] == stats["connections"]
        assert stats["closed"] >= FD_WAVES * CONNS_PER_WAVE * 9 // 10
        assert settle_fds(b.proc.pid, baseline) <= baseline, "broker fd count above baseline"
    finally:
        for r in reads:
            os.close(r)
    # No read end is left anywhere (broker, or a socket queue): every write end sees EPIPE.
    try:

        def all_broken() -> bool:
            for w in writes:
                try:
                    os.write(w, b"x")
                except BrokenPipeError:
                    continue
                return False
            return True

        assert wait_for(all_broken, 15), "a read end the client sent is still open somewhere"
    finally:
        for w in writes:
            os.close(w)
    broker_healthy(b)


# ------------------------------------------------------------ connection floods


def per_uid_limit(name: str, probe: str) -> dict[str, object]:
    """As nobody: 100 connections work, the 101st gets EOF, the 100 still work."""
    out: dict[str, object] = {}
    conns = [Raw(name) for _ in range(100)]
    try:
        out["first_100"] = sum(len(c.open([(probe, Access.READ)])[1]) for c in conns)
        extra = Raw(name)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            extra.send(
                proto.encode_request(proto.OpenRequest(1, (proto.OpenItem(probe, Access.READ),)))
            )
        out["101st"] = extra.recv()
        extra.close()
        out["again_100"] = sum(len(c.open([(probe, Access.READ)])[1]) for c in conns)
        conns.pop().close()
        replacement = wait_for(lambda: _try_open(name, probe), 10)
        out["after_one_closed"] = replacement
    finally:
        for c in conns:
            c.close()
    return out


def _try_open(name: str, probe: str) -> bool:
    try:
        with Raw(name) as raw:
            _, fds = raw.open([(probe, Access.READ)])
    except (ConnectionResetError, BrokenPipeError):
        return False
    for fd in fds:
        os.close(fd)
    return len(fds) == 1


BURST = 2000


def burst(name: str, probe: str, n: int) -> dict[str, int]:
    """As nobody: n connections at once; count accepted and refused."""
    stats = {"attempted": n, "connected": 0, "connect_errors": 0, "eof": 0, "open": 0, "served": 0}
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Blocking, bounded by SO_SNDTIMEO: wait for room in the backlog.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
            try:
                s.connect(unix.abstract_address(name))
            except OSError as exc:
                assert exc.errno in (errno.EAGAIN, errno.ECONNREFUSED, errno.ETIMEDOUT, None), exc
                stats["connect_errors"] += 1
                s.close()
                continue
            stats["connected"] += 1
            socks.append(s)
        live = {s.fileno(): s for s in socks}
        poller = select.poll()
        for fd in live:
            poller.register(fd, select.POLLIN)
        end = time.monotonic() + 20
        target = stats["connected"] - 100
        while stats["eof"] < target and time.monotonic() < end:
            for fd, _ in poller.poll(200):
                s = live.pop(fd)
                poller.unregister(fd)
                try:
                    data = s.recv(64)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"unexpected data on a flood connection: {data!r}"
                stats["eof"] += 1
        time.sleep(0.5)  # anything else refused would show EOF by now
        for fd, _ in poller.poll(0):
            stats["eof"] += 1
            live.pop(fd)
        stats["open"] = len(live)
        request = proto.encode_request(proto.OpenRequest(1, (proto.OpenItem(probe, Access.READ),)))
        for s in live.values():
            unix.send_message(s, request)
            data, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 1, creds=True)
            unix.close_fds(fds)
            stats["served"] += len(fds)
    finally:
        for s in socks:
            s.close()
    return stats


def test_connection_flood_per_uid_limit(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe), "--max-connections-per-uid", "100")
    baseline = warm(b, probe)
    with Prober(b.name, str(probe), b"probe\n") as prober:
        got = as_nobody(per_uid_limit, b.name, str(probe))
        assert got["first_100"] == 100
        assert got["101st"] == (None, []), f"the 101st connection was served: {got['101st']}"
        assert got["again_100"] == 100
        assert got["after_one_closed"] is True
        stats = as_nobody(burst, b.name, str(probe), BURST, timeout=120)
    prober.check()
    print(f"connection flood: {stats}; prober {prober.ok} ok")
    TALLY["connections opened"] += stats["connected"] + 101
    assert stats["connected"] + stats["connect_errors"] == BURST
    assert stats["open"] <= 100, f"more than the per-uid limit admitted: {stats}"
    assert stats["open"] + stats["eof"] == stats["connected"], f"connections hanging: {stats}"
    assert stats["served"] == stats["open"], f"admitted connections not served: {stats}"
    assert stats["open"] >= 1
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


# -------------------------------------------------------------------- EMFILE


def hold(name: str, n: int, ready_w: int, release_r: int) -> dict[str, int]:
    """As nobody: open n connections (non-blocking connect), say so, hold them until told."""
    socks = []
    stats = {"connected": 0, "refused": 0}
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            try:
                s.connect(unix.abstract_address(name))
                stats["connected"] += 1
                socks.append(s)
            except OSError:
                stats["refused"] += 1  # backlog full: EAGAIN
                s.close()
        os.write(ready_w, b"r")
        select.select([release_r], [], [], 60)
    finally:
        for s in socks:
            s.close()
    return stats


# Each admitted connection costs two fds (socket, pidfd): with one parity of
# free fds the table fills exactly and accept() itself fails with EMFILE; with
# the other, accept() succeeds and reading the peer's pidfd fails. Both.
@pytest.mark.parametrize("nofile", [64, 65])
def test_emfile_does_not_spin_and_recovers(launch, probe: Path, nofile: int) -> None:
    b = launch(policy(probe), nofile=nofile)
    baseline = warm(b, probe)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, hold, b.name, 300, ready_w, release_r)
            ok, _, _ = select.select([ready_r], [], [], 60)
            assert ok, "the flood never got going"
            # The broker is at its fd limit, with connections waiting in the backlog.
            assert wait_for(lambda: fd_count(b.proc.pid) >= 60, 10), fd_count(b.proc.pid)
            cpu0, t0 = cpu_seconds(b.proc.pid), time.monotonic()
            time.sleep(2.0)
            cpu, wall = cpu_seconds(b.proc.pid) - cpu0, time.monotonic() - t0
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    how = "accept EMFILE" if "accept: " in b.log_text() else "peer read EMFILE"
    print(f"EMFILE flood ({how}): {stats}; broker used {cpu:.2f} s CPU in {wall:.2f} s")
    TALLY["connections opened"] += stats["connected"]
    assert b.proc.poll() is None
    # Spinning on EMFILE would burn the whole interval; an idle loop uses next to none.
    assert cpu < 0.5 * wall, f"the broker spun: {cpu:.2f} s CPU in {wall:.2f} s"
    with Prober(b.name, str(probe), b"probe\n", interval=0.1) as prober:
        assert wait_for(lambda: prober.ok >= 3, 15), prober.failures[-3:]
    # A failure while it recovered may happen (the first probe can race the
    # last closes); what matters is that it serves again, and frees its fds.
    assert settle_fds(b.proc.pid, baseline, 20) <= baseline, fd_count(b.proc.pid)
    assert "Traceback" not in b.log_text()
