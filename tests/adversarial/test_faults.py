"""Faults: the broker killed mid-request, restarted, stopped; clients that die
mid-request; a full backlog (docs/security.md, invariants 5, 6 and 8)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import platform
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from privbroker import BrokerUnavailable, Client, unix
from privbroker import protocol as proto
from privbroker.protocol import Access
from tests.adversarial._util import (
    Prober,
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    fd_count,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.conftest import unique_name
from tests.support.privs import NOBODY

pytestmark = pytest.mark.adversarial


def policy(tmp: Path) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "root and nobody read the probe"
        users = [0, {NOBODY}]
        paths = ["{tmp}/probe.txt"]
        access = ["read"]

        [[allow]]
        name = "nobody writes in w"
        users = [{NOBODY}]
        paths = ["{tmp}/w/*"]
        access = ["read", "write", "create", "truncate"]
    """


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "probe.txt").write_text("probe\n")
    os.chmod(tmp_path / "probe.txt", 0o600)
    (tmp_path / "w").mkdir()
    return tmp_path


def my_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def stopped(pid: int):  # type: ignore[no-untyped-def]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# ------------------------------------------------------------------ broker dies


def test_broker_sigkilled_mid_request(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp))
    probe = str(tmp / "probe.txt")
    client = Client(b.name, timeout=10)
    try:
        os.close(client.open_fd(probe))
        before = my_fds()
        os.kill(b.proc.pid, signal.SIGSTOP)  # it will never read what we send
        killer = threading.Timer(0.5, os.kill, (b.proc.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(BrokerUnavailable):
            client.open_fd(probe)
        killer.join()
        b.proc.wait(10)
        assert my_fds() <= before, "an fd arrived (or leaked) from a dead broker"
        with pytest.raises(BrokerUnavailable):  # and later calls fail cleanly too
            client.open_fd(probe)
    finally:
        client.close()


def test_stopped_broker_times_out_then_recovers(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp))
    probe = str(tmp / "probe.txt")
    with Client(b.name, timeout=1) as client:
        os.close(client.open_fd(probe))
        baseline = stable_fd_count(b.proc.pid)
        before = my_fds()
        with stopped(b.proc.pid):
            with pytest.raises(BrokerUnavailable) as info:
                client.open_fd(probe)
            assert info.value.errno == errno.ETIMEDOUT
        assert my_fds() <= before
        # The late reply went to a connection the client dropped; the next call
        # uses a fresh one and gets the right file.
        fd = client.open_fd(probe)
        assert os.pread(fd, 100, 0) == b"probe\n"
        os.close(fd)
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


def test_long_lived_client_reconnects_after_restart(start_broker, tmp: Path) -> None:
    name = unique_name("restart")
    probe = str(tmp / "probe.txt")
    b1 = start_broker(policy(tmp), name=name)
    client = Client(name, timeout=10)
    try:
        os.close(client.open_fd(probe))
        b1.stop()
        b2 = start_broker(policy(tmp), name=name)
        fd = client.open_fd(probe)  # the old connection is dead: reconnect, read
        assert os.pread(fd, 100, 0) == b"probe\n"
        os.close(fd)
        recs = audit_records(b2, lambda rs: len(rs) >= 1)
        assert [r["decision"] for r in recs] == ["allow"]
    finally:
        client.close()
    broker_healthy(b2)


_WAITING_SYSCALLS = {  # poll, select, ppoll, pselect6, recvmsg, epoll_wait, epoll_pwait
    "x86_64": {"7", "23", "271", "270", "47", "232", "281"},
    "aarch64": {"73", "72", "212", "22"},
}.get(platform.machine(), set())


def _blocked_waiting(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] in _WAITING_SYSCALLS
    except (OSError, IndexError):
        return False


def one_call_across_a_restart(
    name: str, probe: str, path: str, mode: str, ctl_w: int, go_r: int
) -> str:
    """As nobody: one call on a live connection, then (when told) one more."""
    with Client(name, timeout=20) as c:
        os.close(c.open_fd(probe))
        os.write(ctl_w, f"{os.getpid()}\n".encode())
        os.read(go_r, 1)
        try:
            fd = c.open_fd(path, mode)
        except BrokerUnavailable as exc:
            return f"BrokerUnavailable {exc.errno}"
        os.close(fd)
        return "opened"


def call_across_restart(start_broker, tmp: Path, path: Path, mode: str):  # type: ignore[no-untyped-def]
    """The call is sent to broker 1 (stopped, so it never reads it); broker 1 is
    killed and broker 2 started on the same name while the client is frozen;
    then the client sees its connection die. Returns (outcome, b1, b2)."""
    name = unique_name("retry")
    b1 = start_broker(policy(tmp), name=name)
    ctl_r, ctl_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(
                as_nobody,
                one_call_across_a_restart,
                name,
                str(tmp / "probe.txt"),
                str(path),
                mode,
                ctl_w,
                go_r,
            )
            if not select.select([ctl_r], [], [], 30)[0]:
                job.result()  # the child's error, if it had one
                raise AssertionError("the client never got going")
            child = int(os.read(ctl_r, 64))
            os.kill(b1.proc.pid, signal.SIGSTOP)
            os.write(go_w, b"g")
            # Sent, and now waiting for the reply (or, failing a way to see that, a pause).
            if _WAITING_SYSCALLS:
                assert wait_for(lambda: _blocked_waiting(child), 10)
            else:
                time.sleep(1)
            os.kill(child, signal.SIGSTOP)
            try:
                os.kill(b1.proc.pid, signal.SIGKILL)
                b1.proc.wait(10)
                b2 = start_broker(policy(tmp), name=name)
            finally:
                os.kill(child, signal.SIGCONT)
            result = job.result()
    finally:
        for fd in (ctl_r, ctl_w, go_r, go_w):
            os.close(fd)
    return result, b1, b2


def test_create_is_not_retried_after_the_broker_died(start_broker, tmp: Path) -> None:
    target = tmp / "w" / "new.txt"
    result, b1, b2 = call_across_restart(start_broker, tmp, target, "w")
    assert result.startswith("BrokerUnavailable"), result
    assert not target.exists(), "the create was silently retried"
    time.sleep(1.0)  # give broker 2's audit writer time to show a retry, if any
    assert not [r for r in audit_records(b2) if r["path"] == str(target)]
    assert not [r for r in audit_records(b1) if r["path"] == str(target)]
    broker_healthy(b2)


def test_read_is_retried_once_after_the_broker_died(start_broker, tmp: Path) -> None:
    probe = tmp / "probe.txt"
    result, _, b2 = call_across_restart(start_broker, tmp, probe, "r")
    assert result == "opened", result
    recs = audit_records(b2, lambda rs: len(rs) >= 1)
    assert [r["path"] for r in recs] == [str(probe)], "one record per call"
    broker_healthy(b2)


def test_truncate_on_existing_file_is_not_retried(start_broker, tmp: Path) -> None:
    target = tmp / "w" / "keep.txt"
    target.write_text("keep me\n")
    result, _, b2 = call_across_restart(start_broker, tmp, target, "w")
    assert result.startswith("BrokerUnavailable"), result
    assert target.read_text() == "keep me\n", "the truncate was silently retried"
    broker_healthy(b2)


# ------------------------------------------------------------- clients that die


def send_and_die(name: str, path: str, n: int) -> int:
    """As nobody: n children each connect, send a request for 250 fds, and _exit."""
    req = proto.encode_request(
        proto.OpenRequest(1, tuple(proto.OpenItem(path, Access.READ) for _ in range(250)))
    )
    kids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(unix.abstract_address(name))
                s.send(req)
                if i % 2:
                    time.sleep(0.01 * (i % 7))  # sometimes after the broker started on it
            finally:
                os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    return n


def test_clients_that_die_mid_request_leak_nothing(start_broker, tmp: Path) -> None:
    b = start_broker(policy(tmp))
    probe = str(tmp / "probe.txt")
    with Raw(b.name) as raw:
        for fd in raw.open([(probe, Access.READ)])[1]:
            os.close(fd)
    baseline = stable_fd_count(b.proc.pid)
    with Prober(b.name, probe, b"probe\n") as prober:
        assert as_nobody(send_and_die, b.name, probe, 40) == 40
        # and with the broker frozen, so all of them are dead before it looks
        with stopped(b.proc.pid):
            assert as_nobody(send_and_die, b.name, probe, 40) == 40
    prober.check()
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)


# ----------------------------------------------------------------- full backlog


def test_full_backlog_bounds_every_call(start_broker, tmp: Path) -> None:
    """connect() to a listener whose backlog is full would block forever: the
    client's timeout bounds it (and pytest-timeout would catch a hang)."""
    b = start_broker(policy(tmp))
    probe = str(tmp / "probe.txt")
    fillers = []
    try:
        with stopped(b.proc.pid):
            for _ in range(4096):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.setblocking(False)
                try:
                    s.connect(unix.abstract_address(b.name))
                except BlockingIOError:
                    s.close()
                    break
                fillers.append(s)
            assert len(fillers) < 4096, "the backlog never filled"
            start = time.monotonic()
            with pytest.raises(BrokerUnavailable) as info:
                Client(b.name, timeout=1).open_fd(probe)
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - start < 30  # bounded, not a hang (no timing claim)
    finally:
        for s in fillers:
            s.close()
    with Client(b.name, timeout=10) as c:
        assert wait_for(lambda: _opens(c, probe), 10)
    broker_healthy(b)


def _opens(c: Client, path: str) -> bool:
    try:
        os.close(c.open_fd(path))
    except BrokerUnavailable:
        return False
    return True
