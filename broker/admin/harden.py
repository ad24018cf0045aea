"""What the broker gives up right after start: stray fds, new privileges, capabilities.

Called once by `privbroker serve`, before the policy is read:
- every inherited fd but stdin/stdout/stderr and the socket-activation fds is
  closed, so no descriptor the broker's parent leaked reaches a client;
- umask 077: anything the broker writes for itself is private (files created
  for clients get the rule's mode explicitly, whatever the umask);
- PR_SET_NO_NEW_PRIVS: nothing the broker might exec can gain privileges;
and once it is loaded (`drop_to`):
- the capability bounding, permitted and effective sets are cut to what
  opening files and devices for clients needs, plus what the policy's
  network rules need (net/caps.py). Root without CAP_SYS_ADMIN, CAP_SETUID,
  CAP_NET_ADMIN, ... is still root by uid, but far less of one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading

from ..libc import libc

log = logging.getLogger("privbroker")

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

CAP_CHOWN = 0  # give a created file to the client
CAP_DAC_OVERRIDE = 1  # open files whatever their mode
CAP_DAC_READ_SEARCH = 2  # walk directories whatever their mode
CAP_FOWNER = 3  # fchmod a created file to the rule's mode once it is the client's
CAP_SYS_PTRACE = 19  # read a peer's /proc/PID/exe for the audit record; never ptrace
KEEP = frozenset({CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_SYS_PTRACE})

_libc = libc


def close_stray_fds(keep: set[int]) -> int:
    """Close every fd above 2 not in `keep`; return how many were closed."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
                closed += 1
            except OSError:
                pass  # the listing's own directory fd, already gone
    return closed


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_capabilities(keep: frozenset[int] = KEEP) -> None:
    """Cut the bounding set, then permitted/effective/inheritable, to `keep`."""
    for cap in range(_last_cap() + 1):
        if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    low = sum(1 << c for c in keep if c < 32)
    high = sum(1 << (c - 32) for c in keep if c >= 32)
    header = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    # Two __user_cap_data_struct {effective, permitted, inheritable}: caps 0-31, 32-63.
    data = ctypes.create_string_buffer(struct.pack("6I", low, low, 0, high, high, 0))
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def harden(keep_fds: set[int]) -> None:
    """The fds, the umask and no-new-privileges, before the policy is read;
    the capabilities are cut once it is loaded (`drop_to`). A failure to drop
    is logged, not fatal."""
    closed = close_stray_fds(keep_fds)
    if closed:
        log.info("closed %d inherited fds", closed)
    os.umask(0o077)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_NO_NEW_PRIVS failed: %s", os.strerror(ctypes.get_errno()))


def drop_to(extra: frozenset[int]) -> frozenset[int] | None:
    """Keep KEEP and `extra` (what the policy's families need); return what is
    held, or None when nothing was dropped (not root, or the kernel refused)."""
    if os.geteuid() != 0:
        return None
    if threading.active_count() != 1:
        # capset changes the calling thread only: the others would keep all.
        raise RuntimeError("capabilities must be dropped before any thread starts")
    try:
        drop_capabilities(KEEP | extra)
    except OSError as exc:
        log.warning("could not drop capabilities: %s", exc)
        return None
    return KEEP | extra
