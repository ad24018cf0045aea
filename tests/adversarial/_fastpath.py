"""Helpers for the fast-path attacks (test_fast_path*.py): a client's view of
what it was given (Got: errno, or what the fd really is, by fstat and
F_GETFL), `make_hot` (open a path until the C code serves it, seen in
`privbroker status`), and a one-rule policy.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privbroker import Client
from privbroker.protocol import Access
from tests.adversarial._util import O_PATH, TALLY, Raw, as_nobody, make_root_file
from tests.support.privs import NOBODY

R, W, A = Access.READ, Access.WRITE, Access.APPEND
HOT = 5  # opens that make a path hot: the first in Python, the rest in C
OTHER_UID = 4242  # a second client uid, for sockets that change hands


def status(b: Any) -> dict[str, Any]:
    """`privbroker status` of a running broker, asked as root."""
    with Client(b.name, timeout=15) as c:
        return c.status()


def counts(b: Any) -> tuple[int, int]:
    """(fast opens, every open judged: allowed + denied + failed) so far."""
    s = status(b)
    return s["fast_opens"], s["allowed"] + s["denied"] + s["failed"]


@dataclass(frozen=True)
class Got:
    """One item's outcome as the client saw it; for an fd, what the fd is."""

    errno: int
    denied: bool = False
    reason: str = ""
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the fd
    mode: int = 0
    flags: int = 0  # F_GETFL
    head: bytes = b""


def look(fd: int) -> Got:
    """What the fd we were given really is (and close it)."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        readable = flags & os.O_ACCMODE != os.O_WRONLY and not flags & O_PATH
        head = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) and readable else b""
        return Got(0, ident=(st.st_dev, st.st_ino), mode=st.st_mode, flags=flags, head=head)
    finally:
        os.close(fd)


def fetch_on(raw: Raw, items: list[tuple[str, Access]]) -> list[Got]:
    reply, fds = raw.open(items)
    it = iter(fds)
    return [Got(r.errno, r.denied, r.reason) if r.errno else look(next(it)) for r in reply.results]


def fetch(name: str, items: list[tuple[str, Access]], rounds: int = 1) -> list[Got]:
    """On one new connection: ask for `items`, `rounds` times; every outcome."""
    with Raw(name) as raw:
        return [g for _ in range(rounds) for g in fetch_on(raw, items)]


def nobody_fetch(b: Any, path: Path | str, access: Access = R, rounds: int = 1) -> list[Got]:
    return as_nobody(fetch, b.name, [(str(path), access)], rounds)


def make_hot(b: Any, path: Path | str, access: Access = R, times: int = HOT) -> list[Got]:
    """Open `path` as nobody until the C code serves it; its outcomes."""
    before, _ = counts(b)
    got = nobody_fetch(b, path, access, times)
    assert all(g.errno == 0 for g in got), f"the path to make hot is not served: {got}"
    gained = counts(b)[0] - before
    assert gained >= times // 2, f"only {gained} of {times} opens were fast: not hot"
    TALLY["fast path: opens made hot"] += gained
    return got


def policy(
    paths: list[str],
    access: tuple[str, ...] = ("read",),
    *,
    users: tuple[int, ...] = (NOBODY,),
    groups: tuple[int, ...] = (),
    follow: bool = False,
    hardlinks: bool = False,
    types: tuple[str, ...] = ("file",),
    name: str = "the hot rule",
) -> str:
    def arr(xs: Any) -> str:
        return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + "]"

    who = (f"users = {arr(users)}\n" if users else "") + (
        f"groups = {arr(groups)}\n" if groups else ""
    )
    return (
        textwrap.dedent(f"""
        version = 1
        [[allow]]
        name = "{name}"
        paths = {arr(paths)}
        access = {arr(access)}
        types = {arr(types)}
        follow_symlinks = {str(follow).lower()}
        hardlinks = {str(hardlinks).lower()}
        """)
        + who
    )


def make_hot_dir(tmp_path: Path) -> Path:
    """tmp_path/d with d/f, a root-only file the rule `d/*` allows (each test
    file's `hot_dir` fixture)."""
    d = tmp_path / "d"
    d.mkdir()
    make_root_file(d / "f", "the allowed file\n")
    return d


@contextlib.contextmanager
def held_open(path: Path) -> Any:
    """Keep `path`'s inode alive (its number cannot be reused) for the block."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
