"""Loading and checking policy files: every problem with its exact FILE:LINE line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from privbroker.broker.policy.decide import (
    FileType,
    PolicyError,
    Problem,
    Subject,
    check_policy,
    decide,
    load_policy,
)
from privbroker.protocol import Access

POLICIES = Path(__file__).resolve().parents[2] / "policies"
OK = 'name = "r"\nusers = [1]\npaths = ["/a"]\naccess = ["read"]\n'


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root / next(iter(files))


def check(root: Path, files: dict[str, str] | str) -> list[str]:
    """check_policy on the first file, its lines with the temp dir cut off."""
    main = write(root, {"p.toml": files} if isinstance(files, str) else files)
    return [str(p).replace(f"{root}/", "") for p in check_policy(main)]


PROBLEMS = {
    "toml syntax": (
        "version = 1\n[[allow]\nname = 'x'\n",
        ["p.toml:2: TOML: Expected ']]' at the end of an array declaration"],
    ),
    "toml at end": (
        "version = 1\nx = [\n",
        ["p.toml:2: TOML: Invalid value"],
    ),
    "unknown key in rule": (
        f"version = 1\n[[allow]]\n{OK}acess = ['read']\n",
        ["p.toml:7: rule 'r': unknown key 'acess'"],
    ),
    "unknown quoted key": (
        f"version = 1\n[[allow]]\n{OK}\n# acess\n  'acess' = ['read']\n",
        ["p.toml:9: rule 'r': unknown key 'acess'"],
    ),
    "unknown top-level key": (
        f"version = 1\nincludes = ['x']\n[[allow]]\n{OK}",
        ["p.toml:2: unknown key 'includes'"],
    ),
    "missing name": (
        "version = 1\n[[allow]]\nusers = [1]\npaths = ['/a']\naccess = ['read']\n",
        ["p.toml:2: missing key 'name'"],
    ),
    "missing paths and access": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = [1]\n",
        ["p.toml:2: rule 'r': missing key 'paths'", "p.toml:2: rule 'r': missing key 'access'"],
    ),
    "missing version": (
        f"[[allow]]\n{OK}",
        ["p.toml:1: missing key 'version' (write version = 1)"],
    ),
    "version 2": (
        f"# c\nversion = 2\n[[allow]]\n{OK}",
        ["p.toml:2: version: this broker reads version 1, not 2"],
    ),
    "version string": (
        f"version = '1'\n[[allow]]\n{OK}",
        ["p.toml:1: version: expected an integer"],
    ),
    "include not a list": (
        f"version = 1\ninclude = 'x'\n[[allow]]\n{OK}",
        ["p.toml:2: include: expected a list"],
    ),
    "single-bracket table": (
        f"version = 1\n[allow]\n{OK}",
        [
            "p.toml:2: allow: expected [[allow]] tables, one per rule",
        ],
    ),
    "rule not a table": (
        "version = 1\ndeny = [1]\n[[allow]]\n" + OK,
        ["p.toml:2: deny: expected [[deny]] tables, one per rule"],
    ),
    "inline table, bad pattern": (
        "version = 1\nallow = [{name = 'r', users = [1], paths = ['rel'], access = ['read']}]\n",
        ["p.toml:2: rule 'r': paths: path is not absolute: 'rel'"],
    ),
    "patterns, one per line": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = [1]\naccess = ['read']\npaths = [\n"
        "  '/ok/**',\n  'srv/x',\n  '/srv//x',\n  '/srv/a**b',\n  '/dev/tty[0-9',\n"
        "  '/dev/[z-a]',\n  3,\n]\n",
        [
            "p.toml:8: rule 'r': paths: path is not absolute: 'srv/x'",
            "p.toml:9: rule 'r': paths: path is not normalised (empty, '.' or '..' part): "
            "'/srv//x'",
            "p.toml:10: rule 'r': paths: '**' must be a whole path component, not part of 'a**b'",
            "p.toml:11: rule 'r': paths: unbalanced '[' in 'tty[0-9'",
            "p.toml:12: rule 'r': paths: bad character class in '/dev/[z-a]': "
            "bad character range z-a",
            "p.toml:13: rule 'r': paths: expected a path pattern string, not 3",
        ],
    ),
    "unknown names": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = ['www-data', 'no-such-user', '1001']\n"
        "groups = [\n 'adm',\n 'no-such-group',\n '*',\n]\npaths = ['/a']\naccess = ['read']\n",
        [
            "p.toml:4: rule 'r': unknown user 'no-such-user'",
            "p.toml:4: rule 'r': unknown user '1001' (write a numeric user id without quotes)",
            "p.toml:7: rule 'r': unknown group 'no-such-group'",
            "p.toml:8: rule 'r': unknown group '*' ('*' is for users only)",
        ],
    ),
    "unknown names beside shape errors": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = ['no-such-user']\npaths = ['/a']\n"
        "access = ['exec']\n",
        [
            "p.toml:4: rule 'r': unknown user 'no-such-user'",
            "p.toml:6: rule 'r': access: unknown word 'exec' "
            "(expected read, write, append, create, truncate)",
        ],
    ),
    "bad ids and types": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = [-1, 4294967295, 1.5, true]\n"
        "groups = 'adm'\npaths = ['/a']\naccess = ['read']\ntypes = ['door']\n"
        "follow_symlinks = 'yes'\nhardlinks = 1\n",
        [
            "p.toml:4: rule 'r': users: id -1 is outside 0..4294967294",
            "p.toml:4: rule 'r': users: id 4294967295 is outside 0..4294967294",
            "p.toml:4: rule 'r': users: expected a name or a number, not 1.5",
            "p.toml:4: rule 'r': users: expected a name or a number, not True",
            "p.toml:5: rule 'r': groups: expected a list",
            "p.toml:8: rule 'r': types: unknown word 'door' "
            "(expected file, dir, char, block, fifo, socket)",
            "p.toml:9: rule 'r': follow_symlinks: expected true or false",
            "p.toml:10: rule 'r': hardlinks: expected true or false",
        ],
    ),
    "name not a string": (
        "version = 1\n[[allow]]\nname = 5\nusers = [1]\npaths = ['/a']\naccess = ['read']\n",
        ["p.toml:3: name: expected a string"],
    ),
    "bad names": (
        "version = 1\n[[deny]]\nname = ' '\npaths = ['/a']\n"
        f"[[deny]]\nname = '{'n' * 201}'\npaths = ['/a']\n"
        '[[deny]]\nname = "tab\\there"\npaths = ["/a"]\n'
        f"[[allow]]\n{OK}",
        [
            "p.toml:2: rule ' ': name is empty",
            f"p.toml:5: rule '{'n' * 40}...': name is longer than 200 characters",
            "p.toml:8: rule 'tab\\there': name contains control characters",
        ],
    ),
    "duplicate name": (
        f"version = 1\n[[allow]]\n{OK}\n[[deny]]\nname = 'r'\npaths = ['/b']\n",
        ["p.toml:8: rule 'r': duplicate rule name (first defined at p.toml:2)"],
    ),
    "never matches": (
        "version = 1\n[[allow]]\nname = 'r'\nusers = []\ngroups = []\npaths = []\n"
        "access = []\ntypes = []\n"
        "[[deny]]\nname = 'd'\ngroups = []\npaths = ['/a']\naccess = []\n"
        "[[allow]]\nname = 'ok'\nusers = [1]\npaths = ['/a']\naccess = ['read']\n",
        [
            "p.toml:4: rule 'r': can never match: users and groups are empty",
            "p.toml:6: rule 'r': can never match: paths is empty",
            "p.toml:7: rule 'r': can never match: access is empty",
            "p.toml:8: rule 'r': can never match: types is empty",
            "p.toml:11: rule 'd': can never match: users and groups are empty",
            "p.toml:13: rule 'd': can never match: access is empty",
        ],
    ),
    "allow needs a subject": (
        "version = 1\n[[allow]]\nname = 'r'\npaths = ['/a']\naccess = ['read']\n",
        ["p.toml:2: rule 'r': an allow rule needs users or groups"],
    ),
    "access the types cannot take": (
        "version = 1\n[[allow]]\nname = 'd'\nusers = [1]\npaths = ['/a']\n"
        "access = ['read', 'write',\n 'append', 'create', 'truncate']\ntypes = ['dir']\n"
        "[[allow]]\nname = 'c'\nusers = [1]\npaths = ['/a']\naccess = ['write', 'create']\n"
        "types = ['char', 'block', 'fifo', 'socket']\n",
        [
            "p.toml:6: rule 'd': access 'write' cannot apply to types dir",
            "p.toml:7: rule 'd': access 'append' cannot apply to types dir",
            "p.toml:7: rule 'd': access 'create' cannot apply to types dir "
            "(the broker creates regular files only)",
            "p.toml:7: rule 'd': access 'truncate' cannot apply to types dir",
            "p.toml:13: rule 'c': access 'create' cannot apply to types char, block, fifo, "
            "socket (the broker creates regular files only)",
        ],
    ),
    "create modes": (
        "version = 1\n"
        + "".join(
            f"[[allow]]\nname = 'm{n}'\nusers = [1]\npaths = ['/a']\naccess = ['create']\n"
            f"create_mode = {mode}\n"
            for n, mode in enumerate(['"4755"', '"1777"', '"0999"', "416", '"rw-r-----"', '""'])
        ),
        [
            "p.toml:7: rule 'm0': create_mode: '4755' has setuid, setgid or sticky bits; "
            "only 0000..0777 allowed",
            "p.toml:13: rule 'm1': create_mode: '1777' has setuid, setgid or sticky bits; "
            "only 0000..0777 allowed",
            "p.toml:19: rule 'm2': create_mode: expected an octal string such as \"0640\", "
            "not '0999'",
            "p.toml:25: rule 'm3': create_mode: expected an octal string such as \"0640\", not 416",
            "p.toml:31: rule 'm4': create_mode: expected an octal string such as \"0640\", "
            "not 'rw-r-----'",
            "p.toml:37: rule 'm5': create_mode: expected an octal string such as \"0640\", not ''",
        ],
    ),
    "deny has no types": (
        f"version = 1\n[[allow]]\n{OK}[[deny]]\nname = 'd'\npaths = ['/a']\ntypes = ['file']\n",
        ["p.toml:10: rule 'd': unknown key 'types'"],
    ),
    "not utf-8": ("version = 1\n# caf\udce9\n", ["p.toml:2: not UTF-8 text"]),
}


@pytest.mark.parametrize(("text", "expected"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_problem_lines(tmp_path: Path, text: str, expected: list[str]) -> None:
    main = tmp_path / "p.toml"
    main.write_bytes(text.encode("utf-8", "surrogateescape"))
    lines = [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)]
    assert [line for line in lines if "warning:" not in line] == expected
    with pytest.raises(PolicyError) as exc:
        load_policy(main)
    assert [str(p).replace(f"{tmp_path}/", "") for p in exc.value.problems] == expected
    assert str(exc.value).replace(f"{tmp_path}/", "") == "\n".join(expected)


def test_unreadable_file(tmp_path: Path) -> None:
    files = {"p.toml": "version = 1\ninclude = ['d']\n" + _rule("r"), "d/x": ""}
    assert check(tmp_path, files) == ["d: cannot read: Is a directory"]
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "missing.toml")
    assert str(exc.value) == f"{tmp_path}/missing.toml: cannot read: No such file or directory"


def test_problem_str() -> None:
    assert str(Problem("f", 3, "r", "bad")) == "f:3: rule 'r': bad"
    assert str(Problem("f", 3, None, "bad")) == "f:3: bad"
    assert str(Problem("f", 0, None, "bad")) == "f: bad"
    assert str(Problem("f", 3, "r", "hmm", warning=True)) == "f:3: rule 'r': warning: hmm"


# ---------------------------------------------------------------- warnings


def test_warnings(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    for name, mode, owner, group in [
        ("world", 0o777, 0, 0),
        ("sticky", 0o1777, 0, 0),
        ("nobodys", 0o755, 65534, 0),
        ("admgroup", 0o775, 0, 4),
        ("wwwgroup", 0o775, 0, 33),
        ("rootonly", 0o755, 0, 0),
    ]:
        (tmp_path / name).mkdir()
        os.chown(tmp_path / name, owner, group)
        os.chmod(tmp_path / name, mode)
    (tmp_path / "world" / "sub").mkdir(mode=0o755)
    t = tmp_path
    text = f"""\
        version = 1
        [[allow]]
        name = "anyone"
        users = ["*"]
        paths = ["{t}/rootonly/x"]
        access = ["read"]
        [[allow]]
        name = "refused places"
        users = [1]
        paths = ["/proc/**", "/dev/fd/*", "/dev/std*", "/**", "/dev/null"]
        access = ["read"]
        [[allow]]
        name = "writable"
        users = ["nobody"]
        groups = ["adm"]
        paths = [
          "{t}/world/*",
          "{t}/world/sub/**",
          "{t}/sticky/*",
          "{t}/nobodys/**",
          "{t}/admgroup/*.log",
          "{t}/rootonly/*",
          "{t}/absent/*",
          "{t}/world/literal",
        ]
        access = ["read"]
        [[allow]]
        name = "follow"
        users = ["www-data", 0]
        paths = ["{t}/wwwgroup/x", "{t}/rootonly/y"]
        access = ["read", "write", "truncate"]
        follow_symlinks = true
        [[allow]]
        name = "root only"
        users = [0]
        paths = ["{t}/nobodys/*"]
        access = ["read"]
        [[allow]]
        name = "uid without passwd entry"
        users = [4000000]
        paths = ["{t}/admgroup/*", "{t}/admgroup/x*"]
        access = ["read"]
        """
    main = write(tmp_path, {"p.toml": text})
    lines = [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)]
    assert lines == [
        "p.toml:4: rule 'anyone': warning: users '*' grants this to every user on the machine",
        "p.toml:10: rule 'refused places': warning: path '/proc/**' covers /proc, which the "
        "broker refuses whatever the policy says",
        "p.toml:10: rule 'refused places': warning: path '/dev/fd/*' covers /dev/fd, which "
        "the broker refuses whatever the policy says",
        "p.toml:10: rule 'refused places': warning: path '/dev/std*' covers /dev/std*, which "
        "the broker refuses whatever the policy says",
        "p.toml:10: rule 'refused places': warning: path '/**' covers /proc, /dev/fd, "
        "/dev/std*, which the broker refuses whatever the policy says",
        "p.toml:17: rule 'writable': warning: users it grants can write world, so they "
        "choose what 'world/*' matches there",
        "p.toml:18: rule 'writable': warning: users it grants can write world, so they "
        "choose what 'world/sub/**' matches there",
        "p.toml:19: rule 'writable': warning: users it grants can write sticky, so they "
        "choose what 'sticky/*' matches there",
        "p.toml:20: rule 'writable': warning: users it grants can write nobodys, so "
        "they choose what 'nobodys/**' matches there",
        "p.toml:21: rule 'writable': warning: users it grants can write admgroup, so "
        "they choose what 'admgroup/*.log' matches there",
        "p.toml:30: rule 'follow': warning: follows symlinks under wwwgroup, which "
        "users it grants can write: they can aim 'wwwgroup/x' at any other file the "
        "policy allows them",
    ]
    policy = load_policy(main)
    assert [str(w).replace(f"{tmp_path}/", "") for w in policy.warnings] == lines


def test_warning_create_mode_without_create(tmp_path: Path) -> None:
    lines = check(tmp_path, f"version = 1\n[[allow]]\n{OK}create_mode = '0644'\n")
    assert lines == [
        "p.toml:7: rule 'r': warning: create_mode has no effect without 'create' access"
    ]


def test_warning_no_allow_rules(tmp_path: Path) -> None:
    lines = check(tmp_path, "version = 1\n[[deny]]\nname = 'd'\npaths = ['/a']\n")
    assert lines == ["p.toml:1: warning: no allow rules: every request is denied"]
    assert load_policy(tmp_path / "p.toml").rule_count == 1


# ---------------------------------------------------------------- includes


def _rule(name: str, path: str = "/a") -> str:
    return f"[[allow]]\nname = '{name}'\nusers = [1]\npaths = ['{path}']\naccess = ['read']\n"


def test_includes_sorted_nested_in_order(tmp_path: Path) -> None:
    files = {
        "p.toml": "version = 1\ninclude = ['d/1*.toml', 'd/2*.toml', 'later.toml', "
        "'empty.d/*.toml', 'e*/*/*.toml']\n" + _rule("main"),
        "d/20-b.toml": _rule("b"),
        "d/10-a.toml": "include = ['../sub/*.toml']\n" + _rule("a"),
        "d/.hidden.toml": _rule("hidden"),
        "d/notes.txt": "not toml",
        "sub/x.toml": "version = 1\n" + _rule("x"),
        "later.toml": _rule("later", "/b"),
    }
    main = write(tmp_path, files)
    (tmp_path / "empty.d").mkdir()
    assert check_policy(main) == []
    policy = load_policy(main)
    assert [r.name for r in policy.allow_rules] == ["main", "a", "x", "b", "later"]
    assert [str(f.relative_to(tmp_path)) for f in policy.files] == [
        "p.toml",
        "d/10-a.toml",
        "sub/x.toml",
        "d/20-b.toml",
        "later.toml",
    ]
    assert [str(d.relative_to(tmp_path)) for d in policy.dirs] == ["d", "sub", "empty.d", "."]
    assert policy.path == main and policy.rule_count == 5
    # The first allowing rule in load order decides.
    d = decide(policy, Subject(1, 1, frozenset({1})), "/a", Access.READ, FileType.FILE)
    assert d.rule == "main"


def test_include_problems(tmp_path: Path) -> None:
    files = {
        "p.toml": "version = 1\ninclude = [\n  'd/*.toml',\n  'missing.toml',\n  'none/*.toml',\n"
        "]\n" + _rule("main"),
        "d/a.toml": "include = ['../e/c.toml']\n" + _rule("a"),
        "d/b.toml": "version = 2\n" + _rule("main"),
        "e/c.toml": "version = 1\ninclude = ['../p.toml', '../d/b.toml']\n" + _rule("c"),
    }
    assert check(tmp_path, files) == [
        "p.toml:3: warning: include: d/b.toml is already included by e/c.toml:2; read once",
        "p.toml:4: include: missing.toml does not exist",
        "p.toml:5: include 'none/*.toml': directory none does not exist",
        "e/c.toml:2: include cycle: p.toml -> d/a.toml -> e/c.toml -> p.toml",
        "d/b.toml:1: version: this broker reads version 1, not 2",
        "d/b.toml:2: rule 'main': duplicate rule name (first defined at p.toml:7)",
    ]


def test_include_of_itself(tmp_path: Path) -> None:
    lines = check(tmp_path, "version = 1\ninclude = ['*.toml']\n" + _rule("r"))
    assert lines == ["p.toml:2: include cycle: p.toml -> p.toml"]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    files = {
        "p.toml": "version = 1\ninclude = ['d/*.toml']\n" + _rule("web"),
        "d/x.toml": "# drop-in\n\n" + _rule("web"),
    }
    assert check(tmp_path, files) == [
        "d/x.toml:3: rule 'web': duplicate rule name (first defined at p.toml:3)"
    ]


# ------------------------------------------ file types, size, ownership


@pytest.mark.timeout(20)
def test_fifo_include_is_an_error_not_a_hang(tmp_path: Path) -> None:
    files = {"p.toml": "version = 1\ninclude = ['fifo.toml', 'd/*.toml']\n" + _rule("r")}
    main = write(tmp_path, files)
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "x.toml")
    os.symlink("/dev/zero", tmp_path / "d" / "y.toml")  # a device, through a symlink
    assert [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)] == [
        "fifo.toml: not a regular file",
        "d/x.toml: not a regular file",
        "d/y.toml: not a regular file",
    ]
    with pytest.raises(PolicyError):
        load_policy(main)


@pytest.mark.timeout(20)
def test_fifo_main_file_is_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.toml")
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "p.toml")
    assert str(exc.value) == f"{tmp_path}/p.toml: not a regular file"


def test_symlinked_policy_file_is_read(tmp_path: Path) -> None:
    write(tmp_path, {"real.toml": "version = 1\n" + _rule("r")})
    os.symlink(tmp_path / "real.toml", tmp_path / "p.toml")
    assert load_policy(tmp_path / "p.toml").rule_count == 1


def test_file_too_large(tmp_path: Path) -> None:
    main = write(tmp_path, {"p.toml": "version = 1\ninclude = ['big.toml']\n" + _rule("r")})
    with open(tmp_path / "big.toml", "wb") as f:
        f.truncate((16 << 20) + 1)
    assert [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)] == [
        "big.toml: file is larger than 16 MiB"
    ]


def test_missing_include_directory_is_an_error(tmp_path: Path) -> None:
    files = {
        "p.toml": "version = 1\ninclude = [\n  'policy.d/*.toml',\n  'f/*.toml',\n"
        "  'empty.d/*.toml',\n]\n" + _rule("r"),
        "f": "",
    }
    main = write(tmp_path, files)
    (tmp_path / "empty.d").mkdir()
    assert [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)] == [
        "p.toml:3: include 'policy.d/*.toml': directory policy.d does not exist",
        "p.toml:4: include 'f/*.toml': directory f is not a directory",
    ]
    with pytest.raises(PolicyError) as exc:
        load_policy(main)
    assert f"{main}:3: include 'policy.d/*.toml': directory {tmp_path}/policy.d does not " in str(
        exc.value
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_writable_or_foreign_files_and_dirs_are_errors(tmp_path: Path) -> None:
    # More cases, and the directories above: tests/policy/test_trust.py.
    files = {
        "p.toml": "version = 1\ninclude = ['d/*.toml', 'theirs.toml']\n" + _rule("r"),
        "d/a.toml": _rule("a"),
        "theirs.toml": _rule("t"),
    }
    main = write(tmp_path, files)
    os.chmod(main, 0o666)
    os.chmod(tmp_path / "d", 0o777)
    os.chown(tmp_path / "theirs.toml", 65534, 0)
    lines = [str(p).replace(f"{tmp_path}/", "") for p in check_policy(main)]
    assert lines == [
        "p.toml: file is writable by group/others (mode 0666)",
        "p.toml:2: include 'd/*.toml': directory d is writable by group/others (mode 0777)",
        "theirs.toml: file is owned by uid 65534, not root",
    ]
    with pytest.raises(PolicyError) as exc:
        load_policy(main)
    assert [str(p).replace(f"{tmp_path}/", "") for p in exc.value.problems] == lines


# ------------------------------------------------------- shipped policies


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    errors = [p for p in check_policy(path) if not p.warning]
    assert errors == []
    assert load_policy(path).rule_count > 0


def test_example_policy_decides_its_cases() -> None:
    policy = load_policy(POLICIES / "example.toml")
    www = Subject(33, 33, frozenset({33}))
    adm = Subject(1000, 1000, frozenset({1000, 4}))
    dial = Subject(1000, 1000, frozenset({1000, 20}))
    backup = Subject(34, 34, frozenset({34}))
    r, rw = Access.READ, Access.READ | Access.WRITE
    cases = [
        (www, "/etc/ssl/private/site.key", r, FileType.FILE, True),
        (www, "/etc/ssl/private/other.key", r, FileType.FILE, False),
        (adm, "/var/log/syslog", r, FileType.FILE, True),
        (adm, "/var/log/apt", r, FileType.DIR, True),
        (adm, "/var/log/syslog", rw, FileType.FILE, False),
        (dial, "/dev/ttyUSB0", rw, FileType.CHAR, True),
        (dial, "/dev/ttyUSB0", rw, FileType.FILE, False),
        (backup, "/srv/data/a/b", r, FileType.FILE, True),
        (backup, "/srv/data/a/b", Access.WRITE, FileType.FILE, False),
        (www, "/etc/shadow", r, None, False),
        (Subject(0, 0, frozenset({0})), "/etc/ssl/private/site.key", r, None, False),
    ]
    for who, path, access, ftype, allowed in cases:
        assert decide(policy, who, path, access, ftype).allowed is allowed, (who, path)
