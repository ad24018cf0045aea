"""The plain data the policy decides on and answers with. No I/O, no pydantic.

Shared by decide.py (which makes decisions), files/opener.py (which asks for them
before and after touching the filesystem) and core/ (which reports them).
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass


class FileType(enum.Enum):
    """A file's type as the policy's `types` words name it."""

    FILE = "file"
    DIR = "dir"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    @classmethod
    def from_mode(cls, mode: int) -> FileType | None:
        """The type of an st_mode; None for a symlink (never opened as such)."""
        return _BY_FMT.get(stat.S_IFMT(mode))


_BY_FMT = {
    stat.S_IFREG: FileType.FILE,
    stat.S_IFDIR: FileType.DIR,
    stat.S_IFCHR: FileType.CHAR,
    stat.S_IFBLK: FileType.BLOCK,
    stat.S_IFIFO: FileType.FIFO,
    stat.S_IFSOCK: FileType.SOCKET,
}


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks: the kernel-reported identity of a client.

    `groups` holds every gid, the primary one included. `groups_complete` is
    False when the supplementary list could not be read in full: then no allow
    rule may grant through a supplementary group, and deny rules that name
    groups are taken to match (never judge on a partial list).
    """

    uid: int
    gid: int
    groups: frozenset[int]
    groups_complete: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer to one (subject, path, access, type) question.

    `rule` is the rule that decided: the allow rule that granted, the deny
    rule that refused, or for a default denial the closest allow rule that
    concerns this subject (None when none does). `reason` is written for the
    client's developer and never names rules that do not concern the client.
    The last three fields carry the granting rule's options to the opener.
    """

    allowed: bool
    rule: str | None
    reason: str
    follow_symlinks: bool = False
    hardlinks: bool = False
    create_mode: int = 0o600
