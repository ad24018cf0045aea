"""Reading policy files: includes, validation, compilation, every problem at once.

A load reads the main file, validates its top level and then each rule table
on its own (model.py), resolves user and group names with pwd/grp,
compiles the rule, and then follows `include` globs: relative to the
including file's directory, each glob's matches in sorted order, depth
first. Rule order, which decides which allow rule grants, is: a file's own
rules, then those of its includes in the order listed. Included files have
the main file's format; `version` is optional there (the main file's governs)
but must be 1 when given.

Invariants: a load never stops at the first problem (the administrator sees
them all, each with FILE:LINE and the rule's name); it never raises for
anything in the files, only the caller turns errors into PolicyError; and an
include that would revisit a file on the current include chain is an error,
so a load always terminates. A glob that matches nothing is not an error (a
drop-in directory may be empty), but a glob whose base directory (the deepest
one without wildcards) is missing is, and so is an include without wildcards
naming a missing file; a file reached twice by two includes is read once, with
a warning. An include may be absolute; `*` in a glob skips dotfiles (editor
leftovers), as glob does.

Only regular files are read (a FIFO or device would block the load for good),
at most MAX_POLICY_BYTES each. A policy someone other than root could change
(its files, the directories include globs list, anything on the way: trust.py)
is an error. A user or group name that does not resolve is an `unresolved`
error: `check` reports it, `load_policy` loads the rule without it.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from privbroker.protocol import MAX_RULE_CHARS

from .compile import Ids, Site, compile_net_rule, compile_rule, resolve_ids, rule_warnings
from .model import (
    NET_KEYS,
    AllowModel,
    DenyModel,
    FileModel,
    NetAllowModel,
    NetDenyModel,
    Source,
    describe,
)
from .rules import NetRule, Policy, PolicyError, Problem, Rule
from .trust import distrust, resolve

_FORMAT_VERSION = 1
_TOML_POS = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_POLICY_BYTES = 16 << 20
# Symlinks are followed (admins link policy files); the opened file is checked.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load, validate and compile a policy file and its includes.

    Raises:
        PolicyError: with every error found, when one of them is fatal.
            Otherwise warnings and unknown names (which leave the rules that
            name them without those names) are on Policy.warnings, and the
            unknown names on Policy.unresolved too.
    """
    loader = _Loader(Path(path))
    problems = loader.run()
    if any(p.fatal for p in problems):
        # Unknown names too: the administrator sees everything to put right at once.
        raise PolicyError(p for p in problems if not p.warning)
    return loader.policy(problems)


def check_policy(path: str | os.PathLike[str]) -> list[Problem]:
    """Every error and warning in a policy file and its includes, in file order."""
    return _Loader(Path(path)).run()


