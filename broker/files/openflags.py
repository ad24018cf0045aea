"""What an access set means at open(2): the flags, and what the fd will allow.

The broker, never the client, picks the open flags, from the access words
alone (docs/security.md, invariant 3): O_CLOEXEC and O_NOCTTY always, the access mode
from read and write/append, O_APPEND for append; never O_PATH, O_TMPFILE or
O_TRUNC (truncation happens after the last check, with ftruncate).
"""

from __future__ import annotations

import os

from privbroker.protocol import Access

from ..policy.decision import FileType
from . import openat2 as o2

WRITES = Access.WRITE | Access.APPEND
O_BASE = os.O_CLOEXEC | os.O_NOCTTY

WRITABLE_MEANS = (
    "a writable fd on a regular file can also truncate it and, unless the file is "
    "append-only (chattr +a), write anywhere in it; so the rule must grant those too:"
)


def effective_access(access: Access, ftype: FileType | None, fd: int | None) -> Access:
    """What a client can really do with the fd `access` would give it.

    The kernel lets any fd open for writing on a regular file ftruncate it, and
    lets the owner of an O_APPEND fd clear O_APPEND with fcntl, except on an
    append-only inode. So "append" without "write", or either without
    "truncate", cannot be enforced on its own: the policy is asked about what
    the fd allows (`fd` None: a file about to be created, never append-only).
    """
    if ftype is not FileType.FILE or not access & WRITES:
        return access
    if Access.APPEND in access and fd is not None and o2.append_only(fd):
        return access  # the kernel keeps appends appends, and refuses truncation
    return access | Access.WRITE | Access.TRUNCATE


def open_flags(access: Access) -> int:
    if access & WRITES:
        flags = os.O_RDWR if Access.READ in access else os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if Access.APPEND in access:
        flags |= os.O_APPEND
    return flags | O_BASE
