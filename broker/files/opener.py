"""The only code that touches the filesystem as root: resolve, check, open.

How it works. The policy judges each request twice: first on the path the
client named, before any syscall, so a denied request never touches the
filesystem. Then openat2(2) resolves the path to an O_PATH fd (no side
effects: no FIFO or device is really opened), with RESOLVE_NO_MAGICLINKS, and
RESOLVE_NO_SYMLINKS unless the rule follows symlinks. Every later check is
made on that fd, never on a path: fstat gives type and link count, fstatfs
refuses procfs, readlink of /proc/self/fd/N gives the real path, which the
policy judges with the real type. Only then is the file opened, by reopening
/proc/self/fd/N: the very inode checked (a last fstat confirms it). A missing
file that may be created is created in its parent, resolved and judged the
same way, with O_CREAT|O_EXCL and RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS on the
parent's fd, so a symlink planted at the name is never followed.

Invariants kept (docs/security.md):
1. nothing is opened unless decide() allowed the named path, then the real
   path with the real type (and its hard links, if it has any);
2. no symlink unless the rule follows them, never a magic link, never a file
   on procfs; `..` and other second spellings are refused by check_path;
3. the flags come from the access words alone, always O_CLOEXEC|O_NOCTTY; a
   created file gets the rule's mode exactly, whatever the umask, and the
   client's uid and gid;
5. every fd opened here is closed on every path but success; the caller owns that one;
6. no open blocks: non-directories are opened O_NONBLOCK (a FIFO with no
   writer, a serial line waiting for carrier, a file under a lease would hang
   the broker), and the flag is cleared before the fd is handed out. What
   O_NONBLOCK cannot cover, `inline=True` detects before it happens: a path
   not all in the dentry cache (RESOLVE_CACHED fails with EAGAIN), a file on a
   filesystem that is not local (NFS, FUSE, ...), or a device node, whose
   driver may sleep in open. Then open() raises WouldBlock, having opened
   nothing, and the server runs the request again on a worker thread;
9. a failure (a kernel error, or a denial on the real path) below a
   directory the client could not search itself is one EACCES that names
   nothing: `_unseen` walks the path again, step by step on fds, judging
   each directory with the client's uid and groups (visible.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from privbroker.protocol import Access, OpenItem, Result, check_path

from ..policy.decision import Decision, FileType, Subject
from ..policy.opens import (
    WRITABLE_MEANS,
    WRITES,
    created_needs,
    named_needs,
    request_error,
    type_error,
)
from . import openat2 as o2
from . import visible
from .fastpath import fast_answer
from .openat2 import OpenerUnavailable as OpenerUnavailable  # re-exported: part of the API
from .openflags import O_BASE, effective_access, open_flags
from .steps import (
    _CHANGED,
    _IN_PARENT,
    _O_RESOLVE,
    _PLANTED,
    _REASONS,
    _THROUGH_SYMLINK,
    _UNSEEN,
    MAX_TRIES,
    Opened,
    WouldBlock,
    _denial,
    _Fail,
    _real_path,
    _resolve,
    _unlink_if_same,
)
from .visible import Seen

DecideFn = Callable[[str, Access, FileType | None], Decision]


# openat2 answers EAGAIN when a rename or mount moved during the walk, and a
# create can lose to a concurrent creator. A few retries absorb honest races;
# an attacker renaming in a loop gets EAGAIN, never a wrong file.
class Opener:
    """Opens files for clients, as root, when the policy allows them."""

    def __init__(self) -> None:
        """Probe openat2 once: a broker that cannot open safely never starts.

        Raises:
            OpenerUnavailable: openat2 is missing (ENOSYS) or blocked (EPERM,
                seccomp), or /proc/self/fd is unusable.
        """
        o2.probe()
        self.mounts = o2.MountTable()

    def _local(self, fd: int, access: Access) -> None:
        """Inline: before the first call that reaches the file's filesystem
        (fstat, fstatfs: a hung NFS or FUSE server answers neither), make
        sure it is a local one, learned from the VFS alone. Truncating (a
        large file takes long to free) and writing on overlayfs (a copy-up of
        the whole file) are slow even there: those go to a worker too."""
        if not self.mounts.is_local(fd):
            raise WouldBlock("the file is not on a filesystem known to be local")
        if Access.TRUNCATE in access or (access & WRITES and self.mounts.is_overlay(fd)):
            raise WouldBlock("truncation or an overlayfs copy-up may take long")

    def open(
        self,
        decide: DecideFn,
        item: OpenItem,
        uid: int,
        gid: int,
        *,
        inline: bool = False,
        who: Subject | None = None,
    ) -> Opened:
        """Open item.path for item.access if decide() allows it at every step.

        Args:
            decide: the policy, bound to the client: (path, access, type).
            item: the request; item.access alone chooses the open flags.
            uid, gid: the owner of a file this call creates.
            inline: the caller is the event loop: stop (WouldBlock) before
                any step that might block, rather than take it.
            who: the client, whose search permissions decide what a failure
                may tell (invariant 9); without it, uid and gid alone, taken
                as a partial group list.

        Returns:
            An Opened: with an fd the caller owns, or with fd -1 and a Result
            carrying the errno (EACCES and denied=True for a policy denial).
            Expected failures never raise.

        Raises:
            WouldBlock: only when inline; nothing is left open.
        """
        fds: list[int] = []
        if who is None:
            who = Subject(uid, gid, frozenset({gid}), groups_complete=False)
        try:
            return self._open(decide, item, uid, gid, fds, inline, who)
        except _Fail as fail:
            return Opened(-1, fail.result)
        except OSError as exc:
            code = exc.errno or errno.EIO
            return Opened(-1, Result(code, False, _REASONS.get(code) or os.strerror(code)))
        finally:
            for fd in fds:  # on success the fd handed out is no longer here
                os.close(fd)

    def _open(
        self,
        decide: DecideFn,
        item: OpenItem,
        uid: int,
        gid: int,
        fds: list[int],
        inline: bool,
        who: Subject,
    ) -> Opened:
        access = item.access
        try:
            check_path(item.path)
        except ValueError as exc:
            raise _Fail(errno.EINVAL, str(exc)) from None
        bad = request_error(access, item.exclusive)
        if bad is not None:
            raise _Fail(errno.EINVAL, bad)
        # Without truncate when the open may create: a new file needs none (policy/opens.py).
        d0 = decide(item.path, named_needs(access), None)
        if not d0.allowed:
            raise _Fail(errno.EACCES, d0.reason, d0.rule, denied=True)
        strict = o2.RESOLVE_NO_MAGICLINKS | o2.RESOLVE_NO_SYMLINKS
        cached = o2.RESOLVE_CACHED if inline else 0
        if d0.follow_symlinks and self._symlink_on(item.path, strict | cached, fds):
            # Resolved as root through a symlink the client may have planted:
            # every failure looks the same, or the errors (ENOENT, ENOTDIR, ...)
            # would map, for the client, what lies where it cannot look.
            eloop = "a magic link (/proc/*/fd, /dev/fd) or too many symlinks on the path"
            try:
                return self._resolve_and_open(
                    decide,
                    item,
                    o2.RESOLVE_NO_MAGICLINKS | cached,
                    eloop,
                    uid,
                    gid,
                    fds,
                    inline,
                    Seen(),
                )
            except (_Fail, OSError):
                raise _Fail(errno.EACCES, _THROUGH_SYMLINK, denied=True) from None
        eloop = f"symlink on the path and rule {d0.rule!r} does not follow symlinks"
        seen = Seen()
        try:
            return self._resolve_and_open(
                decide, item, strict | cached, eloop, uid, gid, fds, inline, seen
            )
        except (_Fail, OSError) as exc:
            self._unseen(exc, item.path, who, seen, eloop, inline)
            raise

    def _unseen(
        self, exc: _Fail | OSError, path: str, who: Subject, seen: Seen, eloop: str, inline: bool
    ) -> None:
        """Raise what the client may be told instead of `exc` (visible.verdict), if not it."""
        code = exc.result.errno if isinstance(exc, _Fail) else (exc.errno or errno.EIO)
        local = (lambda fd: self._local(fd, Access.NONE)) if inline else (lambda fd: None)
        try:
            instead = visible.verdict(code, path, who, seen, cached=inline, local=local)
        except BlockingIOError:  # only when inline (RESOLVE_CACHED)
            raise WouldBlock(f"{path} is not all in the dentry cache") from None
        if instead == errno.EACCES:
            raise _Fail(errno.EACCES, _UNSEEN, denied=True) from None
        if instead == errno.EAGAIN:
            raise _Fail(errno.EAGAIN, _CHANGED) from None
        if instead is not None:
            reason = eloop if instead == errno.ELOOP else _REASONS.get(instead)
            raise _Fail(instead, reason or os.strerror(instead)) from None

    def _symlink_on(self, path: str, resolve: int, fds: list[int]) -> bool:
        """Whether resolving `path` meets a symlink (before any missing part)."""
        try:
            _resolve(o2.AT_FDCWD, path, _O_RESOLVE, resolve, "", fds)
        except _Fail as fail:
            return fail.result.errno == errno.ELOOP
        except OSError:
            return False  # missing or not a directory before any symlink: say so
        return False

    def _resolve_and_open(
        self,
        decide: DecideFn,
        item: OpenItem,
        lookup: int,
        eloop: str,
        uid: int,
        gid: int,
        fds: list[int],
        inline: bool,
        seen: Seen,
    ) -> Opened:
        access = item.access
        for _ in range(MAX_TRIES):
            seen.at(None)
            if not item.exclusive:  # for exclusive, O_EXCL alone says whether it exists
                try:
                    pathfd = _resolve(o2.AT_FDCWD, item.path, _O_RESOLVE, lookup, eloop, fds)
                except FileNotFoundError:
                    if Access.CREATE not in access:
                        raise
                else:
                    return self._open_existing(decide, item, pathfd, fds, inline, seen)
            opened = self._create(decide, item, lookup, eloop, uid, gid, fds, inline, seen)
            if opened is not None:
                return opened
        raise _Fail(errno.EAGAIN, "the file kept being created and removed; try again")

    def _open_existing(
        self,
        decide: DecideFn,
        item: OpenItem,
        pathfd: int,
        fds: list[int],
        inline: bool,
        seen: Seen,
    ) -> Opened:
        access = item.access
        if inline:
            self._local(pathfd, access)
        st = os.fstat(pathfd)
        seen.at(item.path, st)
        real = _real_path(pathfd)
        ftype = FileType.from_mode(st.st_mode)
        if inline and ftype in (FileType.CHAR, FileType.BLOCK):
            raise WouldBlock("a device's open may sleep in its driver")
        if ftype is None:  # unreachable: O_PATH without O_NOFOLLOW never stops at one
            raise _Fail(errno.ELOOP, "the path names a symlink")
        if st.st_nlink == 0:  # unlinked meanwhile: its name no longer says what it is
            raise _Fail(errno.EAGAIN, "the file was removed while it was opened; try again")
        effective = effective_access(access, ftype, pathfd)
        d1 = decide(real, effective, ftype)
        if not d1.allowed and effective != access and real == item.path:
            raise _Fail(errno.EACCES, f"{WRITABLE_MEANS} {d1.reason}", d1.rule, denied=True)
        if not d1.allowed:
            raise _denial(d1, real, item.path)
        if real != item.path and named_needs(access) != access:
            # The named path was judged without truncate (a create might have
            # followed); the file exists, so judge the name for all it asked.
            d2 = decide(item.path, access, None)
            if not d2.allowed:
                raise _Fail(errno.EACCES, d2.reason, d2.rule, denied=True)
        # Directories always have several links; another hard-linked name may
        # be an attacker's second name for a file the policy never meant.
        if ftype is not FileType.DIR and st.st_nlink > 1 and not d1.hardlinks:
            n, rule = st.st_nlink, d1.rule
            reason = f"file has {n} hard links; rule {rule!r} does not allow hard-linked files"
            raise _Fail(errno.EACCES, reason, rule, denied=True)
        refused = type_error(access, ftype)
        if refused is not None:  # a directory for writing, a socket
            raise _Fail(*refused)
        if ftype is FileType.DIR:
            flags = os.O_RDONLY | os.O_DIRECTORY | O_BASE
        else:
            flags = open_flags(access) | os.O_NONBLOCK
        try:  # the O_PATH reopen idiom: this magic link is the checked inode itself
            fd = os.open(f"/proc/self/fd/{pathfd}", flags)
        except OSError as exc:
            if exc.errno == errno.ENXIO and ftype is FileType.FIFO:
                raise _Fail(errno.ENXIO, "the FIFO has no reader") from None
            raise
        fds.append(fd)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise _Fail(errno.EAGAIN, "the file changed while it was opened; try again")
        if flags & os.O_NONBLOCK:
            # F_SETFL sets only O_APPEND, O_NONBLOCK, O_ASYNC, O_DIRECT and
            # O_NOATIME: this keeps our O_APPEND and clears O_NONBLOCK in one call.
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & os.O_APPEND)
        if Access.TRUNCATE in access and ftype is FileType.FILE:
            os.ftruncate(fd, 0)  # only now: after the last check and a good open
        fds.remove(fd)
        fast = fast_answer(item, real, ftype, effective, d1)
        return Opened(fd, Result(rule=d1.rule), real, ftype, fast=fast)

    def _create(
        self,
        decide: DecideFn,
        item: OpenItem,
        resolve: int,
        eloop: str,
        uid: int,
        gid: int,
        fds: list[int],
        inline: bool,
        seen: Seen,
    ) -> Opened | None:
        """Create item.path; None when someone else created it first (retry)."""
        parent, name = os.path.split(item.path)
        if not name:  # "/", exclusively: it always exists
            raise _Fail(errno.EEXIST, "file exists")
        dirfd = _resolve(o2.AT_FDCWD, parent, _O_RESOLVE | os.O_DIRECTORY, resolve, eloop, fds)
        # RESOLVE_CACHED may not go with O_CREAT; a local parent is enough.
        if inline:
            self._local(dirfd, Access.NONE)
        seen.at(parent, os.fstat(dirfd))
        target = os.path.join(_real_path(dirfd), name)
        # What the fd allows, but truncate: the client owns the new, empty file.
        d1 = decide(target, created_needs(item.access), FileType.FILE)
        if not d1.allowed:
            raise _denial(d1, target, item.path)
        flags = open_flags(item.access) | os.O_CREAT | os.O_EXCL
        try:
            # Mode 0 until fchmod: nobody but root can open it while it is root's.
            fd = _resolve(dirfd, name, flags, _IN_PARENT, _PLANTED, fds)
        except FileExistsError:
            if item.exclusive:
                raise _Fail(errno.EEXIST, "file exists") from None
            try:
                if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise _Fail(errno.ELOOP, _PLANTED) from None
            except FileNotFoundError:
                pass
            return None
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, d1.create_mode)  # after fchown, which may clear set-id bits
            real = _real_path(fd)
            if real != target:
                raise _Fail(errno.EAGAIN, "the directory moved while the file was created")
        except BaseException:
            _unlink_if_same(dirfd, name, fd)
            raise
        fds.remove(fd)
        return Opened(fd, Result(rule=d1.rule), real, FileType.FILE, created=True)
