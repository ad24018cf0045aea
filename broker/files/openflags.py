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
from ..policy.opens import WRITES, fd_allows
from . import openat2 as o2

O_BASE = os.O_CLOEXEC | os.O_NOCTTY


def effective_access(access: Access, ftype: FileType | None, fd: int | None) -> Access:
    """What a client can really do with the fd `access` would give it (policy/opens.py
    `fd_allows`), asking the file `fd` whether it is append-only (`fd` None: a file
    about to be created, never append-only)."""
    append_only = (
        ftype is FileType.FILE and Access.APPEND in access and fd is not None and o2.append_only(fd)
    )
    return fd_allows(access, ftype, append_only)


def open_flags(access: Access) -> int:
    if access & WRITES:
        flags = os.O_RDWR if Access.READ in access else os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if Access.APPEND in access:
        flags |= os.O_APPEND
    return flags | O_BASE
