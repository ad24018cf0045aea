"""End-to-end cases that only random or fast-path tests covered (issue 14).

- `open_privileged(path, "a")` under a rule that grants append (and create)
  but not write, on an ordinary file (not chattr +a): the fd could drop
  O_APPEND with fcntl, so it would give write; denied (invariant 1).
- A connection used by a process that differs from its connector only in
  gid is denied, with the fast path off too (invariant 4): the Python
  broker compares SCM_CREDENTIALS with SO_PEERCRED itself.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from privbroker import PolicyDenied, open_privileged
from privbroker.protocol import Access
from tests.adversarial._fastpath import Got, fetch_on, policy
from tests.adversarial._util import Raw, as_nobody, broker_healthy, make_root_file
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial

R = Access.READ


def _append(name: str, path: str) -> str:
    try:
        with open_privileged(path, "a", socket=name) as f:
            f.write("appended\n")
    except PolicyDenied as exc:
        return f"denied: {exc}"
    return "opened"


def test_append_mode_under_an_append_only_rule_on_an_ordinary_file(
    start_broker: Any, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    make_root_file(log, "first\n", mode=0o644)
    b = start_broker(policy([str(log)], ("append", "create"), name="append only"))
    got = as_nobody(_append, b.name, str(log))
    assert got.startswith("denied"), got
    assert log.read_text() == "first\n"
    broker_healthy(b)


def _use(raw: Raw, path: str) -> list[Got]:
    return fetch_on(raw, [(path, R)])


@pytest.mark.parametrize("fast", [False, True])
def test_a_socket_used_by_a_process_of_another_gid_is_denied(
    start_broker: Any, tmp_path: Path, fast: bool
) -> None:
    secret = tmp_path / "secret.txt"
    make_root_file(secret, "secret\n")
    extra = () if fast else ("--no-fast-path",)
    b = start_broker(policy([str(secret)], users=(0, NOBODY)), *extra)
    raw = Raw(b.name)  # connected by root: uid 0, gid 0
    try:
        (g,) = run_as(0, NOGROUP, _use, raw, str(secret))  # same uid, another gid
        assert (g.errno, g.denied, g.ident) == (errno.EACCES, True, None), g
        assert "credentials" in g.reason, g.reason
        (ok,) = fetch_on(raw, [(str(secret), R)])  # the connector again: served
        assert ok.errno == 0 and ok.head == b"secret\n"
    finally:
        raw.close()
    broker_healthy(b)
