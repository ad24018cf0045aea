"""One broker connection on the running asyncio loop, requests pipelined by id.

The asyncio twin of connection.py, with no threads: a non-blocking
SOCK_SEQPACKET socket, `loop.add_reader` for replies (asyncio's sock_recv
cannot receive ancillary data, so the reader calls `unix.recv_message`, whose
recvmsg takes the fds) and `loop.add_writer` when the send buffer is full.
Errors become privbroker's at the same boundary as the sync client's,
`connection.library_errors`.

Many requests may be in flight on one `Link`; the broker answers each with
the request's id, in any order, and the reader hands each reply to the
future registered under that id. How it keeps the invariants:

- Rule 1 (identity, docs/security.md, invariant 8): `connect` checks the broker's
  SO_PEERCRED uid before the link exists, so nothing is sent to an impostor.
- Rule 2 (a reply answers its request): a reply is checked against the
  request registered under its id (`calls.check_reply`); a reply that fails,
  or carries an id nobody is waiting for, or is not a message at all,
  poisons the link: it is closed and every request in flight on it fails.
  A one-path open sent by `exchange_open` has its usual reply parsed by the
  fast lane (aio_lane.py), which accepts exactly what these checks accept
  and hands anything else to them.
- Rule 3 (every fd has one owner, through cancellation): a reply's fds go to
  the future of its request. If the caller is cancelled (or times out)
  before the reply arrives, the id stays registered with a cancelled future,
  and the reader closes that reply's fds when it comes. If the reply had
  already arrived, the cancelled caller closes the fds itself. A late reply
  is never mistaken for another request's, so a cancellation does not
  poison the link.
- Rule 4 (a dead link fails loudly): at end of stream every request in
  flight fails with ConnectionLost, marked as sent, so the caller's retry
  rule (`calls.may_retry`) can tell a delivered request from one that was
  not; fds still queued in a closed socket are released by the kernel.

A Link belongs to the loop it was made on, and only that loop's thread may
use it; `close_threadsafe` and `forget` are for a finalizer and a fork child.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import aio_lane, calls, protocol, unix
from .connection import ConnectionLost, Exchange, check_identity, library_errors, new_socket
from .protocol import ErrorReply, OpenReply, OpenRequest, Reply, Request, Result

# Replies taken per reader wake-up, so that a flood cannot starve the loop.
_MAX_REPLIES_PER_WAKEUP = 64
# Polling a full listen backlog: first and longest pause, in seconds.
_BACKLOG_POLL_FIRST = 0.001
_BACKLOG_POLL_MAX = 0.05

Answer = tuple[Reply, list[int]]
# What a one-path open brings back: its checked result (with the fd, if it
# succeeded), or the ERROR reply that refused it; and the fds.
OpenAnswer = tuple[Result | ErrorReply, list[int]]
# What the reader hands a waiting call: a bare Result only to a fast request.
_Carried = tuple[Reply | Result, list[int]]
_R = TypeVar("_R")
# How a request crosses a link: Link.exchange, or Link.exchange_open for one
# path. It brings back what answers the request, or the ERROR reply, and the fds.
Trip = Callable[["Link", Any, bytes, Exchange], Awaitable[tuple[_R | ErrorReply, list[int]]]]


async def connect(address: bytes, name: str, expected_uid: int) -> Link:
    """A Link to a peer running as `expected_uid` (inside library_errors).

    The deadline is the caller's (asyncio.timeout); a cancelled connect closes
    its socket.
    """
    loop = asyncio.get_running_loop()
    sock = new_socket()
    try:
        sock.setblocking(False)
        pause = _BACKLOG_POLL_FIRST
        while True:
            try:
                sock.connect(address)
                break
            except BlockingIOError:
                # EAGAIN: the listener's backlog is full. No readiness event
                # says when it has room (an unconnected unix socket polls
                # writable at once, which is why loop.sock_connect would
                # report a connection that does not exist), so poll.
                await asyncio.sleep(pause)
                pause = min(pause * 2, _BACKLOG_POLL_MAX)
        check_identity(sock, name, expected_uid)
        return Link(sock, name, loop)
    except BaseException:
        sock.close()
        raise


def _fresh(exc: BaseException) -> BaseException:
    """A copy of `exc` for one more waiter (one exception object, one traceback)."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:  # pragma: no cover - every exception we raise rebuilds from args
        return exc
    copy.__cause__ = exc.__cause__
    return copy


