"""privopen --file: a file the broker opened, handed to a program that wants a path.

Many servers take a key as a file NAME only (openssl, nginx, postgres,
uvicorn), and an fd's /dev/fd/N or /proc/self/fd/N does not help: for a
regular file the kernel opens it again by its name, with the program's own
permissions (by design: the fd grants nothing to an open by name). A memfd
is different: it has no name on any filesystem, so reopening
/proc/self/fd/N opens the same in-memory file, whose inode the holder's
uid owns. So privopen copies the file into one, and the program gets a
path that works for it.

How it keeps the secret:

- Rule 1 (never on disk): the bytes go from the broker's fd to the memfd
  (anonymous memory, like tmpfs: swappable like any process memory, never
  written to a filesystem) and the fd is closed.
- Rule 2 (nobody changes it): once written, the memfd is sealed against
  writes, shrinking and growing, and the seals are sealed (F_SEAL_SEAL), so
  the program reads what the broker's file held. Where the kernel has it
  (Linux 6.3+) it is also MFD_NOEXEC_SEAL: never executable.
- Rule 3 (bounded): at most MAX_FILE_BYTES, and regular files only (a
  device or FIFO could stream forever); anything else is an error before
  COMMAND runs, like a denial.
- Rule 4 (only COMMAND holds it): the memfd is close-on-exec until privopen
  makes it inheritable just before the exec, on a number that no --fd,
  --stdin.. or --listen wants and above 2.

The path is /proc/self/fd/N for the process holding fd N: COMMAND, or a
child that inherits the fd. Another process (a worker that closed its
inherited fds, a helper) needs /proc/PID/fd/N with the holder's pid, which
the kernel allows only to processes that may ptrace it (the same uid).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence

# The largest file --file copies: a key, a certificate chain, a small
# config. The copy lives in memory for COMMAND's whole life, and a file this
# big is no secret to hand over by path: give it with --fd.
MAX_FILE_BYTES = 16 * 1024 * 1024
ENV_PREFIX = "PRIVOPEN_FILE_"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_MFD_NOEXEC_SEAL = 0x0008  # Linux 6.3 (include/uapi/linux/memfd.h); not in Python 3.11's os
_CHUNK = 1 << 20


def _memfd(name: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | _MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 6.3
            raise
    return os.memfd_create(name, flags)


def sealed_copy(fd: int, path: str, name: str) -> int:
    """A sealed, close-on-exec memfd holding what `fd` (opened from `path`) reads.

    `fd` stays the caller's. The memfd's offset is 0, so a program that
    reads the inherited fd itself reads it all.

    Raises:
        OSError: with `path` as filename: not a regular file (EINVAL), larger
            than MAX_FILE_BYTES (EFBIG), or the read or memfd call failed.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(
                errno.EINVAL, "not a regular file: --file copies files only; use --fd", path
            )
        if st.st_size > MAX_FILE_BYTES:
            raise OSError(errno.EFBIG, _too_big(), path)
        memfd = _memfd(f"privopen:{name}")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        size = 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > MAX_FILE_BYTES:  # it grew while we read it
                raise OSError(errno.EFBIG, _too_big(), path)
            view = memoryview(chunk)
            while view:
                view = view[os.write(memfd, view) :]
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(memfd, 0, os.SEEK_SET)
    except OSError as exc:
        os.close(memfd)
        raise OSError(exc.errno, exc.strerror, path) from None
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def _too_big() -> str:
    mib = MAX_FILE_BYTES // (1024 * 1024)
    return f"larger than {mib} MiB, the most --file copies into memory; use --fd"


def hand_over(
    copies: Mapping[str, int], avoid: set[int], dup: Callable[[int, set[int]], int]
) -> dict[str, int]:
    """Put each memfd on a number not in `avoid` and above 2, inheritable: {name: fd}.

    `dup(fd, avoid)` is privopen's close-on-exec dup onto a number not in
    `avoid`; a memfd moved by it is closed at its old number. On an error,
    every memfd (moved or not) is closed.
    """
    avoid = avoid | {0, 1, 2}
    placed: dict[str, int] = {}
    left = dict(copies)
    try:
        for name, fd in copies.items():
            if fd in avoid:
                new = dup(fd, avoid)
                os.close(fd)
                fd = new
            del left[name]
            placed[name] = fd
            os.set_inheritable(fd, True)
    except BaseException:
        for fd in [*left.values(), *placed.values()]:
            os.close(fd)
        raise
    return placed


def proc_path(fd: int) -> str:
    """The path of inherited fd `fd` for the process holding it."""
    return f"/proc/self/fd/{fd}"


def environment(paths: Mapping[str, str]) -> dict[str, str]:
    """PRIVOPEN_FILE_<NAME in capitals> for each --file."""
    return {ENV_PREFIX + name.upper(): path for name, path in paths.items()}


def substitute(args: Sequence[str], paths: Mapping[str, str]) -> list[str]:
    """`args` with every {NAME} of a --file replaced by its path; other braces untouched."""
    if not paths:
        return list(args)
    names = "|".join(re.escape(name) for name in paths)
    placeholder = re.compile(r"\{(" + names + r")\}")
    return [placeholder.sub(lambda m: paths[m.group(1)], arg) for arg in args]
