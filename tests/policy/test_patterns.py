"""Path patterns and the path index: a table of matches, errors, and properties."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privbroker.broker.policy import patterns
from privbroker.broker.policy.patterns import PathIndex, PatternError, compile_pattern

MATCHES = [
    # pattern, path, matches?
    ("/", "/", True),
    ("/", "/a", False),
    ("/etc/shadow", "/etc/shadow", True),
    ("/etc/shadow", "/etc/shadow-", False),
    ("/etc/shadow", "/etc", False),
    # `*` within one component, dotfiles included, never across '/'
    ("/srv/*", "/srv/a", True),
    ("/srv/*", "/srv/.hidden", True),
    ("/srv/*", "/srv/a/b", False),
    ("/srv/*", "/srv", False),
    ("/srv/*.log", "/srv/x.log", True),
    ("/srv/*.log", "/srv/.log", True),
    ("/srv/*.log", "/srv/d/x.log", False),
    ("/srv/a*b", "/srv/ab", True),
    ("/srv/a*b", "/srv/a/b", False),
    ("/*", "/etc", True),
    ("/*", "/", False),
    # `?` is exactly one character, never '/'
    ("/dev/ttyS?", "/dev/ttyS0", True),
    ("/dev/ttyS?", "/dev/ttyS", False),
    ("/dev/ttyS?", "/dev/ttyS10", False),
    ("/a?b", "/a/b", False),
    # [...] classes, ranges, negation, ']' first, never '/'
    ("/dev/ttyUSB[0-9]", "/dev/ttyUSB7", True),
    ("/dev/ttyUSB[0-9]", "/dev/ttyUSBx", False),
    ("/dev/sd[!a]", "/dev/sdb", True),
    ("/dev/sd[!a]", "/dev/sda", False),
    ("/x/a[!b]c", "/x/a/c", False),
    ("/x/[]]", "/x/]", True),
    ("/x/[!]]", "/x/a", True),
    ("/x/[!]]", "/x/]", False),
    ("/x/[a-]", "/x/-", True),
    ("/x/[-a]", "/x/-", True),
    ("/x/[.^$]", "/x/^", True),
    ("/x/a]", "/x/a]", True),
    ("/x/a\\b", "/x/a\\b", True),
    ("/x/(a|b)+", "/x/(a|b)+", True),
    ("/x/(a|b)+*", "/x/a", False),
    # `**`: zero or more whole components
    ("/srv/www/**", "/srv/www", True),
    ("/srv/www/**", "/srv/www/a", True),
    ("/srv/www/**", "/srv/www/a/b/c", True),
    ("/srv/www/**", "/srv/wwwx", False),
    ("/srv/www/**", "/srv", False),
    ("/a/**/b", "/a/b", True),
    ("/a/**/b", "/a/x/y/b", True),
    ("/a/**/b", "/a/x/b/c", False),
    ("/a/**/b", "/a/xb", False),
    ("/**", "/", True),
    ("/**", "/a/b", True),
    ("/**/**", "/", True),
    ("/**/*.key", "/etc/ssl/site.key", True),
    ("/**/*.key", "/site.key", True),
    ("/a/**/*", "/a", False),
    ("/a/**/*", "/a/b", True),
    # runs of `**`, and several `**` in one pattern
    ("/a/**/**/b", "/a/b", True),
    ("/a/**/**/b", "/a/x/y/b", True),
    ("/**/a/**/b", "/a/b", True),
    ("/**/a/**/b", "/x/a/y/z/b", True),
    ("/**/a/**/b", "/b/a", False),
    ("/**/a/**/a", "/a", False),
    ("/**/a/**/a", "/a/a", True),
    ("/x/**/a/b/**/c", "/x/a/a/b/c", True),
    ("/x/**/a/b/**/c", "/x/a/x/b/c", False),
    # several `*` in one component
    ("/d/*_*_*.csv", "/d/a_b_c.csv", True),
    ("/d/*_*_*.csv", "/d/___.csv", True),
    ("/d/*_*_*.csv", "/d/a_b.csv", False),
    ("/d/*a*a*", "/d/aa", True),
    ("/d/*a*a*", "/d/xaxax", True),
    ("/d/*a*a*", "/d/xax", False),
    ("/d/a*?*b", "/d/ab", False),
    ("/d/a*?*b", "/d/axb", True),
    # a range spanning '/' still never matches '/'
    ("/srv/app[ -~]conf", "/srv/app/conf", False),
    ("/srv/app[ -~]conf", "/srv/app.conf", True),
    ("/srv/app[+-9]conf", "/srv/app/conf", False),
    ("/srv/app[+-9]conf", "/srv/app5conf", True),
    ("/srv/app[!x]conf", "/srv/app/conf", False),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), MATCHES)
def test_match(pattern: str, path: str, expected: bool) -> None:
    assert compile_pattern(pattern).match(path) is expected


@pytest.mark.parametrize(("pattern", "path", "expected"), MATCHES)
def test_index_agrees_with_match(pattern: str, path: str, expected: bool) -> None:
    index: PathIndex[str] = PathIndex()
    index.add(compile_pattern(pattern), "item")
    exact, buckets = index.lookup(path)
    found = exact + [item for b in buckets for m, item in b if m(path) is not None]
    assert bool(found) is expected


ERRORS = [
    ("srv/www", "path is not absolute: 'srv/www'"),
    ("", "path is not absolute: ''"),
    ("/srv//www", "path is not normalised"),
    ("/srv/./www", "path is not normalised"),
    ("/srv/../etc", "path is not normalised"),
    ("/srv/www/", "path is not normalised"),
    ("/srv/a**b", "'**' must be a whole path component, not part of 'a**b'"),
    ("/srv/**x", "'**' must be a whole path component"),
    ("/srv/***", "'**' must be a whole path component"),
    ("/dev/tty[0-9", "unbalanced '[' in 'tty[0-9'"),
    ("/dev/[]", "unbalanced '['"),
    ("/dev/[!]", "unbalanced '['"),
    ("/dev/[z-a]", "bad character class in '/dev/[z-a]'"),
    ("/a\0b", "path contains a NUL byte"),
]


@pytest.mark.parametrize(("pattern", "message"), ERRORS)
def test_errors(pattern: str, message: str) -> None:
    with pytest.raises(PatternError) as exc:
        compile_pattern(pattern)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("pattern", "prefix", "literal", "base"),
    [
        ("/", (), True, "/"),
        ("/etc/shadow", ("etc", "shadow"), True, "/etc"),
        ("/srv/www/**", ("srv", "www"), False, "/srv/www"),
        ("/dev/tty*", ("dev",), False, "/dev"),
        ("/**", (), False, "/"),
    ],
)
def test_prefix_and_base(pattern: str, prefix: tuple[str, ...], literal: bool, base: str) -> None:
    p = compile_pattern(pattern)
    assert (p.prefix, p.literal, p.base) == (prefix, literal, base)


def test_index_narrows_by_prefix_and_head() -> None:
    index: PathIndex[str] = PathIndex()
    for i in range(100):
        index.add(compile_pattern(f"/dev/tty{i}*"), f"t{i}")
        index.add(compile_pattern(f"/srv/app{i}/**"), f"a{i}")
        index.add(compile_pattern(f"/dev/exact{i}"), f"e{i}")
    index.add(compile_pattern("/**"), "all")
    index.add(compile_pattern("/dev/*"), "dev")
    exact, buckets = index.lookup("/dev/tty42x")
    assert exact == []
    assert sorted(item for b in buckets for _, item in b) == ["all", "dev", "t4", "t42"]
    exact, buckets = index.lookup("/dev/exact7")
    assert exact == ["e7"]
    assert sorted(item for b in buckets for _, item in b) == ["all", "dev"]
    _, buckets = index.lookup("/srv/app3/x/y")
    assert sorted(item for b in buckets for _, item in b) == ["a3", "all"]
    # Past the path's end only a `**` can match: /srv/app3/** matches /srv/app3.
    _, buckets = index.lookup("/srv/app3")
    assert sorted(item for b in buckets for _, item in b) == ["a3", "all"]
    _, buckets = index.lookup("/")
    assert [item for b in buckets for _, item in b] == ["all"]


# ------------------------------------------------------------- properties

_component = st.text(alphabet="abcxyz019._-", min_size=1, max_size=6).filter(
    lambda c: c not in (".", "..")
)
_path = st.lists(_component, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))


@given(_path, _path)
def test_literal_pattern_matches_only_itself(path: str, other: str) -> None:
    pattern = compile_pattern(path)
    assert pattern.match(path)
    assert pattern.match(other) is (other == path)


@given(_path, st.lists(_component, max_size=4), _component)
def test_double_star_matches_every_descendant_only(base: str, tail: list[str], extra: str) -> None:
    pattern = compile_pattern(base.rstrip("/") + "/**")
    below = "/".join([base.rstrip("/"), *tail]) if tail else base
    assert pattern.match(below)
    if base != "/":
        # A sibling that only extends the last component is not below it.
        assert not pattern.match(base + extra)


@given(_path, _component, _component)
def test_star_never_crosses_a_slash(base: str, a: str, b: str) -> None:
    prefix = base.rstrip("/")
    pattern = compile_pattern(prefix + "/*")
    assert pattern.match(f"{prefix}/{a}")
    assert not pattern.match(f"{prefix}/{a}/{b}")


def _reference(pattern: list[str], path: list[str]) -> bool:
    """Slow and obviously right: component by component, `**` by recursion."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_reference(pattern[1:], path[k:]) for k in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], pattern[0]) and _reference(pattern[1:], path[1:])


