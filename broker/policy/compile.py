"""One validated rule table -> one compiled Rule, with its errors and warnings.

The pydantic models have already checked the shape; this adds what needs
the system or the whole rule: user and group names resolved with pwd/grp
(once per load, cached in `Ids`), rules that can never match, access words
the listed types cannot take, and the warnings an administrator should see
(a grant to anyone, a wildcard or symlink-following rule under a directory
its users can write, paths the opener refuses whatever the policy says).

Invariant: a Rule is returned only when the rule produced no error, so a
Policy never holds a half-understood rule. One error is not fatal: a name
that looks like a user or group name but does not resolve (the user was
deleted, the directory service is down). It is reported as `unresolved` and
the rule keeps the names that do resolve; it never widens a rule, since a
name that resolves to nothing adds no one to `uids` or `gids`, and a rule
that names users or groups is never `everyone`. A malformed value ("1001"
as a string, '*' as a group, a name no system would accept) stays fatal.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass, field, replace

from privbroker.protocol import Access

from .decision import FileType
from .model import ACCESS_WORDS, AllowModel, DenyModel, NetAllowModel, NetDenyModel, Source
from .opens import unusable
from .patterns import Pattern
from .rules import NetRule, Problem, Rule
from .sockets import SocketGrant, warnings_for

_NOT_GIVEN = object()
# What each file type can be opened for: a directory only for reading, and
# the broker creates regular files only, never devices, FIFOs or sockets.
_CAN_TAKE = {
    FileType.FILE: Access.READ | Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE,
    FileType.DIR: Access.READ,
}
_SPECIAL = Access.READ | Access.WRITE | Access.APPEND | Access.TRUNCATE
# Paths the opener refuses whatever the policy says (magic links, fd aliases).
_REFUSED = {
    "/proc": ("/proc", "/proc/self", "/proc/1/fd/0", "/proc/self/fd/0"),
    "/dev/fd": ("/dev/fd", "/dev/fd/0"),
    "/dev/std*": ("/dev/stdin", "/dev/stdout", "/dev/stderr"),
}
# What a user or group name may look like for an unknown one to be a name that
# did not resolve rather than a typo: shadow's and systemd's relaxed rules
# (letters, digits, '_', '.', '-', '@', '\\' for winbind's DOMAIN\\user, a
# trailing '$' for machine accounts), not all digits, at most LOGIN_NAME_MAX.
_NAME = re.compile(r"(?!\d+\$?$)[A-Za-z0-9_][A-Za-z0-9_.@\\-]{0,254}\$?")


@dataclass
class Site:
    """Where a rule is, to report its problems with FILE:LINE and its name."""

    file: str
    src: Source
    kind: str
    index: int
    name: str | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def line(self) -> int:
        return self.src.rule(self.kind, self.index)

    def report(
        self,
        msg: str,
        key: str | None = None,
        value: object = _NOT_GIVEN,
        warn: bool = False,
        unresolved: bool = False,
    ) -> None:
        if key is None:
            line = self.line
        elif value is _NOT_GIVEN:
            line = self.src.key(self.kind, self.index, key)
        else:
            line = self.src.value(self.kind, self.index, key, value)
        self.problems.append(Problem(self.file, line, self.name, msg, warn, unresolved))

    @property
    def failed(self) -> bool:
        return any(p.fatal for p in self.problems)


class Ids:
    """pwd/grp lookups for one load, cached (a policy names the same users often)."""

    def __init__(self) -> None:
        self._users: dict[str, int | None] = {}
        self._groups: dict[str, int | None] = {}
        self._member_of: dict[int, frozenset[int]] = {}
        self._stat: dict[str, os.stat_result | None] = {}

    def uid(self, name: str) -> int | None:
        if name not in self._users:
            try:
                self._users[name] = pwd.getpwnam(name).pw_uid
            except KeyError:
                self._users[name] = None
        return self._users[name]

    def gid(self, name: str) -> int | None:
        if name not in self._groups:
            try:
                self._groups[name] = grp.getgrnam(name).gr_gid
            except KeyError:
                self._groups[name] = None
        return self._groups[name]

    def groups_of(self, uid: int) -> frozenset[int]:
        """The gids a uid's processes normally have (empty for a uid with no passwd entry)."""
        if uid not in self._member_of:
            try:
                pw = pwd.getpwuid(uid)
                self._member_of[uid] = frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
            except (KeyError, OSError):
                self._member_of[uid] = frozenset()
        return self._member_of[uid]

    def stat(self, path: str) -> os.stat_result | None:
        if path not in self._stat:
            try:
                self._stat[path] = os.stat(path)
            except OSError:
                self._stat[path] = None
        return self._stat[path]


