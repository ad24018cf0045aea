"""Malformed input over the socket: the broker closes that connection or
answers with an error, never hands out an fd, never dies, and a separate
well-behaved client is served all the while (wire protocol contract)."""

from __future__ import annotations

import errno
import random
import socket
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privbroker import protocol as proto
from tests.adversarial._util import (
    TALLY,
    Prober,
    broker_healthy,
    fd_count,
    outcome,
    probe_policy,
    raw_socket,
    settle_fds,
    stable_fd_count,
)

pytestmark = pytest.mark.adversarial

STATS: Counter[str] = Counter()


def packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


policy = probe_policy  # a read rule for the probe, for root and nobody


def send_and_judge(name: str, payload: bytes, *, expect_fd: bool = False) -> str:
    """One connection, one payload: the broker must close it or answer with an
    error (no fd); a reply leaves the connection in step or closed."""
    s = raw_socket(name)
    try:
        if len(payload) > 200_000:
            s.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE (root)
        try:
            s.send(payload, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            return "closed"
        how, reply, nfds = outcome(s)
        assert how != "silent", f"no answer and no close for {payload[:80]!r}"
        assert nfds == 0 or expect_fd, f"an fd came back for {payload[:80]!r}: {reply!r}"
        if how == "reply":
            assert reply is not None
            ok = (
                isinstance(reply, proto.ErrorReply)
                or (isinstance(reply, proto.OpenReply) and all(r.errno for r in reply.results))
                or isinstance(reply, proto.StatusReply | proto.ExplainReply)
            )
            assert ok, f"{payload[:80]!r} was answered with success: {reply!r}"
        STATS[how] += 1
        return how
    finally:
        s.close()


VALID = [1, 1, 7, [["/etc/hostname", 1, False]]]


def with_field(path: tuple[int, ...], value: object) -> bytes:
    msg = [1, 1, 7, [["/etc/hostname", 1, False]]]
    target: list = msg  # type: ignore[type-arg]
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = value
    return packb(msg)


WRONG = [
    None,
    True,
    False,
    1.5,
    -1,
    2**64 - 1,
    -(2**63),
    "x",
    "",
    b"bin",
    [],
    [1],
    {},
    {"a": 1},
    msgpack.ExtType(5, b"e"),
]


def malformed_payloads() -> list[tuple[str, bytes]]:
    rnd = random.Random(20240611)
    out: list[tuple[str, bytes]] = [("empty", b"")]
    out += [
        (f"random{n}", rnd.randbytes(rnd.choice([1, 2, 3, 7, 64, 500, 4096, 70000])))
        for n in range(40)
    ]
    valid = packb(VALID)
    out += [(f"truncated{n}", valid[:n]) for n in range(1, len(valid))]
    out += [
        ("extra-data", valid + b"\x00"),
        ("two-messages", valid + valid),
        ("over-limit", b"\x91" + b"\xc0" * proto.MAX_REQUEST_BYTES),
        ("over-limit-str", packb([1, 1, 1, [["/" + "a" * 150_000, 1, False]]])),
        ("one-megabyte", packb([1, 1, 1, [["/" + "a" * (1 << 20), 1, False]]])),
        ("batch-251", packb([1, 1, 1, [["/etc/hostname", 1, False]] * 251])),
        ("batch-0", packb([1, 1, 1, []])),
    ]
    # wrong types in every field
    for where, label in (
        ((0,), "version"),
        ((1,), "op"),
        ((2,), "id"),
        ((3,), "items"),
        ((3, 0), "item"),
        ((3, 0, 0), "path"),
        ((3, 0, 1), "access"),
        ((3, 0, 2), "exclusive"),
    ):
        for n, value in enumerate(WRONG):
            out.append((f"{label}-wrong{n}", with_field(where, value)))
    out += [(f"access-{a}", with_field((3, 0, 1), a)) for a in (0, 32, 255, 2**31)]
    out += [
        (f"item-len{n}", with_field((3, 0), ["/etc/hostname", 1, False, 0][:n]))
        for n in (0, 1, 2, 4)
    ]
    out += [
        ("item-extra", with_field((3, 0), ["/etc/hostname", 1, False, None])),
        ("body-extra", packb([*VALID, [0]])),
        ("body-groups", packb([*VALID, [0, 42]])),
        ("no-body", packb([1, 1, 7])),
        ("short", packb([1, 1])),
        ("not-array", packb(7)),
        ("map", packb({"version": 1})),
        ("nil", packb(None)),
        ("str", packb("open")),
    ]
    # unknown operations, and ERROR sent as a request
    out += [
        (f"op-{op}", packb([1, op, 3, [["/etc/hostname", 1, False]]]))
        for op in (0, 4, 5, 99, 2**32, 2**63 - 1)
    ]
    out += [
        (f"version-{v}", packb([v, 1, 3, [["/etc/hostname", 1, False]]]))
        for v in (0, 2, 255, 2**64 - 1)
    ]
    # explain and status with bad bodies
    out += [
        ("explain-short", packb([1, 2, 1, 0, [0]])),
        ("explain-uid-neg", packb([1, 2, 1, -1, [0], "/etc", 1])),
        ("explain-gid-big", packb([1, 2, 1, 0, [2**40], "/etc", 1])),
        ("explain-gids-str", packb([1, 2, 1, 0, "0", "/etc", 1])),
        ("status-body", packb([1, 3, 1, 0])),
    ]
    # huge containers announced, not sent
    for tag, head in (
        ("array32", b"\xdd"),
        ("map32", b"\xdf"),
        ("str32", b"\xdb"),
        ("bin32", b"\xc6"),
        ("ext32", b"\xc9"),
    ):
        for size in (2**31, 2**32 - 1):
            out.append((f"{tag}-{size}", head + size.to_bytes(4, "big") + b"\x01"))
    out += [
        ("array32-in-items", b"\x94\x01\x01\x01\xdd\x80\x00\x00\x00"),
        ("array16-65535", b"\xdc\xff\xff" + b"\xc0" * 10),
    ]
    # deep nesting
    out += [
        ("deep-array", b"\x91" * 100_000 + b"\xc0"),
        ("deep-map", b"\x81\xa1k" * 30_000 + b"\xc0"),
        ("deep-items", packb([1, 1, 1, [[[[[[[[["/x"]]]]]]]]]])),
        ("deep-in-path", b"\x94\x01\x01\x01\x91\x93" + b"\x91" * 5000 + b"\xc0\x01\xc2"),
    ]
    # invalid UTF-8 and NUL bytes in paths
    for n, raw in enumerate(
        (b"/tmp/\xff", b"/tmp/\xed\xa0\x80", b"/\xc0\xaf", b"/\xfe\xff", b"/etc/host\x80name")
    ):
        body = bytes([0xD9, len(raw)]) + raw  # str8 holding raw bytes
        out.append((f"bad-utf8-{n}", b"\x94\x01\x01\x01\x91\x93" + body + b"\x01\xc2"))
    for n, p in enumerate(("/etc/hostname\0", "/etc/\0/shadow", "\0", "/a\0b")):
        out.append((f"nul-{n}", with_field((3, 0, 0), p)))
    out += [
        (f"path-{n}", with_field((3, 0, 0), p))
        for n, p in enumerate(
            ("", "relative", "/a/../etc/shadow", "/a//b", "/a/", "/./etc", "/" + "a" * 5000)
        )
    ]
    return out


PAYLOADS = malformed_payloads()


def test_malformed_payloads_close_or_error(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe))
    # A connection used once, so the baseline includes whatever the first one creates.
    send_and_judge(b.name, packb(VALID))
    baseline = stable_fd_count(b.proc.pid)
    outcomes: Counter[str] = Counter()
    with Prober(b.name, str(probe), b"probe\n") as prober:
        for label, payload in PAYLOADS:
            try:
                outcomes[send_and_judge(b.name, payload)] += 1
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}") from None
            assert b.proc.poll() is None, f"broker died on {label}"
    prober.check()
    print(f"{len(PAYLOADS)} malformed payloads: {dict(outcomes)}; prober {prober.ok} ok")
    TALLY["malformed payloads (fixed list)"] += len(PAYLOADS)
    assert settle_fds(b.proc.pid, baseline) <= baseline, "fds left behind in the broker"
    broker_healthy(b)


