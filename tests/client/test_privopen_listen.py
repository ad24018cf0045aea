"""privopen --listen and --systemd: privileged sockets handed to programs that know nothing
of privbroker, down to a real server nobody here wrote (gunicorn) on port 80 as nobody.

The command line is tested as a table (no broker: a usage error is exit 2 before any
request). The rest runs in a fresh network namespace with a broker started inside it
(the broker is a child of the thread that entered the namespace, so it lives there and
so does its abstract socket): privopen runs as nobody (65534) and execs Debian's
/usr/bin/python3, which every uid may execute (our own interpreter lives under /root,
which nobody cannot enter). For gunicorn, the session's venv of that interpreter
(tests/support/venv.py: gunicorn and this checkout) is used, and its `privopen` script run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privbroker import PolicyDenied, privopen
from privbroker.privopen import UsageError
from tests.client.test_privopen import DEBIAN_PYTHON, privopen_as, root_only
from tests.support.netns import fresh_netns
from tests.support.privs import NOBODY, NOGROUP, run_as

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make namespaces")
needs_debian_python = pytest.mark.skipif(
    not os.access(DEBIAN_PYTHON, os.X_OK),
    reason=f"{DEBIAN_PYTHON} (Debian's python3, executable by every uid) is not installed",
)

# ------------------------------------------------------------- the command line


def test_listen_with_n_places_the_socket_at_n() -> None:
    inv = privopen.parse(["--listen", "5=tcp:[::]:443", "--fd", "4=/srv/key", "--", "true"])
    assert [(s.fd, str(s.target)) for s in inv.listens] == [(5, "tcp:[::]:443")]
    assert [(m.fd, m.path) for m in inv.mappings] == [(4, "/srv/key")]
    assert not inv.systemd


def test_systemd_numbers_the_sockets_from_3_in_order_and_names_them() -> None:
    inv = privopen.parse(
        [
            "--systemd",
            "--listen",
            "web=tcp:0.0.0.0:80",
            "--listen",
            "udp:[::]:53",
            "--listen",
            "tls.v6=tcp:[fe80::1%eth0]:443@eth0",
            "--stdin",
            "/srv/in",
            "--",
            "server",
        ]
    )
    assert inv.systemd
    assert [(s.fd, s.name, str(s.target)) for s in inv.listens] == [
        (3, "web", "tcp:0.0.0.0:80"),
        (4, "unknown", "udp:[::]:53"),
        (5, "tls.v6", "tcp:[fe80::1%eth0]:443@eth0"),
    ]


def test_a_device_name_may_hold_an_equals_sign() -> None:
    # A prefix never holds ':', and every target has one before any '='.
    inv = privopen.parse(["--listen", "3=tcp:0.0.0.0:80@a=b", "--", "true"])
    assert (inv.listens[0].fd, inv.listens[0].target.interface) == (3, "a=b")
    inv = privopen.parse(["--systemd", "--listen", "tcp:0.0.0.0:80@a=b", "--", "true"])
    assert (inv.listens[0].name, inv.listens[0].target.interface) == ("unknown", "a=b")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--listen", "tcp:[::]:443"], "give the fd, as --listen 3=tcp:[::]:443, or use --systemd"),
        (["--listen", "web=tcp:[::]:443"], "names a socket for --systemd only"),
        (["--systemd", "--listen", "3=tcp:[::]:443"], "name them with NAME="),
        (["--systemd"], "give at least one --listen"),
        (["--systemd", "--fd", "3=/etc/hostname"], "give at least one --listen"),
        (["--listen", "3=icmp"], "only tcp and udp"),
        (["--listen", "3=raw:icmp"], "only tcp and udp"),
        (["--listen", "3=tun:vpn0"], "only tcp and udp"),
        (["--listen", "3=tcp:localhost:80"], "not an IPv4 address"),
        (["--listen", "3=tcp:0.0.0.0:0"], "outside 1-65535"),
        (["--listen", "3=tcp:0.0.0.0:65536"], "outside 1-65535"),
        (["--listen", "3=tcp:0.0.0.0"], "ADDRESS:PORT"),
        (["--listen", "3=tcp:::1:80"], "brackets"),
        (["--listen", "3=tcp:[fe80::1]:80"], "link-local"),
        (["--listen", "3=sctp:0.0.0.0:80"], "unknown socket kind"),
        (["--listen", "3="], "unknown socket kind"),
        (["--listen", "=tcp:[::]:80"], "neither an fd number nor a NAME"),
        (["--systemd", "--listen", "we b=tcp:[::]:80"], "neither an fd number nor a NAME"),
        (["--listen", "1024=tcp:[::]:80"], "N must be a number from 0 to"),
        (["--listen", "3=tcp:[::]:80", "--fd", "3=/etc/hostname"], "fd 3 is given more than once"),
        (
            ["--listen", "3=tcp:[::]:80", "--listen", "3=udp:[::]:53"],
            "fd 3 is given more than once",
        ),
        (
            ["--systemd", "--listen", "tcp:[::]:80", "--fd", "3=/etc/hostname"],
            "fd 3 is given more than once",
        ),
        (["--listen", "3=tcp:[::]:80@bad/dev"], "not valid"),
    ],
)
def test_malformed_listen_specs_are_usage_errors(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        privopen.parse([*argv, "--", "true"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "tcp:[::]:443", "--", "true"],
        ["--listen", "3=icmp", "--", "true"],
        ["--systemd", "--listen", "5=tcp:[::]:80", "--", "true"],
        ["--listen", "3=tcp:localhost:80", "--", "true"],
        ["--listen", "3=tcp:[::]:80", "--fd", "3=/etc/hostname", "--", "true"],
    ],
)
def test_malformed_specs_exit_2_with_a_message_and_ask_no_broker(argv: list[str]) -> None:
    # No broker listens on this name: reaching it would be exit 1, not 2.
    ran = privopen_as(["--socket", "privopen-no-broker", *argv])
    assert ran.status == 2, ran
    assert ran.out == ""
    assert ran.err.startswith("privopen: --listen") or "more than once" in ran.err, ran.err
    assert ran.err.endswith("(see privopen --help)\n")


def test_help_documents_listen_and_systemd(capsys: pytest.CaptureFixture[str]) -> None:
    assert privopen.main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "--listen",
        "--systemd",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "gunicorn",
    ):
        assert needle in text


# ----------------------------------------------------- a broker in a namespace

POLICY = f"""
version = 1

