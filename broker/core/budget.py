"""A budget for fds in flight: sent by the broker, not yet received by a client.

(The server charges a request's items before it opens anything, and refunds
what the reply did not carry, so the fds the broker holds for replies it
cannot send yet are bounded by the same budget.)

The kernel charges every fd in a unix socket's queue to the SENDER's user
(root, for all of root's processes together) and, past RLIMIT_NOFILE of them,
fails every further sendmsg with SCM_RIGHTS (ETOOMANYREFS): one client that
asks and never reads would stop the broker from serving anyone. So the broker
counts what it has sent on each connection and, before it sends more, learns
from SIOCOUTQ whether the client has read it (a connection's queued bytes are
0 once every reply was received). Three bounds hold: per connection (a batch),
per uid (a quarter of the whole, so one uid cannot take it all), and in total
(half of RLIMIT_NOFILE). A reply that does not fit waits (the connection is
"parked"), and the connection is not read until it goes out.

A connection closed with fds still unread is not forgotten: its queue lives on
in the client's socket, so it stays charged until the client reads or closes.
Those sockets are kept, shut down, as "ghosts", and looked at again later.
"""

from __future__ import annotations

import array
import fcntl
import resource
import socket
import termios
from collections import Counter
from typing import TYPE_CHECKING

from privbroker.protocol import MAX_BATCH

if TYPE_CHECKING:
    from .connection import Connection

_OUTQ = termios.TIOCOUTQ  # == SIOCOUTQ


def unread_bytes(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not received yet (-1 if unknown)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _OUTQ, buf)
    except OSError:
        return -1
    return buf[0]


class FdBudget:
    def __init__(self, total: int, per_conn: int) -> None:
        self.total = total
        self.per_uid = max(per_conn, total // 4)
        self.per_conn = per_conn
        self.unread = 0
        self.by_uid: Counter[int] = Counter()
        self._conns: dict[Connection, int] = {}  # connection -> fds maybe unread
        self.ghosts: dict[socket.socket, tuple[int, int]] = {}  # sock -> (uid, fds)

    @classmethod
    def for_process(cls, processes: int = 1) -> FdBudget:
        """This process's budget: half of RLIMIT_NOFILE in all, split between
        the broker's processes (the kernel counts what all of root's
        processes have in flight); a full batch per connection."""
        share = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 // processes
        return cls(total=max(MAX_BATCH, share), per_conn=MAX_BATCH)

    def fits(self, conn: Connection, n: int) -> bool:
        """May `n` more fds go to `conn` now? Learns what was read, as needed."""
        uid = conn.peer.uid
        mine = self._conns.get(conn, 0)
        if mine and mine + n > self.per_conn:
            self._refresh(conn)
        if self.by_uid[uid] + n > self.per_uid:
            for c in [c for c in self._conns if c.peer.uid == uid]:
                self._refresh(c)
            self._look_at_ghosts()
        if self.unread + n > self.total:
            for c in list(self._conns):
                self._refresh(c)
            self._look_at_ghosts()
        return (
            self._conns.get(conn, 0) + n <= max(self.per_conn, n)
            and self.by_uid[uid] + n <= self.per_uid
            and self.unread + n <= self.total
        )

    def room(self, conn: Connection) -> tuple[int, int]:
        """How many fds may go to `conn` now, as far as is known without
        asking the kernel; and how many once its client has read all it was
        sent (then call drained())."""
        mine = self._conns.get(conn, 0)
        room = min(self.per_uid - self.by_uid[conn.peer.uid], self.total - self.unread)
        return min(room, self.per_conn - mine), min(room + mine, self.per_conn)

    def drained(self, conn: Connection) -> None:
        """`conn`'s client has read every fd sent to it (SIOCOUTQ is 0)."""
        self._release(conn.peer.uid, self._conns.pop(conn, 0))

    def charge(self, conn: Connection, n: int) -> None:
        if n:
            self._conns[conn] = self._conns.get(conn, 0) + n
            self.by_uid[conn.peer.uid] += n
            self.unread += n

    def refund(self, conn: Connection, n: int) -> None:
        """Give back `n` of what was charged to `conn` and will not be sent."""
        n = min(n, self._conns.get(conn, 0))
        if n > 0:
            self._conns[conn] -= n
            if not self._conns[conn]:
                del self._conns[conn]
            self._release(conn.peer.uid, n)

    def _refresh(self, conn: Connection) -> None:
        if unread_bytes(conn.sock) == 0:
            self._release(conn.peer.uid, self._conns.pop(conn, 0))

    def _release(self, uid: int, n: int) -> None:
        self.unread -= n
        self.by_uid[uid] -= n
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]

    def closing(self, conn: Connection) -> bool:
        """The connection is closing: True if its socket must live on as a ghost."""
        n = self._conns.pop(conn, 0)
        if not n:
            return False
        if unread_bytes(conn.sock) == 0:
            self._release(conn.peer.uid, n)
            return False
        self.ghosts[conn.sock] = (conn.peer.uid, n)
        return True

    def _look_at_ghosts(self) -> None:
        for sock, (uid, n) in list(self.ghosts.items()):
            # 0 once the client read its replies, or closed (its queue is freed then).
            if unread_bytes(sock) <= 0:
                del self.ghosts[sock]
                self._release(uid, n)
                sock.close()

    def sweep(self) -> None:
        """Periodic: let ghosts go once their fds are no longer in flight."""
        self._look_at_ghosts()

    def close(self) -> None:
        for sock in self.ghosts:
            sock.close()
        self.ghosts.clear()
