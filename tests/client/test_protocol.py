"""client/protocol/, tested directly: every message, limit and decode error.

Pure tests (no sockets), to full branch coverage, plus the fuzz invariant of
docs/design.md, "Tests": any bytes -> a message or a ProtocolError, never anything else.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privbroker import protocol as p
from privbroker.protocol import (
    MAX_BATCH,
    MAX_GIDS,
    MAX_PATH_BYTES,
    MAX_REASON_CHARS,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RULE_CHARS,
    VERSION,
    Access,
    ErrorReply,
    ExplainReply,
    ExplainRequest,
    Op,
    OpenItem,
    OpenReply,
    OpenRequest,
    ProtocolError,
    Result,
    StatusReply,
    StatusRequest,
    UnsupportedVersion,
)
from privbroker.protocol import access as access_module

FUZZ = settings(
    max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
# Generating big nested objects is what costs; fewer examples of those.
FUZZ_BIG = settings(FUZZ, max_examples=60)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


# ------------------------------------------------------------ access words


def test_access_words_round_trip() -> None:
    every = ["read", "write", "append", "create", "truncate"]
    assert Access.from_words(every).words() == every
    assert Access.from_words([]) == Access.NONE
    assert Access.NONE.words() == []
    assert Access.from_words(("append", "read")) == Access.READ | Access.APPEND
    assert (Access.WRITE | Access.CREATE).words() == ["write", "create"]


@pytest.mark.parametrize("word", ["none", "READ", "exec", "", 1, None, "read,write"])
def test_unknown_access_words(word: Any) -> None:
    with pytest.raises(ValueError, match="unknown access word"):
        Access.from_words(["read", word])


# ------------------------------------------------------------ open modes


def _builtin_accepts(mode: str) -> bool:
    """Whether builtin open() accepts `mode` (on an fd, so nothing is created)."""
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        open(fd, mode, closefd=False).close()
    except ValueError:
        return False
    finally:
        os.close(fd)
    return True


def _all_mode_strings() -> list[str]:
    letters = "rwaxbt+U"
    modes = {"".join(c) for n in range(1, 4) for c in itertools.permutations(letters, n)}
    return sorted(modes | {"rr", "r++", "rbb", "wtt", "", " r", "r "})


def test_access_for_mode_accepts_exactly_what_open_accepts() -> None:
    for mode in _all_mode_strings():
        try:
            p.access_for_mode(mode)
            ours = True
        except ValueError:
            ours = False
        assert ours == _builtin_accepts(mode), mode


R, W, A, C, T = Access.READ, Access.WRITE, Access.APPEND, Access.CREATE, Access.TRUNCATE


@pytest.mark.parametrize(
    ("mode", "access", "exclusive"),
    [
        ("r", R, False),
        ("rb", R, False),
        ("rt", R, False),
        ("r+", R | W, False),
        ("rb+", R | W, False),
        ("+r", R | W, False),
        ("w", W | C | T, False),
        ("wb", W | C | T, False),
        ("w+", R | W | C | T, False),
        ("a", A | C, False),
        ("ab", A | C, False),
        ("a+", R | W | A | C, False),
        ("x", W | C, True),
        ("xb", W | C, True),
        ("x+", R | W | C, True),
        ("bx", W | C, True),
    ],
)
def test_access_for_mode(mode: str, access: Access, exclusive: bool) -> None:
    assert p.access_for_mode(mode) == (access, exclusive)


@pytest.mark.parametrize("mode", ["", "rw", "rr", "r++", "rbt", "U", "rU", "q", "w+a", None, b"r"])
def test_access_for_invalid_modes(mode: Any) -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        p.access_for_mode(mode)


class _Mode(str):
    """A str subclass whose == and hash lie: it must never reach the cache."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("r")


def test_access_for_mode_remembers_only_valid_plain_strings() -> None:
    access_module._MODES.clear()
    for mode in _all_mode_strings():
        with contextlib.suppress(ValueError):
            p.access_for_mode(mode)
    assert len(access_module._MODES) == 76  # every valid mode, and nothing else
    assert all(type(m) is str and _builtin_accepts(m) for m in access_module._MODES)
    # Remembered answers are the same answers.
    assert p.access_for_mode("r+") is p.access_for_mode("r+") == (R | W, False)
    assert type(p.access_for_mode("w")[0]) is Access
    with pytest.raises(ValueError, match="invalid mode"):
        p.access_for_mode(_Mode("rw"))  # parsed as what it is, not looked up as "r"
    assert p.access_for_mode(_Mode("w")) == (W | C | T, False)
    assert len(access_module._MODES) == 76
    with pytest.raises(ValueError, match="invalid mode"):
        p.access_for_mode(["r"])  # type: ignore[arg-type]  # unhashable: still a ValueError


