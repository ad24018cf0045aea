"""A policy only root can change (docs/security.md, invariant 10).

Each policy file, each directory an include glob lists, and every directory
and symlink on the way to them must be owned by root and not writable by
group or others (a sticky directory on the way aside). Otherwise the policy
is an error: `check` fails, `serve` does not start, a reload is refused.
The tests run as root in pytest's temp directories, under /tmp (sticky).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from privbroker.broker.policy import trust
from privbroker.broker.policy.decide import PolicyError, check_policy, load_policy
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.running import can_read, status, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def rule(name: str, path: str = "/a", user: str = "1") -> str:
    return f"[[allow]]\nname = '{name}'\nusers = [{user}]\npaths = ['{path}']\naccess = ['read']\n"


MAIN = "version = 1\n" + rule("main")


def write(path: Path, text: str, mode: int = 0o644, owner: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, owner, 0)
    os.chmod(path, mode)
    return path


def mkdir(path: Path, mode: int = 0o755, owner: int = 0, group: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, owner, group)
    os.chmod(path, mode)
    return path


def errors(main: Path, root: Path) -> list[str]:
    """check_policy's errors, the temp dir cut off their FILE; load_policy must refuse the same."""
    found = [str(p).removeprefix(f"{root}/") for p in check_policy(main) if not p.warning]
    if found:
        with pytest.raises(PolicyError) as exc:
            load_policy(main)
        assert [str(p).removeprefix(f"{root}/") for p in exc.value.problems] == found
    else:
        assert load_policy(main).rule_count > 0
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root-owned 0755 directory under pytest's (root-owned, /tmp-sticky) tree."""
    return mkdir(tmp_path, 0o755)


# ------------------------------------------------------------- the files


def test_ordinary_temp_directory_is_trusted(root: Path) -> None:
    assert errors(write(root / "p.toml", MAIN), root) == []


def test_world_writable_policy_is_an_error(root: Path) -> None:
    main = write(root / "p.toml", MAIN, 0o666)
    assert errors(main, root) == ["p.toml: file is writable by group/others (mode 0666)"]


def test_group_writable_policy_is_an_error(root: Path) -> None:
    main = write(root / "p.toml", MAIN, 0o664)
    assert errors(main, root) == ["p.toml: file is writable by group/others (mode 0664)"]


def test_drop_in_owned_by_nobody_is_an_error(root: Path) -> None:
    main = write(root / "p.toml", "version = 1\ninclude = ['policy.d/*.toml']\n" + rule("main"))
    mkdir(root / "policy.d")
    write(root / "policy.d" / "10-a.toml", rule("a"))
    write(root / "policy.d" / "20-b.toml", rule("b"), owner=NOBODY)
    assert errors(main, root) == ["policy.d/20-b.toml: file is owned by uid 65534, not root"]


def test_sticky_world_writable_drop_in_directory_is_an_error(root: Path) -> None:
    # Sticky or not, anyone may add a file there, and the glob includes it.
    main = write(root / "p.toml", "version = 1\ninclude = ['policy.d/*.toml']\n" + rule("main"))
    mkdir(root / "policy.d", 0o1777)
    write(root / "policy.d" / "10-a.toml", rule("a"))
    assert errors(main, root) == [
        f"p.toml:2: include 'policy.d/*.toml': directory {root}/policy.d is writable by "
        "group/others (mode 1777)"
    ]


def test_drop_in_directory_owned_by_nobody_is_an_error_even_when_empty(root: Path) -> None:
    main = write(root / "p.toml", "version = 1\ninclude = ['policy.d/*.toml']\n" + rule("main"))
    mkdir(root / "policy.d", owner=NOBODY)
    assert errors(main, root) == [
        f"p.toml:2: include 'policy.d/*.toml': directory {root}/policy.d is owned by "
        "uid 65534, not root"
    ]


def test_directory_a_glob_lists_below_its_base_is_judged_strictly(root: Path) -> None:
    main = write(root / "p.toml", "version = 1\ninclude = ['d/*/*.toml']\n" + rule("main"))
    mkdir(root / "d")
    mkdir(root / "d" / "ok")
    write(root / "d" / "ok" / "a.toml", rule("a"))
    mkdir(root / "d" / "open", 0o1777)
    write(root / "d" / "open" / "b.toml", rule("b"))
    assert errors(main, root) == [
        f"p.toml:2: include 'd/*/*.toml': directory {root}/d/open is writable by "
        "group/others (mode 1777)"
    ]


# ------------------------------------------------- the directories above


def test_policy_in_a_directory_owned_by_nobody_is_an_error(root: Path) -> None:
    theirs = mkdir(root / "theirs", owner=NOBODY)
    main = write(theirs / "p.toml", MAIN)
    assert errors(main, root) == [
        f"theirs/p.toml: directory {theirs} is owned by uid 65534, not root"
    ]


