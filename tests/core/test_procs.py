"""`serve --processes N`: several broker processes on one socket (broker/core/procs.py).

A real broker with two processes: both run and stop together, status adds
up what both counted, SIGHUP reloads both, the limits are split, and a
process that dies takes the broker down (exit 1) rather than leaving half a
broker serving.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from privbroker import Client, PolicyDenied
from tests.conftest import RunningBroker

pytestmark = pytest.mark.timeout(60)


def policy(d: Path, access: str = '"read"') -> str:
    return f"""
        version = 1
        [[allow]]
        name = "root reads"
        users = ["root"]
        paths = ["{d}/*"]
        access = [{access}]
    """


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def wait_for(what, seconds: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if got := what():
            return got
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "f").write_text("data\n")
    (d / "f").chmod(0o600)
    return d


def two(start_broker, data: Path, *extra: str) -> tuple[RunningBroker, int]:  # type: ignore[no-untyped-def]
    b = start_broker(policy(data), "--processes", "2", *extra)
    (child,) = wait_for(lambda: children(b.proc.pid))
    return b, child


def test_two_processes_serve_and_status_adds_up(start_broker, data: Path) -> None:
    b, child = two(start_broker, data)
    clients = [Client(socket=b.name) for _ in range(6)]
    for c in clients:
        for _ in range(3):
            os.close(c.open_fd(str(data / "f")))
    st = clients[0].status()
    assert st["processes"] == 2 and st["pid"] in (b.proc.pid, child)
    # The other process publishes its counters every loop tick (<= 1 s).
    total = wait_for(lambda: (s := Client(socket=b.name).status())["allowed"] == 18 and s)
    assert total["requests"] >= 18 and total["connections"] >= 6
    for c in clients:
        c.close()
    assert b.stop() == 0
    assert not children(b.proc.pid) and not Path(f"/proc/{child}").exists()


def test_sighup_reloads_every_process(start_broker, data: Path) -> None:
    b, child = two(start_broker, data)

    def reloaded() -> list[int]:
        lines = [ln for ln in b.log_text().splitlines() if "policy reloaded" in ln]
        return [int(ln.split("[", 1)[1].split("]", 1)[0]) for ln in lines]

    wait_for(lambda: "process 2 of 2 serving" in b.log_text())  # its handlers are in
    os.kill(b.proc.pid, signal.SIGHUP)  # nothing changed: only the signal says reload
    wait_for(lambda: {b.proc.pid, child} <= set(reloaded()))
    # An edit reaches both too (each watches the files), and judges new connections.
    b.policy.write_text(policy(data, '"write"'))
    wait_for(lambda: reloaded().count(child) >= 2 and reloaded().count(b.proc.pid) >= 2)
    for _ in range(10):
        with Client(socket=b.name) as c, pytest.raises(PolicyDenied):
            c.open_fd(str(data / "f"))


def test_limits_apply_to_each_process(start_broker, data: Path) -> None:
    # A uid may hold the per-uid limit in each process (the kernel hands a
    # connection to whichever process waits first: a limit split between them
    # would refuse a uid while another process sits idle).
    b, _ = two(start_broker, data, "--max-connections-per-uid", "4")
    served, refused = 0, 0
    held = []
    for _ in range(12):
        c = Client(socket=b.name, timeout=2)
        held.append(c)
        try:
            os.close(c.open_fd(str(data / "f")))
            served += 1
        except Exception:
            refused += 1
    assert 4 <= served <= 8 and served + refused == 12
    for c in held:
        c.close()


def test_too_few_fds_for_the_processes(start_broker, data: Path) -> None:
    # Each process needs a useful share of the fds in flight (2000 per process).
    with pytest.raises(RuntimeError, match="exited with 1"):
        start_broker(policy(data), "--processes", "3", nofile=4096)


def test_a_dead_process_stops_the_broker(start_broker, data: Path) -> None:
    b, child = two(start_broker, data)
    os.kill(child, signal.SIGKILL)
    assert b.proc.wait(timeout=15) == 1
    assert f"broker process {child} exited (signal 9)" in b.log_text()


def test_sigterm_stops_them_all(start_broker, data: Path) -> None:
    b, child = two(start_broker, data)
    with Client(socket=b.name) as c:
        os.close(c.open_fd(str(data / "f")))
    assert b.stop() == 0
    assert not Path(f"/proc/{child}").exists()


@pytest.mark.parametrize("n", ["0", "65"])
def test_processes_out_of_range(start_broker, data: Path, n: str) -> None:
    with pytest.raises(RuntimeError, match="exited with 2"):
        start_broker(policy(data), "--processes", n)


def test_a_process_stopped_by_sigterm_stops_the_broker_cleanly(start_broker, data: Path) -> None:
    # systemd stops a unit by signalling every process in it: a process that
    # was told to stop is not a failure, and the broker stops with it.
    b, child = two(start_broker, data)
    wait_for(lambda: "process 2 of 2 serving" in b.log_text())
    os.kill(child, signal.SIGTERM)
    assert b.proc.wait(timeout=15) == 0
    assert f"broker process {child} stopped; stopping them all" in b.log_text()


def test_an_invalid_edit_is_refused_by_every_process(start_broker, data: Path) -> None:
    b, child = two(start_broker, data)
    wait_for(lambda: "process 2 of 2 serving" in b.log_text())
    b.policy.write_text("version = 1\n[[allow]]\nname = 'broken'\n")

    def refused() -> set[int]:
        lines = [ln for ln in b.log_text().splitlines() if "reload refused" in ln]
        return {int(ln.split("[", 1)[1].split("]", 1)[0]) for ln in lines}

    wait_for(lambda: {b.proc.pid, child} <= refused())
    for _ in range(10):  # the old policy keeps serving, wherever a connection lands
        with Client(socket=b.name) as c:
            os.close(c.open_fd(str(data / "f")))
    assert b.proc.poll() is None and Path(f"/proc/{child}").exists()
