"""The policy file's shape, as pydantic models, and where things are in its text.

The models check shape only (keys, types, words, patterns, mode strings) and
do no I/O: names of users and groups are resolved later by load.py. They
are strict (TOML has real types: "1001" is not a uid, "true" is not a bool)
and forbid unknown keys, so a typo is an error and not a silently ignored
line. Each rule table is validated on its own so one bad rule does not hide
the problems of the others.

tomllib reports no positions, so `Source` finds the line of the Nth
`[[allow]]` / `[[deny]]` header, and of a key or value inside that table, by
scanning the text. It is a best effort: when a table is written inline, the
line of the `allow =` key is the closest it gets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator
from pydantic_core import ErrorDetails

from .patterns import Pattern, compile_pattern
from .sockets import Network, SocketSpec, parse_address, parse_interface, parse_spec

# uid_t/gid_t are 32 bits and (uid_t)-1 means "no change" to the kernel.
MAX_ID = 2**32 - 2
ACCESS_WORDS = ("read", "write", "append", "create", "truncate")
TYPE_WORDS = ("file", "dir", "char", "block", "fifo", "socket")
_MODE = re.compile(r"0?[0-7]{3,4}")


def _id_or_name(value: Any) -> int | str:
    if type(value) is str:
        return value
    if type(value) is int:
        if not 0 <= value <= MAX_ID:
            raise ValueError(f"id {value} is outside 0..{MAX_ID}")
        return value
    raise ValueError(f"expected a name or a number, not {value!r}")


def _pattern(value: Any) -> Pattern:
    if type(value) is not str:
        raise ValueError(f"expected a path pattern string, not {value!r}")
    return compile_pattern(value)


def _create_mode(value: Any) -> int:
    if type(value) is not str or not _MODE.fullmatch(value):
        raise ValueError(f'expected an octal string such as "0640", not {value!r}')
    mode = int(value, 8)
    if mode & ~0o777:
        raise ValueError(f"{value!r} has setuid, setgid or sticky bits; only 0000..0777 allowed")
    return mode


def _text(parse: Callable[[str], Any], what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if type(value) is not str:
            raise ValueError(f"expected {what} string, not {value!r}")
        return parse(value)

    return check


IdOrName = Annotated[int | str, PlainValidator(_id_or_name)]
SocketSpecText = Annotated[SocketSpec, PlainValidator(_text(parse_spec, "a socket spec"))]
AddressText = Annotated[Network, PlainValidator(_text(parse_address, "an address or CIDR"))]
InterfaceGlob = Annotated[str, PlainValidator(_text(parse_interface, "an interface pattern"))]
PathPattern = Annotated[Pattern, PlainValidator(_pattern)]
CreateMode = Annotated[int, PlainValidator(_create_mode)]
AccessWord = Literal["read", "write", "append", "create", "truncate"]
TypeWord = Literal["file", "dir", "char", "block", "fifo", "socket"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AllowModel(_Model):
    name: str
    users: list[IdOrName] | None = None
    groups: list[IdOrName] | None = None
    paths: list[PathPattern]
    access: list[AccessWord]
    types: list[TypeWord] = Field(default_factory=lambda: list[TypeWord](["file"]))
    follow_symlinks: bool = False
    hardlinks: bool = False
    create_mode: CreateMode | None = None  # None: not written; the rule uses 0o600


class DenyModel(_Model):
    name: str
    users: list[IdOrName] | None = None
    groups: list[IdOrName] | None = None
    paths: list[PathPattern]
    access: list[AccessWord] | None = None  # None: any access


NetworkWord = Literal["address", "link", "route"]
NETWORK_WORDS = ("address", "link", "route")
# An IPv4 device needs 68 bytes at least (RFC 791); the kernel's own ceiling.
MIN_MTU, MAX_MTU = 68, 65535
MAX_DEVICES = 1024


def _mtu_range(value: Any) -> tuple[int, int]:
    if (
        type(value) is not list
        or len(value) != 2
        or not all(type(v) is int and MIN_MTU <= v <= MAX_MTU for v in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"expected [LOW, HIGH] with {MIN_MTU} <= LOW <= HIGH <= {MAX_MTU}")
    return value[0], value[1]


def _max_devices(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_DEVICES:
        raise ValueError(f"expected an integer in 1..{MAX_DEVICES}")
    return value


MtuRange = Annotated[tuple[int, int], PlainValidator(_mtu_range)]
MaxDevices = Annotated[int, PlainValidator(_max_devices)]


class NetAllowModel(_Model):
    """A network rule: `sockets` and/or `network` instead of `paths`
    (docs/security.md, invariants 11 and 12).

    For sockets, `addresses` is what may be bound and `interfaces` the devices
    a socket is bound to; for `network` operations, `addresses` is where
    configured addresses must fall, `routes` where route destinations (and
    gateways) must fall, and `interfaces` names devices the client does not
    lease but may configure."""

    name: str
    users: list[IdOrName] | None = None
    groups: list[IdOrName] | None = None
    sockets: list[SocketSpecText] | None = None
    addresses: list[AddressText] | None = None  # None: any address
    interfaces: list[InterfaceGlob] | None = None  # None: any device (none forced)
    network: list[NetworkWord] | None = None
    routes: list[AddressText] | None = None  # None: no route may be added
    mtu: MtuRange | None = None  # None: any MTU the kernel takes
    max_devices: MaxDevices | None = None  # None: DEFAULT_MAX_DEVICES per uid


class NetDenyModel(_Model):
    name: str
    users: list[IdOrName] | None = None
    groups: list[IdOrName] | None = None
    sockets: list[SocketSpecText] | None = None
    addresses: list[AddressText] | None = None
    interfaces: list[InterfaceGlob] | None = None
    network: list[NetworkWord] | None = None
    routes: list[AddressText] | None = None


# The keys that make a rule a network rule rather than a file rule.
NET_KEYS = frozenset(
    {"sockets", "addresses", "interfaces", "network", "routes", "mtu", "max_devices"}
)


class FileModel(_Model):
    """A policy file's top level; rules stay raw tables, validated one by one."""

    version: int | None = None
    include: list[str] = Field(default_factory=list)
    allow: list[dict[str, Any]] = Field(default_factory=list)
    deny: list[dict[str, Any]] = Field(default_factory=list)


