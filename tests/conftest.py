"""Fixtures: a real broker process on a unique abstract name, with a policy of the test's."""

from __future__ import annotations

import functools
import itertools
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from privbroker import unix
from tests.support.client_cases import files, no_fd_leak, standin, tree  # noqa: F401 (client tests' fixtures)

_names = itertools.count()


def unique_name(tag: str = "test") -> str:
    return f"privbroker-{tag}-{os.getpid()}-{next(_names)}"


@dataclass
class RunningBroker:
    name: str
    policy: Path
    audit: Path
    proc: subprocess.Popen[bytes]
    log: Path
    extra: list[str] = field(default_factory=list)

    def audit_records(self) -> list[dict[str, object]]:
        import json

        text = self.audit.read_text() if self.audit.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_listening(name: str, proc: subprocess.Popen[bytes] | None, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(unix.abstract_address(name))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    raise RuntimeError(f"broker not listening on @{name} after {seconds} s")


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[object]:
    """start_broker(policy_text, *extra_args, name=, nofile=, pass_fds=) -> RunningBroker.

    `nofile` starts the broker under that RLIMIT_NOFILE (util-linux prlimit,
    else a preexec_fn); `pass_fds` leaks those fds into it. Every broker is
    stopped at teardown.
    """
    started: list[RunningBroker] = []

    def start(
        policy_text: str,
        *extra: str,
        name: str | None = None,
        nofile: int | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> RunningBroker:
        n = len(started)
        policy = tmp_path / f"policy{n}.toml"
        policy.write_text(textwrap.dedent(policy_text))
        audit = tmp_path / f"audit{n}.jsonl"
        log = tmp_path / f"broker{n}.log"
        name = name or unique_name()
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
            "privbroker.broker",
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
        try:
            wait_listening(name, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text()}") from None
        return b

    yield start
    for b in started:
        b.stop()
