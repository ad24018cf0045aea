"""The checks every decoder runs on a field before it builds a message, and
the reply texts' clipping: shared by codec.py and netbodies.py. No I/O.

A check raises ProtocolError naming the field; it never converts a value
(a bool is not an int, a bytes is not a str).
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from .access import ALL_ACCESS, Access
from .limits import MAX_ID, MAX_PATH_BYTES, MAX_REASON_CHARS, MAX_RULE_CHARS
from .messages import Op, ProtocolError, Result


def _pack(obj: list[Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip_rule(rule: str | None) -> str | None:
    return None if rule is None else _clip(rule, MAX_RULE_CHARS)


def _result(r: Result) -> list[Any]:
    return [r.errno, r.denied, _clip(r.reason, MAX_REASON_CHARS), _clip_rule(r.rule)]


def _checked_result(raw: Any) -> Result:
    code, denied, reason, rule = _list(raw, "result", 4, 4)
    if denied and code == 0:
        raise ProtocolError("result is denied with errno 0")
    return Result(
        _int(code, "result errno", 0, 4095),
        _bool(denied, "result denied"),
        _str(reason, "result reason", MAX_REASON_CHARS),
        None if rule is None else _str(rule, "result rule", MAX_RULE_CHARS),
    )


# The checkers below take the field's name as a format string and the item's
# index: a batch of 250 items would otherwise build 1000 names per message,
# all for the error that almost never comes.


def _fail(what: str, n: int, problem: str) -> ProtocolError:
    return ProtocolError(f"{what.format(n)} {problem}")


def _int(value: Any, what: str, lo: int = 0, hi: int = MAX_ID, n: int = 0) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(what, n, f"is not an integer in [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, limit: int, n: int = 0) -> str:
    if type(value) is not str or len(value) > limit:
        raise _fail(what, n, f"is not a string of at most {limit} characters")
    return value


def _bool(value: Any, what: str, n: int = 0) -> bool:
    if type(value) is not bool:
        raise _fail(what, n, "is not a boolean")
    return value


def _list(value: Any, what: str, lo: int, hi: int, n: int = 0) -> list[Any]:
    if type(value) is not list or not lo <= len(value) <= hi:
        raise _fail(what, n, f"is not an array of {lo} to {hi} entries")
    return value


# Every valid access value, made once: building an IntFlag costs more than
# the rest of an item's checks.
_ACCESS_VALUES: tuple[Access, ...] = tuple(Access(v) for v in range(int(ALL_ACCESS) + 1))


def _access(value: Any, what: str, n: int = 0) -> Access:
    return _ACCESS_VALUES[_int(value, what, 0, int(ALL_ACCESS), n)]


def _path(value: Any, what: str, n: int = 0) -> str:
    # Shape only: a path that is a string but not normalised is a request the
    # broker answers (EINVAL with a reason), not a protocol violation.
    return _str(value, what, MAX_PATH_BYTES, n)


def _arity(obj: list[Any], n: int, op: Op) -> None:
    if len(obj) != 3 + n:
        raise ProtocolError(f"{op.name} message has {len(obj) - 3} body fields, not {n}")
