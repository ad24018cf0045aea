"""Rate limits for what the broker writes: audit summaries and its own log lines.

Audit (core/audit.py decides what is summarized, this module keeps the tables):
- `Summaries.aggregate` folds a denial (or a failed request) into one record
  per (uid, decision): a count, the first and last time, the errnos seen and a
  bounded sample of the paths or targets and pids. Emitted every
  AGGREGATE_INTERVAL seconds, so a flood costs one record per uid per interval.
- `Summaries.coalesce` folds identical allows (same uid, pid, request,
  path or target, access, rule) into the first one's record with a count, a
  first and last time, emitted after COALESCE_WINDOW seconds. An allow is never
  dropped: when the table is full, `coalesce` says no and the caller queues
  the record whole.
Both are O(1) per record, and both take the lock: the loop thread adds, the
audit writer thread takes whole tables.

Log lines (`PerCause`, a logging.Filter on the "privbroker" logger): at most
LINES_PER_CAUSE lines of one cause (the message template) per CAUSE_WINDOW;
the rest are counted, and one line says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

# An aggregate record every 5 s: "every few seconds", 6 records per uid per
# journald interval (30 s), and a flood still shows within moments.
AGGREGATE_INTERVAL = 5.0
# Identical allows within 1 s share a record: short enough to read as "at once".
COALESCE_WINDOW = 1.0
# The sample of paths (or targets) and pids an aggregate keeps: enough to see
# what was probed, bounded whatever the flood.
SAMPLE_SIZE = 8
# A path in a sample is cut to this many characters (paths go to 4096).
SAMPLE_CHARS = 256
# Distinct allows being coalesced at once; past it, allows are queued whole.
MAX_COALESCED = 4096
# Uids with an aggregate at once; past it, the rest share one with uid null.
MAX_AGGREGATES = 4096

# A cause's lines per window: the first few show what is happening, the
# summary how much.
LINES_PER_CAUSE = 10
CAUSE_WINDOW = 10.0
# Causes remembered at once (templates are few; "%s" lines are keyed by text).
MAX_CAUSES = 1024


class Summaries:
    """The aggregated denials and coalesced allows not yet written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aggregates: dict[tuple[Any, Any], dict[str, Any]] = {}
        self._coalesced: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.aggregated = 0  # decisions folded into an aggregate
        self.coalesced = 0  # allows folded into an earlier identical one

    def aggregate(self, fields: dict[str, Any], now: float) -> None:
        """Count a denial (or failure) in its uid's aggregate."""
        uid, decision = fields.get("uid"), fields.get("decision")
        target = fields.get("path") or fields.get("target")
        pid, error = fields.get("pid"), fields.get("error")
        with self._lock:
            a = self._aggregates.get((uid, decision))
            if a is None:
                if len(self._aggregates) >= MAX_AGGREGATES:
                    uid = None  # every other uid, together
                a = self._aggregates.get((uid, decision))
                if a is None:
                    a = self._aggregates[uid, decision] = _new_aggregate(uid, decision, now)
            a["count"] += 1
            a["last"] = now
            if isinstance(target, str):
                sample = a["sample"]
                if len(sample) < SAMPLE_SIZE and target[:SAMPLE_CHARS] not in sample:
                    sample.append(target[:SAMPLE_CHARS])
            pids = a["pids"]
            if len(pids) < SAMPLE_SIZE and pid not in pids:
                pids.append(pid)
            if error:
                errors = a["errors"]
                errors[error] = errors.get(error, 0) + 1
            self.aggregated += 1

    def coalesce(self, fields: dict[str, Any], now: float) -> bool:
        """Fold an allow into an identical one's record; False: queue it whole."""
        access = fields.get("access")
        key = (
            fields.get("uid"),
            fields.get("pid"),
            fields.get("request"),
            fields.get("path"),
            fields.get("target"),
            tuple(access) if isinstance(access, list) else access,
            fields.get("rule"),
            fields.get("decision"),
        )
        with self._lock:
            c = self._coalesced.get(key)
            if c is not None:
                c["count"] += 1
                c["last"] = now
                self.coalesced += 1
                return True
            if len(self._coalesced) >= MAX_COALESCED:
                return False
            fields["count"] = 1
            fields["first"] = fields["last"] = now
            self._coalesced[key] = fields
            return True

    def take_aggregates(self) -> list[dict[str, Any]]:
        with self._lock:
            taken, self._aggregates = self._aggregates, {}
        records = list(taken.values())
        for r in records:
            r["time"] = r["last"]
        return records

    def take_coalesced(self) -> list[dict[str, Any]]:
        """The coalesced allows; one seen only once is an ordinary record again."""
        with self._lock:
            taken, self._coalesced = self._coalesced, {}
        records = list(taken.values())
        for r in records:
            if r["count"] == 1:
                del r["count"], r["first"], r["last"]
            else:
                r["coalesced"] = True
        return records


def _new_aggregate(uid: Any, decision: Any, now: float) -> dict[str, Any]:
    return {
        "aggregated": True,
        "uid": uid,
        "decision": decision,
        "count": 0,
        "first": now,
        "last": now,
        "errors": {},
        "sample": [],
        "pids": [],
    }


class PerCause(logging.Filter):
    """Lets through LINES_PER_CAUSE lines of each cause per CAUSE_WINDOW.

    A cause is a message template (`log.warning("refusing %s", ...)`), or the
    text itself for a bare "%s". What is held back is counted, and one line
    ("N more like this in the last S s, the last: ...") says so once the
    window is over: at the cause's next line, or at any line after that.
    DEBUG lines pass untouched.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        # cause -> [window start, lines let through, lines held, the last held]
        self._causes: dict[Hashable, list[Any]] = {}
        self._next_sweep = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or getattr(record, "privbroker_summary", False):
            return True
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key: Hashable = (
            (record.levelno, record.getMessage())
            if record.msg == "%s"
            else (record.levelno, record.msg)
        )
        c = self._causes.get(key)
        if c is None or now - c[0] >= CAUSE_WINDOW:
            if c is not None:
                self._summarize(c, now)
            elif len(self._causes) >= MAX_CAUSES:
                self._sweep(now, everything=True)
            c = self._causes[key] = [now, 0, 0, None]
        if c[1] < LINES_PER_CAUSE:
            c[1] += 1
            return True
        c[2] += 1
        c[3] = record
        return False

    def _sweep(self, now: float, everything: bool = False) -> None:
        self._next_sweep = now + CAUSE_WINDOW
        for key, c in list(self._causes.items()):
            if everything or now - c[0] >= CAUSE_WINDOW:
                self._summarize(c, now)
                del self._causes[key]

    def flush(self) -> None:
        """Say now what was held back (at shutdown)."""
        self._sweep(self._clock(), everything=True)

    def _summarize(self, c: list[Any], now: float) -> None:
        held, last = c[2], c[3]
        c[2], c[3] = 0, None
        if not held or last is None:
            return
        logging.getLogger(last.name).log(
            last.levelno,
            "%d more like this in the last %.0f s, the last: %s",
            held,
            now - c[0],
            last.getMessage(),
            extra={"privbroker_summary": True},
        )
