"""The synchronous client: `Client` and `open_privileged`.

A `Client` owns at most one SOCK_SEQPACKET connection to the broker, opened on
the first call and reused. Each call is one exchange (one request datagram,
one reply datagram with the fds), made under a lock, so a client can be shared
by threads. How it keeps the design's invariants:

- Rule 1 (DESIGN.md, invariant 8): on every fresh connection the broker's
  SO_PEERCRED uid is checked against `expected_uid` before a byte is sent.
- Rule 2: arguments are validated (path, mode, batch size, encoding) before
  any I/O, so a bad call never reaches the broker, let alone creates a file.
- Rule 3: OSErrors from the socket become privbroker's errors in one place,
  `connection.library_errors`; a reply that is not valid, or an exchange cut
  short (a timeout, an interrupt), poisons the connection: it is closed, and
  the next call connects afresh (and checks the broker's identity again).
- Rule 3b: a fork child never uses its parent's connection: an at-fork hook
  drops every client's connection (and lock) in the child.
- Rule 4: every fd that arrives has one owner. Until a call returns them, the
  client closes them on any error, and `open_many` is all-or-nothing.
- Rule 5: a request is resent once, on a fresh connection, only when that is
  safe: the reused connection failed on send (nothing was delivered), or it
  died before the reply and the request neither creates nor truncates.
"""

from __future__ import annotations

import builtins
import codecs
import errno
import itertools
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TextIO, overload

from . import protocol, unix
from .connection import ConnectionLost, Exchange, connect, library_errors, round_trip
from .errors import BrokerError, BrokerUnavailable, error_for_result
from .protocol import Access, ExplainReply, OpenItem, OpenReply, Request

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode, OpenTextMode, StrPath

DEFAULT_TIMEOUT = 5.0
_NEWLINES = (None, "", "\n", "\r", "\r\n")


