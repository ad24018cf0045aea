"""No errno oracle (docs/security.md, invariant 9), through a real broker.

With `pub/**/*.txt` granted to nobody and `pub` root-only (0700), a failure
below `pub` (a missing name, a file used as a directory, a symlink) must
answer what nobody's own stat answers there: EACCES, as a denial, with a
reason that names nothing that is there. Under a directory nobody can
search itself, the kernel's errno stays: it could learn it anyway.
Search permission counts the client's supplementary groups (SO_PEERGROUPS)
and the directory's ACL. The C fast path serves only files Python opened
before; once such a file is gone, the request comes back to Python and gets
the same single EACCES.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privbroker.protocol import Access
from tests.adversarial._fastpath import Got, fetch, make_hot, policy
from tests.adversarial._util import as_nobody, broker_healthy, make_root_file
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial

R = Access.READ
GROUP = 61777  # a supplementary group that may search `grp`

# What nobody asks for under each directory, and the errno it meets where it can look.
CASES = {
    "absent/x.txt": errno.ENOENT,
    "absent.txt": errno.ENOENT,
    "secret.key/x.txt": errno.ENOTDIR,
    "lnk/x.txt": errno.ELOOP,
}


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """system.posix_acl_access: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every uid may search (pytest's tmp_path is root's alone), holding
    the same tree under directories of several kinds:
    pub (0700 root), open (0755), grp (0750 root:GROUP), acl_in (0700 with an
    ACL entry that lets nobody search), acl_out (0755 with one that does not)."""
    top = Path(tempfile.mkdtemp(prefix="pb-oracle-", dir="/tmp"))
    top.chmod(0o755)
    try:
        for name, mode in (("pub", 0o700), ("open", 0o755), ("grp", 0o750)):
            _tree(top / name, mode)
        os.chown(top / "grp", 0, GROUP)
        _tree(top / "acl_in", 0o700)
        _tree(top / "acl_out", 0o755)
        try:
            os.setxattr(
                top / "acl_in",
                "system.posix_acl_access",
                _acl(
                    (USER_OBJ, 7, NO_ID),
                    (USER, 1, NOBODY),
                    (GROUP_OBJ, 0, NO_ID),
                    (MASK, 1, NO_ID),
                    (OTHER, 0, NO_ID),
                ),
            )
            os.setxattr(
                top / "acl_out",
                "system.posix_acl_access",
                _acl(
                    (USER_OBJ, 7, NO_ID),
                    (USER, 0, NOBODY),
                    (GROUP_OBJ, 5, NO_ID),
                    (MASK, 5, NO_ID),
                    (OTHER, 5, NO_ID),
                ),
            )
        except OSError:
            shutil.rmtree(top / "acl_in")
            shutil.rmtree(top / "acl_out")
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _tree(d: Path, mode: int) -> None:
    d.mkdir()
    make_root_file(d / "x.txt", "granted\n")
    make_root_file(d / "secret.key", "not a directory\n")
    (d / "lnk").symlink_to("/")
    d.chmod(mode)


def _grant(top: Path) -> str:
    return policy([f"{top}/*/**/*.txt"], name="pub texts")


def own_errno(path: str) -> int:
    """What the client's own stat says (0: it is there)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _ask_all(name: str, paths: list[str]) -> tuple[list[Got], list[int]]:
    got = fetch(name, [(p, R) for p in paths])
    return got, [own_errno(p) for p in paths]


def _assert_unseen(g: Got, path: str, top: Path) -> None:
    assert (g.errno, g.denied) == (errno.EACCES, True), (path, g)
    rest = path[len(str(top)) :]
    for word in ("absent", "secret", "lnk", "x.txt", rest):
        assert word not in g.reason, (path, g.reason)


