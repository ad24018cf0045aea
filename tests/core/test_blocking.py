"""Opens that block (a stalled filesystem) never stall the broker (invariant 6)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from privbroker import Client, open_privileged
from tests.support import stallfs
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.skipif(not stallfs.available(), reason="needs root and /dev/fuse")


def policy(tmp_path: Path) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "nobody reads the tree"
        users = ["nobody"]
        paths = ["{tmp_path}/ok/*", "{tmp_path}/stalled/**", "/dev/null"]
        access = ["read"]
        types = ["file", "char"]
    """


def read(name: str, path: str) -> str:
    with open_privileged(path, socket=name, timeout=30) as f:
        return f.read()


def try_open(name: str, path: str) -> tuple[int, str]:
    try:
        with Client(name, timeout=30) as c:
            os.close(c.open_fd(path))
    except OSError as exc:
        return exc.errno or 0, str(exc)
    return 0, ""


def test_stalled_filesystem_times_out_and_others_are_served(start_broker, tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "f.txt").write_text("fine\n")
    os.chmod(tmp_path / "ok" / "f.txt", 0o600)
    b = start_broker(policy(tmp_path), "--open-timeout", "2", "--workers", "4")
    with stallfs.stalled_mount(tmp_path / "stalled") as mnt:
        stuck = os.fork()
        if stuck == 0:  # a client whose open will hang in the filesystem
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            code, _ = try_open(b.name, f"{mnt}/deep/file.txt")
            os._exit(0 if code == errno.ETIMEDOUT else 1)
        # While it hangs, others are served, many times over.
        time.sleep(0.3)
        for _ in range(20):
            assert run_as(NOBODY, NOGROUP, read, b.name, str(tmp_path / "ok" / "f.txt")) == "fine\n"
        _, status = os.waitpid(stuck, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the stalled open did not end in ETIMEDOUT"
        with Client(b.name) as c:
            fields = c.status()
        assert fields["timeouts"] >= 1 and fields["worker_opens"] >= 1
    assert b.proc.poll() is None


def test_one_uid_cannot_fill_the_workers(start_broker, tmp_path: Path) -> None:
    b = start_broker(policy(tmp_path), "--open-timeout", "3", "--workers", "2")
    with stallfs.stalled_mount(tmp_path / "stalled") as mnt:
        kids = []
        for n in range(3):  # the per-uid cap is a quarter of the workers, at least 1
            pid = os.fork()
            if pid == 0:
                os.setgid(NOGROUP)
                os.setuid(NOBODY)
                code, _ = try_open(b.name, f"{mnt}/f{n}")
                os._exit(code)
            kids.append(pid)
        codes = sorted(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids)
    assert errno.EAGAIN in codes and errno.ETIMEDOUT in codes
    assert b.proc.poll() is None


def test_device_opens_go_through_a_worker(start_broker, tmp_path: Path) -> None:
    b = start_broker(policy(tmp_path))
    assert run_as(NOBODY, NOGROUP, read, b.name, "/dev/null") == ""
    with Client(b.name) as c:
        assert c.status()["worker_opens"] == 1


def test_cached_name_on_a_hung_filesystem_does_not_stall_the_loop(
    start_broker, tmp_path: Path
) -> None:
    """The name is in the dentry cache (so RESOLVE_CACHED succeeds inline), but
    the server never answers stat: the loop must learn the filesystem type
    without asking it, and hand the open to a worker."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "f.txt").write_text("fine\n")
    os.chmod(tmp_path / "ok" / "f.txt", 0o600)
    b = start_broker(policy(tmp_path), "--open-timeout", "2", "--workers", "8")
    with stallfs.stalled_mount(tmp_path / "stalled", lookups=True) as mnt:
        target = f"{mnt}/cached.txt"
        # The first open walks the name into the cache, on a worker; it hangs in stat.
        assert run_as(NOBODY, NOGROUP, try_open, b.name, target)[0] == errno.ETIMEDOUT
        stuck = os.fork()
        if stuck == 0:  # now the name is cached: an inline walk succeeds
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            code, _ = try_open(b.name, target)
            os._exit(0 if code == errno.ETIMEDOUT else 1)
        time.sleep(0.3)
        for _ in range(10):  # served while that open hangs in a worker
            assert run_as(NOBODY, NOGROUP, read, b.name, str(tmp_path / "ok" / "f.txt")) == "fine\n"
        _, status = os.waitpid(stuck, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert b.proc.poll() is None


def test_truncating_opens_go_through_a_worker(start_broker, tmp_path: Path) -> None:
    """Freeing a large file's blocks takes long even on a local disk."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"x" * 1_000_000)
    b = start_broker(f"""
        version = 1
        [[allow]]
        name = "nobody rewrites big.bin"
        users = ["nobody"]
        paths = ["{target}"]
        access = ["read", "write", "create", "truncate"]
    """)

    def rewrite() -> None:
        with open_privileged(str(target), "r+", socket=b.name) as f:  # no truncate: inline
            f.write("y")
        with open_privileged(str(target), "w", socket=b.name) as f:  # truncates: a worker
            f.write("new")

    run_as(NOBODY, NOGROUP, rewrite)
    assert target.read_text() == "new"
    with Client(b.name) as c:
        fields = c.status()
    assert fields["worker_opens"] == 1 and fields["allowed"] == 2
