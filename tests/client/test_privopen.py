"""privopen end to end: real programs run as nobody with fds only the broker could open.

Each case forks, drops to nobody (65534) in the child and calls
`client.privopen.main` there, which execs the program: /usr/bin/cat, grep,
/bin/sh, or Debian's /usr/bin/python3 (our own interpreter lives under /root,
which nobody cannot enter). The child's stdout and stderr are pipes set up
before the fork. The files are root-only (0600) in a directory everyone may
search, so nobody fails on them because of the files' own mode alone.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from privbroker import privopen
from tests.support.privs import NOBODY, NOGROUP, run_as

SECRET = "alpha\nsshd: accepted key\nbravo\nsshd: session closed\n"
SECRET2 = "second secret\n"
DEBIAN_PYTHON = "/usr/bin/python3"


@dataclass
class Ran:
    status: int  # exit status, or -N for a signal
    out: str
    err: str


def privopen_as(argv: list[str], uid: int = NOBODY, gid: int = NOGROUP) -> Ran:
    """Run privopen.main(argv) in a child dropped to uid/gid; what it (or its exec) did."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 70
        try:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
            # pytest's capture objects do not write to fds 1 and 2.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.chdir("/")
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ["PATH"] = "/usr/bin:/bin"
            status = privopen.main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + 30
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    os.close(out_r)
    os.close(err_r)
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    return Ran(code, b"".join(chunks[out_r]).decode(), b"".join(chunks[err_r]).decode())


