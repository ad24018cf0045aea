"""A small pool of daemon threads for the opens that may block.

The event loop never waits on a worker. It submits a job with a callback; the
callback runs on the worker thread and only queues the outcome and wakes the
loop, which takes it from there. Workers are daemon threads: one stuck for
good in a hung NFS open must not keep the broker from exiting. The pool is
bounded, and so is what any one uid may have in it at once (`Workers.busy`),
so a client with a FUSE mount that never answers can stall only its own
requests (they time out), not everyone's.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


class Workers:
    def __init__(self, count: int) -> None:
        self.count = count
        self.per_uid = max(1, count // 4)
        self.busy: Counter[int] = Counter()  # jobs per uid, running or queued
        self._idle = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, uid: int, job: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run job() on a worker, then done(result or exception) on that worker.

        The caller must call `finished(uid)` when it takes the outcome in.
        """
        with self._lock:
            spawn = self._idle == 0 and len(self._threads) < self.count
            if not spawn:
                self._idle -= 1  # an idle thread will take this job
        if spawn:
            t = threading.Thread(target=self._run, name=f"open-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self.busy[uid] += 1
        self._jobs.put((job, done))

    def finished(self, uid: int) -> None:
        self.busy[uid] -= 1
        if self.busy[uid] <= 0:
            del self.busy[uid]

    def _run(self) -> None:
        while (work := self._jobs.get()) is not None:
            job, done = work
            try:
                outcome: Any = job()
            except BaseException as exc:  # handed to the loop, which decides
                outcome = exc
            done(outcome)
            with self._lock:
                self._idle += 1

    def stop(self) -> None:
        """Let idle workers end; busy ones are daemons and die with the process."""
        for _ in self._threads:
            self._jobs.put(None)
