"""Idle, slow and non-reading clients cannot stall or starve others (invariant 6)."""

from __future__ import annotations

import concurrent.futures
import os
import select
import time
from pathlib import Path

import pytest

from privbroker import protocol as proto
from privbroker.protocol import Access
from tests.adversarial._util import (
    TALLY,
    Prober,
    Raw,
    as_nobody,
    broker_healthy,
    fd_count,
    probe_policy,
    settle_fds,
    stable_fd_count,
)

pytestmark = pytest.mark.adversarial


policy = probe_policy  # a read rule for the probe, for root and nobody


def idle_clients(name: str, probe: str) -> dict[str, float | None]:
    """Three connections go quiet: silent from the start, after one exchange, and
    with a reply left unread. Each must be closed by the broker (EOF)."""
    silent = Raw(name)
    talked = Raw(name)
    _, fds = talked.open([(probe, Access.READ)])
    for fd in fds:
        os.close(fd)
    unread = Raw(name)
    unread.send_open([(probe, Access.READ)])
    time.sleep(0.2)  # let the reply (and its fd) arrive in our queue
    start = time.monotonic()
    closed: dict[str, float | None] = {}
    for label, conn in (("silent", silent), ("talked", talked)):
        conn.sock.settimeout(max(0.1, start + 10 - time.monotonic()))
        try:
            reply, fds = conn.recv()
        except TimeoutError:
            closed[label] = None
            continue
        assert not fds
        closed[label] = time.monotonic() - start if reply is None else None
    # The unread one: its reply is already here; after it, EOF.
    unread.sock.settimeout(10)
    reply, fds = unread.recv()
    for fd in fds:
        os.close(fd)
    try:
        after, _ = unread.recv()
        closed["unread"] = time.monotonic() - start if after is None else None
    except TimeoutError:
        closed["unread"] = None
    for c in (silent, talked, unread):
        c.close()
    return closed


def test_idle_connections_are_closed(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe), "--idle-timeout", "1")
    baseline = stable_fd_count(b.proc.pid)
    closed = as_nobody(idle_clients, b.name, str(probe))
    assert all(v is not None for v in closed.values()), f"idle connections kept: {closed}"
    assert settle_fds(b.proc.pid, baseline) <= baseline
    broker_healthy(b)


def pile_up(name: str, probe: str, items: int, ready_w: int, release_r: int) -> dict[str, int]:
    """As nobody: send requests without ever reading a reply, until the kernel
    says stop (EAGAIN); hold the connection until told, then hang up."""
    raw = Raw(name)
    raw.sock.setblocking(False)
    sent = 0
    request = proto.encode_request(
        proto.OpenRequest(1, tuple(proto.OpenItem(probe, Access.READ) for _ in range(items)))
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sent < 5000:
        try:
            raw.send(request)
        except BlockingIOError:
            time.sleep(0.05)  # maybe the broker reads one more; then give up
            try:
                raw.send(request)
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError):
                break
        except (BrokenPipeError, ConnectionResetError):
            break  # the broker hung up; what it sent stays queued here, unread
        sent += 1
    os.write(ready_w, b"r")
    select.select([release_r], [], [], 60)
    raw.close()
    return {"sent": sent}


def test_client_that_never_reads_does_not_block_others(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe))
    baseline = stable_fd_count(b.proc.pid)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, pile_up, b.name, str(probe), 1, ready_w, release_r)
            assert select.select([ready_r], [], [], 30)[0], "the attacker never got going"
            with Prober(b.name, str(probe), b"probe\n", interval=0.01) as prober:
                time.sleep(1.5)

            # another nobody connection too
            def one(name: str, path: str) -> int:
                with Raw(name) as raw:
                    _, fds = raw.open([(path, Access.READ)])
                for fd in fds:
                    os.close(fd)
                return len(fds)

            assert as_nobody(one, b.name, str(probe)) == 1
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    prober.check()
    print(f"non-reading client sent {stats['sent']} requests; prober {prober.ok} ok")
    assert stats["sent"] >= 1
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


def test_unread_replies_cannot_exhaust_fds_in_flight(launch, probe: Path) -> None:
    """Each unread reply keeps its fds in flight, charged to the broker's user;
    past RLIMIT_NOFILE of them the kernel refuses every sendmsg with fds
    (ETOOMANYREFS), to every client. One uid leaving open_many replies unread
    must not get the broker there: other clients are still served."""
    b = launch(policy(probe), nofile=512)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, pile_up, b.name, str(probe), 250, ready_w, release_r)
            assert select.select([ready_r], [], [], 30)[0], "the attacker never got going"
            time.sleep(0.5)
            with Prober(b.name, str(probe), b"probe\n", interval=0.05) as prober:
                time.sleep(1.0)
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    print(f"unread open_many x250: {stats}; prober {prober.ok} ok, {prober.failures[:2]}")
    TALLY["unread replies of 250 fds"] += stats["sent"]
    prober.check()
    broker_healthy(b)


def many_unread(name: str, probe: str, conns: int, ready_w: int, release_r: int) -> dict[str, int]:
    """As nobody: on each of `conns` connections ask for 250 fds, never read."""
    request = proto.encode_request(
        proto.OpenRequest(
            1, tuple(proto.OpenItem(probe, Access.READ) for _ in range(proto.MAX_BATCH))
        )
    )
    raws = []
    stats = {"sent": 0, "refused": 0}
    for _ in range(conns):
        try:
            raw = Raw(name)
            raw.send(request)
        except OSError:
            stats["refused"] += 1
            continue
        raws.append(raw)
        stats["sent"] += 1
    os.write(ready_w, b"r")
    select.select([release_r], [], [], 60)
    for raw in raws:
        raw.close()
    return stats


def test_replies_waiting_to_be_sent_cannot_exhaust_broker_fds(launch, probe: Path) -> None:
    """Replies the broker cannot send yet (the client does not read) hold their
    fds in the broker. One uid asking for 250 fds on each of many connections
    must not use up the broker's own fd table: others are still served."""
    b = launch(policy(probe), nofile=1024)
    baseline = stable_fd_count(b.proc.pid)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, many_unread, b.name, str(probe), 40, ready_w, release_r)
            assert select.select([ready_r], [], [], 30)[0], "the attacker never got going"
            time.sleep(1.0)
            held = fd_count(b.proc.pid)
            with Prober(b.name, str(probe), b"probe\n", interval=0.05) as prober:
                time.sleep(1.0)
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    print(
        f"parked open_many x250: {stats}; broker held {held} fds; prober {prober.ok} ok, "
        f"{prober.failures[:2]}"
    )
    TALLY["unread replies of 250 fds"] += stats["sent"]
    prober.check()
    assert settle_fds(b.proc.pid, baseline, 20) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)
