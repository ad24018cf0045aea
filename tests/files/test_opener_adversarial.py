"""The opener against a client who lies with the filesystem.

Symlinks out of the allowed tree, magic links, procfs, symlinks planted where
a file is to be created, a directory swapped for a symlink while opening,
faults in the middle of an open (no fd may leak), and a kernel without openat2.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from privbroker.broker.files import openat2 as o2
from privbroker.broker.files.opener import Opener, OpenerUnavailable
from privbroker.broker.policy.decision import FileType
from privbroker.protocol import Access
from tests.support.opener_fakes import RULE, FakePolicy, allow_all, close, do_open

F_SETLEASE = 1024  # linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 0)
R, W, A, C, T = Access.READ, Access.WRITE, Access.APPEND, Access.CREATE, Access.TRUNCATE


@pytest.fixture(scope="module")
def opener() -> Opener:
    return Opener()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """allowed/{secret, inside/file}, and outside/target beside it."""
    root = tmp_path / "allowed"
    (root / "inside").mkdir(parents=True)
    (root / "secret").write_text("inside\n")
    (root / "inside" / "file").write_text("inside file\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "target").write_text("outside\n")
    return root


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------- symlinks


def test_symlink_out_is_eloop_without_follow(opener: Opener, tree: Path) -> None:
    (tree / "link").symlink_to(tree.parent / "outside" / "target")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "link", R)
    assert opened.result.errno == errno.ELOOP and not opened.result.denied
    assert opened.result.reason == (
        f"symlink on the path and rule {RULE!r} does not follow symlinks"
    )


def test_symlink_inside_is_eloop_without_follow(opener: Opener, tree: Path) -> None:
    (tree / "link").symlink_to("secret")
    assert do_open(opener, FakePolicy(str(tree)), tree / "link", R).result.errno == errno.ELOOP


def test_followed_symlink_out_is_denied_on_its_target(opener: Opener, tree: Path) -> None:
    (tree / "link").symlink_to(tree.parent / "outside" / "target")
    policy = FakePolicy(str(tree), follow_symlinks=True)
    opened = do_open(opener, policy, tree / "link", R)
    assert opened.result.denied and opened.fd == -1
    assert policy.calls[-1] == (str(tree.parent / "outside" / "target"), R, FileType.FILE)
    # Denied on the target, without saying where it is or which rule spoke.
    assert opened.result.reason.startswith("the path leads through a symlink to something")
    assert "outside" not in opened.result.reason and opened.result.rule is None


def test_followed_symlink_in_is_allowed_with_its_real_path(opener: Opener, tree: Path) -> None:
    (tree / "link").symlink_to("inside/file")
    opened = do_open(opener, FakePolicy(str(tree), follow_symlinks=True), tree / "link", R)
    try:
        assert opened.result.errno == 0
        assert opened.real_path == str(tree / "inside" / "file")
        assert os.pread(opened.fd, 100, 0) == b"inside file\n"
    finally:
        close(opened)


def test_symlinked_directory_component_is_refused(opener: Opener, tree: Path) -> None:
    (tree / "dirlink").symlink_to(tree / "inside")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "dirlink" / "file", R)
    assert opened.result.errno == errno.ELOOP


def test_create_under_a_symlinked_directory_is_refused(opener: Opener, tree: Path) -> None:
    (tree / "dirlink").symlink_to(tree.parent / "outside")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "dirlink" / "new", W | C)
    assert opened.result.errno == errno.ELOOP
    policy = FakePolicy(str(tree), follow_symlinks=True)
    opened = do_open(opener, policy, tree / "dirlink" / "new", W | C)
    assert opened.result.denied  # followed, and the real parent is outside
    assert not (tree.parent / "outside" / "new").exists()


def test_create_through_a_followed_directory_symlink_inside(opener: Opener, tree: Path) -> None:
    (tree / "dirlink").symlink_to("inside")
    policy = FakePolicy(str(tree), follow_symlinks=True)
    opened = do_open(opener, policy, tree / "dirlink" / "new", W | C)
    try:
        assert opened.created and opened.real_path == str(tree / "inside" / "new")
    finally:
        close(opened)


@pytest.mark.parametrize("follow", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
def test_planted_symlink_at_a_create_name_is_never_followed(
    opener: Opener, tmp_path: Path, follow: bool, exclusive: bool
) -> None:
    outside = Path("/etc/newfile-outside")
    assert not outside.exists()
    (tmp_path / "dangling").symlink_to(outside)
    (tmp_path / "existing").symlink_to(tmp_path / "victim")
    policy = allow_all(follow_symlinks=follow)
    try:
        opened = do_open(opener, policy, tmp_path / "dangling", W | C, exclusive)
        assert opened.fd == -1 and not outside.exists()
        if follow:  # through a symlink: one denial for every failure
            assert opened.result.errno == errno.EACCES and opened.result.denied
        else:
            assert opened.result.errno == (errno.EEXIST if exclusive else errno.ELOOP)
        opened = do_open(opener, policy, tmp_path / "existing", W | C, exclusive)
        assert opened.fd == -1 and not (tmp_path / "victim").exists()
    finally:
        outside.unlink(missing_ok=True)


# --------------------------------------------------------- procfs, magic links


def test_followed_lookups_fail_alike_whatever_lies_beyond(opener: Opener, tmp_path: Path) -> None:
    """Resolving as root through a client's symlink must not map, for that
    client, what exists where it cannot look (a 0700 root directory)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "file").write_text("x")
    probes = {
        "missing": private / "nothing",
        "file": private / "file",
        "under-a-file": private / "file" / "x",
        "dir": private,
    }
    answers = set()
    for name, target in probes.items():
        (tmp_path / name).symlink_to(target)
        policy = FakePolicy(str(tmp_path / name), follow_symlinks=True)  # only the link
        opened = do_open(opener, policy, tmp_path / name, R)
        assert opened.fd == -1
        answers.add((opened.result.errno, opened.result.denied, opened.result.reason))
    assert len(answers) == 1 and next(iter(answers))[0] == errno.EACCES


