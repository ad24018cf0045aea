"""Several broker processes on one listening socket (`serve --processes N`).

One Python process runs on one core at a time; a machine with more cores
can serve more opens per second with more processes. With N, the first
process (the one systemd started) binds or receives the listening socket,
then forks N-1 others before it builds anything of its own, and every
process then builds its own broker (loop, policy, opener, workers, audit
writer, fast tables) on the shared listener. Each registers the listener
with EPOLLEXCLUSIVE, so a connection wakes one of them, and each serves the
connections it accepted, wholly, for their lifetime. Each watches the policy
files and reloads on its own (an invalid edit is refused by each).

What bounds one process's resources is split between them: each allows
1/N of --max-connections, --max-connections-per-uid and --workers (at least
one), and 1/N of the fds in flight (inflight.py: the kernel counts those
for root as a whole). The counters each process keeps are published in a
shared page every loop tick, so `status`, answered by whichever process
holds the connection, shows the sums (its own counters live, the others'
as of their last tick).

The first process alone talks to systemd. It passes SIGHUP on to the
others (SIGTERM too, when it stops), and if one of them dies, it stops them
all and exits 1, for the service manager to restart the unit. The others
die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from .connection import Limits

log = logging.getLogger("privbroker")

PR_SET_PDEATHSIG = 1
MAX_PROCESSES = 64
_STOP_GRACE = 5.0  # seconds the others get to stop cleanly, then SIGKILL


def split(limits: Limits, n: int) -> Limits:
    """Each of n processes' share of the limits."""
    return dataclasses.replace(
        limits,
        max_connections=max(1, limits.max_connections // n),
        max_connections_per_uid=max(1, limits.max_connections_per_uid // n),
        workers=max(1, limits.workers // n),
    )


class Shared:
    """Every process's counters in one shared anonymous page (made before fork)."""

    def __init__(self, processes: int, names: tuple[str, ...]) -> None:
        self.processes = processes
        self.names = names
        self.index = 0  # which slot is this process's: set in each child
        self._map = mmap.mmap(-1, 8 * processes * len(names))
        # Aligned 8-byte loads and stores are atomic where the broker runs.
        self._slots = memoryview(self._map).cast("q")

    def publish(self, values: dict[str, int]) -> None:
        base = self.index * len(self.names)
        for i, name in enumerate(self.names):
            self._slots[base + i] = int(values.get(name, 0))

    def totals(self) -> dict[str, int]:
        n = len(self.names)
        return {
            name: sum(self._slots[p * n + i] for p in range(self.processes))
            for i, name in enumerate(self.names)
        }


def spawn(count: int, shared: Shared, child: Callable[[], int]) -> list[int]:
    """Fork `count` processes that run child() and exit with what it returns."""
    parent = os.getpid()
    pids = []
    for index in range(1, count + 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which reports by exit code
            code = 1
            try:
                shared.index = index
                _become_child(parent)
                code = child()
            except BaseException:
                log.exception("broker process %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    return pids


def _become_child(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
        raise SystemExit("the first broker process is gone")
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)  # only the first process talks to systemd
    # The first process's handlers are for its broker: until this one's
    # broker installs its own, a SIGTERM simply ends it.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Supervisor:
    """In the first process: watch the others, pass signals on, stop them."""

    def __init__(self, pids: list[int], broker: Any) -> None:
        self.pids = set(pids)
        self.failed = False
        self._broker = broker

    def install(self) -> None:
        """After the broker's own handlers: SIGHUP also reloads the others;
        a process that exits while the broker runs stops the broker."""
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, self._on_child)

    def _on_hup(self, *_: object) -> None:
        self._broker.request_reload()
        self._signal(signal.SIGHUP)

    def _on_child(self, *_: object) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.pids.discard(pid)
                    log.error(
                        "broker process %d exited (%s); stopping them all",
                        pid,
                        _how(status),
                    )
                    self.failed = True
                    self._broker.stop()

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        """SIGTERM to the others; wait for them, then SIGKILL what is left."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        while self.pids and time.monotonic() < deadline:
            for pid in list(self.pids):
                with contextlib.suppress(ChildProcessError):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if not done:
                        continue
                    # -SIGTERM: stopped before its broker was up to catch it.
                    if os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM):
                        log.error("broker process %d stopped: %s", pid, _how(status))
                        self.failed = True
                self.pids.discard(pid)
            time.sleep(0.02)
        for pid in self.pids:
            log.error("broker process %d did not stop; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.failed = True


def _how(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit code {code}"
