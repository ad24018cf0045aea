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


class IdsLost(BaseException):
    """This thread's own filesystem ids could not be set back after it acted
    as a client (net/sockets.py, net/_fastsock.c): whatever it made next would
    be made with the client's. Not an Exception, so no handler that serves
    one request catches it: the broker stops, and its supervisor starts it
    again with a clean process."""