[[allow]]
name = "web"
users = [{NOBODY}]
sockets = ["tcp:80", "udp:53"]

[[allow]]
name = "the key"
users = [{NOBODY}]
paths = ["{{dir}}/key.txt"]
access = ["read"]
"""


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory everyone may search (tmp_path's parents are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="privopen-listen-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def broker(public: Path, start_broker: Callable[..., Any]) -> Iterator[str]:
    """A fresh namespace with a broker in it; yields the broker's socket name."""
    root_only(public / "key.txt", "the key\n")
    with fresh_netns(ping_group_range="0 0"):
        yield start_broker(POLICY.replace("{dir}", str(public))).name


N_SCRIPT = """
import json, os, socket
s = socket.socket(fileno=5)
c = socket.create_connection(("127.0.0.1", 80), timeout=5)
conn, peer = s.accept()
conn.close(); c.close()
print(json.dumps({
    "name": list(s.getsockname()[:2]),
    "type": int(s.type),
    "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "inheritable": os.get_inheritable(5),
    "owner": os.fstat(5).st_uid,
    "accepted_from": peer[0],
    "key": open(4).read(),
    "listen_fds": os.environ.get("LISTEN_FDS"),
}))
s.detach()
"""

SYSTEMD_SCRIPT = """
import json, os, socket
n = int(os.environ["LISTEN_FDS"])
socks = [socket.socket(fileno=fd) for fd in range(3, 3 + n)]
print(json.dumps({
    "fds": n,
    "pid_is_mine": os.environ["LISTEN_PID"] == str(os.getpid()),
    "names": os.environ["LISTEN_FDNAMES"],
    "socks": [[int(s.type), s.getsockname()[1]] for s in socks],
    "fd_6_open": os.path.exists("/proc/self/fd/6"),
}))
for s in socks:
    s.detach()
"""


@needs_root
@needs_debian_python
def test_listen_n_gives_the_program_fd_n_listening_beside_a_file(broker: str, public: Path) -> None:
    ran = privopen_as(
        [
            "--socket",
            broker,
            "--listen",
            "5=tcp:0.0.0.0:80",
            "--fd",
            f"4={public}/key.txt",
            "--",
            DEBIAN_PYTHON,
            "-c",
            N_SCRIPT,
        ]
    )
    assert ran.status == 0, ran
    seen = json.loads(ran.out)
    assert seen == {
        "name": ["0.0.0.0", 80],
        "type": socket.SOCK_STREAM,
        "listening": 1,
        "inheritable": True,
        "owner": NOBODY,
        "accepted_from": "127.0.0.1",
        "key": "the key\n",
        "listen_fds": None,
    }


