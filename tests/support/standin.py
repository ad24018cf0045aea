"""A stand-in broker for client tests: real sockets, real protocol, no policy.

It serves an abstract SOCK_SEQPACKET socket from one thread, decodes requests
with privbroker.protocol, and answers through a handler the test chooses. The
default handler opens the path itself (flags from the access words, as the
real broker would) and denies any path with "secret" in it, so tests get real
fds of real files. A handler returns a `Reply` (the fds are then opened from
the request), raw `(bytes, fds)`, `SILENT` (read and never answer) or `CLOSE`
(close the connection without answering).

Everything it opens it closes; `stop()` joins the thread and closes every
socket, so a test can compare /proc/self/fd before and after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from privbroker import protocol, unix
from privbroker.protocol import Access, OpenReply, OpenRequest, Result

SILENT = object()
CLOSE = object()


def unique_name() -> str:
    return f"privbroker-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def open_flags(access: Access, exclusive: bool) -> int:
    """The open(2) flags for a set of access words (what the broker chooses)."""
    writes = access & (Access.WRITE | Access.APPEND)
    if access & Access.READ and writes:
        flags = os.O_RDWR
    elif writes:
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if access & Access.APPEND:
        flags |= os.O_APPEND
    if access & Access.CREATE:
        flags |= os.O_CREAT
    if access & Access.TRUNCATE:
        flags |= os.O_TRUNC
    if exclusive:
        flags |= os.O_EXCL
    return flags | os.O_CLOEXEC | os.O_NOCTTY


def open_items(req: OpenRequest) -> tuple[OpenReply, list[int]]:
    """Open each item as the default stand-in policy says: all but "secret" paths."""
    results, fds = [], []
    for item in req.items:
        if "secret" in item.path:
            results.append(Result(errno.EACCES, True, "no rule allows this", "no secrets"))
            continue
        try:
            fds.append(os.open(item.path, open_flags(item.access, item.exclusive), 0o600))
        except OSError as exc:
            results.append(Result(exc.errno or errno.EIO))
        else:
            results.append(Result())
    return OpenReply(req.id, tuple(results)), fds


def default_handler(req: protocol.Request) -> Any:
    if isinstance(req, OpenRequest):
        return open_items(req)
    if isinstance(req, protocol.StatusRequest):
        return protocol.StatusReply(req.id, {"requests": 1, "policy": "none"})
    return protocol.ExplainReply(req.id, True, "stand-in", "everything is allowed")


Handler = Callable[[protocol.Request], Any]


class StandIn:
    """Serve `handler` on a fresh abstract socket until stop()."""

    def __init__(self, handler: Handler = default_handler, name: str | None = None) -> None:
        self.name = name or unique_name()
        self.handler = handler
        self.connections = 0  # accepted so far
        self.requests: list[protocol.Request] = []
        self.errors: list[BaseException] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind(unix.abstract_address(self.name))
        self._listener.listen(64)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._conns: list[socket.socket] = []
        self._drop = threading.Event()
        self._dropped = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="standin", daemon=True)
        self._thread.start()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> None:
        """Close every accepted connection (as a broker restart or idle timeout would)."""
        self._dropped.clear()
        self._drop.set()
        os.write(self._wake_w, b"d")
        assert self._dropped.wait(10)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop = True
            os.write(self._wake_w, b"s")
            self._thread.join(10)
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self.errors:
            raise self.errors[0]

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop:
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        conn, _ = self._listener.accept()
                        self.connections += 1
                        self._conns.append(conn)
                        sel.register(conn, selectors.EVENT_READ)
                    elif key.fileobj == self._wake_r:
                        os.read(self._wake_r, 64)
                        if self._drop.is_set():
                            for conn in self._conns:
                                sel.unregister(conn)
                                conn.close()
                            self._conns.clear()
                            self._drop.clear()
                            self._dropped.set()
                    else:
                        peer = key.fileobj
                        assert isinstance(peer, socket.socket)
                        if peer in self._conns and not self._serve(peer):
                            sel.unregister(peer)
                            self._conns.remove(peer)
                            peer.close()

    def _serve(self, conn: socket.socket) -> bool:
        """Answer one request; False when the connection is to be closed."""
        try:
            data, fds, _ = unix.recv_message(conn, protocol.MAX_REQUEST_BYTES, 0)
        except (OSError, unix.TruncatedMessage):
            return False
        if not data:
            return False
        try:
            req = protocol.decode_request(data)
        except protocol.ProtocolError:
            return False
        self.requests.append(req)
        try:
            action = self.handler(req)
        except BaseException as exc:  # surface handler bugs in the test
            self.errors.append(exc)
            return False
        if action is CLOSE:
            return False
        if action is SILENT:
            return True
        if isinstance(action, tuple) and isinstance(action[0], bytes):
            raw, fds = action
        elif isinstance(action, tuple):
            reply, fds = action
            raw = protocol.encode_reply(reply)
        else:
            raw, fds = protocol.encode_reply(action), []
        try:
            unix.send_message(conn, raw, fds)
        except OSError:
            return False
        finally:
            unix.close_fds(fds)
        return True
