"""Path races and magic links through a real broker (invariants 1, 2, 3).

An attacker process (uid 65534, owning a directory inside the allowed tree)
flips path components between a real directory and a symlink to /etc, swaps
a file for a hard link to a root-only file or for a FIFO, renames directories
away and back, and plants symlinks where files are to be created, in a tight
loop, while a client (also uid 65534) asks the broker for files under the
allowed tree thousands of times. Every fd that comes back must be the very
inode the policy allows (fstat), never /etc/passwd or anything else; no fd
is ever O_PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from privbroker.protocol import Access, OpenItem
from tests.adversarial._util import (
    O_PATH,
    TALLY,
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    errno_names,
    exchange,
    flipping,
    ident,
    make_root_file,
)
from tests.support.privs import NOBODY, NOGROUP

pytestmark = [pytest.mark.adversarial, pytest.mark.usefixtures("searchable_tmp")]

BATCH = 50  # items per request: one round trip checks 50 opens
ROUNDS = 50  # requests per race: 2,500 opens...
SECONDS = 8.0  # ...or this long, whichever ends first
R = Access.READ
_libc = ctypes.CDLL(None, use_errno=True)


def race_client(
    name: str,
    path: str,
    want: tuple[int, int],
    access: int = int(R),
    rounds: int = ROUNDS,
    batch: int = BATCH,
    seconds: float = SECONDS,
    write: bytes = b"",
) -> tuple[dict[str, int], list[str]]:
    """As the attacker's client: open `path` over and over; every fd must be `want`."""
    results: Counter[int] = Counter()
    bad: list[str] = []
    end = time.monotonic() + seconds
    with Raw(name, timeout=30) as raw:
        for _ in range(rounds):
            if time.monotonic() > end:
                break
            reply, fds = raw.open([(path, Access(access))] * batch)
            it = iter(fds)
            for res in reply.results:
                results[res.errno] += 1
                if res.errno:
                    continue
                fd = next(it)
                try:
                    st = os.fstat(fd)
                    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                    if (st.st_dev, st.st_ino) != want or not stat.S_ISREG(st.st_mode):
                        where = os.readlink(f"/proc/self/fd/{fd}")
                        head = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) else b""
                        bad.append(f"got {where} ({st.st_dev}, {st.st_ino}) {head!r}")
                    if flags & O_PATH:
                        bad.append("an O_PATH fd")
                    if write:
                        os.write(fd, write)
                finally:
                    os.close(fd)
    return errno_names(results), bad


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """base/allowed/play (the attacker's own directory inside the allowed tree) and
    base/out (the attacker's directory outside it)."""
    b = tmp_path / "base"
    (b / "allowed" / "play").mkdir(parents=True)
    (b / "out").mkdir()
    for d in (b, b / "allowed"):
        os.chmod(d, 0o755)
    for d in (b / "allowed" / "play", b / "out"):
        os.chown(d, NOBODY, NOGROUP)
        os.chmod(d, 0o755)
    return b


