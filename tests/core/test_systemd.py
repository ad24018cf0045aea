"""The broker under systemd: the units in deploy/, socket activation, sd_notify.

- The units pass `systemd-analyze verify` (with ExecStart pointed at a
  privbroker that exists here), and say what the issue asks of them.
- `systemd-socket-activate` stands in for systemd's socket units: a broker
  started on a passed SOCK_SEQPACKET listener serves a client as nobody; one
  passed a SOCK_STREAM listener refuses to start, and says why.
- A datagram socket the test binds stands in for systemd's NOTIFY_SOCKET: the
  broker reports READY=1 with STATUS=, RELOADING=1 with MONOTONIC_USEC= and
  READY=1 around a reload, WATCHDOG=1 when WATCHDOG_USEC asks for it, and
  STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from privbroker import Client
from tests.conftest import unique_name
from tests.support.privs import NOBODY, NOGROUP, run_as

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVICE = DEPLOY / "privbroker.service"
SOCKET_UNIT = DEPLOY / "privbroker.socket"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> every value given, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def secret_file(directory: Path, text: str = "root only\n") -> Path:
    path = directory / "secret.txt"
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    return path


def read_as_nobody(name: str, path: Path) -> str:
    def read() -> str:
        with Client(name, timeout=30) as client:
            fd = client.open_fd(path, "r")
        with open(fd) as f:
            return f.read()

    return str(run_as(NOBODY, NOGROUP, read))


def policy_text(path: Path) -> str:
    return textwrap.dedent(f"""\
        version = 1
        [[allow]]
        name = "nobody reads the secret"
        users = [{NOBODY}]
        paths = ["{path}"]
        access = ["read"]
        """)


# ------------------------------------------------------------------ units


def test_units_say_what_the_issue_asks() -> None:
    service, sock = unit_settings(SERVICE), unit_settings(SOCKET_UNIT)
    assert sock["Socket.ListenSequentialPacket"] == ["@privbroker"]
    # Clients that connect before the broker runs get SCM_CREDENTIALS only if
    # the listener has SO_PASSCRED from the start.
    assert sock["Socket.PassCredentials"] == ["yes"]
    assert service["Service.Type"] == ["notify"]
    assert "kill -HUP $MAINPID" in service["Service.ExecReload"][0]
    assert service["Service.ExecStart"][0].split()[1] == "serve"
    assert "Service.PrivateNetwork" not in service  # abstract sockets live in the netns
    families = service["Service.RestrictAddressFamilies"][0].split()
    assert families == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]  # network rules
    for key in ("NoNewPrivileges", "PrivateTmp", "LockPersonality", "MemoryDenyWriteExecute"):
        assert service[f"Service.{key}"] == ["yes"], key
    assert service["Service.ProtectSystem"] == ["strict"]
    assert "@system-service" in service["Service.SystemCallFilter"]
    caps = {c for line in service["Service.CapabilityBoundingSet"] for c in line.split()}
    assert {"CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"} <= caps
    assert {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID"} <= caps
    assert "CAP_NET_ADMIN" in caps and "CAP_SYS_ADMIN" not in caps
    assert service["Service.RuntimeDirectoryPreserve"] == ["yes"]  # lease records
    assert "setfsuid" in " ".join(service["Service.SystemCallFilter"])


def test_sysctl_snippet_admits_gid_0_alone_to_ping_sockets() -> None:
    text = (DEPLOY / "99-privbroker.conf").read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings == ["net.ipv4.ping_group_range = 0 0"]


@pytest.fixture
def units_here(tmp_path: Path) -> Path:
    """deploy/'s units in tmp_path, ExecStart running a privbroker that exists here."""
    installed = shutil.which("privbroker")
    program = installed or f"{sys.executable} -m privbroker.broker"
    text = SERVICE.read_text()
    text, n = re.subn(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={program}", text)
    assert n == 1
    (tmp_path / SERVICE.name).write_text(text)
    shutil.copy(SOCKET_UNIT, tmp_path / SOCKET_UNIT.name)
    return tmp_path


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True, text=True, timeout=60, cwd=units[0].parent,
    )  # fmt: skip


