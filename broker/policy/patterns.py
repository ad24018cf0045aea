"""Path patterns of the policy file, compiled once, and an index over them.

A pattern is an absolute, normalised path whose components may hold
wildcards. `*`, `?` and `[...]` (fnmatch syntax, `[!...]` negates) match
within one component; `**` as a whole component matches zero or more whole
components, so `/srv/www/**` matches `/srv/www` itself and everything under it.
As in fnmatch, `*` also matches names that start with a dot. There is no
escape character: a backslash is an ordinary character.

A literal pattern is compared as a string, a plain tree (`/srv/www/**`) by
prefix, and any other is matched component by component: `**` runs in
Python, every wildcard component is a regex without catastrophic
backtracking (see `_component`) in which no wildcard can match a '/'. Client
paths are matched on the broker's event loop, so matching must stay cheap
for any pattern and path: it is O(path length * pattern length).
Invariant: a pattern only ever judges a normalised path (the caller checks
with `privbroker.protocol.check_path`), so every component it sees is non-empty
and neither `.` nor `..`.

`PathIndex` answers "which patterns could match this path" without looking
at the others: fully literal patterns sit in a dict keyed by the path, the
others in a trie keyed by their leading literal components, and within a
trie node by the literal head of their first wildcard component ("tty" for
"tty*"). A lookup walks the trie along the path's components, so its cost
depends on the depth of the path and on the patterns that could match it,
not on the policy's size.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from privbroker.protocol import check_path

T = TypeVar("T")
_WILD = frozenset("*?[")


# Truthy when a pattern matches the path it is given, None when it does not
# (callers test `is not None`, as with a regex's fullmatch).
Matcher = Callable[[str], object]
# Tests one path component (never empty, never holding a '/').
_Test = Callable[[str], object]


class PatternError(ValueError):
    """A path pattern that is not valid; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled path pattern.

    `prefix` holds the leading components that have no wildcard; `literal`
    is True when every component is literal (then it matches only itself).
    `test(path)` is truthy when the pattern matches: string equality for a
    literal, a prefix test for a plain tree (`/a/b/**`), else a component-wise
    matcher (see `_components`).
    """

    text: str
    prefix: tuple[str, ...]
    literal: bool
    test: Matcher = field(repr=False, compare=False)

    def match(self, path: str) -> bool:
        return bool(self.test(path))

    @property
    def base(self) -> str:
        """The deepest directory the pattern names literally, all matches lie below it."""
        parts = self.prefix[:-1] if self.literal else self.prefix
        return "/" + "/".join(parts)


def _tree(base: str) -> Matcher:
    """The test of `base/**`: base itself and everything below it (paths are normalised)."""
    if not base:
        return bool  # "/**": every path, and paths are never empty
    below = base + "/"
    return lambda path: path == base or path.startswith(below) or None


def _class(body: str) -> str:
    """Translate the inside of a `[...]` to a regex class that never matches '/'.

    A range such as `[ -~]` or `[+-9]` spans '/', so a positive class is
    guarded by a `(?!/)` lookahead; a negated one lists '/' among its excluded.
    """
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    out = []
    for k, ch in enumerate(body):
        # A '-' between two characters makes a range, elsewhere it is literal.
        out.append("-" if ch == "-" and 0 < k < len(body) - 1 else re.escape(ch))
    return ("[^/" if negate else "(?!/)[") + "".join(out) + "]"


def _component(comp: str) -> str:
    """Translate one component with `*`, `?`, `[...]` to a regex for `fullmatch`.

    No backtracking blow-up: as CPython 3.11's fnmatch.translate does, the
    component is split on `*` into segments S0*S1*...*Sn (each of fixed
    length) and becomes `S0(?>[^/]*?S1)...(?>[^/]*?Sn-1)[^/]*Sn`. Taking the
    earliest place for each middle segment, atomically, loses no match: a
    later `*` can absorb whatever an earlier segment skipped. The cost is
    O(len(component) * len(pattern)).
    """
    if "**" in comp:
        raise PatternError(f"'**' must be a whole path component, not part of {comp!r}")
    segments: list[list[str]] = [[]]
    i, n = 0, len(comp)
    while i < n:
        ch = comp[i]
        i += 1
        if ch == "*":
            segments.append([])
        elif ch == "?":
            segments[-1].append("[^/]")
        elif ch == "[":
            # fnmatch rules: a ']' right after '[' or '[!' is a member, not the end.
            j = i + 1 if i < n and comp[i] == "!" else i
            if j < n and comp[j] == "]":
                j += 1
            j = comp.find("]", j)
            if j < 0:
                raise PatternError(f"unbalanced '[' in {comp!r}")
            segments[-1].append(_class(comp[i:j]))
            i = j + 1
        else:
            segments[-1].append(re.escape(ch))
    parts = ["".join(seg) for seg in segments]
    if len(parts) == 1:
        return parts[0]
    middle = "".join(f"(?>[^/]*?{seg})" for seg in parts[1:-1])
    return f"{parts[0]}{middle}[^/]*{parts[-1]}"


def _runs_match(run: list[_Test], parts: list[str], at: int) -> bool:
    return all(test(parts[at + k]) for k, test in enumerate(run))


def _components(runs: list[list[_Test]]) -> Matcher:
    """The test of a pattern with `**`: `runs` are its components between the `**`s.

    The pattern is R0/**/R1/**/.../**/Rn, each Ri a run of single-component
    tests (R0 and Rn possibly empty). R0 must match the path's first
    components and Rn its last; each middle run is placed at its earliest
    position after the one before, which loses no match for the same reason
    as in `_component` (a later `**` absorbs what an earlier one skipped).
    The cost is O(components * pattern components) component tests.
    """
    head, middle, tail = runs[0], runs[1:-1], runs[-1]
    need = sum(map(len, runs))

    def test(path: str) -> bool | None:
        parts = path[1:].split("/") if path != "/" else []
        if len(parts) < need:
            return None
        end = len(parts) - len(tail)
        if not (_runs_match(head, parts, 0) and _runs_match(tail, parts, end)):
            return None
        at = len(head)
        for run in middle:
            while True:
                if at + len(run) > end:
                    return None
                if _runs_match(run, parts, at):
                    break
                at += 1
            at += len(run)
        return True

    return test


def _sequence(tests: list[_Test]) -> Matcher:
    """The test of a pattern without `**`: one test per component, in order."""

    def test(path: str) -> bool | None:
        parts = path[1:].split("/") if path != "/" else []
        if len(parts) != len(tests) or not _runs_match(tests, parts, 0):
            return None
        return True

    return test


def compile_pattern(text: str) -> Pattern:
    """Compile a policy path pattern.

    Raises:
        PatternError: the pattern is relative, not normalised, has `**`
            inside a component, an unbalanced `[` or a bad `[...]` range.
    """
    try:
        check_path(text)
    except ValueError as exc:
        raise PatternError(str(exc)) from None
    parts = text[1:].split("/") if text != "/" else []
    prefix: list[str] = []
    for part in parts:
        if _WILD.intersection(part):
            break
        prefix.append(part)
    if len(prefix) == len(parts):
        return Pattern(text, tuple(prefix), True, text.__eq__)
    # `**/**` matches what `**` matches.
    parts = [p for k, p in enumerate(parts) if not (p == "**" and k and parts[k - 1] == "**")]
    if len(prefix) == len(parts) - 1 and parts[-1] == "**":
        # The commonest wildcard, and needs no regex at all.
        base = "/" + "/".join(prefix) if prefix else ""
        return Pattern(text, tuple(prefix), False, _tree(base))
    runs: list[list[_Test]] = [[]]
    for part in parts:
        if part == "**":
            runs.append([])
        elif not _WILD.intersection(part):
            runs[-1].append(part.__eq__)
        else:
            source = _component(part)
            try:
                runs[-1].append(re.compile(source).fullmatch)
            except re.error as exc:
                raise PatternError(f"bad character class in {text!r}: {exc.msg}") from None
    matcher = _sequence(runs[0]) if len(runs) == 1 else _components(runs)
    return Pattern(text, tuple(prefix), False, matcher)


Entry = tuple[Matcher, T]


@dataclass(slots=True)
class _Node(Generic[T]):
    children: dict[str, _Node[T]] = field(default_factory=dict)
    # Patterns whose literal components end here, keyed by the literal head
    # of their next component ("tty" for "tty*", "" for "**" or "*x").
    heads: dict[str, list[Entry[T]]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)  # sorted lengths of those heads


def _head(component: str) -> str:
    cut = min((i for i, ch in enumerate(component) if ch in _WILD), default=len(component))
    return component[:cut]


class PathIndex(Generic[T]):
    """Items (rules) found by the patterns that may match a path.

    Built once, then only read: safe to share between threads.
    """

    __slots__ = ("_exact", "_root")

    def __init__(self) -> None:
        self._exact: dict[str, list[T]] = {}
        self._root: _Node[T] = _Node()

    def add(self, pattern: Pattern, item: T) -> None:
        if pattern.literal:
            self._exact.setdefault(pattern.text, []).append(item)
            return
        node = self._root
        for part in pattern.prefix:
            node = node.children.setdefault(part, _Node())
        parts = pattern.text[1:].split("/")
        head = _head(parts[len(pattern.prefix)])
        if len(head) not in node.lengths:
            bisect.insort(node.lengths, len(head))
        node.heads.setdefault(head, []).append((pattern.test, item))

    def lookup(self, path: str) -> tuple[list[T], list[list[Entry[T]]]]:
        """(items of literal patterns equal to `path`, lists of entries to test on it).

        The lists hold every wildcard pattern whose literal components are a
        prefix of the path and whose next component's literal head is a
        prefix of the path's next component; no other pattern can match.
        """
        parts = path.split("/")[1:] if path != "/" else []
        buckets: list[list[Entry[T]]] = []
        node: _Node[T] | None = self._root
        depth = 0
        while node is not None:
            # Past the last component only a "**" (head "") can still match nothing.
            comp = parts[depth] if depth < len(parts) else ""
            for n in node.lengths:
                if n > len(comp):
                    break
                bucket = node.heads.get(comp[:n])
                if bucket is not None:
                    buckets.append(bucket)
            node = node.children.get(comp) if depth < len(parts) else None
            depth += 1
        return self._exact.get(path, []), buckets
