"""A stand-in for the policy in the opener's tests: one rule, one tree.

The opener only ever sees a DecideFn, so its tests need no policy file: a
FakePolicy allows paths under `prefix` with `access` and `types`, and records
every question it was asked (to show what the opener judged, and when it
judged nothing at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from privbroker.broker.files.opener import Opened, Opener
from privbroker.broker.policy.decision import Decision, FileType
from privbroker.protocol import Access, OpenItem

ALL_ACCESS = Access.READ | Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE
ALL_TYPES = frozenset(FileType)
RULE = "test rule"


@dataclass
class FakePolicy:
    prefix: str
    access: Access = ALL_ACCESS
    types: frozenset[FileType] = frozenset({FileType.FILE})
    follow_symlinks: bool = False
    hardlinks: bool = False
    create_mode: int = 0o600
    calls: list[tuple[str, Access, FileType | None]] = field(default_factory=list)

    def __call__(self, path: str, access: Access, ftype: FileType | None) -> Decision:
        self.calls.append((path, access, ftype))
        p = self.prefix.rstrip("/")
        if not (path == self.prefix or path.startswith(p + "/")):
            return Decision(False, None, f"no rule allows {path}")
        if access & ~self.access:
            return Decision(False, RULE, "access not granted")
        if ftype is not None and ftype not in self.types:
            return Decision(False, RULE, f"type {ftype.value} not allowed")
        return Decision(
            True, RULE, "allowed", self.follow_symlinks, self.hardlinks, self.create_mode
        )


def allow_all(follow_symlinks: bool = True) -> FakePolicy:
    """A policy that allows anything: what the opener refuses, it refuses alone."""
    return FakePolicy("/", types=ALL_TYPES, follow_symlinks=follow_symlinks, hardlinks=True)


def do_open(
    opener: Opener,
    decide: FakePolicy,
    path: str | Path,
    access: Access,
    exclusive: bool = False,
    uid: int = 0,
    gid: int = 0,
) -> Opened:
    return opener.open(decide, OpenItem(str(path), access, exclusive), uid, gid)


def close(opened: Opened) -> None:
    if opened.fd >= 0:
        os.close(opened.fd)
        opened.fd = -1
