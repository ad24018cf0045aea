"""The native fast path (broker/_fast.c) under attack: what it serves.

The fast path answers, in C, a request made only of (path, access) pairs the
Python broker has already opened for this client under the current policy. So
every test here first makes a path "hot" (opens it a few times as the client
and sees `fast_opens` grow in `privbroker status`: the C code really answered),
then changes the world under it (a symlink, a hard link, a FIFO, a directory,
a new file, a race against a secret, a policy reload, another subject) and
checks what the client gets against what the policy allows, on the fd itself
(fstat, F_GETFL), never on a name. Also: its fds carry the broker's flags,
each of its opens is audited, and a near miss of a hot request gets exactly
the Python broker's answer. test_fast_path_limits.py attacks its limits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from client import protocol as proto
from client.protocol import Access
from tests.adversarial._fastpath import (
    HOT,
    OTHER_UID,
    A,
    Got,
    R,
    W,
    counts,
    fetch,
    fetch_on,
    held_open,
    look,
    make_hot,
    make_hot_dir,
    nobody_fetch,
    policy,
    status,
)
from tests.adversarial._util import (
    O_PATH,
    TALLY,
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    exchange,
    fd_count,
    flipping,
    ident,
    make_root_file,
    outcome,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial


@pytest.fixture
def hot_dir(tmp_path: Path) -> Path:
    return make_hot_dir(tmp_path)


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


# -------------------------------------------------------- policy reload


@pytest.mark.parametrize("how", ["rule-removed", "deny-added"])
def test_reload_revoking_the_hot_rule(start_broker, tmp_path: Path, hot_dir: Path, how) -> None:
    """A reload that takes the hot path away (its rule gone, or a deny rule
    added): the next open is denied; nothing recorded under the old policy
    is served. Granted again: served, and hot again."""
    hot, other = hot_dir / "f", tmp_path / "other"
    make_root_file(other, "other\n")
    text = policy([f"{hot_dir}/*"])
    b = start_broker(text)
    make_hot(b, hot)

    def reload(new_text: str) -> None:
        before = status(b)["reloads"]
        b.policy.write_text(new_text)
        assert wait_for(lambda: status(b)["reloads"] > before, 15), "no reload"
        assert status(b)["last_reload_error"] == "", status(b)

    if how == "rule-removed":
        reload(policy([str(other)], name="another rule"))
    else:
        reload(text + f'[[deny]]\nname = "not f"\npaths = ["{hot}"]\n')
    fast0, _ = counts(b)
    got = nobody_fetch(b, hot, rounds=3)
    assert counts(b)[0] == fast0, "served by the fast path after its rule was revoked"
    for g in got:
        assert (g.errno, g.denied, g.ident) == (errno.EACCES, True, None), g
    reload(text + "\n# granted again\n")
    make_hot(b, hot)
    broker_healthy(b)


# --------------------------------------------- the tables are per subject

GROUP = 61500  # a supplementary group the rule grants through


def test_hot_for_one_subject_is_not_hot_for_another(start_broker, hot_dir: Path) -> None:
    """What the fast path remembers is per subject (uid, gid and groups): a
    path hot for nobody in a supplementary group the rule names is not served
    to nobody without that group, nor to another uid with the same gid."""
    hot = str(hot_dir / "f")
    b = start_broker(policy([f"{hot_dir}/*"], users=(), groups=(GROUP,)))
    items = [(hot, R)]
    fast0, _ = counts(b)
    got = run_as(NOBODY, NOGROUP, fetch, b.name, items, HOT, groups=(GROUP,))
    assert all(g.errno == 0 for g in got), got
    assert counts(b)[0] - fast0 >= HOT // 2, "not hot for the group's member"
    fast0, _ = counts(b)
    for uid, gid in ((NOBODY, NOGROUP), (OTHER_UID, NOGROUP)):
        for g in run_as(uid, gid, fetch, b.name, items, 3):
            assert (g.errno, g.denied, g.ident) == (errno.EACCES, True, None), (uid, g)
    assert counts(b)[0] == fast0, "served fast to a subject it was never judged for"
    got = run_as(NOBODY, NOGROUP, fetch, b.name, items, 3, groups=(GROUP,))
    assert all(g.errno == 0 for g in got) and counts(b)[0] - fast0 == 3
    broker_healthy(b)


# --------------------------------------------------------------- audit


def _pid_and_opens(name: str, path: str, n: int) -> tuple[int, list[Got]]:
    return os.getpid(), fetch(name, [(path, R)], n)


def test_fast_opens_are_audited(start_broker, hot_dir: Path) -> None:
    """--audit FILE: every open the fast path makes has its own "allow" record,
    with the path, real_path, type "file", rule, uid and pid of the client."""
    hot = str(hot_dir / "f")
    b = start_broker(policy([f"{hot_dir}/*"]))  # started with --audit FILE (conftest.py)
    make_hot(b, hot)
    n = 40
    fast0, _ = counts(b)
    pid, got = as_nobody(_pid_and_opens, b.name, hot, n)
    assert all(g.errno == 0 for g in got)
    assert counts(b)[0] - fast0 == n, "not every audited open was fast"

    def mine(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in recs if r.get("pid") == pid]

    recs = mine(audit_records(b, lambda rs: len(mine(rs)) >= n))
    assert len(recs) == n, f"{len(recs)} audit records for {n} fast opens"
    for r in recs:
        assert r["decision"] == "allow" and r["errno"] == 0, r
        assert r["path"] == hot and r["real_path"] == hot, r
        assert r["type"] == "file" and r["rule"] == "the hot rule", r
        assert r["uid"] == NOBODY and r["gid"] == NOGROUP and r["access"] == ["read"], r
    broker_healthy(b)


# ------------------------------------------------------- --no-fast-path


def test_no_fast_path(start_broker, hot_dir: Path) -> None:
    hot = hot_dir / "f"
    want = ident(hot)
    b = start_broker(policy([f"{hot_dir}/*"]), "--no-fast-path")
    got = nobody_fetch(b, hot, rounds=20)
    assert all(g.ident == want for g in got), got
    s = status(b)
    assert s["fast_path"] is False and s["fast_opens"] == 0 and s["allowed"] == 20, s
    broker_healthy(b)


# ------------------------------------------------------------ the flags


@pytest.mark.parametrize(
    ("access", "rule", "accmode", "append"),
    [
        (R, ("read",), os.O_RDONLY, False),
        (W, ("write", "truncate"), os.O_WRONLY, False),
        (A, ("write", "append", "truncate"), os.O_WRONLY, True),
        (R | W, ("read", "write", "truncate"), os.O_RDWR, False),
        (R | A, ("read", "write", "append", "truncate"), os.O_RDWR, True),
    ],
    ids=["read", "write", "append", "read-write", "read-append"],
)
def test_fast_fds_have_the_brokers_flags(
    start_broker, hot_dir: Path, access: Access, rule: tuple[str, ...], accmode: int, append: bool
) -> None:
    """What the C path hands out is opened as the Python path opens it: the
    access mode of the access words, O_APPEND exactly for append, never
    O_NONBLOCK (cleared after the open) nor O_PATH; the data is the file's."""
    hot = hot_dir / "f"
    want = ident(hot)
    b = start_broker(policy([f"{hot_dir}/*"], rule))

    def use(name: str, path: str) -> list[Got]:
        got = []
        with Raw(name) as raw:
            for n in range(HOT):
                reply, fds = raw.open([(path, access)])
                assert len(fds) == 1, reply
                if accmode != os.O_RDONLY:
                    os.write(fds[0], b"%d" % n)
                got.append(look(fds[0]))
        return got

    fast0, _ = counts(b)
    got = as_nobody(use, b.name, str(hot))
    assert counts(b)[0] - fast0 >= HOT - 1, "the flags were not checked on fast fds"
    for g in got:
        assert g.ident == want, g
        assert g.flags & os.O_ACCMODE == accmode, f"{g.flags:o}"
        assert bool(g.flags & os.O_APPEND) == append, f"{g.flags:o}"
        assert not g.flags & (os.O_NONBLOCK | O_PATH), f"{g.flags:o}"
    data = hot.read_bytes()
    if accmode == os.O_RDONLY:
        assert all(g.head == b"the allowed file\n" for g in got)
    elif append:
        assert data == b"the allowed file\n01234", data
    else:  # each write at offset 0 of a new fd
        assert data == b"4he allowed file\n", data
    broker_healthy(b)


