"""privopen's command line: what it says, checked before anything is asked of the broker.

`parse` returns an `Invocation` in which every fd number is final: --fd and
--stdin/--stdout/--stderr name theirs, `--listen N=SPEC` names its own, and
under --systemd the sockets take 3, 4, ... in the order given (as systemd
passes them, sd_listen_fds(3)); a --file copy gets its fd later, from
privopen_files.py. Anything wrong is a `UsageError` (exit 2, a message that
names the option, its spec and what is wrong), found before a file is opened
or a socket made: a bad fd number, NAME, mode, path (not absolute and
normalised, as the broker takes it) or socket target, an fd or NAME given
twice, N= with --systemd, no COMMAND. Nothing malformed is taken silently:
a PATH's last ':' part that looks like a mode (letters of rwax+bt, at least
one of rwax) and is not one, or is empty, is an error that says how to write
a file really named so.

A --listen SPEC is a target exactly as `privbroker explain` and the policy
read it (privbroker.protocol.targets): tcp:ADDRESS:PORT or udp:ADDRESS:PORT,
IPv6 in brackets, optionally @DEV. Its optional prefix is `N=` (digits) or
`NAME=`; a prefix never holds ':', which every target does before any '='
(a device name may hold '='), so the split is unambiguous.
"""

from __future__ import annotations

import argparse
import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass

from .netcalls import target_call
from .protocol import check_path
from .protocol.targets import SocketTarget, parse_socket_target

# fds past 1023 do not fit select()'s FD_SETSIZE, and 1024 is the usual soft
# RLIMIT_NOFILE: no program that expects an inherited fd wants one up there.
MAX_FD = 1023
# The open() modes that make sense for an fd handed to another program
# ("b"/"t" are Python's business, not the kernel's).
MODES = ("r", "w", "a", "x", "r+", "w+", "a+", "x+")
# What a mistyped MODE is made of: open()'s letters. One of rwax must be in
# it, so that a path such as /srv/a:b stays a path.
MODE_LETTERS = frozenset("rwax+bt")
# A --file NAME: it becomes {NAME} in COMMAND's arguments and part of an
# environment variable's name, so a shell identifier, and short.
FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# sd_listen_fds(3): passed sockets start at fd 3 (SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3
# systemd's fdname_is_valid: at most 255 printable ASCII characters, no ':'
# (LISTEN_FDNAMES is ':'-separated); we also refuse spaces, which a shell
# user would not mean. "unknown" is what systemd names an unnamed socket.
FDNAME = re.compile(r"[!-9;-~]{1,255}")
UNNAMED = "unknown"

DESCRIPTION = """\
Open files and privileged sockets through the privbroker broker, then run
COMMAND with them as open file descriptors. COMMAND needs no privileges and
knows nothing of privbroker: it finds each file already open, and each socket
already listening (TCP) or bound (UDP), at the fd number given here. Every
path is opened in one request, all or nothing, and COMMAND runs only if every
file and socket was obtained."""

