"""`privbroker check | explain | status | demo | --version`, as an admin runs them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import privbroker.broker.admin.run
from privbroker import protocol as proto
from privbroker.broker.admin.cli import main as cli_main
from tests.support.privs import NOBODY, NOGROUP, run_as

REPO = Path(__file__).resolve().parents[2]


def privbroker(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privbroker.broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_version() -> None:
    out = privbroker("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"privbroker {proto.__version__}"


@pytest.mark.parametrize("command", ["serve", "check", "explain", "status", "demo"])
def test_every_command_has_help(command: str) -> None:
    out = privbroker(command, "--help")
    assert out.returncode == 0 and "usage: privbroker" in out.stdout
    assert "--" in out.stdout


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        'version = 1\n[[allow]]\nname = "r"\nusers = [0]\npaths = ["/x"]\naccess = ["read"]\n'
    )
    out = privbroker("check", "--policy", str(good))
    assert out.returncode == 0 and out.stdout.strip() == f"{good}: ok"
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "version = 1\n"
        "[[allow]]\n"
        'name = "web"\n'
        'users = ["www-data"]\n'
        'paths = ["srv/x"]\n'
        'acess = ["read"]\n'
    )
    out = privbroker("check", "--policy", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"{bad}:5: rule 'web': paths: path is not absolute: 'srv/x'" in lines
    assert f"{bad}:6: rule 'web': unknown key 'acess'" in lines
    assert all(line.startswith(f"{bad}:") for line in lines)


def test_check_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    out = privbroker("check", "--policy", str(tmp_path / "nope.toml"))
    assert out.returncode == 1 and str(tmp_path / "nope.toml") in out.stderr


def test_shipped_policies_check_clean() -> None:
    for policy in sorted((REPO / "policies").glob("*.toml")):
        out = privbroker("check", "--policy", str(policy))
        assert out.returncode == 0, out.stderr


POLICY = """
version = 1
[[allow]]
name = "monitoring reads logs"
groups = ["adm"]
paths = ["/var/log/**"]
access = ["read"]

[[deny]]
name = "no auth log"
paths = ["/var/log/auth.log"]
"""


def test_explain_from_file(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(POLICY)
    ok = privbroker(
        "explain",
        "--policy",
        str(p),
        "--uid",
        "65534",
        "--group",
        "adm",
        "--access",
        "read",
        "/var/log/syslog",
    )
    assert ok.returncode == 0 and ok.stdout.startswith("allowed:")
    assert "monitoring reads logs" in ok.stdout
    no = privbroker(
        "explain", "--policy", str(p), "--user", "nobody", "--access", "write", "/var/log/syslog"
    )
    assert no.returncode == 1 and no.stdout.startswith("denied:")
    assert "nearest: rule 'monitoring reads logs'" in no.stdout and "grants read" in no.stdout
    deny = privbroker(
        "explain",
        "--policy",
        str(p),
        "--uid",
        "0",
        "--group",
        "adm",
        "--access",
        "read",
        "--json",
        "/var/log/auth.log",
    )
    data = json.loads(deny.stdout)
    assert deny.returncode == 1 and data["allowed"] is False and data["rule"] == "no auth log"


def test_explain_bad_words_and_users(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(POLICY)
    out = privbroker("explain", "--policy", str(p), "--uid", "1", "--access", "exec", "/x")
    assert out.returncode != 0 and "exec" in out.stderr
    out = privbroker(
        "explain", "--policy", str(p), "--user", "no-such-user-x", "--access", "read", "/x"
    )
    assert out.returncode != 0 and "no such user" in out.stderr


def test_explain_and_status_against_running_broker(start_broker) -> None:
    b = start_broker(POLICY)
    out = privbroker(
        "explain",
        "--socket",
        b.name,
        "--uid",
        "65534",
        "--group",
        "adm",
        "--access",
        "read",
        "/var/log/syslog",
    )
    assert out.returncode == 0 and "monitoring reads logs" in out.stdout, out.stderr
    status = privbroker("status", "--socket", b.name, "--json")
    fields = json.loads(status.stdout)
    assert status.returncode == 0 and fields["rules"] == 2 and fields["policy"] == str(b.policy)
    text = privbroker("status", "--socket", b.name)
    assert text.returncode == 0 and "uptime_s" in text.stdout


def test_status_without_broker_fails_cleanly() -> None:
    out = privbroker("status", "--socket", "privbroker-none-here-x")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "privbroker" in out.stderr


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    # From a directory of its own: the installed package, no checkout beside it.
    out = privbroker("demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fast path is not built" not in out.stderr  # no checkout shadows the install
    assert not Path("/run/privbroker-demo").exists()  # it removes what it created
    commands = [line[2:].split()[0] for line in out.stdout.splitlines() if line.startswith("$ ")]
    assert commands and all(shutil.which(c) for c in commands)  # only commands that exist
    assert "open('report.txt')" in out.stdout and "PermissionError" in out.stdout
    assert "'quarterly figures: all good\\n'" in out.stdout
    assert "PolicyDenied" in out.stdout and "wrote it; owner uid 65534, mode 0640" in out.stdout


def _serve_as_nobody(policy: str) -> tuple[int, str]:
    # Everything is imported before the fork: as nobody, the interpreter's own
    # library (under /root) cannot be read.
    err = io.StringIO()
    logging.getLogger().handlers.clear()  # basicConfig in serve writes to our stderr
    with contextlib.redirect_stderr(err):
        code = cli_main(["serve", "--policy", policy, "--socket", "privbroker-test-nonroot"])
    return code, err.getvalue()


def test_serve_as_non_root_refuses_plainly(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[[allow]]\nname = "a"\nusers = [1]\npaths = ["/x"]\n')
    policy.write_text(policy.read_text() + 'access = ["read"]\n')
    policy.chmod(0o644)
    tmp_path.chmod(0o755)
    code, err = run_as(NOBODY, NOGROUP, _serve_as_nobody, str(policy))
    assert code == 1
    assert "serve must run as root (it is uid 65534)" in err


def test_explain_a_socket_with_and_without_v6only(tmp_path: Path) -> None:
    """`[::]` takes IPv4 too unless asked v6only: explain judges it as the broker does."""
    p = tmp_path / "p.toml"
    p.write_text(
        'version = 1\n\n[[allow]]\nname = "v6 web"\nusers = ["nobody"]\n'
        'sockets = ["tcp:443"]\naddresses = ["::"]\n'
    )
    base = ("explain", "--policy", str(p), "--user", "nobody")
    dual = privbroker(*base, "tcp:[::]:443")
    assert dual.returncode == 1 and "takes IPv4 too" in dual.stdout, dual.stdout
    six = privbroker(*base, "--v6only", "tcp:[::]:443")
    assert six.returncode == 0 and "v6 web" in six.stdout, six.stdout
    for wrong in (("--access", "read", "/etc/hosts"), ("link", "set", "x", "up")):
        out = privbroker(*base, "--v6only", *wrong)
        assert out.returncode != 0 and "--v6only is for a socket" in out.stderr
    out = privbroker("explain", "--socket", "x", "--user", "nobody", "--v6only", "tcp:[::]:443")
    assert out.returncode != 0 and "needs --policy" in out.stderr
