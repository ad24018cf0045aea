"""One exchange on one connection: connect, check identity, send, receive, validate.

The client's socket code lives here (the datagram and credential calls
themselves are in unix.py), and so does the one boundary where OSErrors and
decoding errors become privbroker's errors, `library_errors`, which the
asyncio client (aio.py) uses too. Nothing here retries or keeps state between
exchanges; `api.Client` decides that, with the rules in calls.py.

- The broker's SO_PEERCRED uid is checked before a byte is sent (docs/security.md,
  invariant 8); a mismatch closes the socket.
- Every fd a reply carries is closed unless the reply is valid and answers the
  request: right id, right kind, one result per path, one fd per success.
- Each exchange has one deadline; connect, send and receive share it.
- A one-path open (`open_one_trip`) and a socket (`socket_trip`) have their
  usual reply decoded by fastwire, which decides exactly as the general
  decoder does, only sooner.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
import types
from collections.abc import Callable
from typing import Any, TypeVar

from . import protocol, unix
from .calls import check_reply
from .errors import BrokerIdentityError, BrokerUnavailable, PrivbrokerError, ProtocolError
from .protocol import (
    ErrorReply,
    OpenReply,
    OpenRequest,
    Reply,
    Request,
    Result,
    SocketReply,
    SocketRequest,
    fastwire,
)

# errnos meaning the broker's end of an established connection is gone.
_LOST_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED})
_TIMEVAL = struct.Struct("ll")  # struct timeval, for SO_SNDTIMEO
_NO_TIMEOUT = _TIMEVAL.pack(0, 0)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # a plain int: socket's flags are a slow IntFlag
_R = TypeVar("_R")
# What carries one exchange: round_trip, or open_one_trip for one path. It
# brings back what answers the request (a reply, or the path's result) or the
# ERROR reply, that the caller turns into BrokerError, and the fds.
Trip = Callable[
    [socket.socket, Any, bytes, "Exchange", "Replies"], tuple[_R | ErrorReply, list[int]]
]
# How many exchanges wait for the reply before trying to receive it, once one
# found no reply there yet (see _send_receive); then it is tried again.
_WAIT_FIRST = 16


class Replies(unix.Receiver):
    """The Receiver of replies, and whether a reply tends to be there at once.

    With `own_buffer`, it is one client's, used by one exchange at a time.
    `wait_first` counts down the exchanges that wait before receiving; the
    shared instance (for callers that bring none) may race on it, which only
    costs a syscall.
    """

    __slots__ = ("wait_first",)

    def __init__(self, *, own_buffer: bool = False) -> None:
        # creds=True: with SO_PASSCRED on, every reply carries SCM_CREDENTIALS,
        # which needs room in the control buffer beside a full batch of fds.
        super().__init__(
            protocol.MAX_REPLY_BYTES, protocol.MAX_BATCH, creds=True, own_buffer=own_buffer
        )
        self.wait_first = 0


_REPLIES = Replies()  # shared by callers that bring none: allocates per reply


class ConnectionLost(BrokerUnavailable):
    """The broker's end went away (EPIPE, ECONNRESET, EOF): a retry candidate."""


class Exchange:
    """Where one exchange stands: its deadline, and its phase for messages and retries."""

    def __init__(self, timeout: float | None) -> None:
        self.phase = "connect to"
        self.sent = False
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); TimeoutError once it has passed."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        return left


class library_errors:  # lowercase: used like a function, as contextlib.suppress is
    """The one boundary where socket and decoding errors become privbroker's.

    Our own exceptions pass through unchanged; a truncated or undecodable reply
    becomes ProtocolError; every OSError becomes BrokerUnavailable (with its
    errno; ETIMEDOUT for a timeout), or ConnectionLost when the peer is gone.

    A class rather than a @contextmanager generator: every call enters it,
    and a generator costs four times as much to enter and leave.
    """

    __slots__ = ("_ex", "_name")

    def __init__(self, name: str, ex: Exchange) -> None:
        self._name = name
        self._ex = ex

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if not isinstance(exc, Exception) or isinstance(exc, PrivbrokerError | BrokerUnavailable):
            return  # no exception, or ours, or not an error (KeyboardInterrupt, cancellation)
        where = f"broker socket @{self._name}"
        if isinstance(exc, unix.TruncatedMessage | protocol.ProtocolError):
            raise ProtocolError(f"invalid reply on {where}: {exc}") from exc
        if isinstance(exc, TimeoutError):
            raise BrokerUnavailable(
                errno.ETIMEDOUT, f"timed out trying to {self._ex.phase} the {where}"
            ) from exc
        if isinstance(exc, OSError):
            cls = ConnectionLost if exc.errno in _LOST_ERRNOS else BrokerUnavailable
            raise cls(exc.errno, f"cannot {self._ex.phase} the {where}: {exc.strerror}") from exc


