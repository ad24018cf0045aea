"""The opener's rules that no other test pinned (issue 14), and the visibility
check of invariant 9 on its own (docs/security.md).

- A created file has mode 0 until it belongs to the client: fchown first (to
  the client's uid and gid), then fchmod to the rule's mode, whatever the
  umask. Seen at the moment of each call, by wrapping os.fchown and os.fchmod.
- visible.may_search is the kernel's MAY_EXEC check on a directory, without
  capabilities: owner, group class (supplementary groups, a partial list at
  its worst), other, and POSIX ACL entries.
- Through the opener: below a directory the client cannot search every
  failure is one EACCES; where it can, the errno stays; a path that changed
  between the two walks is EAGAIN.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from privbroker.broker.files import visible
from privbroker.broker.files.opener import Opener
from privbroker.broker.policy.decision import Subject
from privbroker.protocol import Access, OpenItem
from tests.support.opener_fakes import FakePolicy, close

R, W, C = Access.READ, Access.WRITE, Access.CREATE
CLIENT = 65534


@pytest.fixture(scope="module")
def opener() -> Opener:
    return Opener()


@pytest.fixture(params=[0o000, 0o022, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_a_new_file_has_mode_0_until_it_is_the_clients(
    opener: Opener, tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int, int, int]] = []
    real_fchown, real_fchmod = os.fchown, os.fchmod

    def fchown(fd: int, uid: int, gid: int) -> None:
        st = os.fstat(fd)
        seen.append(("fchown", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        real_fchown(fd, uid, gid)

    def fchmod(fd: int, mode: int) -> None:
        st = os.fstat(fd)
        seen.append(("fchmod", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchown", fchown)
    monkeypatch.setattr(os, "fchmod", fchmod)
    path = tmp_path / "new.txt"
    opened = opener.open(
        FakePolicy(str(tmp_path), create_mode=0o640), OpenItem(str(path), W | C), CLIENT, CLIENT
    )
    try:
        assert opened.result.errno == 0 and opened.created, opened.result
        # While root's, nobody but root could open it: mode 0, whatever the umask.
        assert seen[0] == ("fchown", 0, 0, 0), seen
        # Then the mode, once it is the client's.
        assert seen[1] == ("fchmod", 0, CLIENT, CLIENT), seen
        st = os.fstat(opened.fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, CLIENT, CLIENT)
    finally:
        close(opened)


# ------------------------------------------------------------ may_search


def _st(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, uid, gid, 0, 0, 0, 0))


ME = Subject(1000, 1000, frozenset({1000, 50}))
PARTIAL = Subject(1000, 1000, frozenset({1000}), groups_complete=False)
U, G, M, OTH = 0x02, 0x08, 0x10, 0x20  # ACL tags: user, group, mask, other
GO = 0x04  # group_obj


@pytest.mark.parametrize(
    ("st", "who", "acl", "ok"),
    [
        (_st(0o700), ME, None, False),  # root's: other class, no x
        (_st(0o701), ME, None, True),
        (_st(0o070, uid=1000), ME, None, False),  # the owner's bits only, even if others have x
        (_st(0o100, uid=1000), ME, None, True),
        (_st(0o710, gid=50), ME, None, True),  # a supplementary group
        (_st(0o701, gid=50), ME, None, False),  # group class refuses: "other" not asked
        (_st(0o701, gid=60), PARTIAL, None, False),  # maybe in group 60, which refuses
        (_st(0o711, gid=60), PARTIAL, None, True),
        (_st(0o700), Subject(0, 0, frozenset({0})), None, True),  # root
        # ACLs: a named user entry, masked; a named group; the mask itself.
        (_st(0o710), ME, [(1, 7, 0), (U, 1, 1000), (GO, 0, 0), (M, 1, 0), (OTH, 0, 0)], True),
        (_st(0o755), ME, [(1, 7, 0), (U, 0, 1000), (GO, 5, 0), (M, 5, 0), (OTH, 5, 0)], False),
        (_st(0o700), ME, [(1, 7, 0), (U, 1, 1000), (GO, 0, 0), (M, 0, 0), (OTH, 0, 0)], False),
        (_st(0o715), ME, [(1, 7, 0), (GO, 0, 0), (G, 0, 50), (M, 1, 0), (OTH, 5, 0)], False),
        (_st(0o710), ME, [(1, 7, 0), (GO, 0, 0), (G, 1, 50), (M, 1, 0), (OTH, 0, 0)], True),
    ],
)
def test_may_search(st: os.stat_result, who: Subject, acl: list | None, ok: bool) -> None:
    assert visible.may_search(st, who, acl) is ok


# ------------------------------------------------------- through the opener


@pytest.fixture
def hidden() -> Iterator[Path]:
    """pub (0700 root) and open (0755), each with a file f, in a directory
    every uid may search (pytest's tmp_path is root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="pb-visible-", dir="/tmp"))
    top.chmod(0o755)
    try:
        for name, mode in (("pub", 0o700), ("open", 0o755)):
            d = top / name
            d.mkdir()
            (d / "f").write_text("x")
            d.chmod(mode)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _ask(opener: Opener, path: Path, access: Access = R) -> tuple[int, bool, str]:
    who = Subject(CLIENT, CLIENT, frozenset({CLIENT}))
    opened = opener.open(
        FakePolicy(str(path.parent.parent)), OpenItem(str(path), access), CLIENT, CLIENT, who=who
    )
    close(opened)
    return opened.result.errno, opened.result.denied, opened.result.reason


@pytest.mark.parametrize(
    ("rel", "code"),
    [("absent", errno.ENOENT), ("f/x", errno.ENOTDIR), ("absent/x", errno.ENOENT)],
)
def test_through_the_opener(opener: Opener, hidden: Path, rel: str, code: int) -> None:
    assert _ask(opener, hidden / "open" / rel)[:2] == (code, False)
    got = _ask(opener, hidden / "pub" / rel)
    assert got[:2] == (errno.EACCES, True) and rel.split("/")[0] not in got[2]
    # Created below a hidden directory: the file gets made (the rule grants it);
    # a parent that is missing there is the one denial too.
    assert _ask(opener, hidden / "pub" / "absent" / "new", W | C)[:2] == (errno.EACCES, True)
    assert _ask(opener, hidden / "open" / "absent" / "new", W | C)[:2] == (errno.ENOENT, False)


def test_a_path_that_changed_between_the_walks(
    opener: Opener, hidden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opener's walk failed, the step walk reaches the end: EAGAIN, not the
    first walk's errno (which the step walk could not confirm)."""
    target = hidden / "open" / "later"
    real_walk = visible.walk

    def appears(path: str, who: Subject, **kw: object) -> visible.Walk:
        target.write_text("now there")
        return real_walk(path, who, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(visible, "walk", appears)
    assert _ask(opener, target)[:2] == (errno.EAGAIN, False)
