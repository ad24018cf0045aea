"""The asyncio client: `AsyncClient` and `open_privileged`, on the running loop.

The same calls, arguments, errors, timeouts and retry rules as the sync
client in api.py (both take them from calls.py), carried without threads by
a non-blocking socket that the running loop watches (aio_connection.py).
File I/O on what `open()` returns stays synchronous, as with builtin open().

- Rule 1 (identity): every fresh connection, a reconnect after a broker
  restart included, is checked against `expected_uid` (SO_PEERCRED) before a
  byte is sent. Rule 2: arguments are validated before any I/O.
- Rule 3 (pipelining): the tasks using a client share one connection, each
  request in flight under its own id, so `asyncio.gather` of many opens needs
  one connection and no task waits for another's round trip. Connecting is
  done once, under a lock, for every task that needs it.
- Rule 4 (cancellation never leaks an fd): a call cancelled or timed out
  while its request is in flight leaves the connection usable; the reply,
  when it comes, is dropped and its fds closed. A call cancelled after its
  reply arrived closes the fds itself. Once a call has returned, its fds are
  the caller's.
- Rule 5 (reconnect and retry): a connection the broker closed is noticed by
  the reader (or at the next send) and replaced at the next call; a request
  lost with it is resent once when `calls.may_retry` says so, never one that
  creates or truncates after it was delivered.
- Rule 5b: a one-path open takes the sync client's fast lane (aio_lane.py);
  every rule above holds on it.
- Rule 6: a client belongs to one loop at a time and is not thread-safe
  (like asyncio's own objects). Used from another loop, it drops the old
  loop's connection and connects afresh; a fork child never uses the
  parent's connection.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import weakref
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TextIO, TypeVar, overload

from . import aio_lane, calls, protocol, unix
from .aio_connection import Answer, Link, Trip, connect
from .aio_net import AsyncSockets, bind_privileged, icmp_socket, raw_socket
from .aio_netapi import add_address, add_route, del_address, del_route, open_tun, set_link
from .calls import DEFAULT_TIMEOUT, MakeRequest, OpenRequests
from .connection import ConnectionLost, Exchange, library_errors
from .errors import BrokerUnavailable
from .protocol import ErrorReply, ExplainReply, OpenItem, Request

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode, OpenTextMode, StrPath

_R = TypeVar("_R")  # what a Trip brings back: a reply, or one path's result

__all__ = ["AsyncClient", "bind_privileged", "icmp_socket", "open_privileged", "raw_socket"]
__all__ += ["add_address", "add_route", "del_address", "del_route", "open_tun", "set_link"]


class AsyncClient(AsyncSockets):
    """A connection to the broker for one event loop, opened lazily and shared by tasks.

    Args:
        socket: the broker's abstract socket name; default the environment's
            PRIVBROKER_SOCKET, else "privbroker".
        timeout: seconds each call may take in all (connecting, sending,
            waiting for the reply); None waits forever.
        expected_uid: the uid the broker must run as (SO_PEERCRED).

    The socket calls (bind_privileged, icmp_socket, raw_socket) are in aio_net.py;
    `client.net` (open_tun, add_address, ...: leased to this connection) in aio_netapi.py.
    `await close()` (or leaving an `async with` block) closes the connection;
    calls still in flight then fail with BrokerUnavailable (ECONNABORTED). A
    client used again afterwards simply reconnects.

    Raises:
        ValueError: the socket name or the timeout is invalid.
    """

    def __init__(
        self,
        socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        expected_uid: int = 0,
    ) -> None:
        self.socket_name = calls.socket_name(socket)
        self._address = unix.abstract_address(self.socket_name)
        self.timeout = calls.check_timeout(timeout)
        self.expected_uid = expected_uid
        self._ids = itertools.count(1)
        self._link: Link | None = None
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._connecting: asyncio.Lock | None = None
        _ALL_CLIENTS.add(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __del__(self) -> None:
        link, self._link = getattr(self, "_link", None), None
        if link is not None:
            link.close_threadsafe()

    async def close(self) -> None:
        """Close the connection; calls in flight fail; a later call reconnects."""
        link, self._link = self._link, None
        if link is None:
            return
        if link.closed or self._loop is None or self._loop() is not asyncio.get_running_loop():
            link.close_threadsafe()
            return
        link.close(
            BrokerUnavailable(
                errno.ECONNABORTED,
                f"the client closed its connection to the broker socket @{self.socket_name}",
            )
        )

    # ------------------------------------------------------------ opening

    async def open_fd(self, path: StrPath, mode: str = "r") -> int:
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
        return await self._open_one(calls.prepare_open(path, mode), self.timeout)

    async def open_many(self, requests: OpenRequests) -> list[int]:
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
        items = calls.open_items(requests)
        return await self._open(items, self.timeout) if items else []

    async def open(
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
        is the path. Reading and writing it are ordinary (blocking) file I/O.

        Raises:
            ValueError, LookupError: invalid arguments (before any I/O).
            PolicyDenied, OSError, BrokerError, BrokerUnavailable,
            BrokerIdentityError, ProtocolError: as for open_fd.
        """
        return await self._open_file(path, mode, buffering, encoding, errors, newline, self.timeout)

    async def _open_file(
        self,
        path: StrPath,
        mode: str,
        buffering: int,
        encoding: str | None,
        errors: str | None,
        newline: str | None,
        timeout: float | None,
    ) -> IO[Any]:
        prepared = calls.prepare_open(path, mode)
        calls.check_wrap_args(mode, buffering, encoding, errors, newline)
        fd = await self._open_one(prepared, timeout)
        # No await from here on: the fd cannot be stranded by a cancellation.
        return calls.wrap(fd, prepared.item.path, mode, buffering, encoding, errors, newline)

    async def _open_one(self, prepared: calls.PreparedOpen, timeout: float | None) -> int:
        request, data = aio_lane.open_request(next(self._ids), prepared)
        result, fds = await self._carry(request, data, timeout, Link.exchange_open)
        return calls.open_fd(prepared.item.path, result, fds)

    async def _open(self, items: list[OpenItem], timeout: float | None) -> list[int]:
        reply, fds = await self._call(calls.open_request(items), timeout)
        return calls.open_fds(items, reply, fds)

    # ------------------------------------------------------- administration

    async def explain(
        self, uid: int, gids: Iterable[int], path: str, access_words: Iterable[str]
    ) -> ExplainReply:
        """Ask the running broker whether its policy allows uid/gids `access_words` on path.

        Returns the broker's answer, as `Client.explain` does.

        Raises:
            ValueError: an invalid path or access word (before any I/O).
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        make = calls.explain_request(uid, gids, path, access_words)
        reply, _ = await self._call(make, self.timeout)
        assert isinstance(reply, ExplainReply)
        return reply

    async def status(self) -> dict[str, Any]:
        """The running broker's counters and state, as a dict.

        Raises:
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        reply, _ = await self._call(protocol.StatusRequest, self.timeout)
        assert isinstance(reply, protocol.StatusReply)
        return dict(reply.fields)

    # ------------------------------------------------------------ exchange

    async def _call(self, make: MakeRequest, timeout: float | None) -> Answer:
        """_carry, the request encoded before any I/O (over a limit: ValueError, nothing sent)."""
        request = make(next(self._ids))
        return await self._carry(request, protocol.encode_request(request), timeout, Link.exchange)

    async def _carry(
        self, request: Request, data: bytes, timeout: float | None, trip: Trip[_R]
    ) -> tuple[_R, list[int]]:
        """Carry `request` (encoded as `data`) by `trip`, retried once when that is safe.

        The whole call, waiting for another task's connect included, runs
        under one asyncio.timeout; its expiry is a BrokerUnavailable (ETIMEDOUT).
        """
        connecting = self._bind()
        ex = Exchange(None)  # phase and sent; the deadline is asyncio.timeout's
        with library_errors(self.socket_name, ex):
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    ex.phase, ex.sent = "connect to", False
                    link = self._link
                    reused = link is not None and not link.closed
                    try:
                        with library_errors(self.socket_name, ex):
                            if link is None or link.closed:
                                link = await self._connect(connecting)
                            reply, fds = await trip(link, request, data, ex)
                    except ConnectionLost:
                        self._drop(link)
                        if calls.may_retry(
                            attempt=attempt, reused=reused, sent=ex.sent, request=request
                        ):
                            continue
                        raise
                    if isinstance(reply, ErrorReply):
                        if calls.closes_connection(reply):
                            self._drop(link)
                        raise calls.refusal(reply)
                    return reply, fds
        raise AssertionError("unreachable")  # pragma: no cover

    def _bind(self) -> asyncio.Lock:
        """Attach to the running loop (dropping another loop's connection)."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop() is not loop or self._connecting is None:
            old, self._link = self._link, None
            if old is not None:
                old.close_threadsafe()
            self._loop = weakref.ref(loop)
            self._connecting = asyncio.Lock()
        return self._connecting

    async def _connect(self, connecting: asyncio.Lock) -> Link:
        """The live link, connecting it first if no other task has."""
        async with connecting:
            link = self._link
            if link is None or link.closed:
                link = self._link = await connect(
                    self._address, self.socket_name, self.expected_uid
                )
            return link

    def _drop(self, link: Link | None) -> None:
        if link is not None:
            link.close()
            if self._link is link:
                self._link = None

    def _forget_after_fork(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.forget()
        self._loop = self._connecting = None


# ------------------------------------------------------------ shared clients

_ALL_CLIENTS: weakref.WeakSet[AsyncClient] = weakref.WeakSet()
# One client per socket name and loop; the loop is a weak key, and nothing in
# a client refers to it strongly, so a finished loop takes its clients along.
_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


def _after_fork_in_child() -> None:
    _shared.clear()
    for client in list(_ALL_CLIENTS):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_client(socket_name: str | None) -> AsyncClient:
    clients = _shared.setdefault(asyncio.get_running_loop(), {})
    name = calls.socket_name(socket_name)
    if (client := clients.get(name)) is None:
        client = clients[name] = AsyncClient(name)
    return client


@overload
async def open_privileged(
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
async def open_privileged(
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
async def open_privileged(
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
async def open_privileged(
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
    """Open `path` through the broker, like the builtin open(), from a coroutine.

    Arguments, return value and exceptions as for the sync
    `client.open_privileged`; the connection is shared per socket name and
    event loop by the loop's tasks.
    """
    timeout = calls.check_timeout(timeout)
    client = _shared_client(socket)
    timeout = client.timeout if timeout is None else timeout
    return await client._open_file(path, mode, buffering, encoding, errors, newline, timeout)
