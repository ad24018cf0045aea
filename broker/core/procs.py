"""Several broker processes on one listening socket (`serve --processes N`).

One Python process runs on one core at a time; a machine with more cores
can serve more opens per second with more processes. With N, the first
process (the one systemd started) loads the policy, builds its broker and
binds (or receives) the listening socket, then forks N-1 others. Each of
them builds a broker of its own (loop, opener, workers, audit writer, fast
tables) around the policy the first one loaded, on the shared listener: it
registers it with EPOLLEXCLUSIVE, so a connection wakes one process, and
each serves the connections it accepted, for their lifetime. Each watches
the policy files and reloads on its own (an invalid edit is refused by
each, and each keeps what it had).

Limits apply to each process: a uid may hold --max-connections-per-uid
connections in each (the kernel gives a new connection to whichever process
waits first, so a shared count would refuse a uid while others sit idle).
The fds in flight are the exception: the kernel counts them for root as a
whole, so each process takes 1/N of the budget (core/budget.py), and serve
refuses N when RLIMIT_NOFILE cannot give each a useful share (MIN_BUDGET).
The counters each process keeps, and a heartbeat, are published in a
shared page every loop tick: `status`, answered by whichever process holds
the connection, shows the sums (its own counters live, the others' as of
their last tick), and the first process pings systemd's watchdog only
while every process's loop is ticking.

The first process alone talks to systemd. It passes SIGHUP on to the
others (SIGTERM too, when it stops); if one of them stops, it stops them
all, and exits 1 if that one failed, for the service manager to restart
the unit. The others die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from typing import Protocol

from privbroker.protocol import MAX_BATCH

log = logging.getLogger("privbroker")

PR_SET_PDEATHSIG = 1
MAX_PROCESSES = 64
# Each process's share of the fds-in-flight budget must hold a few full
# batches, or one uid takes a process's whole share.
MIN_BUDGET = 4 * MAX_BATCH
# Blocked across fork, until the child has its handlers: SIGUSR1 (reopen the
# audit file) would otherwise kill a child that has none yet.
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}
_STOP_GRACE = 5.0  # seconds the others get to stop cleanly, then SIGKILL


class Shared:
    """Every process's counters in one shared anonymous page (made before fork)."""

    def __init__(self, processes: int, names: tuple[str, ...]) -> None:
        self.processes = processes
        self.names = names
        self.index = 0  # which slot is this process's: set in each child
        # Each process's counters, then each one's last tick (monotonic ms).
        self._map = mmap.mmap(-1, 8 * processes * (len(names) + 1))
        # Aligned 8-byte loads and stores are atomic where the broker runs.
        self._slots = memoryview(self._map).cast("q")
        self._ticks = processes * len(names)

    def publish(self, values: dict[str, int]) -> None:
        base = self.index * len(self.names)
        for i, name in enumerate(self.names):
            self._slots[base + i] = int(values.get(name, 0))
        self._slots[self._ticks + self.index] = int(time.monotonic() * 1000)

    def all_ticking(self, within: float) -> bool:
        """Whether every process published in the last `within` seconds."""
        oldest = int((time.monotonic() - within) * 1000)
        return all(self._slots[self._ticks + p] >= oldest for p in range(self.processes))

    def totals(self) -> dict[str, int]:
        n = len(self.names)
        return {
            name: sum(self._slots[p * n + i] for p in range(self.processes))
            for i, name in enumerate(self.names)
        }


def _become_child(parent: int) -> None:
    from ..libc import libc

    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
        raise SystemExit("the first broker process is gone")
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)  # only the first process talks to systemd
    # The first process's handlers are for its broker: until this one's
    # broker installs its own, a SIGTERM simply ends it (Supervisor.start held
    # the signals blocked until here, so none was lost or misdelivered).
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Controlled(Protocol):
    """What the supervisor does to its own process's broker (core/server.py)."""

    def request_reload(self) -> None: ...

    def stop(self) -> None: ...


class Supervisor:
    """In the first process: start the others, watch them, pass signals on."""

    def __init__(self, broker: Controlled) -> None:
        self.pids: set[int] = set()
        self.failed = False
        self._broker = broker

    def start(self, count: int, shared: Shared, child: Callable[[], int]) -> None:
        """Install the handlers, then fork `count` processes running child()
        (each exits with what it returns). A SIGHUP reloads them all; one
        that stops, even before it is fully up, stops the broker."""
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, self._on_child)
        parent = os.getpid()
        for index in range(1, count + 1):
            # Blocked across fork: the child must not run this process's
            # handlers, and this one must know the pid before its SIGCHLD.
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                pid = os.fork()
            except BaseException:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                raise
            if pid == 0:  # pragma: no cover - runs in the child, which reports by exit code
                code = 1
                try:
                    shared.index = index
                    _become_child(parent)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                    code = child()
                except BaseException:
                    log.exception("broker process %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(code)
            self.pids.add(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _on_hup(self, *_: object) -> None:
        self._broker.request_reload()
        self._signal(signal.SIGHUP)

    def _on_child(self, *_: object) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.pids.discard(pid)
                    code = os.waitstatus_to_exitcode(status)
                    if code in (0, -signal.SIGTERM):  # told to stop (systemd stops all)
                        log.info("broker process %d stopped; stopping them all", pid)
                    else:
                        log.error(
                            "broker process %d exited (%s); stopping them all", pid, _how(status)
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
