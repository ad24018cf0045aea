"""The native fast path (broker/files/_fast.c) under attack: what it serves.

The fast path answers, in C, a request made only of (path, access) pairs the
Python broker has already opened for this client under the current policy. So
every test here first makes a path "hot" (opens it a few times as the client
and sees `fast_opens` grow in `privbroker status`: the C code really answered),
then changes what it may serve (a policy reload, another subject, an
append-only exemption) and checks what the client gets against what the
policy allows, on the fd itself (fstat, F_GETFL), never on a name. Also: its
fds carry the broker's flags, each of its opens is audited, --no-fast-path
turns it off, and a near miss of a hot request gets exactly the Python
broker's answer. test_fast_path_races.py changes the file at the hot path
under it; test_fast_path_limits.py and test_fast_path_mounts.py attack its
limits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from privbroker import protocol as proto
from privbroker.protocol import Access
from tests.adversarial._fastpath import (
    HOT,
    OTHER_UID,
    A,
    Got,
    R,
    W,
    counts,
    fetch,
    look,
    make_hot,
    nobody_fetch,
    policy,
    status,
)
from tests.adversarial._util import (
    O_PATH,
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    fd_count,
    ident,
    make_root_file,
    outcome,
    settle_fds,
    stable_fd_count,
    wait_for,
)
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial


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
