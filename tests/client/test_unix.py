"""client/unix.py on real sockets: fd passing, truncation, credentials, peer identity.

Every fd test compares /proc/self/fd before and after, so a leak on any error
path fails the test.
"""

from __future__ import annotations

import array
import concurrent.futures
import errno
import fcntl
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from privbroker import unix
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.standin import unique_name


def fd_set() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = fd_set()
    yield
    assert fd_set() == before


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def devnulls(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]


def send_raw_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send fds bypassing send_message, then close our copies."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([data], anc)
    unix.close_fds(fds)


# ------------------------------------------------------------ fd passing


def test_fds_arrive_close_on_exec(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    a, b = pair
    files = []
    for n in range(3):
        path = tmp_path / f"f{n}"
        path.write_text(str(n))
        files.append(os.open(path, os.O_RDONLY))
    inodes = [os.fstat(fd).st_ino for fd in files]
    unix.send_message(a, b"hello", files)
    unix.close_fds(files)  # the sender keeps its own copies; the receiver gets new ones
    data, fds, cred = unix.recv_message(b, 100, 8)
    try:
        assert data == b"hello" and cred is None
        assert [os.fstat(fd).st_ino for fd in fds] == inodes
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert not os.get_inheritable(fd)
    finally:
        unix.close_fds(fds)


def test_plain_datagram_and_end_of_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    unix.send_message(a, b"x" * 100)
    assert unix.recv_message(b, 100, 4) == (b"x" * 100, [], None)  # exactly the limit
    a.close()
    assert unix.recv_message(b, 100, 4) == (b"", [], None)


def test_most_fds_one_message_can_carry(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_raw_fds(a, b"m", devnulls(253))  # SCM_MAX_FD
    _, fds, _ = unix.recv_message(b, 10, 253)
    assert len(fds) == 253
    unix.close_fds(fds)


def test_oversized_datagram_is_truncated_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_raw_fds(a, b"y" * 101, devnulls(2))
    with pytest.raises(unix.TruncatedMessage, match="longer than 100"):
        unix.recv_message(b, 100, 4)
    # The datagram is consumed; the stream goes on.
    unix.send_message(a, b"next")
    assert unix.recv_message(b, 100, 4)[0] == b"next"


def test_more_fds_than_asked_but_no_ctrunc(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    # CMSG_SPACE rounds up: room for 3 fds is room for 4, so the kernel sets
    # no MSG_CTRUNC, and the count itself must be checked.
    send_raw_fds(a, b"w", devnulls(4))
    with pytest.raises(unix.TruncatedMessage, match="over the 3 limit"):
        unix.recv_message(b, 100, 3)


@pytest.mark.parametrize(("sent", "maxfds"), [(10, 3), (1, 0), (253, 250)])
def test_too_many_fds_closes_every_fd_that_arrived(
    pair: tuple[socket.socket, socket.socket], sent: int, maxfds: int
) -> None:
    a, b = pair
    send_raw_fds(a, b"z", devnulls(sent))
    with pytest.raises(unix.TruncatedMessage, match="truncated"):
        unix.recv_message(b, 100, maxfds)


def test_credentials_with_so_passcred(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    unix.send_message(a, b"c")
    _, fds, cred = unix.recv_message(b, 10, 0, creds=True)
    assert fds == []
    assert cred == unix.Ucred(os.getpid(), os.getuid(), os.getgid())
    # Credentials and a full batch of fds fit the control buffer together.
    send_raw_fds(a, b"d", devnulls(250))
    _, fds, cred = unix.recv_message(b, 10, 250, creds=True)
    assert len(fds) == 250 and cred is not None
    unix.close_fds(fds)


def test_unasked_credentials_are_refused_and_fds_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    send_raw_fds(a, b"e", devnulls(2))
    with pytest.raises(unix.TruncatedMessage):
        unix.recv_message(b, 10, 250)  # creds not asked for: no room, or unexpected


def _send_from_child(sock: socket.socket) -> int:
    unix.send_message(sock, b"from the child")
    return os.getpid()


def test_credentials_are_the_senders_as_the_kernel_knows_them(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    pid = run_as(NOBODY, NOGROUP, _send_from_child, a)
    data, _, cred = unix.recv_message(b, 100, 0, creds=True)
    assert data == b"from the child"
    assert cred == unix.Ucred(pid, NOBODY, NOGROUP)


def test_send_to_a_closed_peer_is_epipe(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(BrokenPipeError):
        unix.send_message(a, b"x")


def _send_with_default_sigpipe(sock: socket.socket) -> str:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        unix.send_message(sock, b"x", devnulls(1))
    except BrokenPipeError:
        return "EPIPE"
    return "sent"


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_STREAM])
def test_a_closed_peer_never_raises_sigpipe(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    b.close()
    with a:
        # In a child, where SIGPIPE's default action would kill the process
        # (Linux raises it for a stream socket without MSG_NOSIGNAL).
        assert run_as(0, 0, _send_with_default_sigpipe, a) == "EPIPE"


def test_oversized_send_is_emsgsize(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with pytest.raises(OSError) as info:
        unix.send_message(a, b"x" * 65536)
    assert info.value.errno == errno.EMSGSIZE


def test_close_fds_ignores_closed_fds() -> None:
    fds = devnulls(2)
    os.close(fds[0])
    unix.close_fds(fds)
    unix.close_fds(())
    with pytest.raises(OSError):
        os.fstat(fds[1])


# ------------------------------------------------------------ peer identity


def test_peer_cred_of_a_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    assert unix.peer_cred(a) == unix.Ucred(os.getpid(), os.getuid(), os.getgid())


def _connect_and_wait(name: str, hold: bool) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(20)
        sock.connect(unix.abstract_address(name))
        unix.send_message(sock, str(os.getpid()).encode())
        if hold:
            sock.recv(16)  # stay alive until the parent has looked at us
    return os.getpid()


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("no Pid: line in the pidfd's fdinfo")


@pytest.mark.parametrize("ngroups", [0, 3, 256, 300, 2000])
def test_peer_identity_of_a_child_of_another_uid(ngroups: int) -> None:
    groups = tuple(range(100000, 100000 + ngroups))
    name = unique_name()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(unix.abstract_address(name))
        listener.listen(1)
        listener.settimeout(20)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            child = pool.submit(
                run_as, NOBODY, NOGROUP, _connect_and_wait, name, True, groups=groups
            )
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                child_pid = int(conn.recv(64))
                cred = unix.peer_cred(conn)
                assert cred == unix.Ucred(child_pid, NOBODY, NOGROUP)
                assert sorted(unix.peer_groups(conn)) == list(groups)
                pidfd = unix.peer_pidfd(conn)
                assert pidfd is not None
                try:
                    assert not os.get_inheritable(pidfd)
                    assert _pidfd_pid(pidfd) == child_pid
                finally:
                    os.close(pidfd)
                conn.send(b"bye")
            assert child.result(30) == child_pid


class _FakeSock:
    """A socket whose getsockopt fails with one errno (for kernels without SO_PEERPIDFD)."""

    def __init__(self, err: int) -> None:
        self.err = err

    def getsockopt(self, *args: object) -> int:
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err", [errno.ENOPROTOOPT, errno.EINVAL, errno.ENODATA])
def test_peer_pidfd_unsupported_is_none(err: int) -> None:
    assert unix.peer_pidfd(_FakeSock(err)) is None  # type: ignore[arg-type]


def test_peer_pidfd_other_errors_raise() -> None:
    with pytest.raises(OSError):
        unix.peer_pidfd(_FakeSock(errno.EBADF))  # type: ignore[arg-type]
    with pytest.raises(OSError):
        unix.peer_groups(_FakeSock(errno.EBADF))  # type: ignore[arg-type]


# ------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("privbroker", b"\0privbroker"),
        ("@privbroker", b"\0privbroker"),
        ("a/b c", b"\0a/b c"),
        ("é", b"\0\xc3\xa9"),
        ("n" * 107, b"\0" + b"n" * 107),
    ],
)
def test_abstract_address(name: str, address: bytes) -> None:
    assert unix.abstract_address(name) == address


@pytest.mark.parametrize("name", ["", "@", "a\0b", "n" * 108, "é" * 54])
def test_invalid_abstract_names(name: str) -> None:
    with pytest.raises(ValueError):
        unix.abstract_address(name)


def test_longest_abstract_name_binds() -> None:
    name = unique_name()
    name += "x" * (107 - len(name))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(unix.abstract_address(name))
        assert s.getsockname() == unix.abstract_address(name)
