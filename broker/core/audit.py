"""The audit log: one structured record per decision, written off the event loop.

The loop only appends a dict to a bounded deque (an O(1), lock-free step under
the GIL); a writer thread wakes a few times a second and writes the records
out. A full deque drops the record and counts the drop, so a stalled log disk
never stalls the broker and no record is lost silently: the drop count shows
in `privbroker status` and in a record of its own once the writer catches up.

Targets: a file (JSON lines, appended), "-" for stderr (JSON lines), or
"journal" for journald's native protocol (one datagram per record, every field
as PRIVBROKER_*, a readable MESSAGE, PRIORITY 6 for allow and 5 for the rest)
so `journalctl -u privbroker PRIVBROKER_DECISION=deny` works. "-" under
systemd, where stderr is the journal, means "journal". "journal:PATH" names
another journal socket.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from typing import IO, Any

from . import systemd

# Enough for several seconds of full-speed decisions while the disk stalls.
MAX_QUEUED_RECORDS = 65536
# How often the writer wakes: small enough for `tail -f`, large enough to batch.
FLUSH_INTERVAL = 0.05


class _JsonLines:
    def __init__(self, stream: IO[str], owned: bool) -> None:
        self.stream, self.owned = stream, owned

    def write(self, records: list[dict[str, Any]]) -> int:
        """Write the records; return how many were lost."""
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            return len(records)
        return 0

    def close(self) -> None:
        if self.owned:
            self.stream.close()


class _Journal:
    def __init__(self, path: str) -> None:
        self.journal = systemd.Journal(path)

    def write(self, records: list[dict[str, Any]]) -> int:
        lost = 0
        for r in records:
            fields: dict[str, object] = {
                "MESSAGE": _message(r),
                "PRIORITY": 6 if r.get("decision") == "allow" else 5,
                "SYSLOG_IDENTIFIER": "privbroker",
            }
            for key, value in r.items():
                if value is not None:
                    fields[f"PRIVBROKER_{key.upper()}"] = (
                        " ".join(map(str, value)) if isinstance(value, list) else value
                    )
            if not self.journal.send(fields):
                lost += 1
        return lost

    def close(self) -> None:
        self.journal.close()


def _message(r: dict[str, Any]) -> str:
    if "decision" not in r:
        return f"privbroker audit: {r.get('event')}"
    rule = f" by rule {r['rule']!r}" if r.get("rule") else ""
    why = f": {r['reason']}" if r.get("reason") and r["decision"] != "allow" else ""
    if r.get("request") == "socket":
        what = f"socket {r['target']}"
    else:
        what = f"{','.join(r['access'])} {r['path']}"
    return f"{r['decision']} uid {r['uid']} pid {r['pid']} {what}{rule}{why}"


def _sink(target: str) -> _JsonLines | _Journal:
    if target == "-":
        if systemd.under_journald():
            return _Journal(systemd.JOURNAL_SOCKET)
        return _JsonLines(sys.stderr, owned=False)
    if target == "journal" or target.startswith("journal:"):
        return _Journal(target.partition(":")[2] or systemd.JOURNAL_SOCKET)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return _JsonLines(os.fdopen(fd, "a", buffering=1 << 16), owned=True)


class AuditLog:
    """Writes audit records to `target`; a `None` target disables it.

    Raises:
        OSError: the target file or journal socket cannot be opened.
    """

    def __init__(self, target: str | None, maxlen: int = MAX_QUEUED_RECORDS) -> None:
        self.dropped = 0
        self.written = 0
        self._reported_drops = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._maxlen = maxlen
        self._stop = threading.Event()
        self._sink = None if target is None else _sink(target)
        self._thread: threading.Thread | None = None
        if self._sink is not None:
            self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def record(self, fields: dict[str, Any]) -> None:
        """Queue one record; never blocks. `time` is added here."""
        if self._sink is None:
            return
        if len(self._queue) >= self._maxlen:
            self.dropped += 1
            return
        fields["time"] = time.time()
        self._queue.append(fields)

    def _drain(self) -> None:
        assert self._sink is not None
        records = []
        while self._queue:
            records.append(self._queue.popleft())
        if self.dropped != self._reported_drops:
            self._reported_drops = self.dropped
            records.append(
                {"time": time.time(), "event": "audit-dropped", "dropped_total": self.dropped}
            )
        if records:
            lost = self._sink.write(records)
            self.dropped += lost
            self.written += len(records) - lost

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
        if self._sink is not None:
            self._sink.close()
        self._sink = None
