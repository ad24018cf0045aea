"""Compiled policy rules, the Policy that holds them, and load problems.

A `Rule` is one `[[allow]]` or `[[deny]]` table after validation: names
resolved to ids, patterns compiled, access and types as flags and sets. A
`Policy` is the ordered, immutable collection of them with two indexes per
kind (allow, deny): one by path (`PathIndex`) and one by subject (uid, gid,
everyone). A lookup asks both how many candidates they hold for a request and
walks the smaller one, so the cost of a decision depends on the rules that
could concern it, not on how many rules the policy has.

Invariants: `order` numbers the rules of both kinds in load order (main file
first, then includes depth-first as they are listed), and the first allowing
rule in that order is the one that decides; nothing here is mutated after
`Policy` is built, so a Policy may be shared between threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from privbroker.protocol import Access

from .decision import FileType, Subject
from .patterns import Entry, PathIndex, Pattern
from .sockets import Network, SocketGrant


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or, with `warning`, doubtful) in a policy file.

    Line 0 means the file as a whole (it could not be read or decoded).
    `unresolved` marks an error that disables a name, not the policy: a user
    or group that does not resolve (deleted, or the directory service is
    down). `check` fails on it; the broker loads the rule without that name.
    """

    file: str
    line: int
    rule: str | None
    message: str
    warning: bool = False
    unresolved: bool = False

    @property
    def fatal(self) -> bool:
        """True for an error that keeps the policy from loading."""
        return not (self.warning or self.unresolved)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        rule = f" rule '{self.rule}':" if self.rule is not None else ""
        kind = " warning:" if self.warning else ""
        return f"{where}:{rule}{kind} {self.message}"


class PolicyError(Exception):
    """A policy that cannot be loaded; `problems` lists every error found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Subjects:
    """Who a rule is about: the subject tests file and network rules share.

    The class using it has `everyone`, `uids` and `gids` fields."""

    __slots__ = ()
    everyone: bool
    uids: frozenset[int]
    gids: frozenset[int]

    def concerns(self, s: Subject) -> bool:
        """True when the rule names this subject: only such rules may appear in its reasons."""
        return (
            self.everyone
            or s.uid in self.uids
            or not self.gids.isdisjoint(s.groups)
            or (s.gid in self.gids)
        )

    def grants(self, s: Subject) -> bool:
        """An allow rule's subject test: supplementary groups count only if fully known."""
        if self.everyone or s.uid in self.uids:
            return True
        if not s.groups_complete:
            return s.gid in self.gids
        return s.gid in self.gids or not self.gids.isdisjoint(s.groups)

    def refuses(self, s: Subject) -> bool:
        """A deny rule's subject test: with a partial group list, any group counts as a match."""
        if self.everyone or s.uid in self.uids:
            return True
        if not self.gids:
            return False
        return not s.groups_complete or s.gid in self.gids or not self.gids.isdisjoint(s.groups)


@dataclass(frozen=True, slots=True, eq=False)
class Rule(Subjects):
    """One compiled rule. For a deny rule `everyone` means no users/groups given."""

    name: str
    allow: bool
    order: int
    file: str
    line: int
    uids: frozenset[int]
    gids: frozenset[int]
    everyone: bool
    patterns: tuple[Pattern, ...]
    access: Access
    types: frozenset[FileType] = frozenset({FileType.FILE})
    follow_symlinks: bool = False
    hardlinks: bool = False
    create_mode: int = 0o600
    # The ids as the file spelled them (names or numbers), for explanations.
    user_labels: tuple[str, ...] = ()
    group_labels: tuple[str, ...] = ()

    def matches_path(self, path: str) -> bool:
        return any(p.match(path) for p in self.patterns)


