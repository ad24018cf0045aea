"""`privopen`: open files through the broker, then exec a program that inherits them.

Like authbind or s6-fdholder-retrieve, this lets a program that knows nothing
of privbroker use files only the broker may open: privopen asks for them, puts
each fd at the number the command line names, and execs the program.

Steps, in this order, so that nothing runs unless everything is in place:

1. The command line is checked (exit 2): fd numbers, modes, absolute paths,
   no fd named twice, a COMMAND.
2. COMMAND is looked up on PATH as execvp would (exit 127 not found, 126 not
   executable) BEFORE the broker is asked, so a typo in the command never
   creates or truncates a --stdout file.
3. Every path is opened in ONE request (`Client.open_many`, all or nothing);
   a denial or a failed open prints `privopen: PATH: reason` (exit 1).
4. The fds are placed. The client receives them with O_CLOEXEC, possibly on
   numbers another mapping wants; any such fd is first moved to a number no
   mapping wants, then `dup2` puts each at its target without O_CLOEXEC, so
   the placed fds, and only they, survive the exec.
5. exec. Python ignores SIGPIPE and SIGXFSZ; a program must not inherit that,
   so both go back to SIG_DFL first. If exec itself fails, the error goes to
   privopen's original stderr (kept aside, close-on-exec), even when --stderr
   replaced fd 2.

Imports only the client package: privopen runs as the unprivileged user.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import resource
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .api import Client
from .errors import BrokerUnavailable, PolicyDenied, PrivbrokerError

# fds past 1023 do not fit select()'s FD_SETSIZE, and 1024 is the usual soft
# RLIMIT_NOFILE: no program that expects an inherited fd wants one up there.
MAX_FD = 1023
# The open() modes that make sense for an fd handed to another program
# ("b"/"t" are Python's business, not the kernel's).
MODES = ("r", "w", "a", "x", "r+", "w+", "a+", "x+")

EXIT_FAILED = 1  # a path was denied or failed to open, or no broker answered
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126  # as env(1) and the shells
EXIT_NOT_FOUND = 127

DESCRIPTION = """\
Open files through the privbroker broker, then run COMMAND with them as open
file descriptors. COMMAND needs no privileges and knows nothing of privbroker:
it finds each file already open at the fd number given here. Every path is
opened in one request, all or nothing, and COMMAND runs only if all of them
were opened."""

EPILOG = """\
MODE is an open() mode: r reads (default for --fd and --stdin); w writes,
creating or truncating like the shell's > (default for --stdout and --stderr);
a appends, creating like >>; x creates a file that must not exist; r+, w+,
a+ and x+ also read and write. The policy must grant every access word the
mode needs: r read; w write,create,truncate; a append,create; x write,create;
+ adds read,write. A PATH whose name ends in ':' and letters of rwax+ needs
its mode written out: /srv/odd:r:r.

COMMAND MUST READ THE INHERITED FD ITSELF: stdin, or fd N (sh: cat <&3;
Python: open(3)). Opening /dev/fd/N, /dev/stdin or /proc/self/fd/N does NOT
work: it opens the file again by its name, with COMMAND's own permissions,
which fails for a file only the broker may open. For programs that want a
file name, use --stdin PATH and give them "-" (many read stdin then).

Exit status: COMMAND's own once it runs; otherwise 1 when a path was denied
or could not be opened, or no broker answered; 2 for a usage error; 126 when
COMMAND is not executable; 127 when COMMAND is not found. Every error is
printed as "privopen: PATH: reason" (with the policy rule that decided, if
any) before anything is executed. COMMAND's own exit status can be 1 or 2
too: a script that must tell them apart should look for privopen's message.

Environment: PRIVBROKER_SOCKET names the broker's socket when --socket does
not (default: privbroker).

Examples:
  privopen --stdin /var/log/secure -- grep sshd
  privopen --fd 3=/etc/app/secret.key -- sh -c 'exec app --key-fd 3'
  privopen --stdout /var/log/job.log:a -- my-nightly-job
  privopen --stdin /dev/ttyUSB0:r+ -- stty 115200"""


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class CommandError(Exception):
    """COMMAND cannot be run; `status` is 126 or 127."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Mapping:
    """One fd to hand over: open `path` with `mode`, place it at `fd`."""

    fd: int
    path: str
    mode: str


