"""The opener's pieces: what an open comes to (`Opened`, `WouldBlock`, a
failure with its errno and reason), the reasons it gives, and the small
syscall steps it composes (resolve one path under a directory fd, the real
path of an fd, unlink only the file just made). Used by opener.py alone.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from privbroker.protocol import Result

from ..policy.decision import Decision, FileType
from . import openat2 as o2

MAX_TRIES = 8

# Never O_NOFOLLOW: with O_PATH it would hand back the symlink itself.
_O_RESOLVE = os.O_PATH | os.O_CLOEXEC
_IN_PARENT = o2.RESOLVE_BENEATH | o2.RESOLVE_NO_SYMLINKS | o2.RESOLVE_NO_MAGICLINKS
_PLANTED = "a symlink is at the name to create; the broker never follows it"

# Short reasons for kernel errors that reach the client as they are.
_REASONS = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENAMETOOLONG: "a path component is too long for the filesystem",
    errno.EROFS: "the file is on a read-only filesystem",
    errno.ETXTBSY: "the file is a running executable",
    errno.EAGAIN: "the file is busy (a lease, or the path changed); try again",
    errno.ENXIO: "no such device",
    errno.EMFILE: "the broker is out of file descriptors",
}


@dataclass(slots=True)
class Opened:
    """What Opener.open did: `fd` is -1 unless result.errno == 0, and then the
    caller owns it (close it after sending; set fd = -1 once closed)."""

    fd: int
    result: Result
    real_path: str | None = None
    ftype: FileType | None = None
    created: bool = False
    # (open flags, hard links allowed) when the same request would be judged
    # the same way again, by the native fast path (broker/files/_fast.c), as long as
    # it meets there a regular file at the very path: see fastpath.fast_answer.
    fast: tuple[int, bool] | None = None


class WouldBlock(Exception):
    """An inline open stopped before a step that might block; nothing was opened."""


class _Fail(Exception):
    """An expected failure, carried up to open() as its Result."""

    def __init__(self, code: int, reason: str, rule: str | None = None, denied: bool = False):
        super().__init__(reason)
        self.result = Result(code, denied, reason, rule)


_THROUGH_SYMLINK = (
    "the path leads through a symlink to something this client may not open, or to nothing"
)
_UNSEEN = (
    "the path leads below a directory this client may not search; "
    "the broker does not say what is there"
)
_CHANGED = "the path changed while it was resolved; try again"


def _denial(d: Decision, real: str, asked: str) -> _Fail:
    if real == asked:
        return _Fail(errno.EACCES, d.reason, d.rule, denied=True)
    # Reached through a symlink (or renamed meanwhile): say so, but not where.
    # The decision's reason quotes the real path, and even the deciding rule's
    # name can tell what is there, in a directory the client may not list.
    return _Fail(errno.EACCES, _THROUGH_SYMLINK, None, denied=True)


def _real_path(fd: int) -> str:
    if o2.fs_type(fd) == o2.PROC_SUPER_MAGIC:
        # /proc/self is the broker itself: its environ, its mem, its fds.
        raise _Fail(errno.EACCES, "files on procfs are never opened by the broker", denied=True)
    return os.readlink(f"/proc/self/fd/{fd}")


def _resolve(dirfd: int, path: str, flags: int, resolve: int, eloop: str, fds: list[int]) -> int:
    """openat2 with bounded EAGAIN retries; ELOOP gets `eloop` as its reason.

    With RESOLVE_CACHED in `resolve`, EAGAIN means the walk would need I/O
    (or raced a rename): WouldBlock, and the worker retries without it.
    """
    for _ in range(MAX_TRIES):
        try:
            fd = o2.openat2(dirfd, os.fsencode(path), flags, resolve)
        except BlockingIOError:
            if resolve & o2.RESOLVE_CACHED:
                raise WouldBlock(f"{path} is not all in the dentry cache") from None
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Fail(errno.ELOOP, eloop) from None
            raise
        fds.append(fd)
        return fd
    raise _Fail(errno.EAGAIN, "the path kept changing during resolution; try again")


def _unlink_if_same(dirfd: int, name: str, fd: int) -> None:
    """Best effort: remove a file we created but will not hand out."""
    try:
        if os.path.samestat(os.stat(name, dir_fd=dirfd, follow_symlinks=False), os.fstat(fd)):
            os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass
