"""The C fast path's two last checks, each in a window made deterministic
(docs/security.md, invariants 1 and 2; broker/files/_fast.c `open_item`).

1. The real path (readlink of the O_PATH fd through /proc/self/fd) must be the
   requested path: a rename, or a RENAME_EXCHANGE, between resolving and
   reading the real path sends the request back to Python, nothing opened.
   The window: a preloaded shim (compiled here, LD_PRELOAD in a child
   interpreter) renames at the fast path's readlinkat, which only open_item
   calls, right after the item was resolved. Nothing in the product changes.
2. The reopened file's inode and device must be the resolved ones. In a
   child made by a raw clone(2), which runs no pthread_atfork handler, the
   fast path's held /proc/PID/fd still names the parent's table; the parent
   holds, at the child's fd numbers, an older file whose path reads the same
   (the name was since covered by a mount). The reopen gets that file: only
   the inode (same filesystem: a bind mount) or the device (another tmpfs,
   the inode number matched) tells it apart.
Each case also runs with no change, where the fast path must serve: so a
case that goes back to Python is sent back by the check under test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from privbroker.broker.files import fastpath

pytestmark = pytest.mark.skipif(
    not fastpath.available() or platform.machine() != "x86_64",
    reason="needs the built _fast module (and x86_64 for the raw clone)",
)

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* At the first readlinkat relative to a directory fd (the fast path's, in
 * open_item), rename PB_WINDOW_FROM to PB_WINDOW_TO (exchange them if
 * PB_WINDOW_EXCHANGE is set), then read the link. */
ssize_t readlinkat(int dirfd, const char *path, char *buf, size_t size) {
    static ssize_t (*real)(int, const char *, char *, size_t);
    static int done;
    if (!real)
        real = (ssize_t (*)(int, const char *, char *, size_t))dlsym(RTLD_NEXT, "readlinkat");
    const char *from = getenv("PB_WINDOW_FROM"), *to = getenv("PB_WINDOW_TO");
    if (!done && from && to && dirfd != AT_FDCWD) {
        done = 1;
        unsigned flags = getenv("PB_WINDOW_EXCHANGE") ? 2u : 0u; /* RENAME_EXCHANGE */
        if (syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, flags) != 0) _exit(97);
    }
    return real(dirfd, path, buf, size);
}
"""

# Serve one request for `path` from a table that allows it; print what happened.
COMMON = """
import json, os, socket, sys
from privbroker import protocol as proto
from privbroker.broker.files import fastpath
from privbroker.broker.files.openat2 import MountTable
from privbroker.protocol.codec import encode_result

native = fastpath.configure()

def serve_once(path):
    broker, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    broker.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    broker.setblocking(False)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
    table = {(path, 1): (flags, False, encode_result(proto.Result(rule="r")), "r")}
    item = proto.OpenItem(path, proto.Access.READ)
    client.send(proto.encode_request(proto.OpenRequest(7, (item,))))
    mounts = MountTable()
    before = sorted(os.listdir("/proc/self/fd"))
    got = native.serve(broker.fileno(), os.getuid(), os.getgid(), table, mounts.fast_ids,
                       mounts.fileno(), 8, 8, False)
    after = sorted(os.listdir("/proc/self/fd"))
    head = b""
    if got[0] == 1:
        _, fds, _ = __import__("privbroker").unix.recv_message(client, 4096, 4)
        head = os.pread(fds[0], 64, 0)
        for fd in fds:
            os.close(fd)
    return {"served": got[0] == 1, "nothing_opened": before == after, "head": head.decode()}
"""

RENAME = COMMON + "print(json.dumps(serve_once(sys.argv[1])))\n"

