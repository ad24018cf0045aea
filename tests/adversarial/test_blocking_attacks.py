"""Opens that block, used as a weapon (invariant 6).

A filesystem that never answers (tests/stallfs.py: FUSE, for real) is
allowed by the policy; attackers pile requests onto it. Other clients must
keep being served, every stalled request must end in an error reply (never
an fd), and nothing may stay behind in the broker once the filesystem goes.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import socket
import time
from pathlib import Path

import pytest

from privbroker import Client
from privbroker import protocol as proto
from privbroker.protocol import Access
from tests.adversarial._util import (
    TALLY,
    Prober,
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    cpu_seconds,
    fd_count,
    fd_targets,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.support import stallfs
from tests.support.privs import NOBODY, run_as

pytestmark = [
    pytest.mark.adversarial,
    pytest.mark.skipif(not stallfs.available(), reason="needs root and /dev/fuse"),
]

OTHER = 65533  # a second unprivileged uid


def policy(tmp: Path) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "everyone here"
        users = [0, {NOBODY}, {OTHER}, 65532, 65531, 65530]
        paths = ["{tmp}/probe.txt", "{tmp}/stalled/**", "{tmp}/fifo", "/dev/null"]
        access = ["read", "write"]
        types = ["file", "char", "fifo"]
    """


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "probe.txt").write_text("probe\n")
    os.chmod(tmp_path / "probe.txt", 0o600)
    return tmp_path


def pile_stalled(name: str, mnt: str, conns: int, per_conn: int, ready_w: int) -> dict[str, int]:
    """As nobody: many connections, each sending stalled opens without waiting;
    then read every reply (errors only, no fd) on each connection."""
    out: dict[str, int] = {"sent": 0, "fds": 0, "no_reply": 0, "closed": 0}
    raws: list[tuple[Raw, int]] = []
    for c in range(conns):
        raw = Raw(name, timeout=60)
        raw.sock.setblocking(False)
        sent = 0
        for n in range(per_conn):
            try:
                raw.send_open([(f"{mnt}/c{c}/f{n}", Access.READ)])
            except BlockingIOError:
                break  # the broker stopped reading us: back-pressure
            sent += 1
        raw.sock.setblocking(True)
        raws.append((raw, sent))
        out["sent"] += sent
    os.write(ready_w, b"r")
    for raw, sent in raws:
        raw.sock.settimeout(30)
        for _ in range(sent):
            try:
                reply, fds = raw.recv()
            except TimeoutError:
                out["no_reply"] += 1
                break
            if reply is None:
                out["closed"] += 1
                break
            out["fds"] += len(fds)
            for fd in fds:
                os.close(fd)
            for r in getattr(reply, "results", ()):
                key = errno.errorcode.get(r.errno, "ok")
                out[key] = out.get(key, 0) + 1
        raw.close()
    return out


def _answered(out: dict[str, int]) -> int:
    return sum(v for k, v in out.items() if k.startswith("E") or k == "ok")


def test_stalled_opens_piled_on_by_one_uid(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp), "--open-timeout", "2", "--workers", "4", "--max-pending", "4")
    probe = str(tmp / "probe.txt")
    with Raw(b.name) as raw:
        for fd in raw.open([(probe, Access.READ)])[1]:
            os.close(fd)
    baseline = stable_fd_count(b.proc.pid)
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        ready_r, ready_w = os.pipe()
        try:
            with (
                Prober(b.name, probe, b"probe\n", interval=0.05) as prober,
                concurrent.futures.ThreadPoolExecutor(1) as pool,
            ):
                job = pool.submit(as_nobody, pile_stalled, b.name, str(mnt), 10, 20, ready_w)
                assert select.select([ready_r], [], [], 60)[0]
                # While nobody's opens hang, nobody's own local reads still work.
                assert as_nobody(_read, b.name, probe) == "probe\n"
                stats = job.result()
        finally:
            os.close(ready_r)
            os.close(ready_w)
        prober.check()
    print(f"stalled pile: {stats}; prober {prober.ok} ok")
    TALLY["stalled opens piled on"] += stats["sent"]
    assert stats["fds"] == 0, stats
    assert stats["no_reply"] == 0 and stats["closed"] == 0, f"requests not answered: {stats}"
    assert _answered(stats) == stats["sent"], stats
    assert set(k for k in stats if k.startswith("E")) <= {"EAGAIN", "ETIMEDOUT", "EBUSY"}, stats
    assert settle_fds(b.proc.pid, baseline, 20) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


