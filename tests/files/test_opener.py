"""The opener on ordinary requests: flags, creation, file types, errors.

Real files in tmp_path, opened as root through a FakePolicy (tests/opener_fakes.py).
Symlinks, procfs, races and fd accounting are in test_opener_adversarial.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from privbroker.broker.files.opener import Opener
from privbroker.broker.policy.decision import FileType
from privbroker.protocol import Access
from tests.support.opener_fakes import ALL_TYPES, RULE, FakePolicy, close, do_open
from tests.support.privs import NOBODY, NOGROUP, run_as

R, W, A, C, T = Access.READ, Access.WRITE, Access.APPEND, Access.CREATE, Access.TRUNCATE


@pytest.fixture(scope="module")
def opener() -> Opener:
    return Opener()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "secret").write_text("root only\n")
    os.chmod(root / "secret", 0o600)
    return root


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def test_reads_a_0600_root_file(opener: Opener, tree: Path) -> None:
    policy = FakePolicy(str(tree))
    opened = do_open(opener, policy, tree / "secret", R)
    try:
        assert opened.result.errno == 0 and not opened.result.denied
        assert opened.real_path == str(tree / "secret")
        assert opened.ftype is FileType.FILE and not opened.created
        assert _read_fd(opened.fd) == b"root only\n"
        # Judged twice: on the name before any syscall, on the file after.
        assert policy.calls == [
            (str(tree / "secret"), R, None),
            (str(tree / "secret"), R, FileType.FILE),
        ]
    finally:
        close(opened)


def test_fd_is_usable_by_an_unprivileged_process(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", R)
    try:
        # What the client gets: nobody reads a file it could never open.
        assert run_as(NOBODY, NOGROUP, _read_fd, opened.fd) == b"root only\n"
    finally:
        close(opened)


@pytest.mark.parametrize(
    "access", [Access.CREATE, Access.TRUNCATE, Access.CREATE | Access.TRUNCATE]
)
def test_create_or_truncate_alone_opens_nothing(opener: Opener, tree: Path, access: Access) -> None:
    """Without read, write or append there is nothing the fd may be for: a
    'create'-only grant on a drop box must not read what is already there."""
    policy = FakePolicy(str(tree))
    opened = do_open(opener, policy, tree / "secret", access)
    assert opened.result.errno == errno.EINVAL and opened.fd == -1 and not policy.calls


@pytest.mark.parametrize(
    ("access", "accmode", "append"),
    [
        (R, os.O_RDONLY, False),
        (W, os.O_WRONLY, False),
        (R | W, os.O_RDWR, False),
        (A, os.O_WRONLY, True),
        (R | A, os.O_RDWR, True),
        (W | A, os.O_WRONLY, True),
        (W | T, os.O_WRONLY, False),
        (W | C, os.O_WRONLY, False),
    ],
)
def test_flags_come_from_the_access_words(
    opener: Opener, tree: Path, access: Access, accmode: int, append: bool
) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", access)
    try:
        assert opened.result.errno == 0, opened.result
        fl = fcntl.fcntl(opened.fd, fcntl.F_GETFL)
        assert fl & os.O_ACCMODE == accmode
        assert bool(fl & os.O_APPEND) == append
        assert not fl & (os.O_PATH | os.O_DIRECTORY | os.O_NONBLOCK)
        assert os.get_blocking(opened.fd)
        assert fcntl.fcntl(opened.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        close(opened)


def test_truncate_empties_an_existing_file(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", W | T)
    try:
        assert opened.result.errno == 0
        assert (tree / "secret").stat().st_size == 0
    finally:
        close(opened)


def test_truncate_happens_only_after_the_final_decision(opener: Opener, tree: Path) -> None:
    os.link(tree / "secret", tree / "second-name")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "second-name", W | T)
    assert opened.result.denied and opened.fd == -1
    assert (tree / "secret").read_text() == "root only\n"


def test_append_writes_at_the_end(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", A)
    try:
        os.write(opened.fd, b"more\n")
    finally:
        close(opened)
    assert (tree / "secret").read_text() == "root only\nmore\n"


@pytest.mark.parametrize("create_mode", [0o600, 0o640, 0o666, 0o604])
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
def test_created_file_has_the_rules_mode_and_the_clients_owner(
    opener: Opener, tree: Path, create_mode: int, mask: int
) -> None:
    policy = FakePolicy(str(tree), create_mode=create_mode)
    old = os.umask(mask)
    try:
        opened = do_open(opener, policy, tree / "new", W | C, uid=NOBODY, gid=NOGROUP)
    finally:
        os.umask(old)
    try:
        assert opened.result.errno == 0, opened.result
        assert opened.created and opened.ftype is FileType.FILE
        assert opened.real_path == str(tree / "new")
        st = os.fstat(opened.fd)
        assert stat.S_IMODE(st.st_mode) == create_mode
        assert (st.st_uid, st.st_gid) == (NOBODY, NOGROUP)
        assert fcntl.fcntl(opened.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        assert fcntl.fcntl(opened.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # Judged on what the fd allows but truncate: the client owns the new file.
        assert policy.calls[-1] == (str(tree / "new"), W | C, FileType.FILE)
    finally:
        close(opened)


def test_create_opens_an_existing_file_without_creating(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", A | C, uid=NOBODY)
    try:
        assert opened.result.errno == 0 and not opened.created
        assert os.fstat(opened.fd).st_uid == 0  # not given away: it was not created
    finally:
        close(opened)


def test_exclusive_creates_once_then_eexist(opener: Opener, tree: Path) -> None:
    policy = FakePolicy(str(tree))
    first = do_open(opener, policy, tree / "x", W | C, exclusive=True)
    try:
        assert first.result.errno == 0 and first.created
    finally:
        close(first)
    again = do_open(opener, policy, tree / "x", W | C, exclusive=True)
    assert again.result.errno == errno.EEXIST and again.fd == -1
    assert do_open(opener, policy, tree / "secret", W | C, True).result.errno == errno.EEXIST


def test_exclusive_on_root_is_eexist(opener: Opener) -> None:
    opened = do_open(opener, FakePolicy("/", types=ALL_TYPES), "/", R | C, exclusive=True)
    assert opened.result.errno == errno.EEXIST


def test_create_in_a_missing_directory_is_enoent(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "nodir" / "new", W | C)
    assert opened.result.errno == errno.ENOENT and not opened.result.denied


def test_create_where_the_target_is_not_allowed(opener: Opener, tree: Path) -> None:
    policy = FakePolicy(str(tree), access=R | W)  # no create
    opened = do_open(opener, policy, tree / "new", W | C)
    assert opened.result.denied and opened.result.errno == errno.EACCES
    assert not (tree / "new").exists()


@pytest.mark.parametrize(
    "path",
    [
        "relative/path",
        "",
        "/a/../etc/passwd",
        "/a/./b",
        "/a//b",
        "//a",
        "/a/b/",
        "/a\0b",
        "/" + "a" * 4096,
    ],
)
def test_invalid_paths_are_einval_before_any_decision(opener: Opener, path: str) -> None:
    policy = FakePolicy("/", types=ALL_TYPES)
    opened = do_open(opener, policy, path, R)
    assert opened.result.errno == errno.EINVAL and not opened.result.denied
    assert opened.result.reason and opened.fd == -1
    assert policy.calls == []


@pytest.mark.parametrize(
    ("access", "exclusive"),
    [(Access.NONE, False), (R, True), (W | T, True), (T, False), (R | T, False)],
)
def test_meaningless_requests_are_einval(
    opener: Opener, tree: Path, access: Access, exclusive: bool
) -> None:
    policy = FakePolicy(str(tree))
    opened = do_open(opener, policy, tree / "secret", access, exclusive)
    assert opened.result.errno == errno.EINVAL and policy.calls == []


def test_missing_file_is_enoent(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "absent", R)
    assert opened.result.errno == errno.ENOENT
    assert opened.result.reason == "no such file or directory"


def test_file_as_directory_is_enotdir(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret" / "x", R)
    assert opened.result.errno == errno.ENOTDIR


def test_denial_carries_the_reason_and_rule(opener: Opener, tree: Path) -> None:
    opened = do_open(opener, FakePolicy(str(tree), access=R), tree / "secret", W)
    assert opened.result.denied and opened.result.errno == errno.EACCES
    assert (opened.result.reason, opened.result.rule) == ("access not granted", RULE)


def test_wrong_type_is_denied_on_the_real_file(opener: Opener, tree: Path) -> None:
    (tree / "sub").mkdir()
    opened = do_open(opener, FakePolicy(str(tree)), tree / "sub", R)
    assert opened.result.denied and opened.result.reason == "type dir not allowed"


# ------------------------------------------------------------------ types


def test_directory_opens_read_only_with_o_directory(opener: Opener, tree: Path) -> None:
    policy = FakePolicy(str(tree), types=frozenset({FileType.DIR}))
    opened = do_open(opener, policy, tree, R)
    try:
        assert opened.result.errno == 0 and opened.ftype is FileType.DIR
        fl = fcntl.fcntl(opened.fd, fcntl.F_GETFL)
        assert fl & os.O_ACCMODE == os.O_RDONLY and fl & os.O_DIRECTORY
        assert "secret" in os.listdir(opened.fd)
    finally:
        close(opened)


@pytest.mark.parametrize("access", [W, A, R | C, R | W | T])
def test_directory_with_write_access_is_eisdir(opener: Opener, tree: Path, access: Access) -> None:
    policy = FakePolicy(str(tree), types=frozenset({FileType.DIR}))
    opened = do_open(opener, policy, tree, access)
    assert opened.result.errno == errno.EISDIR and opened.fd == -1


def test_dev_null_is_a_char_device(opener: Opener) -> None:
    policy = FakePolicy("/dev/null", types=frozenset({FileType.CHAR}))
    opened = do_open(opener, policy, "/dev/null", R | W)
    try:
        assert opened.result.errno == 0 and opened.ftype is FileType.CHAR
        assert os.get_blocking(opened.fd)
        assert os.write(opened.fd, b"x") == 1
    finally:
        close(opened)
    denied = do_open(opener, FakePolicy("/dev/null"), "/dev/null", R)
    assert denied.result.denied and denied.result.reason == "type char not allowed"


def test_fifo_without_writer_opens_for_read_at_once(opener: Opener, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    policy = FakePolicy(str(tree), types=frozenset({FileType.FIFO}))
    opened = do_open(opener, policy, tree / "fifo", R)
    try:
        assert opened.result.errno == 0 and opened.ftype is FileType.FIFO
        assert os.get_blocking(opened.fd)  # handed out blocking, as open() would give it
        assert not fcntl.fcntl(opened.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        close(opened)


def test_fifo_for_write_without_reader_is_enxio_at_once(opener: Opener, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    policy = FakePolicy(str(tree), types=frozenset({FileType.FIFO}))
    start = time.monotonic()
    opened = do_open(opener, policy, tree / "fifo", W)
    assert opened.result.errno == errno.ENXIO and opened.fd == -1
    assert opened.result.reason == "the FIFO has no reader"
    assert time.monotonic() - start < 5  # generous: a blocking open would hang to the timeout


def test_fifo_with_a_reader_opens_for_write(opener: Opener, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    reader = os.open(tree / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    policy = FakePolicy(str(tree), types=frozenset({FileType.FIFO}))
    opened = do_open(opener, policy, tree / "fifo", W | T)  # truncate: ignored on a FIFO
    try:
        assert opened.result.errno == 0 and os.get_blocking(opened.fd)
        os.write(opened.fd, b"hi")
        assert os.read(reader, 2) == b"hi"
    finally:
        close(opened)
        os.close(reader)


def test_fifo_not_in_types_is_denied(opener: Opener, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "fifo", R)
    assert opened.result.denied and opened.result.reason == "type fifo not allowed"


def test_socket_is_enxio_or_denied(opener: Opener, tree: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tree / "sock"))
        allowed = FakePolicy(str(tree), types=frozenset({FileType.SOCKET}))
        opened = do_open(opener, allowed, tree / "sock", R)
        assert opened.result.errno == errno.ENXIO and not opened.result.denied
        opened = do_open(opener, FakePolicy(str(tree)), tree / "sock", R)
        assert opened.result.denied
    finally:
        sock.close()


def test_hard_linked_file_needs_hardlinks(opener: Opener, tree: Path) -> None:
    os.link(tree / "secret", tree / "other")
    opened = do_open(opener, FakePolicy(str(tree)), tree / "secret", R)
    assert opened.result.denied and opened.result.errno == errno.EACCES
    assert opened.result.reason == (
        f"file has 2 hard links; rule {RULE!r} does not allow hard-linked files"
    )
    assert opened.result.rule == RULE
    opened = do_open(opener, FakePolicy(str(tree), hardlinks=True), tree / "secret", R)
    try:
        assert opened.result.errno == 0
    finally:
        close(opened)


def test_hard_linked_fifo_needs_hardlinks_too(opener: Opener, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    os.link(tree / "fifo", tree / "fifo2")
    policy = FakePolicy(str(tree), types=frozenset({FileType.FIFO}))
    assert do_open(opener, policy, tree / "fifo", R).result.denied


def test_pty_is_opened_without_becoming_the_controlling_terminal(opener: Opener) -> None:
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    try:
        pid = os.fork()
        if pid == 0:  # child: a session leader with no terminal, as a daemon is
            code = 1
            try:
                os.setsid()
                policy = FakePolicy(name, types=frozenset({FileType.CHAR}))
                opened = do_open(opener, policy, name, R | W)
                if opened.result.errno == 0:
                    try:
                        os.close(os.open("/dev/tty", os.O_RDONLY))
                        code = 2  # O_NOCTTY missing: the pty became our terminal
                    except OSError:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(master)
