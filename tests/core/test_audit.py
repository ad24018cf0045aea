"""The audit log: JSON lines, journald fields, and drops that are counted, not hidden."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from privbroker import open_privileged
from privbroker.broker.core.audit import AuditLog
from tests.support.privs import NOBODY, NOGROUP, run_as


def test_a_full_queue_summarizes_and_drops_nothing(tmp_path: Path) -> None:
    """Past `maxlen` queued records, denials are aggregated and identical
    allows coalesced (core/audit.py); distinct allows are queued all the same."""
    out = tmp_path / "audit.jsonl"
    log = AuditLog(str(out), maxlen=3)
    for n in range(10):  # far faster than the writer's first wake-up
        log.record({"uid": 7, "pid": 1, "path": f"/d{n}", "decision": "deny", "error": "EACCES"})
        log.record({"uid": 7, "pid": 1, "path": f"/a{n % 2}", "decision": "allow"})
        log.record({"uid": 7, "pid": 1, "path": f"/u{n}", "decision": "allow"})
    log.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    denials = [r for r in lines if r["decision"] == "deny"]
    allows = [r for r in lines if r["decision"] == "allow"]
    assert sum(r.get("count", 1) for r in denials) == 10 and denials[-1]["aggregated"]
    assert sum(r.get("count", 1) for r in allows) == 20
    assert {f"/u{n}" for n in range(10)} <= {r["path"] for r in allows}
    assert log.dropped == 0 and log.written == len(lines)
    assert log.aggregated == denials[-1]["count"]
    assert all("time_iso" in r for r in lines)


def test_disabled_log_records_nothing(tmp_path: Path) -> None:
    log = AuditLog(None)
    log.record({"n": 1})
    assert not log.enabled and log.written == 0
    log.close()


def test_journal_records_carry_fields(start_broker, tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    target.write_text("x")
    target.chmod(0o600)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(10)
    b = start_broker(
        f"""
        version = 1
        [[allow]]
        name = "read data"
        users = ["nobody"]
        paths = ["{target}"]
        access = ["read"]
    """,
        "--audit",
        f"journal:{tmp_path / 'journal.sock'}",
    )

    def read() -> str:
        with open_privileged(str(target), socket=b.name) as f:
            return f.read()

    assert run_as(NOBODY, NOGROUP, read) == "x"
    entry = journal.recv(65536).decode()
    fields = dict(line.split("=", 1) for line in entry.splitlines())
    assert fields["SYSLOG_IDENTIFIER"] == "privbroker" and fields["PRIORITY"] == "6"
    assert fields["PRIVBROKER_DECISION"] == "allow"
    assert fields["PRIVBROKER_UID"] == str(NOBODY)
    assert fields["PRIVBROKER_RULE"] == "read data"
    assert fields["PRIVBROKER_PATH"] == str(target)
    assert fields["MESSAGE"].startswith(f"allow uid {NOBODY}")
    for key in ("GID", "PID", "EXE", "ACCESS", "ERRNO", "DURATION_US", "TIME"):
        assert f"PRIVBROKER_{key}" in fields
    journal.close()
    os.unlink(tmp_path / "journal.sock")


def test_unwritable_audit_target_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "privbroker.broker",
            "serve",
            "--policy",
            str(policy),
            "--socket",
            f"pb-audit-{os.getpid()}",
            "--audit",
            str(tmp_path / "missing" / "a.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "cannot open the audit log" in out.stderr
