"""The fast lane of codec.py: the datagrams of a one-path open and of a socket,
and nothing else.

`Client.open_fd` (and so `open_privileged`) sends one request of one shape,
`[VERSION, OPEN, id, [[path, access, exclusive]]]`, and almost always gets one
reply of one shape back. codec.py's general codec builds and checks message
dataclasses field by field, which costs more than the rest of the client's
work per call; this module does the same job for that one shape only.

Rule 1 (same bytes out): `encode_open(ident, open_body(item))` is byte for
byte `wire.encode_request(OpenRequest(ident, (item,)))`. The body depends only
on the item, so a caller encodes it once per (path, mode) and keeps it.
Rule 2 (same verdict in): `decode_open_result(data, ident)` returns a Result
exactly when `wire.decode_reply(data)` would return `OpenReply(ident,
(result,))`, and that same result; for anything else, valid or not, it
returns None, and the caller hands the datagram to the general decoder, which
then accepts it (an ERROR reply) or raises what it always raised. So this
lane can make a call faster, never decide differently. The same two rules
hold for a SOCKET request (`encode_socket(ident, socket_body(req))`) and its
reply (`decode_socket_result`). tests/client/test_fastwire.py checks them
against codec.py with hypothesis.

Pure, like codec.py: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from .codec import REPLY_UNPACK_OPTIONS
from .limits import MAX_REASON_CHARS, MAX_REPLY_BYTES, MAX_RULE_CHARS, VERSION
from .messages import Op, OpenItem, Result, SocketRequest
from .netbodies import _socket_request_body

# [VERSION, OPEN, id, body]: a 4-array, then two positive fixints (both < 128).
_OPEN_HEAD = bytes((0x94, VERSION, int(Op.OPEN)))
_OPEN = int(Op.OPEN)  # a plain int: comparing with an IntEnum costs more
# What nearly every successful open's result is; Result is frozen, so every
# caller may share one.
_OK = Result()
# The body of a successful reply, as msgpack.packb writes it: a 1-array of
# [0, false, "", rule], up to the rule. The rule's bytes (nil, or the name
# of the rule that allowed it: the same for the same path, call after call)
# are remembered once a reply with them has passed the whole decoder.
_OK_START = b"\x91\x94\x00\xc2\xa0"
_OK_RULES: dict[bytes, Result] = {b"\xc0": _OK}
_OK_RULES_MAX = 256  # rules remembered; then forgotten, all but nil


def open_body(item: OpenItem) -> bytes:
    """The msgpack of `[[path, access, exclusive]]`: everything after the id."""
    packed: bytes = msgpack.packb(
        [[item.path, int(item.access), item.exclusive]], use_bin_type=True
    )
    return packed


def encode_open(ident: int, body: bytes) -> bytes:
    """The request datagram opening `body`'s item, with request id `ident`.

    `ident` is a request id (0 to MAX_ID); one path of at most MAX_PATH_BYTES
    keeps the request far below MAX_REQUEST_BYTES, so no limit is checked here.
    """
    return _OPEN_HEAD + _uint(ident) + body


def _uint(n: int) -> bytes:
    """msgpack's shortest encoding of 0 <= n < 2**64, as msgpack.packb writes it."""
    if n < 0x80:
        return n.to_bytes(1, "big")  # positive fixint
    if n < 0x100:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


# [VERSION, SOCKET, id, target, backlog, v6only, reuse_port]; the reply
# [VERSION, SOCKET, id, result]. A successful reply's bytes after the id are
# the same call after call (the reason and rule of one grant): remembered
# once they have passed the whole decoder, as _OK_RULES are.
_SOCKET = int(Op.SOCKET)
_SOCKET_HEAD = bytes((0x97, VERSION, _SOCKET))
_SOCKET_REPLY_HEAD = bytes((0x94, VERSION, _SOCKET))
_SOCKET_RESULTS: dict[bytes, Result] = {}


def socket_body(req: SocketRequest) -> bytes:
    """The msgpack of everything after a SOCKET request's id (ValueError past a limit)."""
    return b"".join(msgpack.packb(x) for x in _socket_request_body(req))


def encode_socket(ident: int, body: bytes) -> bytes:
    """The SOCKET request datagram with id `ident` and `body` (socket_body)."""
    return _SOCKET_HEAD + _uint(ident) + body


def decode_socket_result(data: bytes, ident: int) -> Result | None:
    """The result of a SOCKET reply to request `ident`, or None (Rule 2)."""
    head = _SOCKET_REPLY_HEAD + _uint(ident)
    n = len(head)
    shaped = data[:n] == head
    if shaped and (known := _SOCKET_RESULTS.get(data[n:])) is not None:
        return known
    obj = _reply(data, _SOCKET, ident)
    result = None if obj is None else _result(obj[3])
    if shaped and result is not None and result.errno == 0:
        if len(_SOCKET_RESULTS) >= _OK_RULES_MAX:
            _SOCKET_RESULTS.clear()
        _SOCKET_RESULTS[data[n:]] = result
    return result


def _reply(data: bytes, op: int, ident: int) -> list[Any] | None:
    """[VERSION, op, ident, body] as decode_reply reads it, or None."""
    if len(data) > MAX_REPLY_BYTES:
        return None
    try:
        obj: Any = msgpack.unpackb(data, **REPLY_UNPACK_OPTIONS)
    except (ValueError, TypeError, RecursionError):  # what wire._unpack turns into ProtocolError
        return None
    if type(obj) is not list or len(obj) != 4:
        return None
    version, got_op, rid, _ = obj
    # type() first: msgpack also yields bools and floats, and True == 1 == 1.0.
    if type(version) is not int or version != VERSION or type(got_op) is not int or got_op != op:
        return None
    if type(rid) is not int or rid != ident:
        return None
    return obj


def _result(result: Any) -> Result | None:
    """A result as decode_reply checks it, or None."""
    if type(result) is not list or len(result) != 4:
        return None
    code, denied, reason, rule = result
    if type(code) is not int or not 0 <= code <= 4095 or type(denied) is not bool:
        return None
    if denied and code == 0:  # decode_reply: a denial must carry an errno
        return None
    if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
        return None
    if rule is not None and (type(rule) is not str or len(rule) > MAX_RULE_CHARS):
        return None
    return Result(code, denied, reason, rule)


def decode_open_result(data: bytes, ident: int) -> Result | None:
    """The one result of an OPEN reply to request `ident`, or None (see Rule 2).

    Every check below is one that decode_reply makes, or check_reply's id
    match; msgpack is called with the very options decode_reply uses, so a
    datagram it cannot parse is None here too.
    """
    # The commonest replies of all, byte for byte: bytes that equal a valid
    # reply decode as it does, and comparing costs a quarter of parsing.
    start = _OPEN_HEAD + _uint(ident) + _OK_START
    n = len(start)
    shaped = data[:n] == start
    if shaped and (known := _OK_RULES.get(data[n:])) is not None:
        return known
    obj = _reply(data, _OPEN, ident)
    if obj is None or type(obj[3]) is not list or len(obj[3]) != 1:
        return None
    result = _result(obj[3][0])
    if result is None:
        return None
    if shaped:  # [0, false, "", rule] and nothing else: these bytes mean this result
        if len(_OK_RULES) >= _OK_RULES_MAX:
            _OK_RULES.clear()
            _OK_RULES[b"\xc0"] = _OK
        _OK_RULES[data[n:]] = result
    return result