def resolve_ids(
    site: Site, ids: Ids, key: str, values: list[int | str] | None
) -> tuple[set[int], list[str], bool]:
    """Names/ids of `users` or `groups` -> (ids, labels, has '*').

    A well-formed name that does not resolve is reported `unresolved` and
    left out; a malformed one is an error."""
    found: set[int] = set()
    labels: list[str] = []
    star = False
    for value in values or ():
        labels.append(str(value))
        if isinstance(value, int):
            found.add(value)
        elif value == "*" and key == "users":
            star = True
        else:
            num = ids.uid(value) if key == "users" else ids.gid(value)
            if num is not None:
                found.add(num)
                continue
            what = "user" if key == "users" else "group"
            if value.isdigit():
                hint = f" (write a numeric {what} id without quotes)"
            elif value == "*":
                hint = " ('*' is for users only)"
            elif not _NAME.fullmatch(value):
                hint = f" (not a valid {what} name)"
            else:
                site.report(f"unknown {what} {value!r}", key, value, unresolved=True)
                continue
            site.report(f"unknown {what} {value!r}{hint}", key, value)
    return found, labels, star


def _subjects_left(site: Site, allow: bool, uids: set[int], gids: set[int], star: bool) -> None:
    """Say so when unknown names leave a rule that names users or groups with none."""
    if star or uids or gids or not any(p.unresolved for p in site.problems):
        return
    if allow:
        msg = "matches no one: every user and group it names is unknown"
    else:
        msg = "denies no one: every user and group it names is unknown"
    site.report(msg, unresolved=True)


@dataclass(frozen=True)
class _Who:
    """A rule's subjects, resolved: what Rule and NetRule both hold."""

    uids: frozenset[int]
    gids: frozenset[int]
    everyone: bool
    user_labels: tuple[str, ...]
    group_labels: tuple[str, ...]


def _who(
    users: list[int | str] | None, groups: list[int | str] | None, allow: bool, site: Site, ids: Ids
) -> _Who:
    """Resolve a rule's `users` and `groups`, reporting what cannot match."""
    uids, user_labels, star = resolve_ids(site, ids, "users", users)
    gids, group_labels, _ = resolve_ids(site, ids, "groups", groups)
    given = users is not None or groups is not None
    if allow and not given:
        site.report("an allow rule needs users or groups")
    elif given and not (users or groups):
        site.report(
            "can never match: users and groups are empty",
            "users" if users is not None else "groups",
        )
    elif given:
        _subjects_left(site, allow, uids, gids, star)
    return _Who(
        frozenset(uids), frozenset(gids), star or not given, tuple(user_labels), tuple(group_labels)
    )


def compile_rule(m: AllowModel | DenyModel, site: Site, ids: Ids, order: int) -> Rule | None:
    """Compile a validated rule; None when it has errors (they are on site.problems)."""
    allow = isinstance(m, AllowModel)
    who = _who(m.users, m.groups, allow, site, ids)
    if not m.paths:
        site.report("can never match: paths is empty", "paths")
    if m.access is not None and not m.access:
        site.report("can never match: access is empty", "access")
    access = Access.from_words(m.access if m.access is not None else ACCESS_WORDS)
    rule = Rule(
        name=m.name,
        allow=allow,
        order=order,
        file=site.file,
        line=site.line,
        uids=who.uids,
        gids=who.gids,
        everyone=who.everyone,
        patterns=tuple(m.paths),
        access=access,
        user_labels=who.user_labels,
        group_labels=who.group_labels,
    )
    if isinstance(m, AllowModel):
        rule = _allow_options(m, site, rule)
    return None if site.failed else rule


def compile_net_rule(
    m: NetAllowModel | NetDenyModel, site: Site, ids: Ids, order: int
) -> NetRule | None:
    """Compile a validated network rule; None when it has errors (on site.problems)."""
    allow = isinstance(m, NetAllowModel)
    who = _who(m.users, m.groups, allow, site, ids)
    if m.sockets is None and m.network is None:
        site.report("a network rule needs sockets or network (or it is a file rule: paths)")
    if m.sockets == [] or m.network == []:
        key = "sockets" if m.sockets == [] else "network"
        site.report("can never match: sockets or network is empty", key)
    for key in ("addresses", "interfaces", "routes"):
        if getattr(m, key) == []:
            site.report(f"can never match: {key} is empty (leave it out for any)", key)
    if allow:
        for spec in m.sockets or ():
            for warning in warnings_for(spec):
                site.report(warning, "sockets", str(spec), warn=True)
        if m.interfaces and m.network:
            site.report(
                f"network operations on {', '.join(m.interfaces)}: devices this client does "
                "not lease, which other programs may rely on",
                "interfaces",
                warn=True,
            )
        if "route" in (m.network or ()) and m.routes is None:
            site.report("'route' in network, but no routes: no route can be added", "network")

    rule = NetRule(
        name=m.name,
        allow=allow,
        order=order,
        file=site.file,
        line=site.line,
        uids=who.uids,
        gids=who.gids,
        everyone=who.everyone,
        grant=SocketGrant(
            tuple(m.sockets or ()), tuple(m.addresses or ()), tuple(m.interfaces or ())
        ),
        user_labels=who.user_labels,
        group_labels=who.group_labels,
        network=frozenset(m.network or ()),
        routes=tuple(m.routes or ()),
        mtu=m.mtu if isinstance(m, NetAllowModel) else None,
        max_devices=m.max_devices if isinstance(m, NetAllowModel) else None,
    )
    return None if site.failed else rule


