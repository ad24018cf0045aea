"""The privbroker wire protocol: message types, limits and bytes. No I/O.

Transport: an AF_UNIX SOCK_SEQPACKET connection. Every datagram holds exactly
one msgpack array; the client sends requests, the broker answers each with one
reply carrying the same request id, and the fds an open produced ride on that
reply as SCM_RIGHTS, in the order of the successful results.

    request:  [VERSION, op, id, *body]
    reply:    [VERSION, op, id, *body]

    Op.OPEN     body [[path, access, exclusive], ...]        (1..MAX_BATCH items)
                reply [[errno, denied, reason, rule], ...]   (one per item)
    Op.EXPLAIN  body [uid, [gid, ...], path, access]         (root peers only)
                reply [allowed, rule, reason, near_rule, near_reason]
    Op.STATUS   body []                                      (root peers only)
                reply [{name: value, ...}]
    Op.ERROR    (reply only) [errno, reason]: the request as a whole was refused

Rule 1: decoding checks size, shape and every type before building a message;
anything else raises ProtocolError, and the peer that sent it is a protocol
violator (the broker closes the connection; the client poisons its own).
Rule 2: messages are frozen dataclasses; raw msgpack objects never leave this
module.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

import msgpack  # type: ignore[import-untyped]

__version__ = "0.1.0"

VERSION = 1
DEFAULT_SOCKET = "privbroker"
SOCKET_ENV = "PRIVBROKER_SOCKET"

# Linux PATH_MAX: a longer path could not be opened by the kernel anyway.
MAX_PATH_BYTES = 4096
# SCM_MAX_FD is 253 fds per message; keep headroom below the kernel's cap.
MAX_BATCH = 250
# A full batch of typical paths fits; stays under the default unix sk_sndbuf
# (212992 bytes), beyond which a SEQPACKET send fails with EMSGSIZE.
MAX_REQUEST_BYTES = 128 * 1024
# Reasons are clipped so that a full batch of results still fits in one reply.
MAX_REASON_CHARS = 400
MAX_RULE_CHARS = 200
MAX_REPLY_BYTES = 200 * 1024
# An explain reply's reasons are prose about a whole rule; still bounded.
MAX_EXPLAIN_REASON_CHARS = MAX_REASON_CHARS * 4
# Linux NGROUPS_MAX: no process can have more groups than this to explain.
MAX_GIDS = 65536
# Request ids are msgpack uint64 on the wire; keep them in a signed int64.
_MAX_ID = 2**63 - 1
# msgpack nesting bound: our deepest message is 4 levels; refuse bombs early.
_MAX_DEPTH = 4
# Map entries a status reply may carry; anything larger is not ours.
_MAX_MAP_LEN = 256


class ProtocolError(Exception):
    """Bytes that are not a valid privbroker message."""


class Op(enum.IntEnum):
    OPEN = 1
    EXPLAIN = 2
    STATUS = 3
    ERROR = 4


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
_ALL_ACCESS = Access.READ | Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE
_WORDS = {str(a.name).lower(): a for a in _ACCESS_WORDS}


def access_for_mode(mode: str) -> tuple[Access, bool]:
    """Map an `open()` mode to (access words, exclusive), as DESIGN.md says.

    r: read; w: write+create+truncate; a: append+create; x: write+create,
    exclusive; `+` adds read and write; `b`/`t` change nothing here.

    Raises:
        ValueError: the mode is not one the builtin open() accepts.
    """
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


def check_path(path: str) -> str:
    """Return `path` if it is absolute and normalised, else raise ValueError.

    The broker judges exactly the string it is given, so it accepts only the
    one spelling of a path: no `.`, `..`, empty component, trailing slash or NUL.
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
    return path


@dataclass(frozen=True, slots=True)
class OpenItem:
    path: str
    access: Access
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class OpenRequest:
    id: int
    items: tuple[OpenItem, ...]


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    id: int
    uid: int
    gids: tuple[int, ...]
    path: str
    access: Access


@dataclass(frozen=True, slots=True)
class StatusRequest:
    id: int


