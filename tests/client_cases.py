"""Cases shared by the client tests (sync, asyncio, restart): impostors and bad replies.

- `with_impostor(answer, body)`: a process running as nobody listens on a
  fresh abstract name (as a squatter would while the broker is down), and
  `body(name)` runs against it; returns what the impostor received.
- `BAD_REPLIES`: stand-in handlers that answer an open of two paths with
  something that is not a valid answer, each with real fds where fds matter.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from client import protocol, unix
from client.protocol import MAX_BATCH, ErrorReply, OpenReply, Result, StatusReply
from tests.privs import NOBODY, NOGROUP, run_as
from tests.standin import unique_name


def _listen_as_nobody(name: str, ready_w: int, answer: bool) -> bytes:
    """In a child as uid 65534: listen, accept one client, return what it sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(unix.abstract_address(name))
        listener.listen(4)
        os.write(ready_w, b"1")
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            data = conn.recv(protocol.MAX_REQUEST_BYTES)  # b"": closed, nothing sent
            if answer and data:
                req = protocol.decode_request(data)
                reply = OpenReply(req.id, (Result(errno.ENOENT),))
                unix.send_message(conn, protocol.encode_reply(reply))
                conn.recv(16)  # wait for the client to hang up
            return data


def with_impostor(answer: bool, body: Callable[[str], None], name: str | None = None) -> bytes:
    """Run body(name) while a nobody process listens on `name`; return what it received.

    With `answer`, the impostor answers one open request with ENOENT.
    """
    name = name or unique_name()
    ready_r, ready_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            child = pool.submit(run_as, NOBODY, NOGROUP, _listen_as_nobody, name, ready_w, answer)
            assert select.select([ready_r], [], [], 20)[0], "listener child never got ready"
            body(name)
            result: bytes = child.result(30)
            return result
    finally:
        os.close(ready_r)
        os.close(ready_w)


def null_fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


# Each answers a request to open two paths; every fd listed is sent, then closed.
BAD_REPLIES: list[tuple[str, Any]] = [
    ("not msgpack", lambda r: (b"\xc1", [])),
    ("empty array", lambda r: (msgpack.packb([]), [])),
    ("wrong version", lambda r: (msgpack.packb([2, 1, r.id, [[0, False, "", None]]]), null_fds(1))),
    ("wrong id", lambda r: (OpenReply(r.id + 1, (Result(),)), null_fds(1))),
    ("status to open", lambda r: StatusReply(r.id, {})),
    ("fewer fds", lambda r: (OpenReply(r.id, (Result(), Result())), null_fds(1))),
    ("more fds", lambda r: (OpenReply(r.id, (Result(), Result())), null_fds(3))),
    ("fds with a failure", lambda r: (OpenReply(r.id, (Result(2), Result(2))), null_fds(1))),
    ("fds on an error", lambda r: (ErrorReply(r.id, errno.EBUSY, "busy"), null_fds(2))),
    ("too few results", lambda r: (OpenReply(r.id, (Result(),)), null_fds(1))),
    ("too many results", lambda r: (OpenReply(r.id, (Result(),) * 3), null_fds(3))),
    ("oversized", lambda r: (b"\x00" * (protocol.MAX_REPLY_BYTES + 100), [])),
    ("too many fds", lambda r: (OpenReply(r.id, (Result(),) * 2), null_fds(MAX_BATCH + 2))),
]
