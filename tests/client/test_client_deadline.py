"""connection.round_trip's one deadline, on real SEQPACKET socketpairs.

The sync client's socket stays blocking and never gets a socket timeout: a
send is tried without waiting, and the reply is awaited in one poll() up to
the exchange's deadline. These tests pin what that must keep: a full send
queue and a silent peer both end at the deadline, a signal storm does not
stretch it (as SO_RCVTIMEO would, restarting after each EINTR), a deadline
that passed while connecting sends nothing, and no deadline means waiting.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from privbroker import Client, connection, protocol, unix
from privbroker.protocol import (
    OpenItem,
    OpenReply,
    OpenRequest,
    Result,
    StatusReply,
    StatusRequest,
)
from tests.support.standin import StandIn

pytestmark = pytest.mark.usefixtures("no_fd_leak")

REQUEST = StatusRequest(7)
DATA = protocol.encode_request(REQUEST)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client end, broker end); the client end passes credentials, as connect's does."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with a, b:
        yield a, b


def _fill(sock: socket.socket) -> int:
    """Send until the peer's queue is full; return how many datagrams that took."""
    sock.setblocking(False)
    n = 0
    try:
        while True:
            sock.send(DATA)
            n += 1
    except BlockingIOError:
        return n
    finally:
        sock.setblocking(True)


def test_reply_arrives(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    unix.send_message(b, protocol.encode_reply(StatusReply(7, {"up": True})))
    ex = connection.Exchange(5)
    reply, fds = connection.round_trip(a, REQUEST, DATA, ex)
    assert isinstance(reply, StatusReply) and dict(reply.fields) == {"up": True}
    assert fds == [] and ex.sent and ex.phase == "receive from"
    assert b.recv(100) == DATA
    assert a.gettimeout() is None  # the socket never gets a socket timeout


def test_silent_peer_times_out_at_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    start = time.monotonic()
    ex = connection.Exchange(0.2)
    with pytest.raises(TimeoutError):
        connection.round_trip(a, REQUEST, DATA, ex)
    assert 0.2 <= time.monotonic() - start < 2
    assert ex.sent and ex.phase == "receive from"
    assert b.recv(100) == DATA


def test_full_send_queue_times_out_unsent(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    queued = _fill(a)
    start = time.monotonic()
    ex = connection.Exchange(0.2)
    with pytest.raises(TimeoutError):
        connection.round_trip(a, REQUEST, DATA, ex)
    assert 0.2 <= time.monotonic() - start < 2
    assert not ex.sent and ex.phase == "send to"
    b.setblocking(False)
    got = 0
    with pytest.raises(BlockingIOError):
        while True:
            b.recv(100)
            got += 1
    assert got == queued  # the timed-out request never went out


def test_full_send_queue_waits_for_room(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    queued = _fill(a)

    def broker() -> None:
        time.sleep(0.1)
        for _ in range(queued + 1):
            assert b.recv(100) == DATA
        unix.send_message(b, protocol.encode_reply(StatusReply(7, {})))

    thread = threading.Thread(target=broker)
    thread.start()
    try:
        reply, _ = connection.round_trip(a, REQUEST, DATA, connection.Exchange(10))
    finally:
        thread.join()
    assert isinstance(reply, StatusReply)


def test_signals_do_not_stretch_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    handled = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: handled.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)  # an EINTR every 10 ms
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            connection.round_trip(a, REQUEST, DATA, connection.Exchange(0.3))
        elapsed = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(handled) > 5
    assert 0.3 <= elapsed < 2


def test_a_deadline_passed_while_connecting_sends_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    ex = connection.Exchange(1e-9)
    time.sleep(0.001)
    with pytest.raises(TimeoutError):
        connection.round_trip(a, REQUEST, DATA, ex)
    assert not ex.sent
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(100)


def test_no_deadline_waits(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    request = OpenRequest(3, (OpenItem("/etc/hostname", protocol.Access.READ),))
    fd = os.open("/etc/hostname", os.O_RDONLY | os.O_CLOEXEC)
    reply_data = protocol.encode_reply(OpenReply(3, (Result(),)))
    timer = threading.Timer(0.1, unix.send_message, (b, reply_data, [fd]))
    timer.start()
    try:
        reply, fds = connection.round_trip(
            a, request, protocol.encode_request(request), connection.Exchange(None)
        )
    finally:
        timer.join()
        os.close(fd)
    unix.close_fds(fds)
    assert isinstance(reply, OpenReply) and len(fds) == 1


def test_client_socket_stays_blocking(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name, timeout=2) as c:
        for _ in range(3):
            os.close(c.open_fd(files["a"]))
        assert c._sock is not None
        assert c._sock.gettimeout() is None
        timeval = c._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        assert timeval == bytes(16)  # connect's backlog bound was cleared
