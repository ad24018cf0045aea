"""The audit log: one structured record per decision, written off the event loop.

The loop only appends a dict to a deque (an O(1), lock-free step under the
GIL); a writer thread wakes a few times a second and writes the records out.
Every decision is accounted for, and memory stays bounded:
- Allows are never dropped. Under ALLOWS_PER_SECOND per uid each has a record
  of its own; past it, identical allows (same uid, pid, path or target,
  access, rule) share one record with a count, first and last
  (ratelimit.Summaries.coalesce), and distinct ones still get their own.
- Denials and failures: under DENIALS_PER_SECOND per uid (and
  ALL_DENIALS_PER_SECOND for all uids together) each has a record of its own;
  past it, they are counted in one aggregate record per uid every few seconds
  (count, first, last, errnos, a sample of paths and pids).
- When the queue holds MAX_QUEUED_RECORDS (the writer is behind: a slow disk,
  a busy journald), everything that can be summarized is, whatever the rate.
  An allow that cannot be coalesced is queued anyway, up to
  MAX_QUEUED_ALLOWS; there the loop waits for the writer (back-pressure: the
  broker serves at the speed its log is written, and grants nothing it has
  not recorded, like auditd's disk_full_action=suspend).
- What the OS refuses to write (a full disk, journald gone) is counted as
  `dropped` and reported in a record of its own once a write succeeds.

Targets: a file (JSON lines, appended), "-" for stderr (JSON lines), or
"journal" for journald's native protocol (one datagram per record, every field
as PRIVBROKER_*, a readable MESSAGE, PRIORITY 6 for allow and 5 for the rest)
so `journalctl -u privbroker PRIVBROKER_DECISION=deny` works. "-" under
systemd, where stderr is the journal, means "journal". "journal:PATH" names
another journal socket. A file is opened again on `reopen()` (SIGHUP,
SIGUSR1: logrotate), and with `max_bytes` the writer itself renames it to
FILE.1 once it is that large. The fields are listed in docs/audit.md.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from datetime import datetime
from typing import IO, Any

from ..policy import names
from . import systemd
from .ratelimit import AGGREGATE_INTERVAL, COALESCE_WINDOW, Summaries

# Records queued before anything that can be summarized is (a second or so
# of full-speed decisions while the writer is behind).
MAX_QUEUED_RECORDS = 16384
# Allows queued before the loop waits for the writer: about 40 MB of records.
MAX_QUEUED_ALLOWS = 32768
# Denial records of one uid per second, each written whole: a user's typo or a
# program probing a few files is seen record by record; a flood is aggregated.
DENIALS_PER_SECOND = 50
# Denial records of all uids per second: with the aggregates, well within
# journald's default rate limit (10000 messages per 30 s per service).
ALL_DENIALS_PER_SECOND = 150
# Allow records of one uid per second before identical ones are coalesced.
ALLOWS_PER_SECOND = 200
# How often the writer wakes: small enough for `tail -f`, large enough to batch.
FLUSH_INTERVAL = 0.05
# How long the writer waits for journald to take one record (then counts it lost).
JOURNAL_SEND_TIMEOUT = 5.0


def iso(t: float) -> str:
    """`t` (seconds since the epoch) in ISO 8601, local time with its zone."""
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")


class _JsonLines:
    def __init__(self, path: str | None, max_bytes: int = 0) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.stream: IO[str] = sys.stderr if path is None else self._open(path)

    @staticmethod
    def _open(path: str) -> IO[str]:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", buffering=1 << 16)

    def write(self, records: list[dict[str, Any]]) -> int:
        """Write the records; return how many were lost."""
        lines = [json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records]
        if not self.max_bytes:
            return 0 if self._put(lines) else len(lines)
        # Rotate between lines, so that FILE never holds more than max_bytes
        # (or one line). json.dumps escapes to ASCII: a character is a byte.
        lost, start = 0, 0
        size = self._size()
        for i, line in enumerate(lines):
            if size + len(line) > self.max_bytes and size > 0:
                lost += 0 if self._put(lines[start:i]) else i - start
                self.rotate()
                start, size = i, self._size()
            size += len(line)
        return lost + (0 if self._put(lines[start:]) else len(lines) - start)

    def _put(self, lines: list[str]) -> bool:
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            return False
        return True

    def _size(self) -> int:
        try:
            return os.fstat(self.stream.fileno()).st_size  # other processes append too
        except (OSError, ValueError):
            return 0

    def rotate(self) -> None:
        """FILE becomes FILE.1 (replacing it), and a new FILE is opened. With
        several broker processes, the first to see the size renames; the
        others find the name on another file, and open it."""
        assert self.path is not None
        try:
            ours, named = os.fstat(self.stream.fileno()), os.stat(self.path)
            if (ours.st_dev, ours.st_ino) == (named.st_dev, named.st_ino):
                os.replace(self.path, self.path + ".1")
        except OSError:
            pass  # renamed by someone else: opening the name again is all there is to do
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        try:
            stream = self._open(self.path)
        except OSError:
            return  # keep writing where we were: better than nowhere
        self.close()
        self.stream = stream

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()


class _Journal:
    def __init__(self, path: str) -> None:
        self.journal = systemd.Journal(path)
        # The writer thread may wait for journald (the loop never does): a
        # busy journald then slows the writer rather than losing records.
        self.journal.sock.settimeout(JOURNAL_SEND_TIMEOUT)

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
                    fields[f"PRIVBROKER_{key.upper()}"] = _journal_value(value)
            if not self.journal.send(fields):
                lost += 1
        return lost

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.journal.close()


def _journal_value(value: object) -> object:
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return value


def _message(r: dict[str, Any]) -> str:
    if "decision" not in r:
        return f"privbroker audit: {r.get('event')}"
    if r.get("aggregated"):
        return (
            f"{r['decision']} uid {r['uid']}: {r['count']} decisions aggregated "
            f"from {r['first']} to {r['last']}, e.g. {', '.join(r['sample'])}"
        )
    rule = f" by rule {r['rule']!r}" if r.get("rule") else ""
    why = f": {r['reason']}" if r.get("reason") and r["decision"] != "allow" else ""
    if "path" in r:
        what = f"{','.join(r.get('access') or ())} {r['path']}"
    else:
        what = f"{r.get('request')} {r.get('target')}"
    times = f" ({r['count']} times)" if r.get("coalesced") else ""
    return f"{r['decision']} uid {r['uid']} pid {r['pid']} {what}{rule}{why}{times}"


def _sink(target: str, max_bytes: int) -> _JsonLines | _Journal:
    if target == "-":
        if systemd.under_journald():
            return _Journal(systemd.JOURNAL_SOCKET)
        return _JsonLines(None)
    if target == "journal" or target.startswith("journal:"):
        return _Journal(target.partition(":")[2] or systemd.JOURNAL_SOCKET)
    return _JsonLines(target, max_bytes)


class AuditLog:
    """Writes audit records to `target`; a `None` target disables it.

    Args:
        target: a file, "-", "journal" or "journal:PATH" (see above), or None.
        maxlen: records queued before whatever can be summarized is.
        max_bytes: a file target is renamed to FILE.1 at this size (0: never).

    Raises:
        OSError: the target file or journal socket cannot be opened.
    """

    def __init__(
        self, target: str | None, maxlen: int = MAX_QUEUED_RECORDS, max_bytes: int = 0
    ) -> None:
        self.dropped = 0  # records the OS refused to take
        self.written = 0  # records written (an aggregate or coalesced one counts once)
        self.waits = 0  # times the loop waited for the writer (MAX_QUEUED_ALLOWS)
        self.summaries = Summaries()
        self._reported_drops = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._maxlen = maxlen
        self._max_allows = max(maxlen, MAX_QUEUED_ALLOWS)
        # Records of this second, per uid (reset at each new second).
        self._second = 0
        self._allows: dict[Any, int] = {}
        self._denials: dict[Any, int] = {}
        self._all_denials = 0
        self._reopen = False
        self._next_coalesce = self._next_aggregate = 0.0  # the writer's schedule
        self._room = threading.Event()
        self._stop = threading.Event()
        self._sink = None if target is None else _sink(target, max_bytes)
        self._thread: threading.Thread | None = None
        if self._sink is not None:
            self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    @property
    def aggregated(self) -> int:
        return self.summaries.aggregated

    @property
    def coalesced(self) -> int:
        return self.summaries.coalesced

    def record(self, fields: dict[str, Any]) -> None:
        """Account for one decision (on the loop's thread); `time` is added here.

        Blocks only when MAX_QUEUED_ALLOWS allows wait for the writer."""
        if self._sink is None:
            return
        now = fields["time"] = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._allows.clear()
            self._denials.clear()
            self._all_denials = 0
        uid, queued = fields.get("uid"), len(self._queue)
        if fields.get("decision") == "allow":
            n = self._allows[uid] = self._allows.get(uid, 0) + 1
            if (n <= ALLOWS_PER_SECOND and queued < self._maxlen) or not (
                self.summaries.coalesce(fields, now)
            ):
                if queued >= self._max_allows:
                    self._wait_for_room()
                self._queue.append(fields)
            return
        n = self._denials[uid] = self._denials.get(uid, 0) + 1
        # The shared budget counts records written whole only: one uid's
        # flood does not take the other uids' single records away.
        if (
            n <= DENIALS_PER_SECOND
            and self._all_denials < ALL_DENIALS_PER_SECOND
            and queued < self._maxlen
        ):
            self._all_denials += 1
            self._queue.append(fields)
        else:
            self.summaries.aggregate(fields, now)

    def _wait_for_room(self) -> None:
        self.waits += 1
        while len(self._queue) >= self._max_allows and self._writing():
            self._room.clear()
            self._room.wait(FLUSH_INTERVAL)

    def _writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reopen(self) -> None:
        """Open the file target again before the next write (safe in a signal handler)."""
        self._reopen = True

    def _drain(self, now: float, final: bool = False) -> None:
        assert self._sink is not None
        if self._reopen:
            self._reopen = False
            self._sink.reopen()
        records = []
        while self._queue:
            records.append(self._queue.popleft())
        self._room.set()
        if final or now >= self._next_coalesce:
            self._next_coalesce = now + COALESCE_WINDOW
            records += self.summaries.take_coalesced()
        if final or now >= self._next_aggregate:
            self._next_aggregate = now + AGGREGATE_INTERVAL
            records += self.summaries.take_aggregates()
        if self.dropped != self._reported_drops:
            self._reported_drops = self.dropped
            records.append({"time": now, "event": "audit-dropped", "dropped_total": self.dropped})
        if records:
            for r in records:
                r["time_iso"] = iso(r["time"])
                # Names where people read them, looked up here, off the request path.
                if isinstance(r.get("uid"), int):
                    r["user"] = names.user(r["uid"])
                if isinstance(r.get("gid"), int):
                    r["group"] = names.group(r["gid"])
                if "first" in r:
                    r["first"], r["last"] = iso(r["first"]), iso(r["last"])
            lost = self._sink.write(records)
            self.dropped += lost
            self.written += len(records) - lost

    def _run(self) -> None:
        self._next_coalesce = time.time() + COALESCE_WINDOW
        self._next_aggregate = self._next_coalesce - COALESCE_WINDOW + AGGREGATE_INTERVAL
        while not self._stop.wait(FLUSH_INTERVAL):
            self._drain(time.time())
        self._drain(time.time(), final=True)

    def close(self) -> None:
        """Write out what is queued and summarized, and stop the writer."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self._sink is not None:
            self._sink.close()
        self._sink = None