Request: TypeAlias = OpenRequest | ExplainRequest | StatusRequest


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one open: errno 0 means an fd rides on the reply."""

    errno: int = 0
    denied: bool = False
    reason: str = ""
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class OpenReply:
    id: int
    results: tuple[Result, ...]

    @property
    def nfds(self) -> int:
        return sum(1 for r in self.results if r.errno == 0)


@dataclass(frozen=True, slots=True)
class ExplainReply:
    id: int
    allowed: bool
    rule: str | None
    reason: str
    near_rule: str | None = None
    near_reason: str = ""


@dataclass(frozen=True, slots=True)
class StatusReply:
    id: int
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    errno: int
    reason: str


Reply: TypeAlias = OpenReply | ExplainReply | StatusReply | ErrorReply

# The errno values a broker sends, and why. README.md renders this table.
ERRNO_CAUSES: Mapping[int, str] = MappingProxyType(
    {
        _errno.EACCES: "denied by policy (denied=true, with reason and rule), or by the kernel",
        _errno.EPERM: "request needs a root client (explain, status), or the kernel refused",
        _errno.ENOENT: "the path, or a directory on it, does not exist",
        _errno.ENOTDIR: "a component of the path is not a directory",
        _errno.ELOOP: "a symlink or magic link on the path, and the rule does not follow it",
        _errno.EXDEV: "resolution left the allowed tree (a magic link or mount crossing)",
        _errno.EISDIR: "a directory was asked for with write access",
        _errno.EEXIST: "exclusive create and the file exists",
        _errno.EAGAIN: "the path kept changing during resolution (rename race); try again",
        _errno.ENXIO: "a FIFO opened for writing has no reader, or a device is absent",
        _errno.ETIMEDOUT: "the open took longer than the broker's open timeout",
        _errno.EBUSY: "too many requests in flight on this connection",
        _errno.EINVAL: "an item the broker cannot act on (e.g. exclusive without create)",
        _errno.ENAMETOOLONG: "a path component is longer than the filesystem allows",
        _errno.EMFILE: "the broker is out of file descriptors",
        _errno.EPROTO: "unsupported protocol version (an ERROR reply, then the broker closes)",
    }
)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip_rule(rule: str | None) -> str | None:
    return None if rule is None else _clip(rule, MAX_RULE_CHARS)


# ----------------------------------------------------------------- encoding


def _pack(obj: list[Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def encode_request(req: Request) -> bytes:
    """Encode a request, raising ValueError when it breaks a limit."""
    if isinstance(req, OpenRequest):
        if not 1 <= len(req.items) <= MAX_BATCH:
            raise ValueError(f"a request opens 1 to {MAX_BATCH} paths, not {len(req.items)}")
        body: list[Any] = [[[i.path, int(i.access), i.exclusive] for i in req.items]]
        op = Op.OPEN
    elif isinstance(req, ExplainRequest):
        if len(req.gids) > MAX_GIDS:
            raise ValueError(f"at most {MAX_GIDS} gids, not {len(req.gids)}")
        body = [req.uid, list(req.gids), req.path, int(req.access)]
        op = Op.EXPLAIN
    else:
        body, op = [], Op.STATUS
    data = _pack([VERSION, int(op), req.id, *body])
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request is {len(data)} bytes, over the {MAX_REQUEST_BYTES} limit")
    return data


def encode_reply(rep: Reply) -> bytes:
    if isinstance(rep, OpenReply):
        op = Op.OPEN
        body: list[Any] = [
            [
                [
                    r.errno,
                    r.denied,
                    _clip(r.reason, MAX_REASON_CHARS),
                    _clip_rule(r.rule),
                ]
                for r in rep.results
            ]
        ]
    elif isinstance(rep, ExplainReply):
        op = Op.EXPLAIN
        body = [
            rep.allowed,
            _clip_rule(rep.rule),
            _clip(rep.reason, MAX_EXPLAIN_REASON_CHARS),
            _clip_rule(rep.near_rule),
            _clip(rep.near_reason, MAX_EXPLAIN_REASON_CHARS),
        ]
    elif isinstance(rep, StatusReply):
        op, body = Op.STATUS, [dict(rep.fields)]
    else:
        op, body = Op.ERROR, [rep.errno, _clip(rep.reason, MAX_REASON_CHARS)]
    return _pack([VERSION, int(op), rep.id, *body])


# ----------------------------------------------------------------- decoding


def _unpack(data: bytes, limit: int) -> list[Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("message is not bytes")
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes is over the {limit} limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_PATH_BYTES * 4,
            max_bin_len=0,
            max_ext_len=0,
            # Every element takes at least one byte, so the byte limit already
            # bounds what the unpacker preallocates; each field's own count is
            # checked below (a batch, or an explain's up to 65536 gids).
            max_array_len=limit,
            max_map_len=_MAX_MAP_LEN,
        )
    except (ValueError, TypeError, RecursionError) as exc:
        # msgpack's own errors (FormatError, StackError, ExtraData, bad UTF-8,
        # non-str map keys, over-long containers) are all ValueError subclasses.
        raise ProtocolError(f"not a msgpack message: {exc}") from None
    if type(obj) is not list or len(obj) < 3:
        raise ProtocolError("message is not an array of [version, op, id, ...]")
    if _too_deep(obj, _MAX_DEPTH):
        raise ProtocolError("message is nested too deeply")
    version, op, ident = obj[0], obj[1], obj[2]
    if type(version) is not int:
        raise ProtocolError("version is not an integer")
    if version != VERSION:
        valid_id = type(ident) is int and 0 <= ident <= _MAX_ID
        raise UnsupportedVersion(version, ident if valid_id else 0)
    _int(op, "op")
    _int(ident, "id")
    return obj


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels.

    Stops descending at the limit, so a deeply nested bomb (msgpack allows
    about a thousand levels) costs no recursion past `limit` frames.
    """
    if type(obj) is list:
        children: Any = obj
    elif type(obj) is dict:
        children = obj.values()
    else:
        return False
    if limit == 0:
        return True
    return any(_too_deep(child, limit - 1) for child in children)


