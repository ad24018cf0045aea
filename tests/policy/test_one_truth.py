"""One truth: what `explain --mode/--type` approves, the broker serves, and nothing else.

Every open mode against every set of access words (32 rules, each on its
own path, in one broker per kind of file): an existing regular file, a new
name, a directory and a character device (copies of /dev/null, made with
mknod, one per rule). `explain_open` (what `privbroker explain --mode M
--type T` prints) must say allowed exactly when the client's real open,
as nobody through the broker, succeeds. A rule `check` rejects (an access
word no mode can use, a word the type cannot take) is left out of the
broker's policy, and both then deny by default.
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest

from privbroker import Client
from privbroker.broker.policy.decide import (
    FileType,
    Subject,
    check_policy,
    explain_open,
    load_policy,
)
from privbroker.broker.policy.opens import MODES
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.searchable import searchable

WORDS = ("read", "write", "append", "create", "truncate")
SUBSETS = [
    [w for w, bit in zip(WORDS, bits, strict=True) if bit]
    for bits in itertools.product((0, 1), repeat=len(WORDS))
]
KINDS = {  # kind -> (types in the rule, the type explain is told; None: a new name)
    "file": ("file", FileType.FILE),
    "new": ("file", None),
    "dir": ("dir", FileType.DIR),
    "char": ("char", FileType.CHAR),
}


def _rule(i: int, words: list[str], path: str, ftype: str) -> str:
    return (
        f"[[allow]]\nname = 's{i}'\nusers = [{NOBODY}]\npaths = ['{path}']\n"
        f"access = {words!r}\ntypes = ['{ftype}']\n"
    )


def _targets(kind: str, d: Path) -> tuple[list[str], list[list[str]]]:
    """Per subset: the rule's path pattern, and the path each mode opens."""
    patterns, opens = [], []
    for i in range(len(SUBSETS)):
        if kind == "new":
            patterns.append(f"{d}/n{i}-*")
            opens.append([f"{d}/n{i}-{m}" for m in range(len(MODES))])
            continue
        path = d / f"{kind}{i}"
        if kind == "file":
            path.write_text("contents\n")
            os.chmod(path, 0o600)
        elif kind == "dir":
            path.mkdir(mode=0o700)
        else:  # /dev/null's device number, one node per rule
            null = os.stat("/dev/null").st_rdev
            os.mknod(path, stat.S_IFCHR | 0o600, null)
        patterns.append(str(path))
        opens.append([str(path)] * len(MODES))
    return patterns, opens


def _open_all(name: str, opens: list[list[str]]) -> list[list[bool]]:
    """In the child, as nobody: every open, through the broker; True when it succeeded."""
    results = []
    with Client(name) as client:
        for paths in opens:
            row = []
            for path, mode in zip(paths, MODES, strict=True):
                try:
                    fd = client.open_fd(path, mode)
                except OSError:
                    row.append(False)
                else:
                    os.close(fd)
                    row.append(True)
            results.append(row)
    return results


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_explain_and_the_broker_agree(kind: str, tmp_path: Path, start_broker) -> None:
    searchable(tmp_path)
    d = tmp_path / "t"
    d.mkdir(mode=0o755)
    types, ftype = KINDS[kind]
    patterns, opens = _targets(kind, d)
    every = tmp_path / "every.toml"
    every.write_text(
        "version = 1\n" + "".join(_rule(i, SUBSETS[i], patterns[i], types) for i in range(32))
    )
    rejected = {p.rule for p in check_policy(str(every)) if not p.warning}
    kept = [i for i in range(len(SUBSETS)) if f"s{i}" not in rejected]
    text = "version = 1\n" + "".join(_rule(i, SUBSETS[i], patterns[i], types) for i in kept)
    broker = start_broker(text)
    policy = load_policy(broker.policy)

    got = run_as(NOBODY, NOGROUP, _open_all, broker.name, opens, timeout=120)

    who = Subject(NOBODY, NOGROUP, frozenset({NOGROUP}))
    disagree = []
    served = 0
    for i, words in enumerate(SUBSETS):
        for m, mode in enumerate(MODES):
            j = explain_open(policy, who, opens[i][m], mode, ftype).judgement
            served += got[i][m]
            if j.allowed != got[i][m]:
                disagree.append(
                    f"{kind} {mode!r} rule {words}{' (rejected)' if i not in kept else ''}: "
                    f"explain {'allows' if j.allowed else 'refuses'} ({j.reason}), "
                    f"the broker {'served' if got[i][m] else 'refused'}"
                )
    assert not disagree, "\n".join(disagree)
    assert served  # each kind has rules that work


def test_a_new_file_needs_no_truncate_but_an_existing_one_does(tmp_path: Path) -> None:
    """w on a new name needs write and create; on an existing file, truncate too."""
    p = tmp_path / "p.toml"
    p.write_text(
        f"version = 1\n[[allow]]\nname = 'wc'\nusers = [{NOBODY}]\npaths = ['/x']\n"
        "access = ['write', 'create']\n"
    )
    policy = load_policy(p)
    who = Subject(NOBODY, NOGROUP, frozenset({NOGROUP}))
    for mode in ("w", "x"):
        new = explain_open(policy, who, "/x", mode, None).judgement
        assert new.allowed and new.created
        assert new.effective.words() == ["write", "create", "truncate"]
    old = explain_open(policy, who, "/x", "w", FileType.FILE).judgement
    assert not old.allowed and "truncate" in old.reason


@pytest.mark.parametrize(
    ("words", "types", "says", "error"),
    [
        # Warnings that say what to add or remove: the protocol also carries
        # access words no open() mode spells, which such a rule may serve.
        (
            ["read", "write"],
            ["file"],
            "no open mode can use 'write' in this rule on a file: add 'truncate' for r+, "
            "or 'create' for w/x/w+/x+ on a new file",
            False,
        ),
        (
            ["append"],
            ["file"],
            "no open mode can use this rule on a file: add 'create' for a",
            False,
        ),
        (
            ["create"],
            ["file"],
            "no open mode can use this rule on a file: add 'write' for w/x",
            False,
        ),
        (
            ["read", "truncate"],
            ["char"],
            "no open mode can use 'truncate' in this rule on types char: remove 'truncate'",
            False,
        ),
    ],
)
def test_check_says_what_to_add(
    tmp_path: Path, words: list[str], types: list[str], says: str, error: bool
) -> None:
    p = tmp_path / "p.toml"
    p.write_text("version = 1\n" + _rule(0, words, "/x", types[0]))
    found = [q for q in check_policy(str(p)) if "no open mode" in q.message]
    assert len(found) == 1 and says in str(found[0]), found
    assert found[0].warning is not error
