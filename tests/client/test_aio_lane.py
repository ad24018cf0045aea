"""The asyncio client's one-path fast lane (aio_lane.py), as a property and end to end.

`reply_id` is only a hint, and `fast_result` must accept exactly what the
general decoder and `calls.check_reply` accept for a one-path open: both are
checked with hypothesis against codec.py. Then `AsyncClient.open_fd`, `open`
and `open_privileged` against the stand-in: the usual reply never reaches the
general decoder, every other kind of answer gives what the general path
gives (the invalid ones a ProtocolError that drops the link), pipelined
calls get their own fds back whatever the width of their ids, and every fd
that came is closed (the autouse `no_fd_leak` fixture).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privbroker import PolicyDenied, ProtocolError, aio, aio_lane, calls, protocol
from privbroker.aio import AsyncClient
from privbroker.protocol import (
    MAX_ID,
    ErrorReply,
    OpenItem,
    OpenReply,
    OpenRequest,
    Result,
    StatusReply,
    fastwire,
)
from tests.client.test_aio import run
from tests.client.test_client_one_open import BAD_ONE_REPLIES, replying
from tests.support.client_cases import ino
from tests.support.standin import StandIn, default_handler

pytestmark = pytest.mark.usefixtures("no_fd_leak")
FUZZ = settings(
    max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
ids = st.integers(0, MAX_ID)
results = st.builds(
    Result,
    st.integers(0, 4095),
    st.booleans(),
    st.text(max_size=20),
    st.none() | st.text(max_size=20),
).filter(lambda r: not (r.denied and r.errno == 0))


# ------------------------------------------------------------------- pure


@FUZZ
@given(ids, results)
def test_reply_id_reads_the_id_of_every_reply(ident: int, result: Result) -> None:
    for reply in (
        OpenReply(ident, (result,)),
        OpenReply(ident, (result, result)),
        ErrorReply(ident, errno.EBUSY, "busy"),
        StatusReply(ident, {"uptime": 1}),
    ):
        assert aio_lane.reply_id(protocol.encode_reply(reply)) == ident


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x94\x01\x01", b"\x92\x01\x01\x05", b"\x94\xcc\x01\x05", b"\x94\x01\x01\xcd\x01"],
)
def test_reply_id_of_another_head_is_none(raw: bytes) -> None:
    assert aio_lane.reply_id(raw) is None


def general(raw: bytes, ident: int, nfds: int) -> Result | None:
    """What the general decoder and check_reply make of `raw` for a one-path open `ident`."""
    request = OpenRequest(ident, (OpenItem("/x", protocol.Access.READ, False),))
    try:
        reply = protocol.decode_reply(raw)
        calls.check_reply(request, reply, nfds)
    except protocol.ProtocolError:
        return None
    return reply.results[0] if isinstance(reply, OpenReply) else None


@FUZZ
@given(st.integers(0, 300), st.integers(0, 300), st.lists(results, max_size=2), st.integers(0, 2))
def test_fast_result_accepts_what_the_general_path_accepts(
    ident: int, reply_id: int, rs: list[Result], nfds: int
) -> None:
    raw = protocol.encode_reply(OpenReply(reply_id, tuple(rs)))
    assert aio_lane.fast_result(raw, ident, nfds) == general(raw, ident, nfds)


@FUZZ
@given(st.integers(0, 300), st.binary(max_size=40), st.integers(0, 1))
def test_fast_result_of_any_bytes_is_a_result_only_where_the_general_path_agrees(
    ident: int, raw: bytes, nfds: int
) -> None:
    fast = aio_lane.fast_result(raw, ident, nfds)
    assert fast is None or fast == general(raw, ident, nfds)


def test_open_request_is_what_the_sync_client_sends() -> None:
    prepared = calls.prepare_open("/etc/hostname", "r")
    request, data = aio_lane.open_request(300, prepared)
    assert request == OpenRequest(300, (prepared.item,))
    assert data == protocol.encode_request(request) == fastwire.encode_open(300, prepared.body)


# ------------------------------------------------------------ end to end


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many replies reached the general decoder (the stand-in does not decode replies)."""
    seen: list[int] = []
    real = protocol.decode_reply

    def decode_reply(raw: bytes) -> protocol.Reply:
        seen.append(len(raw))
        return real(raw)

    monkeypatch.setattr(protocol, "decode_reply", decode_reply)
    return seen