@dataclass(frozen=True, slots=True, eq=False)
class NetRule(Subjects):
    """One compiled network rule (`sockets`, `addresses`, `interfaces`)."""

    name: str
    allow: bool
    order: int
    file: str
    line: int
    uids: frozenset[int]
    gids: frozenset[int]
    everyone: bool
    grant: SocketGrant
    user_labels: tuple[str, ...] = ()
    group_labels: tuple[str, ...] = ()
    # Network operations (policy/netdecide.py): which, where, and how many devices.
    network: frozenset[str] = frozenset()
    routes: tuple[Network, ...] = ()
    mtu: tuple[int, int] | None = None
    max_devices: int | None = None


_FEW = 4


class RuleIndex:
    """Rules of one kind, found by path or by subject; built once, then read-only."""

    __slots__ = ("_by_gid", "_by_path", "_by_uid", "_everyone", "_with_gids")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._by_path: PathIndex[Rule] = PathIndex()
        self._by_uid: dict[int, list[Rule]] = {}
        self._by_gid: dict[int, list[Rule]] = {}
        self._everyone: list[Rule] = []
        self._with_gids: bool = False
        for rule in rules:
            for pattern in rule.patterns:
                self._by_path.add(pattern, rule)
            if rule.everyone:
                self._everyone.append(rule)
            for uid in rule.uids:
                self._by_uid.setdefault(uid, []).append(rule)
            for gid in rule.gids:
                self._by_gid.setdefault(gid, []).append(rule)
            self._with_gids = self._with_gids or bool(rule.gids)

    def lookup(self, s: Subject, path: str, *, any_group: bool = False) -> list[Rule]:
        """The rules whose paths match `path` and that may concern `s` (may repeat).

        A superset of the rules that concern `s` (see Rule.concerns); with
        `any_group` also every rule naming a group (deny with partial groups).
        The caller still applies the exact subject test.
        """
        if any_group and self._with_gids:
            return _matching(*self._by_path.lookup(path), path)
        lists: list[Sequence[Rule]] = [self._everyone, self._by_uid.get(s.uid, ())]
        lists.extend(self._by_gid.get(g, ()) for g in s.groups)
        if s.gid not in s.groups:
            lists.append(self._by_gid.get(s.gid, ()))
        size = sum(map(len, lists))
        # A handful of rules is cheaper to test than walking the path index.
        if size > _FEW:
            exact, buckets = self._by_path.lookup(path)
            if len(exact) + sum(map(len, buckets)) < size:
                return _matching(exact, buckets, path)
        return [r for rules in lists for r in rules if r.matches_path(path)]


def _matching(exact: list[Rule], buckets: list[list[Entry[Rule]]], path: str) -> list[Rule]:
    found = list(exact)
    for bucket in buckets:
        found.extend(rule for fullmatch, rule in bucket if fullmatch(path) is not None)
    return found


@dataclass(frozen=True, eq=False)
class Policy:
    """A compiled, immutable policy (see policy/decide.py for how it decides).

    `files` holds the main file and every included file read, `dirs` for
    each include glob the deepest directory without wildcards its matches
    hang from (a file added there may change the policy); both are for
    reload watching. `warnings` is what the broker logs when it takes the
    policy in: the warnings, and the `unresolved` problems, which are also
    kept apart for `status` (names that rules hold but that match no one).
    """

    path: Path
    files: tuple[Path, ...]
    warnings: tuple[Problem, ...]
    allow_rules: tuple[Rule, ...]
    deny_rules: tuple[Rule, ...]
    dirs: tuple[Path, ...] = ()
    net_allow: tuple[NetRule, ...] = ()
    net_deny: tuple[NetRule, ...] = ()
    unresolved: tuple[Problem, ...] = ()
    rule_count: int = field(init=False)
    allow_index: RuleIndex = field(init=False, repr=False)
    deny_index: RuleIndex = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Frozen: the derived fields are set once here and never again.
        count = len(self.allow_rules) + len(self.deny_rules)
        count += len(self.net_allow) + len(self.net_deny)
        object.__setattr__(self, "rule_count", count)
        object.__setattr__(self, "allow_index", RuleIndex(self.allow_rules))
        object.__setattr__(self, "deny_index", RuleIndex(self.deny_rules))
