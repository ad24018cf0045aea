"""privopen --file: root-only files handed by path, through sealed memfds, to programs as nobody.

The command line and privopen_files.py's pieces are tested directly (no
broker). Then, against a real broker: privopen runs as nobody in a forked
child (`privopen_as`, as in test_privopen.py), and the program reads the
copy through {NAME} and $PRIVOPEN_FILE_NAME; and openssl, a program that
takes a key by name only, reads a root-only key as nobody, with privopen
run the way a user runs it: the installed `privopen` script of the
session's venv of Debian's python3 (tests/support/venv.py), started as
uid 65534.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privbroker import privopen, privopen_files
from privbroker.privopen import FileCopy, UsageError
from tests.client.test_privopen import privopen_as, root_only
from tests.support.privs import NOBODY, NOGROUP

SECRET = "-----BEGIN SECRET-----\nonly root may read this\n"
OPENSSL = shutil.which("openssl", path="/usr/bin:/bin")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as nobody")


def parse(*argv: str) -> privopen.Invocation:
    return privopen.parse([*argv, "--", "true"])


# ------------------------------------------------------------ command line


def test_file_specs_parse() -> None:
    inv = parse("--file", "key=/etc/ssl/k:1.pem", "--file", "_Cert2=/srv/c=d:r")
    assert inv.files == (FileCopy("key", "/etc/ssl/k:1.pem"), FileCopy("_Cert2", "/srv/c=d"))
    assert inv.mappings == ()  # --file alone is something to open


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("/etc/ssl/k", "expected NAME=PATH"),
        ("=/etc/ssl/k", "'' is not a NAME"),
        ("1key=/etc/ssl/k", "'1key' is not a NAME"),
        ("my-key=/etc/ssl/k", "'my-key' is not a NAME"),
        ("k" * 65 + "=/etc/ssl/k", "is not a NAME"),
        ("key=", "no PATH"),
        ("key=etc/ssl/k", "path is not absolute"),
        ("key=/etc/../ssl/k", "not normalised"),
        ("key=/etc/ssl/k:w", "--file only reads (mode r), not 'w'"),
        ("key=/etc/ssl/k:rb", "b and t are Python's, the fd is the same: write /etc/ssl/k:r"),
        ("key=/etc/ssl/k:", "nothing after the last ':'"),
    ],
)
def test_malformed_file_specs_are_usage_errors(spec: str, words: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(f"--file {spec}: ")) as info:
        parse("--file", spec)
    assert words in str(info.value)


def test_a_name_twice_is_an_error_in_any_case() -> None:
    # Each NAME is one environment variable, PRIVOPEN_FILE_<NAME in capitals>.
    with pytest.raises(UsageError, match="NAME 'KEY' is given more than once"):
        parse("--file", "key=/a", "--file", "KEY=/b")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--fd", "3=/dev/ttyUSB0:r+b"], "'r+b' is not a MODE"),
        (["--fd", "3=/dev/ttyUSB0:r+b"], "write /dev/ttyUSB0:r+"),
        (["--stdout", "/var/log/x:wb"], "--stdout /var/log/x:wb: 'wb' is not a MODE"),
        (["--stdin", "/srv/in:rt"], "write /srv/in:r;"),
        (["--fd", "3=/srv/odd:tab"], "for a file named so, write /srv/odd:tab:r"),
        (["--fd", "3=/srv/x:"], "--fd 3=/srv/x:: nothing after the last ':'"),
        (["--fd", "3="], "--fd 3=: no PATH"),
        (["--fd", "3=:r"], "--fd 3=:r: no PATH"),
        (["--stdin", "relative"], "--stdin relative: path is not absolute"),
        (["--fd", "3=/srv//x"], "not normalised"),
        (["--fd", "3=/srv/x\0"], "NUL"),
        (["--fd", "3=/srv/x:rw+"], "'rw+' is not a MODE"),
    ],
)
def test_malformed_fd_specs_say_what_is_wrong(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("/srv/a:b", "/srv/a:b"),
        ("/srv/x:1", "/srv/x:1"),
        ("/srv/t:bt", "/srv/t:bt"),
        ("/srv/x:r:r", "/srv/x:r"),
        ("/srv/x::r", "/srv/x:"),
        ("/srv/odd:tab:r", "/srv/odd:tab"),
    ],
)
def test_a_colon_part_that_is_no_mode_stays_in_the_path(spec: str, path: str) -> None:
    (m,) = parse("--fd", f"3={spec}").mappings
    assert (m.path, m.mode) == (path, "r")


def test_malformed_file_spec_exits_2_asking_no_broker() -> None:
    ran = privopen_as(["--socket", "privopen-no-broker", "--file", "key=/k:rb", "--", "true"])
    assert (ran.status, ran.out) == (2, "")
    assert ran.err.startswith("privopen: --file key=/k:rb: 'rb' is not a MODE"), ran.err
    assert ran.err.endswith("(see privopen --help)\n")


def test_help_documents_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert privopen.main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--file NAME=PATH", "{NAME}", "PRIVOPEN_FILE_NAME", "16 MiB", "memfd"):
        assert needle in text


# ------------------------------------------------------ privopen_files.py


def test_substitute_replaces_only_declared_placeholders() -> None:
    paths = {"key": "/proc/self/fd/5", "a.b": "/proc/self/fd/6"}
    args = ["-in", "{key}", "--key={key},{key}", "{}", "{other}", "{{key}}", "{a.b}", "{aXb}"]
    assert privopen_files.substitute(args, paths) == [
        "-in",
        "/proc/self/fd/5",
        "--key=/proc/self/fd/5,/proc/self/fd/5",
        "{}",
        "{other}",
        "{/proc/self/fd/5}",
        "/proc/self/fd/6",
        "{aXb}",  # a NAME is matched literally, not as a pattern
    ]
    assert privopen_files.substitute(["{key}"], {}) == ["{key}"]


def test_environment_names() -> None:
    env = privopen_files.environment({"key": "/proc/self/fd/5", "Tls_2": "/proc/self/fd/6"})
    assert env == {"PRIVOPEN_FILE_KEY": "/proc/self/fd/5", "PRIVOPEN_FILE_TLS_2": "/proc/self/fd/6"}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[int, str]]:
    path = tmp_path / "secret"
    path.write_text(SECRET)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd, str(path)
    finally:
        os.close(fd)


def test_sealed_copy_is_an_unwritable_in_memory_copy(source: tuple[int, str]) -> None:
    fd, path = source
    memfd = privopen_files.sealed_copy(fd, path, "key")
    try:
        assert os.readlink(f"/proc/self/fd/{memfd}") == "/memfd:privopen:key (deleted)"
        assert not os.get_inheritable(memfd)
        assert os.lseek(memfd, 0, os.SEEK_CUR) == 0
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        for seal in ("SEAL", "SHRINK", "GROW", "WRITE"):
            assert seals & getattr(fcntl, f"F_SEAL_{seal}"), seal
        with open(f"/proc/self/fd/{memfd}") as reopened:  # what the program does
            assert reopened.read() == SECRET
        with pytest.raises(PermissionError):
            os.write(memfd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 0)
        with pytest.raises(PermissionError):
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: seals are final
    finally:
        os.close(memfd)


def test_sealed_copy_refuses_a_file_past_the_limit(
    source: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = source
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(privopen_files, "MAX_FILE_BYTES", len(SECRET) - 1)
    with pytest.raises(OSError, match="larger than 0 MiB, the most --file copies") as info:
        privopen_files.sealed_copy(fd, path, "key")
    assert (info.value.errno, info.value.filename) == (errno.EFBIG, path)
    # A regular file whose size says 0 (as a growing file's might): noticed while reading.
    status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError, match="larger than") as info:
            privopen_files.sealed_copy(status, "/proc/self/status", "key")
    finally:
        os.close(status)
    assert (info.value.errno, info.value.filename) == (errno.EFBIG, "/proc/self/status")
    assert set(os.listdir("/proc/self/fd")) == before  # no memfd left behind


def test_sealed_copy_refuses_what_is_not_a_regular_file() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="not a regular file") as info:
            privopen_files.sealed_copy(r, "/run/fifo", "key")
        assert (info.value.errno, info.value.filename) == (errno.EINVAL, "/run/fifo")
    finally:
        os.close(r)
        os.close(w)


def test_hand_over_moves_memfds_off_wanted_numbers_and_makes_them_inheritable(
    source: tuple[int, str],
) -> None:
    fd, path = source
    a = privopen_files.sealed_copy(fd, path, "a")
    b = privopen_files.sealed_copy(fd, path, "b")
    held: dict[str, int] = {}
    try:
        held = privopen_files.hand_over({"a": a, "b": b}, {a}, privopen._dup_avoiding)
        assert held["b"] == b and held["a"] not in (a, 0, 1, 2)
        assert all(os.get_inheritable(n) for n in held.values())
        assert os.readlink(f"/proc/self/fd/{held['a']}") == "/memfd:privopen:a (deleted)"
        with pytest.raises(OSError):
            os.fstat(a)  # the old number was closed...
    finally:
        for n in held.values() or (a, b):
            os.close(n)


# --------------------------------------------------------- with a broker


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory everyone may search, holding root-only files."""
    d = Path(tempfile.mkdtemp(prefix="privopen-file-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def broker(public: Path, start_broker: Callable[..., Any]) -> str:
    root_only(public / "secret.txt", SECRET)
    root_only(public / "denied.txt", "no\n")
    keys = public / "keys"
    keys.mkdir(mode=0o700)
    if OPENSSL is not None:
        made = subprocess.run(
            [OPENSSL, "genpkey", "-algorithm", "ed25519", "-out", str(keys / "key.pem")],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
        os.chmod(keys / "key.pem", 0o600)
    return str(
        start_broker(f"""
            version = 1
            [[allow]]
            name = "nobody reads the secret and the key"
            users = [{NOBODY}]
            paths = ["{public}/secret.txt", "{keys}/key.pem"]
            access = ["read"]
        """).name
    )


@needs_root
def test_the_program_reads_the_copy_by_placeholder_and_by_environment(
    broker: str, public: Path
) -> None:
    script = 'cat "$PRIVOPEN_FILE_SECRET" "$1"; readlink "$PRIVOPEN_FILE_SECRET"'
    ran = privopen_as(
        [
            "--socket", broker, "--fd", f"3={public}/secret.txt",
            "--file", f"secret={public}/secret.txt",
            "--", "/bin/sh", "-c", script, "sh", "{secret}",
        ]
    )  # fmt: skip
    assert (ran.status, ran.err) == (0, ""), ran
    *text, link = ran.out.splitlines(keepends=True)
    assert "".join(text) == SECRET * 2
    assert link == "/memfd:privopen:secret (deleted)\n"  # in memory, not a file on disk


@needs_root
def test_the_copy_cannot_be_written_and_sits_above_the_placed_fds(
    broker: str, public: Path
) -> None:
    script = (
        'echo "$PRIVOPEN_FILE_S"; '
        'if echo x >> "$PRIVOPEN_FILE_S"; then echo wrote; else echo refused; fi; '
        'cat "$PRIVOPEN_FILE_S"'
    )
    ran = privopen_as(
        [
            "--socket", broker, "--stdin", f"{public}/secret.txt",
            "--file", f"s={public}/secret.txt", "--", "/bin/sh", "-c", script,
        ]
    )  # fmt: skip
    assert ran.status == 0, ran
    path, verdict, *rest = ran.out.splitlines(keepends=True)
    assert path.startswith("/proc/self/fd/") and int(path.strip().rsplit("/", 1)[1]) > 2
    assert verdict == "refused\n"  # the seal: the open for writing works, the write does not
    assert "".join(rest) == SECRET


@needs_root
def test_a_denied_file_runs_nothing(broker: str, public: Path) -> None:
    ran = privopen_as(
        [
            "--socket", broker, "--file", f"k={public}/secret.txt",
            "--file", f"d={public}/denied.txt", "--", "/bin/sh", "-c", "echo ran",
        ]
    )  # fmt: skip
    assert (ran.status, ran.out) == (1, "")
    assert ran.err.startswith(f"privopen: {public}/denied.txt: "), ran.err


@needs_root
def test_openssl_reads_a_root_only_key_as_nobody_through_privopen_file(
    broker: str, public: Path, debian_venv: Path
) -> None:
    if OPENSSL is None:
        pytest.skip("openssl is not installed (apt package openssl)")
    key = public / "keys" / "key.pem"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd), user=NOBODY, group=NOGROUP, extra_groups=[], cwd="/", env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    alone = as_nobody(OPENSSL, "pkey", "-in", str(key), "-noout")
    assert alone.returncode != 0
    assert "Permission denied" in alone.stderr, alone.stderr
    privopen_script = str(debian_venv / "bin/privopen")
    ran = as_nobody(
        privopen_script, "--socket", broker, "--file", f"key={key}",
        "--", "openssl", "pkey", "-in", "{key}", "-noout",
    )  # fmt: skip
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    # The same key, as the program saw it: openssl prints its public half.
    pub = as_nobody(
        privopen_script, "--socket", broker, "--file", f"key={key}",
        "--", "sh", "-c", 'exec openssl pkey -in "$PRIVOPEN_FILE_KEY" -pubout',
    )  # fmt: skip
    want = subprocess.run(
        [OPENSSL, "pkey", "-in", str(key), "-pubout"], capture_output=True, text=True, check=True
    )
    assert (pub.returncode, pub.stdout) == (0, want.stdout), pub.stderr
