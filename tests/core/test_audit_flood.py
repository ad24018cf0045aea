"""The audit log under a flood: every decision accounted for, the log bounded.

A real broker (--audit FILE) and uid 65534, which floods it with denied opens
(250 a request, on one connection) with allowed opens in between: every allow
has its record (or is counted in an identical one's), the denials past the
rate are counted in aggregate records, and the file stays small. The file is
reopened on SIGUSR1 and SIGHUP after a logrotate-style rename, and rotated by
the broker at --audit-max-bytes. A connection storm past the per-uid limit
writes a bounded number of log lines, and says how many it left out.

Times are never asserted; counts and sizes are (a second's records are
grouped by their own `time`, to check the per-second rate).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from privbroker import Client, PolicyDenied, unix
from privbroker.broker.core import audit, ratelimit
from privbroker.protocol import MAX_BATCH
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.running import status, wait_for

ROUNDS = 80  # requests of MAX_BATCH denials, each followed by one allowed open
BURST = 1000  # identical allowed opens at once: past ALLOWS_PER_SECOND


@pytest.fixture
def pub(tmp_path: Path) -> list[str]:
    d = tmp_path / "pub"
    d.mkdir()
    files = []
    for i in range(10):
        (d / f"f{i}.txt").write_text(f"{i}\n")
        files.append(str(d / f"f{i}.txt"))
    return files


def policy(pub: list[str]) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "pub"
        users = ["nobody"]
        paths = ["{Path(pub[0]).parent}/*.txt"]
        access = ["read"]
    """


def flood(name: str, denied: list[str], allowed: list[str]) -> tuple[int, Counter[str]]:
    """As nobody: ROUNDS batches of denials, an allowed open after each, then a burst."""
    sent: Counter[str] = Counter()
    with Client(name) as c:
        for r in range(ROUNDS):
            try:
                c.open_many(denied)
            except PolicyDenied:
                sent["deny"] += len(denied)
            else:
                raise AssertionError("a denied batch was allowed")
            os.close(c.open_fd(allowed[r % len(allowed)]))
            sent["allow"] += 1
        for _ in range(BURST):
            os.close(c.open_fd(allowed[0]))
            sent["allow"] += 1
    return os.getpid(), sent


def has_zone(text: str) -> bool:
    return datetime.fromisoformat(text).tzinfo is not None


def test_a_flood_of_denials_is_aggregated_and_every_allow_recorded(
    start_broker, tmp_path: Path, pub: list[str]
) -> None:
    b = start_broker(policy(pub))
    denied = [str(tmp_path / "secret" / f"s{i}") for i in range(MAX_BATCH)]
    pid, sent = run_as(NOBODY, NOGROUP, flood, b.name, denied, pub, timeout=120)
    st = status(b.name)
    b.stop()  # the writer writes out what it holds, summaries too
    size = b.audit.stat().st_size
    recs = [r for r in b.audit_records() if r.get("uid") == NOBODY]
    assert all(has_zone(r["time_iso"]) and isinstance(r["time"], float) for r in recs)

    allows = [r for r in recs if r["decision"] == "allow"]
    assert all(r["pid"] == pid for r in allows)
    assert sum(r.get("count", 1) for r in allows) == sent["allow"]
    assert {r["path"] for r in allows} == set(pub)
    coalesced = [r for r in allows if r.get("coalesced")]
    assert coalesced, "a burst of identical allows was not coalesced"
    for r in coalesced:
        assert r["count"] > 1 and has_zone(r["first"]) and has_zone(r["last"])
        assert r["path"] == pub[0] and r["rule"] == "pub"

    denials = [r for r in recs if r["decision"] == "deny"]
    single = [r for r in denials if not r.get("aggregated")]
    aggregated = [r for r in denials if r.get("aggregated")]
    assert aggregated, "no denial was aggregated"
    assert len(single) + sum(r["count"] for r in aggregated) == sent["deny"]
    for r in aggregated:
        assert 0 < len(r["sample"]) <= ratelimit.SAMPLE_SIZE
        assert set(r["sample"]) <= set(denied) and r["pids"] == [pid]
        assert sum(r["errors"].values()) == r["count"]
        assert has_zone(r["first"]) and has_zone(r["last"])
    per_second = Counter(int(r["time"]) for r in single)
    assert max(per_second.values()) <= audit.DENIALS_PER_SECOND

    # Small: a twentieth of what one line per denial would take.
    line = len(json.dumps(single[0], separators=(",", ":"))) + 1
    assert size < sent["deny"] * line / 20, (size, sent)

    assert st["audit_aggregated"] == sum(r["count"] for r in aggregated)
    assert st["audit_coalesced"] == sum(r["count"] - 1 for r in coalesced)
    assert 0 < st["audit_written"] <= len(b.audit_records())
    assert st["audit_dropped"] == 0


