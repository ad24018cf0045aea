"""A directory fd reaches nothing more than its holder's own permissions.

With types = ["dir"] the broker hands nobody an O_RDONLY|O_DIRECTORY fd (never
O_PATH): nobody can list the entries, but openat() relative to that fd is
still judged by the kernel against nobody's own uid, so a 0600 root file in
it, its parent through "..", or a file to create stay out of reach.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest

from privbroker import Client, PolicyDenied
from tests.adversarial._util import O_PATH, as_nobody, broker_healthy, make_root_file
from tests.support.privs import NOBODY

pytestmark = pytest.mark.adversarial


def dir_policy(root: Path, types: str) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "nobody lists the tree"
        users = [{NOBODY}]
        paths = ["{root}", "{root}/**"]
        access = ["read"]
        types = {types}
    """


def use_dir_fd(name: str, path: str) -> dict[str, object]:
    out: dict[str, object] = {}
    with Client(name) as c:
        fd = c.open_fd(path)
    try:
        st = os.fstat(fd)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        out["isdir"] = stat.S_ISDIR(st.st_mode)
        out["o_path"] = bool(fl & O_PATH)
        out["accmode"] = fl & os.O_ACCMODE
        out["cloexec"] = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        out["listdir"] = sorted(os.listdir(fd))
        with os.scandir(fd) as it:
            out["scandir"] = sorted(e.name for e in it)

        def attempt(label: str, fn) -> None:  # type: ignore[no-untyped-def]
            try:
                got = fn()
            except OSError as exc:
                out[label] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            else:
                out[label] = got

        def read_rel(rel: str, flags: int = os.O_RDONLY) -> str:
            f = os.open(rel, flags, dir_fd=fd)
            try:
                return os.read(f, 100).decode()
            finally:
                os.close(f)

        attempt("secret", lambda: read_rel("secret"))
        attempt("public", lambda: read_rel("public"))
        attempt("sub_secret", lambda: read_rel("sub/secret"))
        attempt("parent", lambda: os.listdir(os.open("..", os.O_RDONLY, dir_fd=fd)))
        attempt("parent_file", lambda: read_rel("../outside"))
        attempt(
            "create", lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        )
        attempt("via_proc", lambda: Path(f"/proc/self/fd/{fd}/secret").read_text())
        attempt("reopen_rw", lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR)))
        attempt("write_dirfd", lambda: os.write(fd, b"x"))

        def fchdir_read() -> str:
            os.fchdir(fd)
            with open("secret") as f:
                return f.read()

        attempt("fchdir", fchdir_read)
    finally:
        os.close(fd)
    return out


def test_dir_fd_lists_but_reaches_nothing_more(start_broker, tmp_path: Path) -> None:
    top = tmp_path / "top"  # tmp_path itself stays 0700 root: nobody cannot enter it
    (top / "sub").mkdir(parents=True)
    os.chmod(top, 0o755)
    os.chmod(top / "sub", 0o755)
    make_root_file(top / "secret", "ROOT SECRET\n", 0o600)
    make_root_file(top / "public", "public\n", 0o644)
    make_root_file(top / "sub" / "secret", "SUB SECRET\n", 0o600)
    make_root_file(tmp_path / "outside", "OUTSIDE\n", 0o644)
    b = start_broker(dir_policy(top, '["dir"]'))
    got = as_nobody(use_dir_fd, b.name, str(top))
    assert got["isdir"] and not got["o_path"] and got["accmode"] == os.O_RDONLY
    assert got["cloexec"]
    assert got["listdir"] == got["scandir"] == ["public", "secret", "sub"]
    # nobody's own permissions, and nothing more:
    assert got["public"] == "public\n"  # 0644: nobody could read it anyway
    assert got["secret"] == "EACCES"
    assert got["sub_secret"] == "EACCES"
    assert got["parent"] == "EACCES"  # tmp_path is 0700 root
    assert got["parent_file"] == "EACCES"
    assert got["create"] == "EACCES"
    assert got["via_proc"] == "EACCES"
    assert got["reopen_rw"] in ("EACCES", "EISDIR")
    assert got["write_dirfd"] in ("EBADF", "EISDIR")
    assert got["fchdir"] == "EACCES"
    assert not (top / "new").exists()
    broker_healthy(b)


def test_dir_fd_of_a_root_only_directory(start_broker, tmp_path: Path) -> None:
    """A 0700 root directory: listing works through the fd the broker opened,
    but nobody has no search permission, so not even a 0644 file opens."""
    top = tmp_path / "private"
    top.mkdir()
    os.chmod(top, 0o700)
    make_root_file(top / "secret", "ROOT SECRET\n", 0o600)
    make_root_file(top / "public", "public\n", 0o644)
    (top / "sub").mkdir()
    make_root_file(top / "sub" / "secret", "x\n")
    make_root_file(tmp_path / "outside", "OUTSIDE\n", 0o644)
    b = start_broker(dir_policy(top, '["dir"]'))
    got = as_nobody(use_dir_fd, b.name, str(top))
    assert got["listdir"] == ["public", "secret", "sub"]
    for key in (
        "secret",
        "public",
        "sub_secret",
        "parent",
        "parent_file",
        "create",
        "via_proc",
        "fchdir",
    ):
        assert got[key] == "EACCES", (key, got[key])
    broker_healthy(b)


def dir_refusals(name: str, top: str) -> dict[str, str]:
    out = {}
    with Client(name) as c:
        for label, path, mode in (
            ("dir_as_file_rule", top, "r"),
            ("dir_write", top, "r+"),
            ("dir_append", top, "a"),
        ):
            try:
                os.close(c.open_fd(path, mode))
                out[label] = "opened"
            except PolicyDenied:
                out[label] = "denied"
            except OSError as exc:
                out[label] = errno.errorcode.get(exc.errno or 0, "?")
    return out


def test_no_dir_fd_without_type_dir(start_broker, tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    make_root_file(top / "f", "f\n")
    b = start_broker(dir_policy(top, '["file"]'))
    got = as_nobody(dir_refusals, b.name, str(top))
    assert got["dir_as_file_rule"] == "denied", got
    assert got["dir_write"] != "opened" and got["dir_append"] != "opened", got
    broker_healthy(b)
