"""client/protocol/fastwire.py against client/protocol/codec.py: same bytes out, same verdict in.

fastwire is only allowed to be faster. Its two rules are checked here as
properties, with hypothesis, against the general codec: `encode_open` writes
what `encode_request` writes, and `decode_open_result` returns a result
exactly when `decode_reply` returns a one-result OPEN reply to that request
id, and that same result (else None, and the general decoder has its say).
"""

from __future__ import annotations

import errno
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from privbroker import protocol as p
from privbroker.protocol import (
    ALL_ACCESS,
    MAX_ID,
    MAX_REASON_CHARS,
    MAX_REPLY_BYTES,
    MAX_RULE_CHARS,
    Access,
    ErrorReply,
    ExplainReply,
    OpenItem,
    OpenReply,
    OpenRequest,
    ProtocolError,
    Result,
    StatusReply,
    fastwire,
)

FUZZ = settings(
    max_examples=400, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)

ids = st.integers(0, MAX_ID)
small_ids = st.integers(0, 300)  # so that a drawn reply id often matches the request's
paths = st.text(min_size=1, max_size=60).map(lambda s: "/" + s.replace("\0", ""))
items = st.builds(OpenItem, paths, st.integers(0, int(ALL_ACCESS)).map(Access), st.booleans())
results = st.builds(
    Result,
    st.integers(0, 4095),
    st.booleans(),
    st.text(max_size=MAX_REASON_CHARS),
    st.none() | st.text(max_size=MAX_RULE_CHARS),
).filter(lambda r: not (r.denied and r.errno == 0))


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def assert_agrees(data: bytes, ident: int) -> None:
    """decode_open_result(data, ident) says what decode_reply (and the id check) say."""
    fast = fastwire.decode_open_result(data, ident)
    try:
        full: p.Reply | None = p.decode_reply(data)
    except ProtocolError:
        full = None
    if isinstance(full, OpenReply) and full.id == ident and len(full.results) == 1:
        assert fast == full.results[0]
    else:
        assert fast is None


# ----------------------------------------------------------------- encoding


@FUZZ
@given(ids, items)
@example(0, OpenItem("/", Access.NONE, False))
@example(MAX_ID, OpenItem("/" + "é" * 2000, ALL_ACCESS, True))
def test_encode_open_is_encode_request(ident: int, item: OpenItem) -> None:
    data = fastwire.encode_open(ident, fastwire.open_body(item))
    assert data == p.encode_request(OpenRequest(ident, (item,)))
    assert p.decode_request(data) == OpenRequest(ident, (item,))


@pytest.mark.parametrize(
    "n", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]
)
def test_uint_is_msgpacks_shortest_encoding(n: int) -> None:
    assert fastwire._uint(n) == pack(n)


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_uint_any(n: int) -> None:
    assert fastwire._uint(n) == pack(n)


# ----------------------------------------------------------------- decoding


def test_the_usual_reply_is_the_shared_ok_result() -> None:
    data = p.encode_reply(OpenReply(7, (Result(),)))
    assert fastwire.decode_open_result(data, 7) is fastwire._OK
    assert fastwire.decode_open_result(data, 8) is None  # another request's reply


def test_a_success_with_a_rule_is_remembered_by_its_bytes() -> None:
    ok = Result(0, False, "", "the rule")
    data = p.encode_reply(OpenReply(9, (ok,)))
    first = fastwire.decode_open_result(data, 9)
    assert first == ok
    assert fastwire.decode_open_result(data, 9) is first  # the second time, from memory
    assert fastwire.decode_open_result(p.encode_reply(OpenReply(10, (ok,))), 10) is first
    assert fastwire.decode_open_result(data + b"\x00", 9) is None  # trailing bytes: not it
    assert fastwire.decode_open_result(data, 8) is None


def test_remembered_rules_are_bounded() -> None:
    for i in range(fastwire._OK_RULES_MAX + 5):
        ok = Result(0, False, "", f"rule {i}")
        assert fastwire.decode_open_result(p.encode_reply(OpenReply(1, (ok,))), 1) == ok
    assert len(fastwire._OK_RULES) <= fastwire._OK_RULES_MAX
    assert fastwire._OK_RULES[b"\xc0"] is fastwire._OK


@FUZZ
@given(small_ids, small_ids, results)
def test_valid_one_result_replies(ident: int, reply_id: int, result: Result) -> None:
    assert_agrees(p.encode_reply(OpenReply(reply_id, (result,))), ident)


