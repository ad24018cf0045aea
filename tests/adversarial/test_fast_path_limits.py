"""The native fast path (broker/files/_fast.c) under attack: its limits.

As in test_fast_path.py, each test first makes a path "hot" (served by the C
code, as `privbroker status` shows), then: the connection changes hands (its
credentials no longer the connection's), fds ride on a hot request, a batch
is hot only in part, a client never reads its replies (the fd budget, per
connection and per uid), open_many asks for a whole batch of hot paths. The
broker must deny, close, stay within its budget and keep no fd.
test_fast_path_mounts.py mounts filesystems where the hot path was.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from privbroker import Client, unix
from privbroker import protocol as proto
from tests.adversarial._fastpath import (
    HOT,
    OTHER_UID,
    Got,
    R,
    counts,
    fetch,
    fetch_on,
    look,
    make_hot,
    policy,
    status,
)
from tests.adversarial._util import (
    TALLY,
    Raw,
    as_nobody,
    broker_healthy,
    fd_count,
    fd_targets,
    ident,
    make_root_file,
    outcome,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial


# ------------------------------------------------------------ credentials


def _use(raw: Raw, path: str) -> list[Got]:
    return fetch_on(raw, [(path, R)])


def _assert_mismatch(got: list[Got]) -> None:
    (g,) = got
    assert (g.errno, g.denied, g.ident) == (errno.EACCES, True, None), g
    assert "credentials" in g.reason, g.reason


def test_connection_changes_hands_after_going_hot(start_broker, hot_dir: Path) -> None:
    """A connection made by root, hot for root on that very connection, then
    used by its holder after setuid(nobody), or after setgid alone: denied for
    the credentials (both may read the file: only the mismatch denies)."""
    hot = str(hot_dir / "f")
    b = start_broker(policy([f"{hot_dir}/*"], users=(0, NOBODY)))
    raw = Raw(b.name)
    try:
        fast0, _ = counts(b)
        for _ in range(HOT):
            assert fetch_on(raw, [(hot, R)])[0].errno == 0
        assert counts(b)[0] - fast0 >= HOT // 2, "not hot on root's connection"
        fast0, _ = counts(b)
        _assert_mismatch(as_nobody(_use, raw, hot))
        _assert_mismatch(run_as(0, NOGROUP, _use, raw, hot))
        assert counts(b)[0] == fast0, "a request with other credentials was served fast"
        assert fetch_on(raw, [(hot, R)])[0].errno == 0  # root's again: served
    finally:
        raw.close()
    broker_healthy(b)


def _hot_then_pass(name: str, path: str, chan: socket.socket, ready: int, release: int) -> int:
    """As nobody: connect, go hot, pass the connection on, live on until released."""
    with Raw(name) as raw:
        for _ in range(HOT):
            assert fetch_on(raw, [(path, R)])[0].errno == 0
        unix.send_message(chan, b"s", [raw.sock.fileno()])
    os.write(ready, b"r")
    select.select([release], [], [], 60)
    return os.getpid()


def _receive_and_use(chan: socket.socket, path: str) -> list[Got]:
    _, fds, _ = unix.recv_message(chan, 16, 1)
    with Raw.adopt(socket.socket(fileno=fds[0])) as raw:
        return _use(raw, path)


def test_hot_connection_passed_to_another_uid(start_broker, hot_dir: Path) -> None:
    """nobody connects and goes hot, then passes the socket to a process of
    another uid the rule also allows: its request is denied (credentials)."""
    hot = str(hot_dir / "f")
    b = start_broker(policy([f"{hot_dir}/*"], users=(NOBODY, OTHER_UID)))
    a_end, b_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        fast0, _ = counts(b)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            args = (b.name, hot, a_end, ready_w, release_r)
            holder = pool.submit(as_nobody, _hot_then_pass, *args)
            # Fork the receiver only once the holder is settled: a child forked
            # meanwhile would inherit the other's result pipe and keep it open.
            assert select.select([ready_r], [], [], 30)[0], holder.result(timeout=1)
            got = run_as(OTHER_UID, OTHER_UID, _receive_and_use, b_end, hot)
            fast1, _ = counts(b)
            os.write(release_w, b"go")
            holder.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
        a_end.close()
        b_end.close()
    assert fast1 - fast0 >= HOT // 2, "the holder's connection never went hot"
    _assert_mismatch(got)
    broker_healthy(b)


# ------------------------------------------------------- fds attached


def _hot_request_with_fds(name: str, path: str, fds: list[int], items: int) -> str:
    with Raw(name) as raw:
        for _ in range(HOT):
            assert all(g.errno == 0 for g in fetch_on(raw, [(path, R)] * items))
        request = proto.encode_request(
            proto.OpenRequest(99, tuple(proto.OpenItem(path, R) for _ in range(items)))
        )
        raw.send(request, fds)
        return outcome(raw.sock)[0]


@pytest.mark.parametrize(("nfds", "items"), [(1, 1), (253, 1), (3, 50)])
def test_hot_request_with_fds_attached(start_broker, hot_dir: Path, nfds: int, items: int) -> None:
    """A hot request carrying SCM_RIGHTS fds is a protocol violation: the
    connection is closed with no reply, the broker keeps none of the fds (its
    fd count returns to the baseline; every pipe's write end sees EPIPE once
    our read ends are closed), and it keeps serving, fast, everyone else."""
    hot = hot_dir / "f"
    b = start_broker(policy([f"{hot_dir}/*"]))
    make_hot(b, hot)
    baseline = stable_fd_count(b.proc.pid)
    errors0 = status(b)["protocol_errors"]
    pipes = [os.pipe() for _ in range(nfds)]
    reads = [r for r, _ in pipes]
    ours = {os.readlink(f"/proc/self/fd/{r}") for r in reads}
    try:
        assert as_nobody(_hot_request_with_fds, b.name, str(hot), reads, items) == "closed"
        assert not set(fd_targets(b.proc.pid).values()) & ours, "the broker kept a client's fd"
    finally:
        for r in reads:
            os.close(r)
    try:
        for _, w in pipes:
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")
    finally:
        for _, w in pipes:
            os.close(w)
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    assert status(b)["protocol_errors"] == errors0 + 1
    make_hot(b, hot)
    broker_healthy(b)


def test_batch_hot_in_part_leaks_nothing(start_broker, tmp_path: Path, hot_dir: Path) -> None:
    """A batch of two hot files whose second has become a FIFO: the C code has
    opened the first when it gives up on the second; that fd is closed, never
    sent, and Python answers the whole batch (the file, and a denial)."""
    f, g = hot_dir / "f", hot_dir / "g"
    want = ident(f)
    make_root_file(g, "g\n")
    b = start_broker(policy([f"{hot_dir}/*"]))
    items = [(str(f), R), (str(g), R)]
    fast0, _ = counts(b)
    assert all(x.errno == 0 for x in as_nobody(fetch, b.name, items, HOT))
    assert counts(b)[0] - fast0 >= HOT, "the batch never went hot"
    baseline = stable_fd_count(b.proc.pid)
    os.mkfifo(tmp_path / "p", 0o600)
    os.rename(tmp_path / "p", g)
    fast0, _ = counts(b)
    got = as_nobody(fetch, b.name, items, 50)
    assert counts(b)[0] == fast0, "a batch with a FIFO in it was served fast"
    for first, second in zip(got[::2], got[1::2], strict=True):
        assert first.ident == want, first
        assert (second.errno, second.ident) == (errno.EACCES, None), second
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


# --------------------------------------------------------- unread replies


def _pile_up(
    name: str, path: str, conns: int, ready_w: int, release_r: int, then: str
) -> dict[str, int]:
    """As nobody, on `conns` connections: go hot, then send single hot requests
    and never read, until the kernel says stop; on release, read every reply
    (on all connections at once: the per-uid budget frees them one by one),
    or hang up."""
    raws = [Raw(name) for _ in range(conns)]
    for raw in raws:
        for _ in range(HOT):
            assert fetch_on(raw, [(path, R)])[0].errno == 0
        raw.sock.setblocking(False)
    request = proto.encode_request(proto.OpenRequest(7, (proto.OpenItem(path, R),)))
    sent = dict.fromkeys(raws, 0)
    deadline = time.monotonic() + 10
    for raw in raws:
        while sent[raw] < 3000 and time.monotonic() < deadline:
            try:
                raw.send(request)
            except BlockingIOError:
                if not select.select([], [raw.sock], [], 0.3)[1]:
                    break
                continue
            sent[raw] += 1
    os.write(ready_w, b"r")
    select.select([release_r], [], [], 60)
    read = dict.fromkeys(raws, 0)
    while then == "read" and read != sent:
        ready = select.select([r.sock for r in raws if read[r] < sent[r]], [], [], 15)[0]
        assert ready, f"replies stopped coming: {list(read.values())} of {list(sent.values())}"
        for raw in (r for r in raws if r.sock in ready):
            reply, fds = raw.recv()
            assert reply is not None and len(fds) == 1, reply
            os.close(fds[0])
            read[raw] += 1
    for raw in raws:
        raw.close()
    return {"sent": sum(sent.values()), "read": sum(read.values())}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["read", "hang-up"])
@pytest.mark.parametrize("conns", [1, 3])
def test_unread_hot_replies_stay_within_the_budget(
    start_broker, hot_dir: Path, conns: int, then: str
) -> None:
    """A hot client sends thousands of single opens on 1 or 3 connections and
    reads no reply: the fds in flight to it never exceed the budget, the fast
    path included (MAX_BATCH per connection; and per uid: under RLIMIT_NOFILE
    512 a uid may have 250 in flight, not 3 x 250), the broker's own fd table
    stays small, root is still served, and once the client reads everything
    (or hangs up) both counts return to their baselines."""
    hot = hot_dir / "f"
    b = start_broker(policy([f"{hot_dir}/*"], users=(0, NOBODY)), nofile=512)
    make_hot(b, hot)
    baseline = stable_fd_count(b.proc.pid)
    fast0, _ = counts(b)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    unread: list[int] = []
    held: list[int] = []
    args = (b.name, str(hot), conns, ready_w, release_r, then)

    def sample() -> None:
        unread.append(status(b)["fds_unread_by_clients"])
        held.append(fd_count(b.proc.pid))

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, _pile_up, *args)
            while not select.select([ready_r], [], [], 0.05)[0]:
                assert not job.done(), job.result()
                sample()
            for _ in range(10):  # and while it sits there, parked
                sample()
                time.sleep(0.05)
            for _ in range(5):  # root is served meanwhile
                with Client(b.name, timeout=15) as c:
                    os.close(c.open_fd(hot))
            os.write(release_w, b"go")
            stats = job.result()
    finally:
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    fast = counts(b)[0] - fast0
    print(f"unread hot replies: {stats}; max unread {max(unread)}, max fds {max(held)}")
    TALLY["fast path: unread replies"] += stats["sent"]
    assert max(unread) <= proto.MAX_BATCH, f"{max(unread)} fds in flight to one uid"
    assert unread[-1] == proto.MAX_BATCH, f"the budget was never reached: {unread[-10:]}"
    assert fast >= proto.MAX_BATCH, f"only {fast} of the unread replies were fast"
    assert max(held) <= baseline + 2 * conns + 6, f"the broker held {max(held)} (of {baseline})"
    assert wait_for(lambda: status(b)["fds_unread_by_clients"] == 0, 15), status(b)
    if then == "read":
        assert stats["read"] == stats["sent"] > proto.MAX_BATCH
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


def _open_many_rounds(name: str, paths: list[str], rounds: int) -> list[set[Any]]:
    out = []
    with Client(name, timeout=30) as c:
        for _ in range(rounds):
            fds = c.open_many(paths)
            out.append({look(fd).ident for fd in fds})
    return out


def test_open_many_of_hot_paths_is_fast_every_time(start_broker, tmp_path: Path) -> None:
    """open_many of MAX_BATCH distinct files, repeated, the replies read: the
    first call in Python, each later one wholly in C (fast_opens grows by
    MAX_BATCH per call; the per-connection budget is found drained each time),
    and every fd is the file asked for."""
    d = tmp_path / "many"
    d.mkdir()
    want = {make_root_file(d / f"f{n:03}", f"{n}\n") for n in range(proto.MAX_BATCH)}
    paths = [str(d / f"f{n:03}") for n in range(proto.MAX_BATCH)]
    b = start_broker(policy([f"{d}/*"]))
    got = as_nobody(_open_many_rounds, b.name, paths, 1)
    assert got == [want]
    gains = []
    for _ in range(4):
        fast0, _ = counts(b)
        assert as_nobody(_open_many_rounds, b.name, paths, 1) == [want]
        gains.append(counts(b)[0] - fast0)
    assert gains == [proto.MAX_BATCH] * 4, gains
    fast0, _ = counts(b)
    assert as_nobody(_open_many_rounds, b.name, paths, 5) == [want] * 5  # one connection
    assert counts(b)[0] - fast0 == 5 * proto.MAX_BATCH
    assert wait_for(lambda: status(b)["fds_unread_by_clients"] == 0), status(b)
    broker_healthy(b)