def read_policy(
    root: Path, follow: bool = False, types: str = '["file"]', access: str = '["read"]'
) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "nobody in the allowed tree"
        users = [{NOBODY}]
        paths = ["{root}/**"]
        access = {access}
        types = {types}
        follow_symlinks = {"true" if follow else "false"}
    """


def nobody_link(target: str, link: Path) -> None:
    link.symlink_to(target)
    os.chown(link, NOBODY, NOGROUP, follow_symlinks=False)


def run_race(
    b,
    path: Path,
    want: tuple[int, int],
    workdir: Path,  # type: ignore[no-untyped-def]
    step: Callable[[], None],
    tag: str,
    **kw,
) -> tuple[dict[str, int], list[str]]:
    with flipping(workdir, step) as flipper:
        counts, bad = as_nobody(race_client, b.name, str(path), want, **kw)
    assert not bad, f"{tag}: the broker handed out the wrong file: {bad[:5]}"
    assert flipper.flips > 0, f"{tag}: the attacker never flipped ({flipper})"
    assert sum(counts.values()) >= BATCH
    TALLY["race: opens through the broker"] += sum(counts.values())
    TALLY["race: attacker flips"] += flipper.flips
    print(f"{tag}: {counts}, {flipper.flips} flips")
    broker_healthy(b)
    return counts, bad


def allowed_records_inside(b, root: Path) -> None:  # type: ignore[no-untyped-def]
    for rec in audit_records(b):
        if rec["decision"] == "allow":
            assert str(rec["real_path"]).startswith(f"{root}/"), rec


# --------------------------------------------------- a component flipped to /etc


@pytest.mark.parametrize("follow", [False, True], ids=["nofollow", "follow"])
@pytest.mark.parametrize("how", ["rename", "exchange"])
def test_component_flipped_to_etc(start_broker, base: Path, how: str, follow: bool) -> None:
    """play/d flips between a real directory and a symlink to /etc; play/d/passwd
    must only ever be the allowed file, never /etc/passwd."""
    allowed, play = base / "allowed", base / "allowed" / "play"
    real = play / "real"
    real.mkdir()
    os.chown(real, NOBODY, NOGROUP)
    want = make_root_file(real / "passwd", "the allowed passwd\n")
    etc_passwd = ident("/etc/passwd")
    assert want != etc_passwd
    b = start_broker(read_policy(allowed, follow))
    if how == "rename":
        nobody_link("/etc", play / "lnk")
        state = [0]

        def step() -> None:
            i = state[0] = (state[0] + 1) % 4
            src, dst = [("real", "d"), ("d", "real"), ("lnk", "d"), ("d", "lnk")][i]
            os.rename(src, dst)
    else:
        real.rename(play / "d")
        nobody_link("/etc", play / "x")

        def step() -> None:
            exchange("d", "x")

    counts, _ = run_race(b, play / "d" / "passwd", want, play, step, f"{how}/follow={follow}")
    assert counts.get("ok", 0) >= 1, "no open ever succeeded: the race was not exercised"
    allowed_records_inside(b, allowed)


def test_last_component_flipped_to_shadow(start_broker, base: Path) -> None:
    """play/f is swapped (RENAME_EXCHANGE) with a symlink to /etc/shadow, under a
    rule that follows symlinks: the real target is judged, and refused."""
    allowed, play = base / "allowed", base / "allowed" / "play"
    want = make_root_file(play / "f", "allowed f\n")
    nobody_link("/etc/shadow", play / "x")
    b = start_broker(read_policy(allowed, follow=True))
    counts, _ = run_race(b, play / "f", want, play, lambda: exchange("f", "x"), "last/shadow")
    assert counts.get("ok", 0) >= 1
    allowed_records_inside(b, allowed)


def test_directory_renamed_away_and_back(start_broker, base: Path) -> None:
    """play/sub is moved out of the allowed tree, a decoy directory (whose `file`
    is a symlink to /etc/passwd) takes its place, then both move back."""
    allowed, play, out = base / "allowed", base / "allowed" / "play", base / "out"
    sub = play / "sub"
    sub.mkdir()
    os.chown(sub, NOBODY, NOGROUP)
    want = make_root_file(sub / "file", "allowed sub/file\n")
    decoy = out / "decoy"
    decoy.mkdir()
    os.chown(decoy, NOBODY, NOGROUP)
    nobody_link("/etc/passwd", decoy / "file")
    b = start_broker(read_policy(allowed, follow=True))
    moves = [
        ("allowed/play/sub", "out/tmp"),
        ("out/decoy", "allowed/play/sub"),
        ("allowed/play/sub", "out/decoy"),
        ("out/tmp", "allowed/play/sub"),
    ]
    state = [0]

    def step() -> None:
        i = state[0] = (state[0] + 1) % 4
        os.rename(*moves[i])

    counts, _ = run_race(b, sub / "file", want, base, step, "dir away and back")
    assert counts.get("ok", 0) >= 1
    allowed_records_inside(b, allowed)


# ---------------------------------------------- a file swapped for a link or FIFO


def test_file_swapped_for_hardlink_or_fifo(start_broker, base: Path) -> None:
    """play/f is exchanged with a hard link to a root-only file outside the tree
    (as where fs.protected_hardlinks=0 lets an attacker make one) and with a
    FIFO: no fd is ever the secret or the FIFO; neither is opened directly."""
    allowed, play = base / "allowed", base / "allowed" / "play"
    want = make_root_file(play / "f", "allowed f\n")
    secret = base / "secret"
    secret_id = make_root_file(secret, "ROOT ONLY SECRET\n")
    os.link(secret, play / "h")
    os.mkfifo(play / "p", 0o666)
    os.chown(play / "p", NOBODY, NOGROUP)
    b = start_broker(read_policy(allowed, follow=True))

    # Directly: the hard link is refused for its link count, the FIFO for its type.
    def direct() -> list[tuple[int, bool, str]]:
        with Raw(b.name) as raw:
            reply, fds = raw.open([(str(play / "h"), R), (str(play / "p"), R)])
            for fd in fds:
                os.close(fd)
            return [(r.errno, r.denied, r.reason) for r in reply.results]

    (h_err, h_denied, h_reason), (p_err, p_denied, _) = as_nobody(direct)
    assert (h_err, h_denied) == (errno.EACCES, True) and "hard link" in h_reason
    assert p_err == errno.EACCES and p_denied

    state = [0]

    def step() -> None:
        state[0] = (state[0] + 1) % 4
        exchange("f", "h" if state[0] < 2 else "p")

    counts, _ = run_race(b, play / "f", want, play, step, "hardlink/fifo swap")
    assert counts.get("ok", 0) >= 1
    assert secret.read_text() == "ROOT ONLY SECRET\n"
    assert ident(secret) == secret_id
    broker_healthy(b)


# ----------------------------------------------------------------- magic links


def magic_paths(broker_pid: int, link_dir: str) -> list[str]:
    me = os.getpid()
    paths = []
    for who in ("self", "thread-self", str(broker_pid), str(me), "1"):
        paths += [
            f"/proc/{who}/fd/0",
            f"/proc/{who}/fd/1",
            f"/proc/{who}/fd/3",
            f"/proc/{who}/root/etc/passwd",
            f"/proc/{who}/root",
            f"/proc/{who}/cwd",
            f"/proc/{who}/cwd/pyproject.toml",
            f"/proc/{who}/exe",
            f"/proc/{who}/environ",
            f"/proc/{who}/mem",
            f"/proc/{who}/maps",
        ]
    paths += [
        "/proc/self",
        "/proc",
        "/proc/sys/kernel/hostname",
        "/dev/fd/0",
        "/dev/fd/3",
        "/dev/fd",
        "/dev/stdin",
        "/dev/stdout",
        "/dev/stderr",
    ]
    paths += [f"{link_dir}/{n}" for n in sorted(os.listdir(link_dir))]
    return paths


def try_all(name: str, paths: list[str], control: str) -> tuple[list[str], int]:
    """Open every path for read and for read+write; return what was handed out."""
    leaked = []
    with Raw(name) as raw:
        reply, fds = raw.open([(control, R)])
        ok = len(fds)
        for fd in fds:
            os.close(fd)
        for access in (R, R | Access.WRITE):
            for start in range(0, len(paths), 50):
                chunk = paths[start : start + 50]
                reply, fds = raw.open([(p, access) for p in chunk])
                got = [p for p, r in zip(chunk, reply.results, strict=True) if r.errno == 0]
                for fd, p in zip(fds, got, strict=True):
                    leaked.append(f"{p} ({access!r}) -> {os.readlink(f'/proc/self/fd/{fd}')}")
                    os.close(fd)
    return leaked, ok


@pytest.mark.parametrize("follow", [False, True], ids=["nofollow", "follow"])
def test_magic_links_refused_even_under_allow_everything(
    start_broker, tmp_path: Path, follow: bool
) -> None:
    """A policy granting nobody "/**" (every type, read and write) still never
    opens /proc/*/fd/N, /proc/*/root, /proc/*/cwd, /proc/self/environ or mem,
    /dev/fd/N or /dev/std*, nor anything on a second mount of procfs, nor
    symlinks to any of them."""
    links = tmp_path / "links"
    links.mkdir()
    for n, target in enumerate(
        [
            "/proc/self/environ",
            "/proc/self/fd/0",
            "/dev/stdin",
            "/proc/self/root/etc/shadow",
            "/proc/1/cwd",
            "/dev/fd/0",
            "/proc/self/mem",
        ]
    ):
        (links / f"l{n}").symlink_to(target)
    procfs = tmp_path / "proc2"
    procfs.mkdir()
    mounted = _libc.mount(b"proc", os.fsencode(procfs), b"proc", 0, None) == 0
    control = tmp_path / "plain.txt"
    make_root_file(control, "plain\n")
    os.chmod(tmp_path, 0o755)
    b = start_broker(f"""
        version = 1
        [[allow]]
        name = "nobody may open everything"
        users = [{NOBODY}]
        paths = ["/**"]
        access = ["read", "write"]
        types = ["file", "dir", "char", "block", "fifo", "socket"]
        follow_symlinks = {"true" if follow else "false"}
    """)
    try:
        paths = magic_paths(b.proc.pid, str(links))
        if mounted:
            paths += [
                f"{procfs}/self/environ",
                f"{procfs}/self/fd/0",
                f"{procfs}/1/root",
                f"{procfs}/{b.proc.pid}/mem",
                f"{procfs}/self/root/etc/shadow",
            ]
        leaked, ok = as_nobody(try_all, b.name, paths, str(control))
    finally:
        if mounted:
            _libc.umount2(os.fsencode(procfs), 2)  # MNT_DETACH
    assert ok == 1, "the control file was not opened: the test proves nothing"
    assert not leaked, f"magic links opened: {leaked}"
    TALLY["magic links refused"] += 2 * len(paths)
    broker_healthy(b)


# ------------------------------------------------------- O_CREAT through a symlink


def create_attempts(name: str, paths: list[str]) -> list[str]:
    got = []
    modes = {
        "w": Access.WRITE | Access.CREATE | Access.TRUNCATE,
        "a": Access.APPEND | Access.CREATE,
        "w+": Access.READ | Access.WRITE | Access.CREATE | Access.TRUNCATE,
        "a+": Access.READ | Access.APPEND | Access.CREATE,
    }
    with Raw(name) as raw:
        for path in paths:
            for mode, access in modes.items():
                _, fds = raw.open([(path, access)])
                for fd in fds:
                    got.append(f"{path} {mode} -> {os.readlink(f'/proc/self/fd/{fd}')}")
                    os.write(fd, b"PWNED\n")
                    os.close(fd)
            # exclusive create: O_EXCL never follows
            _, fds = raw.open([OpenItem(path, Access.WRITE | Access.CREATE, True)])
            for fd in fds:
                got.append(f"{path} x -> {os.readlink(f'/proc/self/fd/{fd}')}")
                os.close(fd)
    return got


@pytest.mark.parametrize("follow", [False, True], ids=["nofollow", "follow"])
def test_create_through_planted_symlink(start_broker, base: Path, follow: bool) -> None:
    """A symlink planted at the name to create (to an existing root file, or
    dangling to a name outside): nothing outside is created, truncated or written."""
    allowed, play, out = base / "allowed", base / "allowed" / "play", base / "out"
    victim = base / "victim"
    victim_id = make_root_file(victim, "victim content\n", 0o644)
    ghost = base / "ghost"  # a dangling link's target: must never come to exist
    nobody_link(str(victim), play / "evil")
    nobody_link(str(ghost), play / "dangle")
    nobody_link(str(out / "ghost2"), play / "dangle2")
    b = start_broker(
        read_policy(allowed, follow, access='["read", "write", "append", "create", "truncate"]')
    )
    got = as_nobody(create_attempts, b.name, [str(play / n) for n in ("evil", "dangle", "dangle2")])
    assert not got, f"opened through a planted symlink: {got}"
    assert victim.read_text() == "victim content\n" and ident(victim) == victim_id
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.stat().st_uid == 0
    assert not ghost.exists() and not (out / "ghost2").exists()
    broker_healthy(b)


def test_create_races_a_planted_symlink(start_broker, base: Path) -> None:
    """The attacker plants and removes symlinks at play/n (to a root file and
    dangling) in a loop while the client creates play/n with "w" thousands of
    times, writing into every fd it gets: every fd is a fresh file of nobody's
    in play/, the victim is untouched and the dangling target never appears."""
    allowed, play = base / "allowed", base / "allowed" / "play"
    victim = base / "victim"
    victim_id = make_root_file(victim, "victim content\n", 0o644)
    ghost = base / "ghost"
    b = start_broker(
        read_policy(allowed, True, access='["read", "write", "append", "create", "truncate"]')
    )
    state = [0]

    def step() -> None:
        state[0] += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink("n")
        if state[0] % 3:
            os.symlink(str(victim) if state[0] % 3 == 1 else str(ghost), "n")

    def client(name: str, path: str) -> tuple[dict[str, int], list[str]]:
        results: Counter[int] = Counter()
        bad: list[str] = []
        end = time.monotonic() + SECONDS
        w = Access.WRITE | Access.CREATE | Access.TRUNCATE
        with Raw(name, timeout=30) as raw:
            for _ in range(ROUNDS):
                if time.monotonic() > end:
                    break
                reply, fds = raw.open([(path, w)] * 20)
                it = iter(fds)
                for res in reply.results:
                    results[res.errno] += 1
                    if res.errno == 0:
                        fd = next(it)
                        st = os.fstat(fd)
                        where = os.readlink(f"/proc/self/fd/{fd}")
                        if (
                            st.st_uid != NOBODY
                            or not stat.S_ISREG(st.st_mode)
                            or not where.startswith(f"{play}/")
                        ):
                            bad.append(f"{where} uid {st.st_uid} mode {st.st_mode:o}")
                        os.write(fd, b"PWNED\n")
                        os.close(fd)
        return errno_names(results), bad

    with flipping(play, step) as flipper:
        counts, bad = as_nobody(client, b.name, str(play / "n"))
    print(f"create race: {counts}, {flipper.flips} flips")
    TALLY["race: opens through the broker"] += sum(counts.values())
    assert not bad, bad[:5]
    assert flipper.flips > 0
    assert victim.read_text() == "victim content\n" and ident(victim) == victim_id
    assert not ghost.exists()
    broker_healthy(b)


def symlink_denials(name: str, paths: list[str]) -> list[tuple[int, str, str | None]]:
    with Raw(name) as raw:
        reply, fds = raw.open([(p, R) for p in paths])
        for fd in fds:
            os.close(fd)
    return [(r.errno, r.reason, r.rule) for r in reply.results]


def test_denied_symlink_target_is_not_disclosed(start_broker, base: Path, tmp_path: Path) -> None:
    """Through a followed symlink, the reason says the target is not allowed,
    but never where it is: the attacker may not be able to list the directory
    it points into (here a 0700 root directory)."""
    allowed, play = base / "allowed", base / "allowed" / "play"
    private = tmp_path / "private-dir-name"
    private.mkdir(mode=0o700)
    make_root_file(private / "existing-secret-name", "x\n")
    nobody_link(str(private / "existing-secret-name"), play / "e")
    nobody_link("/etc/shadow", play / "s")
    b = start_broker(read_policy(allowed, follow=True))
    got = as_nobody(symlink_denials, b.name, [str(play / "e"), str(play / "s")])
    for err, reason, _ in got:
        assert err == errno.EACCES
        for secret in ("private-dir-name", "existing-secret-name", "shadow"):
            assert secret not in reason, f"the denial discloses the symlink's target: {reason!r}"
    broker_healthy(b)
