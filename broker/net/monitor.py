"""Watch devices come and go: an rtnetlink socket in the link multicast group.

The broker learns that a leased device went away for a reason of its own
(root ran `ip link del`, the module was unloaded, the namespace died) from
RTM_DELLINK notifications, so that the lease forgets it and never deletes a
later device that reuses its index. Multicast is lossy: when the socket's
buffer overflows the kernel drops notifications and the next read fails with
ENOBUFS. The monitor then dumps every link and compares with the links it
knew, reporting each index that vanished as deleted (and each new or renamed
one as present), so a missed RTM_DELLINK is never missed for long. The socket
is an `rtnl.Rtnl` (the one module that opens netlink sockets), so the monitor
is as non-blocking as the rest of the loop: `fileno` and `on_readable`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from . import messages
from .fields import Dump
from .messages import Kind
from .replies import Link, Record, Reply
from .rtnl import RCVBUF, RTMGRP_LINK, Rtnl


@dataclass(frozen=True)
class LinkEvent:
    """A device appeared or changed (deleted=False), or is gone (deleted=True)."""

    ifindex: int
    name: str
    deleted: bool


class LinkMonitor:
    """Report link events to `callback`; start with a dump of the links there are.

    The first dump only learns the current links (no events); every later one,
    made after an overrun, reports the difference.
    """

    def __init__(self, callback: Callable[[LinkEvent], None], *, rcvbuf: int = RCVBUF) -> None:
        self._callback = callback
        self._rtnl = Rtnl(
            groups=RTMGRP_LINK, on_notify=self._notified, on_overrun=self._overrun, rcvbuf=rcvbuf
        )
        self._known: dict[int, str] = {}
        self._synced = False
        self._dumping = False
        self._again = False  # an overrun during a dump: that dump may predate the loss
        self.resyncs = 0  # dumps made after an overrun, for status and tests
        self._resync()

    def fileno(self) -> int:
        return self._rtnl.fileno()

    def on_readable(self) -> None:
        self._rtnl.on_readable()

    @property
    def known(self) -> dict[int, str]:
        """ifindex -> name of every link the monitor believes exists."""
        return dict(self._known)

    def close(self) -> None:
        self._rtnl.close()

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _resync(self) -> None:
        self._dumping = True
        self._rtnl.submit(Kind.DUMP_LINKS, Dump(), self._dumped)

    def _overrun(self) -> None:
        if self._dumping:
            self._again = True
        else:
            self.resyncs += 1
            self._resync()

    def _notified(self, reply: Reply) -> None:
        link = reply.record
        if not isinstance(link, Link):  # only the link group is joined; be sure anyway
            return
        deleted = reply.type == messages.RTM_DELLINK
        if deleted:
            self._known.pop(link.ifindex, None)
        else:
            self._known[link.ifindex] = link.name
        self._callback(LinkEvent(link.ifindex, link.name, deleted))

    def _dumped(self, code: int, text: str | None, records: list[Record]) -> None:
        self._dumping = False
        if code not in (0, errno.EINTR):
            raise OSError(code, text or os.strerror(code))
        if code or self._again:  # interrupted, or overtaken by another overrun: dump again
            self._again = False
            self.resyncs += 1
            self._resync()
            return
        present = {r.ifindex: r.name for r in records if isinstance(r, Link)}
        before, self._known = self._known, present
        if not self._synced:
            self._synced = True
            return
        for ifindex, name in before.items():
            if ifindex not in present:
                self._callback(LinkEvent(ifindex, name, deleted=True))
        for ifindex, name in present.items():
            if before.get(ifindex) != name:
                self._callback(LinkEvent(ifindex, name, deleted=False))