def test_group_writable_parent_is_an_error(root: Path) -> None:
    etc = mkdir(root / "etc", 0o775, group=NOGROUP)
    main = write(etc / "privbroker" / "p.toml", MAIN)
    os.chmod(etc / "privbroker", 0o755)
    assert errors(main, root) == [
        f"etc/privbroker/p.toml: directory {etc} is writable by group/others (mode 0775)"
    ]


def test_sticky_world_writable_parent_is_accepted(root: Path) -> None:
    # Like /tmp itself: others cannot rename or remove root's entries there.
    shared = mkdir(root / "shared", 0o1777)
    main = write(shared / "p.toml", "version = 1\ninclude = ['policy.d/*.toml']\n" + rule("m"))
    mkdir(shared / "policy.d")
    write(shared / "policy.d" / "a.toml", rule("a"))
    assert errors(main, root) == []
    assert os.stat("/tmp").st_mode & 0o1777 == 0o1777  # and pytest's tree hangs from it


def test_world_writable_parent_without_sticky_is_an_error(root: Path) -> None:
    shared = mkdir(root / "shared", 0o777)
    main = write(shared / "p.toml", MAIN)
    assert errors(main, root) == [
        f"shared/p.toml: directory {shared} is writable by group/others (mode 0777)"
    ]


def test_parents_of_a_literal_include_are_checked(root: Path) -> None:
    main = write(root / "p.toml", "version = 1\ninclude = ['extra/x.toml']\n" + rule("main"))
    extra = mkdir(root / "extra", owner=NOBODY)
    write(extra / "x.toml", rule("x"))
    assert errors(main, root) == [
        f"extra/x.toml: directory {extra} is owned by uid 65534, not root"
    ]


def test_parents_of_an_include_base_are_checked(root: Path) -> None:
    main = write(root / "p.toml", "version = 1\ninclude = ['conf/policy.d/*.toml']\n" + rule("m"))
    conf = mkdir(root / "conf", 0o770)
    mkdir(conf / "policy.d")
    write(conf / "policy.d" / "a.toml", rule("a"))
    assert errors(main, root) == [
        f"p.toml:2: include 'conf/policy.d/*.toml': directory {conf} is writable by "
        "group/others (mode 0770)"
    ]


def test_one_bad_directory_is_reported_once(root: Path) -> None:
    theirs = mkdir(root / "theirs", owner=NOBODY)
    main = write(theirs / "p.toml", "version = 1\ninclude = ['d/*.toml']\n" + rule("main"))
    mkdir(theirs / "d")
    for name in ("a", "b", "c"):
        write(theirs / "d" / f"{name}.toml", rule(name))
    assert errors(main, root) == [
        f"theirs/p.toml: directory {theirs} is owned by uid 65534, not root"
    ]


# ------------------------------------------------------------- symlinks


def test_symlink_to_a_policy_in_an_untrusted_directory_is_an_error(root: Path) -> None:
    theirs = mkdir(root / "theirs", owner=NOBODY)
    write(theirs / "real.toml", MAIN)
    mkdir(root / "etc")
    (root / "etc" / "p.toml").symlink_to(theirs / "real.toml")
    assert errors(root / "etc" / "p.toml", root) == [
        f"etc/p.toml: directory {theirs} is owned by uid 65534, not root"
    ]


def test_symlink_owned_by_nobody_in_a_sticky_directory_is_an_error(root: Path) -> None:
    # Its owner may remove it from the sticky directory and plant another.
    mkdir(root / "etc")
    write(root / "etc" / "real.toml", MAIN)
    shared = mkdir(root / "shared", 0o1777)
    (shared / "p.toml").symlink_to(root / "etc" / "real.toml")
    os.chown(shared / "p.toml", NOBODY, NOGROUP, follow_symlinks=False)
    assert errors(shared / "p.toml", root) == [
        f"shared/p.toml: symlink {shared}/p.toml is owned by uid 65534, not root"
    ]


def test_directories_a_relative_symlink_leads_through_are_checked(root: Path) -> None:
    # etc/link -> ../theirs/inner/.. -> theirs: every step is judged.
    theirs = mkdir(root / "theirs", owner=NOBODY)
    mkdir(theirs / "inner")
    mkdir(root / "etc")
    write(theirs / "p.toml", MAIN)
    (root / "etc" / "link").symlink_to("../theirs/inner/..")
    assert errors(root / "etc" / "link" / "p.toml", root) == [
        f"etc/link/p.toml: directory {theirs} is owned by uid 65534, not root"
    ]


