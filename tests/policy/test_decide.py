"""decide() and explain() as tables of cases against one policy, plus an index property."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privbroker.broker.policy import names
from privbroker.broker.policy.decide import (
    Decision,
    Explanation,
    FileType,
    Policy,
    Rule,
    Subject,
    decide,
    explain,
    load_policy,
)
from privbroker.broker.policy.patterns import compile_pattern
from privbroker.protocol import Access


def who_text(uid: int, gids: tuple[int, ...], incomplete: bool = False) -> str:
    """How a reason names a client (policy/names.py): its user and groups."""
    groups = ", ".join(names.group(g) for g in gids) + (", list incomplete" if incomplete else "")
    name = names.user(uid)
    return f"{name if name.startswith('uid ') else 'user ' + name}, groups {groups},"


R, W, A, C, T = Access.READ, Access.WRITE, Access.APPEND, Access.CREATE, Access.TRUNCATE
FILE, DIR, CHAR, FIFO = FileType.FILE, FileType.DIR, FileType.CHAR, FileType.FIFO

POLICY = """\
version = 1

[[allow]]
name = "web key"
users = ["www-data"]
paths = ["/etc/ssl/private/site.key"]
access = ["read"]

[[allow]]
name = "1001 tree"
users = [1001]
paths = ["/srv/data/**"]
access = ["read", "write", "append", "create", "truncate"]
types = ["file", "dir"]
create_mode = "0640"
hardlinks = true

[[allow]]
name = "logs"
groups = ["adm"]
paths = ["/var/log/**"]
access = ["read"]

[[allow]]
name = "serial"
groups = ["dialout"]
paths = ["/dev/ttyUSB[0-9]", "/dev/ttyS?"]
access = ["read", "write"]
types = ["char"]

[[allow]]
name = "anyone reads motd"
users = ["*"]
paths = ["/etc/motd"]
access = ["read"]

[[allow]]
name = "links, plain"
users = [1002]
paths = ["/srv/links/a*"]
access = ["read"]

[[allow]]
name = "links, follow"
users = [1002]
paths = ["/srv/links/*"]
access = ["read"]
types = ["file", "fifo"]
follow_symlinks = true

[[allow]]
name = "spool"
groups = [3000]
paths = ["/var/spool/x/*.job"]
access = ["append", "create"]
create_mode = "0660"

[[allow]]
name = "1003 reads etc"
users = [1003, "daemon"]
paths = ["/etc/**"]
access = ["read"]

[[deny]]
name = "no shadow"
paths = ["/etc/shadow"]

[[deny]]
name = "tree secrets are read-only"
paths = ["/srv/data/secret/**"]
access = ["write"]

[[deny]]
name = "adm not audit"
groups = ["adm"]
paths = ["/var/log/audit/**"]

[[deny]]
name = "1001 no tmp"
users = [1001]
paths = ["/srv/data/tmp*"]
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("decide") / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


def subject(uid: int, gid: int | None = None, *groups: int, complete: bool = True) -> Subject:
    gid = uid if gid is None else gid
    return Subject(uid, gid, frozenset((gid, *groups)), complete)


ROOT = subject(0)
WWW = subject(33)
U1001 = subject(1001)
U1002 = subject(1002)
U1003 = subject(1003)
DAEMON = subject(1)
NOBODY = subject(65534)
STRANGER = subject(1005)
ADM_SUPP = subject(1000, 1000, 4)
ADM_PRIMARY = subject(1000, 4)
ADM_PARTIAL = subject(1000, 1000, 4, complete=False)
ADM_PRIMARY_PARTIAL = subject(1000, 4, complete=False)
STRANGER_PARTIAL = subject(1005, complete=False)
DIAL = subject(1000, 1000, 20)
SPOOL = subject(1000, 3000)


class Case(NamedTuple):
    who: Subject
    path: str
    access: Access
    ftype: FileType | None
    allowed: bool
    rule: str | None
    follow: bool = False
    hardlinks: bool = False
    mode: int = 0o600