def test_pending_limit_per_connection(start_broker, tmp: Path) -> None:
    """One connection pipelines stalled opens: at most --max-pending of them are
    at the workers at once (the rest wait unread in the socket), and every one
    is answered in the end, with an error and no fd."""
    b = start_broker(policy(tmp), "--open-timeout", "1", "--workers", "64", "--max-pending", "3")
    probe = str(tmp / "probe.txt")
    seen: list[int] = []
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        ready_r, ready_w = os.pipe()
        try:
            with Client(b.name, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
                job = pool.submit(as_nobody, pile_stalled, b.name, str(mnt), 1, 9, ready_w)
                assert select.select([ready_r], [], [], 60)[0]
                while not job.done():
                    seen.append(int(c.status()["requests_at_workers"]))
                    time.sleep(0.05)
                stats = job.result()
                os.close(c.open_fd(probe))
        finally:
            os.close(ready_r)
            os.close(ready_w)
    print(f"pipelined stalled opens: {stats}; at the workers: max {max(seen, default=0)}")
    TALLY["stalled opens piled on"] += stats["sent"]
    assert stats["sent"] == 9 and _answered(stats) == 9 and stats["fds"] == 0, stats
    assert max(seen, default=0) <= 3, f"more than --max-pending at the workers: {max(seen)}"
    assert max(seen, default=0) >= 1, "the requests never reached the workers"
    broker_healthy(b)


def _read(name: str, path: str) -> str:
    with Client(name, timeout=30) as c:
        fd = c.open_fd(path)
    try:
        return os.pread(fd, 100, 0).decode()
    finally:
        os.close(fd)


def stall_and_leave(name: str, mnt: str, n: int) -> int:
    """As nobody: n connections each send a stalled open and hang up at once."""
    for i in range(n):
        raw = Raw(name)
        raw.send_open([(f"{mnt}/gone{i}", Access.READ)])
        if i % 2:
            time.sleep(0.05)  # sometimes after the broker handed it to a worker
        raw.close()
    return n


def test_clients_leave_while_their_open_is_stalled(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp), "--open-timeout", "30", "--workers", "4")
    probe = str(tmp / "probe.txt")
    with Raw(b.name) as raw:
        for fd in raw.open([(probe, Access.READ)])[1]:
            os.close(fd)
    baseline = stable_fd_count(b.proc.pid)
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        assert as_nobody(stall_and_leave, b.name, str(mnt), 10) == 10
        assert as_nobody(_read, b.name, probe) == "probe\n"
    # The filesystem is gone: the stuck workers return; nothing stays behind.
    assert settle_fds(b.proc.pid, baseline, 20) <= baseline, fd_count(b.proc.pid)
    with Client(b.name) as c:
        assert wait_for(lambda: c.status()["requests_at_workers"] == 0, 10)
    broker_healthy(b)


def _stall_one(name: str, path: str) -> int:
    try:
        with Client(name, timeout=60) as c:
            os.close(c.open_fd(path))
    except OSError as exc:
        return exc.errno or -1
    return 0


ATTACKERS = (NOBODY, OTHER, 65532, 65531)  # as many uids as it takes to hold every worker
VICTIM = 65530