def test_malformed_after_valid_on_one_connection(start_broker, probe: Path) -> None:
    """A valid request is answered; garbage on the same connection then closes it."""
    b = start_broker(policy(probe))
    s = raw_socket(b.name)
    try:
        for _ in range(3):
            s.send(packb([1, 1, 9, [[str(probe), 1, False]]]))
            how, reply, nfds = outcome(s)
            assert how == "reply" and nfds == 1 and isinstance(reply, proto.OpenReply)
        s.send(b"\xc1garbage")
        assert outcome(s)[0] == "closed"
    finally:
        s.close()
    broker_healthy(b)


@pytest.mark.parametrize("op", [0, max(proto.Op) + 1, 99, 2**32, 2**63 - 1])
def test_unknown_op_is_refused_with_eopnotsupp_and_the_connection_lives(
    start_broker, probe: Path, op: int
) -> None:
    """A well-formed envelope of an op this broker does not know (a newer
    client's, say) gets an ERROR reply naming EOPNOTSUPP, not a dropped
    connection; the next request on the same connection is served."""
    b = start_broker(policy(probe))
    s = raw_socket(b.name)
    try:
        s.send(packb([1, op, 77, "a body this broker cannot know", [1, 2]]))
        how, reply, nfds = outcome(s)
        assert how == "reply" and nfds == 0
        assert isinstance(reply, proto.ErrorReply)
        assert (reply.id, reply.errno) == (77, errno.EOPNOTSUPP)
        assert str(op) in reply.reason
        s.send(packb([1, 1, 78, [[str(probe), 1, False]]]))
        how, reply, nfds = outcome(s)
        assert how == "reply" and nfds == 1 and isinstance(reply, proto.OpenReply)
    finally:
        s.close()
    broker_healthy(b)


