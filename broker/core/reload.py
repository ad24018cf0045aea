"""Hot reload: notice policy edits, load the new policy off the loop, hand it over.

Noticing. An inotify watch on every directory that holds a policy file or an
include glob's matches: editors that write in place (IN_CLOSE_WRITE) and
editors that write a new file and rename it over the old one (IN_MOVED_TO)
both show there, and so does a drop-in file added or removed. Events only say
"maybe": after a short quiet period the files' signature (inode, mtime, size,
mode and owner of each file; the *.toml names in each include directory) is
compared with the one the serving policy was loaded from, and only a real
change reloads. Where inotify cannot be had, the same signature is polled
every few seconds.

Loading. `load_policy` runs on a thread of its own (a 10,000-rule file takes a
while to compile) and the result is taken in by the loop between two
requests. A policy that fails to load is never swapped in (invariant 7).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..libc import libc
from ..net.caps import missing as caps_missing
from ..policy.decide import Policy, PolicyError, Problem, load_policy
from . import systemd
from .status import Running, status_line

log = logging.getLogger("privbroker")

# Quiet time after the last event before the files are looked at: an editor's
# write, fsync and rename arrive as a burst.
SETTLE_SECONDS = 0.2
POLL_SECONDS = 2.0

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
# modify, attrib, close_write, moved_from, moved_to, create, delete, delete_self, move_self
_EVENT = struct.Struct("iIII")

Signature = tuple[object, ...]


def signature(files: tuple[Path, ...], dirs: tuple[Path, ...]) -> Signature:
    """What a policy was read from, as it is on disk now."""
    parts: list[object] = []
    for path in files:
        try:
            st = os.stat(path)
            # Mode and owner too: a chmod can make a policy untrusted, or trusted again.
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid))
        except OSError:
            parts.append(None)
    for d in dirs:
        try:
            parts.append(tuple(sorted(n for n in os.listdir(d) if n.endswith(".toml"))))
        except OSError:
            parts.append(None)
    return tuple(parts)


class Reloader:
    """Owned by the loop; `fileno()` is the inotify fd to poll (or -1)."""

    def __init__(self, path: str, policy: Policy, wake: Callable[[], None]) -> None:
        self.path = Path(path)
        self._wake = wake
        self._loading = False
        self._again = False
        self._result: Policy | Exception | None = None
        self._tried: Signature | None = None
        self._remember(policy)
        self._due: float | None = None  # when to look at the files again
        self._watches: dict[int, Path] = {}
        self._libc = libc
        self._fd: int = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            log.warning(
                "inotify unavailable (%s): polling the policy files every %g s",
                os.strerror(ctypes.get_errno()),
                POLL_SECONDS,
            )
        self.watch(policy)

    def fileno(self) -> int:
        return self._fd

    @property
    def polling(self) -> bool:
        return self._fd < 0

    @property
    def settling(self) -> bool:
        """An inotify event came in and the files will be looked at shortly."""
        return self._due is not None and not self.polling

    def watch(self, policy: Policy) -> None:
        """Watch the directories `policy` was read from (and only those)."""
        if self._fd < 0:
            return
        wanted = {p.parent for p in (self.path, *policy.files)} | set(policy.dirs)
        for wd, d in list(self._watches.items()):
            if d not in wanted:
                self._libc.inotify_rm_watch(self._fd, wd)
                del self._watches[wd]
        for d in wanted - set(self._watches.values()):
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(d), _MASK)
            if wd >= 0:
                self._watches[wd] = d

    def on_readable(self, now: float) -> None:
        """Drain inotify; look at the files once things have settled."""
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._due = now + SETTLE_SECONDS

    def tick(self, now: float) -> bool:
        """Called every loop turn; True when the files changed (start a reload)."""
        if self.polling and (self._due is None):
            self._due = now + POLL_SECONDS
        if self._due is None or now < self._due:
            return False
        self._due = None
        if self._loading:
            return False
        # Compared with the last policy that loaded (so putting a refused edit
        # right is noticed too), and with the last attempt (so a broken file
        # is tried once, not at every poll).
        now_sig = signature(self._files, self._dirs)
        if now_sig == self._signature and self._tried is not None:
            # Back to what last loaded after a refused edit (a backup moved
            # back, a checkout): load it again, so the refusal is cleared.
            self._tried = None
            return True
        if now_sig in (self._signature, self._tried):
            return False
        self._tried = now_sig
        return True

    def _remember(self, policy: Policy) -> None:
        self._files = (self.path, *policy.files)
        self._dirs = policy.dirs
        self._signature = signature(self._files, self._dirs)
        self._tried = None

    def start(self) -> None:
        """Load the policy on a thread; a request during a load queues one more."""
        if self._loading:
            self._again = True
            return
        self._loading = True
        threading.Thread(target=self._load, name="reload", daemon=True).start()

    def _load(self) -> None:
        try:
            self._result = load_policy(self.path)
        except (PolicyError, OSError) as exc:
            self._result = exc
        except Exception as exc:  # a bug in loading must not take the broker down
            log.exception("policy load crashed")
            self._result = exc
        self._wake()

    def take(self) -> Policy | Exception | None:
        """The finished load's outcome, once (on the loop's thread)."""
        if not self._loading or self._result is None:
            return None
        result, self._result = self._result, None
        self._loading = False
        if isinstance(result, Policy):
            self._remember(result)
            self.watch(result)
        if self._again:
            self._again = False
            self.start()
        return result

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def freeze_heap() -> None:
    """Move the (large, immutable) policy out of the garbage collector's sight.

    Every full collection would otherwise walk all of a big policy's objects,
    adding milliseconds to whichever request triggers it. Unfreeze first, so
    the policy just replaced can be collected, then freeze what is alive.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Reloading(Running, Protocol):
    """What applying a reload touches of the running broker (core/server.py)."""

    reloader: Reloader
    caps_held: frozenset[int] | None


def start_reload(reloader: Reloader) -> None:
    """Tell systemd, then load the policy on the reloader's thread."""
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")
    reloader.start()


def take_reload(b: Reloading) -> None:
    """Swap in a policy that finished loading; keep the old one if it failed or
    needs a capability the broker dropped (docs/security.md, invariants 7, 13).
    Runs on the loop's thread, between two requests: each is judged by one policy."""
    outcome = b.reloader.take()
    if outcome is None:
        return
    if isinstance(outcome, Policy) and (why := caps_missing(outcome, b.caps_held)):
        outcome = PolicyError([Problem(str(outcome.path), 0, None, why)])
    if isinstance(outcome, Policy):
        b.stats["reloads"] += 1  # reloads that took; refusals are reload_failures
        b.dispatch.policy = outcome
        freeze_heap()
        b.policy_loaded = time.time()
        b.last_reload_error = ""
        log.info("policy reloaded from %s: %d rules", b.policy_path, outcome.rule_count)
        for warning in outcome.warnings:
            log.warning("%s", warning)
    else:
        b.stats["reload_failures"] += 1
        text = getattr(outcome, "strerror", None) or str(outcome)
        b.last_reload_error = text
        log.error("policy reload refused, the old policy keeps serving:\n%s", text)
    systemd.notify("READY=1", f"STATUS={status_line(b)}")
