"""`privbroker demo`: a broker, a root-only file, and a client as nobody reading it.

Starts a real broker (the installed package's, as `privbroker serve` would) in
a child process on a private abstract name with the demo policy shipped beside
this module (demo.toml), creates the files the policy talks about, then forks
a client that drops to uid 65534 (nobody) and shows, side by side, what the
builtin open() and open_privileged() do for it. Everything it created is
removed when it ends, whatever happened.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources

from privbroker import unix

DEMO_DIR = "/run/privbroker-demo"


def default_policy() -> str:
    """The demo policy shipped with the package (a file, as the broker needs)."""
    return str(resources.files(__package__ or "privbroker.broker.admin") / "demo.toml")


def _say(text: str) -> None:
    print(text, flush=True)


def _setup() -> None:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    os.makedirs(DEMO_DIR + "/inbox", mode=0o755)
    for name, text in (
        ("report.txt", "quarterly figures: all good\n"),
        ("secret.txt", "the root password is hunter2\n"),
    ):
        fd = os.open(f"{DEMO_DIR}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, text.encode())
        os.close(fd)


def _wait_for(name: str, proc: subprocess.Popen[bytes], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(unix.abstract_address(name))
            return True
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    return False


def _client(name: str) -> None:
    """Runs as nobody in a forked child."""
    from privbroker import Client, PolicyDenied

    def attempt(label: str, action) -> None:  # type: ignore[no-untyped-def]
        try:
            _say(f"  {label:<52} -> {action()}")
        except PolicyDenied as exc:
            rule = f" [rule {exc.rule!r}]" if exc.rule and exc.rule not in exc.reason else ""
            _say(f"  {label:<52} -> PolicyDenied: {exc.reason}{rule}")
        except OSError as exc:
            _say(f"  {label:<52} -> {type(exc).__name__}: {exc.strerror}")

    def read_plain() -> str:
        with open(f"{DEMO_DIR}/report.txt") as f:
            return f.read()

    _say(f"client pid {os.getpid()} as nobody (uid {os.getuid()}):")
    with Client(name) as broker:

        def read_brokered(path: str) -> str:
            with broker.open(path) as f:
                return repr(f.read())

        def write_brokered() -> str:
            with broker.open(f"{DEMO_DIR}/inbox/note.txt", "w") as f:
                f.write("hello from nobody\n")
            st = os.stat(f"{DEMO_DIR}/inbox/note.txt")
            return f"wrote it; owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o}"

        attempt("open('report.txt')", read_plain)
        attempt("open_privileged('report.txt')", lambda: read_brokered(f"{DEMO_DIR}/report.txt"))
        attempt("open_privileged('secret.txt')", lambda: read_brokered(f"{DEMO_DIR}/secret.txt"))
        attempt("open_privileged('/etc/shadow')", lambda: read_brokered("/etc/shadow"))
        attempt("open_privileged('inbox/note.txt', 'w')", write_brokered)


def run_demo(policy: str | None = None) -> int:
    policy = policy or default_policy()
    if os.geteuid() != 0:
        print("privbroker demo: run it as root (the broker must be root)", file=sys.stderr)
        return 1
    if not os.path.exists(policy):
        print(
            f"privbroker demo: {policy}: no such file",
            file=sys.stderr,
        )
        return 1
    nobody = pwd.getpwnam("nobody")
    _setup()
    try:
        return _run(policy, nobody)
    finally:
        shutil.rmtree(DEMO_DIR, ignore_errors=True)


def _run(policy: str, nobody: pwd.struct_passwd) -> int:
    name = f"privbroker-demo-{os.getpid()}"
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", prefix="privbroker-audit-") as audit:
        cmd = [
            sys.executable,
            "-m",
            "privbroker.broker",
            "serve",
            "--policy",
            policy,
            "--socket",
            name,
            "--audit",
            audit.name,
            "--log-level",
            "warning",
        ]
        _say(f"$ privbroker {' '.join(cmd[3:])}")
        proc = subprocess.Popen(cmd)
        try:
            if not _wait_for(name, proc):
                print("privbroker demo: the broker did not start", file=sys.stderr)
                return 1
            _say(f"broker pid {proc.pid} (uid 0) serving {policy} on @{name}")
            _say(f"{DEMO_DIR}/report.txt and secret.txt are root:root mode 0600\n")
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.setgroups([])
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                    _client(name)
                except BaseException as exc:
                    print(f"demo client failed: {exc!r}", file=sys.stderr)
                    code = 1
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        records = [line for line in audit.read().splitlines() if line.strip()]
        _say(f"\naudit log: {len(records)} records, e.g.\n  {records[-1] if records else '-'}")
    return 0 if os.waitstatus_to_exitcode(status) == 0 else 1