# ------------------------------------------ append-only is not remembered

_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_APPEND_FL = 0x80086601, 0x40086602, 0x20


def _set_append_only(path: Path, on: bool) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))
        flags = flags | _FS_APPEND_FL if on else flags & ~_FS_APPEND_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def test_append_only_exemption_is_never_fast(start_broker, hot_dir: Path) -> None:
    """A rule granting "append" alone allows an append-only (chattr +a) file,
    since the kernel keeps appends appends. That holds only while the file is
    append-only, so it is never recorded for the fast path: once +a is gone,
    the next open is denied."""
    hot = hot_dir / "f"
    if not _set_append_only(hot, True):
        pytest.skip("this filesystem has no append-only attribute")
    try:
        b = start_broker(policy([f"{hot_dir}/*"], ("append",)))
        fast0, _ = counts(b)
        got = nobody_fetch(b, hot, A, rounds=HOT)
        assert all(g.errno == 0 and g.flags & os.O_APPEND for g in got), got
        assert counts(b)[0] == fast0, "an append-only exemption was served by the fast path"
    finally:
        _set_append_only(hot, False)
    got = nobody_fetch(b, hot, A, rounds=2)
    for g in got:
        assert (g.errno, g.denied, g.ident) == (errno.EACCES, True, None), g
    broker_healthy(b)