@needs_root
@needs_debian_python
def test_systemd_sets_listen_fds_pid_and_names(broker: str) -> None:
    ran = privopen_as(
        [
            "--socket",
            broker,
            "--systemd",
            "--listen",
            "web=tcp:[::]:80",
            "--listen",
            "udp:0.0.0.0:53",
            "--",
            DEBIAN_PYTHON,
            "-c",
            SYSTEMD_SCRIPT,
        ]
    )
    assert ran.status == 0, ran
    assert json.loads(ran.out) == {
        "fds": 2,
        "pid_is_mine": True,  # privopen execs: its pid is the program's
        "names": "web:unknown",
        "socks": [[socket.SOCK_STREAM, 80], [socket.SOCK_DGRAM, 53]],
        "fd_6_open": False,
    }


@needs_root
def test_a_denied_socket_runs_nothing_and_leaves_nothing_open(broker: str, public: Path) -> None:
    ran = privopen_as(
        [
            "--socket",
            broker,
            "--fd",
            f"4={public}/key.txt",
            "--listen",
            "5=tcp:0.0.0.0:80",
            "--listen",
            "6=tcp:0.0.0.0:81",
            "--",
            "/bin/sh",
            "-c",
            "echo ran",
        ]
    )
    assert ran.status == 1, ran
    assert ran.out == ""
    assert ran.err.startswith("privopen: tcp:0.0.0.0:81: "), ran.err
    assert "81" in ran.err and "'web'" in ran.err


def _open_all_leaves_nothing(inv: privopen.Invocation) -> tuple[str, bool]:
    before = sorted(os.listdir("/proc/self/fd"))
    try:
        privopen._open_all(inv)
    except PolicyDenied as exc:
        outcome = str(exc.filename)
    else:
        outcome = "allowed"
    return outcome, sorted(os.listdir("/proc/self/fd")) == before


@needs_root
def test_what_was_obtained_before_a_denial_is_closed(broker: str, public: Path) -> None:
    argv = ["--socket", broker, "--fd", f"4={public}/key.txt", "--listen", "5=tcp:0.0.0.0:80"]
    argv += ["--listen", "6=udp:0.0.0.0:53", "--listen", "7=udp:0.0.0.0:54", "--", "true"]
    inv = privopen.parse(argv)
    assert run_as(NOBODY, NOGROUP, _open_all_leaves_nothing, inv) == ("udp:0.0.0.0:54", True)


# --------------------------------------------------------------------- gunicorn

APP = """
import os

def application(environ, start_response):
    body = f"hello from gunicorn as uid {os.getuid()} at {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def _fetch(url: str, seconds: float = 30) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return bytes(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@needs_root
def test_gunicorn_serves_port_80_as_nobody_through_privopen_systemd(
    broker: str, public: Path, debian_venv: Path
) -> None:
    (public / "app.py").write_text(textwrap.dedent(APP))
    (public / "app.py").chmod(0o644)
    log = public / "gunicorn.log"
    cmd = [
        str(debian_venv / "bin/privopen"),
        "--socket",
        broker,
        "--systemd",
        "--listen",
        "web=tcp:0.0.0.0:80",
        "--",
        str(debian_venv / "bin/python"),
        "-m",
        "gunicorn",
        "--workers",
        "1",
        "--chdir",
        str(public),
        "app:application",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    with open(log, "wb") as out:
        # Debian's python3 as nobody (exec'd after the switch): not our interpreter.
        server = subprocess.Popen(
            cmd, user=NOBODY, group=NOGROUP, extra_groups=[], cwd="/", env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        try:
            body = _fetch("http://127.0.0.1:80/privbroker")
        except OSError as exc:
            raise AssertionError(f"no page: {exc}\n{log.read_text()}") from None
        assert body == f"hello from gunicorn as uid {NOBODY} at /privbroker".encode()
        listeners = subprocess.run(["ss", "-tlne"], capture_output=True, text=True).stdout
        (line,) = [x for x in listeners.splitlines()[1:] if x.split()[3] == "0.0.0.0:80"]
        assert f"uid:{NOBODY}" in line
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.pid > 0
    assert "Listening at: http://0.0.0.0:80" in log.read_text(), log.read_text()
