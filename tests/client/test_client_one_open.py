"""The one-path open's fast lane (open_fd, open, open_privileged), end to end.

`Client.open_fd` encodes its request with fastwire and checks the usual reply
there; anything else falls through to the general decoder. These tests send
it, through the stand-in broker, every other kind of answer to one path: the
valid ones must give what the general path gives, the invalid ones a
ProtocolError that drops the connection, with every fd that came closed (the
autouse `no_fd_leak` fixture). What the general path does with the same
replies for a batch is in test_client.py (BAD_REPLIES).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from privbroker import (
    BrokerError,
    BrokerUnavailable,
    Client,
    PolicyDenied,
    ProtocolError,
    calls,
    connection,
    open_privileged,
    protocol,
)
from privbroker import shared as client_shared
from privbroker.protocol import (
    MAX_BATCH,
    ErrorReply,
    OpenReply,
    OpenRequest,
    Result,
    StatusReply,
    fastwire,
)
from tests.support.client_cases import ino, null_fds
from tests.support.standin import StandIn, default_handler

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


# Each answers a request to open ONE path; every fd listed is sent, then closed.
BAD_ONE_REPLIES: list[tuple[str, Any]] = [
    ("not msgpack", lambda r: (b"\xc1", null_fds(1))),
    ("wrong version", lambda r: (pack([2, 1, r.id, [[0, False, "", None]]]), null_fds(1))),
    ("wrong id", lambda r: (OpenReply(r.id + 1, (Result(),)), null_fds(1))),
    ("status to open", lambda r: StatusReply(r.id, {})),
    ("no fd for a success", lambda r: (OpenReply(r.id, (Result(),)), [])),
    ("two fds for a success", lambda r: (OpenReply(r.id, (Result(),)), null_fds(2))),
    ("an fd with a failure", lambda r: (OpenReply(r.id, (Result(errno.ENOENT),)), null_fds(1))),
    ("fds on an error", lambda r: (ErrorReply(r.id, errno.EBUSY, "busy"), null_fds(1))),
    ("two results", lambda r: (OpenReply(r.id, (Result(), Result())), null_fds(2))),
    ("no results", lambda r: (pack([1, 1, r.id, []]), [])),
    ("denied with errno 0", lambda r: (pack([1, 1, r.id, [[0, True, "no", None]]]), [])),
    ("errno 0.0", lambda r: (pack([1, 1, r.id, [[0.0, False, "", None]]]), null_fds(1))),
    ("errno false", lambda r: (pack([1, 1, r.id, [[False, False, "", None]]]), null_fds(1))),
    ("version true", lambda r: (pack([True, 1, r.id, [[0, False, "", None]]]), null_fds(1))),
    ("reason too long", lambda r: (pack([1, 1, r.id, [[2, False, "r" * 401, None]]]), [])),
    ("trailing bytes", lambda r: (pack([1, 1, r.id, [[0, False, "", None]]]) + b"\0", [])),
    ("oversized", lambda r: (b"\x00" * (protocol.MAX_REPLY_BYTES + 100), [])),
    ("too many fds", lambda r: (OpenReply(r.id, (Result(),)), null_fds(MAX_BATCH + 2))),
]


@pytest.mark.parametrize(("what", "make"), BAD_ONE_REPLIES, ids=[b[0] for b in BAD_ONE_REPLIES])
def test_bad_reply_to_one_path_is_protocol_error_and_poisons_the_connection(
    what: str, make: Any, files: dict[str, str]
) -> None:
    state = {"bad": True}

    def handler(req: protocol.Request) -> Any:
        return make(req) if state["bad"] else default_handler(req)

    with StandIn(handler) as s, Client(s.name) as c:
        with pytest.raises(ProtocolError):
            c.open_fd(files["a"])
        state["bad"] = False
        os.close(c.open_fd(files["a"]))
        assert s.connections == 2  # the bad connection was dropped, a new one made


def replying(result: Result, send_fd: bool) -> Any:
    def handler(req: protocol.Request) -> Any:
        assert isinstance(req, OpenRequest)
        fds = [os.open(req.items[0].path, os.O_RDONLY | os.O_CLOEXEC)] if send_fd else []
        return OpenReply(req.id, (result,)), fds

    return handler


def test_a_success_with_a_reason_and_a_rule_is_an_fd(files: dict[str, str]) -> None:
    # Not the usual bytes: the general decoder's path, with the same outcome.
    with StandIn(replying(Result(0, False, "opened", "the rule"), True)) as s, Client(s.name) as c:
        fd = c.open_fd(files["a"])
        assert ino(fd) == os.stat(files["a"]).st_ino
        os.close(fd)
        assert s.connections == 1


def test_an_id_in_a_longer_encoding_is_accepted(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        head = b"\x94\x01\x01\xcf" + req.id.to_bytes(8, "big")
        return head + b"\x91\x94\x00\xc2\xa0\xc0", [os.open(files["a"], os.O_RDONLY)]

    with StandIn(handler) as s, Client(s.name) as c:
        os.close(c.open_fd(files["a"]))
        os.close(c.open_fd(files["a"]))
        assert s.connections == 1


@pytest.mark.parametrize(
    ("result", "exc_type"),
    [
        (Result(errno.ENOENT, False, "", None), FileNotFoundError),
        (Result(errno.ELOOP, False, "a symlink on the path", None), OSError),
        (Result(errno.EACCES, True, "never", "shadow rule"), PolicyDenied),
        (Result(errno.EACCES, False, "", None), PermissionError),
    ],
)
def test_failed_results_raise_as_os_open_would(
    files: dict[str, str], result: Result, exc_type: type[OSError]
) -> None:
    with StandIn(replying(result, False)) as s, Client(s.name) as c:
        with pytest.raises(exc_type) as info:
            c.open_fd(files["a"])
        assert info.value.errno == result.errno
        assert info.value.filename == files["a"]
        if isinstance(info.value, PolicyDenied):
            assert (info.value.reason, info.value.rule) == (result.reason, result.rule)
        else:
            assert not isinstance(info.value, PolicyDenied)
        assert s.connections == 1  # a failed open keeps the connection


def test_error_replies_to_one_path(files: dict[str, str]) -> None:
    replies = iter([errno.EBUSY, errno.EPROTO])

    def handler(req: protocol.Request) -> Any:
        code = next(replies, None)
        return default_handler(req) if code is None else ErrorReply(req.id, code, "no")

    with StandIn(handler) as s, Client(s.name) as c:
        with pytest.raises(BrokerError) as info:
            c.open_fd(files["a"])
        assert info.value.errno == errno.EBUSY
        assert s.connections == 1
        with pytest.raises(BrokerError):
            c.open_fd(files["a"])  # EPROTO: the broker closes, so do we
        os.close(c.open_fd(files["a"]))
        assert s.connections == 2


def test_a_reply_that_is_not_there_yet_is_waited_for(files: dict[str, str]) -> None:
    # The receive is tried before waiting; a reply that comes later must be
    # waited for (in poll) and still be received, within the deadline.
    def handler(req: protocol.Request) -> Any:
        time.sleep(0.05)
        return default_handler(req)

    with StandIn(handler) as s, Client(s.name, timeout=5) as c:
        os.close(c.open_fd(files["a"]))
    with StandIn(handler) as s, Client(s.name, timeout=0.01) as c:
        with pytest.raises(BrokerUnavailable) as info:
            c.open_fd(files["a"])
        assert info.value.errno == errno.ETIMEDOUT


def test_after_a_reply_that_was_not_there_yet_the_next_exchanges_wait_first(
    files: dict[str, str],
) -> None:
    # Looking for a reply that is not there costs a failed syscall; when that
    # happens (broker and client on two CPUs), the next exchanges wait first.
    delay = {"s": 0.05}

    def handler(req: protocol.Request) -> Any:
        time.sleep(delay["s"])
        return default_handler(req)

    with StandIn(handler) as s, Client(s.name) as c:
        os.close(c.open_fd(files["a"]))
        assert c._rx.wait_first == connection._WAIT_FIRST
        delay["s"] = 0
        for _ in range(connection._WAIT_FIRST):
            os.close(c.open_fd(files["a"]))
        assert c._rx.wait_first == 0  # and the next one looks first again
    with StandIn(handler) as s, Client(s.name, timeout=None) as c:
        os.close(c.open_fd(files["a"]))  # no deadline: a blocking receive, no looking
        assert c._rx.wait_first == 0


def test_open_privileged_and_open_take_the_same_lane(files: dict[str, str]) -> None:
    with StandIn() as s:
        try:
            with open_privileged(files["a"], "rb", buffering=0, socket=s.name) as f:
                assert f.read() == b"contents of a\n"
                assert f.name == files["a"]
            assert client_shared._shared_client(s.name) is client_shared._shared_client(s.name)
        finally:
            client_shared._shared.pop(s.name).close()
        with Client(s.name) as c, c.open(Path(files["b"])) as g:
            assert g.read() == "contents of b\n"
            assert g.name == files["b"]


# ----------------------------------------------------------- prepare_open


def test_prepare_open_is_open_item_and_its_body() -> None:
    prepared = calls.prepare_open("/srv/data", "r+")
    assert prepared.item == calls.open_item("/srv/data", "r+")
    assert prepared.body == fastwire.open_body(prepared.item)
    assert calls.prepare_open("/srv/data", "r+") is prepared  # remembered
    assert calls.prepare_open(Path("/srv/data"), "r+") is prepared  # by its fspath


def test_prepare_open_remembers_only_exact_strs() -> None:
    class Sly(str):
        def __hash__(self) -> int:
            return 0

    first = calls.prepare_open(Sly("/srv/sly"), "r")
    assert first.item.path == "/srv/sly"
    assert (Sly("/srv/sly"), "r") not in calls._prepared
    assert calls.prepare_open(Sly("/srv/sly"), "r") is not first


@pytest.mark.parametrize(
    ("path", "mode"),
    [("relative", "r"), ("/a/../b", "r"), (b"/bytes", "r"), ("/a", "rw"), ("/a", ["r"])],
)
def test_prepare_open_refuses_as_open_item_does(path: Any, mode: Any) -> None:
    with pytest.raises(ValueError):
        calls.open_item(path, mode)
    with pytest.raises(ValueError):
        calls.prepare_open(path, mode)


def test_prepare_open_is_bounded() -> None:
    for n in range(calls._PREPARED_MAX * 2 + 3):
        calls.prepare_open(f"/srv/many/{n}", "r")
        assert len(calls._prepared) <= calls._PREPARED_MAX
    assert calls.prepare_open("/srv/many/0", "r").item.path == "/srv/many/0"
