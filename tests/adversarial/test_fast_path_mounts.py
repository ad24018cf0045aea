"""The native fast path (broker/files/_fast.c) under attack: mounts at the hot path.

As in test_fast_path.py, each test first makes a path "hot" (served by the C
code, as `privbroker status` shows), then mounts a filesystem where it was: a
tmpfs with its own file over the hot directory (the fd must be the file now
visible there, never the covered one, and the covered one again once
unmounted), or a FUSE filesystem that never answers, over the directory or in
place of an unmounted tmpfs. The hot open must time out in a worker, and the
broker's loop never block: status and other clients' opens are answered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from pathlib import Path

import pytest

from privbroker import Client
from tests.adversarial._fastpath import HOT, counts, make_hot, nobody_fetch, policy, status
from tests.adversarial._util import as_nobody, broker_healthy, ident, make_root_file
from tests.support import stallfs
from tests.support.privs import NOBODY, NOGROUP

pytestmark = pytest.mark.adversarial
_libc = ctypes.CDLL(None, use_errno=True)


# ------------------------------------------------------------ mounts


def _mount_tmpfs(where: Path) -> None:
    if _libc.mount(b"fastpath-test", os.fsencode(where), b"tmpfs", 0, b"mode=0755") != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(where))


def _umount(where: Path) -> None:
    _libc.umount2(os.fsencode(where), 2)  # MNT_DETACH


def mountinfo_of(where: Path) -> tuple[int, str] | None:
    """(mount id, "major:minor") of the topmost mount at `where`, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(where):
                found = int(fields[0]), fields[2]  # mounted later: listed later
    return found


def abort_fuse(where: Path, scratch: Path) -> None:
    """Abort the FUSE connection mounted at `where` (fusectl's abort file): every
    request still waiting fails, and stallfs's reader thread ends at once."""
    info = mountinfo_of(where)
    if info is None:
        return
    major, minor = (int(x) for x in info[1].split(":"))
    scratch.mkdir(exist_ok=True)
    if _libc.mount(b"fusectl", os.fsencode(scratch), b"fusectl", 0, None) != 0:
        return  # no fusectl: stallfs's own teardown still ends it, only slower
    try:
        with (
            contextlib.suppress(OSError),
            open(scratch / str(os.makedev(major, minor)) / "abort", "w") as f,
        ):
            f.write("1")
    finally:
        _umount(scratch)


def reap(pids: list[int], seconds: float) -> list[int | None]:
    """Exit codes of child processes, None for those still running after `seconds`."""
    codes: dict[int, int] = {}
    end = time.monotonic() + seconds
    while len(codes) < len(pids) and time.monotonic() < end:
        for pid in set(pids) - codes.keys():
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(st)
        time.sleep(0.05)
    return [codes.get(p) for p in pids]


def test_tmpfs_mounted_over_the_hot_directory(start_broker, hot_dir: Path) -> None:
    """A tmpfs with its own d/f is mounted over the hot directory: the fd is
    the new file (fast again once the broker knows the mount), never the
    covered one; unmounted, the covered file is back, never the tmpfs one."""
    hot = hot_dir / "f"
    covered = ident(hot)
    b = start_broker(policy([f"{hot_dir}/*"]))
    make_hot(b, hot)
    _mount_tmpfs(hot_dir)
    try:
        new = make_root_file(hot, "on the tmpfs\n")
        assert new != covered
        fast0, _ = counts(b)
        got = nobody_fetch(b, hot, rounds=HOT)
        assert all(g.ident == new and g.head == b"on the tmpfs\n" for g in got), got
        assert counts(b)[0] - fast0 >= 1, "never fast on the new mount"
    finally:
        _umount(hot_dir)
    got = nobody_fetch(b, hot, rounds=HOT)
    assert all(g.ident == covered for g in got), got
    broker_healthy(b)


def _try_open(name: str, path: str, timeout: float) -> int:
    try:
        with Client(name, timeout=timeout) as c:
            os.close(c.open_fd(path))
    except OSError as exc:
        return exc.errno or -1
    return 0


def _stuck_open(name: str, path: str) -> int:
    """A forked nobody client's open on the hung filesystem; its errno."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            code = _try_open(name, path, 30)
        finally:
            os._exit(code)
    return pid


@pytest.mark.skipif(not stallfs.available(), reason="needs root and /dev/fuse")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("over", ["ext4-dir", "unmounted-tmpfs"])
def test_hung_fuse_mounted_where_the_hot_path_was(start_broker, tmp_path: Path, over: str) -> None:
    """A FUSE filesystem that never answers is mounted where the hot path is:
    over its (local) directory, or in place of a tmpfs the hot path was on
    (unmounted first, so the new mount may take over its mount id). The hot
    open goes to a worker and times out (ETIMEDOUT); the broker's loop never
    blocks: while opens of the hot path hang, root's status and nobody's
    opens of another file are answered."""
    d = tmp_path / "d"
    d.mkdir()
    ok = tmp_path / "ok"
    make_root_file(ok, "fine\n")
    if over == "unmounted-tmpfs":
        _mount_tmpfs(d)
    try:
        make_root_file(d / "f", "the allowed file\n")
        b = start_broker(policy([f"{d}/*", str(ok)], users=(0, NOBODY)), "--open-timeout", "2")
        make_hot(b, d / "f")
        before = mountinfo_of(d)
    finally:
        if over == "unmounted-tmpfs":
            _umount(d)
    kids: list[int] = []
    codes: list[int | None] = []
    try:
        with stallfs.stalled_mount(d, lookups=True):
            try:
                print(f"{over}: mount {before} -> {mountinfo_of(d)}")
                # The first open walks the name into the dentry cache, in a worker.
                assert as_nobody(_try_open, b.name, str(d / "f"), 30) == errno.ETIMEDOUT
                for _ in range(3):  # now the name is cached: these must not hang the loop
                    kids.append(_stuck_open(b.name, str(d / "f")))
                time.sleep(0.3)
                for _ in range(5):
                    assert status(b)["connections_open"] >= 1
                    assert as_nobody(_try_open, b.name, str(ok), 10) == 0
                codes = reap(kids, 15)
            finally:
                abort_fuse(d, tmp_path / "fusectl")
    finally:
        for pid, code in zip(kids, codes or [None] * len(kids), strict=True):
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    assert all(c in (errno.ETIMEDOUT, errno.EAGAIN) for c in codes), codes
    broker_healthy(b)
