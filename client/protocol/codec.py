"""The bytes of the messages in messages.py: msgpack in, checked messages out.

__init__.py documents the wire format and holds the message types; this
module turns them into datagrams and back, and nothing else (no I/O).

Rule 1: decoding checks size, shape and every type before it builds a
message; anything else raises ProtocolError (UnsupportedVersion for a
well-formed message of another version). Raw msgpack objects never leave this
module.
Rule 2: encoding enforces the request limits (ValueError before any I/O) and
clips reply texts, so that a full batch of results always fits one reply.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any, TypeAlias

import msgpack  # type: ignore[import-untyped]

from . import netbodies as nb
from .checks import (
    _access,
    _arity,
    _bool,
    _clip,
    _clip_rule,
    _int,
    _list,
    _pack,
    _path,
    _result,
    _str,
)
from .limits import (
    MAX_BATCH,
    MAX_EXPLAIN_REASON_CHARS,
    MAX_GIDS,
    MAX_ID,
    MAX_PATH_BYTES,
    MAX_PROGRAM_CHARS,
    MAX_REASON_CHARS,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RULE_CHARS,
    VERSION,
)
from .messages import (
    REPLIES,
    REQUESTS,
    DeclareReply,
    DeclareRequest,
    ErrorReply,
    ExplainReply,
    ExplainRequest,
    Op,
    OpenItem,
    OpenReply,
    OpenRequest,
    ProtocolError,
    Reply,
    Request,
    Result,
    StatusReply,
    StatusRequest,
    UnknownOperation,
    UnsupportedVersion,
)

# msgpack nesting bound: our deepest message is 4 levels; refuse bombs early.
_MAX_DEPTH = 4
# Map entries a status reply may carry; anything larger is not ours.
_MAX_MAP_LEN = 256


# ----------------------------------------------------------------- encoding


def _open_request_body(req: Any) -> list[Any]:
    if not 1 <= len(req.items) <= MAX_BATCH:
        raise ValueError(f"a request opens 1 to {MAX_BATCH} paths, not {len(req.items)}")
    return [[[i.path, int(i.access), i.exclusive] for i in req.items]]


def _explain_request_body(req: Any) -> list[Any]:
    if len(req.gids) > MAX_GIDS:
        raise ValueError(f"at most {MAX_GIDS} gids, not {len(req.gids)}")
    return [req.uid, list(req.gids), req.path, int(req.access)]


def encode_request(req: Request) -> bytes:
    """Encode a request, raising ValueError when it breaks a limit."""
    body = _REQUEST_CODECS[req.op][0](req)
    data = _pack([VERSION, int(req.op), req.id, *body])
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request is {len(data)} bytes, over the {MAX_REQUEST_BYTES} limit")
    return data


def encode_result(r: Result) -> bytes:
    """One result of an OPEN reply, packed alone: an OPEN reply's bytes are
    its head and then these, which is how the broker's native path
    (broker/files/_fast.c) assembles replies from results packed here."""
    return _pack(_result(r))


def _explain_reply_body(rep: Any) -> list[Any]:
    return [
        rep.allowed,
        _clip_rule(rep.rule),
        _clip(rep.reason, MAX_EXPLAIN_REASON_CHARS),
        _clip_rule(rep.near_rule),
        _clip(rep.near_reason, MAX_EXPLAIN_REASON_CHARS),
    ]


def encode_reply(rep: Reply) -> bytes:
    body = _REPLY_CODECS[rep.op][0](rep)
    return _pack([VERSION, int(rep.op), rep.id, *body])


# ----------------------------------------------------------------- decoding


def _unpack_options(limit: int) -> dict[str, Any]:
    """msgpack.unpackb's arguments for a message of at most `limit` bytes."""
    return {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "max_str_len": MAX_PATH_BYTES * 4,
        "max_bin_len": 0,
        "max_ext_len": 0,
        # Every element takes at least one byte, so the byte limit already
        # bounds what the unpacker preallocates; each field's own count is
        # checked below (a batch, or an explain's up to 65536 gids).
        "max_array_len": limit,
        "max_map_len": _MAX_MAP_LEN,
    }