# ------------------------------------------------------------ paths


def _long(size: int, ch: str = "a") -> str:
    """An absolute path of exactly `size` UTF-8 bytes, no component over 255 bytes."""
    width = len(ch.encode())
    parts, left = [], size
    while left:
        n = min(255 // width, (left - 1) // width)
        parts.append(ch * n)
        left -= 1 + n * width
    return "/" + "/".join(parts)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc/passwd",
        "/a b/c",
        "/.hidden",
        "/a/...",
        "/a/..b",
        "/dev/ttyUSB0",
        "/é/日本",
        _long(MAX_PATH_BYTES),
        _long(MAX_PATH_BYTES - 1, "é"),
        "/" + "a" * 255,
        "/x/" + "é" * 127,
    ],
)
def test_check_path_accepts(path: str) -> None:
    assert p.check_path(path) is path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        (b"/etc/passwd", "must be str"),
        (None, "must be str"),
        ("", "not absolute"),
        ("etc/passwd", "not absolute"),
        ("./x", "not absolute"),
        ("/etc/\0", "NUL"),
        ("/tmp/\udcff", "UTF-8"),
        ("/" + "a" * MAX_PATH_BYTES, "longer than"),
        ("/" + "é" * MAX_PATH_BYTES, "longer than"),
        ("/" + "a" * 256, "path component longer than 255 bytes"),
        ("/x/" + "é" * 128 + "/y", "path component longer than 255 bytes"),
        ("//", "not normalised"),
        ("/etc/", "not normalised"),
        ("/etc//passwd", "not normalised"),
        ("/etc/./passwd", "not normalised"),
        ("/etc/../etc", "not normalised"),
        ("/..", "not normalised"),
        ("/.", "not normalised"),
    ],
)
def test_check_path_rejects(path: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        p.check_path(path)


# ------------------------------------------------------------ round trips

REQUESTS = [
    OpenRequest(1, (OpenItem("/etc/passwd", Access.READ),)),
    OpenRequest(2**63 - 1, (OpenItem("/a", W | C, True), OpenItem("/b", Access.NONE, False))),
    OpenRequest(0, tuple(OpenItem(f"/f{i}", R | A) for i in range(MAX_BATCH))),
    ExplainRequest(7, 1000, (1000, 27, 2**32 - 1), "/srv/www/x", R | W),
    ExplainRequest(8, 2**32 - 1, (), "/", Access.NONE),
    ExplainRequest(9, 0, tuple(range(20000)), "/x", R),
    StatusRequest(3),
    p.SocketRequest(10, "tcp:[::]:443"),
    p.SocketRequest(11, "udp:[fe80::1%eth0]:547@eth0", 0, True, True),
    p.SocketRequest(12, "x" * p.MAX_TARGET_CHARS, p.MAX_BACKLOG, False, False),
    p.DeclareRequest(19, "/usr/bin/openssl"),
    p.TunRequest(13, "vpn%d"),
    p.TunRequest(14, "t" * p.MAX_IFNAME_CHARS, True, 2**32 - 1),
    p.NetconfRequest(15, "add_address", "vpn0", "10.8.0.2/24"),
    p.NetconfRequest(16, "set_link", "vpn0", up=False, mtu=1280),
    p.NetconfRequest(17, "add_route", "", "fd00::/8", None, 0, "fe80::1", 2**32 - 1, 100),
    p.NetconfRequest(18, "del_route", "wg0", "a" * p.MAX_ADDRESS_CHARS, True, 0, "", -1, 0),
]

REPLIES = [
    OpenReply(1, (Result(),)),
    OpenReply(
        2,
        (
            Result(errno.ENOENT, False, "no such file"),
            Result(),
            Result(errno.EACCES, True, "why", "rule"),
        ),
    ),
    OpenReply(
        3,
        tuple(
            Result(errno.EACCES, True, "r" * MAX_REASON_CHARS, "n" * MAX_RULE_CHARS)
            for _ in range(MAX_BATCH)
        ),
    ),
    ExplainReply(4, True, "web", "allowed by rule 'web'"),
    ExplainReply(5, False, None, "no rule matched", "near", "the group did not match"),
    StatusReply(
        6,
        MappingProxyType(
            {"pid": 1, "policy": "/etc/p.toml", "nested": {"a": [1, 2]}, "none": None}
        ),
    ),
    StatusReply(7, {}),
    ErrorReply(8, errno.EPROTO, "unsupported version"),
    p.SocketReply(9, Result()),
    p.SocketReply(10, Result(errno.EACCES, True, "port 81 is not in tcp:80", "web")),
    p.DeclareReply(14),
    p.TunReply(11, Result(), "vpn0", 7),
    p.TunReply(12, Result(errno.EACCES, True, "evil0 does not match vpn*", "vpn")),
    p.NetconfReply(13, Result(errno.EEXIST, False, "File exists: Address already assigned")),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip(req: p.Request) -> None:
    data = p.encode_request(req)
    assert len(data) <= MAX_REQUEST_BYTES
    assert p.decode_request(data) == req
    assert p.decode_request(bytearray(data)) == req
    assert p.decode_request(memoryview(data)) == req


@pytest.mark.parametrize("rep", REPLIES, ids=lambda r: type(r).__name__)
def test_reply_round_trip(rep: p.Reply) -> None:
    data = p.encode_reply(rep)
    assert len(data) <= MAX_REPLY_BYTES
    assert p.decode_reply(data) == rep


def test_wire_layout_is_as_documented() -> None:
    req = OpenRequest(5, (OpenItem("/x", R | W, False),))
    assert msgpack.unpackb(p.encode_request(req)) == [VERSION, Op.OPEN, 5, [["/x", 3, False]]]
    rep = OpenReply(5, (Result(2, False, "gone", None),))
    assert msgpack.unpackb(p.encode_reply(rep)) == [VERSION, Op.OPEN, 5, [[2, False, "gone", None]]]
    assert msgpack.unpackb(p.encode_request(StatusRequest(1))) == [VERSION, Op.STATUS, 1]


def test_open_reply_counts_fds() -> None:
    rep = OpenReply(1, (Result(), Result(errno.ENOENT), Result(), Result(errno.EACCES, True)))
    assert rep.nfds == 2


def test_replies_clip_long_text() -> None:
    long_reason, long_rule = "x" * (MAX_REASON_CHARS * 10), "y" * (MAX_RULE_CHARS * 2)
    rep = p.decode_reply(p.encode_reply(OpenReply(1, (Result(13, True, long_reason, long_rule),))))
    assert isinstance(rep, OpenReply)
    result = rep.results[0]
    assert len(result.reason) == MAX_REASON_CHARS and result.reason.endswith("...")
    assert result.rule is not None and len(result.rule) == MAX_RULE_CHARS
    err = p.decode_reply(p.encode_reply(ErrorReply(1, 5, long_reason)))
    assert isinstance(err, ErrorReply) and len(err.reason) == MAX_REASON_CHARS
    explain = ExplainReply(1, False, long_rule, long_reason * 4, long_rule, long_reason * 4)
    got = p.decode_reply(p.encode_reply(explain))
    assert isinstance(got, ExplainReply)
    assert len(got.reason) == len(got.near_reason) == p.MAX_EXPLAIN_REASON_CHARS
    assert got.rule is not None and len(got.rule) == MAX_RULE_CHARS


# ------------------------------------------------------------ encode limits


def test_request_item_count_limits() -> None:
    with pytest.raises(ValueError, match="1 to 250"):
        p.encode_request(OpenRequest(1, ()))
    items = tuple(OpenItem("/x", R) for _ in range(MAX_BATCH + 1))
    with pytest.raises(ValueError, match="1 to 250"):
        p.encode_request(OpenRequest(1, items))


def test_request_size_limit() -> None:
    big = "/" + "a" * (MAX_PATH_BYTES - 1)
    items = tuple(OpenItem(big, R) for _ in range(MAX_REQUEST_BYTES // MAX_PATH_BYTES + 1))
    with pytest.raises(ValueError, match="over the"):
        p.encode_request(OpenRequest(1, items))


def test_explain_gid_limit() -> None:
    with pytest.raises(ValueError, match="gids"):
        p.encode_request(ExplainRequest(1, 0, (1,) * (MAX_GIDS + 1), "/x", R))


def test_errno_table() -> None:
    assert p.ERRNO_CAUSES[errno.EACCES].startswith("denied by the policy")
    for code, cause in p.ERRNO_CAUSES.items():
        assert errno.errorcode[code] and cause
    with pytest.raises(TypeError):
        p.ERRNO_CAUSES[0] = "x"  # type: ignore[index]


# ------------------------------------------------------------ decode errors

OK_ITEM = ["/x", 1, False]
OK_RESULT = [0, False, "", None]

BAD_REQUESTS: list[tuple[str, Any]] = [
    ("not bytes", "[1, 1, 1]"),
    ("oversized", b"\x90" * (MAX_REQUEST_BYTES + 1)),
    ("empty", b""),
    ("reserved byte", b"\xc1"),
    ("truncated", pack([1, 1, 1, [OK_ITEM]])[:-1]),
    ("extra data", pack([1, 3, 1]) + b"\x00"),
    ("bin", pack([1, 1, 1, [[b"/x", 1, False]]])),
    ("ext", pack([1, 3, msgpack.ExtType(1, b"1234")])),
    ("timestamp", b"\x93\x01\x03\xd6\xff\x00\x00\x00\x01"),
    ("bad utf-8", b"\x93\x01\x03\xa1\xff"),
    ("non-str key", pack({1: 2})),
    ("big map", pack({str(i): i for i in range(300)})),
    ("not an array", pack({"v": 1})),
    ("a string", pack("hello")),
    ("short array", pack([1, 1])),
    ("too deep", pack([1, 1, 1, [[[["/x"]]]]])),
    ("deep bomb", b"\x93\x01\x03" + b"\x91" * 800 + b"\xc0"),
    ("deeper bomb", b"\x91" * 5000 + b"\xc0"),
    ("version not int", pack(["1", 1, 1])),
    ("version bool", pack([True, 3, 1])),
    ("op not int", pack([1, "open", 1, [OK_ITEM]])),
    ("op negative", pack([1, -1, 1])),
    ("op float", pack([1, 1.0, 1, [OK_ITEM]])),
    ("id negative", pack([1, 3, -1])),
    ("id too big", pack([1, 3, 2**64 - 1])),
    ("id not int", pack([1, 3, None])),
    ("unknown op", pack([1, 99, 1])),
    ("error op in request", pack([1, int(Op.ERROR), 1, 5, "x"])),
    ("open arity", pack([1, 1, 1])),
    ("open arity 2", pack([1, 1, 1, [OK_ITEM], []])),
    ("no items", pack([1, 1, 1, []])),
    ("too many items", pack([1, 1, 1, [OK_ITEM] * (MAX_BATCH + 1)])),
    ("items not array", pack([1, 1, 1, {"a": 1}])),
    ("item not array", pack([1, 1, 1, ["/x"]])),
    ("item short", pack([1, 1, 1, [["/x", 1]]])),
    ("item long", pack([1, 1, 1, [["/x", 1, False, 0]]])),
    ("path not str", pack([1, 1, 1, [[1, 1, False]]])),
    ("path too long", pack([1, 1, 1, [["/" + "a" * MAX_PATH_BYTES, 1, False]]])),
    ("string over max_str_len", pack([1, 1, 1, [["/" + "a" * (4 * MAX_PATH_BYTES), 1, 0]]])),
    ("access not int", pack([1, 1, 1, [["/x", "read", False]]])),
    ("access too big", pack([1, 1, 1, [["/x", 32, False]]])),
    ("access negative", pack([1, 1, 1, [["/x", -1, False]]])),
    ("exclusive not bool", pack([1, 1, 1, [["/x", 1, 0]]])),
    ("explain arity", pack([1, 2, 1, 0, [], "/x"])),
    ("explain uid", pack([1, 2, 1, -1, [], "/x", 1])),
    ("explain uid too big", pack([1, 2, 1, 2**32, [], "/x", 1])),
    ("explain gids not array", pack([1, 2, 1, 0, 5, "/x", 1])),
    ("explain gid", pack([1, 2, 1, 0, [0, "1"], "/x", 1])),
    ("explain too many gids", pack([1, 2, 1, 0, [0] * (MAX_GIDS + 1), "/x", 1])),
    ("explain path", pack([1, 2, 1, 0, [], None, 1])),
    ("explain access", pack([1, 2, 1, 0, [], "/x", 64])),
    ("status arity", pack([1, 3, 1, None])),
]


@pytest.mark.parametrize(("what", "data"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(what: str, data: Any) -> None:
    with pytest.raises(ProtocolError):
        p.decode_request(data)


BAD_REPLIES: list[tuple[str, Any]] = [
    ("oversized", b"\x90" * (MAX_REPLY_BYTES + 1)),
    ("unknown op", pack([1, 0, 1])),
    ("open arity", pack([1, 1, 1])),
    ("no results", pack([1, 1, 1, []])),
    ("too many results", pack([1, 1, 1, [OK_RESULT] * (MAX_BATCH + 1)])),
    ("result not array", pack([1, 1, 1, [0]])),
    ("result short", pack([1, 1, 1, [[0, False, ""]]])),
    ("errno negative", pack([1, 1, 1, [[-1, False, "", None]]])),
    ("errno too big", pack([1, 1, 1, [[4096, False, "", None]]])),
    ("denied not bool", pack([1, 1, 1, [[13, 1, "", None]]])),
    ("reason not str", pack([1, 1, 1, [[13, True, None, None]]])),
    ("reason too long", pack([1, 1, 1, [[13, True, "r" * (MAX_REASON_CHARS + 1), None]]])),
    ("rule not str", pack([1, 1, 1, [[13, True, "", 5]]])),
    ("rule too long", pack([1, 1, 1, [[13, True, "", "n" * (MAX_RULE_CHARS + 1)]]])),
    ("denied without errno", pack([1, 1, 1, [[0, True, "", None]]])),
    ("explain arity", pack([1, 2, 1, True, None, ""])),
    ("explain allowed", pack([1, 2, 1, 1, None, "", None, ""])),
    ("explain rule", pack([1, 2, 1, True, 1, "", None, ""])),
    ("explain reason", pack([1, 2, 1, True, None, None, None, ""])),
    ("explain near rule", pack([1, 2, 1, True, None, "", [], ""])),
    ("explain near reason", pack([1, 2, 1, True, None, "", None, 0])),
    ("explain reason too long", pack([1, 2, 1, True, None, "r" * 1601, None, ""])),
    ("status arity", pack([1, 3, 1])),
    ("status not a map", pack([1, 3, 1, [1, 2]])),
    ("status bytes key", b"\x94\x01\x03\x01\x81\xc4\x00\x01"),
    ("status too deep", pack([1, 3, 1, {"a": {"b": [[1]]}}])),
    ("error arity", pack([1, 4, 1, 5])),
    ("error errno 0", pack([1, 4, 1, 0, "x"])),
    ("error errno big", pack([1, 4, 1, 5000, "x"])),
    ("error reason", pack([1, 4, 1, 5, None])),
    ("error reason long", pack([1, 4, 1, 5, "r" * (MAX_REASON_CHARS + 1)])),
]


@pytest.mark.parametrize(("what", "data"), BAD_REPLIES, ids=[b[0] for b in BAD_REPLIES])
def test_bad_replies(what: str, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_reply(data)


def test_decode_errors_name_the_item_that_failed() -> None:
    bad_item = pack([1, 1, 1, [OK_ITEM, OK_ITEM, ["/x", "read", False]]])
    with pytest.raises(ProtocolError, match="item 2 access is not an integer"):
        p.decode_request(bad_item)
    bad_result = pack([1, 1, 1, [OK_RESULT, [13, True, None, None]]])
    with pytest.raises(ProtocolError, match="result 1 reason is not a string"):
        p.decode_reply(bad_result)
    with pytest.raises(ProtocolError, match="result 0 is denied with errno 0"):
        p.decode_reply(pack([1, 1, 1, [[0, True, "", None]]]))
    with pytest.raises(ProtocolError, match=r"^gid is not an integer"):
        p.decode_request(pack([1, 2, 1, 0, [0, "1"], "/x", 1]))


def test_decoded_access_is_the_flag() -> None:
    for value in range(32):
        req = p.decode_request(pack([1, 1, 1, [["/x", value, False]]]))
        assert isinstance(req, OpenRequest)
        access = req.items[0].access
        assert type(access) is Access and access == Access(value)


def test_depth_is_bounded_where_fields_are_not_checked() -> None:
    # A status map is the one place values of any shape are let through.
    ok = p.decode_reply(pack([1, 3, 1, {"a": {"b": [1]}}]))
    assert isinstance(ok, StatusReply)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        p.decode_reply(pack([1, 3, 1, {"a": {"b": [[1]]}}]))
    # Another version's body is not read, but a bomb is still no message.
    with pytest.raises(ProtocolError, match="nested too deeply") as info:
        p.decode_request(pack([2, 1, 1, [[[[["/x"]]]]]]))
    assert not isinstance(info.value, UnsupportedVersion)
    # Everywhere else each field's type check bounds the depth.
    with pytest.raises(ProtocolError, match="item 0 path is not a string"):
        p.decode_request(pack([1, 1, 1, [[[[["/x"]]], 1, False]]]))


def test_requests_are_not_replies_and_back() -> None:
    with pytest.raises(ProtocolError):
        p.decode_request(p.encode_reply(ErrorReply(1, 5, "x")))
    with pytest.raises(ProtocolError):  # a request's item is no result
        p.decode_reply(p.encode_request(REQUESTS[0]))


@pytest.mark.parametrize(
    ("data", "version", "ident"),
    [
        (pack([2, 1, 77, "whatever"]), 2, 77),
        (pack([0, 3, 5]), 0, 5),
        (pack([-1, 3, -5]), -1, 0),
        (pack([99, "x", "not an id"]), 99, 0),
        (pack([2, 1, 2**64 - 1]), 2, 0),
    ],
)
def test_unsupported_version(data: bytes, version: int, ident: int) -> None:
    for decode in (p.decode_request, p.decode_reply):
        with pytest.raises(UnsupportedVersion) as info:
            decode(data)
        assert (info.value.version, info.value.id) == (version, ident)
        assert "not supported" in str(info.value)
        assert isinstance(info.value, ProtocolError)


# ------------------------------------------------------------ fuzz

Decoder = Callable[[bytes], Any]
DECODERS = [p.decode_request, p.decode_reply]


def _decodes_or_protocol_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            msg = decode(data)
        except ProtocolError:
            continue
        assert isinstance(msg, p.Request | p.Reply)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_any_bytes(data: bytes) -> None:
    _decodes_or_protocol_error(data)


@FUZZ
@given(
    st.sampled_from(REQUESTS[:2] + REQUESTS[3:5] + REQUESTS[6:] + REPLIES[:2] + REPLIES[3:]),
    st.data(),
)
def test_fuzz_mutated_valid_messages(msg: Any, data: st.DataObject) -> None:
    raw = bytearray(p.encode_request(msg) if isinstance(msg, p.Request) else p.encode_reply(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[at]
        else:
            del raw[at:]
    _decodes_or_protocol_error(bytes(raw))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=8)
)
keys = st.text(max_size=8) | st.integers(-5, 5) | st.none() | st.booleans()
objects = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=40,
)
fields = st.lists(objects, max_size=6)


@FUZZ
@given(objects)
def test_fuzz_any_msgpack_object(obj: Any) -> None:
    _decodes_or_protocol_error(pack(obj))


@FUZZ_BIG
@given(st.integers(-2, 6), st.integers(0, 5), st.integers(-1, 2**64 - 1), fields)
def test_fuzz_message_shaped_objects(version: int, op: int, ident: int, body: list[Any]) -> None:
    """Arrays that look like messages: the decoder must check every field."""
    _decodes_or_protocol_error(pack([version, op, ident, *body]))


small = scalars | st.lists(scalars, max_size=3)


@FUZZ
@given(
    st.integers(0, 4),
    st.lists(st.lists(small, min_size=3, max_size=5), min_size=1, max_size=4),
)
def test_fuzz_open_bodies(op: int, entries: list[Any]) -> None:
    _decodes_or_protocol_error(pack([VERSION, op, 1, entries]))


@FUZZ
@given(st.integers(1, 3000), st.sampled_from([b"\x91", b"\x81\xa1k"]), st.binary(max_size=3))
def test_fuzz_deep_nesting(depth: int, opener: bytes, tail: bytes) -> None:
    _decodes_or_protocol_error(b"\x94\x01\x03\x01" + opener * depth + b"\xc0" + tail)
    _decodes_or_protocol_error(opener * depth + b"\xc0")


@FUZZ
@given(st.integers(0, 70000), st.sampled_from([0xDC, 0xDD, 0xDE, 0xDF]), st.binary(max_size=64))
def test_fuzz_huge_container_headers(count: int, kind: int, tail: bytes) -> None:
    """Array and map headers that claim far more elements than there are bytes."""
    size = 2 if kind in (0xDC, 0xDE) else 4
    count = min(count, 2 ** (8 * size) - 1)
    header = bytes([kind]) + count.to_bytes(size, "big")
    _decodes_or_protocol_error(b"\x94\x01\x01\x01" + header + tail)
    _decodes_or_protocol_error(header + tail)


@FUZZ_BIG
@given(st.integers(250, 1200), objects)
def test_fuzz_huge_real_containers(n: int, element: Any) -> None:
    _decodes_or_protocol_error(pack([VERSION, 1, 1, [element] * n]))
    _decodes_or_protocol_error(pack([VERSION, 3, 1, {str(i): element for i in range(n)}]))
    _decodes_or_protocol_error(pack([VERSION, 2, 1, 0, [element] * n, "/x", 1]))


paths = st.text(st.characters(exclude_categories=("Cs",)), max_size=60).map(lambda s: "/" + s)
access = st.integers(0, 31).map(Access)
items = st.builds(OpenItem, paths, access, st.booleans())
ids = st.integers(0, 2**63 - 1)


def _result(code: int, denied: bool, reason: str, rule: str | None) -> Result:
    return Result(code, denied and code != 0, reason, rule)


short = st.text(max_size=MAX_RULE_CHARS)
# No bin: replies carry strings, and the decoder refuses non-empty bin.
status_values = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
status_values |= st.text(max_size=40)
valid_requests = st.one_of(
    st.builds(OpenRequest, ids, st.lists(items, min_size=1, max_size=20).map(tuple)),
    st.builds(
        ExplainRequest,
        ids,
        st.integers(0, 2**32 - 1),
        st.lists(st.integers(0, 2**32 - 1), max_size=40).map(tuple),
        paths,
        access,
    ),
    st.builds(StatusRequest, ids),
    st.builds(
        p.SocketRequest,
        ids,
        st.text(max_size=p.MAX_TARGET_CHARS),
        st.integers(0, p.MAX_BACKLOG),
        st.none() | st.booleans(),
        st.booleans(),
    ),
    st.builds(
        p.TunRequest,
        ids,
        st.text(max_size=p.MAX_IFNAME_CHARS),
        st.booleans(),
        st.integers(0, 2**32 - 1),
    ),
    st.builds(
        p.NetconfRequest,
        ids,
        st.sampled_from(p.NETCONF_ACTIONS),
        st.text(max_size=p.MAX_IFNAME_CHARS),
        st.text(max_size=p.MAX_ADDRESS_CHARS),
        st.none() | st.booleans(),
        st.integers(0, 2**32 - 1),
        st.text(max_size=p.MAX_ADDRESS_CHARS),
        st.integers(-1, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
)
valid_replies = st.one_of(
    st.builds(
        OpenReply,
        ids,
        st.lists(
            st.builds(_result, st.integers(0, 4095), st.booleans(), short, st.none() | short),
            min_size=1,
            max_size=20,
        ).map(tuple),
    ),
    st.builds(ExplainReply, ids, st.booleans(), st.none() | short, short, st.none() | short, short),
    st.builds(ErrorReply, ids, st.integers(1, 4095), short),
    st.builds(
        p.SocketReply,
        ids,
        st.builds(_result, st.integers(1, 4095), st.booleans(), short, st.none() | short)
        | st.just(Result()),
    ),
    st.builds(
        p.TunReply,
        ids,
        st.just(Result()),
        st.text(max_size=p.MAX_IFNAME_CHARS),
        st.integers(0, 2**31 - 1),
    ),
    st.builds(
        p.NetconfReply,
        ids,
        st.builds(_result, st.integers(1, 4095), st.booleans(), short, st.none() | short),
    ),
    st.builds(StatusReply, ids, st.dictionaries(st.text(max_size=10), status_values, max_size=10)),
)


@FUZZ
@given(valid_requests)
def test_fuzz_request_round_trip(req: p.Request) -> None:
    assert p.decode_request(p.encode_request(req)) == req


@FUZZ
@given(valid_replies)
def test_fuzz_reply_round_trip(rep: p.Reply) -> None:
    got = p.decode_reply(p.encode_reply(rep))
    if isinstance(rep, StatusReply):  # NaN != NaN, so compare the encodings
        assert p.encode_reply(got) == p.encode_reply(rep)
    else:
        assert got == rep


def test_socket_limits_are_enforced_before_any_io() -> None:
    with pytest.raises(ValueError, match="longer than"):
        p.encode_request(p.SocketRequest(1, "t" * (p.MAX_TARGET_CHARS + 1)))
    with pytest.raises(ValueError, match="backlog"):
        p.encode_request(p.SocketRequest(1, "tcp:[::]:80", p.MAX_BACKLOG + 1))
    for body in (
        [1, 5, 1, "tcp:[::]:80", -1, None, False],  # negative backlog
        [1, 5, 1, "tcp:[::]:80", 0, 1, False],  # v6only not a bool
        [1, 5, 1, 7, 0, None, False],  # target not a string
        [1, 5, 1, "tcp:[::]:80", 0, None],  # a field missing
    ):
        with pytest.raises(p.ProtocolError):
            p.decode_request(pack(body))
    with pytest.raises(ValueError, match="unknown network action"):
        p.encode_request(p.NetconfRequest(1, "flush_everything", "eth0"))
    for body in (
        [1, 7, 1, "flush", "eth0", "", None, 0, "", -1, 0],  # an action no one knows
        [1, 7, 1, "set_link", "eth0", "", None, 0, "", -2, 0],  # metric below -1
        [1, 7, 1, "set_link", "e" * 16, "", None, 0, "", -1, 0],  # name past IFNAMSIZ
        [1, 6, 1, "vpn%d", 1, 0],  # tap not a bool
    ):
        with pytest.raises(p.ProtocolError):
            p.decode_request(pack(body))
    # A socket reply with an fd's errno 0 cannot be a denial.
    with pytest.raises(p.ProtocolError, match="denied with errno 0"):
        p.decode_reply(pack([1, 5, 1, [0, True, "", None]]))


# ------------------------------------------------------------------ op table


def test_op_table_holds_every_message_class_once() -> None:
    assert set(p.REQUESTS) == {
        Op.OPEN,
        Op.EXPLAIN,
        Op.STATUS,
        Op.SOCKET,
        Op.TUN,
        Op.NETCONF,
        Op.DECLARE,
    }
    assert set(p.REPLIES) == {*p.REQUESTS, Op.ERROR}
    for op, cls in p.REQUESTS.items():
        assert cls.op is op
        assert cls.reply is p.REPLIES[op]  # a request is answered by its op's reply
        assert isinstance(cls.root_only, bool)
    for op, rep in p.REPLIES.items():
        assert rep.op is op


def test_unknown_op_in_a_well_formed_envelope_names_op_and_id() -> None:
    with pytest.raises(p.UnknownOperation) as info:
        p.decode_request(pack([1, 42, 7, "whatever", [1]]))
    assert (info.value.op, info.value.id) == (42, 7)
    assert isinstance(info.value, p.ProtocolError)  # still a violation to a client
    # The reply ERROR is no request; a bomb claiming an unknown op is a violation.
    with pytest.raises(p.UnknownOperation):
        p.decode_request(pack([1, int(Op.ERROR), 1, 5, "x"]))
    with pytest.raises(p.ProtocolError) as bomb:
        p.decode_request(pack([1, 42, 7, [[[[[[1]]]]]]]))
    assert not isinstance(bomb.value, p.UnknownOperation)


def test_retry_safety_is_declared_by_each_request() -> None:
    read = p.OpenItem("/a", Access.READ)
    create = p.OpenItem("/a", Access.WRITE | Access.CREATE)
    assert p.OpenRequest(1, (read,)).retry_safe()
    assert not p.OpenRequest(1, (read, create)).retry_safe()
    assert p.ExplainRequest(1, 0, (), "/a", Access.READ).retry_safe()
    assert p.StatusRequest(1).retry_safe()
    assert p.SocketRequest(1, "tcp:[::]:80").retry_safe()  # undelivered: closed with the link
    assert p.TunRequest(1, "vpn%d").retry_safe()  # undelivered: deleted with the lease
    assert not p.NetconfRequest(1, "add_address", "vpn0", "10.8.0.2/24").retry_safe()
    assert p.ExplainRequest.root_only and p.StatusRequest.root_only
    assert not p.OpenRequest.root_only