def _allow_options(m: AllowModel, site: Site, rule: Rule) -> Rule:
    types = frozenset(FileType(t) for t in m.types)
    if not types:
        site.report("can never match: types is empty", "types")
    untakeable = False
    for word in rule.access:
        if types and not any(word & _CAN_TAKE.get(t, _SPECIAL) for t in types):
            untakeable = True
            listed = ", ".join(t.value for t in FileType if t in types)
            why = " (the broker creates regular files only)" if word == Access.CREATE else ""
            text = word.words()[0]
            site.report(f"access '{text}' cannot apply to types {listed}{why}", "access", text)
    if types and m.access and not untakeable:  # words no open mode can use with this rule
        unused = unusable(rule.access, {t: _CAN_TAKE.get(t, _SPECIAL) for t in types})
        if unused is not None:
            # A warning, not an error: the protocol also carries access words
            # no open() mode spells (O_WRONLY alone: "write"), which such a
            # rule may serve; what open() modes can use is what this says.
            site.report(unused, "access", warn=True)
    if m.create_mode is not None and Access.CREATE not in rule.access:
        site.report("create_mode has no effect without 'create' access", "create_mode", warn=True)
    return replace(
        rule,
        types=types,
        follow_symlinks=m.follow_symlinks,
        hardlinks=m.hardlinks,
        create_mode=0o600 if m.create_mode is None else m.create_mode,
    )


def rule_warnings(rule: Rule, site: Site, ids: Ids) -> None:
    """Report what is allowed but doubtful about a compiled allow rule."""
    if rule.everyone:
        site.report("users '*' grants this to every user on the machine", "users", "*", warn=True)
    for pattern in rule.patterns:
        covered = [name for name, samples in _REFUSED.items() if any(map(pattern.match, samples))]
        if covered:
            site.report(
                f"path '{pattern.text}' covers {', '.join(covered)}, which the broker "
                "refuses whatever the policy says",
                "paths",
                pattern.text,
                warn=True,
            )
        if pattern.literal and not rule.follow_symlinks:
            continue
        where = _writable_dir(pattern, rule, ids)
        if where is None:
            continue
        if rule.follow_symlinks:
            msg = (
                f"follows symlinks under {where}, which users it grants can write: "
                f"they can aim '{pattern.text}' at any other file the policy allows them"
            )
        else:
            msg = (
                f"users it grants can write {where}, so they choose what "
                f"'{pattern.text}' matches there"
            )
        site.report(msg, "paths", pattern.text, warn=True)


def _writable_dir(pattern: Pattern, rule: Rule, ids: Ids) -> str | None:
    """The directory at or above the pattern's base whose grantees could reshape it.

    The base itself counts when they can create entries in it; an ancestor
    counts when they can rename what is in it, i.e. unless it is sticky
    (like /tmp), where only an entry's owner can.
    """
    path = pattern.base
    base = True
    while True:
        st = ids.stat(path)
        if (
            st is not None
            and stat.S_ISDIR(st.st_mode)
            and (base or not st.st_mode & stat.S_ISVTX)
            and _writable(st, rule, ids)
        ):
            return path
        if path == "/":
            return None
        path, base = os.path.dirname(path), False


def _writable(st: os.stat_result, rule: Rule, ids: Ids) -> bool:
    # Root can write anything and is trusted with it: granting uid 0 is no reason to warn.
    mode = st.st_mode
    if mode & stat.S_IWOTH:
        return True
    if mode & stat.S_IWUSR and st.st_uid != 0 and (rule.everyone or st.st_uid in rule.uids):
        return True
    if not mode & stat.S_IWGRP:
        return False
    if rule.everyone or st.st_gid in rule.gids:
        return True
    # Last, as it is the slow part: the groups of the users the rule names.
    return any(st.st_gid in ids.groups_of(uid) for uid in rule.uids - {0})