class UnsupportedVersion(ProtocolError):
    """A well-formed message from a different protocol version."""

    def __init__(self, version: int, ident: int) -> None:
        super().__init__(f"protocol version {version} not supported; this side speaks {VERSION}")
        self.version = version
        self.id = ident


def _int(value: Any, what: str, lo: int = 0, hi: int = _MAX_ID) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what} is not an integer in [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit:
        raise ProtocolError(f"{what} is not a string of at most {limit} characters")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} is not a boolean")
    return value


def _list(value: Any, what: str, lo: int, hi: int) -> list[Any]:
    if type(value) is not list or not lo <= len(value) <= hi:
        raise ProtocolError(f"{what} is not an array of {lo} to {hi} entries")
    return value


def _access(value: Any, what: str) -> Access:
    return Access(_int(value, what, 0, int(_ALL_ACCESS)))


def _path(value: Any, what: str) -> str:
    # Shape only: a path that is a string but not normalised is a request the
    # broker answers (EINVAL with a reason), not a protocol violation.
    return _str(value, what, MAX_PATH_BYTES)


def _arity(obj: list[Any], n: int, op: Op) -> None:
    if len(obj) != 3 + n:
        raise ProtocolError(f"{op.name} message has {len(obj) - 3} body fields, not {n}")


def decode_request(data: bytes) -> Request:
    """Decode one request datagram, or raise ProtocolError."""
    obj = _unpack(data, MAX_REQUEST_BYTES)
    op, ident = obj[1], obj[2]
    if op == Op.OPEN:
        _arity(obj, 1, Op.OPEN)
        items = []
        for n, raw in enumerate(_list(obj[3], "items", 1, MAX_BATCH)):
            entry = _list(raw, f"item {n}", 3, 3)
            items.append(
                OpenItem(
                    _path(entry[0], f"item {n} path"),
                    _access(entry[1], f"item {n} access"),
                    _bool(entry[2], f"item {n} exclusive"),
                )
            )
        return OpenRequest(ident, tuple(items))
    if op == Op.EXPLAIN:
        _arity(obj, 4, Op.EXPLAIN)
        gids = tuple(_int(g, "gid", 0, 2**32 - 1) for g in _list(obj[4], "gids", 0, MAX_GIDS))
        return ExplainRequest(
            ident,
            _int(obj[3], "uid", 0, 2**32 - 1),
            gids,
            _path(obj[5], "path"),
            _access(obj[6], "access"),
        )
    if op == Op.STATUS:
        _arity(obj, 0, Op.STATUS)
        return StatusRequest(ident)
    raise ProtocolError(f"unknown operation {op}")


def decode_reply(data: bytes) -> Reply:
    """Decode one reply datagram, or raise ProtocolError."""
    obj = _unpack(data, MAX_REPLY_BYTES)
    op, ident = obj[1], obj[2]
    if op == Op.OPEN:
        _arity(obj, 1, Op.OPEN)
        results = []
        for n, raw in enumerate(_list(obj[3], "results", 1, MAX_BATCH)):
            entry = _list(raw, f"result {n}", 4, 4)
            rule = entry[3]
            result = Result(
                _int(entry[0], f"result {n} errno", 0, 4095),
                _bool(entry[1], f"result {n} denied"),
                _str(entry[2], f"result {n} reason", MAX_REASON_CHARS),
                None if rule is None else _str(rule, f"result {n} rule", MAX_RULE_CHARS),
            )
            # A denial with errno 0 would count as an fd that never came.
            if result.denied and result.errno == 0:
                raise ProtocolError(f"result {n} is denied with errno 0")
            results.append(result)
        return OpenReply(ident, tuple(results))
    if op == Op.EXPLAIN:
        _arity(obj, 5, Op.EXPLAIN)
        allowed, rule, reason, near_rule, near_reason = obj[3:]
        return ExplainReply(
            ident,
            _bool(allowed, "allowed"),
            None if rule is None else _str(rule, "rule", MAX_RULE_CHARS),
            _str(reason, "reason", MAX_EXPLAIN_REASON_CHARS),
            None if near_rule is None else _str(near_rule, "near rule", MAX_RULE_CHARS),
            _str(near_reason, "near reason", MAX_EXPLAIN_REASON_CHARS),
        )
    if op == Op.STATUS:
        _arity(obj, 1, Op.STATUS)
        fields = obj[3]
        # Keys may also be bytes (an empty bin) as far as msgpack is concerned.
        if type(fields) is not dict or not all(type(k) is str for k in fields):
            raise ProtocolError("status fields are not a map of strings")
        return StatusReply(ident, MappingProxyType(fields))
    if op == Op.ERROR:
        _arity(obj, 2, Op.ERROR)
        return ErrorReply(
            ident, _int(obj[3], "errno", 1, 4095), _str(obj[4], "reason", MAX_REASON_CHARS)
        )
    raise ProtocolError(f"unknown operation {op}")
