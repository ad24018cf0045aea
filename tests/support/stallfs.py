"""A FUSE filesystem that never answers: the stalled filesystem, for real.

As root we mount "fuse" ourselves (mount(2) with an fd of /dev/fuse), answer
the kernel's FUSE_INIT, and then answer nothing else. Every lookup under the
mount point blocks in the kernel, exactly as on a hung NFS server. Closing
the /dev/fuse fd aborts the connection, and every blocked call returns
ENOTCONN, so nothing stays stuck after the test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_IN_HEADER = struct.Struct("IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
_OUT_HEADER = struct.Struct("IiQ")  # len, error, unique
_INIT_OUT = struct.Struct(
    "IIIIHHI"
)  # major, minor, max_readahead, flags, bg, congestion, max_write
FUSE_LOOKUP = 1
FUSE_INIT = 26
MNT_DETACH = 2
# fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nsecs, then
# fuse_attr: ino, size, blocks, atime, mtime, ctime, 3 nsecs, mode, nlink, uid,
# gid, rdev, blksize, padding.
_ENTRY_OUT = struct.Struct("QQQQII" + "QQQQQQ" + "III" + "IIIIIII")


def available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


def _answer(fd: int, stop: threading.Event, lookups: bool) -> None:
    while not stop.is_set():
        try:
            data = os.read(fd, 1 << 17)
        except OSError:
            return  # aborted or unmounted
        if len(data) < _IN_HEADER.size:
            continue
        _, opcode, unique, *_ = _IN_HEADER.unpack_from(data)
        if opcode == FUSE_INIT:
            body = _INIT_OUT.pack(7, 22, 0, 0, 16, 12, 4096)
        elif opcode == FUSE_LOOKUP and lookups:
            # Every name is a regular file, its dentry valid for an hour and
            # its attributes never: stat must ask, and is never answered.
            body = _ENTRY_OUT.pack(
                unique % 1_000_000 + 2, 0, 3600, 0, 0, 0,
                unique % 1_000_000 + 2, 0, 0, 0, 0, 0, 0, 0, 0,
                0o100644, 1, 0, 0, 0, 4096, 0,
            )  # fmt: skip
        else:
            continue  # never answered: the caller stays blocked
        try:
            os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique) + body)
        except OSError:
            return


@contextlib.contextmanager
def stalled_mount(mountpoint: Path, lookups: bool = False) -> Iterator[Path]:
    """Mount a never-answering FUSE filesystem at `mountpoint` for the block.

    With `lookups`, names are found (and stay cached) but their attributes
    are never given: a path walk succeeds, then stat hangs.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if _libc.mount(b"stallfs", os.fsencode(mountpoint), b"fuse", 0, opts) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount fuse: {os.strerror(err)}")
    stop = threading.Event()
    thread = threading.Thread(target=_answer, args=(fd, stop, lookups), daemon=True)
    thread.start()
    try:
        yield mountpoint
    finally:
        stop.set()
        _libc.umount2(os.fsencode(mountpoint), MNT_DETACH)
        # Closing the last /dev/fuse fd aborts the connection: every caller
        # still blocked in it returns (ENOTCONN).
        os.close(fd)
        thread.join(timeout=5)