def root_only(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory everyone may search (tmp_path's parents are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="privopen-test-"))
    d.chmod(0o755)
    (d / "markers").mkdir()
    (d / "markers").chmod(0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@dataclass
class Setup:
    dir: Path
    secret: Path
    secret2: Path
    log: Path
    out: Path
    denied: Path
    socket: str

    def run(self, *argv: str) -> Ran:
        return privopen_as(["--socket", self.socket, *argv])


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_APPEND_FL = 0x80086601, 0x40086602, 0x20


def set_append_only(path: Path, on: bool) -> None:
    """chattr +a / -a: only on an append-only file can an fd be kept to appends."""
    import array
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        flags[0] = flags[0] | FS_APPEND_FL if on else flags[0] & ~FS_APPEND_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    finally:
        os.close(fd)


@pytest.fixture
def setup(public: Path, start_broker) -> Iterator[Setup]:
    d = public
    s = Setup(
        dir=d,
        secret=root_only(d / "secret.txt", SECRET),
        secret2=root_only(d / "secret2.txt", SECRET2),
        log=root_only(d / "app.log", "line 0\n"),
        out=root_only(d / "out.txt", "old contents\n"),
        denied=root_only(d / "denied.txt", "never\n"),
        socket="",
    )
    broker = start_broker(f"""
        version = 1
        [[allow]]
        name = "nobody reads the secrets"
        users = [{NOBODY}]
        paths = ["{d}/secret*.txt"]
        access = ["read"]

        [[allow]]
        name = "nobody appends to the log"
        users = [{NOBODY}]
        paths = ["{d}/app.log"]
        access = ["append", "create"]

        [[allow]]
        name = "nobody rewrites out.txt"
        users = [{NOBODY}]
        paths = ["{d}/out.txt"]
        access = ["write", "create", "truncate"]
    """)
    s.socket = broker.name
    set_append_only(s.log, True)
    try:
        yield s
    finally:
        set_append_only(s.log, False)


def nobody_can_open(path: Path) -> bool:
    def attempt() -> bool:
        try:
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            return False
        return True

    return bool(run_as(NOBODY, NOGROUP, attempt))


# ----------------------------------------------------------- real programs


def test_stdin_feeds_grep_a_file_nobody_cannot_read(setup: Setup) -> None:
    assert not nobody_can_open(setup.secret)
    ran = setup.run("--stdin", str(setup.secret), "--", "grep", "sshd")
    assert (ran.status, ran.err) == (0, "")
    assert ran.out == "sshd: accepted key\nsshd: session closed\n"


def test_fd_3_read_by_a_shell(setup: Setup) -> None:
    ran = setup.run("--fd", f"3={setup.secret}", "--", "/bin/sh", "-c", "cat <&3")
    assert (ran.status, ran.out, ran.err) == (0, SECRET, "")


def test_a_python_script_reads_its_fds(setup: Setup) -> None:
    script = setup.dir / "reader.py"
    script.write_text(
        textwrap.dedent("""\
            import sys
            with open(3) as f:
                print(repr(f.read()))
            print(repr(sys.stdin.read()))
            """)
    )
    script.chmod(0o644)
    ran = setup.run(
        "--fd", f"3={setup.secret}", "--stdin", str(setup.secret2),
        "--", DEBIAN_PYTHON, "-I", str(script),
    )  # fmt: skip
    assert (ran.status, ran.err) == (0, "")
    assert ran.out == f"{SECRET!r}\n{SECRET2!r}\n"


def test_stdout_append_mode_appends(setup: Setup) -> None:
    for word in ("one", "two"):
        ran = setup.run("--stdout", f"{setup.log}:a", "--", "echo", word)
        assert (ran.status, ran.out, ran.err) == (0, "", "")
    assert setup.log.read_text() == "line 0\none\ntwo\n"
    st = setup.log.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_stderr_append(setup: Setup) -> None:
    ran = setup.run("--stderr", f"{setup.log}:a", "--", "/bin/sh", "-c", "echo oops >&2")
    assert (ran.status, ran.err) == (0, "")
    assert setup.log.read_text() == "line 0\noops\n"


def test_stdout_defaults_to_w_which_truncates(setup: Setup) -> None:
    ran = setup.run("--stdout", str(setup.out), "--", "echo", "new")
    assert (ran.status, ran.err) == (0, "")
    assert setup.out.read_text() == "new\n"


def test_append_rule_needs_an_append_only_file(setup: Setup) -> None:
    # Without chattr +a a client could clear O_APPEND (fcntl) and ftruncate: an
    # append-only grant is then not enough, and the reason says why.
    set_append_only(setup.log, False)
    ran = setup.run("--stdout", f"{setup.log}:a", "--", "echo", "more")
    assert ran.status == 1 and "append-only" in ran.err
    assert setup.log.read_text() == "line 0\n"


def test_stdout_default_w_needs_truncate_in_the_policy(setup: Setup) -> None:
    # The log's rule grants append only: plain --stdout (mode w) is refused.
    ran = setup.run("--stdout", str(setup.log), "--", "echo", "clobber")
    assert ran.status == 1
    assert ran.err.startswith(f"privopen: {setup.log}: ")
    assert setup.log.read_text() == "line 0\n"


# ------------------------------------------------- fds survive the exec


def test_placed_fds_are_inherited_across_two_execs(setup: Setup) -> None:
    # sh execs readlink: the fds crossed two execs, so neither has O_CLOEXEC.
    ran = setup.run(
        "--fd", f"3={setup.secret}", "--fd", f"7={setup.secret2}", "--stdin", str(setup.secret),
        "--", "/bin/sh", "-c", "exec readlink /proc/self/fd/3 /proc/self/fd/7 /proc/self/fd/0",
    )  # fmt: skip
    assert (ran.status, ran.err) == (0, "")
    assert ran.out.split() == [str(setup.secret), str(setup.secret2), str(setup.secret)]


def test_sigpipe_is_not_ignored_in_the_program(setup: Setup) -> None:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's, inherited by fork
    ran = setup.run("--fd", f"3={setup.secret}", "--", "grep", "SigIgn", "/proc/self/status")
    assert ran.status == 0, ran.err
    ignored = int(ran.out.split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), sig.name


def test_reopening_dev_fd_fails_for_a_root_only_file(setup: Setup) -> None:
    """Why privopen's help says: read the fd, never open /dev/fd/N."""
    read_fd = setup.run("--fd", f"3={setup.secret}", "--", "/bin/sh", "-c", "cat <&3")
    assert (read_fd.status, read_fd.out) == (0, SECRET)
    for name in ("/dev/fd/3", "/proc/self/fd/3"):
        reopen = setup.run("--fd", f"3={setup.secret}", "--", "cat", name)
        assert reopen.status == 1
        assert reopen.out == ""
        assert "Permission denied" in reopen.err


# ------------------------------------------------- errors, before exec


def test_denial_prints_path_and_execs_nothing(setup: Setup) -> None:
    marker = setup.dir / "markers" / "ran"
    make_marker = ["--", "/bin/sh", "-c", f"touch {marker}"]
    ran = setup.run("--fd", f"3={setup.secret}", "--fd", f"4={setup.denied}", *make_marker)
    assert ran.status == 1
    assert ran.out == ""
    assert ran.err.startswith(f"privopen: {setup.denied}: ")
    assert ran.err.count("\n") == 1
    assert not marker.exists()
    # The control: with only allowed paths the same command does run.
    ran = setup.run("--fd", f"3={setup.secret}", *make_marker)
    assert (ran.status, ran.err) == (0, "")
    assert marker.exists()


def test_open_error_prints_strerror(setup: Setup) -> None:
    missing = setup.dir / "secret-missing.txt"
    ran = setup.run("--fd", f"3={missing}", "--", "true")
    assert (ran.status, ran.out) == (1, "")
    assert ran.err.startswith(f"privopen: {missing}: No such file or directory")
    assert ran.err.count("\n") == 1


def test_missing_command_is_127_and_nothing_is_opened(setup: Setup) -> None:
    ran = setup.run("--stdout", str(setup.out), "--", "no-such-command-xyz")
    assert ran.status == 127
    assert ran.err == "privopen: no-such-command-xyz: command not found\n"
    assert setup.out.read_text() == "old contents\n"  # mode w never reached the broker
    ran = setup.run("--stdin", str(setup.secret), "--", "/no/such/program")
    assert ran.status == 127


def test_not_executable_is_126(setup: Setup) -> None:
    plain = setup.dir / "plain.sh"
    plain.write_text("#!/bin/sh\necho hi\n")
    plain.chmod(0o644)
    for command in (str(plain), str(setup.dir)):
        ran = setup.run("--stdin", str(setup.secret), "--", command)
        assert ran.status == 126, ran
        assert ran.err.startswith(f"privopen: {command}: ")


def test_exec_failure_is_reported_on_the_original_stderr(setup: Setup) -> None:
    # Executable but no binary and no #!: found on PATH, then execve fails
    # (ENOEXEC) after fd 2 was already replaced by --stderr.
    junk = setup.dir / "junk"
    junk.write_text("not a program\n")
    junk.chmod(0o755)
    ran = setup.run("--stderr", f"{setup.log}:a", "--", str(junk))
    assert ran.status == 126
    assert ran.err == f"privopen: {junk}: Exec format error\n"
    assert setup.log.read_text() == "line 0\n"


def test_no_broker_is_exit_1(public: Path) -> None:
    ran = privopen_as(
        ["--socket", "privopen-nobody-home", "--stdin", "/etc/hostname", "--", "true"]
    )
    assert ran.status == 1
    assert ran.err.startswith("privopen: ")
    assert "@privopen-nobody-home" in ran.err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--fd", "3=/etc/hostname"],  # no command
        ["--fd", "3=/etc/hostname", "--"],
        ["--", "true"],  # nothing to open
        ["--fd", "x=/etc/hostname", "--", "true"],
        ["--fd", "-1=/etc/hostname", "--", "true"],
        ["--fd", "1024=/etc/hostname", "--", "true"],
        ["--fd", "3", "--", "true"],
        ["--fd", "3=etc/hostname", "--", "true"],  # relative
        ["--fd", "3=/etc/hostname:rw", "--", "true"],  # a mistyped mode
        ["--stdin", "/etc/hostname", "--fd", "0=/etc/hostname", "--", "true"],  # fd 0 twice
        ["--fd", "5=/etc/a", "--fd", "5=/etc/b", "--", "true"],
        ["--timeout", "0", "--stdin", "/etc/hostname", "--", "true"],
        ["--timeout", "soon", "--stdin", "/etc/hostname", "--", "true"],
        ["--fd", "3=/etc/../etc/hostname", "--", "true"],  # not normalised: the client says
        ["--bogus", "--", "true"],
    ],
)
def test_usage_errors_exit_2_without_asking_a_broker(argv: list[str]) -> None:
    # No broker listens on this name: reaching it would be exit 1, not 2.
    ran = privopen_as(["--socket", "privopen-no-broker", *argv])
    assert ran.status == 2, ran
    assert ran.out == ""
    assert ran.err.startswith(("privopen: ", "usage: privopen"))


def test_a_path_ending_in_a_mode_needs_the_mode_spelled_out() -> None:
    inv = privopen.parse(["--fd", "3=/srv/odd:r:r", "--stdout", "/srv/x:a", "--", "true"])
    assert [(m.fd, m.path, m.mode) for m in inv.mappings] == [
        (3, "/srv/odd:r", "r"),
        (1, "/srv/x", "a"),
    ]
    inv = privopen.parse(["--fd", "3=/srv/a:b", "--stdin", "/srv/y", "true", "-n"])  # no "--"
    assert [(m.fd, m.path, m.mode) for m in inv.mappings] == [
        (3, "/srv/a:b", "r"),
        (0, "/srv/y", "r"),
    ]
    assert inv.command == ("true", "-n")


def test_help_warns_against_dev_fd(capsys: pytest.CaptureFixture[str]) -> None:
    assert privopen.main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("/dev/fd/N", "/proc/self/fd/N", "--stdin", "127", "126", "PRIVBROKER_SOCKET"):
        assert needle in text


# ------------------------------------------------------- fd placement


def _open_fds() -> set[int]:
    # Not os.listdir("/proc/self/fd"): its own directory fd would be in the listing.
    found = set()
    for fd in range(256):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        found.add(fd)
    return found


def _placement_case() -> tuple[bool, bool, list[int], list[int]]:
    """In a forked child: fds sitting on each other's targets end up right, nothing leaks."""
    lowest = os.dup(0)  # the lowest free number: _dup_avoiding must step over it
    os.close(lowest)
    names = {}
    for fd, path in zip((101, 102, 103), ("status", "cmdline", "environ"), strict=True):
        tmp = os.open(f"/proc/self/{path}", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(tmp, fd, inheritable=False)  # as received: close-on-exec
        os.close(tmp)
        names[fd] = os.readlink(f"/proc/self/fd/{fd}")
    before = _open_fds()
    # 101 <- 102 and 102 <- 101 swap; `lowest` <- 103 (103 is no target).
    privopen.place_fds({101: 102, 102: 101, lowest: 103})
    after = _open_fds()
    got = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (101, 102, lowest)}
    right = got == {101: names[102], 102: names[101], lowest: names[103]}
    inheritable = all(os.get_inheritable(fd) for fd in (101, 102, lowest))
    return right, inheritable, sorted(after - before), sorted(before - after)


def test_place_fds_handles_collisions_and_leaks_nothing() -> None:
    right, inheritable, opened, closed = run_as(0, 0, _placement_case)
    assert right
    assert inheritable
    assert len(opened) == 1  # `lowest`, now a target
    assert closed == [103]  # the source that was no target