def _socket_name(name: str | None) -> str:
    if name is not None:
        return name
    return os.environ.get(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    return timeout


def _item(path: StrPath, mode: str) -> OpenItem:
    access, exclusive = protocol.access_for_mode(mode)
    return OpenItem(protocol.check_path(os.fspath(path)), access, exclusive)


def _check_wrap_args(
    mode: str, buffering: int, encoding: str | None, errors: str | None, newline: str | None
) -> None:
    """Raise what builtin open() would for these arguments, before any I/O.

    Caught late, a bad encoding would fail after the broker had already
    created or truncated the file.
    """
    if "b" in mode:
        for arg, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
            if value is not None:
                raise ValueError(f"binary mode doesn't take an {arg} argument")
        return
    if buffering == 0:
        raise ValueError("can't have unbuffered text I/O")
    if newline not in _NEWLINES:
        raise ValueError(f"illegal newline value: {newline!r}")
    if encoding is not None and encoding != "locale":
        codecs.lookup(encoding)  # LookupError, as TextIOWrapper would raise


class Client:
    """A connection to the broker, opened lazily, reused, and shared by threads.

    Args:
        socket: the broker's abstract socket name; default the environment's
            PRIVBROKER_SOCKET, else "privbroker".
        timeout: seconds each call may take in all (connecting, sending,
            waiting for the reply); None waits forever.
        expected_uid: the uid the broker must run as (SO_PEERCRED).

    `close()` (or leaving a `with` block) closes the connection; a client used
    again afterwards simply reconnects.

    Raises:
        ValueError: the socket name or the timeout is invalid.
    """

    _sock: socket.socket | None

    def __init__(
        self,
        socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        expected_uid: int = 0,
    ) -> None:
        self.socket_name = _socket_name(socket)
        self._address = unix.abstract_address(self.socket_name)
        self.timeout = _check_timeout(timeout)
        self.expected_uid = expected_uid
        self._lock = threading.Lock()
        self._sock = None
        self._ids = itertools.count(1)
        _ALL_CLIENTS.add(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the connection (waiting for a call in flight); a later call reconnects."""
        with self._lock:
            self._disconnect()

    # ------------------------------------------------------------ opening

    def open_fd(self, path: StrPath, mode: str = "r") -> int:
        """Open `path` through the broker and return the file descriptor.

        Args:
            path: an absolute, normalised path (no `.`, `..`, `//`, trailing `/`).
            mode: an open() mode; it decides the access words the policy must grant.

        Returns:
            A close-on-exec fd, owned by the caller.

        Raises:
            ValueError: invalid path or mode (before any I/O).
            PolicyDenied: the policy does not allow it (a PermissionError).
            OSError: the subclass os.open would raise (FileNotFoundError, ...).
            BrokerError: the broker refused the request as a whole.
            BrokerUnavailable: no broker, it went away, or the timeout passed.
            BrokerIdentityError: the broker does not run as expected_uid.
            ProtocolError: the reply was invalid; the connection was dropped.
        """
        return self._open([_item(path, mode)], self.timeout)[0]

    def open_many(self, requests: Iterable[StrPath | tuple[StrPath, str]]) -> list[int]:
        """Open several paths in one round trip, all or nothing.

        Args:
            requests: paths (opened "r") or (path, mode) pairs, at most MAX_BATCH.

        Returns:
            One fd per request, in order (an empty list for no requests).

        Raises:
            ValueError: an invalid path or mode, or more than MAX_BATCH (no I/O).
            PolicyDenied, OSError: the error of the FIRST request that failed;
                every fd the others produced has been closed.
            BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
                as for open_fd.
        """
        items = [_item(*r) if isinstance(r, tuple) else _item(r, "r") for r in requests]
        if len(items) > protocol.MAX_BATCH:
            raise ValueError(f"at most {protocol.MAX_BATCH} paths per call, not {len(items)}")
        return self._open(items, self.timeout) if items else []

    def open(
        self,
        path: StrPath,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Open `path` through the broker and return what builtin open() returns.

        The arguments mean what they mean to open(); the file object's `name`
        is the path.

        Raises:
            ValueError, LookupError: invalid arguments (before any I/O).
            PolicyDenied, OSError, BrokerError, BrokerUnavailable,
            BrokerIdentityError, ProtocolError: as for open_fd.
        """
        return self._open_file(path, mode, buffering, encoding, errors, newline, self.timeout)

    def _open_file(
        self,
        path: StrPath,
        mode: str,
        buffering: int,
        encoding: str | None,
        errors: str | None,
        newline: str | None,
        timeout: float | None,
    ) -> IO[Any]:
        item = _item(path, mode)
        _check_wrap_args(mode, buffering, encoding, errors, newline)
        fd = self._open([item], timeout)[0]
        try:
            # Not a `with`: the file object is what we return.
            file = builtins.open(fd, mode, buffering, encoding, errors, newline)  # noqa: SIM115
        except BaseException:
            os.close(fd)
            raise
        # Text wraps buffered wraps FileIO (buffering=0 is FileIO alone). Only
        # FileIO's name is writable, and the wrappers report it as their own.
        raw: Any = getattr(file, "buffer", file)
        raw = getattr(raw, "raw", raw)
        raw.name = item.path
        return file

    def _open(self, items: list[OpenItem], timeout: float | None) -> list[int]:
        retry_safe = not any(i.access & (Access.CREATE | Access.TRUNCATE) for i in items)
        reply, fds = self._call(
            lambda ident: protocol.OpenRequest(ident, tuple(items)), retry_safe, timeout
        )
        assert isinstance(reply, OpenReply)
        for item, result in zip(items, reply.results, strict=True):
            if result.errno:
                unix.close_fds(fds)
                raise error_for_result(item.path, result)
        return fds

    # ------------------------------------------------------- administration

    def explain(
        self, uid: int, gids: Iterable[int], path: str, access_words: Iterable[str]
    ) -> ExplainReply:
        """Ask the running broker whether its policy allows uid/gids `access_words` on path.

        Args:
            uid: the client uid to judge.
            gids: its primary and supplementary gids.
            path: an absolute, normalised path.
            access_words: e.g. ["read", "write"].

        Returns:
            The broker's answer: allowed, the deciding rule and reason, and
            for a denial the rule that came closest and why it did not match.

        Raises:
            ValueError: an invalid path or access word (before any I/O).
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        access = Access.from_words(access_words)
        gid_tuple = tuple(gids)
        for n in (uid, *gid_tuple):
            if type(n) is not int or not 0 <= n < 2**32:
                raise ValueError(f"not a uid or gid: {n!r}")
        protocol.check_path(path)
        reply, _ = self._call(
            lambda ident: protocol.ExplainRequest(ident, uid, gid_tuple, path, access),
            True,
            self.timeout,
        )
        assert isinstance(reply, ExplainReply)
        return reply

    def status(self) -> dict[str, Any]:
        """The running broker's counters and state, as a dict.

        Raises:
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        reply, _ = self._call(protocol.StatusRequest, True, self.timeout)
        assert isinstance(reply, protocol.StatusReply)
        return dict(reply.fields)

    # ------------------------------------------------------------ exchange

    def _call(
        self, make: Callable[[int], Request], retry_safe: bool, timeout: float | None
    ) -> tuple[protocol.Reply, list[int]]:
        """One request/reply exchange, retried once when that is safe.

        `make(id)` builds the request; it is encoded before any I/O, so a
        request over a limit is a ValueError with nothing sent.
        """
        ex = Exchange(timeout)
        # The wait for another thread's exchange counts against this call's timeout.
        left = ex.remaining()
        if not self._lock.acquire(timeout=-1 if left is None else left):
            raise BrokerUnavailable(
                errno.ETIMEDOUT, "timed out waiting for another thread's call to finish"
            )
        try:
            request = make(next(self._ids))
            data = protocol.encode_request(request)
            for attempt in (1, 2):
                ex.phase, ex.sent = "connect to", False
                reused = self._sock is not None
                try:
                    with library_errors(self.socket_name, ex):
                        if self._sock is None:
                            self._sock = connect(
                                self._address, self.socket_name, self.expected_uid, ex
                            )
                        reply, fds = round_trip(self._sock, request, data, ex)
                except ConnectionLost:
                    self._disconnect()
                    if attempt == 2 or not reused or (ex.sent and not retry_safe):
                        raise
                    continue
                except BaseException:
                    # A bad reply, a timeout, an interrupt: the stream is out of step.
                    self._disconnect()
                    raise
                if isinstance(reply, protocol.ErrorReply):
                    if reply.errno == errno.EPROTO:
                        self._disconnect()  # the broker closes after EPROTO
                    raise BrokerError(reply.errno, reply.reason)
                return reply, fds
        finally:
            self._lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _forget_after_fork(self) -> None:
        # In a fork child: the lock may have been held by a thread that no
        # longer exists, and the connection is the parent's. Close our copy.
        self._lock = threading.Lock()
        self._disconnect()


# ------------------------------------------------------------ shared clients

_ALL_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
_shared_lock = threading.Lock()
_shared: dict[str, Client] = {}


def _after_fork_in_child() -> None:
    global _shared_lock, _shared
    _shared_lock = threading.Lock()
    _shared = {}
    for client in list(_ALL_CLIENTS):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_client(socket_name: str | None) -> Client:
    name = _socket_name(socket_name)
    with _shared_lock:
        client = _shared.get(name)
        if client is None:
            client = _shared[name] = Client(name)
        return client


@overload
def open_privileged(
    path: StrPath,
    mode: OpenTextMode = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> TextIO: ...
@overload
def open_privileged(
    path: StrPath,
    mode: OpenBinaryMode,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> BinaryIO: ...
@overload
def open_privileged(
    path: StrPath,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> IO[Any]: ...
def open_privileged(
    path: StrPath,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> IO[Any]:
    """Open `path` through the broker, like the builtin open().

    Uses one connection per socket name, shared by the process's threads
    (a fork child gets its own).

    Args:
        path, mode, buffering, encoding, errors, newline: as for open();
            path must be absolute and normalised.
        socket: the broker's socket name (default PRIVBROKER_SOCKET, else
            "privbroker").
        timeout: seconds for this call; None means the default, 5 seconds.

    Returns:
        What open() returns for that mode (TextIOWrapper, BufferedReader, ...).

    Raises:
        ValueError, LookupError: invalid arguments (before any I/O).
        PolicyDenied: the policy does not allow it (a PermissionError).
        OSError: the subclass os.open would raise (FileNotFoundError, ...).
        BrokerError: the broker refused the request as a whole.
        BrokerUnavailable: no broker, it went away, or the timeout passed.
        BrokerIdentityError: the socket is not served by root.
        ProtocolError: the reply was invalid.
    """
    client = _shared_client(socket)
    timeout = client.timeout if timeout is None else _check_timeout(timeout)
    return client._open_file(path, mode, buffering, encoding, errors, newline, timeout)