def test_failures_below_a_root_only_directory_are_one_denial(start_broker: Any, base: Path) -> None:
    b = start_broker(_grant(base))
    paths = [f"{base}/pub/{rel}" for rel in CASES]
    got, own = as_nobody(_ask_all, b.name, paths)
    for path, g, mine in zip(paths, got, own, strict=True):
        assert mine == errno.EACCES, (path, mine)  # nobody's own stat
        _assert_unseen(g, path, base)
    # The granted file there is still handed out: the grant is the point.
    (ok,) = as_nobody(fetch, b.name, [(f"{base}/pub/x.txt", R)])
    assert ok.errno == 0 and ok.head == b"granted\n"
    broker_healthy(b)


def test_failures_where_the_client_can_look_keep_their_errno(start_broker: Any, base: Path) -> None:
    b = start_broker(_grant(base))
    paths = [f"{base}/open/{rel}" for rel in CASES]
    got, own = as_nobody(_ask_all, b.name, paths)
    for want, path, g, mine in zip(CASES.values(), paths, got, own, strict=True):
        assert (g.errno, g.denied) == (want, False), (path, g)
        if want != errno.ELOOP:  # its own stat follows the symlink; its lstat sees it
            assert mine == want, (path, mine)
    assert stat.S_ISLNK(as_nobody(lambda: os.lstat(f"{base}/open/lnk").st_mode))
    broker_healthy(b)


def test_supplementary_groups_and_acls_count(start_broker: Any, base: Path) -> None:
    b = start_broker(_grant(base))
    path = f"{base}/grp/absent/x.txt"
    # In GROUP (a supplementary group, read from SO_PEERGROUPS): it may look.
    (g,) = run_as(NOBODY, NOGROUP, fetch, b.name, [(path, R)], groups=(GROUP,))
    assert (g.errno, g.denied) == (errno.ENOENT, False), g
    assert run_as(NOBODY, NOGROUP, own_errno, path, groups=(GROUP,)) == errno.ENOENT
    # Not in it: it may not.
    (g,) = as_nobody(fetch, b.name, [(path, R)])
    _assert_unseen(g, path, base)
    if not (base / "acl_in").exists():
        pytest.skip("this filesystem takes no POSIX ACLs")
    for d, visible in (("acl_in", True), ("acl_out", False)):
        path = f"{base}/{d}/absent/x.txt"
        (g,) = as_nobody(fetch, b.name, [(path, R)])
        mine = as_nobody(own_errno, path)
        if visible:
            assert mine == errno.ENOENT and (g.errno, g.denied) == (errno.ENOENT, False), (d, g)
        else:
            assert mine == errno.EACCES, (d, mine)
            _assert_unseen(g, path, base)
    broker_healthy(b)


def test_a_second_judgement_below_a_hidden_directory_says_nothing(
    start_broker: Any, base: Path
) -> None:
    """A name the rule grants that is a directory, or a file with two names:
    the real-path judgement would say so; below pub it is the one denial."""
    for d in ("pub", "open"):
        (base / d / "dir.txt").mkdir()
        os.link(base / d / "x.txt", base / d / "twice.txt")
    b = start_broker(_grant(base))
    for rel in ("dir.txt", "twice.txt"):
        (hidden,) = as_nobody(fetch, b.name, [(f"{base}/pub/{rel}", R)])
        _assert_unseen(hidden, f"{base}/pub/{rel}", base)
        (seen,) = as_nobody(fetch, b.name, [(f"{base}/open/{rel}", R)])
        assert seen.errno == errno.EACCES and seen.denied
        assert seen.reason != hidden.reason  # where it can look, the real reason
    broker_healthy(b)


def test_the_fast_path_sends_a_vanished_file_back_to_the_same_answer(
    start_broker: Any, base: Path
) -> None:
    b = start_broker(_grant(base))
    hot = base / "pub" / "x.txt"
    make_hot(b, hot)  # served by _fast.c from now on
    hot.unlink()
    (g,) = as_nobody(fetch, b.name, [(str(hot), R)])
    _assert_unseen(g, str(hot), base)
    broker_healthy(b)