_WORDS = {"access": ACCESS_WORDS, "types": TYPE_WORDS, "network": NETWORK_WORDS}
_EXPECTED = {
    "string_type": "expected a string",
    "list_type": "expected a list",
    "bool_type": "expected true or false",
    "int_type": "expected an integer",
    "dict_type": "expected a table",
}


def describe(err: ErrorDetails) -> str:
    """One pydantic error as a short line for an administrator."""
    loc = err["loc"]
    key = str(loc[0]) if loc else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}'"
    if kind == "missing":
        return f"missing key '{loc[-1]}'"
    if kind == "literal_error":
        words = ", ".join(_WORDS.get(key, ()))
        return f"{key}: unknown word {err['input']!r} (expected {words})"
    if key in ("allow", "deny") and kind in ("list_type", "dict_type"):
        return f"{key}: expected [[{key}]] tables, one per rule"
    if kind == "value_error":
        return f"{key}: {err['ctx']['error']}"
    return f"{key}: {_EXPECTED.get(kind, err['msg'])}"


_HEADER = re.compile(r"\s*\[\[\s*(allow|deny)\s*\]\]")
_TABLE = re.compile(r"\s*\[")


class Source:
    """Line numbers (1-based) of the tables and keys of one policy file's text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: dict[str, list[int]] = {"allow": [], "deny": []}
        self._tables: list[int] = []
        for n, line in enumerate(self.lines, 1):
            if _TABLE.match(line):
                self._tables.append(n)
                m = _HEADER.match(line)
                if m:
                    self.headers[m.group(1)].append(n)

    def _find(self, rx: re.Pattern[str], start: int, end: int) -> int | None:
        for n in range(start, min(end, len(self.lines) + 1)):
            if rx.search(self.lines[n - 1]):
                return n
        return None

    def _end(self, start: int) -> int:
        """The line after the table that holds line `start`."""
        return next((t for t in self._tables if t > start), len(self.lines) + 1)

    def _region(self, kind: str | None, index: int) -> tuple[int, int]:
        if kind is None or index >= len(self.headers[kind]):
            # Top level, or a rule written inline: search the top-level lines.
            return 1, self._tables[0] if self._tables else len(self.lines) + 1
        start = self.headers[kind][index]
        return start, self._end(start)

    def rule(self, kind: str, index: int) -> int:
        """The line of the header of the index-th rule of `kind` (or of `kind =`)."""
        headers = self.headers[kind]
        return headers[index] if index < len(headers) else self.key(None, 0, kind)

    def key(self, kind: str | None, index: int, key: str) -> int:
        """The line of `key` in a rule (kind None: at the top level); else the rule's line."""
        start, end = self._region(kind, index)
        rx = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        found = self._find(rx, start, end)
        if found is None and kind is None:
            # `[allow]` written for `[[allow]]`: the header is the key's line.
            header = re.compile(rf"^\s*\[\s*{re.escape(key)}\s*\]")
            found = self._find(header, 1, len(self.lines) + 1)
        if found is not None:
            return found
        return 1 if kind is None else self.rule(kind, index)

    def value(self, kind: str | None, index: int, key: str, value: object) -> int:
        """The line of one element of a list value (lists may span lines)."""
        start = self.key(kind, index, key)
        _, end = self._region(kind, index)
        if isinstance(value, str):
            token = rf"[\"']{re.escape(value)}[\"']"
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            token = rf"(?<![\w.]){re.escape(text)}(?![\w.])"
        return self._find(re.compile(token), start, max(end, start + 1)) or start