EPILOG = """\
MODE is an open() mode: r reads (default for --fd and --stdin); w writes,
creating or truncating like the shell's > (default for --stdout and --stderr);
a appends, creating like >>; x creates a file that must not exist; r+, w+,
a+ and x+ also read and write. The policy must grant every access word the
mode needs: r read; w write,create,truncate; a append,create; x write,create;
+ adds read,write. A PATH whose name ends in ':' and letters of rwax+ needs
its mode written out: /srv/odd:r:r.

SPEC (--listen) is tcp:ADDRESS:PORT or udp:ADDRESS:PORT, IPv6 in brackets
(tcp:[::]:443, udp:[fe80::1%eth0]:547), optionally @DEV to bind the socket to
a device; the policy's `sockets` rules must grant it. "[::]" accepts IPv4 too.
With N= the socket is fd N. With --systemd the sockets are fds 3, 4, ... in
the order given and COMMAND gets LISTEN_FDS, LISTEN_PID (its own pid: privopen
execs it) and LISTEN_FDNAMES (NAME= names a socket; unnamed ones are
"unknown"), as systemd's socket activation passes them, so servers that read
sd_listen_fds (gunicorn, uvicorn --fd, ...) run unchanged.

COMMAND MUST READ THE INHERITED FD ITSELF: stdin, or fd N (sh: cat <&3;
Python: open(3)). Opening /dev/fd/N, /dev/stdin or /proc/self/fd/N does NOT
work: it opens the file again by its name, with COMMAND's own permissions,
which fails for a file only the broker may open. For programs that want a
file name, use --file NAME=PATH (below), or --stdin PATH and give them "-"
(many read stdin then).

--file NAME=PATH reads PATH through the broker into a sealed in-memory file
(memfd: never on disk; no one can change it) that COMMAND inherits, and gives
COMMAND a path to it, /proc/self/fd/N, which the kernel does reopen for the
process that holds the fd: as {NAME} anywhere in COMMAND's arguments, and as
the environment variable PRIVOPEN_FILE_NAME (NAME in capitals). A child of
COMMAND that inherits the fd may use the same path; another process must use
/proc/PID/fd/N with COMMAND's pid. The copy is taken once: later changes to
PATH are not seen (restart to pick up a new key). At most 16 MiB, regular
files only; for anything bigger, or a program that reads an fd, use --fd.
NAME is a letter or _, then letters, digits or _ (at most 64).

Exit status: COMMAND's own once it runs; otherwise 1 when a path or socket
was denied or failed, or no broker answered; 2 for a usage error; 126 when
COMMAND is not executable; 127 when COMMAND is not found. Every error is
printed as "privopen: PATH: reason" (or "privopen: SPEC: reason", with the
policy rule that decided, if any) before anything is executed. COMMAND's own
exit status can be 1 or 2 too: a script that must tell them apart should look
for privopen's message.

Environment: PRIVBROKER_SOCKET names the broker's socket when --socket does
not (default: privbroker).

Examples:
  privopen --file key=/etc/ssl/private/site.key -- openssl pkey -in {key} -noout
  privopen --file key=/etc/ssl/private/site.key -- uvicorn app:app --port 8443 \\
      --ssl-keyfile {key} --ssl-certfile /etc/ssl/certs/site.pem
  privopen --stdin /var/log/secure -- grep sshd
  privopen --fd 3=/etc/app/secret.key -- sh -c 'exec app --key-fd 3'
  privopen --stdout /var/log/job.log:a -- my-nightly-job
  privopen --stdin /dev/ttyUSB0:r+ -- stty 115200
  privopen --listen 3=tcp:[::]:443 -- my-server --listen-fd 3
  privopen --systemd --listen web=tcp:0.0.0.0:80 -- gunicorn app:app"""


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


@dataclass(frozen=True)
class Mapping:
    """One fd to hand over: open `path` with `mode`, place it at `fd`."""

    fd: int
    path: str
    mode: str


@dataclass(frozen=True)
class Listen:
    """One socket to hand over: `target` (tcp or udp), placed at `fd`."""

    fd: int
    target: SocketTarget
    name: str = UNNAMED  # its LISTEN_FDNAMES entry under --systemd


@dataclass(frozen=True)
class FileCopy:
    """One file handed over by path: read `path`, copy it into a sealed memfd named `name`."""

    name: str
    path: str


@dataclass(frozen=True)
class Invocation:
    socket: str | None
    timeout: float
    mappings: tuple[Mapping, ...]
    command: tuple[str, ...]
    listens: tuple[Listen, ...] = ()
    systemd: bool = False
    files: tuple[FileCopy, ...] = ()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privopen",
        usage="%(prog)s [--socket NAME] [--timeout SECONDS] [--fd N=PATH[:MODE]]...\n"
        "                [--stdin PATH[:MODE]] [--stdout PATH[:MODE]] [--stderr PATH[:MODE]]\n"
        "                [--file NAME=PATH]... [--listen [N=|NAME=]SPEC]... [--systemd]\n"
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
        "--file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="copy PATH (read through the broker, at most 16 MiB) into a sealed in-memory "
        "file and give COMMAND a path to it, /proc/self/fd/N: as {NAME} in its arguments "
        "and as $PRIVOPEN_FILE_NAME; for programs that take a file name only; repeatable",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="[N=|NAME=]SPEC",
        help="a TCP socket listening on, or a UDP socket bound to, SPEC "
        "(tcp:[::]:443, udp:0.0.0.0:53), as fd N, or named NAME under --systemd; repeatable",
    )
    p.add_argument(
        "--systemd",
        action="store_true",
        help="pass the --listen sockets as systemd does: fds from 3, LISTEN_FDS, "
        "LISTEN_PID, LISTEN_FDNAMES",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARG]...",
        help="the program to run, after --, with its arguments",
    )
    return p