def test_systemd_analyze_verify_passes(units_here: Path) -> None:
    done = verify(units_here / SOCKET_UNIT.name, units_here / SERVICE.name)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "privbroker" not in output, output


def test_systemd_analyze_verify_would_catch_a_mistake(units_here: Path) -> None:
    # The control for the test above: this systemd does report a bad key.
    service = units_here / SERVICE.name
    service.write_text(service.read_text().replace("[Service]", "[Service]\nNoSuchKey=1", 1))
    done = verify(units_here / SOCKET_UNIT.name, service)
    assert "NoSuchKey" in done.stdout + done.stderr


# ------------------------------------------------------- socket activation


def activate(
    tmp_path: Path, name: str, policy: str, *, seqpacket: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy)
    log = tmp_path / "broker.log"
    cmd = [
        tool, *(["--seqpacket"] if seqpacket else []), "-l", f"@{name}", "--",
        sys.executable, "-m", "privbroker.broker", "serve", "--policy", str(policy_file),
        # Were the passed socket ignored, the broker would bind this name, not ours.
        "--socket", f"{name}-not-activated", "--audit", "off",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_bound(name, proc)
    except RuntimeError as exc:
        stop(proc)
        raise RuntimeError(f"{exc}\n{log.read_text()}") from None
    return proc, log


def wait_bound(name: str, proc: subprocess.Popen[bytes], seconds: float = 15) -> None:
    """Wait until @name is bound, without connecting (a connection starts the broker)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with open("/proc/net/unix") as table:
            if any(line.split()[-1] == f"@{name}" for line in list(table)[1:]):
                return
        time.sleep(0.02)
    raise RuntimeError(f"systemd-socket-activate did not bind @{name}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_activated_broker(name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Connect once (systemd-socket-activate then execs the broker) and wait until it serves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as trigger:
        trigger.connect(b"\0" + name.encode())
    deadline = time.monotonic() + 30
    while "socket-activated" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the activated broker did not start\n{log.read_text()}")
        time.sleep(0.05)


def test_socket_activated_broker_serves_nobody(tmp_path: Path) -> None:
    secret = secret_file(tmp_path)
    name = unique_name("activated")
    proc, log = activate(tmp_path, name, policy_text(secret), seqpacket=True)
    try:
        start_activated_broker(name, proc, log)
        assert read_as_nobody(name, secret) == "root only\n"
        assert proc.poll() is None
    finally:
        status = stop(proc)
    text = log.read_text()
    assert status == 0, text
    serving = [line for line in text.splitlines() if "serving" in line]
    assert len(serving) == 1, text
    assert f"@{name}" in serving[0]
    assert "not-activated" not in serving[0]


def test_the_connection_that_starts_the_broker_is_served(tmp_path: Path) -> None:
    # The point of socket activation: clients connect before the broker runs,
    # and wait in the backlog. Since Linux 6.x an accepted socket takes
    # SO_PASSCRED from the listener as it was at connect() time, before the
    # broker set it: unless the broker sets it on the accepted socket too, the
    # first request has no SCM_CREDENTIALS and is closed as a violation.
    # (systemd's PassCredentials=yes sets it on the listener early; the
    # broker must not depend on that.)
    secret = secret_file(tmp_path)
    name = unique_name("activated")
    proc, _ = activate(tmp_path, name, policy_text(secret), seqpacket=True)
    try:
        assert read_as_nobody(name, secret) == "root only\n"
    finally:
        stop(proc)


def test_socket_activation_with_a_stream_socket_is_refused(tmp_path: Path) -> None:
    name = unique_name("stream")
    proc, log = activate(tmp_path, name, policy_text(tmp_path / "x"), seqpacket=False)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trigger:
            trigger.connect(b"\0" + name.encode())
            status = proc.wait(timeout=30)
    finally:
        stop(proc)
    text = log.read_text()
    assert status == 1, text
    assert "socket activation passed no AF_UNIX SOCK_SEQPACKET listener" in text
    assert "SOCK_STREAM" in text


def test_activation_meant_for_another_process_is_ignored(
    start_broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LISTEN_PID names someone else (as after a careless fork): bind our own socket.
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    secret = secret_file(tmp_path)
    broker = start_broker(policy_text(secret))
    assert read_as_nobody(broker.name, secret) == "root only\n"


# ----------------------------------------------------------------- sd_notify


class NotifyListener:
    """Stands in for systemd: receives the broker's sd_notify datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        message = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
        self.seen.append(message)
        return message

    def until(self, key: str, timeout: float = 30) -> dict[str, str]:
        """The next message that has `key`, skipping others (watchdog pings)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message


@pytest.fixture(params=["path", "abstract"])
def notify(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifyListener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    directory = tempfile.mkdtemp(prefix="pb-notify-")  # short: sun_path holds 107 bytes
    if request.param == "path":
        address = f"{directory}/notify"
        sock.bind(address)
    else:
        address = "@" + unique_name("notify")
        sock.bind(b"\0" + address[1:].encode())
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        yield NotifyListener(sock)
    finally:
        sock.close()
        shutil.rmtree(directory)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_reloading_stopping(start_broker, notify: NotifyListener, tmp_path: Path) -> None:
    broker = start_broker(policy_text(tmp_path / "x"))
    ready = notify.next()
    assert ready["READY"] == "1"
    assert "1 rules" in ready["STATUS"]

    before = monotonic_usec()
    broker.proc.send_signal(signal.SIGHUP)
    reloading = notify.next()
    after = monotonic_usec()
    assert reloading["RELOADING"] == "1"
    # systemd needs the reload's start on CLOCK_MONOTONIC, in microseconds.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    again = notify.next()
    assert again["READY"] == "1"
    assert "STATUS" in again
    assert "refused" not in again["STATUS"]

    broker.proc.send_signal(signal.SIGTERM)
    assert notify.next() == {"STOPPING": "1"}
    assert broker.proc.wait(timeout=15) == 0
    # No WATCHDOG_USEC, no pings.
    assert [m for m in notify.seen if "WATCHDOG" in m] == []


def test_refused_reload_still_ends_in_ready(
    start_broker, notify: NotifyListener, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    broker = start_broker(policy_text(secret))
    assert notify.next()["READY"] == "1"
    broker.policy.write_text("version = 1\n[[allow]]\nname = 'broken'\n")
    broker.proc.send_signal(signal.SIGHUP)
    assert notify.next()["RELOADING"] == "1"
    again = notify.next()
    assert again["READY"] == "1"
    assert "reload refused" in again["STATUS"]
    # The old policy keeps serving.
    assert read_as_nobody(broker.name, secret) == "root only\n"


def test_watchdog_pings(
    start_broker, notify: NotifyListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    broker = start_broker(policy_text(tmp_path / "x"))
    assert notify.next()["READY"] == "1"
    for _ in range(3):
        assert notify.next() == {"WATCHDOG": "1"}
    broker.proc.send_signal(signal.SIGTERM)
    assert notify.until("STOPPING") == {"STOPPING": "1"}
    assert broker.proc.wait(timeout=15) == 0


def test_watchdog_waits_for_every_process(
    start_broker, notify: NotifyListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With --processes, only the first process talks to systemd, and it pings
    # only while every process's loop is turning: a stuck one starves the
    # watchdog, which then restarts the unit.
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    broker = start_broker(policy_text(tmp_path / "x"), "--processes", "2")
    assert notify.next()["READY"] == "1"
    assert notify.until("WATCHDOG") == {"WATCHDOG": "1"}  # once the other has ticked
    (child,) = [
        int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == broker.proc.pid
    ]
    os.kill(child, signal.SIGSTOP)
    try:
        time.sleep(3.5)  # the heartbeat allows 3 s
        drained = 0
        with contextlib.suppress(TimeoutError):
            while True:
                notify.next(timeout=0.05)
                drained += 1
        with pytest.raises(TimeoutError):
            notify.next(timeout=1.0)  # no ping while one process is stopped
    finally:
        os.kill(child, signal.SIGCONT)
    assert notify.until("WATCHDOG") == {"WATCHDOG": "1"}  # it ticks again: pings again
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(timeout=15) == 0
    assert sum("READY" in m for m in notify.seen) == 1  # from the first process only


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