_token = st.sampled_from(["a", "b", "_", ".", "*", "?", "[ab]", "[!a]", "[a-b]", "[ -~]"])
_glob = (
    st.lists(_token, min_size=1, max_size=5)
    .map("".join)
    .filter(lambda c: "**" not in c and c not in (".", ".."))
)
_pattern_parts = st.lists(st.one_of(_glob, st.just("**")), max_size=6)
_path_parts = st.lists(
    st.text(alphabet="ab_.", min_size=1, max_size=6).filter(lambda c: c not in (".", "..")),
    max_size=7,
)


@given(_pattern_parts, _path_parts)
def test_matches_the_reference(pattern: list[str], path: list[str]) -> None:
    text, target = "/" + "/".join(pattern), "/" + "/".join(path)
    compiled = compile_pattern(text)
    expected = _reference(pattern, path)
    assert compiled.match(target) is expected
    if not compiled.literal:
        # The index's callers test `is not None`, as for a regex's fullmatch.
        assert (compiled.test(target) is not None) is expected
    index: PathIndex[str] = PathIndex()
    index.add(compiled, "item")
    exact, buckets = index.lookup(target)
    found = exact + [item for b in buckets for m, item in b if m(target) is not None]
    assert bool(found) is expected


# ---------------------------------------------- no catastrophic backtracking
# These took from seconds to minutes with backtracking regexes; the broker
# matches client paths on its event loop. No timings are asserted: the
# timeout only stops a regression from hanging the suite.


