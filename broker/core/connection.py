"""One client connection's state, and the limits that bound all of them."""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from privbroker import protocol as proto
from privbroker import unix

from .peer import Peer


class Pending(Protocol):
    """A request of this connection still at the workers (dispatch.PendingOpen)."""

    def drop(self) -> None:
        """The connection closed: whatever the workers open for it is closed."""


@dataclass(frozen=True)
class Limits:
    """The broker's resource limits; every one is a `serve` option."""

    max_connections: int = 4096
    max_connections_per_uid: int = 256
    idle_timeout: float = 60.0
    backlog: int = 128
    # Requests a connection may have waiting for workers before the broker
    # stops reading from it (back-pressure, not an error).
    max_pending: int = 8
    workers: int = 32
    open_timeout: float = 10.0

    def refusal(self, total: int, for_uid: int, uid: int) -> str:
        """Why one more connection (from `uid`) is refused, or ""."""
        if total >= self.max_connections:
            return f"{total} connections, the broker's limit"
        if for_uid >= self.max_connections_per_uid:
            return f"uid {uid} has {for_uid} connections, the per-uid limit"
        return ""


class Connection:
    """One client: its socket, its kernel identity, its unsent reply."""

    __slots__ = (
        "declared",
        "deferred",
        "exe",
        "fd",
        "last_active",
        "mask",
        "outbox",
        "peer",
        "pending",
        "sock",
        "subject",
    )

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.subject = peer.subject  # read once: the policy's view of this peer
        self.mask = -1  # the epoll events it is registered for
        self.exe = peer.exe()
        self.declared: str | None = None  # the program, in the client's words
        self.last_active = now
        # (datagram, fds the broker still owns) waiting for the client to read.
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.pending: set[Pending] = set()  # dispatch.PendingOpen at the workers
        # An open request waiting for its client to read earlier fds (budget.py).
        self.deferred: tuple[proto.Request, str, int] | None = None

    def close(self, keep_socket: bool = False) -> None:
        while self.outbox:
            unix.close_fds(self.outbox.popleft()[1])
        self.peer.close()
        if not keep_socket:
            self.sock.close()


def who(peer: Peer) -> str:
    """The peer as the log names it."""
    return f"uid {peer.uid} gid {peer.gid} pid {peer.pid}"


def credential_mismatch(cred: unix.Ucred, peer: Peer) -> str:
    """Why a request's SCM_CREDENTIALS disagree with the connection's, or ""."""
    if (cred.uid, cred.gid) == (peer.uid, peer.gid):
        return ""
    return (
        f"the request's credentials (uid {cred.uid}, gid {cred.gid}) differ from the "
        f"connection's (uid {peer.uid}, gid {peer.gid}): the socket was passed on or its "
        "owner changed identity; connect again"
    )
