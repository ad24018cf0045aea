"""One exchange on one connection: connect, check identity, send, receive, validate.

The client's socket code lives here (the datagram and credential calls
themselves are in unix.py), and so does the one boundary where OSErrors and
decoding errors become privbroker's errors, `library_errors`, which the
asyncio client (aio.py) uses too. Nothing here retries or keeps state between
exchanges; `api.Client` decides that, with the rules in calls.py.

- The broker's SO_PEERCRED uid is checked before a byte is sent (DESIGN.md,
  invariant 8); a mismatch closes the socket.
- Every fd a reply carries is closed unless the reply is valid and answers the
  request: right id, right kind, one result per path, one fd per success.
- Each exchange has one deadline; connect, send and receive share it.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
import types

from . import protocol, unix
from .calls import check_reply
from .errors import BrokerIdentityError, BrokerUnavailable, PrivbrokerError, ProtocolError
from .protocol import Reply, Request

# errnos meaning the broker's end of an established connection is gone.
_LOST_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED})
_TIMEVAL = struct.Struct("ll")  # struct timeval, for SO_SNDTIMEO
_NO_TIMEOUT = _TIMEVAL.pack(0, 0)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # a plain int: socket's flags are a slow IntFlag


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
    sock: socket.socket, request: Request, data: bytes, ex: Exchange
) -> tuple[Reply, list[int]]:
    """Send `data` (the encoded `request`), return the checked reply and its fds.

    The fds are the caller's; on any error here they have been closed.
    """
    # The socket stays blocking, with no socket timeout: settimeout() before
    # each call would cost an ioctl, and CPython would poll before each send
    # and receive. With a deadline, the send is tried without waiting (the
    # broker reads its requests, so there is room almost always) and the
    # receive waits in one poll() until the deadline; poll() keeps to the
    # deadline across signals (PEP 475), where SO_RCVTIMEO would start over
    # after each one. Without a deadline, both simply block.
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
    while True:
        if flags:
            _wait(sock, select.POLLIN, ex)
        try:
            # creds=True: with SO_PASSCRED on, every reply carries SCM_CREDENTIALS,
            # which needs room in the control buffer beside a full batch of fds.
            raw, fds, _ = unix.recv_message(
                sock, protocol.MAX_REPLY_BYTES, protocol.MAX_BATCH, creds=True, flags=flags
            )
            break
        except BlockingIOError:  # pragma: no cover - readable, yet nothing to read
            continue
    try:
        if not raw and not fds:
            raise ConnectionLost(errno.ECONNRESET, "the broker closed the connection")
        reply = protocol.decode_reply(raw)
        check_reply(request, reply, len(fds))
    except BaseException:
        unix.close_fds(fds)
        raise
    return reply, fds


def _wait(sock: socket.socket, event: int, ex: Exchange) -> None:
    """Wait until `sock` has `event` (or an error, or hang-up), or raise TimeoutError."""
    left = ex.remaining()
    poller = select.poll()
    poller.register(sock, event)
    # Milliseconds, as a float: poll() rounds it up, never down.
    if not poller.poll(None if left is None else left * 1000):
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