@pytest.mark.parametrize(
    "result",
    [
        Result(0, False, "opened", None),  # an fd with a reason
        Result(0, False, "", "the rule"),  # an fd with a rule
        Result(errno.ENOENT, False, "", None),
        Result(errno.EACCES, True, "no rule", "near"),
        Result(4095, False, "r" * MAX_REASON_CHARS, "n" * MAX_RULE_CHARS),
    ],
)
def test_other_results(result: Result) -> None:
    data = p.encode_reply(OpenReply(3, (result,)))
    assert fastwire.decode_open_result(data, 3) == result
    assert_agrees(data, 3)


@pytest.mark.parametrize(
    "obj",
    [
        [1, 1, 3, [[0, False, "", None]], None],  # a field too many
        [1, 1, 3],
        [2, 1, 3, [[0, False, "", None]]],  # another version
        [True, 1, 3, [[0, False, "", None]]],  # True == 1, but is no version
        [1.0, 1, 3, [[0, False, "", None]]],
        [1, True, 3, [[0, False, "", None]]],
        [1, 1.0, 3, [[0, False, "", None]]],
        [1, 4, 3, [[0, False, "", None]]],  # ERROR op, OPEN shape
        [1, 1, 3.0, [[0, False, "", None]]],
        [1, 1, True, [[0, False, "", None]]],
        [1, 1, 3, []],
        [1, 1, 3, [[0, False, "", None], [0, False, "", None]]],  # two results for one path
        [1, 1, 3, [[0, False, ""]]],
        [1, 1, 3, [[0, False, "", None, None]]],
        [1, 1, 3, "x"],  # results that are no array
        [1, 1, 3, [[False, False, "", None]]],  # False == 0, but is no errno
        [1, 1, 3, [[0.0, False, "", None]]],
        [1, 1, 3, [[-1, False, "", None]]],
        [1, 1, 3, [[4096, False, "", None]]],
        [1, 1, 3, [[0, True, "", None]]],  # a denial with no errno
        [1, 1, 3, [[0, 0, "", None]]],
        [1, 1, 3, [[0, None, "", None]]],
        [1, 1, 3, [[2, False, None, None]]],
        [1, 1, 3, [[2, False, "r" * (MAX_REASON_CHARS + 1), None]]],
        [1, 1, 3, [[2, False, "", "n" * (MAX_RULE_CHARS + 1)]]],
        [1, 1, 3, [[2, False, "", 5]]],
        [1, 1, 3, [[2, False, "", [None]]]],
        {"a": 1},
        "not an array",
    ],
)
def test_everything_else_is_left_to_the_general_decoder(obj: Any) -> None:
    data = pack(obj)
    assert fastwire.decode_open_result(data, 3) is None
    assert_agrees(data, 3)


def test_a_reply_of_bytes_rather_than_strings() -> None:
    data = pack([1, 1, 3, [[2, False, b"", None]]])  # bin, not str: wire refuses bins
    assert fastwire.decode_open_result(data, 3) is None
    assert_agrees(data, 3)


@pytest.mark.parametrize(
    "data",
    [
        # The usual reply, but with the id in a longer encoding than needed:
        # not the usual bytes, yet the same message.
        b"\x94\x01\x01\xcd\x00\x03\x91\x94\x00\xc2\xa0\xc0",
        b"\x94\x01\x01\xcf" + (3).to_bytes(8, "big") + b"\x91\x94\x00\xc2\xa0\xc0",
        # A str8 header for the empty reason.
        b"\x94\x01\x01\x03\x91\x94\x00\xc2\xd9\x00\xc0",
    ],
)
def test_non_shortest_encodings_are_parsed(data: bytes) -> None:
    assert fastwire.decode_open_result(data, 3) == Result()
    assert_agrees(data, 3)


@pytest.mark.parametrize(
    "reply",
    [
        ErrorReply(3, errno.EBUSY, "busy"),
        ErrorReply(3, errno.EPROTO, "version"),
        ExplainReply(3, True, "web", "allowed"),
        StatusReply(3, {"up": True}),
        OpenReply(3, (Result(), Result(errno.ENOENT))),
    ],
)
def test_other_replies_are_none(reply: p.Reply) -> None:
    data = p.encode_reply(reply)
    assert fastwire.decode_open_result(data, 3) is None
    assert_agrees(data, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x94\x01\x01\x03\x91\x94\x00\xc2\xa0",  # cut short
        pack([1, 1, 3, [[0, False, "", None]]]) + b"\x00",  # extra data
        b"\x94\x01\x01\x03" + b"\x91" * 2000 + b"\xc0",  # deep nesting
        b"\x94\x01\x01\x03\xdd\xff\xff\xff\xff",  # an array header claiming 4G entries
        b"\x00" * (MAX_REPLY_BYTES + 1),
        pack([1, 1, 3, [[0, False, "", None]]]) + b"\x90" * MAX_REPLY_BYTES,
    ],
)
def test_malformed_bytes_are_none(data: bytes) -> None:
    assert fastwire.decode_open_result(data, 3) is None
    assert_agrees(data, 3)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=MAX_RULE_CHARS + 5)
    | st.binary(max_size=4)
)
near = st.sampled_from([0, 1, 2, 3, 4095, 4096, True, False, 1.0, None, "", "x"]) | scalars