@pytest.mark.timeout(10)
@pytest.mark.parametrize("pattern", ["/d/*_*_*.csv", "/d/*_*_*_*.csv", "/d/*_*_*_*_*_*_*_*.csv"])
@pytest.mark.parametrize("size", [255, 4000])
def test_many_stars_in_a_component_stay_cheap(pattern: str, size: int) -> None:
    compiled = compile_pattern(pattern)
    assert not compiled.match("/d/" + "_" * size)
    assert not compiled.match("/d/" + "_" * size + ".cs")
    assert compiled.match("/d/" + "_" * size + ".csv")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "pattern",
    [
        "/**/**/**/x",
        "/**/a/**/a/**/a/**/x",
        "/**/*/**/*/**/*/**/x",
        "/**/*a*/**/a*/**/?/**/x",
        "/**/a/**/a/**/a/**/a/**/a/**/a/**/a/**/a/**/b",
    ],
)
def test_many_double_stars_stay_cheap(pattern: str) -> None:
    compiled = compile_pattern(pattern)
    assert not compiled.match("/a" * 2000)
    assert compiled.match("/a" * 1999 + "/x") is pattern.endswith("/x")


@pytest.mark.parametrize("body", ["[ -~]", "[+-9]", "[!x]", "[!]]", "[.-0]"])
def test_no_class_matches_a_slash(body: str) -> None:
    assert re.fullmatch(patterns._component(body), "/") is None
