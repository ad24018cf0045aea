"""openat2(2) and fstatfs(2)'s f_type through ctypes: the two calls Python lacks.

openat2 resolves a path under RESOLVE_* restrictions that the kernel enforces
on every component as it walks, which is what makes the opener's resolution
race-free (docs/security.md, invariant 2); fstatfs tells the opener which filesystem an
fd is on, so that procfs can be refused whatever the path looked like. Both
raise OSError as the os module's calls do. probe() runs once at start, so
that a broker that cannot open safely refuses to start. Nothing here decides
anything; broker/files/opener.py is the only user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import struct

from ..libc import libc

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20

AT_FDCWD = -100
# linux/magic.h: what fstatfs reports for any mount of procfs.
PROC_SUPER_MAGIC = 0x9FA0

# x86_64 numbers openat2 437 in its own table, and asm-generic (aarch64) chose
# the same. Elsewhere we would rather refuse to start than guess a number:
# a wrong syscall number could be some other call with our arguments.
_SYSCALL_NUMBERS = {"x86_64": 437, "aarch64": 437}
SYS_OPENAT2: int | None = _SYSCALL_NUMBERS.get(platform.machine())


class OpenHow(ctypes.Structure):
    """struct open_how (linux/openat2.h): its size is its version, 24 bytes."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


# A private CDLL: argtypes set here cannot clash with another module's use of
# libc.syscall (CDLL caches function objects per instance).
_libc = libc
_syscall = _libc.syscall
_syscall.argtypes = (
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
)
_syscall.restype = ctypes.c_long
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs.restype = ctypes.c_int
# struct statfs is 120 bytes on x86_64 and aarch64; f_type, a long, comes
# first on both. A larger buffer costs nothing and guards against a libc that
# pads it.
_StatfsBuf = ctypes.c_long * 32


def openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(dirfd, path, {flags, mode, resolve}): a new fd, or OSError.

    `path` is bytes (os.fsencode): ctypes would encode a str its own way.
    """
    if SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, f"openat2 has no known syscall number on {platform.machine()}")
    how = OpenHow(flags, mode, resolve)
    fd: int = _syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return fd


class OpenerUnavailable(RuntimeError):
    """The kernel does not let the broker use openat2, so it cannot open safely."""


def probe() -> None:
    """Check once, at start, that openat2 and /proc/self/fd work as the opener needs.

    Raises:
        OpenerUnavailable: openat2 is missing (ENOSYS: a kernel before 5.6 or
            an unknown architecture) or blocked (EPERM: a seccomp filter), or
            /proc/self/fd, through which the opener reopens files, is unusable.
    """
    try:
        fd = openat2(AT_FDCWD, b"/", os.O_PATH | os.O_CLOEXEC, RESOLVE_NO_SYMLINKS)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            why = "missing (ENOSYS: Linux 5.6+ on x86_64 or aarch64 is needed)"
        elif exc.errno == errno.EPERM:
            why = "blocked (EPERM: a seccomp filter forbids it)"
        else:
            why = "failing"
        raise OpenerUnavailable(
            f"openat2 is {why}: {exc.strerror}; the broker refuses to open files without it"
        ) from exc
    try:
        if not os.path.samestat(os.stat(f"/proc/self/fd/{fd}"), os.fstat(fd)):
            raise OpenerUnavailable("/proc/self/fd does not show the broker's own fds")
    except OSError as exc:
        raise OpenerUnavailable(f"/proc is not usable ({exc}); the opener needs it") from exc
    finally:
        os.close(fd)


def fs_type(fd: int) -> int:
    """The f_type of the filesystem `fd` is on (works on O_PATH fds)."""
    buf = _StatfsBuf()
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf[0])


_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_ATTR_APPEND = 0x20
_statx = _libc.statx
_statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
_statx.restype = ctypes.c_int


def append_only(fd: int) -> bool:
    """Whether the file has the append-only attribute (chattr +a), on which the
    kernel itself refuses writes elsewhere than at the end, and truncation."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, 0, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    (attributes,) = struct.unpack_from("Q", buf, 8)  # stx_attributes
    return bool(attributes & _STATX_ATTR_APPEND)


_STATX_MNT_ID = 0x1000
# Filesystems (as /proc/self/mountinfo names them) whose lookups and opens
# are served from local memory or a local disk: the broker may open on them on
# its event-loop thread. Any other (NFS, CIFS, FUSE, 9p, Ceph, an unknown one)
# may stall for as long as its server does, so opens there go to a worker
# thread with a timeout.
LOCAL_FS_NAMES = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "f2fs",
        "bcachefs",
        "zfs",
        "tmpfs",
        "devtmpfs",
        "ramfs",
        "sysfs",
        "devpts",
        "overlay",
        "squashfs",
        "iso9660",
        "vfat",
        "msdos",
        "exfat",
        "ntfs3",
        "jfs",
        "reiserfs",
        "cgroup2",
        "proc",
    }
)


# Of those, where the native fast path (broker/files/_fast.c) may open regular
# files: not procfs (refused), sysfs, devpts, cgroupfs and devtmpfs (kernel
# objects, left to the full checks), nor overlayfs (a write may copy up).
FAST_FS_NAMES = LOCAL_FS_NAMES - {"proc", "sysfs", "devpts", "cgroup2", "devtmpfs", "overlay"}


def mount_id(fd: int) -> int:
    """The mount `fd` is on, from statx with AT_STATX_DONT_SYNC: answered from
    the VFS and the inode cache, never by asking a (maybe hung) NFS or FUSE server."""
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_MNT_ID, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    (mask,) = struct.unpack_from("I", buf, 0)
    if not mask & _STATX_MNT_ID:
        return -1
    (mnt,) = struct.unpack_from("Q", buf, 144)  # stx_mnt_id
    return int(mnt)


class MountTable:
    """Mount id -> filesystem type, from /proc/self/mountinfo, read again when
    the kernel flags the table as changed (POLLPRI) or an id is unknown."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
        self._types: dict[int, str] = {}
        self.fast_ids: tuple[int, ...] = ()  # mounts on FAST_FS_NAMES filesystems
        self._load()

    def fileno(self) -> int:
        """/proc/self/mountinfo: POLLPRI when a mount came or went."""
        return self._fd

    def refresh(self) -> None:
        """Read the table again if it changed since the last read.

        The kernel reports a change (POLLPRI) once per open file: a poll that
        sees it takes it. broker/files/_fast.c polls the same file and says so
        (then the caller calls reload())."""
        if self._poll.poll(0):
            self._load()

    def reload(self) -> None:
        """Read the table again (the caller learned it changed). The pending
        change event is taken first, so that a change after this read is
        reported anew."""
        self._poll.poll(0)
        self._load()

    def _load(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        types = {}
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            head, sep, tail = line.partition(" - ")
            if sep and head and tail:
                types[int(head.split(" ", 1)[0])] = tail.split(" ", 1)[0]
        self._types = types
        self.fast_ids = tuple(m for m, fs in types.items() if fs in FAST_FS_NAMES)

    def fs_type(self, mnt: int) -> str | None:
        self.refresh()  # mounted or unmounted since the last read
        fs = self._types.get(mnt)
        if fs is None:
            self._load()
            fs = self._types.get(mnt)
        return fs

    def is_local(self, fd: int) -> bool:
        """Whether the file `fd` is on is local, learned without touching it."""
        try:
            fs = self.fs_type(mount_id(fd))
        except OSError:
            return False
        return fs in LOCAL_FS_NAMES

    def is_overlay(self, fd: int) -> bool:
        try:
            return self.fs_type(mount_id(fd)) == "overlay"
        except OSError:
            return True
