"""unix.Receiver, the client's hot-path receive, against unix.recv_message.

Receiver must be recv_message with its sizes worked out once and the
credentials left unread: the same data, the same fds (close-on-exec), the
same TruncatedMessage, and every fd closed on a shape error. Each case sends
the same datagram twice, receives one with each, and compares; /proc/self/fd
before and after catches a leak.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from privbroker import unix

pytestmark = pytest.mark.usefixtures("no_fd_leak")  # tests/client_cases.py


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def send(sock: socket.socket, data: bytes, nfds: int) -> None:
    """Send `data` with `nfds` fds of /dev/null, bypassing send_message's checks."""
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc if fds else [])
    finally:
        unix.close_fds(fds)


def outcome(receive: Callable[[], tuple[bytes, list[int]]]) -> tuple[Any, ...]:
    """What a receive did: ("ok", data, nfds) with the fds checked and closed, or the error."""
    try:
        data, fds = receive()
    except unix.TruncatedMessage as exc:
        return ("truncated", str(exc))
    try:
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        return ("ok", data, len(fds))
    finally:
        unix.close_fds(fds)


CASES = [
    # (what, data, nfds, maxbytes, maxfds, creds, passcred, expected kind)
    ("plain", b"x" * 10, 0, 100, 4, False, False, "ok"),
    ("exactly the byte limit", b"x" * 100, 0, 100, 4, False, False, "ok"),
    ("one byte over", b"y" * 101, 2, 100, 4, False, False, "truncated"),
    ("fds", b"f", 3, 100, 8, False, False, "ok"),
    ("an fd within credentials' room", b"f", 1, 100, 1, True, True, "ok"),
    ("a full batch and credentials", b"d", 250, 10, 250, True, True, "ok"),
    ("credentials, no fds", b"c", 0, 10, 0, True, True, "ok"),
    ("fds over the limit, no ctrunc", b"w", 4, 100, 3, False, False, "truncated"),
    ("too many fds", b"z", 10, 100, 3, False, False, "truncated"),
    ("an fd where none may be", b"z", 1, 100, 0, False, False, "truncated"),
    ("SCM_MAX_FD", b"z", 253, 100, 250, True, True, "truncated"),
    ("credentials not asked for", b"e", 2, 10, 250, False, True, "truncated"),
]


@pytest.mark.parametrize("own_buffer", [False, True], ids=["allocating", "own buffer"])
@pytest.mark.parametrize(
    ("what", "data", "nfds", "maxbytes", "maxfds", "creds", "passcred", "kind"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_receiver_is_recv_message(
    pair: tuple[socket.socket, socket.socket],
    own_buffer: bool,
    what: str,
    data: bytes,
    nfds: int,
    maxbytes: int,
    maxfds: int,
    creds: bool,
    passcred: bool,
    kind: str,
) -> None:
    a, b = pair
    if passcred:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    receiver = unix.Receiver(maxbytes, maxfds, creds=creds, own_buffer=own_buffer)

    def general() -> tuple[bytes, list[int]]:
        got, fds, _ = unix.recv_message(b, maxbytes, maxfds, creds=creds)
        return got, fds

    send(a, data, nfds)
    send(a, data, nfds)
    expected = outcome(general)
    assert expected[0] == kind
    assert outcome(lambda: receiver.recv(b)) == expected
    # Either way the datagram was consumed, and the stream goes on.
    send(a, b"next", 0)
    send(a, b"next", 0)
    assert outcome(lambda: receiver.recv(b)) == outcome(general)


@pytest.mark.parametrize("own_buffer", [False, True])
def test_end_of_stream_and_nothing_yet(
    pair: tuple[socket.socket, socket.socket], own_buffer: bool
) -> None:
    a, b = pair
    receiver = unix.Receiver(100, 4, creds=True, own_buffer=own_buffer)
    with pytest.raises(BlockingIOError):
        receiver.recv(b, int(socket.MSG_DONTWAIT))
    a.close()
    assert receiver.recv(b) == (b"", [])


def test_the_fds_are_the_ones_sent(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    pipe_r, pipe_w = os.pipe()
    try:
        a.sendmsg(
            [b"p"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pipe_w]).tobytes())]
        )
        data, fds = unix.Receiver(10, 1).recv(b)
        assert data == b"p" and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(pipe_w).st_ino
        unix.close_fds(fds)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def test_an_own_buffer_is_reused_and_never_shows_an_older_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    receiver = unix.Receiver(1000, 2, own_buffer=True)
    messages = [b"L" * 1000, b"s", b"", b"m" * 10, b"L" * 999 + b"!"]
    for message in messages:
        send(a, message, 1)
    got = [outcome(lambda: receiver.recv(b)) for _ in messages]
    assert got == [("ok", m, 1) for m in messages]
    assert receiver._buffers is not None and len(receiver._buffers) == 1  # made once
