"""A FUSE filesystem that answers late: every request waits until `release()`.

Like tests/stallfs.py (a real FUSE mount, no libfuse), but it does answer in
the end: LOOKUP/GETATTR/STATFS/OPEN/READ/FLUSH/RELEASE for a flat directory
whose every name is a small regular file. A broker worker stuck in it can
thus finish AFTER the broker gave up on the request (ETIMEDOUT), with a real
fd in its hands, which the broker must then close.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_IN = struct.Struct("IIQQIIIHH")
_OUT = struct.Struct("IiQ")
_INIT_OUT = struct.Struct("IIIIHHI")
# fuse_attr: ino size blocks atime mtime ctime atimens mtimens ctimens mode nlink uid gid
# rdev blksize flags
_ATTR = struct.Struct("QQQQQQIIIIIIIIII")
_ENTRY = struct.Struct("QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
_ATTR_OUT = struct.Struct("QII")  # attr_valid attr_valid_nsec dummy
_OPEN_OUT = struct.Struct("QII")  # fh open_flags padding
_STATFS = struct.Struct("QQQQQIIII6I")
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH, INIT = 1, 2, 3, 14, 15, 17, 18, 25, 26
INTERRUPT, BATCH_FORGET, DESTROY = 36, 42, 38
FUSE_SUPER_MAGIC = 0x65735546
CONTENT = b"late file\n"


class LateFS:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.released = threading.Event()
        self.queue: list[bytes] = []
        self.lock = threading.Lock()
        self.names: dict[int, str] = {}
        self.seen = 0

    def release(self) -> None:
        with self.lock:
            self.released.set()
            queued, self.queue = self.queue, []
        for data in queued:
            self._answer(data)

    def serve(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 17)
            except OSError:
                return
            if len(data) < _IN.size:
                continue
            opcode = _IN.unpack_from(data)[1]
            if opcode == INIT:
                self._answer(data)
                continue
            with self.lock:
                self.seen += 1
                if not self.released.is_set():
                    self.queue.append(data)
                    continue
            self._answer(data)

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, _OUT.pack(_OUT.size + len(body), -error, unique) + body)

    def _attr(self, node: int) -> bytes:
        if node == 1:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o644, len(CONTENT), 1
        return _ATTR.pack(node, size, 1, 0, 0, 0, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def _answer(self, data: bytes) -> None:
        _, opcode, unique, node, *_ = _IN.unpack_from(data)
        body = data[_IN.size :]
        if opcode == INIT:
            self._reply(unique, _INIT_OUT.pack(7, 22, 0, 0, 16, 12, 4096))
        elif opcode == LOOKUP:
            name = body.split(b"\0", 1)[0].decode()
            ino = 2 + len(self.names)
            self.names[ino] = name
            self._reply(unique, _ENTRY.pack(ino, 1, 0, 0, 0, 0) + self._attr(ino))
        elif opcode == GETATTR:
            self._reply(unique, _ATTR_OUT.pack(0, 0, 0) + self._attr(node))
        elif opcode == OPEN:
            self._reply(unique, _OPEN_OUT.pack(node, 0, 0))
        elif opcode == READ:
            offset, size = struct.unpack_from("QQI", body)[1:3] if len(body) >= 20 else (0, 0)
            self._reply(unique, CONTENT[offset : offset + size])
        elif opcode == STATFS:
            self._reply(unique, _STATFS.pack(1, 0, 0, 10, 0, 4096, 255, 4096, 0, *[0] * 6))
        elif opcode in (RELEASE, FLUSH):
            self._reply(unique)
        elif opcode in (FORGET, BATCH_FORGET, INTERRUPT, DESTROY):
            return
        else:
            self._reply(unique, error=errno.ENOSYS)


def available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


@contextlib.contextmanager
def late_mount(mountpoint: Path) -> Iterator[LateFS]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if _libc.mount(b"latefs", os.fsencode(mountpoint), b"fuse", 0, opts) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount fuse: {os.strerror(err)}")
    fs = LateFS(fd)
    thread = threading.Thread(target=fs.serve, daemon=True)
    thread.start()
    try:
        yield fs
    finally:
        fs.release()
        _libc.umount2(os.fsencode(mountpoint), 2)  # MNT_DETACH
        os.close(fd)  # aborts the connection: anything still blocked returns
        thread.join(timeout=5)
