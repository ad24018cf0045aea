"""`privopen`: open files and sockets through the broker, then exec a program that inherits them.

Like authbind or s6-fdholder-retrieve, this lets a program that knows nothing
of privbroker use files and sockets only the broker may open: privopen asks
for them, puts each fd at the number the command line names, and execs the
program.

Steps, in this order, so that nothing runs unless everything is in place:

1. The command line is checked (exit 2; privopen_args.py): fd numbers, modes,
   absolute paths, --file names, socket targets, no fd named twice, a COMMAND.
2. COMMAND is looked up on PATH as execvp would (exit 127 not found, 126 not
   executable) BEFORE the broker is asked, so a typo in the command never
   creates or truncates a --stdout file.
3. Every path, --file ones included, is opened in ONE request
   (`Client.open_many`, all or nothing); each --file is copied into a sealed
   memfd and its fd closed (privopen_files.py); then each --listen socket is
   asked for (one SOCKET request each). A denial or a failure prints
   `privopen: PATH: reason` or `privopen: SPEC: reason` (exit 1), and
   whatever was already obtained is closed.
4. The fds are placed. The client receives them with O_CLOEXEC, possibly on
   numbers another mapping wants; any such fd is first moved to a number no
   mapping wants, then `dup2` puts each at its target without O_CLOEXEC, so
   the placed fds, and only they, survive the exec. Under --systemd,
   LISTEN_FDS, LISTEN_PID (privopen's own pid, which the exec keeps) and
   LISTEN_FDNAMES are set. Each --file memfd is moved off those numbers (and
   0-2) and made inheritable; {NAME} in COMMAND's arguments and
   PRIVOPEN_FILE_NAME become its /proc/self/fd/N.
5. exec. Python ignores SIGPIPE and SIGXFSZ; a program must not inherit that,
   so both go back to SIG_DFL first. If exec itself fails, the error goes to
   privopen's original stderr (kept aside, close-on-exec), even when --stderr
   replaced fd 2.

Imports only the client package: privopen runs as the unprivileged user.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import stat
import sys
from collections.abc import Sequence

from . import netcalls, privopen_files, unix
from .api import Client
from .errors import BrokerUnavailable, PolicyDenied, PrivbrokerError
from .privopen_args import (
    MAX_FD,
    MODES,
    FileCopy,
    Invocation,
    Listen,
    Mapping,
    UsageError,
    parse,
)

__all__ = [
    "MAX_FD",
    "MODES",
    "FileCopy",
    "Invocation",
    "Listen",
    "Mapping",
    "UsageError",
    "main",
    "parse",
    "place_fds",
    "resolve",
]

EXIT_FAILED = 1  # a path was denied or failed to open, or no broker answered
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126  # as env(1) and the shells
EXIT_NOT_FOUND = 127


class CommandError(Exception):
    """COMMAND cannot be run; `status` is 126 or 127."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resolve(command: str) -> str:
    """The file to exec for `command`: itself if it has a '/', else searched on PATH.

    Like execvp: a non-executable match is passed over for a later one, and
    reported only when no match is executable. Unlike execvp, a PATH entry we
    may not search counts as "not there" (as in the shells), not as EACCES.

    Raises:
        CommandError: 127 when nothing is found, 126 when it cannot be executed.
    """
    if "/" in command:
        try:
            st = os.stat(command)
        except OSError as exc:
            missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            status = EXIT_NOT_FOUND if missing else EXIT_NOT_EXECUTABLE
            raise CommandError(status, f"{command}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise CommandError(EXIT_NOT_EXECUTABLE, f"{command}: {os.strerror(errno.EISDIR)}")
        if not os.access(command, os.X_OK):
            raise CommandError(EXIT_NOT_EXECUTABLE, f"{command}: {os.strerror(errno.EACCES)}")
        return command
    not_executable = None
    for directory in os.get_exec_path():
        candidate = os.path.join(directory, command)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if os.access(candidate, os.X_OK):
            return candidate
        not_executable = not_executable or candidate
    if not_executable:
        raise CommandError(EXIT_NOT_EXECUTABLE, f"{not_executable}: {os.strerror(errno.EACCES)}")
    raise CommandError(EXIT_NOT_FOUND, f"{command}: command not found")


def _dup_avoiding(fd: int, avoid: set[int]) -> int:
    """A close-on-exec duplicate of `fd` on a number not in `avoid`."""
    held: list[int] = []
    try:
        # F_DUPFD takes the lowest free number: when that is one we must keep
        # free, hold it and ask again; at most len(avoid) + 1 tries.
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        while new in avoid:
            held.append(new)
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        return new
    finally:
        for h in held:
            os.close(h)


def place_fds(placement: dict[int, int]) -> None:
    """Make each target fd (key) a duplicate of its source fd (value), inheritable.

    The sources are consumed: closed once placed, or on any error. A source
    sitting on some target number is moved off first, so no dup2 overwrites
    an fd that is still to be placed. Targets already open (stdin, say) are
    replaced, as a shell redirection replaces them.
    """
    targets = set(placement)
    sources = dict(placement)
    try:
        for target, src in sources.items():
            if src in targets:
                sources[target] = _dup_avoiding(src, targets)
                os.close(src)
        for target, src in sources.items():
            os.dup2(src, target, inheritable=True)
    finally:
        # Every source is ours: received and not yet placed, or a moved copy
        # (none sits on a target once the first loop is done).
        for src in sources.values():
            os.close(src)


def _say(fd: int, text: str) -> None:
    """Write one `privopen: ...` line to fd; a closed stderr must not turn into a traceback."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, f"privopen: {text}\n".encode("utf-8", "backslashreplace"))


def _open_all(inv: Invocation) -> tuple[dict[int, int], dict[str, int]]:
    """{target fd: received fd} for every path and socket, {NAME: memfd} for every --file.

    The paths are opened in one request, the sockets asked for one by one.
    All or nothing: on any error every fd already received or made is
    closed, and what Client.open_many, privopen_files.sealed_copy or
    Client.bind_privileged raises is raised.
    """
    with Client(socket=inv.socket, timeout=inv.timeout) as client:
        # The audit names the command these fds are for (declared by us: the
        # kernel sees only this interpreter until the exec).
        client.declare(shutil.which(inv.command[0]) or inv.command[0])
        requests = [(m.path, m.mode) for m in inv.mappings]
        fds = client.open_many(requests + [(f.path, "r") for f in inv.files])
        placement = {m.fd: fd for m, fd in zip(inv.mappings, fds, strict=False)}
        received = fds[len(requests) :]
        copies: dict[str, int] = {}
        try:
            for copy, fd in zip(inv.files, received, strict=True):
                copies[copy.name] = privopen_files.sealed_copy(fd, copy.path, copy.name)
            unix.close_fds(received)
            received = []
            for listen in inv.listens:
                sock = client._new_socket(netcalls.target_call(listen.target), inv.timeout)
                placement[listen.fd] = sock.detach()
        except BaseException:
            unix.close_fds([*placement.values(), *received, *copies.values()])
            raise
        return placement, copies


def _systemd_environment(listens: Sequence[Listen]) -> None:
    """LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES for the program (sd_listen_fds(3)).

    LISTEN_PID is this process's pid, which the exec keeps: the program checks
    it to know the sockets are meant for it and not for a child of its own.
    """
    os.environ["LISTEN_FDS"] = str(len(listens))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = ":".join(listen.name for listen in listens)


def _describe(exc: Exception) -> tuple[int, str]:
    """(exit status, message) for an error of the open step: the one error boundary."""
    if isinstance(exc, PolicyDenied):
        # The broker's reason often names the rule already; say it once.
        rule = f" (rule {exc.rule!r})" if exc.rule and exc.rule not in exc.reason else ""
        return EXIT_FAILED, f"{exc.filename}: {exc.reason}{rule}"
    if isinstance(exc, BrokerUnavailable | PrivbrokerError):
        return EXIT_FAILED, str(getattr(exc, "strerror", None) or exc)
    if isinstance(exc, ValueError):  # an invalid path, socket name: nothing was sent
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_FAILED, f"{where}{exc.strerror or exc}"
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run privopen; return an exit status (when COMMAND runs, this never returns)."""
    try:
        inv = parse(sys.argv[1:] if argv is None else argv)
        exe = resolve(inv.command[0])
    except SystemExit as exc:  # argparse: --help, or its own usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        _say(2, f"{exc} (see privopen --help)")
        return EXIT_USAGE
    except CommandError as exc:
        _say(2, str(exc))
        return exc.status
    try:
        placement, copies = _open_all(inv)
    except (ValueError, OSError, PrivbrokerError) as exc:
        status, message = _describe(exc)
        _say(2, message)
        return status
    try:
        err = _dup_avoiding(2, set(placement))
    except OSError:
        err = -1  # privopen was started without a stderr: nowhere to report to
    command = list(inv.command)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    try:
        # Off the targets first: place_fds would dup2 over a memfd sitting on one.
        held = privopen_files.hand_over(copies, set(placement), _dup_avoiding)
        paths = {name: privopen_files.proc_path(fd) for name, fd in held.items()}
        os.environ.update(privopen_files.environment(paths))
        command[1:] = privopen_files.substitute(command[1:], paths)
        place_fds(placement)
        if inv.systemd:
            _systemd_environment(inv.listens)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(exe, command)
    except OSError as exc:
        _say(err, f"{inv.command[0]}: {exc.strerror}")
        return EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
    finally:
        if err >= 0:
            os.close(err)
    raise AssertionError("unreachable: execv returned")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