CLONE = (
    COMMON
    + """
import ctypes, select
libc = ctypes.CDLL(None, use_errno=True)
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 1 << 18, 0x1000

def check(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

top, variant = sys.argv[1], sys.argv[2]
check(libc.unshare(0x00020000))  # CLONE_NEWNS: these mounts are this process's
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
check(libc.mount(b"pbtest", top.encode(), b"tmpfs", 0, b"mode=0755"))
for d in ("a", "b"):
    os.mkdir(f"{top}/{d}")
    with open(f"{top}/{d}/f", "w") as f:
        f.write(f"file {d}\\n")
path = f"{top}/a/f"
go_r, go_w = os.pipe()
out_r, out_w = os.pipe()
low = os.open("/dev/null", os.O_RDONLY)  # the first number the child will use
os.close(low)
pid = libc.syscall(56, 17, 0, 0, 0, 0)  # clone(SIGCHLD): no atfork handler runs
if pid == 0:
    os.close(go_w)  # a parent that fails leaves EOF here, not a wait forever
    if os.read(go_r, 1) == b"g":
        os.write(out_w, json.dumps(serve_once(path)).encode())
    os._exit(0)
if variant != "none":
    held = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # the older a/f, at the child's numbers
    for n in range(low, low + 16):
        if n != held and n not in (go_r, go_w, out_r, out_w):
            os.dup2(held, n)
    if variant == "bind":  # the same filesystem: another inode at a/f
        check(libc.mount(f"{top}/b".encode(), f"{top}/a".encode(), None, MS_BIND, None))
    else:  # another tmpfs over a/, with a/f's inode number: another device
        want = os.fstat(held).st_ino
        check(libc.mount(b"pbtest2", f"{top}/a".encode(), b"tmpfs", 0, b"mode=0755"))
        for i in range(10000):
            fd = os.open(f"{top}/a/n{i}", os.O_CREAT | os.O_WRONLY, 0o600)
            ino = os.fstat(fd).st_ino
            os.write(fd, b"file c\\n")
            os.close(fd)
            if ino == want:
                os.rename(f"{top}/a/n{i}", path)
                break
        else:
            raise SystemExit("no inode number to match")
    # What the child's readlink will read: the requested path, so only the
    # inode or device check is left to tell the files apart.
    assert os.readlink(f"/proc/self/fd/{held}") == path, os.readlink(f"/proc/self/fd/{held}")
    if variant == "bind":
        assert os.stat(path).st_ino != os.fstat(held).st_ino
    if variant == "tmpfs":
        assert os.stat(path).st_dev != os.fstat(held).st_dev
os.write(go_w, b"g")
_, status = os.waitpid(pid, 0)
print(os.read(out_r, 4096).decode())
"""
)


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the window shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
        check=True,
    )
    return d / "shim.so"


@pytest.fixture
def hot(tmp_path: Path) -> Path:
    f = tmp_path / "hot.txt"
    f.write_text("the hot file\n")
    (tmp_path / "other.txt").write_text("another file\n")
    return f


@pytest.mark.parametrize("change", [None, "rename", "exchange"])
def test_a_rename_before_the_real_path_is_read_goes_back(
    shim: Path, hot: Path, change: str | None
) -> None:
    env = {"LD_PRELOAD": str(shim)}
    if change == "rename":
        env |= {"PB_WINDOW_FROM": str(hot), "PB_WINDOW_TO": f"{hot}.moved"}
    elif change == "exchange":
        env |= {"PB_WINDOW_FROM": str(hot), "PB_WINDOW_TO": str(hot.parent / "other.txt")}
        env["PB_WINDOW_EXCHANGE"] = "1"
    got = _run(RENAME, str(hot), env=env)
    if change is None:
        assert got == {"served": True, "nothing_opened": True, "head": "the hot file\n"}, got
        return
    # The window was really taken: the name moved at the readlink.
    if change == "rename":
        assert not hot.exists() and Path(f"{hot}.moved").exists()
    else:
        assert hot.read_text() == "another file\n"
    assert got == {"served": False, "nothing_opened": True, "head": ""}, got


@pytest.mark.parametrize("variant", ["none", "bind", "tmpfs"])
def test_a_reopen_that_meets_another_inode_goes_back(tmp_path: Path, variant: str) -> None:
    top = tmp_path / "top"
    top.mkdir()
    got = _run(CLONE, str(top), variant)
    if variant == "none":  # the parent's fds at those numbers are not a/f: readlink differs
        assert got["served"] is False and got["nothing_opened"], got
        return
    assert got == {"served": False, "nothing_opened": True, "head": ""}, got


def test_the_clone_child_is_served_when_nothing_differs(tmp_path: Path) -> None:
    """Control for the clone cases: the child's parent holds the very file
    the child resolves (no mount over it), so every check passes."""
    top = tmp_path / "top"
    top.mkdir()
    script = CLONE.replace(
        'if variant == "bind":',
        'if variant == "same":\n        pass\n    elif variant == "bind":',
        1,
    )
    got = _run(script, str(top), "same")
    assert got == {"served": True, "nothing_opened": True, "head": "file a\n"}, got