def test_root_symlinks_between_trusted_directories_are_accepted(root: Path) -> None:
    mkdir(root / "real" / "policy.d")
    write(root / "real" / "p.toml", "version = 1\ninclude = ['policy.d/*.toml']\n" + rule("m"))
    write(root / "real" / "policy.d" / "a.toml", rule("a"))
    (root / "etc").symlink_to("real")
    assert errors(root / "etc" / "p.toml", root) == []


def test_symlink_loop_is_reported(root: Path) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    found = errors(root / "a", root)
    assert found and all(line.startswith("a: ") for line in found)
    assert any("Too many levels of symbolic links" in line for line in found)


# ------------------------------------------------------- the judgement


def test_owner_may_be_the_checking_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.stat_result((0o100644, 0, 0, 1, 1000, 1000, 0, 0, 0, 0))
    assert trust.distrust(st) == "is owned by uid 1000, not root"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert trust.distrust(st) is None
    other = os.stat_result((0o100644, 0, 0, 1, 1001, 1000, 0, 0, 0, 0))
    assert trust.distrust(other) == "is owned by uid 1001, not root or uid 1000"


@pytest.mark.parametrize(
    ("mode", "sticky_ok", "why"),
    [
        (0o040755, False, None),
        (0o040775, False, "is writable by group/others (mode 0775)"),
        (0o041777, False, "is writable by group/others (mode 1777)"),
        (0o041777, True, None),
        (0o040777, True, "is writable by group/others (mode 0777)"),
        (0o041770, True, None),
        # The sticky excuse is for directories only.
        (0o101666, True, "is writable by group/others (mode 1666)"),
    ],
)
def test_distrust(mode: int, sticky_ok: bool, why: str | None) -> None:
    st = os.stat_result((mode, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert trust.distrust(st, sticky_ok=sticky_ok) == why


def test_a_user_checks_a_policy_of_their_own(tmp_path: Path) -> None:
    # As the administrator's CI would: their checkout, their uid.
    base = Path("/tmp") / f"privbroker-trust-{os.getpid()}"
    mkdir(base, 0o755, owner=NOBODY)
    try:
        write(base / "p.toml", MAIN, owner=NOBODY)
        write(base / "root.toml", MAIN)

        def problems(name: str) -> list[str]:
            return [str(p) for p in check_policy(base / name) if not p.warning]

        assert run_as(NOBODY, NOGROUP, problems, "p.toml") == []
        assert run_as(NOBODY, NOGROUP, problems, "root.toml") == []
        # Root does not trust what nobody could change.
        assert problems("p.toml") == [
            f"{base}/p.toml: directory {base} is owned by uid 65534, not root",
            f"{base}/p.toml: file is owned by uid 65534, not root",
        ]
    finally:
        for name in ("p.toml", "root.toml"):
            (base / name).unlink(missing_ok=True)
        base.rmdir()


# ------------------------------------------------- check, serve, reload


def privbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privbroker.broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_an_untrusted_policy_as_an_error(root: Path) -> None:
    main = write(root / "p.toml", MAIN, 0o666)
    out = privbroker("check", "--policy", str(main))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"{main}: file is writable by group/others (mode 0666)"]
    assert "ok" not in out.stdout


def test_serve_refuses_to_start(start_broker, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o775)  # where start_broker writes the policy
    try:
        with pytest.raises(RuntimeError) as exc:
            start_broker(MAIN)
    finally:
        os.chmod(tmp_path, 0o755)
    text = str(exc.value)
    assert "broker exited with 1 before listening" in text
    assert f"directory {tmp_path} is writable by group/others (mode 0775)" in text


def test_running_broker_refuses_a_reload_of_a_group_writable_policy(
    start_broker, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    for f in (a, b):
        write(f, f.name, 0o600)
    br = start_broker("version = 1\n" + rule("a", str(a), "'nobody'"))
    assert can_read(br.name, a) and not can_read(br.name, b)
    # Someone in the group could now write it: an edit made then is not taken in.
    os.chmod(br.policy, 0o664)
    with open(br.policy, "a") as f:
        f.write(rule("b", str(b), "'nobody'"))
    wait_for(lambda: status(br.name)["reload_failures"] >= 1)
    error = str(status(br.name)["last_reload_error"])
    assert error == f"{br.policy}: file is writable by group/others (mode 0664)"
    assert "policy reload refused, the old policy keeps serving" in br.log_text()
    assert can_read(br.name, a) and not can_read(br.name, b)
    # SIGHUP asks again: still refused.
    br.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status(br.name)["reload_failures"] >= 2)
    assert not can_read(br.name, b)
    # chmod alone puts it right: the mode is part of what the reloader watches.
    os.chmod(br.policy, 0o644)
    wait_for(lambda: not status(br.name)["last_reload_error"])
    assert can_read(br.name, a) and can_read(br.name, b)
    assert br.proc.poll() is None