def read_one(name: str, path: str) -> None:
    with Client(name) as c:
        os.close(c.open_fd(path))


def paths_in(p: Path) -> list[str]:
    if not p.exists():
        return []
    return [json.loads(line).get("path") for line in p.read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP], ids=["USR1", "HUP"])
def test_the_file_is_reopened_after_a_rename(
    start_broker, pub: list[str], sig: signal.Signals
) -> None:
    b = start_broker(policy(pub))
    run_as(NOBODY, NOGROUP, read_one, b.name, pub[0])
    wait_for(lambda: pub[0] in paths_in(b.audit), 20.0)
    rotated = b.audit.with_name(b.audit.name + ".1")
    b.audit.rename(rotated)  # what logrotate does, before its postrotate
    b.proc.send_signal(sig)
    # Records made before the writer reopens go to the renamed file: wait
    # until one lands in the new file.
    n = 1
    while not b.audit.exists():
        run_as(NOBODY, NOGROUP, read_one, b.name, pub[n % len(pub)])
        n += 1
        assert n < 200, "the audit file was never opened again"
        time.sleep(0.02)
    run_as(NOBODY, NOGROUP, read_one, b.name, pub[9])
    wait_for(lambda: pub[9] in paths_in(b.audit), 20.0)
    assert b.audit.stat().st_mode & 0o777 == 0o600
    assert b.proc.poll() is None
    b.stop()
    assert len(paths_in(rotated)) + len(paths_in(b.audit)) == n + 1  # none lost


def read_many(name: str, paths: list[str], n: int) -> None:
    with Client(name) as c:
        for i in range(n):
            os.close(c.open_fd(paths[i % len(paths)]))


def test_the_broker_rotates_the_file_at_max_bytes(start_broker, pub: list[str]) -> None:
    limit = 8192
    b = start_broker(policy(pub), "--audit-max-bytes", str(limit))
    rotated = b.audit.with_name(b.audit.name + ".1")
    run_as(NOBODY, NOGROUP, read_many, b.name, pub, 60)  # about 30 KB of records
    wait_for(lambda: rotated.exists(), 20.0)
    b.stop()
    assert rotated.stat().st_size <= limit  # rotated between lines
    assert b.audit.stat().st_size <= limit
    assert paths_in(b.audit)[-1] == pub[59 % len(pub)]  # the newest is in FILE


STORM = 3000
HELD = 2  # --max-connections-per-uid


