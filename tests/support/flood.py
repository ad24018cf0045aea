"""One uid flooding the broker within its default limits (issue 14's attack).

Used by tests/core/test_fairness.py ("a flooding uid does not stop another
uid's opens being served") and tests/bench/bench_fairness.py (what it costs
the other uid). `flooding(name, kind)` forks `procs` processes that drop to
the flooder's uid and each keep `conns` connections busy: every connection
keeps `depth` requests in flight, sending one more for each reply, with the
raw protocol (privbroker.protocol), so nothing waits per request. Kinds:

- "deny": 250-item batches of paths no rule concerns (default denials, which
  the broker does not cache: each is judged again);
- "long": 4 KiB paths under a `**` rule that names the flooder but never
  matches them (see LONG_RULE), as many as fit a request.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from privbroker import protocol as proto
from privbroker import unix
from privbroker.protocol import Access, OpenItem

FLOODER = 65534
LONG_PATH = 4000  # bytes: near MAX_PATH_BYTES
# The rule the "long" flood is judged against (it grants the flooder nothing it asks).
LONG_RULE = f"""
[[allow]]
name = "the flooder reads text under /srv/pub"
users = [{FLOODER}]
paths = ["/srv/pub/**/*.txt"]
access = ["read"]
"""


def requests(kind: str, conn: int, depth: int) -> list[bytes]:
    """The datagrams one flood connection sends, again and again."""
    if kind == "deny":
        items = [
            OpenItem(f"/srv/flood/c{conn}/item{i}/data.bin", Access.READ)
            for i in range(proto.MAX_BATCH)
        ]
    elif kind == "long":
        stem = "/srv/pub/" + "/".join(["d" * 60] * (LONG_PATH // 61))
        items = []
        for i in range(proto.MAX_BATCH):
            items.append(OpenItem(f"{stem}/c{conn}i{i}.bin", Access.READ))
            try:  # as many as fit one request, with room for larger ids
                proto.encode_request(proto.OpenRequest(proto.MAX_ID, tuple(items)))
            except ValueError:
                items.pop()
                break
    else:
        raise ValueError(kind)
    return [proto.encode_request(proto.OpenRequest(k + 1, tuple(items))) for k in range(depth)]


def flood(name: str, kind: str, conns: int, depth: int, ready_w: int, stop_r: int) -> int:
    """Flood until `stop_r` is readable (or at EOF); a byte on `ready_w` once
    every connection has its requests in flight. Returns the replies read."""
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, list[bytes]]] = {}
    for c in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        s.connect(unix.abstract_address(name))
        reqs = requests(kind, c, depth)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for data in reqs:
                s.send(data)  # as many as fit; each reply sends one more
        socks[s.fileno()] = (s, reqs)
        ep.register(s.fileno(), select.EPOLLIN)
    ep.register(stop_r, select.EPOLLIN)
    os.write(ready_w, b"r")
    replies = 0
    buf = bytearray(proto.MAX_REPLY_BYTES)
    while True:
        for fd, events in ep.poll(1.0):
            if fd == stop_r:
                return replies
            s, reqs = socks[fd]
            if events & (select.EPOLLHUP | select.EPOLLERR):
                ep.unregister(fd)  # the broker closed it: flood on with the rest
                continue
            with contextlib.suppress(BlockingIOError):
                while s.recv_into(buf):
                    replies += 1
                    with contextlib.suppress(BlockingIOError):
                        s.send(reqs[replies % depth])  # one more in flight per reply


@dataclass
class Flood:
    """What the flooders did: the replies they read, filled in at the end."""

    replies: int = 0


@contextlib.contextmanager
def flooding(
    name: str, kind: str = "deny", *, procs: int = 2, conns: int = 128, depth: int = 4
) -> Iterator[Flood]:
    """`procs` flooder processes as FLOODER, each with `conns` connections,
    for the block (2 x 128: the broker's default limit per uid)."""
    kids: list[tuple[int, int, int]] = []  # pid, stop pipe's write end, result pipe's read end
    ready_r, ready_w = os.pipe()
    out = Flood()
    try:
        for _ in range(procs):
            stop_r, stop_w = os.pipe()
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    for _pid, w, r in kids:
                        os.close(w)  # EOF on stop_r comes from the parent alone
                        os.close(r)
                    os.close(stop_w)
                    os.close(res_r)
                    os.setgroups([])
                    os.setgid(FLOODER)
                    os.setuid(FLOODER)
                    n = flood(name, kind, conns, depth, ready_w, stop_r)
                    os.write(res_w, str(n).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(stop_r)
            os.close(res_w)
            kids.append((pid, stop_w, res_r))
        for _ in kids:
            ready, _, _ = select.select([ready_r], [], [], 60)
            if not ready:
                raise RuntimeError("the flooders did not start")
            os.read(ready_r, 1)
        yield out
    finally:
        for _pid, stop_w, _r in kids:
            os.close(stop_w)
        for pid, _w, res_r in kids:
            ready, _, _ = select.select([res_r], [], [], 10)
            got = os.read(res_r, 64) if ready else b""
            out.replies += int(got or 0)
            os.close(res_r)
            if not got:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def settle(seconds: float = 0.3) -> None:
    """Give every flood connection's first requests time to queue at the broker."""
    time.sleep(seconds)