@FUZZ
@given(near, near, near | small_ids, st.lists(st.lists(near, max_size=5), max_size=3), small_ids)
def test_fuzz_reply_shaped_objects(
    version: Any, op: Any, reply_id: Any, body: list[Any], ident: int
) -> None:
    assert_agrees(pack([version, op, reply_id, body]), ident)


@FUZZ
@given(small_ids, st.one_of(results, st.just(Result())), st.data())
def test_fuzz_mutated_replies(ident: int, result: Result, data: st.DataObject) -> None:
    assert_agrees(mutated(p.encode_reply(OpenReply(ident, (result,))), data), ident)


def mutated(reply: bytes, data: st.DataObject) -> bytes:
    """`reply` with one to three bytes flipped, inserted or deleted."""
    raw = bytearray(reply)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        choice = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if choice == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif choice == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(raw) > 1:
            del raw[at]
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=64), small_ids)
def test_fuzz_any_bytes(data: bytes, ident: int) -> None:
    assert_agrees(data, ident)


# ------------------------------------------------------------------ SOCKET

socket_requests = st.builds(
    p.SocketRequest,
    ids,
    st.text(max_size=p.MAX_TARGET_CHARS),
    st.integers(0, p.MAX_BACKLOG),
    st.sampled_from([None, True, False]),
    st.booleans(),
)


@FUZZ
@given(socket_requests)
@example(p.SocketRequest(MAX_ID, "é" * p.MAX_TARGET_CHARS, p.MAX_BACKLOG, False, True))
def test_encode_socket_is_encode_request(req: p.SocketRequest) -> None:
    assert fastwire.encode_socket(req.id, fastwire.socket_body(req)) == p.encode_request(req)


@pytest.mark.parametrize(
    "req",
    [
        p.SocketRequest(1, "x" * (p.MAX_TARGET_CHARS + 1)),
        p.SocketRequest(1, "tcp:[::]:443", p.MAX_BACKLOG + 1),
    ],
)
def test_socket_body_refuses_what_the_codec_refuses(req: p.SocketRequest) -> None:
    with pytest.raises(ValueError):
        p.encode_request(req)
    with pytest.raises(ValueError):
        fastwire.socket_body(req)


def assert_socket_agrees(data: bytes, ident: int) -> None:
    """decode_socket_result(data, ident) says what decode_reply (and the id check) say."""
    fast = fastwire.decode_socket_result(data, ident)
    try:
        full: p.Reply | None = p.decode_reply(data)
    except ProtocolError:
        full = None
    if isinstance(full, p.SocketReply) and full.id == ident:
        assert fast == full.result
    else:
        assert fast is None


@FUZZ
@given(small_ids, small_ids, results)
def test_valid_socket_replies(ident: int, reply_id: int, result: Result) -> None:
    assert_socket_agrees(p.encode_reply(p.SocketReply(reply_id, result)), ident)
    assert_socket_agrees(p.encode_reply(p.SocketReply(ident, result)), ident)


@FUZZ
@given(small_ids, st.one_of(results, st.just(Result(reason="allowed by rule 'web'"))), st.data())
def test_fuzz_mutated_socket_replies(ident: int, result: Result, data: st.DataObject) -> None:
    raw = p.encode_reply(p.SocketReply(ident, result))
    assert_socket_agrees(raw, ident)  # remembered when a success
    assert_socket_agrees(mutated(raw, data), ident)


@FUZZ
@given(near, near, near | small_ids, st.lists(near, max_size=5), small_ids)
def test_fuzz_socket_reply_shaped_objects(
    version: Any, op: Any, reply_id: Any, body: list[Any], ident: int
) -> None:
    assert_socket_agrees(pack([version, op, reply_id, body]), ident)
    assert_socket_agrees(pack([version, int(p.Op.SOCKET), ident, body]), ident)


def test_a_socket_reply_for_another_op_or_id_is_none() -> None:
    ok = Result(reason="allowed")
    assert fastwire.decode_socket_result(p.encode_reply(p.SocketReply(7, ok)), 7) == ok
    assert fastwire.decode_socket_result(p.encode_reply(p.SocketReply(7, ok)), 8) is None
    assert fastwire.decode_socket_result(p.encode_reply(OpenReply(7, (ok,))), 7) is None
    assert fastwire.decode_socket_result(p.encode_reply(ErrorReply(7, 1, "no")), 7) is None