def test_uids_stalled_on_one_filesystem_cannot_starve_another(start_broker, tmp: Path) -> None:
    """Each uid may hold only part of the workers, but a handful of uids stalled
    on one filesystem hold them all. Another uid's device open (which needs a
    worker) must still be served, not queued until it times out."""
    b = start_broker(policy(tmp), "--open-timeout", "4", "--workers", "4")
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        kids = []
        with concurrent.futures.ThreadPoolExecutor(2 * len(ATTACKERS)) as pool:
            for n, uid in enumerate(ATTACKERS * 2):
                kids.append(
                    pool.submit(run_as, uid, uid, _stall_one, b.name, f"{mnt}/k{n}", timeout=60)
                )
            with Client(b.name, timeout=60) as c:
                assert wait_for(lambda: c.status()["requests_at_workers"] >= 4, 3)
            start = time.monotonic()
            got = run_as(VICTIM, VICTIM, _stall_one, b.name, "/dev/null", timeout=60)
            took = time.monotonic() - start
            codes = [k.result() for k in kids]
    print(f"another uid's /dev/null: errno {got} after {took:.1f} s; stalled: {codes}")
    assert got == 0, f"another uid's device open failed ({errno.errorcode.get(got, got)})"
    broker_healthy(b)


def half_close_at_limit(name: str, mnt: str, ready_w: int, release_r: int) -> int:
    raw = Raw(name)
    for n in range(2):
        raw.send_open([(f"{mnt}/h{n}", Access.READ)])
    time.sleep(0.3)
    raw.sock.shutdown(socket.SHUT_WR)  # a hang-up the broker sees only as EPOLLRDHUP
    os.write(ready_w, b"r")
    select.select([release_r], [], [], 60)
    raw.close()
    return 2


def test_half_close_at_the_pending_limit_does_not_spin(start_broker, tmp: Path) -> None:
    """A connection at its pending limit, then shut down for writing: the broker
    must not busy-loop on the level-triggered hang-up while its opens wait."""
    b = start_broker(policy(tmp), "--open-timeout", "20", "--workers", "16", "--max-pending", "2")
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                job = pool.submit(
                    as_nobody, half_close_at_limit, b.name, str(mnt), ready_w, release_r
                )
                assert select.select([ready_r], [], [], 30)[0]
                time.sleep(0.3)
                cpu0, t0 = cpu_seconds(b.proc.pid), time.monotonic()
                time.sleep(2.0)
                cpu, wall = cpu_seconds(b.proc.pid) - cpu0, time.monotonic() - t0
                os.write(release_w, b"g")
                job.result()
        finally:
            for fd in (ready_r, ready_w, release_r, release_w):
                os.close(fd)
    print(f"half-closed at the pending limit: {cpu:.2f} s CPU in {wall:.2f} s")
    assert cpu < 0.5 * wall, f"the broker spun: {cpu:.2f} s CPU in {wall:.2f} s"
    broker_healthy(b)


def fifo_opens(name: str, fifo: str, probe: str) -> dict[str, object]:
    out: dict[str, object] = {}
    with Client(name, timeout=30) as c:
        try:
            fd = c.open_fd(fifo, "r")  # no writer: must not block the broker
            out["read"] = "opened"
            out["blocking"] = os.get_blocking(fd)
            os.close(fd)
        except OSError as exc:
            out["read"] = errno.errorcode.get(exc.errno or 0)
        try:
            os.close(c.open_fd(fifo, "r+"))
            out["write"] = "opened"
        except OSError as exc:
            out["write"] = errno.errorcode.get(exc.errno or 0)
        fd = c.open_fd(probe)
        out["probe"] = os.pread(fd, 100, 0)
        os.close(fd)
    return out


def test_fifo_without_writer_does_not_block(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp))
    fifo = tmp / "fifo"
    os.mkfifo(fifo, 0o600)
    got = as_nobody(fifo_opens, b.name, str(fifo), str(tmp / "probe.txt"))
    assert got["read"] == "opened" and got["probe"] == b"probe\n", got
    assert got["blocking"] is True, "O_NONBLOCK leaked into the client's fd"
    broker_healthy(b)