def test_error_sent_as_a_request_is_refused_too(start_broker, probe: Path) -> None:
    """ERROR is a reply kind only: as a request it is an op the broker serves not."""
    b = start_broker(policy(probe))
    s = raw_socket(b.name)
    try:
        s.send(packb([1, int(proto.Op.ERROR), 5, 1, "x"]))
        how, reply, _ = outcome(s)
        assert how == "reply" and isinstance(reply, proto.ErrorReply)
        assert reply.errno == errno.EOPNOTSUPP
    finally:
        s.close()


# ------------------------------------------------------------------ hypothesis

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=16)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=20,
)
PATHS = st.sampled_from(
    [
        "/etc/hostname",
        "/etc/shadow",
        "/",
        "/proc/self/environ",
        "",
        "x",
        "/tmp/../etc",
        "/dev/stdin",
    ]
) | st.text(max_size=30)
ITEMS = st.lists(
    st.lists(PATHS | VALUES, min_size=0, max_size=4)
    | st.tuples(PATHS, st.integers(-2, 40), st.booleans() | VALUES).map(list),
    max_size=4,
)
STRUCTURED = st.tuples(
    st.sampled_from([1, 1, 1, 0, 2]) | st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([1, 2, 3, 4, 0, 99]),
    st.integers(0, 2**63 - 1) | VALUES,
    st.lists(ITEMS | VALUES, max_size=4),
).map(lambda t: packb([t[0], t[1], t[2], *t[3]]))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(
        packb(
            [
                1,
                1,
                draw(st.integers(0, 1000)),
                [["/etc/hostname", 1, False], ["/etc/passwd", 3, True]],
            ]
        )
    )
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif pos < len(data):
            del data[pos]
    return bytes(data)


PAYLOAD = st.binary(max_size=2048) | STRUCTURED | mutated()


def test_fuzz_the_broker_over_its_socket(start_broker, probe: Path) -> None:
    b = start_broker(policy(probe))
    send_and_judge(b.name, packb(VALID))
    baseline = stable_fd_count(b.proc.pid)
    seen: Counter[str] = Counter()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=PAYLOAD)
    def one(payload: bytes) -> None:
        seen[send_and_judge(b.name, payload)] += 1
        assert b.proc.poll() is None, f"broker died on {payload!r}"

    with Prober(b.name, str(probe), b"probe\n") as prober:
        one()
    prober.check()
    print(f"fuzz: {sum(seen.values())} cases over the socket: {dict(seen)}")
    TALLY["hypothesis fuzz cases over the socket"] += sum(seen.values())
    assert sum(seen.values()) >= 100
    assert settle_fds(b.proc.pid, baseline) <= baseline, fd_count(b.proc.pid)
    broker_healthy(b)