@pytest.mark.parametrize(
    ("path", "follow", "code"),
    [
        ("/proc/self/environ", False, errno.ELOOP),  # /proc/self is a symlink
        ("/proc/self/environ", True, errno.EACCES),  # ... to procfs, refused anyway
        ("/proc/self/mem", True, errno.EACCES),
        # A magic link is never followed; through a symlink every failure is
        # the same denial (nothing about what lies beyond leaks).
        ("/proc/self/fd/0", True, errno.EACCES),
        ("/proc/self/fd/0", False, errno.ELOOP),
        ("/dev/fd/0", True, errno.EACCES),
        ("/dev/stdin", True, errno.EACCES),
        ("/proc/self/cwd/etc/passwd", True, errno.EACCES),
        (f"/proc/{os.getpid()}/environ", False, errno.EACCES),  # no link at all
        (f"/proc/{os.getpid()}/fd", False, errno.EACCES),
        ("/proc/cpuinfo", False, errno.EACCES),
        ("/proc/sys/kernel/hostname", False, errno.EACCES),
    ],
)
def test_procfs_and_magic_links_are_refused_whatever_the_policy(
    opener: Opener, path: str, follow: bool, code: int
) -> None:
    opened = do_open(opener, allow_all(follow_symlinks=follow), path, R)
    assert opened.fd == -1 and opened.result.errno == code
    assert opened.result.denied == (code == errno.EACCES)


def test_creating_on_procfs_is_refused(opener: Opener) -> None:
    opened = do_open(opener, allow_all(follow_symlinks=False), "/proc/newfile", W | C)
    assert opened.result.errno == errno.EACCES and opened.result.denied


# ----------------------------------------------- a denial touches nothing


def test_denied_request_never_touches_the_filesystem(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(tree / "fifo")  # were it opened plainly, this would block forever

    def forbidden(*args: object, **kw: object) -> int:
        raise AssertionError("the filesystem was touched for a denied request")

    monkeypatch.setattr(o2, "openat2", forbidden)
    monkeypatch.setattr(o2, "fs_type", forbidden)
    monkeypatch.setattr(os, "open", forbidden)
    monkeypatch.setattr(os, "readlink", forbidden)
    for path in (tree / "fifo", tree / "absent", tree.parent / "outside" / "target"):
        opened = do_open(opener, FakePolicy("/nowhere"), path, R)
        assert opened.result.denied and opened.result.errno == errno.EACCES


# ------------------------------------------------------------- the race


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)


