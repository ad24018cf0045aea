"""Fixtures of the adversarial suite.

`launch` is tests/conftest.py's `start_broker` (which can also start a broker
under a low RLIMIT_NOFILE or with fds leaked into it); `probe` is a small
root-only file for the well-behaved clients.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def searchable_tmp(tmp_path: Path) -> None:
    """tmp_path searchable by every uid (tests/support/searchable.py)."""
    from tests.support.searchable import searchable

    searchable(tmp_path)


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A small root-only file the well-behaved clients read (see probe_policy)."""
    p = tmp_path / "probe.txt"
    p.write_text("probe\n")
    os.chmod(p, 0o600)
    return p


@pytest.fixture
def hot_dir(tmp_path: Path) -> Path:
    """A directory for the fast-path tests' hot files (tests/adversarial/_fastpath.py)."""
    from tests.adversarial._fastpath import make_hot_dir

    return make_hot_dir(tmp_path)


@pytest.fixture
def launch(start_broker: object) -> object:
    """tests/conftest.py's start_broker, under the name this suite reads best
    with: launch(policy, nofile=64) or launch(policy, pass_fds=(fd,))."""
    return start_broker


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    from tests.adversarial._util import TALLY

    if TALLY:
        terminalreporter.write_sep("-", "adversarial suite: what was exercised")
        for key in sorted(TALLY):
            terminalreporter.write_line(f"{key}: {TALLY[key]:,}")
