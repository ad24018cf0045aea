"""Fixtures of the adversarial suite.

`launch` starts a broker like tests/conftest.py's `start_broker`, but under a
low RLIMIT_NOFILE (util-linux prlimit, else a preexec_fn), with fds to leak
into it, or without waiting for a socket that may never come.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningBroker, unique_name, wait_listening


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A small root-only file the well-behaved clients read (see probe_policy)."""
    p = tmp_path / "probe.txt"
    p.write_text("probe\n")
    os.chmod(p, 0o600)
    return p


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[object]:
    started: list[RunningBroker] = []

    def start(
        policy_text: str,
        *extra: str,
        name: str | None = None,
        nofile: int | None = None,
        pass_fds: tuple[int, ...] = (),
        wait: bool = True,
    ) -> RunningBroker:
        n = len(started)
        policy = tmp_path / f"adv-policy{n}.toml"
        policy.write_text(textwrap.dedent(policy_text))
        audit = tmp_path / f"adv-audit{n}.jsonl"
        log = tmp_path / f"adv-broker{n}.log"
        name = name or unique_name("adv")
        prefix: list[str] = []
        preexec: Callable[[], None] | None = None
        if nofile is not None:
            tool = shutil.which("prlimit")
            if tool is not None:
                prefix = [tool, f"--nofile={nofile}:{nofile}"]
            else:
                preexec = functools.partial(
                    resource.setrlimit, resource.RLIMIT_NOFILE, (nofile, nofile)
                )
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--policy",
            str(policy),
            "--socket",
            name,
            "--audit",
            str(audit),
            "--log-level",
            "debug",
            *extra,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds, preexec_fn=preexec
            )
        b = RunningBroker(name, policy, audit, proc, log, list(extra))
        started.append(b)
        if wait:
            try:
                wait_listening(name, proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{log.read_text()}") from None
        return b

    yield start
    for b in started:
        b.stop()


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    from tests.adversarial._util import TALLY

    if TALLY:
        terminalreporter.write_sep("-", "adversarial suite: what was exercised")
        for key in sorted(TALLY):
            terminalreporter.write_line(f"{key}: {TALLY[key]:,}")
