"""The native fast path: a request the broker has answered before, served in C.

Most of a broker's traffic is the same few clients opening the same few files
again and again. The first open of a (path, access) by a client goes through
the whole Python broker (decode, decide on the named path, openat2, decide on
the real path and type, reopen, encode, send); when that open was of the
plainest kind (fast_answer, below), the dispatcher records the answer in the
client's fast table for the current policy. From then on, broker/files/_fast.c
receives that client's datagrams itself and, when a request is wholly made of
recorded answers, opens and checks each file on its own and sends the reply,
never entering the interpreter per item. Whatever is not that (another
operation, a new path, a symlink or a hard link appearing, a file moved or
replaced, a cold dentry cache, a mount change, credentials that disagree, a
malformed message) comes back here exactly as received, with nothing opened,
and the Python broker serves it as if the fast path did not exist: every
rule of the security model is still decided in Python, and _fast.c only
checks, on the opened fd, that the conditions of a recorded answer hold.

A SOCKET request the broker allowed and made before is answered the same
way, by broker/net/_fastsock.c (net/fastsock.py says which ones qualify).

The module is optional: without it (not built, or `serve --no-fast-path`),
the broker serves everything in Python.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from privbroker import protocol as proto
from privbroker import unix
from privbroker.protocol import Access, OpenItem

from ..libc import IdsLost
from ..policy.decision import Decision, FileType
from .openflags import effective_access, open_flags

if TYPE_CHECKING:
    from collections import Counter

    from ..core.budget import FdBudget
    from ..core.connection import Connection
    from ..net import fastsock
    from ..policy.decision import Subject
    from .openat2 import MountTable

# One client's recorded answers under one policy, kept by core/dispatch.py:
# opens, (path, access) -> (open flags, hard links, the packed result, the
# rule); and sockets, net/fastsock.py's key -> its entry. The keys' lengths
# differ, so the two never meet.
OpenKey = tuple[str, int]
OpenAnswer = tuple[int, bool, bytes, str | None]
FastTable = dict["OpenKey | fastsock.Key", "OpenAnswer | fastsock.Entry"]

log = logging.getLogger("privbroker")


def fast_answer(
    item: OpenItem, real: str, ftype: FileType, effective: Access, d1: Decision
) -> tuple[int, bool] | None:
    """What the fast path may reuse of this open's judgement, or None.

    Only the plainest case: an existing regular file, reached at the named
    path itself (no symlink, no rename meanwhile), asked for read, write or
    append (no create, no truncate: those have effects), and allowed with
    all the access the fd gives whatever the file's attributes (an
    append-only exemption holds only while the file stays append-only).
    Then both of the policy's answers, for the path as named and for the
    file found there, are pure functions of (policy, client, path, access).
    """
    if (
        ftype is not FileType.FILE
        or real != item.path
        or item.exclusive
        or item.access & (Access.CREATE | Access.TRUNCATE)
        or effective != effective_access(item.access, ftype, None)
    ):
        return None
    return open_flags(item.access), d1.hardlinks


def _import_native() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__package__}._fast")
    except ImportError:  # pragma: no cover - only on an install that did not build it
        return None


_native = _import_native()


def available() -> bool:
    """Whether privbroker.broker.files._fast was built and imports."""
    return _native is not None


def configure() -> ModuleType:
    """privbroker.broker.files._fast, told the protocol's constants (client/protocol/)."""
    if _native is None:
        raise RuntimeError("privbroker.broker.files._fast is not built")
    _native.configure(
        proto.VERSION,
        int(proto.Op.OPEN),
        int(proto.Op.SOCKET),
        proto.MAX_ID,
        int(proto.ALL_ACCESS),
        proto.MAX_BATCH,
        proto.MAX_REQUEST_BYTES,
        proto.MAX_REPLY_BYTES,
        proto.MAX_TARGET_CHARS,
        proto.MAX_BACKLOG,
    )
    return _native


class Loop(Protocol):
    """What the fast path is given by the loop that receives through it
    (core/server.py): told once, at start, instead of reaching into it."""

    stats: Counter[str]

    def send(self, conn: Connection, data: bytes, fds: list[int], reserved: int) -> None:
        """Queue a reply the fast path could not send at once."""

    def fast_table(self, subject: Subject) -> FastTable: ...

    def audit_fast(
        self, conn: Connection, items: list[tuple[tuple[str, int], str | None]], took: float
    ) -> None: ...

    def audit_fast_socket(self, conn: Connection, info: fastsock.Fast, took: float) -> None: ...


def start(loop: Loop, mounts: MountTable, budget: FdBudget, audit: bool) -> FastPath | None:
    """The broker's fast path, or None (logged) where _fast was not built."""
    if _native is None:
        log.warning("privbroker.broker.files._fast is not built: every request is served in Python")
        return None
    return FastPath(loop, mounts, budget, audit)


class FastPath:
    """Receives for the broker's loop, answering what it can in C."""

    def __init__(self, loop: Loop, mounts: MountTable, budget: FdBudget, audit: bool) -> None:
        self._serve = configure().serve
        self._loop = loop
        self._mounts = mounts
        self._mountinfo = self._mounts.fileno()  # open as long as the table
        self._budget = budget
        self._stats = loop.stats
        self._fast_table = loop.fast_table
        self._audit = audit  # fixed once the log is open

    def receive(self, conn: Connection) -> tuple[bytes, unix.Ucred | None] | None:
        """One datagram from `conn`: None if it was answered here, else
        (data, credentials) for the Python broker, as unix.recv_message gives.

        Raises:
            BlockingIOError: nothing to read.
            unix.TruncatedMessage, OSError: as unix.recv_message.
        """
        # Runs for every request: what does not change is looked up once.
        peer, budget, audit = conn.peer, self._budget, self._audit
        start = time.perf_counter() if audit else 0.0
        room, room_if_read = budget.room(conn)
        try:
            got = self._serve(
                conn.fd,
                peer.uid,
                peer.gid,
                self._fast_table(conn.subject),
                self._mounts.fast_ids,
                self._mountinfo,
                room,
                room_if_read,
                audit,
            )
        except RuntimeError as exc:  # _fastsock.c: the fs ids could not be set back
            raise IdsLost(str(exc)) from exc
        if got is None:
            raise BlockingIOError
        if not got[0]:
            if got[4]:  # the mount table changed (and _fast's poll took the news)
                self._mounts.reload()
            data, _fds, cred = unix.parse_received(
                got[1], got[2], got[3], proto.MAX_REQUEST_BYTES, 0, creds=True
            )
            return data, cred
        kind, count, reply, fds, items, drained = got
        conn.last_active = time.monotonic()
        if drained:
            budget.drained(conn)
        budget.charge(conn, count)
        stats = self._stats
        stats["requests"] += 1
        stats["allowed"] += count
        stats["fast_opens" if kind == 1 else "fast_sockets"] += count
        if audit:
            if kind == 1:
                self._loop.audit_fast(conn, items, time.perf_counter() - start)
            else:
                self._loop.audit_fast_socket(conn, items, time.perf_counter() - start)
        if reply is not None:  # the client's queue is full: send it when there is room
            self._loop.send(conn, reply, fds, count)
        return None