def _exchange(a: Path, b: Path) -> None:
    if (
        _libc.renameat2(o2.AT_FDCWD, os.fsencode(a), o2.AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.adversarial
@pytest.mark.parametrize("follow", [False, True])
def test_directory_swapped_for_a_symlink_never_escapes(
    opener: Opener, tmp_path: Path, follow: bool
) -> None:
    """allowed/d flips between a real directory holding `passwd` and a symlink to /etc."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "d").mkdir()
    (allowed / "d" / "passwd").write_text("decoy\n")
    (allowed / "swap").symlink_to("/etc")
    inside = os.stat(allowed / "d" / "passwd")
    policy = FakePolicy(str(allowed), follow_symlinks=follow)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            _exchange(allowed / "d", allowed / "swap")

    flipper = threading.Thread(target=flip)
    flipper.start()
    outcomes: dict[int, int] = {}
    try:
        # At least 2000 opens, and on until both outcomes were seen (bounded).
        for i in range(20_000):
            if i >= 2000 and outcomes.get(0) and len(outcomes) > 1:
                break
            opened = do_open(opener, policy, allowed / "d" / "passwd", R)
            outcomes[opened.result.errno] = outcomes.get(opened.result.errno, 0) + 1
            if opened.fd >= 0:
                try:
                    st = os.fstat(opened.fd)
                    assert (st.st_dev, st.st_ino) == (inside.st_dev, inside.st_ino)
                    assert opened.real_path is not None
                    assert opened.real_path.startswith(str(allowed) + "/")
                finally:
                    close(opened)
            else:
                assert opened.result.errno in (
                    errno.ELOOP,
                    errno.EACCES,
                    errno.ENOENT,
                    errno.EAGAIN,
                ), opened.result
    finally:
        stop.set()
        flipper.join()
    assert outcomes.get(0, 0) > 0, outcomes  # the race really ran both ways
    assert sum(outcomes.values()) > outcomes.get(0, 0), outcomes


# ------------------------------------------------ fd accounting, faults


def _mixed_calls(opener: Opener, tree: Path, n: int) -> None:
    os.mkfifo(tree / "fifo")
    os.link(tree / "secret", tree / "hard")
    (tree / "link").symlink_to("secret")
    strict = FakePolicy(str(tree), types=frozenset({FileType.FILE, FileType.FIFO, FileType.DIR}))
    follow = FakePolicy(str(tree), follow_symlinks=True)
    cases: list[tuple[FakePolicy, str, Access, bool]] = [
        (strict, "secret", R, False),  # ok
        (strict, "secret", W | T, False),  # ok
        (strict, "new", W | C, False),  # created (removed below)
        (strict, "secret", W | C, True),  # EEXIST
        (strict, "absent", R, False),  # ENOENT
        (strict, "secret/x", R, False),  # ENOTDIR
        (strict, "link", R, False),  # ELOOP
        (follow, "link", R, False),  # ok
        (strict, "hard", R, False),  # hard link denial
        (strict, "fifo", R, False),  # ok, FIFO
        (strict, "fifo", W, False),  # ENXIO
        (strict, "inside", W, False),  # EISDIR
        (FakePolicy("/nowhere"), "secret", R, False),  # pre-decision denial
        (allow_all(), "/proc/self/environ", R, False),  # procfs
        (strict, "", R, False),  # EINVAL (trailing slash)
    ]
    for i in range(n):
        policy, name, access, excl = cases[i % len(cases)]
        path = name if name.startswith("/") else f"{tree}/{name}"
        opened = do_open(opener, policy, path, access, excl)
        close(opened)
        if opened.created:
            os.unlink(path)


def test_no_fd_leaks_across_a_thousand_mixed_calls(opener: Opener, tree: Path) -> None:
    before = _fds()
    _mixed_calls(opener, tree, 1000)
    assert _fds() == before


@pytest.mark.parametrize(
    ("module", "victim"),
    [
        (os, "fstat"),
        (os, "readlink"),
        (os, "open"),
        (os, "fchown"),
        (os, "fchmod"),
        (os, "ftruncate"),
        (o2, "openat2"),
        (o2, "fs_type"),
    ],
)
def test_a_fault_at_any_step_closes_everything(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch, module: object, victim: str
) -> None:
    """The k-th call of one syscall fails: an errno result, no fd left, no file left."""
    real = getattr(module, victim)
    count = {"n": 0, "fail_at": -1}

    def failing(*args: object, **kw: object) -> object:
        count["n"] += 1
        if count["n"] - 1 == count["fail_at"]:
            raise OSError(errno.EIO, "injected")
        return real(*args, **kw)

    before = _fds()
    injected = 0
    for k in range(4):
        for access, name in ((W | T, "secret"), (W | C, "new")):
            count.update(n=0, fail_at=k)
            monkeypatch.setattr(module, victim, failing)
            opened = do_open(opener, FakePolicy(str(tree)), tree / name, access)
            monkeypatch.undo()
            if opened.result.errno:
                injected += opened.result.errno == errno.EIO
                assert opened.fd == -1
                assert not (tree / "new").exists()  # a half-made file is removed
            else:
                close(opened)
                (tree / "new").unlink(missing_ok=True)
            assert _fds() == before, (k, name)
    assert injected > 0


def test_reopened_inode_must_be_the_checked_one(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fstat = os.fstat
    seen = {"n": 0}

    def lying_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        seen["n"] += 1
        if seen["n"] == 2:  # the re-fstat of the reopened fd
            fields = list(st)
            fields[1] += 1  # st_ino
            return os.stat_result(fields)
        return st

    before = _fds()
    monkeypatch.setattr(os, "fstat", lying_fstat)
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", W | T)
    monkeypatch.undo()
    assert opened.result.errno == errno.EAGAIN and opened.fd == -1
    assert (tree / "secret").read_text() == "inside\n"  # not truncated
    assert _fds() == before


def test_lost_create_race_retries_then_eagain(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that always exists at create time but never at resolve time: bounded."""
    real = o2.openat2

    def racing(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
        if flags & os.O_CREAT:
            raise FileExistsError(errno.EEXIST, "raced")
        return real(dirfd, path, flags, resolve, mode)

    before = _fds()
    monkeypatch.setattr(o2, "openat2", racing)
    opened = do_open(opener, FakePolicy(str(tree)), tree / "new", W | C)
    monkeypatch.undo()
    assert opened.result.errno == errno.EAGAIN
    assert _fds() == before


def test_resolution_eagain_is_retried_a_bounded_number_of_times(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries = {"n": 0}

    def busy(*args: object, **kw: object) -> int:
        tries["n"] += 1
        raise BlockingIOError(errno.EAGAIN, "rename in progress")

    monkeypatch.setattr(o2, "openat2", busy)
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", R)
    assert opened.result.errno == errno.EAGAIN and 1 < tries["n"] <= 64


def test_real_path_is_judged_even_without_symlinks(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed out of the tree between resolution and readlink: the real path decides."""
    elsewhere = str(tree.parent / "outside" / "secret")
    monkeypatch.setattr(os, "readlink", lambda path: elsewhere)
    policy = FakePolicy(str(tree))
    opened = do_open(opener, policy, tree / "secret", R)
    assert opened.result.denied and opened.fd == -1
    # Denied on the target, without saying where it is or which rule spoke.
    assert opened.result.reason.startswith("the path leads through a symlink to something")
    assert "outside" not in opened.result.reason and opened.result.rule is None
    assert policy.calls[-1] == (elsewhere, R, FileType.FILE)


def test_directory_moved_during_create_removes_the_file(
    opener: Opener, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.readlink
    calls = {"n": 0}

    def moved(path: str) -> str:
        calls["n"] += 1
        return real(path) if calls["n"] == 1 else "/somewhere/else/new"  # 2nd: the new file

    before = _fds()
    monkeypatch.setattr(os, "readlink", moved)
    opened = do_open(opener, FakePolicy(str(tree)), tree / "new", W | C, exclusive=True)
    monkeypatch.undo()
    assert opened.result.errno == errno.EAGAIN and opened.fd == -1
    assert not (tree / "new").exists()
    assert _fds() == before


def test_leased_file_is_eagain_at_once_not_a_hang(opener: Opener, tree: Path) -> None:
    """open(2) would wait up to lease-break-time (45 s) for the holder; we never wait."""
    old = signal.signal(signal.SIGIO, lambda *args: None)  # the holder is told by SIGIO
    holder = os.open(tree / "secret", os.O_RDWR)
    try:
        fcntl.fcntl(holder, F_SETLEASE, fcntl.F_WRLCK)
        start = time.monotonic()
        opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", R)
        assert opened.result.errno == errno.EAGAIN and opened.fd == -1
        assert time.monotonic() - start < 5
    finally:
        fcntl.fcntl(holder, F_SETLEASE, fcntl.F_UNLCK)
        os.close(holder)
        signal.signal(signal.SIGIO, old)


# ----------------------------------------------------------- no openat2


def test_unavailable_when_openat2_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(o2, "SYS_OPENAT2", 100_000)  # no such syscall: ENOSYS
    with pytest.raises(OpenerUnavailable, match="openat2 is missing"):
        Opener()


def test_unavailable_on_an_unknown_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(o2, "SYS_OPENAT2", None)
    with pytest.raises(OpenerUnavailable, match="ENOSYS"):
        Opener()


def test_unavailable_when_seccomp_blocks_openat2(monkeypatch: pytest.MonkeyPatch) -> None:
    def blocked(*args: object, **kw: object) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(o2, "openat2", blocked)
    with pytest.raises(OpenerUnavailable, match=r"blocked .*seccomp"):
        Opener()