class _Loader:
    def __init__(self, main: Path) -> None:
        self.main = main
        self.problems: list[Problem] = []
        self.rules: dict[str, list[Rule]] = {"allow": [], "deny": []}
        self.net_rules: dict[str, list[NetRule]] = {"allow": [], "deny": []}
        self.names: dict[str, tuple[str, int]] = {}
        self.files: list[Path] = []
        self.dirs: list[Path] = []
        self.rank: dict[str, int] = {}
        # Files already read through an include, and where from.
        self.seen: dict[str, tuple[str, int]] = {}
        self.order = 0
        self.ids = Ids()
        # Directories and symlinks judged on the way (trust.py); directories globs list.
        self.trusted: dict[str, str | None] = {}
        self.listed: set[str] = set()

    def run(self) -> list[Problem]:
        self._load(self.main, (os.path.realpath(self.main),), main=True)
        if not (self.rules["allow"] or self.net_rules["allow"]) and not any(
            p.fatal for p in self.problems
        ):
            self._report(str(self.main), 1, None, "no allow rules: every request is denied", True)
        # Stable sort: file order first (as loaded), then line.
        self.problems.sort(key=lambda p: (self.rank.get(p.file, 0), p.line))
        return self.problems

    def policy(self, problems: list[Problem]) -> Policy:
        return Policy(
            path=self.main,
            files=tuple(self.files),
            warnings=tuple(p for p in problems if not p.fatal),
            allow_rules=tuple(self.rules["allow"]),
            deny_rules=tuple(self.rules["deny"]),
            dirs=tuple(self.dirs),
            net_allow=tuple(self.net_rules["allow"]),
            net_deny=tuple(self.net_rules["deny"]),
            unresolved=tuple(p for p in problems if p.unresolved),
        )

    def _report(self, file: str, line: int, rule: str | None, msg: str, warn: bool = False) -> None:
        self.problems.append(Problem(file, line, rule, msg, warn))

    def _load(self, path: Path, chain: tuple[str, ...], main: bool) -> None:
        label = str(path)
        self.rank.setdefault(label, len(self.rank))
        data = self._read(path, label)
        if data is None:
            return
        self.files.append(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._report(label, data.count(b"\n", 0, exc.start) + 1, None, "not UTF-8 text")
            return
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            m = _TOML_POS.search(msg)
            line = int(m.group(1)) if m and m.group(1) else len(text.splitlines()) or 1
            self._report(label, line, None, "TOML: " + (msg[: m.start()] if m else msg))
            return
        src = Source(text)
        includes = self._top(label, src, raw, main)
        for kind, model in (("allow", AllowModel), ("deny", DenyModel)):
            tables = raw.get(kind)
            for index, table in enumerate(tables if isinstance(tables, list) else ()):
                if isinstance(table, dict):
                    self._rule(label, src, kind, index, table, model)
        for pattern in includes:
            self._include(path, label, src, pattern, chain)

    def _read(self, path: Path, label: str) -> bytes | None:
        """The bytes of a regular policy file, or None with the problem reported."""
        for msg in resolve(str(path), self.trusted):
            self._report(label, 0, None, msg)
        try:
            # Look before opening: opening a device can have side effects.
            _regular(os.stat(path))
            fd = os.open(path, _OPEN_FLAGS)
        except _NotRegular as exc:
            self._report(label, 0, None, str(exc))
            return None
        except OSError as exc:
            self._report(label, 0, None, f"cannot read: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            _regular(st)  # what was opened, in case the path changed meanwhile
            if (why := distrust(st)) is not None:
                self._report(label, 0, None, f"file {why}")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_POLICY_BYTES:
                chunk = os.read(fd, min(1 << 20, MAX_POLICY_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > MAX_POLICY_BYTES:
                raise _NotRegular(f"file is larger than {MAX_POLICY_BYTES >> 20} MiB")
            return b"".join(chunks)
        except _NotRegular as exc:
            self._report(label, 0, None, str(exc))
        except OSError as exc:
            self._report(label, 0, None, f"cannot read: {exc.strerror}")
        finally:
            os.close(fd)
        return None

    def _top(self, label: str, src: Source, raw: dict[str, Any], main: bool) -> list[str]:
        """Check the top level; return the include globs that are usable."""
        try:
            FileModel.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0])
                line = (
                    src.value(None, 0, key, err["input"])
                    if len(err["loc"]) > 1
                    else (src.key(None, 0, key))
                )
                self._report(label, line, None, describe(err))
        version = raw.get("version")
        if version is None and main:
            msg = f"missing key 'version' (write version = {_FORMAT_VERSION})"
            self._report(label, 1, None, msg)
        elif type(version) is int and version != _FORMAT_VERSION:
            self._report(
                label,
                src.key(None, 0, "version"),
                None,
                f"version: this broker reads version {_FORMAT_VERSION}, not {version}",
            )
        includes = raw.get("include")
        return [i for i in includes if isinstance(i, str)] if isinstance(includes, list) else []

    def _include(
        self, path: Path, label: str, src: Source, pattern: str, chain: tuple[str, ...]
    ) -> None:
        line = src.value(None, 0, "include", pattern)
        target = Path(_tidy(str(path.parent / pattern)))
        if _magic(pattern):
            # Watch the deepest directory without wildcards that the matches hang from.
            watch = target.parent
            while _magic(str(watch)):
                watch = watch.parent
            if watch not in self.dirs:
                self.dirs.append(watch)
            where = f"include {pattern!r}: directory {watch}"
            try:
                st = os.stat(watch)
            except OSError as exc:
                gone = exc.errno in (errno.ENOENT, errno.ENOTDIR)
                msg = "does not exist" if gone else f"cannot be read: {exc.strerror}"
                self._report(label, line, None, f"{where} {msg}")
                return
            if not stat.S_ISDIR(st.st_mode):
                self._report(label, line, None, f"{where} is not a directory")
                return
            self._listed(label, line, pattern, str(watch), st)
            matches = sorted(_tidy(m) for m in glob.glob(str(target)))
            for match in matches:
                self._listed(label, line, pattern, os.path.dirname(match))
        elif target.exists():
            matches = [str(target)]
        else:
            self._report(label, line, None, f"include: {target} does not exist")
            return
        for match in matches:
            real = os.path.realpath(match)
            if real in chain:
                cycle = " -> ".join([*chain[chain.index(real) :], real])
                self._report(label, line, None, f"include cycle: {cycle}")
            elif real in self.seen:
                first = "{}:{}".format(*self.seen[real])
                self._report(
                    label,
                    line,
                    None,
                    f"include: {match} is already included by {first}; read once",
                    True,
                )
            else:
                self.seen[real] = (label, line)
                self._load(Path(match), (*chain, real), main=False)

    def _listed(
        self, label: str, line: int, pattern: str, where: str, st: os.stat_result | None = None
    ) -> None:
        """Judge a directory an include glob lists: no sticky excuse, as others
        could add files to it (and the directories and symlinks on the way)."""
        real = os.path.realpath(where)
        if real in self.listed:
            return
        self.listed.add(real)
        for msg in resolve(where, self.trusted):
            self._report(label, line, None, f"include {pattern!r}: {msg}")
        try:
            why = distrust(st or os.stat(real))
        except OSError as exc:
            why = f"cannot be checked: {exc.strerror}"
        # Judged (and reported) once: passing through it later needs no other word.
        self.trusted.setdefault(real, why)
        if why is not None:
            self._report(label, line, None, f"include {pattern!r}: directory {where} {why}")

    def _rule(
        self,
        label: str,
        src: Source,
        kind: str,
        index: int,
        table: dict[str, Any],
        model: type[AllowModel | DenyModel],
    ) -> None:
        name = table.get("name") if isinstance(table.get("name"), str) else None
        site = Site(label, src, kind, index, name)
        if name is not None:
            self._name(site, name)
        net = NET_KEYS.intersection(table)
        if net and "paths" in table:
            site.report(
                "a rule names paths (files) or sockets (network), not both: split it in two",
                sorted(net)[0],
            )
            self.problems.extend(site.problems)
            return
        if net:
            return self._net_rule(site, kind, table)
        try:
            m = model.model_validate(table)
        except ValidationError as exc:
            self._invalid(site, exc, table)
        else:
            rule = compile_rule(m, site, self.ids, self.order)
            if rule is not None:
                self.order += 1
                self.rules[kind].append(rule)
                if rule.allow:
                    rule_warnings(rule, site, self.ids)
        self.problems.extend(site.problems)

    def _invalid(self, site: Site, exc: ValidationError, table: dict[str, Any]) -> None:
        bad = set()
        for err in exc.errors():
            loc = err["loc"]
            bad.add(loc[0])
            if len(loc) > 1:
                site.report(describe(err), str(loc[0]), err["input"])
            else:
                # A missing key has no line of its own: point at the header.
                site.report(describe(err), str(loc[0]) if err["type"] != "missing" else None)
        # Unknown names too, so one pass shows everything wrong with the rule.
        for key in ("users", "groups"):
            if key not in bad and isinstance(table.get(key), list):
                resolve_ids(site, self.ids, key, table[key])

    def _net_rule(self, site: Site, kind: str, table: dict[str, Any]) -> None:
        model = NetAllowModel if kind == "allow" else NetDenyModel
        try:
            m = model.model_validate(table)
        except ValidationError as exc:
            self._invalid(site, exc, table)
        else:
            rule = compile_net_rule(m, site, self.ids, self.order)
            if rule is not None:
                self.order += 1
                self.net_rules[kind].append(rule)
        self.problems.extend(site.problems)

    def _name(self, site: Site, name: str) -> None:
        if not name.strip():
            site.report("name is empty")
        elif len(name) > MAX_RULE_CHARS:
            site.name = name[:40] + "..."
            site.report(f"name is longer than {MAX_RULE_CHARS} characters")
        elif _CONTROL.search(name):
            site.name = name.encode("unicode_escape").decode("ascii")
            site.report("name contains control characters")
        elif name in self.names:
            first = "{}:{}".format(*self.names[name])
            site.report(f"duplicate rule name (first defined at {first})")
        else:
            self.names[name] = (site.file, site.line)


class _NotRegular(Exception):
    """A policy file that must not be read: its message is the problem."""


def _regular(st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise _NotRegular(f"cannot read: {os.strerror(errno.EISDIR)}")
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular("not a regular file")
    if st.st_size > MAX_POLICY_BYTES:
        raise _NotRegular(f"file is larger than {MAX_POLICY_BYTES >> 20} MiB")


def _magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _tidy(path: str) -> str:
    """`path` without `x/..` and `.` parts, when that names the same file (no symlink in x)."""
    tidy = os.path.normpath(path)
    return tidy if os.path.realpath(tidy) == os.path.realpath(path) else path