# ----------------------------------- near misses: the Python broker's answers


def near_misses(path: str) -> list[tuple[str, bytes]]:
    """Requests that look like the hot one but are not what the C decoder
    takes, or are hot only in part (the C code opens the first item, then
    gives up: what it opened must be closed)."""
    ok = [1, 1, 5, [[path, int(R), False]]]
    pk = msgpack.packb
    outside, missing = str(Path(path).parent.parent / "outside"), path + "-missing"
    return [
        ("the hot request", pk(ok)),
        ("hot twice", pk([1, 1, 5, [[path, int(R), False]] * 2])),
        ("hot, full batch", pk([1, 1, 5, [[path, int(R), False]] * proto.MAX_BATCH])),
        ("hot then denied", pk([1, 1, 5, [[path, int(R), False], [outside, int(R), False]]])),
        ("hot then missing", pk([1, 1, 5, [[path, int(R), False], [missing, int(R), False]]])),
        ("hot then write", pk([1, 1, 5, [[path, int(R), False], [path, int(W), False]]])),
        ("over the batch", pk([1, 1, 5, [[path, int(R), False]] * (proto.MAX_BATCH + 1)])),
        ("trailing byte", pk(ok) + b"\x00"),
        ("truncated", pk(ok)[:-1]),
        ("version 2", pk([2, *ok[1:]])),
        ("exclusive", pk([1, 1, 5, [[path, int(R), True]]])),
        ("access with create", pk([1, 1, 5, [[path, int(R | Access.CREATE), False]]])),
        ("no access", pk([1, 1, 5, [[path, 0, False]]])),
        ("path as bin", pk([1, 1, 5, [[path.encode(), int(R), False]]])),
        ("trailing slash", pk([1, 1, 5, [[path + "/", int(R), False]]])),
        ("double slash", pk([1, 1, 5, [[path.replace("/d/", "/d//"), int(R), False]]])),
        ("NUL in path", pk([1, 1, 5, [[path + "\0", int(R), False]]])),
        ("id too big", pk([1, 1, 2**64 - 1, [[path, int(R), False]]])),
        ("no items", pk([1, 1, 5, []])),
        ("item of 4", pk([1, 1, 5, [[path, int(R), False, 0]]])),
        ("access as uint16", pk(ok).replace(bytes([int(R), 0xC2]), b"\xcd\x00\x01\xc2")),
        ("a map", pk({"v": 1, "op": 1, "items": [[path, int(R), False]]})),
        ("status", pk([1, 3, 5])),
    ]


def _send_each(name: str, msgs: list[tuple[str, bytes]]) -> list[tuple[str, str, object]]:
    out = []
    for label, data in msgs:
        with Raw(name) as raw:
            raw.send(data)
            what, reply, nfds = outcome(raw.sock)
            seen: object = None
            if isinstance(reply, proto.OpenReply):
                seen = ([r.errno for r in reply.results], nfds)
            elif reply is not None:
                seen = (type(reply).__name__, getattr(reply, "errno", None))
            out.append((label, what, seen))
    return out


def test_near_misses_get_the_python_brokers_answers(start_broker, hot_dir: Path) -> None:
    """Each near miss of a hot request gets, from a broker with the fast path,
    exactly the answer a broker without it gives (the C code hands anything
    it does not fully understand back untouched), and leaves no fd behind."""
    hot = str(hot_dir / "f")
    text = policy([f"{hot_dir}/*"], ("read", "create"))
    fast = start_broker(text)
    slow = start_broker(text, "--no-fast-path")
    assert status(fast)["fast_path"] is True and status(slow)["fast_path"] is False
    make_hot(fast, hot)
    make_hot(fast, hot, R | Access.CREATE, times=1)  # recorded? it must not matter
    baseline = stable_fd_count(fast.proc.pid)
    msgs = near_misses(hot)
    fast0, _ = counts(fast)
    got_fast = as_nobody(_send_each, fast.name, msgs)
    got_slow = as_nobody(_send_each, slow.name, msgs)
    assert got_fast == got_slow
    served = [label for label, what, _ in got_fast if what == "reply"]
    assert len(served) >= 10, f"most near misses closed the connection: {got_fast}"
    assert counts(fast)[0] - fast0 >= 1, "not even the hot request was fast"
    assert settle_fds(fast.proc.pid, baseline) <= baseline, fd_count(fast.proc.pid)
    broker_healthy(fast)
    broker_healthy(slow)
