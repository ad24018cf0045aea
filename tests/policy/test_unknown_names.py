"""An unknown user or group disables the rules' use of that name, not the broker.

A name that looks valid but does not resolve (the user was deleted, the
directory service is down at boot) leaves the rule with the names that do
resolve: an allow rule whose names are all unknown matches no one, a deny
rule keeps denying the names it still resolves. Loudly: `check` fails
(exit 1), the broker logs it and shows it in `status`. A malformed value
is still an error that keeps the policy from loading.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from privbroker.broker.policy.decide import (
    FileType,
    PolicyError,
    Subject,
    check_policy,
    decide,
    load_policy,
)
from privbroker.protocol import Access
from tests.support.privs import NOBODY, NOGROUP
from tests.support.running import can_read, status, wait_for

GHOST = "privbroker-ghost"  # a name no test machine has
GHOST_GROUP = "privbroker-ghosts"
NOBODY_S = Subject(NOBODY, NOGROUP, frozenset({NOGROUP}))
WWW = Subject(33, 33, frozenset({33}))
ROOT = Subject(0, 0, frozenset({0}))
ADM = Subject(1000, 1000, frozenset({1000, 4}))

POLICY = f"""\
    version = 1

    [[allow]]
    name = "ghosts only"
    users = ["{GHOST}"]
    groups = ["{GHOST_GROUP}"]
    paths = ["/srv/ghost"]
    access = ["read"]

    [[allow]]
    name = "nobody and a ghost"
    users = ["nobody", "{GHOST}"]
    paths = ["/srv/shared/*"]
    access = ["read"]

    [[allow]]
    name = "a ghost and adm"
    users = ["{GHOST}"]
    groups = ["adm"]
    paths = ["/srv/logs/*"]
    access = ["read"]

    [[allow]]
    name = "everyone else"
    users = ["*"]
    paths = ["/srv/shared/*", "/srv/open/*"]
    access = ["read"]

    [[deny]]
    name = "not www-data, not the ghost"
    users = ["www-data", "{GHOST}"]
    paths = ["/srv/shared/secret"]

    [[deny]]
    name = "only ghosts"
    groups = ["{GHOST_GROUP}"]
    paths = ["/srv/open/*"]
    """

# check's lines for POLICY: one per unknown name, one per rule left with no one.
EXPECTED = [
    "p.toml:3: rule 'ghosts only': matches no one: every user and group it names is unknown",
    f"p.toml:5: rule 'ghosts only': unknown user '{GHOST}'",
    f"p.toml:6: rule 'ghosts only': unknown group '{GHOST_GROUP}'",
    f"p.toml:12: rule 'nobody and a ghost': unknown user '{GHOST}'",
    f"p.toml:18: rule 'a ghost and adm': unknown user '{GHOST}'",
    f"p.toml:31: rule 'not www-data, not the ghost': unknown user '{GHOST}'",
    "p.toml:34: rule 'only ghosts': denies no one: every user and group it names is unknown",
    f"p.toml:36: rule 'only ghosts': unknown group '{GHOST_GROUP}'",
]


def write(root: Path, text: str, name: str = "p.toml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(text))
    return path


def lines(root: Path, problems: object) -> list[str]:
    return [str(p).replace(f"{root}/", "") for p in problems]  # type: ignore[attr-defined]


def test_the_names_are_errors_for_check(tmp_path: Path) -> None:
    problems = check_policy(write(tmp_path, POLICY))
    errors = [p for p in problems if not p.warning]
    assert lines(tmp_path, errors) == EXPECTED
    assert all(p.unresolved and not p.fatal for p in errors)


def test_the_policy_loads_without_them(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))
    assert policy.rule_count == 6
    assert lines(tmp_path, policy.unresolved) == EXPECTED
    # Logged with the warnings when the broker takes the policy in.
    assert set(policy.unresolved) <= set(policy.warnings)
    rules = {r.name: r for r in (*policy.allow_rules, *policy.deny_rules)}
    assert rules["ghosts only"].uids == frozenset() and rules["ghosts only"].gids == frozenset()
    assert not rules["ghosts only"].everyone
    assert rules["nobody and a ghost"].uids == {NOBODY}
    assert rules["a ghost and adm"].gids == {4}
    assert rules["not www-data, not the ghost"].uids == {33}
    assert not rules["only ghosts"].everyone
    # The file's own words are kept, for explanations.
    assert rules["nobody and a ghost"].user_labels == ("nobody", GHOST)


CASES = [
    # An allow rule whose names are all unknown matches no one, root included.
    (NOBODY_S, "/srv/ghost", False),
    (ROOT, "/srv/ghost", False),
    (Subject(4000000, 4000000, frozenset({4000000})), "/srv/ghost", False),
    # The names that resolve keep their grants.
    (NOBODY_S, "/srv/shared/a", True),
    (ADM, "/srv/logs/syslog", True),
    (NOBODY_S, "/srv/logs/syslog", False),
    # A deny rule keeps denying the names it resolves (www-data), and no one else.
    (WWW, "/srv/shared/secret", False),
    (NOBODY_S, "/srv/shared/secret", True),
    (WWW, "/srv/shared/a", True),
    # A deny rule whose names are all unknown denies no one.
    (NOBODY_S, "/srv/open/x", True),
    (Subject(NOBODY, NOGROUP, frozenset({NOGROUP}), groups_complete=False), "/srv/open/x", True),
]


@pytest.mark.parametrize(("who", "path", "allowed"), CASES)
def test_decisions(tmp_path: Path, who: Subject, path: str, allowed: bool) -> None:
    policy = load_policy(write(tmp_path, POLICY))
    assert decide(policy, who, path, Access.READ, FileType.FILE).allowed is allowed


def test_network_rules_too(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        f"""\
        version = 1
        [[allow]]
        name = "ports"
        users = ["nobody", "{GHOST}"]
        sockets = ["tcp:8080"]
        [[deny]]
        name = "ghost ports"
        groups = ["{GHOST_GROUP}"]
        sockets = ["tcp:8081"]
        """,
    )
    policy = load_policy(main)
    assert policy.net_allow[0].uids == {NOBODY}
    assert not policy.net_deny[0].everyone and not policy.net_deny[0].gids
    assert lines(tmp_path, policy.unresolved) == [
        f"p.toml:4: rule 'ports': unknown user '{GHOST}'",
        "p.toml:6: rule 'ghost ports': denies no one: every user and group it names is unknown",
        f"p.toml:8: rule 'ghost ports': unknown group '{GHOST_GROUP}'",
    ]


MALFORMED = [
    ("'1001'", "unknown user '1001' (write a numeric user id without quotes)"),
    ("'bob smith'", "unknown user 'bob smith' (not a valid user name)"),
    ("'-bob'", "unknown user '-bob' (not a valid user name)"),
    ("'bob:x'", "unknown user 'bob:x' (not a valid user name)"),
    ("''", "unknown user '' (not a valid user name)"),
    (f"'{'a' * 300}'", f"unknown user '{'a' * 300}' (not a valid user name)"),
]


@pytest.mark.parametrize(("value", "message"), MALFORMED)
def test_malformed_names_are_still_fatal(tmp_path: Path, value: str, message: str) -> None:
    main = write(
        tmp_path,
        f"version = 1\n[[allow]]\nname = 'r'\nusers = [{value}, 'nobody']\n"
        "paths = ['/a']\naccess = ['read']\n",
    )
    with pytest.raises(PolicyError) as exc:
        load_policy(main)
    assert lines(tmp_path, exc.value.problems) == [f"p.toml:4: rule 'r': {message}"]


@pytest.mark.parametrize("name", ["bob", "bob.smith", "_svc", "svc-1", "host$", "a@b", "1x"])
def test_well_formed_names_are_unresolved(tmp_path: Path, name: str) -> None:
    name = f"pbghost{name}" if name[0].isalnum() else name
    main = write(
        tmp_path,
        f"version = 1\n[[allow]]\nname = 'r'\nusers = ['nobody']\ngroups = ['{name}']\n"
        "paths = ['/a']\naccess = ['read']\n",
    )
    policy = load_policy(main)
    assert lines(tmp_path, policy.unresolved) == [f"p.toml:5: rule 'r': unknown group '{name}'"]


def test_group_star_is_still_fatal(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "version = 1\n[[allow]]\nname = 'r'\nusers = ['nobody']\ngroups = ['*']\n"
        "paths = ['/a']\naccess = ['read']\n",
    )
    with pytest.raises(PolicyError, match="'\\*' is for users only"):
        load_policy(main)


def test_a_fatal_error_lists_the_unknown_names_too(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        f"version = 1\n[[allow]]\nname = 'r'\nusers = ['{GHOST}']\npaths = ['rel']\n"
        "access = ['read']\n",
    )
    with pytest.raises(PolicyError) as exc:
        load_policy(main)
    assert lines(tmp_path, exc.value.problems) == [
        f"p.toml:4: rule 'r': unknown user '{GHOST}'",
        "p.toml:5: rule 'r': paths: path is not absolute: 'rel'",
    ]


# --------------------------------------------------- check, serve, status


def test_check_exits_1(tmp_path: Path) -> None:
    main = write(tmp_path, POLICY)
    out = subprocess.run(
        [sys.executable, "-m", "privbroker.broker", "check", "--policy", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert [line.replace(f"{tmp_path}/", "") for line in out.stderr.splitlines()] == EXPECTED
    assert ": ok" not in out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a broker")
def test_serve_starts_and_serves_the_rest(start_broker, tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    for f in (a, b, c):
        f.write_text(f.name)
        f.chmod(0o600)

    def allow(rule: str, users: str, path: Path) -> str:
        return (
            f'\n[[allow]]\nname = "{rule}"\nusers = {users}\npaths = ["{path}"]\n'
            'access = ["read"]\n'
        )

    br = start_broker(
        "version = 1\n"
        + allow("ghost", f'["{GHOST}"]', a)
        + allow("nobody and ghost", f'["nobody", "{GHOST}"]', b)
    )
    assert not can_read(br.name, a) and can_read(br.name, b)
    fields = status(br.name)
    assert fields["disabled_names"] == [
        f"{br.policy}:3: rule 'ghost': matches no one: every user and group it names is unknown",
        f"{br.policy}:5: rule 'ghost': unknown user '{GHOST}'",
        f"{br.policy}:11: rule 'nobody and ghost': unknown user '{GHOST}'",
    ]
    assert fields["rules"] == 2
    assert f"rule 'ghost': unknown user '{GHOST}'" in br.log_text()
    # A reload with another unknown name is taken in, and shows.
    with open(br.policy, "a") as f:
        f.write(allow("c", f'["nobody", "{GHOST}x"]', c))
    wait_for(lambda: status(br.name)["rules"] == 3)
    fields = status(br.name)
    assert fields["last_reload_error"] == ""
    assert fields["disabled_names"][-1] == (  # type: ignore[index]
        f"{br.policy}:17: rule 'c': unknown user '{GHOST}x'"
    )
    assert can_read(br.name, c) and not can_read(br.name, a)
    # Put right: nothing disabled.
    br.policy.write_text("version = 1\n" + allow("b", '["nobody"]', b))
    wait_for(lambda: status(br.name)["rules"] == 1)
    assert status(br.name)["disabled_names"] == []


def test_status_of_a_policy_without_unknown_names_is_empty(start_broker, tmp_path: Path) -> None:
    br = start_broker(
        'version = 1\n[[allow]]\nname = "r"\nusers = ["nobody"]\npaths = ["/x"]\n'
        'access = ["read"]\n'
    )
    assert status(br.name)["disabled_names"] == []