def storm(name: str, n: int) -> int:
    """As nobody: hold HELD connections, then connect `n` times more (each refused)."""
    addr = unix.abstract_address(name)
    keep = []
    for _ in range(HELD):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(addr)
        keep.append(s)
    time.sleep(0.2)  # accepted before the storm
    for start in range(0, n, 200):
        socks = []
        for _ in range(min(200, n - start)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(addr)
            socks.append(s)
        for s in socks:  # the broker refuses each: EOF
            s.settimeout(10)
            assert s.recv(100) == b""
            s.close()
    for s in keep:
        s.close()
    return n


def test_a_connection_storm_writes_few_log_lines(start_broker, pub: list[str]) -> None:
    b = start_broker(policy(pub), "--max-connections-per-uid", str(HELD))
    before = len(b.log_text().splitlines())
    run_as(NOBODY, NOGROUP, storm, b.name, STORM, timeout=120)
    refused = status(b.name)["refused_connections"]
    assert refused == STORM
    b.stop()  # the limiter says what it held back
    lines = b.log_text().splitlines()[before:]
    shown = [ln for ln in lines if "refusing connection" in ln and "more like this" not in ln]
    held_back = [
        int(m.group(1))
        for ln in lines
        if (m := re.search(r"(\d+) more like this in the last .*refusing connection", ln))
    ]
    assert len(lines) < 60, lines[:80]
    assert len(shown) + sum(held_back) == refused


# ------------------------------------------------------------ pure pieces


def test_one_uids_flood_leaves_other_uids_their_single_records(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    log = audit.AuditLog(str(out))
    for n in range(5000):
        log.record({"uid": 1, "pid": 1, "path": f"/f{n}", "decision": "deny", "error": "EACCES"})
    log.record({"uid": 2, "pid": 2, "path": "/mine", "decision": "deny", "error": "EACCES"})
    log.close()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(r["uid"] == 2 and not r.get("aggregated") for r in recs)
    assert sum(r.get("count", 1) for r in recs if r["uid"] == 1) == 5000


def test_a_stalled_writer_makes_the_loop_wait_rather_than_drop_an_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(audit, "MAX_QUEUED_ALLOWS", 20)
    monkeypatch.setattr(ratelimit, "MAX_COALESCED", 5)  # then distinct allows queue
    log = audit.AuditLog(str(tmp_path / "a.jsonl"), maxlen=10)
    sink = log._sink
    assert sink is not None
    release, written = threading.Event(), []

    class Stalled:
        def write(self, records: list[dict[str, Any]]) -> int:
            release.wait()
            written.extend(records)
            return 0

        def reopen(self) -> None:
            pass

        def close(self) -> None:
            sink.close()

    log._sink = Stalled()  # type: ignore[assignment]
    loop = threading.Thread(
        target=lambda: [
            log.record({"uid": 1, "path": f"/{n}", "decision": "allow"}) for n in range(200)
        ]
    )
    loop.start()
    loop.join(1.0)
    assert loop.is_alive() and log.waits >= 1  # waiting for the writer, nothing dropped
    release.set()
    loop.join(10)
    log.close()
    assert sorted(r["path"] for r in written) == sorted(f"/{n}" for n in range(200))
    assert log.dropped == 0


def test_log_lines_are_limited_per_cause() -> None:
    import logging

    now = [0.0]
    limiter = ratelimit.PerCause(clock=lambda: now[0])
    logger = logging.getLogger("privbroker.test-ratelimit")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addFilter(limiter)
    logger.addHandler(Keep())
    logger.propagate = False
    try:
        for n in range(1000):
            logger.warning("refusing connection %d: %s", n, "the per-uid limit")
        for n in range(20):  # bare "%s" lines are keyed by their text: all shown
            logger.warning("%s", f"policy warning {n}")
        assert len(lines) == ratelimit.LINES_PER_CAUSE + 20
        now[0] += ratelimit.CAUSE_WINDOW
        logger.warning("refusing connection %d: %s", 1000, "the per-uid limit")
        held = 1000 - ratelimit.LINES_PER_CAUSE
        assert lines[-2] == (
            f"{held} more like this in the last 10 s, the last: "
            "refusing connection 999: the per-uid limit"
        )
        assert lines[-1] == "refusing connection 1000: the per-uid limit"
        logger.debug("debug lines %d", 1)  # untouched (and below the level here)
    finally:
        logger.removeFilter(limiter)
        logger.handlers.clear()


def test_aggregates_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_AGGREGATES", 3)
    s = ratelimit.Summaries()
    for uid in range(10):
        for n in range(100):
            path = f"/{n}" + "/x" * 400
            s.aggregate({"uid": uid, "pid": n, "path": path, "decision": "deny"}, 1.0)
    recs = s.take_aggregates()
    assert len(recs) == 4 and sum(r["count"] for r in recs) == 1000
    assert [r["uid"] for r in recs][-1] is None  # every uid past the third, together
    for r in recs:
        assert len(r["sample"]) == ratelimit.SAMPLE_SIZE == len(r["pids"])
        assert all(len(p) == ratelimit.SAMPLE_CHARS for p in r["sample"])
    assert s.take_aggregates() == [] and s.aggregated == 1000
