"""The native fast path (broker/files/_fast.c) under attack: the hot path changes.

As in test_fast_path.py, each test first makes a path "hot" (served by the C
code, as `privbroker status` shows), then changes what is at that path: a
symlink to a root-only file, a second hard link, a FIFO, a directory, a new
file, nothing at all, or, while a client opens it thousands of times, an
attacker flipping it (or its parent directory) against a root-only secret.
What the client gets is checked against what the policy allows on the fd
itself (fstat, F_GETFL), never on a name: never the old or the secret inode,
and the C code never serves what the Python broker would refuse.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.adversarial._fastpath import (
    HOT,
    R,
    counts,
    fetch_on,
    held_open,
    make_hot,
    nobody_fetch,
    policy,
)
from tests.adversarial._util import (
    O_PATH,
    TALLY,
    Raw,
    as_nobody,
    broker_healthy,
    exchange,
    flipping,
    ident,
    make_root_file,
)
from tests.support.privs import NOBODY, NOGROUP

pytestmark = [pytest.mark.adversarial, pytest.mark.usefixtures("searchable_tmp")]


# -------------------------------------------- a symlink where the file was


@pytest.mark.parametrize("follow", [False, True], ids=["nofollow", "follow"])
@pytest.mark.parametrize("target", ["secret", "/etc/shadow"])
def test_hot_path_replaced_by_symlink(
    start_broker, tmp_path: Path, hot_dir: Path, target: str, follow: bool
) -> None:
    """The hot d/f becomes a symlink to a root-only file outside the rule: the
    C path refuses it (never counted fast) and Python denies it (ELOOP without
    follow_symlinks, EACCES with: the target is judged and not allowed)."""
    hot = hot_dir / "f"
    want = ident(hot)
    if target.startswith("/"):
        secret = Path(target)
        if not secret.is_file():
            pytest.skip(f"no {target} here")
    else:
        secret = tmp_path / target
        make_root_file(secret, "ROOT ONLY SECRET\n")
    b = start_broker(policy([f"{hot_dir}/*"], follow=follow))
    make_hot(b, hot)
    with held_open(hot):
        hot.rename(tmp_path / "old")
        hot.symlink_to(secret)
        fast0, _ = counts(b)
        got = nobody_fetch(b, hot, rounds=4)
        assert counts(b)[0] == fast0, "a symlinked path was served by the fast path"
    for g in got:
        assert g.ident is None, f"the client got an fd for a symlink to {secret}: {g}"
        if follow:
            assert (g.errno, g.denied) == (errno.EACCES, True), g
        else:
            assert g.errno == errno.ELOOP, g
    # Back as it was: served, and hot again.
    hot.unlink()
    (tmp_path / "old").rename(hot)
    assert {g.ident for g in make_hot(b, hot)} == {want}
    broker_healthy(b)


# ---------------------------------------------------- a second hard link


@pytest.mark.parametrize("hardlinks", [False, True], ids=["no-hardlinks", "hardlinks"])
def test_hot_path_gains_a_hard_link(
    start_broker, tmp_path: Path, hot_dir: Path, hardlinks: bool
) -> None:
    """A second name for the hot file: refused (EACCES, the hard-link reason)
    under a rule without `hardlinks = true`, in C and in Python alike; served,
    and still fast, under one with it."""
    hot = hot_dir / "f"
    want = ident(hot)
    b = start_broker(policy([f"{hot_dir}/*"], hardlinks=hardlinks))
    make_hot(b, hot)
    os.link(hot, tmp_path / "second-name")
    fast0, _ = counts(b)
    got = nobody_fetch(b, hot, rounds=4)
    gained = counts(b)[0] - fast0
    if hardlinks:
        assert all(g.ident == want for g in got), got
        assert gained >= 3, "a rule allowing hard links: the fast path stopped serving"
    else:
        assert gained == 0, "a hard-linked file was served by the fast path"
        for g in got:
            assert (g.errno, g.denied) == (errno.EACCES, True), g
            assert "hard link" in g.reason, g.reason
    (tmp_path / "second-name").unlink()
    assert {g.ident for g in make_hot(b, hot)} == {want}
    broker_healthy(b)


# ------------------------------------------ a FIFO, a directory, a new file


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "directory", "new-file", "unlinked"])
def test_hot_path_replaced(start_broker, tmp_path: Path, hot_dir: Path, kind: str) -> None:
    """The hot d/f is replaced. A FIFO with no writer, or a directory: denied
    (the rule allows files), and the broker does not hang on the FIFO. A new
    regular file renamed over it: the NEW inode (the old one is still alive,
    so its number cannot be reused), fast again after one open. Unlinked: ENOENT."""
    hot = hot_dir / "f"
    old = ident(hot)
    b = start_broker(policy([f"{hot_dir}/*"]))
    make_hot(b, hot)
    new: tuple[int, int] | None = None
    with held_open(hot):
        if kind == "fifo":
            os.mkfifo(tmp_path / "p", 0o600)
            os.rename(tmp_path / "p", hot)
        elif kind == "directory":
            hot.unlink()
            hot.mkdir(mode=0o700)
        elif kind == "new-file":
            new = make_root_file(tmp_path / "new", "the new file\n")
            os.rename(tmp_path / "new", hot)
        else:
            hot.unlink()
        fast0, _ = counts(b)
        got = nobody_fetch(b, hot, rounds=HOT)
        gained = counts(b)[0] - fast0
    assert all(g.ident != old for g in got), f"the old, replaced inode was handed out: {got}"
    if kind == "new-file":
        assert all(g.ident == new and g.head == b"the new file\n" for g in got), got
        assert gained >= 1, "the new file at the hot path never went fast again"
    else:
        assert gained == 0, f"a {kind} was served by the fast path"
        want = errno.ENOENT if kind == "unlinked" else errno.EACCES
        assert all(g.errno == want and g.ident is None for g in got), got
    broker_healthy(b)


# ------------------------------------------------------------------ races


def race_client(
    name: str, path: str, want: tuple[int, int], rounds: int, seconds: float
) -> tuple[dict[str, int], list[str]]:
    """As nobody: open `path` `rounds` times (mostly one per request, every
    tenth request 20 of them); every fd obtained must be the inode `want`."""
    results: Counter[str] = Counter()
    bad: list[str] = []
    end = time.monotonic() + seconds
    with Raw(name, timeout=30) as raw:
        for n in range(rounds):
            if time.monotonic() > end:
                break
            for g in fetch_on(raw, [(path, R)] * (20 if n % 10 == 9 else 1)):
                results[errno.errorcode.get(g.errno, "ok") if g.errno else "ok"] += 1
                if g.errno == 0 and (
                    g.ident != want or not stat.S_ISREG(g.mode) or g.flags & O_PATH
                ):
                    bad.append(f"{g.ident} mode {g.mode:o} flags {g.flags:o} {g.head!r}")
    return dict(results), bad


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["rename", "exchange", "parent"])
def test_race_hot_path_against_secret(start_broker, tmp_path: Path, how: str) -> None:
    """An attacker (nobody, owning the directory) flips the hot path between
    the allowed file and a symlink to a root-only secret (rename(2) of a
    prepared symlink over it and back, or RENAME_EXCHANGE), or moves its
    parent directory away and a decoy in, while the client opens it thousands
    of times: every fd is the allowed inode; both the fast and the slow path
    answered some of them."""
    play, out = tmp_path / "play", tmp_path / "out"
    for d in (play, out):
        d.mkdir()
        os.chown(d, NOBODY, NOGROUP)
    secret = tmp_path / "secret"
    secret_id = make_root_file(secret, "ROOT ONLY SECRET\n")
    if how == "parent":
        (play / "sub").mkdir()
        hot = play / "sub" / "f"
        decoy = out / "decoy"
        decoy.mkdir()
        (decoy / "f").symlink_to(secret)
        for p in (play / "sub", decoy, decoy / "f"):
            os.chown(p, NOBODY, NOGROUP, follow_symlinks=False)
        moves = [("play/sub", "out/tmp"), ("out/decoy", "play/sub")]
        moves += [("play/sub", "out/decoy"), ("out/tmp", "play/sub")]
        workdir = tmp_path
        os.chmod(tmp_path, 0o755)  # the attacker's relative paths start here
    else:
        hot = play / "f"
        (play / "s").symlink_to(secret)
        os.chown(play / "s", NOBODY, NOGROUP, follow_symlinks=False)
        moves = [("f", "keep"), ("s", "f"), ("f", "s"), ("keep", "f")]
        workdir = play
    want = make_root_file(hot, "the allowed file\n")
    b = start_broker(policy([f"{play}/**"], follow=True))
    make_hot(b, hot)
    state = [0]

    def step() -> None:
        i = state[0]
        if how == "exchange":
            exchange("f", "s")
        else:
            os.rename(*moves[i])
        state[0] = (i + 1) % 4  # not on an error: the cycle stays in step
        time.sleep(0.0001)  # let each state be seen, the allowed file's too

    fast0, all0 = counts(b)
    with flipping(workdir, step) as flipper:
        results, bad = as_nobody(race_client, b.name, str(hot), want, 4000, 8.0)
    assert flipper.errors == 0, f"the attacker's renames failed {flipper.errors} times"
    fast, total = (x - y for x, y in zip(counts(b), (fast0, all0), strict=True))
    print(f"{how}: {results}, {flipper.flips} flips, {fast} fast of {total} opens")
    TALLY["fast path race: opens"] += total
    TALLY["fast path race: served in C"] += fast
    assert not bad, f"the broker handed out the wrong file: {bad[:5]}"
    assert flipper.flips > 0, "the attacker never flipped"
    assert total == sum(results.values())
    assert results.get("ok", 0) >= 1 and len(results) >= 2, f"no race was run: {results}"
    assert fast >= 1 and total - fast >= 1, f"not both paths: {fast} fast of {total}"
    assert ident(secret) == secret_id and secret.read_text() == "ROOT ONLY SECRET\n"
    broker_healthy(b)
