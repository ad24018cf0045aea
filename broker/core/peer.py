"""Who is on the other end of a connection, as the kernel says, read once at accept.

SO_PEERCRED gives the uid, gid and pid the peer had when it called connect();
SO_PEERGROUPS its supplementary groups then; SO_PEERPIDFD (Linux 6.5+) a pidfd
that pins that very process, so a recycled pid can never be mistaken for it.
Nothing here is taken from the client's own words (docs/security.md, invariant 4).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
from dataclasses import dataclass

from privbroker import unix

from ..policy.decide import Subject


class StalePeer(Exception):
    """The peer process is gone before we could pin it; the connection is useless."""


@dataclass(frozen=True, slots=True)
class Peer:
    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...]
    groups_complete: bool
    pidfd: int | None

    @property
    def subject(self) -> Subject:
        return Subject(
            self.uid, self.gid, frozenset((self.gid, *self.groups)), self.groups_complete
        )

    def alive(self) -> bool:
        """False once the pinned process has exited (needs a pidfd to know)."""
        if self.pidfd is None:
            return True
        try:
            # A pidfd polls readable once its process has exited.
            # poll, not select: a broker with thousands of connections has
            # pidfds far above select()'s FD_SETSIZE of 1024.
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            ready = poller.poll(0)
        except OSError:
            return False
        return not ready

    def exe(self) -> str | None:
        """The peer's executable, read through /proc while the pidfd pins the pid."""
        if self.pidfd is None or not self.alive():
            return None
        try:
            path = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return None
        # The pid might have been reused between alive() and readlink().
        return path if self.alive() else None

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


def read_peer(sock: socket.socket) -> Peer:
    """Read the peer's identity from an accepted connection.

    Raises:
        StalePeer: the peer already exited (its pidfd could not be taken, or
            polls as exited).
        OSError: getsockopt failed for another reason.
    """
    cred = unix.peer_cred(sock)
    complete = True
    try:
        groups = unix.peer_groups(sock)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        # A kernel without SO_PEERGROUPS: only the primary gid is known, and
        # the policy must not grant through supplementary groups it cannot see.
        groups, complete = (), False
    try:
        pidfd = unix.peer_pidfd(sock)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise StalePeer(f"peer pid {cred.pid} exited before it could be pinned") from None
        raise
    peer = Peer(cred.uid, cred.gid, cred.pid, groups, complete, pidfd)
    if not peer.alive():
        # Whoever holds the socket now is not the process the kernel vouched
        # for at connect(): the socket was passed on, or the pid is free for reuse.
        peer.close()
        raise StalePeer(f"peer pid {cred.pid} exited before its connection was accepted")
    return peer