@dataclass(frozen=True)
class Invocation:
    socket: str | None
    timeout: float
    mappings: tuple[Mapping, ...]
    command: tuple[str, ...]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privopen",
        usage="%(prog)s [--socket NAME] [--timeout SECONDS] [--fd N=PATH[:MODE]]...\n"
        "                [--stdin PATH[:MODE]] [--stdout PATH[:MODE]] [--stderr PATH[:MODE]]\n"
        "                -- COMMAND [ARG]...",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--socket",
        metavar="NAME",
        help="the broker's abstract socket name (default $PRIVBROKER_SOCKET, else 'privbroker')",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        default="5",
        help="how long to wait for the broker (default 5)",
    )
    p.add_argument(
        "--fd",
        action="append",
        default=[],
        metavar="N=PATH[:MODE]",
        help=f"open PATH (default mode r) and give it to COMMAND as fd N "
        f"(0 to {MAX_FD}); repeatable",
    )
    p.add_argument("--stdin", metavar="PATH[:MODE]", help="same as --fd 0=PATH (mode r)")
    p.add_argument(
        "--stdout",
        metavar="PATH[:MODE]",
        help="same as --fd 1=PATH:w (truncates, like >; use PATH:a to append)",
    )
    p.add_argument("--stderr", metavar="PATH[:MODE]", help="same as --fd 2=PATH:w")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARG]...",
        help="the program to run, after --, with its arguments",
    )
    return p


def _mapping(fd: int, spec: str, default_mode: str) -> Mapping:
    path, mode = spec, default_mode
    head, sep, tail = spec.rpartition(":")
    if sep and tail in MODES:
        path, mode = head, tail
    elif sep and tail and set(tail) <= set("rwax+"):
        # Most likely a mistyped mode; a file really named so needs ":r" after it.
        raise UsageError(
            f"{spec}: {tail!r} is not a MODE (one of {', '.join(MODES)}); "
            f"for a file named so, write {spec}:{default_mode}"
        )
    if not path.startswith("/"):
        raise UsageError(f"{path or spec}: not an absolute path")
    return Mapping(fd, path, mode)


def _fd_number(text: str) -> int:
    limit = min(MAX_FD, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1)
    if not (text.isascii() and text.isdigit()) or int(text) > limit:
        raise UsageError(f"--fd {text}=...: N must be a number from 0 to {limit}")
    return int(text)


def parse(argv: Sequence[str]) -> Invocation:
    """The checked command line.

    Raises:
        UsageError: anything wrong with it.
        SystemExit: from argparse (--help, or a malformed option).
    """
    args = _parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        del command[0]
    if not command:
        raise UsageError("no COMMAND given (put it after --)")
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < float("inf"):
        raise UsageError(f"--timeout {args.timeout}: not a positive number of seconds")
    mappings: list[Mapping] = []
    for spec in args.fd:
        number, sep, rest = spec.partition("=")
        if not sep:
            raise UsageError(f"--fd {spec}: expected N=PATH[:MODE]")
        mappings.append(_mapping(_fd_number(number), rest, "r"))
    for fd, spec, mode in ((0, args.stdin, "r"), (1, args.stdout, "w"), (2, args.stderr, "w")):
        if spec is not None:
            mappings.append(_mapping(fd, spec, mode))
    if not mappings:
        raise UsageError("nothing to open: give --fd, --stdin, --stdout or --stderr")
    seen: set[int] = set()
    for m in mappings:
        if m.fd in seen:
            raise UsageError(f"fd {m.fd} is given more than once")
        seen.add(m.fd)
    return Invocation(args.socket, timeout, tuple(mappings), tuple(command))


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


def _open_all(inv: Invocation) -> list[int]:
    """Open every mapping's path in one request. Raises what Client.open_many raises."""
    with Client(socket=inv.socket, timeout=inv.timeout) as client:
        return client.open_many([(m.path, m.mode) for m in inv.mappings])


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
        fds = _open_all(inv)
    except (ValueError, OSError, PrivbrokerError) as exc:
        status, message = _describe(exc)
        _say(2, message)
        return status
    targets = {m.fd for m in inv.mappings}
    try:
        err = _dup_avoiding(2, targets)
    except OSError:
        err = -1  # privopen was started without a stderr: nowhere to report to
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    try:
        place_fds({m.fd: fd for m, fd in zip(inv.mappings, fds, strict=True)})
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(exe, inv.command)
    except OSError as exc:
        _say(err, f"{inv.command[0]}: {exc.strerror}")
        return EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
    finally:
        if err >= 0:
            os.close(err)
    raise AssertionError("unreachable: execv returned")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