def new_socket() -> socket.socket:
    """An unconnected client socket; SO_PASSCRED, so every request carries credentials."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def check_identity(sock: socket.socket, name: str, expected_uid: int) -> None:
    """Raise BrokerIdentityError unless the peer of `sock` runs as `expected_uid`.

    SO_PEERCRED is what the kernel recorded when the peer called listen(), so
    a process that squats the name cannot pass for the broker.
    """
    cred = unix.peer_cred(sock)
    if cred.uid != expected_uid:
        raise BrokerIdentityError(
            f"the process on socket @{name} (pid {cred.pid}) runs as uid {cred.uid}, "
            f"not the broker's uid {expected_uid}; nothing was sent"
        )


def connect(address: bytes, name: str, expected_uid: int, ex: Exchange) -> socket.socket:
    """A connected socket to a peer running as `expected_uid`, or an exception.

    Raises (inside library_errors): BrokerIdentityError, OSError, TimeoutError.
    """
    sock = new_socket()
    try:
        # A blocking connect waits while the listener's backlog is full, and
        # SO_SNDTIMEO bounds that wait; a non-blocking one would fail at once.
        left = ex.remaining()
        if left is not None:
            sec, frac = divmod(left, 1.0)
            usec = max(int(frac * 1e6), 1 if sec == 0 else 0)  # 0 would mean forever
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(int(sec), usec))
        try:
            sock.connect(address)
        except BlockingIOError as exc:  # SO_SNDTIMEO expired: the backlog stayed full
            raise TimeoutError(errno.ETIMEDOUT, "backlog full") from exc
        if left is not None:  # later deadlines are round_trip's job
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEOUT)
        check_identity(sock, name, expected_uid)
    except BaseException:
        sock.close()
        raise
    return sock


def round_trip(
    sock: socket.socket, request: Request, data: bytes, ex: Exchange, rx: Replies = _REPLIES
) -> tuple[Reply, list[int]]:
    """Send `data` (the encoded `request`), return the checked reply and its fds.

    `rx` receives the reply. The fds are the caller's; on any error here they
    have been closed.
    """
    raw, fds = _send_receive(sock, data, ex, rx)
    try:
        reply = _checked_reply(request, raw, len(fds))
    except BaseException:
        unix.close_fds(fds)
        raise
    return reply, fds


def open_one_trip(
    sock: socket.socket,
    request: OpenRequest,
    data: bytes,
    ex: Exchange,
    rx: Replies = _REPLIES,
) -> tuple[Result | ErrorReply, list[int]]:
    """round_trip for a request to open one path (fastwire's `data`).

    The usual reply is decoded by fastwire, which builds no reply message;
    anything else, valid or not, goes through the general decoder and checks,
    so an ERROR reply comes back and a bad reply raises what it always did.
    Returns the path's checked result (with its fd, if it succeeded) or the
    ERROR reply. The fds are the caller's; on any error here they have been
    closed.
    """
    raw, fds = _send_receive(sock, data, ex, rx)
    try:
        result = fastwire.decode_open_result(raw, request.id)
        if result is not None and len(fds) == (0 if result.errno else 1):
            return result, fds
        reply = _checked_reply(request, raw, len(fds))
    except BaseException:
        unix.close_fds(fds)
        raise
    if isinstance(reply, OpenReply):  # pragma: no cover - fastwire took it (its Rule 2)
        return reply.results[0], fds
    assert isinstance(reply, ErrorReply)  # check_reply: OPEN or ERROR answers an OPEN
    return reply, fds


def socket_trip(
    sock: socket.socket, request: SocketRequest, data: bytes, ex: Exchange, rx: Replies = _REPLIES
) -> tuple[Reply, list[int]]:
    """round_trip for a SOCKET request: its usual reply decoded by fastwire,
    anything else by the general decoder, as open_one_trip does."""
    raw, fds = _send_receive(sock, data, ex, rx)
    try:
        result = fastwire.decode_socket_result(raw, request.id)
        if result is not None and len(fds) == (0 if result.errno else 1):
            return SocketReply(request.id, result), fds
        return _checked_reply(request, raw, len(fds)), fds
    except BaseException:
        unix.close_fds(fds)
        raise


def _send_receive(
    sock: socket.socket, data: bytes, ex: Exchange, rx: Replies
) -> tuple[bytes, list[int]]:
    """Send one datagram, receive one: (its bytes, its fds), not yet checked."""
    # The socket stays blocking, with no socket timeout: settimeout() before
    # each call would cost an ioctl, and CPython would poll before each send
    # and receive. With a deadline, the send is tried without waiting (the
    # broker reads its requests, so there is room almost always), and so is
    # the receive: when broker and client share a CPU, the broker has mostly
    # run and replied by the time send returns, and a poll() that finds the
    # reply there would cost a syscall for nothing. When they run on two CPUs
    # it is never there yet, and looking costs a failed syscall and an
    # exception: so after a miss, the next _WAIT_FIRST exchanges wait first.
    # The wait is one poll() until the deadline; poll() keeps to it across
    # signals (PEP 475), where SO_RCVTIMEO would start over after each one.
    # Without a deadline, both simply block.
    flags = 0 if ex.deadline is None else _DONTWAIT
    ex.phase = "send to"
    ex.remaining()  # a deadline that passed while connecting: send nothing
    while True:
        try:
            unix.send_message(sock, data, flags=flags)
            break
        except BlockingIOError:
            _wait(sock, select.POLLOUT, ex)
    ex.sent, ex.phase = True, "receive from"
    if flags and rx.wait_first > 0:
        rx.wait_first -= 1
        _wait(sock, select.POLLIN, ex)
    while True:
        try:
            return rx.recv(sock, flags)
        except BlockingIOError:  # no reply yet (flags has MSG_DONTWAIT: a deadline)
            rx.wait_first = _WAIT_FIRST
            _wait(sock, select.POLLIN, ex)


def _checked_reply(request: Request, raw: bytes, nfds: int) -> Reply:
    """The decoded reply to `request` carrying `nfds` fds, or an exception."""
    if not raw and not nfds:
        raise ConnectionLost(errno.ECONNRESET, "the broker closed the connection")
    reply = protocol.decode_reply(raw)
    check_reply(request, reply, nfds)
    return reply


def _wait(sock: socket.socket, event: int, ex: Exchange) -> None:
    """Wait until `sock` has `event` (or an error, or hang-up), or raise TimeoutError."""
    left = ex.remaining()
    poller = select.poll()
    poller.register(sock, event)
    # Milliseconds, as a float: poll() rounds it up, never down.
    if not poller.poll(None if left is None else left * 1000):
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
