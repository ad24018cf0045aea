"""The audit log: one structured record per decision, written off the event loop.

The loop only appends a dict to a bounded deque (an O(1), lock-free step under
the GIL); a writer thread wakes a few times a second, formats the records as
JSON lines and writes them. A full deque drops the record and counts the drop,
so a stalled log disk never stalls the broker and no record is lost silently:
the drop count shows in `privbroker status` and in a record of its own once
the writer catches up.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from typing import IO, Any

# Enough for several seconds of full-speed decisions while the disk stalls.
MAX_QUEUED_RECORDS = 65536
# How often the writer wakes: small enough for `tail -f`, large enough to batch.
FLUSH_INTERVAL = 0.05


class AuditLog:
    """Writes JSON-line records to a file or stream; `None` target disables it."""

    def __init__(self, target: str | None, maxlen: int = MAX_QUEUED_RECORDS) -> None:
        self.dropped = 0
        self.written = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._maxlen = maxlen
        self._stop = threading.Event()
        self._stream: IO[str] | None
        self._owned = False
        if target is None:
            self._stream = None
        elif target == "-":
            self._stream = sys.stderr
        else:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._stream = os.fdopen(fd, "a", buffering=1 << 16)
            self._owned = True
        self._thread: threading.Thread | None = None
        if self._stream is not None:
            self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def record(self, fields: dict[str, Any]) -> None:
        """Queue one record; never blocks. `time` is added here."""
        if self._stream is None:
            return
        if len(self._queue) >= self._maxlen:
            self.dropped += 1
            return
        fields["time"] = time.time()
        self._queue.append(fields)

    def _drain(self) -> None:
        assert self._stream is not None
        lines = []
        while self._queue:
            lines.append(json.dumps(self._queue.popleft(), separators=(",", ":")))
        if self.dropped != getattr(self, "_reported_drops", 0):
            self._reported_drops = self.dropped
            lines.append(
                json.dumps(
                    {"time": time.time(), "event": "audit-dropped", "dropped_total": self.dropped}
                )
            )
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
                self.written += len(lines)
            except (OSError, ValueError):
                self.dropped += len(lines)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self._drain()
        self._drain()

    def close(self) -> None:
        """Flush what is queued and stop the writer."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None