# ------------------------------------------- an open that finishes too late


def late_client(name: str, path: str, leave_r: int) -> tuple[int, int]:
    """As nobody: ask for a file whose open will finish only after the broker's
    open timeout; wait for the ETIMEDOUT, or (leave_r >= 0) hang up when told."""
    raw = Raw(name, timeout=60)
    raw.send_open([(path, Access.READ)])
    if leave_r >= 0:
        select.select([leave_r], [], [], 30)
        raw.close()
        return -1, 0
    reply, fds = raw.recv()
    for fd in fds:
        os.close(fd)
    raw.close()
    assert isinstance(reply, proto.OpenReply), reply
    return reply.results[0].errno, len(fds)


@pytest.mark.parametrize("leave", [False, True], ids=["timed-out", "client-left"])
def test_open_that_finishes_after_the_timeout_is_closed(
    start_broker, tmp: Path, leave: bool
) -> None:
    """The worker's open succeeds, with a real fd, after the broker already
    answered ETIMEDOUT (or the client left): that fd must be closed, not kept."""
    from tests.adversarial._latefs import late_mount

    timeout = "30" if leave else "1"
    b = start_broker(policy(tmp), "--open-timeout", timeout, "--workers", "4")
    probe = str(tmp / "probe.txt")
    with Raw(b.name) as raw:
        for fd in raw.open([(probe, Access.READ)])[1]:
            os.close(fd)
    baseline = stable_fd_count(b.proc.pid)
    mnt = tmp / "stalled"
    leave_r, leave_w = os.pipe()
    try:
        with late_mount(mnt) as fs, concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(
                as_nobody, late_client, b.name, f"{mnt}/late.txt", leave_r if leave else -1
            )
            assert wait_for(lambda: fs.seen >= 1, 10), "the broker never reached the filesystem"
            if leave:
                os.write(leave_w, b"x")
                job.result()
                with Client(b.name) as c:  # the broker has seen the hang-up
                    assert wait_for(lambda: c.status()["connections_open"] == 1, 10)
            else:
                assert job.result() == (errno.ETIMEDOUT, 0)
            fs.release()  # now the worker's open completes, far too late
            _after_release(b, mnt, baseline)
    finally:
        os.close(leave_r)
        os.close(leave_w)
    broker_healthy(b)


def _after_release(b, mnt: Path, baseline: int) -> None:  # type: ignore[no-untyped-def]
    """Once the late open completed in the worker: nothing of it is in the broker."""
    with Client(b.name) as c:
        assert wait_for(lambda: c.status()["requests_at_workers"] == 0, 10)
        assert wait_for(lambda: c.status()["worker_opens"] >= 1, 10)
    time.sleep(0.5)
    held = [t for t in fd_targets(b.proc.pid).values() if str(mnt) in t]
    assert not held, f"the broker kept a late fd: {held}"
    assert settle_fds(b.proc.pid, baseline, 10) <= baseline, fd_count(b.proc.pid)
    # and the file really is openable now, so the worker did get an fd
    assert as_nobody(_read, b.name, f"{mnt}/again.txt") == "late file\n"


def test_timed_out_open_is_audited(start_broker, tmp: Path) -> None:
    """One audit record per decision: an open answered ETIMEDOUT is a decision
    the client saw, and the administrator must see it too."""
    b = start_broker(policy(tmp), "--open-timeout", "1", "--workers", "4")
    with stallfs.stalled_mount(tmp / "stalled") as mnt:
        target = f"{mnt}/never.txt"
        got = as_nobody(late_client, b.name, target, -1)
        assert got == (errno.ETIMEDOUT, 0), got
        recs = audit_records(b, lambda rs: any(r["path"] == target for r in rs), seconds=3)
    mine = [r for r in recs if r["path"] == target]
    assert mine, "no audit record for an open that timed out"
    assert mine[0]["errno"] == errno.ETIMEDOUT and mine[0]["uid"] == NOBODY, mine
    broker_healthy(b)