class Link:
    """A connected, identity-checked socket serving pipelined requests on one loop."""

    def __init__(self, sock: socket.socket, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.name = name
        self.closed = False
        self._fd = sock.fileno()
        # Weak: a shared client must not keep its loop alive (aio._shared).
        self._loop = weakref.ref(loop)
        # id -> (request, its caller's future, whether the fast lane may answer it)
        self._pending: dict[int, tuple[Request, asyncio.Future[_Carried], bool]] = {}
        self._send_waiters: list[asyncio.Future[None]] = []
        self._rx = Exchange(None)
        self._rx.phase, self._rx.sent = "receive from", True
        loop.add_reader(self._fd, self._on_readable)

    def __del__(self) -> None:
        # Unreachable means no loop holds our reader any more: just the fd.
        if not getattr(self, "closed", True):
            self.closed = True
            self.sock.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (cancelled ones included)."""
        return len(self._pending)

    # ------------------------------------------------------------- exchange

    async def exchange(self, request: Request, data: bytes, ex: Exchange) -> Answer:
        """Send `data` (the encoded `request`); return the checked reply and its fds.

        Raises (inside library_errors): ConnectionLost, OSError, and whatever
        poisoned the link while the request was in flight.
        """
        reply, fds = await self._carry(request, data, ex, False)
        assert not isinstance(reply, Result)  # a bare Result answers only a fast request
        return reply, fds

    async def exchange_open(self, request: OpenRequest, data: bytes, ex: Exchange) -> OpenAnswer:
        """`exchange` for a one-path open (`data` from aio_lane.open_request), by the fast lane.

        Returns the path's checked result or the ERROR reply, and the fds;
        raises as `exchange` does.
        """
        reply, fds = await self._carry(request, data, ex, True)
        if isinstance(reply, OpenReply):  # the general decoder took it: one checked result
            return reply.results[0], fds
        assert isinstance(reply, Result | ErrorReply)  # check_reply: OPEN or ERROR answers OPEN
        return reply, fds

    async def _carry(self, request: Request, data: bytes, ex: Exchange, fast: bool) -> _Carried:
        loop = asyncio.get_running_loop()
        ex.phase = "send to"
        while True:
            if self.closed:  # by the reader, while we waited for room to send
                raise ConnectionLost(errno.ECONNRESET, f"the broker socket @{self.name} closed")
            try:
                unix.send_message(self.sock, data)
                break
            except BlockingIOError:
                await self._writable(loop)
        # No await between the send and this registration: the reply cannot
        # be read before its future exists.
        ex.sent, ex.phase = True, "receive from"
        answer: asyncio.Future[_Carried] = loop.create_future()
        self._pending[request.id] = (request, answer, fast)
        try:
            return await answer
        except BaseException:
            self._abandon(answer)
            raise

    @staticmethod
    def _abandon(answer: asyncio.Future[_Carried]) -> None:
        """The caller of `answer` gives up (cancelled, timed out, interrupted)."""
        # Task.cancel() has usually cancelled `answer` already. Either way its
        # id stays registered, and the reader closes the late reply's fds.
        if not answer.done():  # pragma: no cover - only if not driven by a Task
            answer.cancel()
        elif not answer.cancelled() and answer.exception() is None:
            unix.close_fds(answer.result()[1])  # it came, but nobody will return it

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._send_waiters.append(waiter)
        if len(self._send_waiters) == 1:
            loop.add_writer(self._fd, self._on_writable)
        try:
            await waiter
        finally:
            if waiter in self._send_waiters:  # cancelled before the wake-up
                self._send_waiters.remove(waiter)
                if not self._send_waiters and not self.closed:
                    loop.remove_writer(self._fd)

    def _on_writable(self) -> None:
        waiters, self._send_waiters = self._send_waiters, []
        asyncio.get_running_loop().remove_writer(self._fd)
        for waiter in waiters:
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)

    # --------------------------------------------------------------- reader

    def _on_readable(self) -> None:
        for _ in range(_MAX_REPLIES_PER_WAKEUP):
            try:
                with library_errors(self.name, self._rx):
                    try:
                        raw, fds, _ = unix.recv_message(
                            self.sock, protocol.MAX_REPLY_BYTES, protocol.MAX_BATCH, creds=True
                        )
                    except BlockingIOError:
                        return
                    self._deliver(raw, fds)
            except Exception as exc:
                self.close(exc)  # a reply that arrived after this is the kernel's to free
                return

    def _deliver(self, raw: bytes, fds: list[int]) -> None:
        try:
            if not raw and not fds:
                raise ConnectionLost(errno.ECONNRESET, "the broker closed the connection")
            ident = aio_lane.reply_id(raw)  # a hint: fast_result checks the whole reply
            if ident is not None and (fast := self._pending.get(ident)) is not None and fast[2]:
                result = aio_lane.fast_result(raw, ident, len(fds))
                if result is not None:
                    del self._pending[ident]
                    self._hand(fast[1], (result, fds))
                    return
            reply = protocol.decode_reply(raw)
            entry = self._pending.get(reply.id)
            if entry is None:
                raise protocol.ProtocolError(f"reply id {reply.id} answers no request in flight")
            calls.check_reply(entry[0], reply, len(fds))
        except BaseException:
            unix.close_fds(fds)
            raise  # and close() fails every request in flight, this one included
        del self._pending[reply.id]
        self._hand(entry[1], (reply, fds))

    @staticmethod
    def _hand(answer: asyncio.Future[_Carried], carried: _Carried) -> None:
        """Give a checked reply (or fast result) and its fds to the call waiting for it."""
        if answer.done():  # its caller was cancelled: nobody else owns these
            unix.close_fds(carried[1])
        else:
            answer.set_result(carried)

    # -------------------------------------------------------------- closing

    def close(self, error: BaseException | None = None) -> None:
        """Close the socket (on the loop's thread); fail what is in flight with `error`.

        Without `error`, requests in flight fail with ConnectionLost.
        """
        if self.closed:
            return
        self.closed = True
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._fd)
            if self._send_waiters:
                loop.remove_writer(self._fd)
        self.sock.close()
        waiters, self._send_waiters = self._send_waiters, []
        for waiter in waiters:  # they wake, see `closed`, and fail unsent
            if not waiter.done():
                waiter.set_result(None)
        pending, self._pending = self._pending, {}
        for _, answer, _ in pending.values():
            if not answer.done():
                exc = _fresh(error) if error is not None else None
                answer.set_exception(
                    exc or ConnectionLost(errno.ECONNRESET, f"lost the broker socket @{self.name}")
                )

    def close_threadsafe(self) -> None:
        """Close from any thread (a finalizer, another loop's client)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            self.forget()
        elif loop.is_running():
            try:
                loop.call_soon_threadsafe(self.close)
            except RuntimeError:  # closed meanwhile: its selector is gone too
                self.forget()
        else:
            self.close()

    def forget(self) -> None:
        """Close our fd and touch nothing else (a fork child: the loop is the parent's)."""
        if not self.closed:
            self.closed = True
            self.sock.close()
        self._pending = {}
        self._send_waiters = []
