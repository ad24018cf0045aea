"""Access words, open modes and paths: what an OPEN item says, checked before
any I/O. No I/O."""

from __future__ import annotations

import enum
from typing import Any

from .limits import MAX_PATH_BYTES, NAME_MAX_BYTES


class Access(enum.IntFlag):
    """The policy's access words; a request carries the set it needs."""

    NONE = 0
    READ = 1
    WRITE = 2
    APPEND = 4
    CREATE = 8
    TRUNCATE = 16

    @classmethod
    def from_words(cls, words: Any) -> Access:
        acc = cls.NONE
        for word in words:
            flag = _WORDS.get(word) if isinstance(word, str) else None
            if flag is None:
                raise ValueError(f"unknown access word {word!r}")
            acc |= flag
        return acc

    def words(self) -> list[str]:
        return [a.name.lower() for a in _ACCESS_WORDS if a in self and a.name]


_ACCESS_WORDS = (Access.READ, Access.WRITE, Access.APPEND, Access.CREATE, Access.TRUNCATE)
ALL_ACCESS: Access = Access.READ | Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE
_WORDS = {str(a.name).lower(): a for a in _ACCESS_WORDS}


def access_for_mode(mode: str) -> tuple[Access, bool]:
    """Map an `open()` mode to (access words, exclusive), as docs/protocol.md says.

    r: read; w: write+create+truncate; a: append+create; x: write+create,
    exclusive; `+` adds read and write; `b`/`t` change nothing here.

    Raises:
        ValueError: the mode is not one the builtin open() accepts.
    """
    # Every open pays for this, and a program uses a handful of modes: answers
    # are remembered. Only valid modes of exactly str are: each character at
    # most once, so at most 76 are ever stored, and a str subclass
    # (whose == or hash could lie) is parsed every time.
    known = _MODES.get(mode) if type(mode) is str else None
    if known is None:
        known = _parse_mode(mode)
        if type(mode) is str:
            _MODES[mode] = known
    return known


def _parse_mode(mode: str) -> tuple[Access, bool]:
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [c for c in mode if c in "rwax"]
    if (
        len(kinds) != 1
        or len(set(mode)) != len(mode)
        or set(mode) - set("rwaxbt+")
        or ("b" in mode and "t" in mode)
    ):
        raise ValueError(f"invalid mode: {mode!r}")
    acc = {
        "r": Access.READ,
        "w": Access.WRITE | Access.CREATE | Access.TRUNCATE,
        "a": Access.APPEND | Access.CREATE,
        "x": Access.WRITE | Access.CREATE,
    }[kinds[0]]
    if "+" in mode:
        acc |= Access.READ | Access.WRITE
    return acc, kinds[0] == "x"


_MODES: dict[str, tuple[Access, bool]] = {}


def check_path(path: str) -> str:
    """Return `path` if it is absolute and normalised, else raise ValueError.

    The broker judges exactly the string it is given, so it accepts only the
    one spelling of a path: no `.`, `..`, empty component, trailing slash or NUL,
    and no component longer than NAME_MAX (255) bytes.
    """
    if not isinstance(path, str):
        raise ValueError(f"path must be str, not {type(path).__name__}")
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    if not path.startswith("/"):
        raise ValueError(f"path is not absolute: {path!r}")
    try:
        # Strict: the wire carries msgpack str, which is UTF-8 only, so a
        # surrogate-escaped (non-UTF-8) name could never be sent.
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"path is not valid UTF-8: {path!r}") from None
    if size > MAX_PATH_BYTES:
        raise ValueError(f"path is longer than {MAX_PATH_BYTES} bytes")
    if path != "/":
        for part in path[1:].split("/"):
            if part in ("", ".", ".."):
                raise ValueError(f"path is not normalised (empty, '.' or '..' part): {path!r}")
            # The kernel refuses such a name (ENAMETOOLONG) anyway, and this
            # bounds what a policy pattern is matched against.
            if len(part) > NAME_MAX_BYTES // 4 and len(part.encode("utf-8")) > NAME_MAX_BYTES:
                raise ValueError(f"path component longer than {NAME_MAX_BYTES} bytes")
    return path