CASES = {
    # users by name; literal path; ftype None (pre-check) and real type
    "name, real type": Case(WWW, "/etc/ssl/private/site.key", R, FILE, True, "web key"),
    "name, pre-check": Case(WWW, "/etc/ssl/private/site.key", R, None, True, "web key"),
    "missing access word": Case(WWW, "/etc/ssl/private/site.key", W, None, False, "web key"),
    "read+write needs both": Case(WWW, "/etc/ssl/private/site.key", R | W, FILE, False, "web key"),
    "type not listed": Case(WWW, "/etc/ssl/private/site.key", R, DIR, False, "web key"),
    "root denied by default": Case(ROOT, "/etc/ssl/private/site.key", R, None, False, None),
    "other user": Case(NOBODY, "/etc/ssl/private/site.key", R, FILE, False, None),
    # users "*": anyone, root included
    "star, nobody": Case(NOBODY, "/etc/motd", R, FILE, True, "anyone reads motd"),
    "star, root": Case(ROOT, "/etc/motd", R, FILE, True, "anyone reads motd"),
    "star, write": Case(ROOT, "/etc/motd", W, FILE, False, "anyone reads motd"),
    # deny wins over allow; deny for everyone
    "deny wins": Case(U1003, "/etc/shadow", R, FILE, False, "no shadow"),
    "deny, pre-check": Case(U1003, "/etc/shadow", R, None, False, "no shadow"),
    "deny, root": Case(ROOT, "/etc/shadow", R, None, False, "no shadow"),
    "allow beside deny": Case(U1003, "/etc/passwd", R, FILE, True, "1003 reads etc"),
    "user by name in list": Case(DAEMON, "/etc/passwd", R, FILE, True, "1003 reads etc"),
    # uid, every access word, options propagate
    "uid read": Case(U1001, "/srv/data/a", R, FILE, True, "1001 tree", hardlinks=True, mode=0o640),
    "uid write": Case(U1001, "/srv/data/a", W, FILE, True, "1001 tree", hardlinks=True, mode=0o640),
    "uid append": Case(
        U1001, "/srv/data/a", A, FILE, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "uid create": Case(
        U1001, "/srv/data/a", W | C, None, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "uid truncate": Case(
        U1001, "/srv/data/a", W | T, FILE, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "create alone is no open": Case(U1001, "/srv/data/a", C, None, False, None),
    "truncate alone is no open": Case(U1001, "/srv/data/a", T, FILE, False, None),
    "uid all": Case(
        U1001,
        "/srv/data/a",
        R | W | A | C | T,
        FILE,
        True,
        "1001 tree",
        hardlinks=True,
        mode=0o640,
    ),
    "** zero components": Case(
        U1001, "/srv/data", R, DIR, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "** many components": Case(
        U1001, "/srv/data/a/b/c", R, FILE, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "** not a sibling": Case(U1001, "/srv/datax", R, FILE, False, None),
    "** not the parent": Case(U1001, "/srv", R, DIR, False, None),
    "uid, fifo not listed": Case(U1001, "/srv/data/p", R, FIFO, False, "1001 tree"),
    # deny with access: only the listed words
    "deny access hit": Case(
        U1001, "/srv/data/secret/k", W, FILE, False, "tree secrets are read-only"
    ),
    "deny access miss": Case(
        U1001, "/srv/data/secret/k", R, FILE, True, "1001 tree", hardlinks=True, mode=0o640
    ),
    "deny access any of": Case(
        U1001, "/srv/data/secret/k", R | W, FILE, False, "tree secrets are read-only"
    ),
    "deny by uid": Case(U1001, "/srv/data/tmpfile", R, FILE, False, "1001 no tmp"),
    # groups: supplementary, primary, incomplete lists
    "group supplementary": Case(ADM_SUPP, "/var/log/syslog", R, FILE, True, "logs"),
    "group primary": Case(ADM_PRIMARY, "/var/log/apt/history.log", R, FILE, True, "logs"),
    "primary gid not in groups": Case(
        Subject(1000, 4, frozenset()), "/var/log/syslog", R, FILE, True, "logs"
    ),
    "group partial: no grant": Case(ADM_PARTIAL, "/var/log/syslog", R, FILE, False, "logs"),
    "group partial: primary ok": Case(
        ADM_PRIMARY_PARTIAL, "/var/log/syslog", R, FILE, True, "logs"
    ),
    "deny by group": Case(ADM_SUPP, "/var/log/audit/audit.log", R, FILE, False, "adm not audit"),
    "deny by group, partial": Case(
        STRANGER_PARTIAL, "/var/log/audit/audit.log", R, FILE, False, "adm not audit"
    ),
    "deny by group, other": Case(STRANGER, "/var/log/audit/audit.log", R, FILE, False, None),
    # [...] and ?; types
    "class": Case(DIAL, "/dev/ttyUSB0", R | W, CHAR, True, "serial"),
    "class, one char only": Case(DIAL, "/dev/ttyUSB10", R, CHAR, False, None),
    "question mark": Case(DIAL, "/dev/ttyS1", R, CHAR, True, "serial"),
    "question mark, one char": Case(DIAL, "/dev/ttyS10", R, CHAR, False, None),
    "char only: fifo": Case(DIAL, "/dev/ttyUSB0", R, FIFO, False, "serial"),
    "char only: pre-check": Case(DIAL, "/dev/ttyUSB0", R, None, True, "serial"),
    # follow_symlinks: any allowing rule on the pre-check, the deciding rule's after
    "follow, pre-check, any": Case(U1002, "/srv/links/abc", R, None, True, "links, plain", True),
    "follow, real type": Case(U1002, "/srv/links/abc", R, FILE, True, "links, plain", False),
    "follow, fifo": Case(U1002, "/srv/links/abc", R, FIFO, True, "links, follow", True),
    "follow, only rule": Case(U1002, "/srv/links/bcd", R, None, True, "links, follow", True),
    "star matches dotfiles": Case(U1002, "/srv/links/.x", R, FILE, True, "links, follow", True),
    "star, not across /": Case(U1002, "/srv/links/a/b", R, FILE, False, None),
    # create_mode from the deciding rule
    "spool": Case(SPOOL, "/var/spool/x/a.job", A | C, None, True, "spool", mode=0o660),
    "spool, write": Case(SPOOL, "/var/spool/x/a.job", W, FILE, False, "spool"),
    "spool, not deeper": Case(SPOOL, "/var/spool/x/d/a.job", A, FILE, False, None),
    # requests decide() refuses before looking at rules
    "relative path": Case(U1003, "etc/passwd", R, None, False, None),
    "dotdot path": Case(U1003, "/etc/../etc/passwd", R, None, False, None),
    "trailing slash": Case(U1003, "/etc/passwd/", R, None, False, None),
    "no access word": Case(U1003, "/etc/passwd", Access.NONE, None, False, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(policy: Policy, case: Case) -> None:
    d = decide(policy, case.who, case.path, case.access, case.ftype)
    assert (d.allowed, d.rule) == (case.allowed, case.rule), d.reason
    if d.allowed:
        assert d.reason == f"allowed by rule '{case.rule}'"
        assert (d.follow_symlinks, d.hardlinks, d.create_mode) == (
            case.follow,
            case.hardlinks,
            case.mode,
        )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reasons_name_only_rules_that_concern_the_client(policy: Policy, case: Case) -> None:
    reason = decide(policy, case.who, case.path, case.access, case.ftype).reason
    named = set(re.findall(r"rule '([^']*)'", reason))
    concerning = {r.name for r in policy.allow_rules if r.concerns(case.who)}
    concerning |= {r.name for r in policy.deny_rules if r.refuses(case.who)}
    assert named <= concerning


REASONS = [
    (
        WWW,
        "/etc/ssl/private/site.key",
        W,
        None,
        "no rule allows " + who_text(33, (33,)) + " to write /etc/ssl/private/site.key; "
        "rule 'web key' grants read only",
    ),
    (
        WWW,
        "/etc/ssl/private/site.key",
        R | W | T,
        FILE,
        "no rule allows "
        + who_text(33, (33,))
        + " to read, write and truncate /etc/ssl/private/site.key "
        "(a regular file); rule 'web key' grants read only",
    ),
    (
        DIAL,
        "/dev/ttyUSB0",
        R | W,
        FIFO,
        "no rule allows "
        + who_text(
            1000,
            (
                20,
                1000,
            ),
        )
        + " to read and write /dev/ttyUSB0 (a FIFO); "
        "rule 'serial' allows types char, not fifo",
    ),
    (
        U1001,
        "/srv/data/p",
        R,
        FIFO,
        "no rule allows " + who_text(1001, (1001,)) + " to read /srv/data/p (a FIFO); "
        "rule '1001 tree' allows types file, dir, not fifo",
    ),
    (
        SPOOL,
        "/var/spool/x/a.job",
        W,
        CHAR,
        "no rule allows "
        + who_text(1000, (3000,))
        + " to write /var/spool/x/a.job (a character device); "
        "rule 'spool' grants append and create only and allows types file, not char",
    ),
    (
        ROOT,
        "/etc/ssl/private/site.key",
        R,
        None,
        "no rule allows " + who_text(0, (0,)) + " to read /etc/ssl/private/site.key",
    ),
    (
        STRANGER,
        "/var/log/audit/audit.log",
        R,
        DIR,
        "no rule allows "
        + who_text(1005, (1005,))
        + " to read /var/log/audit/audit.log (a directory)",
    ),
    (
        ADM_PARTIAL,
        "/var/log/syslog",
        R,
        None,
        "no rule allows "
        + who_text(
            1000,
            (
                4,
                1000,
            ),
            incomplete=True,
        )
        + " to read /var/log/syslog; "
        "rule 'logs' grants it through a supplementary group, and this client's group list "
        "could not be read in full",
    ),
    (U1003, "/etc/shadow", R, None, "denied by rule 'no shadow'"),
    (
        STRANGER_PARTIAL,
        "/var/log/audit/x",
        R,
        None,
        "denied by rule 'adm not audit' (it names groups, and this client's group list could "
        "not be read in full)",
    ),
    (U1003, "etc", R, None, "invalid path: path is not absolute: 'etc'"),
    (U1003, "/etc", Access.NONE, None, "the request names no read, write or append access"),
    (U1003, "/etc", Access.CREATE, None, "the request names no read, write or append access"),
    (
        subject(1000, 1000, 20, 4, 33),
        "/dev/sda",
        R,
        Block := FileType.BLOCK,
        "no rule allows "
        + who_text(
            1000,
            (
                4,
                20,
                33,
                1000,
            ),
        )
        + " to read /dev/sda (a block device)",
    ),
    (
        subject(1000),
        "/run/s",
        R,
        FileType.SOCKET,
        "no rule allows " + who_text(1000, (1000,)) + " to read /run/s (a socket)",
    ),
]


@pytest.mark.parametrize(("who", "path", "access", "ftype", "reason"), REASONS)
def test_reason_text(
    policy: Policy, who: Subject, path: str, access: Access, ftype: FileType | None, reason: str
) -> None:
    assert decide(policy, who, path, access, ftype).reason == reason


def test_default_denial_cites_the_nearest_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        "version = 1\n"
        '[[allow]]\nname = "far"\nusers = [7]\npaths = ["/x"]\naccess = ["read"]\n'
        'types = ["fifo"]\n'
        '[[allow]]\nname = "near"\nusers = [7]\npaths = ["/x"]\naccess = ["read"]\n'
        '[[allow]]\nname = "unrelated"\nusers = [8]\npaths = ["/x"]\n'
        'access = ["read", "write", "truncate"]\n'
    )
    d = decide(load_policy(path), subject(7), "/x", W, FILE)
    assert d.rule == "near"
    assert (
        d.reason == "no rule allows " + who_text(7, (7,)) + " to write /x (a regular file); "
        "rule 'near' grants read only"
    )


# ---------------------------------------------------------------- explain

EXPLAIN = [
    (WWW, "/var/log/syslog", R, None, "logs", "rule 'logs' would allow it but is for groups adm"),
    (
        U1003,
        "/etc/shadow",
        R,
        FILE,
        "1003 reads etc",
        "rule '1003 reads etc' would allow it but is overridden by deny rule 'no shadow'",
    ),
    (
        WWW,
        "/etc/ssl/private/site.key",
        W,
        None,
        "web key",
        "rule 'web key' would allow it but grants read only",
    ),
    (
        ADM_PARTIAL,
        "/var/log/syslog",
        R,
        None,
        "logs",
        "rule 'logs' would allow it but grants it through a supplementary group the broker "
        "could not confirm",
    ),
    (
        DIAL,
        "/dev/ttyUSB0",
        R,
        FIFO,
        "serial",
        "rule 'serial' would allow it but allows types char, not fifo",
    ),
    (
        U1001,
        "/srv/elsewhere",
        R,
        None,
        "1001 tree",
        "rule '1001 tree' would allow it but its paths (/srv/data/**) do not match /srv/elsewhere",
    ),
    (
        WWW,
        "/srv/links/abc",
        W,
        FILE,
        "links, plain",
        "rule 'links, plain' would allow it but is for users 1002 and grants read only",
    ),
    (
        NOBODY,
        "/srv/data/x",
        R,
        None,
        "1001 tree",
        "rule '1001 tree' would allow it but is for users 1001",
    ),
    (
        NOBODY,
        "/etc/hosts",
        R,
        None,
        "1003 reads etc",
        "rule '1003 reads etc' would allow it but is for users 1003, daemon",
    ),
]


@pytest.mark.parametrize(("who", "path", "access", "ftype", "near", "why"), EXPLAIN)
def test_explain_near_rule(
    policy: Policy,
    who: Subject,
    path: str,
    access: Access,
    ftype: FileType | None,
    near: str,
    why: str,
) -> None:
    ex = explain(policy, who, path, access, ftype)
    assert isinstance(ex, Explanation)
    assert not ex.decision.allowed
    assert (ex.near_rule, ex.near_reason) == (near, why)


def test_explain_allowed_and_refused(policy: Policy) -> None:
    allowed = explain(policy, WWW, "/etc/ssl/private/site.key", R)
    assert allowed == Explanation(
        decide(policy, WWW, "/etc/ssl/private/site.key", R, None), None, ""
    )
    assert allowed.decision.allowed
    refused = explain(policy, WWW, "/etc/../x", R)
    assert (refused.decision.allowed, refused.near_rule, refused.near_reason) == (False, None, "")


def test_explain_groups_and_many_patterns(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    paths = ", ".join(f'"/d/{i}"' for i in range(6))
    path.write_text(
        f'version = 1\n[[allow]]\nname = "many"\nusers = [5]\ngroups = ["adm", 99]\n'
        f'paths = [{paths}]\naccess = ["read"]\n'
    )
    ex = explain(load_policy(path), subject(6), "/e", R)
    assert ex.near_reason == (
        "rule 'many' would allow it but is for users 5 and groups adm, 99 and its paths "
        "(/d/0, /d/1, /d/2, /d/3, ...) do not match /e"
    )


def test_explain_without_allow_rules(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('version = 1\n[[deny]]\nname = "d"\npaths = ["/x"]\n')
    ex = explain(load_policy(path), ROOT, "/y", R)
    assert ex == Explanation(
        Decision(False, None, ex.decision.reason), None, "the policy has no allow rules"
    )


# ------------------------------------------------- index versus brute force

_parts = st.sampled_from(["a", "b", "ab"])
_wild = st.sampled_from(["a", "b", "ab", "*", "a*", "?", "[ab]", "**", "*b"])


def _pattern_text(parts: list[str]) -> str:
    text = "/" + "/".join(parts)
    return text.replace("/**/**", "/**")


_rule = st.fixed_dictionaries(
    {
        "uids": st.frozensets(st.sampled_from([1, 2]), max_size=2),
        "gids": st.frozensets(st.sampled_from([10, 11]), max_size=2),
        "everyone": st.booleans(),
        "paths": st.lists(st.lists(_wild, max_size=3).map(_pattern_text), min_size=1, max_size=2),
        "access": st.sampled_from([R, W, R | W, A | C]),
        "types": st.sampled_from([frozenset({FILE}), frozenset({FILE, DIR}), frozenset({FIFO})]),
        "follow": st.booleans(),
    }
)


def _make(spec: dict, allow: bool, order: int) -> Rule:  # type: ignore[type-arg]
    return Rule(
        name=f"{'allow' if allow else 'deny'}{order}",
        allow=allow,
        order=order,
        file="-",
        line=0,
        uids=spec["uids"],
        gids=spec["gids"],
        everyone=spec["everyone"],
        patterns=tuple(compile_pattern(p) for p in spec["paths"]),
        access=spec["access"],
        types=spec["types"],
        follow_symlinks=spec["follow"],
    )


def _reference(
    policy: Policy, s: Subject, path: str, access: Access, ftype: FileType | None
) -> tuple[bool, str | None, bool]:
    """The precedence of broker/policy/decide.py, by walking every rule in order."""
    for r in policy.deny_rules:
        if r.refuses(s) and r.matches_path(path) and r.access & access:
            return False, r.name, False
    allowing = [
        r
        for r in policy.allow_rules
        if r.grants(s)
        and r.matches_path(path)
        and access & r.access == access
        and (ftype is None or ftype in r.types)
    ]
    if not allowing:
        return False, None, False
    follow = (
        any(r.follow_symlinks for r in allowing) if ftype is None else (allowing[0].follow_symlinks)
    )
    return True, allowing[0].name, follow


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_rule, max_size=8),
    st.lists(_rule, max_size=3),
    st.sampled_from([1, 2, 3]),
    st.frozensets(st.sampled_from([10, 11, 12]), max_size=2),
    st.booleans(),
    st.lists(_parts, max_size=4).map(lambda p: "/" + "/".join(p)),
    st.sampled_from([R, W, R | W, A | C]),
    st.sampled_from([None, FILE, DIR, FIFO]),
)
def test_indexed_decide_agrees_with_brute_force(
    allows: list[dict],
    denies: list[dict],
    uid: int,
    gids: frozenset[int],  # type: ignore[type-arg]
    complete: bool,
    path: str,
    access: Access,
    ftype: FileType | None,
) -> None:
    allow_rules = tuple(_make(spec, True, n) for n, spec in enumerate(allows))
    deny_rules = tuple(_make(spec, False, 100 + n) for n, spec in enumerate(denies))
    policy = Policy(Path("-"), (), (), allow_rules, deny_rules)
    s = Subject(uid, 12, gids | {12}, complete)
    d = decide(policy, s, path, access, ftype)
    expected = _reference(policy, s, path, access, ftype)
    if expected[0]:
        assert (d.allowed, d.rule, d.follow_symlinks) == expected
    else:
        # A default denial's rule is the nearest concerning rule; a deny rule's is itself.
        assert not d.allowed
        if expected[1] is not None:
            assert d.rule == expected[1]


def test_large_policy_agrees_with_brute_force() -> None:
    """The indexes at sizes where they pick between path and subject candidates."""
    rng = random.Random(5)
    shapes = [
        lambda i: f"/srv/app{i % 40}/**",
        lambda i: f"/dev/tty{i % 30}*",
        lambda i: f"/etc/f{i % 60}",
        lambda i: "/var/log/*.log",
        lambda i: f"/srv/app{i % 7}/[ab]?/*",
        lambda i: "/**/x",
    ]

    def spec(i: int) -> dict:  # type: ignore[type-arg]
        return {
            "uids": frozenset(rng.sample(range(1, 30), rng.randint(0, 2))),
            "gids": frozenset(rng.sample(range(100, 110), rng.randint(0, 1))),
            "everyone": rng.random() < 0.02,
            # "/**/x" rarely: it would sit in every path lookup.
            "paths": [rng.choice(shapes[:-1] if rng.random() < 0.95 else shapes)(i)],
            "access": rng.choice([R, W, R | W, A | C]),
            "types": rng.choice([frozenset({FILE}), frozenset({FILE, DIR}), frozenset({FIFO})]),
            "follow": rng.random() < 0.3,
        }

    allows = tuple(_make(spec(i), True, i) for i in range(600))
    denies = tuple(_make(spec(i), False, 1000 + i) for i in range(40))
    policy = Policy(Path("-"), (), (), allows, denies)
    paths = [
        "/srv/app3", "/srv/app3/a/b", "/srv/app3/ab/c", "/dev/tty12", "/dev/tty1x", "/etc/f7",
        "/etc/f70", "/var/log/syslog.log", "/var/log/a/b.log", "/x", "/a/b/x", "/", "/srv",
    ]  # fmt: skip
    for _ in range(3000):
        gids = frozenset(rng.sample(range(100, 112), rng.randint(0, 3)))
        s = Subject(rng.randint(0, 31), 111, gids | {111}, rng.random() < 0.8)
        request = (rng.choice(paths), rng.choice([R, W, R | W, A | C]),
                   rng.choice([None, FILE, DIR, FIFO]))  # fmt: skip
        d = decide(policy, s, *request)
        expected = _reference(policy, s, *request)
        if expected[0] or expected[1] is not None:
            assert (d.allowed, d.rule) == expected[:2], (s, request)
        else:
            assert not d.allowed
        if expected[0]:
            assert d.follow_symlinks is expected[2]


def test_policy_is_immutable(policy: Policy) -> None:
    with pytest.raises(AttributeError):
        policy.rule_count = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        policy.allow_rules[0].name = "x"  # type: ignore[misc]