# Made once, not per message; read-only by convention (plain dicts: `**` of a
# MappingProxyType costs twice as much). fastwire parses replies with the very
# same options, so what msgpack refuses here it refuses there.
_REQUEST_UNPACK_OPTIONS = _unpack_options(MAX_REQUEST_BYTES)
REPLY_UNPACK_OPTIONS = _unpack_options(MAX_REPLY_BYTES)


def _unpack(data: bytes, limit: int, options: dict[str, Any]) -> list[Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("message is not bytes")
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes is over the {limit} limit")
    try:
        obj = msgpack.unpackb(data, **options)
    except (ValueError, TypeError, RecursionError) as exc:
        # msgpack's own errors (FormatError, StackError, ExtraData, bad UTF-8,
        # non-str map keys, over-long containers) are all ValueError subclasses.
        raise ProtocolError(f"not a msgpack message: {exc}") from None
    if type(obj) is not list or len(obj) < 3:
        raise ProtocolError("message is not an array of [version, op, id, ...]")
    version, op, ident = obj[0], obj[1], obj[2]
    if type(version) is not int:
        raise ProtocolError("version is not an integer")
    if version != VERSION:
        _check_depth(obj)  # a bomb is a violation, whatever version it claims
        valid_id = type(ident) is int and 0 <= ident <= MAX_ID
        raise UnsupportedVersion(version, ident if valid_id else 0)
    _int(op, "op")
    _int(ident, "id")
    return obj


def _check_depth(obj: Any, limit: int = _MAX_DEPTH) -> None:
    if _too_deep(obj, limit):
        raise ProtocolError("message is nested too deeply")


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


# Depth: every field of an OPEN, EXPLAIN or ERROR message is checked to be
# of its scalar type (or an array of them), which bounds its nesting; only a
# status map holds values of any shape, and that is walked (_check_depth).


def _open_request(ident: int, obj: list[Any]) -> OpenRequest:
    items = []
    for n, raw in enumerate(_list(obj[3], "items", 1, MAX_BATCH)):
        path, access, exclusive = _list(raw, "item {}", 3, 3, n)
        items.append(
            OpenItem(
                _path(path, "item {} path", n),
                _access(access, "item {} access", n),
                _bool(exclusive, "item {} exclusive", n),
            )
        )
    return OpenRequest(ident, tuple(items))


def _explain_request(ident: int, obj: list[Any]) -> ExplainRequest:
    gids = tuple(_int(g, "gid", 0, 2**32 - 1) for g in _list(obj[4], "gids", 0, MAX_GIDS))
    return ExplainRequest(
        ident,
        _int(obj[3], "uid", 0, 2**32 - 1),
        gids,
        _path(obj[5], "path"),
        _access(obj[6], "access"),
    )


def _status_request(ident: int, obj: list[Any]) -> StatusRequest:
    return StatusRequest(ident)


def decode_request(data: bytes) -> Request:
    """Decode one request datagram, or raise ProtocolError (UnknownOperation
    for a well-formed message of an op this side does not know)."""
    obj = _unpack(data, MAX_REQUEST_BYTES, _REQUEST_UNPACK_OPTIONS)
    op, ident = obj[1], obj[2]
    codec = _REQUEST_CODECS.get(op)
    if codec is None:
        _check_depth(obj)  # a bomb is a violation, whatever op it claims
        raise UnknownOperation(op, ident)
    _, decode, arity = codec
    _arity(obj, arity, REQUESTS[op].op)
    request: Request = decode(ident, obj)
    return request


def _open_reply(ident: int, obj: list[Any]) -> OpenReply:
    results = []
    for n, raw in enumerate(_list(obj[3], "results", 1, MAX_BATCH)):
        code, denied, reason, rule = _list(raw, "result {}", 4, 4, n)
        result = Result(
            _int(code, "result {} errno", 0, 4095, n),
            _bool(denied, "result {} denied", n),
            _str(reason, "result {} reason", MAX_REASON_CHARS, n),
            None if rule is None else _str(rule, "result {} rule", MAX_RULE_CHARS, n),
        )
        # A denial with errno 0 would count as an fd that never came.
        if denied and code == 0:
            raise ProtocolError(f"result {n} is denied with errno 0")
        results.append(result)
    return OpenReply(ident, tuple(results))


def _explain_reply(ident: int, obj: list[Any]) -> ExplainReply:
    allowed, rule, reason, near_rule, near_reason = obj[3:]
    return ExplainReply(
        ident,
        _bool(allowed, "allowed"),
        None if rule is None else _str(rule, "rule", MAX_RULE_CHARS),
        _str(reason, "reason", MAX_EXPLAIN_REASON_CHARS),
        None if near_rule is None else _str(near_rule, "near rule", MAX_RULE_CHARS),
        _str(near_reason, "near reason", MAX_EXPLAIN_REASON_CHARS),
    )


def _status_reply(ident: int, obj: list[Any]) -> StatusReply:
    fields = obj[3]
    # Keys may also be bytes (an empty bin) as far as msgpack is concerned.
    if type(fields) is not dict or not all(type(k) is str for k in fields):
        raise ProtocolError("status fields are not a map of strings")
    _check_depth(fields, _MAX_DEPTH - 1)  # the map is itself one level down
    return StatusReply(ident, MappingProxyType(fields))


def _error_reply(ident: int, obj: list[Any]) -> ErrorReply:
    return ErrorReply(
        ident, _int(obj[3], "errno", 1, 4095), _str(obj[4], "reason", MAX_REASON_CHARS)
    )


def decode_reply(data: bytes) -> Reply:
    """Decode one reply datagram, or raise ProtocolError."""
    obj = _unpack(data, MAX_REPLY_BYTES, REPLY_UNPACK_OPTIONS)
    op, ident = obj[1], obj[2]
    codec = _REPLY_CODECS.get(op)
    if codec is None:
        raise ProtocolError(f"unknown operation {op}")
    _, decode, arity = codec
    _arity(obj, arity, REPLIES[op].op)
    reply: Reply = decode(ident, obj)
    return reply


# Each op's body: (encode, decode, number of body fields), by op. Every
# class in messages.REQUESTS and REPLIES has its entry (a test checks).
_Codec: TypeAlias = tuple[Callable[[Any], list[Any]], Callable[[int, list[Any]], Any], int]
_REQUEST_CODECS: dict[int, _Codec] = {
    Op.OPEN: (_open_request_body, _open_request, 1),
    Op.EXPLAIN: (_explain_request_body, _explain_request, 4),
    Op.STATUS: (lambda req: [], _status_request, 0),
    Op.SOCKET: (nb._socket_request_body, nb._socket_request, 4),
    Op.TUN: (nb._tun_request_body, nb._tun_request, 3),
    Op.NETCONF: (nb._netconf_request_body, nb._netconf_request, 8),
    Op.DECLARE: (
        lambda req: [_clip(req.program, MAX_PROGRAM_CHARS)],
        lambda ident, obj: DeclareRequest(ident, _str(obj[3], "program", MAX_PROGRAM_CHARS)),
        1,
    ),
}
_REPLY_CODECS: dict[int, _Codec] = {
    Op.OPEN: (lambda rep: [[_result(r) for r in rep.results]], _open_reply, 1),
    Op.EXPLAIN: (_explain_reply_body, _explain_reply, 5),
    Op.STATUS: (lambda rep: [dict(rep.fields)], _status_reply, 1),
    Op.ERROR: (lambda rep: [rep.errno, _clip(rep.reason, MAX_REASON_CHARS)], _error_reply, 2),
    Op.SOCKET: (lambda rep: [_result(rep.result)], nb._socket_reply, 1),
    Op.TUN: (lambda rep: [_result(rep.result), rep.name, rep.ifindex], nb._tun_reply, 3),
    Op.NETCONF: (lambda rep: [_result(rep.result)], nb._netconf_reply, 1),
    Op.DECLARE: (lambda rep: [], lambda ident, obj: DeclareReply(ident), 0),
}
