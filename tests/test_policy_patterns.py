"""Path patterns and the path index: a table of matches, errors, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.patterns import PathIndex, PatternError, compile_pattern

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
