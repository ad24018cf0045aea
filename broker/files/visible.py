"""What a client could learn of a path with its own credentials (docs/security.md, invariant 9).

The broker resolves paths as root, so the kernel's answer (ENOENT, ENOTDIR,
ELOOP, ...) may describe a directory the client cannot search: under a 0700
directory, "missing" and "not a directory" name what is there. The opener
asks this module, after a failure, whether the client itself could have met
that failure. `walk` resolves the path again, one component at a time, each
step an openat2 of one name in the directory fd reached before it
(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, as strict as
the opener's own walk), and before each step it judges, on that fd (fstat,
and the POSIX ACL read through /proc/self/fd), whether the client may search
the directory. Nothing is judged on a string: every answer is about an inode
the walk holds (invariant 2).

The check is the kernel's generic_permission for MAY_EXEC on a directory,
without capabilities: owner class, else group class (primary and
supplementary groups; a partial group list is taken at its worst), else
other; with an ACL, its USER, GROUP and MASK entries. uid 0 is taken to
search everything (a root client normally holds CAP_DAC_READ_SEARCH). Not
modelled: LSMs (SELinux, AppArmor, Landlock), which can only refuse more,
and a client's capabilities other than root's.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..policy.decision import Subject
from . import openat2 as o2

_STEP = o2.RESOLVE_BENEATH | o2.RESOLVE_NO_SYMLINKS | o2.RESOLVE_NO_MAGICLINKS
_O_STEP = os.O_PATH | os.O_CLOEXEC
# An honest rename race during one step; past this the walk gives up (EAGAIN).
_STEP_TRIES = 8

# linux/posix_acl_xattr.h: a 4-byte version header, then 8-byte entries.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_ENTRY = struct.Struct("<HHI")  # tag, perm, id
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_EXEC = 0x1


@dataclass(frozen=True, slots=True)
class Walk:
    """Where a step-by-step walk of a path ended.

    `hidden`: it met, before stopping, a directory the client may not search
    (then nothing else is told). Otherwise `errno` is the step's error where
    it stopped (0: it reached the end) and `ident` the (st_dev, st_ino) of
    what it reached at the end.
    """

    hidden: bool
    errno: int = 0
    ident: tuple[int, int] | None = None


def _acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The directory's access ACL entries, or None when it has none (or is unreadable:
    then its mode bits are the ACL's minimal form, which is all the kernel uses too)."""
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError:
        return None
    if (
        len(raw) < 4
        or (len(raw) - 4) % _ACL_ENTRY.size
        or raw[:4] != struct.pack("<I", _ACL_VERSION)
    ):
        return None
    return list(_ACL_ENTRY.iter_unpack(raw[4:]))


def may_search(st: os.stat_result, who: Subject, acl: list[tuple[int, int, int]] | None) -> bool:
    """Whether `who` may search the directory `st` describes (MAY_EXEC, no capabilities)."""
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if acl is None:
        groups = [(st.st_gid, bool(st.st_mode & stat.S_IXGRP))]
        other = bool(st.st_mode & stat.S_IXOTH)
    else:
        mask = next((p & _EXEC for t, p, _ in acl if t == _MASK), _EXEC)
        for tag, perm, ident in acl:
            if tag == _USER and ident == who.uid:
                return bool(perm & mask)
        groups = [
            (st.st_gid if tag == _GROUP_OBJ else ident, bool(perm & mask))
            for tag, perm, ident in acl
            if tag in (_GROUP_OBJ, _GROUP)
        ]
        other = any(t == _OTHER and p & _EXEC for t, p, _ in acl)
    mine = [ok for gid, ok in groups if gid in who.groups]
    if any(mine):
        return True
    if mine:  # in a group class entry that refuses: "other" is not consulted
        return False
    # A partial group list: the client may be in any group it does not show,
    # and so be refused by any group entry that refuses.
    return other and (who.groups_complete or all(ok for _, ok in groups))


@dataclass(slots=True)
class Seen:
    """What the opener's resolution reached (a path, and the inode it holds for
    it), so that a later failure is matched with the walk that judges it."""

    path: str | None = None
    ident: tuple[int, int] | None = None

    def at(self, path: str | None, st: os.stat_result | None = None) -> None:
        self.path = path
        self.ident = None if st is None else (st.st_dev, st.st_ino)


# Failures that tell of the broker, not of the path: they stay as they are.
_BROKER_SIDE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def verdict(
    code: int, path: str, who: Subject, seen: Seen, *, cached: bool, local: Callable[[int], None]
) -> int | None:
    """What the client may be told of the opener's failure `code` on `path`.

    Returns None to report the failure as it is; EACCES (a denial) when a
    directory the client could not search lies above where the failure is;
    EAGAIN when the path changed between the opener's walk and this one;
    otherwise, when resolution itself failed, the step walk's own error (its
    every directory was judged on the way, so a swap between the two walks
    tells nothing of what the first one met).

    Raises:
        BlockingIOError: `cached` and the walk would need I/O.
    """
    if code in _BROKER_SIDE:
        return None
    w = walk(seen.path or path, who, cached=cached, local=local)
    if w.hidden:
        return errno.EACCES
    if seen.path is not None:  # failed on what the resolution reached: the same inode?
        return None if w.ident == seen.ident else errno.EAGAIN
    if w.errno == 0:  # there now: fine for "exists" (visible), else a change
        return None if code == errno.EEXIST else errno.EAGAIN
    return None if w.errno == code else w.errno


def walk(path: str, who: Subject, *, cached: bool, local: Callable[[int], None]) -> Walk:
    """Walk the normalised absolute `path` as far as it goes, judging each directory.

    Args:
        path: as check_path accepts it.
        who: the client.
        cached: add RESOLVE_CACHED (the event loop's thread); EAGAIN then
            raises BlockingIOError, for the caller to send the work to a worker.
        local: called with each directory fd before its fstat; raises to stop
            a walk that would reach a filesystem that may block.
    """
    resolve = _STEP | (o2.RESOLVE_CACHED if cached else 0)
    try:  # not BENEATH for "/" itself: an absolute path under it is EXDEV
        fd = _step(o2.AT_FDCWD, b"/", resolve & ~o2.RESOLVE_BENEATH)
    except BlockingIOError:
        if cached:
            raise
        return Walk(False, errno.EAGAIN)
    try:
        for name in path.split("/")[1:] if path != "/" else []:
            local(fd)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) and not may_search(st, who, _acl(fd)):
                return Walk(True)
            try:
                nxt = _step(fd, os.fsencode(name), resolve)
            except BlockingIOError:
                if cached:
                    raise
                return Walk(False, errno.EAGAIN)
            except OSError as exc:
                return Walk(False, exc.errno or errno.EIO)
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        return Walk(False, 0, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)


def _step(dirfd: int, name: bytes, resolve: int) -> int:
    for _ in range(_STEP_TRIES):
        try:
            return o2.openat2(dirfd, name, _O_STEP, resolve)
        except BlockingIOError:
            if resolve & o2.RESOLVE_CACHED:
                raise
    return o2.openat2(dirfd, name, _O_STEP, resolve)
