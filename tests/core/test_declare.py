"""DECLARE: a client names the program its requests are for (privopen, the
command it runs); the audit records it beside the kernel's executable, as the
client's claim, and it changes no decision."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from privbroker import PolicyDenied
from privbroker.api import Client
from tests.support.privs import NOBODY, NOGROUP, run_as


def policy(tree: Path) -> str:
    return f"""
    version = 1
    [[allow]]
    name = "nobody reads the note"
    users = ["nobody"]
    paths = ["{tree}/note.txt"]
    access = ["read"]
    """


def declare_and_open(name: str, tree: str) -> str:
    with Client(name) as client:
        client.declare("/usr/bin/openssl")
        with client.open(f"{tree}/note.txt") as f:
            text = f.read()
        try:
            client.open_fd(f"{tree}/other.txt")
        except PolicyDenied:
            return text
    raise AssertionError("declaring a program granted something")


def records(audit: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} audit records")


@pytest.mark.timeout(60)
def test_the_audit_names_the_declared_program(start_broker: Any, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir(mode=0o755)
    (tree / "note.txt").write_text("hello\n")
    (tree / "other.txt").write_text("no\n")
    b = start_broker(policy(tree))
    assert run_as(NOBODY, NOGROUP, declare_and_open, b.name, str(tree)) == "hello\n"
    found = records(b.audit, 2)
    assert {r["declared"] for r in found} == {"/usr/bin/openssl"}
    assert all(r["exe"] != "/usr/bin/openssl" for r in found)  # the kernel's word stays
    assert [r["decision"] for r in found] == ["allow", "deny"]


def test_declare_checks_its_argument_before_any_io() -> None:
    client = Client("privbroker-test-nowhere")
    with pytest.raises(ValueError):
        client.declare(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.declare("x" * 5000)


@pytest.mark.timeout(60)
def test_privopen_declares_the_command_it_runs(start_broker: Any, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    b = start_broker(
        f'version = 1\n[[allow]]\nname = "root reads"\nusers = ["root"]\n'
        f'paths = ["{note}"]\naccess = ["read"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "privbroker.privopen", "--socket", b.name,
         "--fd", f"3={note}", "--", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = records(b.audit, 1)
    assert record["declared"] == shutil.which("true")