def _mapping(fd: int, spec: str, default_mode: str, option: str) -> Mapping:
    """PATH[:MODE] for fd; `option` (as "--fd 3=...") starts every message."""
    path, mode = spec, default_mode
    head, sep, tail = spec.rpartition(":")
    named_so = f"for a file named so, write {spec}:{default_mode}"
    if sep and tail in MODES:
        path, mode = head, tail
    elif sep and not tail:
        raise UsageError(f"{option}: nothing after the last ':' (a MODE?); {named_so}")
    elif sep and set(tail) <= MODE_LETTERS and set(tail) & set("rwax"):
        # A mistyped mode, or one of Python's ("rb", "r+b"): taking it as part
        # of the file's name would open a file nobody meant.
        kernel = tail.replace("b", "").replace("t", "")
        hint = f"; b and t are Python's, the fd is the same: write {head}:{kernel}"
        raise UsageError(
            f"{option}: {tail!r} is not a MODE (one of {', '.join(MODES)})"
            + (hint if kernel in MODES else "")
            + f"; {named_so}"
        )
    if not path:
        raise UsageError(f"{option}: no PATH")
    try:
        check_path(path)
    except ValueError as exc:  # what the client would refuse, said before anything is asked
        raise UsageError(f"{option}: {exc}") from None
    return Mapping(fd, path, mode)


def _file_copy(spec: str) -> FileCopy:
    """One --file NAME=PATH."""
    option = f"--file {spec}"
    name, eq, rest = spec.partition("=")
    if not eq:
        raise UsageError(f"{option}: expected NAME=PATH")
    if not FILE_NAME.fullmatch(name):
        raise UsageError(
            f"{option}: {name!r} is not a NAME (a letter or _, then letters, digits or _; "
            "at most 64)"
        )
    mapping = _mapping(-1, rest, "r", option)
    if mapping.mode != "r":
        raise UsageError(f"{option}: --file only reads (mode r), not {mapping.mode!r}")
    return FileCopy(name, mapping.path)


def _fd_limit() -> int:
    return min(MAX_FD, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1)


def _fd_number(text: str, option: str = "--fd") -> int:
    limit = _fd_limit()
    if not (text.isascii() and text.isdigit()) or int(text) > limit:
        raise UsageError(f"{option} {text}=...: N must be a number from 0 to {limit}")
    return int(text)


def _listen(spec: str, systemd: bool, index: int) -> Listen:
    """One --listen: its fd (N=, or its place under --systemd), target and name."""
    head, eq, rest = spec.partition("=")
    prefix, text = (head, rest) if eq and ":" not in head else (None, spec)
    try:
        target = target_call(parse_socket_target(text)).target
    except ValueError as exc:
        raise UsageError(f"--listen {spec}: {exc}") from None
    if prefix is not None and prefix.isascii() and prefix.isdigit():
        if systemd:
            raise UsageError(
                f"--listen {spec}: with --systemd the sockets are fds 3, 4, ... in order; "
                "name them with NAME= rather than N="
            )
        return Listen(_fd_number(prefix, "--listen"), target)
    if prefix is not None and not FDNAME.fullmatch(prefix):
        raise UsageError(
            f"--listen {spec}: {prefix!r} is neither an fd number nor a NAME "
            "(1-255 printable ASCII characters, no ':' or space)"
        )
    if not systemd:
        raise UsageError(
            f"--listen {spec}: give the fd, as --listen 3={text}, or use --systemd"
            + (" (NAME= names a socket for --systemd only)" if prefix is not None else "")
        )
    fd = SD_LISTEN_FDS_START + index
    if fd > _fd_limit():
        raise UsageError(f"--listen {spec}: too many sockets (fd {fd} is past the limit)")
    return Listen(fd, target, prefix or UNNAMED)


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
        mappings.append(_mapping(_fd_number(number), rest, "r", f"--fd {spec}"))
    for fd, spec, mode in ((0, args.stdin, "r"), (1, args.stdout, "w"), (2, args.stderr, "w")):
        if spec is not None:
            mappings.append(
                _mapping(fd, spec, mode, f"--{('stdin', 'stdout', 'stderr')[fd]} {spec}")
            )
    files = [_file_copy(spec) for spec in args.file]
    names: set[str] = set()
    for copy in files:
        if copy.name.upper() in names:  # one environment variable each
            raise UsageError(f"--file {copy.name}=...: NAME {copy.name!r} is given more than once")
        names.add(copy.name.upper())
    listens = [_listen(spec, args.systemd, i) for i, spec in enumerate(args.listen)]
    if args.systemd and not listens:
        raise UsageError("--systemd passes --listen sockets: give at least one --listen")
    if not mappings and not listens and not files:
        raise UsageError(
            "nothing to open: give --fd, --stdin, --stdout, --stderr, --file or --listen"
        )
    seen: set[int] = set()
    for fd in [m.fd for m in mappings] + [s.fd for s in listens]:
        if fd in seen:
            raise UsageError(f"fd {fd} is given more than once")
        seen.add(fd)
    return Invocation(
        args.socket,
        timeout,
        tuple(mappings),
        tuple(command),
        tuple(listens),
        args.systemd,
        tuple(files),
    )
