"""The broker's one handle on the C library, for the calls Python's os module lacks.

prctl and capset (admin/harden.py, core/procs.py), inotify (core/reload.py),
openat2 through syscall(2), statx and fstatfs (files/openat2.py), setfsuid
and setfsgid (net/). Loaded once, with errno kept per thread (use_errno), so
a caller reads ctypes.get_errno() right after its call or uses `check`.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> int:
    """Return `rc`, or raise the OSError for errno when `rc` is -1."""
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc
