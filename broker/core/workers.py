"""A small pool of daemon threads for the opens that may block.

The event loop never waits on a worker. It submits a job with a callback; the
callback runs on the worker thread and only queues the outcome and wakes the
loop, which takes it from there. Workers are daemon threads: one stuck for
good in a hung NFS open must not keep the broker from exiting.

Fairness. What one uid may have at the workers at once is a quarter of the
pool (`per_uid`, enforced by the dispatcher through `busy`). And a thread
that has been in one open for longer than STALLED_AFTER no longer counts
against the pool: a queued job gets a new thread instead, up to `4 * count`
threads in all. So uids stalled on a hung filesystem block their own
requests (which time out), never the pool for everyone else.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

# An open that takes this long is not a quick device open but a stall.
STALLED_AFTER = 0.5


class Job:
    __slots__ = ("done", "fn", "started")

    def __init__(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self.fn, self.done = fn, done
        self.started = 0.0


class Workers:
    def __init__(self, count: int) -> None:
        self.count = count
        self.per_uid = max(1, count // 4)
        self.hard_cap = 4 * count
        self.busy: Counter[int] = Counter()  # jobs per uid, running or queued
        # Idle threads minus queued jobs: below 0, jobs wait for a thread.
        self._idle = 0
        self._running: set[Job] = set()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, uid: int, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run fn() on a worker, then done(result or exception) on that worker.

        The caller must call `finished(uid)` when it takes the outcome in.
        """
        self.busy[uid] += 1
        with self._lock:
            self._idle -= 1  # an idle thread (now, new or later) will take it
        self._jobs.put(Job(fn, done))
        self.rebalance()

    def rebalance(self) -> None:
        """Start a thread for queued work if the working (not stalled) ones are few."""
        with self._lock:
            if self._idle >= 0 or len(self._threads) >= self.hard_cap:
                return
            now = time.monotonic()
            stalled = sum(1 for j in self._running if now - j.started > STALLED_AFTER)
            if len(self._threads) - stalled >= self.count:
                return
            self._idle += 1  # the new thread takes a queued job at once
            t = threading.Thread(target=self._run, name=f"open-{len(self._threads)}", daemon=True)
            self._threads.append(t)
        t.start()

    @property
    def waiting(self) -> bool:
        """Jobs are queued for a thread (the loop then calls rebalance() often)."""
        return self._idle < 0

    def finished(self, uid: int) -> None:
        self.busy[uid] -= 1
        if self.busy[uid] <= 0:
            del self.busy[uid]

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.started = time.monotonic()
            with self._lock:
                self._running.add(job)
            try:
                outcome: Any = job.fn()
            except BaseException as exc:  # handed to the loop, which decides
                outcome = exc
            with self._lock:
                self._running.discard(job)
                self._idle += 1
            job.done(outcome)

    def stop(self) -> None:
        """Let idle workers end; busy ones are daemons and die with the process."""
        for _ in self._threads:
            self._jobs.put(None)
