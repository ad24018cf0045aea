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
Rule 2: messages are frozen dataclasses; raw msgpack objects never leave the
protocol.

This module holds the vocabulary (limits, the message types, access words,
modes and paths, the errno table); `client.wire` holds the bytes (msgpack
encoding and the checked decoding) and is re-exported here, so
`from client.protocol import encode_request, decode_reply` keeps working.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

__version__ = "0.1.0"

VERSION = 1
DEFAULT_SOCKET = "privbroker"
SOCKET_ENV = "PRIVBROKER_SOCKET"

# Linux PATH_MAX: a longer path could not be opened by the kernel anyway.
MAX_PATH_BYTES = 4096
NAME_MAX_BYTES = 255  # NAME_MAX: the longest component, in bytes
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
MAX_ID = 2**63 - 1


class ProtocolError(Exception):
    """Bytes that are not a valid privbroker message."""


class UnsupportedVersion(ProtocolError):
    """A well-formed message from a different protocol version."""

    def __init__(self, version: int, ident: int) -> None:
        super().__init__(f"protocol version {version} not supported; this side speaks {VERSION}")
        self.version = version
        self.id = ident


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
ALL_ACCESS: Access = Access.READ | Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE
_WORDS = {str(a.name).lower(): a for a in _ACCESS_WORDS}


def access_for_mode(mode: str) -> tuple[Access, bool]:
    """Map an `open()` mode to (access words, exclusive), as DESIGN.md says.

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
        _errno.EACCES: "denied by the policy (denied=true, with the reason and the rule): "
        "no rule grants it, a deny rule, a file on procfs, a hard-linked file, or "
        "credentials that differ from the connection's; with denied=false, the kernel",
        _errno.EPERM: "explain or status from a client that is not root (an ERROR reply); "
        "or the kernel refused (an immutable file)",
        _errno.EINVAL: "the item cannot be acted on: a path not absolute or not normalised, "
        "no access word, exclusive without create, truncate without write",
        _errno.ENOENT: "the path, a directory on it, or a followed symlink's target is missing",
        _errno.ENOTDIR: "a component of the path is not a directory",
        _errno.ELOOP: "a symlink on the path and the rule does not follow symlinks; a magic "
        "link (/proc/*/fd, /dev/fd); a symlink planted at the name to create",
        _errno.EISDIR: "a directory asked for with write, append, create or truncate",
        _errno.EEXIST: "exclusive create, and the name exists",
        _errno.EAGAIN: "the path kept changing while it was resolved (a rename race), the "
        "file is under a lease, or the uid has too many slow opens in flight; try again",
        _errno.ENXIO: "a FIFO opened for writing has no reader, a socket (connect to it "
        "instead), or a device that is absent",
        _errno.ETIMEDOUT: "the open took longer than the broker's --open-timeout (a stalled "
        "filesystem or device)",
        _errno.ENAMETOOLONG: "a path component is longer than the filesystem allows",
        _errno.EROFS: "write access to a file on a read-only filesystem",
        _errno.ETXTBSY: "write access to a running executable",
        _errno.ENOSPC: "no room to create the file",
        _errno.EMFILE: "the broker is out of file descriptors",
        _errno.EIO: "an internal error in the broker (logged); or the device or filesystem",
        _errno.EPROTO: "a request in another protocol version (an ERROR reply, then the "
        "broker closes the connection)",
    }
)


# The codec, re-exported: `client.wire` imports the names above, so it is
# imported last (E402); `import client.wire` alone also works, because the
# package's __init__ imports this module first.
from .wire import decode_reply, decode_request, encode_reply, encode_request  # noqa: E402

__all__ = [
    "ALL_ACCESS",
    "DEFAULT_SOCKET",
    "ERRNO_CAUSES",
    "MAX_BATCH",
    "MAX_EXPLAIN_REASON_CHARS",
    "MAX_GIDS",
    "MAX_ID",
    "MAX_PATH_BYTES",
    "MAX_REASON_CHARS",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_RULE_CHARS",
    "SOCKET_ENV",
    "VERSION",
    "Access",
    "ErrorReply",
    "ExplainReply",
    "ExplainRequest",
    "Op",
    "OpenItem",
    "OpenReply",
    "OpenRequest",
    "ProtocolError",
    "Reply",
    "Request",
    "Result",
    "StatusReply",
    "StatusRequest",
    "UnsupportedVersion",
    "__version__",
    "access_for_mode",
    "check_path",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]