def test_the_usual_reply_never_reaches_the_general_decoder(
    standin: StandIn, files: dict[str, str], counted: list[int]
) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            for _ in range(3):
                for name in "abc":
                    fd = await c.open_fd(files[name])
                    assert ino(fd) == os.stat(files[name]).st_ino
                    os.close(fd)
                with await c.open(files["a"]) as f:
                    assert f.read() == "contents of a\n"
                    assert f.name == files["a"]
            with await aio.open_privileged(files["b"], "rb", socket=standin.name) as f:
                assert f.read() == b"contents of b\n"
            await aio._shared_client(standin.name).close()
            (fd,) = await c.open_many([files["a"]])  # a batch: the general path
            os.close(fd)

    run(main())
    assert len(counted) == 1  # open_many's reply alone
    assert all(len(r.items) == 1 for r in standin.requests if isinstance(r, OpenRequest))


def test_pipelined_opens_get_their_own_fds_through_every_id_width(
    standin: StandIn, files: dict[str, str], counted: list[int]
) -> None:
    # Ids 1 to 400: fixint, then uint8, then uint16 heads, in flight together.
    names = ["a", "b", "c"] * 133

    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            fds = await asyncio.gather(*(c.open_fd(files[n]) for n in names))
            batch = c.open_many([files["c"], files["a"]])
            one = c.open_fd(files["b"])
            pair, single = await asyncio.gather(batch, one)
            fds += [*pair, single]
            try:
                got = [ino(fd) for fd in fds]
            finally:
                for fd in fds:
                    os.close(fd)
            want = [os.stat(files[n]).st_ino for n in [*names, "c", "a", "b"]]
            assert got == want

    run(main())
    assert len(counted) == 1  # the batch


@pytest.mark.parametrize(("what", "make"), BAD_ONE_REPLIES, ids=[b[0] for b in BAD_ONE_REPLIES])
def test_bad_reply_to_one_path_is_protocol_error_and_drops_the_link(
    what: str, make: Any, files: dict[str, str]
) -> None:
    state = {"bad": True}

    def handler(req: protocol.Request) -> Any:
        return make(req) if state["bad"] else default_handler(req)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(ProtocolError):
                await c.open_fd(files["a"])
            state["bad"] = False
            os.close(await c.open_fd(files["a"]))

    with StandIn(handler) as s:
        run(main(s))
        assert s.connections == 2  # the bad link was dropped, a new one made


@pytest.mark.parametrize(
    "result",
    [
        Result(0, False, "opened", "the rule"),  # not the usual bytes: the general path
        Result(errno.ENOENT, False, "", None),
        Result(errno.ELOOP, False, "a symlink on the path", None),
        Result(errno.EACCES, True, "never", "shadow rule"),
    ],
)
def test_every_valid_answer_gives_what_the_general_path_gives(
    files: dict[str, str], result: Result
) -> None:
    async def main(s: StandIn) -> Any:
        async with AsyncClient(s.name) as c:
            try:
                fd = await c.open_fd(files["a"])
            except OSError as exc:
                return exc
            os.close(fd)
            return fd

    with StandIn(replying(result, not result.errno)) as s:
        got = run(main(s))
        assert s.connections == 1
    if not result.errno:
        assert isinstance(got, int)
        return
    assert isinstance(got, OSError)
    assert (got.errno, got.filename) == (result.errno, files["a"])
    assert isinstance(got, PolicyDenied) == result.denied
    if result.denied:
        assert (got.reason, got.rule) == ("never", "shadow rule")


def test_an_error_reply_to_one_path_is_a_broker_error_and_the_link_lives(
    files: dict[str, str],
) -> None:
    state = {"refuse": True}

    def handler(req: protocol.Request) -> Any:
        if state["refuse"]:
            return ErrorReply(req.id, errno.EBUSY, "too busy")
        return default_handler(req)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(OSError, match="too busy") as info:
                await c.open_fd(files["a"])
            assert info.value.errno == errno.EBUSY
            state["refuse"] = False
            os.close(await c.open_fd(files["a"]))

    with StandIn(handler) as s:
        run(main(s))
        assert s.connections == 1


def test_an_id_in_a_longer_encoding_is_accepted(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        head = b"\x94\x01\x01\xcf" + req.id.to_bytes(8, "big")
        return head + b"\x91\x94\x00\xc2\xa0\xc0", [os.open(files["a"], os.O_RDONLY)]

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            for _ in range(2):
                os.close(await c.open_fd(files["a"]))

    with StandIn(handler) as s:
        run(main(s))
        assert s.connections == 1


def test_raw_bytes_of_a_denial_decode_on_the_lane(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        body = [[errno.EACCES, True, "no rule allows it", None]]
        return msgpack.packb([1, 1, req.id, body], use_bin_type=True), []

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(PolicyDenied, match="no rule allows it"):
                await c.open_fd(files["a"])

    with StandIn(handler) as s:
        run(main(s))
