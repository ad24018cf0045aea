"""The asyncio client, against the stand-in broker and against a real one.

pytest-asyncio is not a dependency: each test drives its coroutine with `run`,
a wrapper of asyncio.Runner that also fails the test on anything the loop
reported (an exception in the reader callback, a future whose exception
nobody retrieved). Every test checks, through the autouse `no_fd_leak`
fixture, that the process holds the same fds afterwards as before.

Cancellation is tested at each point a call can be cancelled (waiting to
connect, to send, for the reply, and after the reply arrived but before the
call returned), then at random points, many times, with a stand-in and with
a real broker: no fd may stay open that nobody owns.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import os
import random
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from privbroker import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    PolicyDenied,
    ProtocolError,
    aio,
    protocol,
    unix,
)
from privbroker.aio import AsyncClient, open_privileged
from privbroker.aio_connection import Link
from privbroker.protocol import MAX_BATCH, ErrorReply, OpenReply, OpenRequest, Result
from tests.support.client_cases import BAD_REPLIES, fd_set, ino, tree_policy, with_impostor
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.standin import CLOSE, SILENT, StandIn, default_handler, unique_name

pytestmark = pytest.mark.usefixtures("no_fd_leak")
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, failing on any error the loop reported to its exception handler."""
    reported: list[dict[str, Any]] = []
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        result = runner.run(coro)
        gc.collect()  # "exception was never retrieved" is reported when a future dies
    assert not reported, reported
    return result


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not check():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


class Gate:
    """A stand-in handler that holds requests until `open()`, then answers normally."""

    def __init__(self, hold: Callable[[protocol.Request], bool] = lambda r: True) -> None:
        self.event = threading.Event()
        self.hold = hold

    def __call__(self, req: protocol.Request) -> Any:
        if self.hold(req):
            assert self.event.wait(20), "gate never opened"
        return default_handler(req)

    def open(self) -> None:
        self.event.set()


# ----------------------------------------------------------- results


def test_open_fd_returns_a_cloexec_fd_of_the_file(standin: StandIn, files: dict[str, str]) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            fd = await c.open_fd(files["a"])
            try:
                assert ino(fd) == os.stat(files["a"]).st_ino
                assert not os.get_inheritable(fd)
                assert os.read(fd, 100) == b"contents of a\n"
            finally:
                os.close(fd)

    run(main())
    req = standin.requests[0]
    assert isinstance(req, OpenRequest)
    assert req.items == (protocol.OpenItem(files["a"], protocol.Access.READ, False),)


@pytest.mark.parametrize(
    ("mode", "buffering"),
    [("r", -1), ("rb", -1), ("rb", 0), ("r+", -1), ("w", -1), ("wb", 0), ("a", -1), ("x", -1)],
)
def test_open_returns_what_builtin_open_returns(
    standin: StandIn, tmp_path: Path, mode: str, buffering: int
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    if "x" not in mode:
        ours.write_bytes(b"old\n")
        theirs.write_bytes(b"old\n")

    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            with await c.open(ours, mode, buffering) as f, open(theirs, mode, buffering) as g:
                assert type(f) is type(g)
                assert (f.mode, f.name) == (g.mode, str(ours))
                if isinstance(f, io.TextIOWrapper):
                    assert f.buffer.name == str(ours)
                if f.writable():
                    f.write(b"new\n" if "b" in mode else "new\n")

    run(main())
    expected = {"r": b"old\n", "w": b"new\n", "a": b"old\nnew\n", "x": b"new\n"}
    kind = mode.strip("bt+")
    assert ours.read_bytes() == (b"new\n" if kind == "r" and "+" in mode else expected[kind])


def test_open_text_arguments_reach_the_wrapper(standin: StandIn, tmp_path: Path) -> None:
    p = tmp_path / "latin"
    p.write_bytes("café\r\n".encode("latin-1"))

    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            with await c.open(p, encoding="latin-1", newline="") as f:
                assert f.read() == "café\r\n"

    run(main())


def test_open_many_one_round_trip_in_order_and_all_or_nothing(
    standin: StandIn, files: dict[str, str]
) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            fds = await c.open_many([files["a"], (files["b"], "r"), (files["c"], "rb")])
            try:
                assert [ino(fd) for fd in fds] == [os.stat(files[k]).st_ino for k in "abc"]
            finally:
                unix.close_fds(fds)
            assert await c.open_many([]) == []
            with pytest.raises(FileNotFoundError) as info:
                await c.open_many([files["a"], files["missing"], files["secret"], files["b"]])
            assert info.value.filename == files["missing"]
            fds = await c.open_many([files["a"]] * MAX_BATCH)
            assert len(fds) == MAX_BATCH
            unix.close_fds(fds)

    run(main())
    assert len(standin.requests) == 3


def test_kernel_errors_and_denials(standin: StandIn, files: dict[str, str]) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            with pytest.raises(FileNotFoundError) as missing:
                await c.open_fd(files["missing"])
            assert (missing.value.errno, missing.value.filename) == (errno.ENOENT, files["missing"])
            with pytest.raises(IsADirectoryError):
                await c.open(files["dir"], "w")
            with pytest.raises(FileExistsError):
                await c.open(files["a"], "x")
            with pytest.raises(PolicyDenied) as denied:
                await c.open(files["secret"])
            exc = denied.value
            assert isinstance(exc, PermissionError) and exc.errno == errno.EACCES
            assert (exc.filename, exc.reason, exc.rule) == (
                files["secret"],
                "no rule allows this",
                "no secrets",
            )

    run(main())
    assert standin.connections == 1


NEVER_CREATED = f"/tmp/{unique_name()}"
BAD_CALLS: list[tuple[str, Callable[[AsyncClient], Coroutine[Any, Any, Any]]]] = [
    ("relative path", lambda c: c.open_fd("etc/passwd")),
    ("dot-dot", lambda c: c.open_fd("/etc/../etc/passwd")),
    ("NUL", lambda c: c.open_fd("/etc/pass\0wd")),
    ("bytes path", lambda c: c.open_fd(b"/etc/passwd")),  # type: ignore[arg-type]
    ("too long", lambda c: c.open_fd("/" + "a" * 5000)),
    ("two kinds", lambda c: c.open_fd("/etc/passwd", "rw")),
    ("binary encoding", lambda c: c.open("/etc/passwd", "rb", encoding="utf-8")),
    ("unbuffered text", lambda c: c.open("/etc/passwd", "w", buffering=0)),
    ("bad encoding", lambda c: c.open(NEVER_CREATED, "w", encoding="no-such-codec")),
    ("batch too big", lambda c: c.open_many(["/etc/passwd"] * (MAX_BATCH + 1))),
    ("bad item", lambda c: c.open_many(["/etc/passwd", ("/etc/x", "z")])),
    ("bad access word", lambda c: c.explain(0, [0], "/etc/passwd", ["read", "exec"])),
    ("bad gid", lambda c: c.explain(0, [2**32], "/etc/passwd", ["read"])),
]


@pytest.mark.parametrize(("what", "call"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_invalid_arguments_fail_before_any_io(standin: StandIn, what: str, call: Any) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            with pytest.raises((ValueError, LookupError)):
                await call(c)
            assert c._link is None  # not even connected
            os.close(await c.open_fd("/dev/null"))

    run(main())
    assert (standin.connections, len(standin.requests)) == (1, 1)
    assert not os.path.exists(NEVER_CREATED)


def test_invalid_client_arguments() -> None:
    with pytest.raises(ValueError):
        AsyncClient("")
    with pytest.raises(ValueError):
        AsyncClient("ok", timeout=0)
    with pytest.raises(ValueError):
        run(open_privileged("/etc/passwd", timeout=-1, socket=unique_name()))


def test_nothing_listening_is_broker_unavailable() -> None:
    async def main() -> None:
        async with AsyncClient(unique_name()) as c:
            with pytest.raises(BrokerUnavailable) as info:
                await c.open_fd("/etc/passwd")
            assert info.value.errno == errno.ECONNREFUSED

    run(main())


def _full_backlog(name: str) -> tuple[socket.socket, socket.socket]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(unix.abstract_address(name))
    listener.listen(0)  # one pending connection fits, and nobody accepts
    filler.connect(unix.abstract_address(name))
    return listener, filler


def test_full_backlog_is_waited_out_within_the_timeout() -> None:
    name = unique_name()
    listener, filler = _full_backlog(name)

    async def main() -> None:
        async with AsyncClient(name, timeout=0.3) as c:
            with pytest.raises(BrokerUnavailable) as info:
                await c.open_fd("/etc/passwd")
            assert info.value.errno == errno.ETIMEDOUT
            assert "connect to" in str(info.value)

    with listener, filler:
        run(main())


def test_tasks_waiting_for_a_connection_share_one_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_name()
    listener, filler = _full_backlog(name)
    connects = []
    real_connect = aio.connect

    async def counted_connect(*args: Any) -> Link:
        connects.append(args)
        return await real_connect(*args)

    monkeypatch.setattr(aio, "connect", counted_connect)

    async def main() -> None:
        async with AsyncClient(name, timeout=None) as c:
            tasks = [asyncio.create_task(c.status()) for _ in range(3)]
            # The three tasks start in one loop iteration: the first holds the
            # connect lock and polls the full backlog, the other two wait for it.
            await eventually(lambda: len(connects) == 1)
            assert c._connecting is not None and c._connecting.locked()
            assert c._link is None and not any(t.done() for t in tasks)
            filler.close()
            listener.accept()[0].close()  # room in the backlog now
            # All three requests sent before the blocking recv() below stops
            # the loop: the link existing is not enough, as the two waiting
            # tasks may not have run since it was made.
            await eventually(lambda: c._link is not None and c._link.in_flight == 3)
            conn, _ = listener.accept()
            with conn:
                for _ in tasks:
                    req = protocol.decode_request(conn.recv(protocol.MAX_REQUEST_BYTES))
                    conn.send(protocol.encode_reply(protocol.StatusReply(req.id, {"n": req.id})))
                assert sorted(r["n"] for r in await asyncio.gather(*tasks)) == [1, 2, 3]
            assert len(connects) == 1
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()  # one connection for the three of them

    with listener, filler:
        run(main())


# ---------------------------------------------------- broker identity


def test_broker_of_the_wrong_uid_is_refused_before_sending() -> None:
    async def main(name: str) -> None:
        async with AsyncClient(name) as c:
            with pytest.raises(BrokerIdentityError) as info:
                await c.open_fd("/etc/passwd")
            assert "65534" in str(info.value)

    assert with_impostor(False, lambda name: run(main(name))) == b""


def test_expected_uid_other_than_root_is_accepted() -> None:
    async def main(name: str) -> None:
        async with AsyncClient(name, expected_uid=NOBODY) as c:
            with pytest.raises(FileNotFoundError):
                await c.open_fd("/nowhere")

    assert with_impostor(True, lambda name: run(main(name))) != b""


# ----------------------------------------------------------- protocol errors


@pytest.mark.parametrize(("what", "make"), BAD_REPLIES, ids=[b[0] for b in BAD_REPLIES])
def test_bad_reply_is_protocol_error_and_poisons_the_connection(
    what: str, make: Any, files: dict[str, str]
) -> None:
    state = {"bad": True}

    def handler(req: protocol.Request) -> Any:
        return make(req) if state["bad"] else default_handler(req)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(ProtocolError):
                await c.open_many([files["a"], files["b"]])
            state["bad"] = False
            unix.close_fds(await c.open_many([files["a"], files["b"]]))

    with StandIn(handler) as s:
        run(main(s))
        assert s.connections == 2  # the bad connection was dropped, a new one made


def test_a_bad_reply_fails_every_request_in_flight(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        if isinstance(req, protocol.StatusRequest):
            return (b"\xc1", [])  # not msgpack
        return SILENT  # the opens stay in flight

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            held = [asyncio.create_task(c.open_fd(files["a"])) for _ in range(3)]
            await eventually(lambda: len(s.requests) == 3)
            with pytest.raises(ProtocolError):
                await c.status()
            for task in held:
                with pytest.raises(ProtocolError):
                    await task
            assert c._link is not None and c._link.closed

    with StandIn(handler) as s:
        run(main(s))


def test_a_reply_to_no_request_in_flight_is_a_protocol_error(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        return (OpenReply(req.id + 1000, (Result(),)), [os.open("/dev/null", os.O_RDONLY)])

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(ProtocolError, match="no request in flight"):
                await c.open_fd(files["a"])

    with StandIn(handler) as s:
        run(main(s))


def test_error_replies(files: dict[str, str]) -> None:
    refusals = iter([(errno.EBUSY, "too many in flight"), (errno.EPROTO, "version")])

    def handler(req: protocol.Request) -> Any:
        nxt = next(refusals, None)
        return default_handler(req) if nxt is None else ErrorReply(req.id, *nxt)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(BrokerError) as busy:
                await c.open_fd(files["a"])
            assert busy.value.errno == errno.EBUSY and "in flight" in str(busy.value)
            assert s.connections == 1  # an error reply keeps the connection
            with pytest.raises(BrokerError) as proto:
                await c.status()
            assert proto.value.errno == errno.EPROTO
            os.close(await c.open_fd(files["a"]))
            assert s.connections == 2  # but not after EPROTO: the broker closes

    with StandIn(handler) as s:
        run(main(s))


# ------------------------------------------------- timeouts and reconnects


def test_timeout_keeps_the_connection_and_drops_the_late_reply(files: dict[str, str]) -> None:
    gate = Gate(lambda r: isinstance(r, OpenRequest) and r.items[0].path == files["a"])

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name, timeout=0.2) as c:
            with pytest.raises(BrokerUnavailable) as info:
                await c.open_fd(files["a"])
            assert info.value.errno == errno.ETIMEDOUT
            assert "receive from" in str(info.value)
            link = c._link
            assert link is not None and link.in_flight == 1
            before = fd_set()
            gate.open()  # the late reply, with an fd of a, arrives now
            await eventually(lambda: link.in_flight == 0)
            await eventually(lambda: fd_set() == before)  # the reader closed it
            fd = await c.open_fd(files["b"])
            assert ino(fd) == os.stat(files["b"]).st_ino  # b's answer, not a's
            os.close(fd)
            assert c._link is link

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 1


def test_reconnect_after_the_broker_dropped_an_idle_connection(files: dict[str, str]) -> None:
    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            os.close(await c.open_fd(files["a"]))
            s.drop_connections()
            os.close(await c.open_fd(files["a"]))
            s.drop_connections()
            with await c.open(files["b"], "w") as f:  # nothing was delivered: safe
                f.write("x")

    with StandIn() as s:
        run(main(s))
        assert (s.connections, len(s.requests)) == (3, 3)


@pytest.mark.parametrize(("mode", "retried"), [("r", True), ("w", False), ("a", False)])
def test_a_request_lost_after_delivery_is_resent_only_when_safe(
    files: dict[str, str], mode: str, retried: bool
) -> None:
    def handler(req: protocol.Request) -> Any:
        return CLOSE if len(s.requests) == 2 else default_handler(req)

    async def main() -> None:
        async with AsyncClient(s.name) as c:
            os.close(await c.open_fd(files["a"]))
            if retried:
                os.close(await c.open_fd(files["b"], mode))
            else:
                with pytest.raises(BrokerUnavailable) as info:
                    await c.open_fd(files["b"], mode)
                assert info.value.errno == errno.ECONNRESET
                os.close(await c.open_fd(files["b"], mode))  # the next call reconnects

    with StandIn(handler) as s:
        run(main())
        assert (s.connections, len(s.requests)) == (2, 3)


def test_a_fresh_connection_that_dies_is_not_retried(files: dict[str, str]) -> None:
    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            with pytest.raises(BrokerUnavailable) as info:
                await c.open_fd(files["a"])
            assert info.value.errno == errno.ECONNRESET

    with StandIn(lambda r: CLOSE) as s:
        run(main(s))
        assert len(s.requests) == 1


def test_broker_restart_on_the_same_name(files: dict[str, str]) -> None:
    name = unique_name()

    async def main() -> None:
        async with AsyncClient(name) as c:
            with StandIn(name=name) as s1:
                os.close(await c.open_fd(files["a"]))
            with pytest.raises(BrokerUnavailable):
                await c.open_fd(files["a"])  # reconnects, and nothing listens
            with StandIn(name=name) as s2:
                os.close(await c.open_fd(files["a"]))
            assert (s1.connections, s2.connections) == (1, 1)

    run(main())


# ------------------------------------------------------------ concurrency


async def open_and_check(c: AsyncClient, files: dict[str, str], n: int) -> str:
    key = "abc"[n % 3]
    if n % 10 == 0:
        with pytest.raises(FileNotFoundError):
            await c.open_fd(files["missing"])
        return "missing"
    fd = await c.open_fd(files[key])
    try:
        assert ino(fd) == os.stat(files[key]).st_ino
    finally:
        os.close(fd)
    return key


def test_gather_100_opens_on_one_client_shares_one_connection(
    standin: StandIn, files: dict[str, str]
) -> None:
    async def main() -> list[str]:
        async with AsyncClient(standin.name) as c:
            return await asyncio.gather(*(open_and_check(c, files, n) for n in range(100)))

    got = run(main())
    assert got.count("missing") == 10 and len(got) == 100
    assert (standin.connections, len(standin.requests)) == (1, 100)


def test_gather_on_several_clients(standin: StandIn, files: dict[str, str]) -> None:
    async def main() -> None:
        clients = [AsyncClient(standin.name) for _ in range(5)]
        try:
            await asyncio.gather(
                *(open_and_check(c, files, n) for n in range(100) for c in clients)
            )
        finally:
            for c in clients:
                await c.close()

    run(main())
    assert (standin.connections, len(standin.requests)) == (5, 500)


def count_send_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the times a sender found the socket buffer full."""
    waits: list[int] = []
    original = Link._writable

    async def counted(self: Link, loop: asyncio.AbstractEventLoop) -> None:
        waits.append(1)
        await original(self, loop)

    monkeypatch.setattr(Link, "_writable", counted)
    return waits


def test_more_requests_than_the_send_buffer_holds(
    files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = count_send_waits(monkeypatch)
    gate = Gate(lambda r: r.id == 1)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name, timeout=30) as c:
            first = asyncio.create_task(c.status())
            rest = [asyncio.create_task(c.status()) for _ in range(3000)]
            await eventually(lambda: bool(waits))  # the buffer is full: senders wait
            gate.open()
            for fields in await asyncio.gather(first, *rest):
                assert fields["policy"] == "none"

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 1


# ------------------------------------------------------------ cancellation


def test_cancelled_while_waiting_for_the_reply(files: dict[str, str]) -> None:
    gate = Gate(lambda r: isinstance(r, OpenRequest) and r.items[0].path == files["a"])

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name) as c:
            task = asyncio.create_task(c.open_fd(files["a"]))
            await eventually(lambda: len(s.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            link = c._link
            assert link is not None and not link.closed and link.in_flight == 1
            before = fd_set()
            gate.open()
            await eventually(lambda: link.in_flight == 0)
            await eventually(lambda: fd_set() == before)  # the late fd was closed
            fd = await c.open_fd(files["b"])
            assert ino(fd) == os.stat(files["b"]).st_ino
            os.close(fd)

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 1


def test_cancelled_after_the_reply_arrived(standin: StandIn, files: dict[str, str]) -> None:
    delivered: list[list[int]] = []

    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            await c.status()
            link = c._link
            assert link is not None
            deliver = link._deliver

            def deliver_then_cancel(raw: bytes, fds: list[int]) -> None:
                deliver(raw, fds)  # the fds now wait in the call's future...
                delivered.append(fds)
                task.cancel()  # ...and the call is cancelled before it resumes

            link._deliver = deliver_then_cancel  # type: ignore[method-assign]
            task = asyncio.create_task(c.open_many([files["a"], files["b"]]))
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(delivered) == 1 and len(delivered[0]) == 2
            for fd in delivered[0]:
                with pytest.raises(OSError):
                    os.fstat(fd)  # closed by the cancelled call
            assert not link.closed and link.in_flight == 0

    run(main())


def test_cancelled_while_connecting() -> None:
    name = unique_name()
    listener, filler = _full_backlog(name)

    async def main() -> None:
        async with AsyncClient(name, timeout=None) as c:
            task = asyncio.create_task(c.open_fd("/etc/passwd"))
            await asyncio.sleep(0.05)  # polling the full backlog
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert c._link is None

    with listener, filler:
        run(main())


def test_cancelled_while_waiting_to_send(
    files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = count_send_waits(monkeypatch)
    gate = Gate(lambda r: r.id == 1)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name, timeout=None) as c:
            tasks = [asyncio.create_task(c.open_fd(files["a"])) for _ in range(3000)]
            await eventually(lambda: bool(waits))
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            link = c._link
            assert link is not None and 0 < link.in_flight < 3000
            gate.open()  # every delivered request is answered now, with an fd
            await eventually(lambda: link.in_flight == 0)
            os.close(await c.open_fd(files["b"]))

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 1


async def churn(c: AsyncClient, files: dict[str, str], seed: int, n: int) -> dict[str, int]:
    """n calls of every kind, most cancelled (or timed out) at a random moment."""
    rng = random.Random(seed)
    counts = {"done": 0, "cancelled": 0, "timed out": 0}

    async def one(i: int) -> None:
        kind = i % 4
        if kind == 0:
            fd = await c.open_fd(files["abc"[i % 3]])
            os.close(fd)
        elif kind == 1:
            unix.close_fds(await c.open_many([files["a"], files["b"], files["c"]]))
        elif kind == 2:
            with await c.open(files["a"], "rb") as f:
                assert f.read() == b"contents of a\n"
        else:
            async with asyncio.timeout(rng.uniform(0, 0.004)):
                os.close(await c.open_fd(files["b"]))

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    loop = asyncio.get_running_loop()
    for i, task in enumerate(tasks):
        if i % 5:  # every fifth call runs to its end, however slow the machine
            loop.call_later(rng.uniform(0, 0.02), task.cancel)
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if result is None:
            counts["done"] += 1
        elif isinstance(result, asyncio.CancelledError):
            counts["cancelled"] += 1
        elif isinstance(result, TimeoutError):
            counts["timed out"] += 1
        else:
            raise result
    return counts


async def churn_until_quiet(c: AsyncClient, files: dict[str, str], rounds: int) -> dict[str, int]:
    total = {"done": 0, "cancelled": 0, "timed out": 0}
    for seed in range(rounds):
        for key, value in (await churn(c, files, seed, 200)).items():
            total[key] += value
    link = c._link
    if link is not None:  # every late reply has come and its fds were closed
        await eventually(lambda: link.in_flight == 0)
    return total


def test_random_cancellations_leak_no_fd(standin: StandIn, files: dict[str, str]) -> None:
    async def main() -> dict[str, int]:
        async with AsyncClient(standin.name) as c:
            counts = await churn_until_quiet(c, files, 5)
            os.close(await c.open_fd(files["a"]))  # still usable
            return counts

    counts = run(main())
    assert counts["done"] and counts["cancelled"], counts
    assert standin.connections == 1


def test_close_fails_the_calls_in_flight(files: dict[str, str]) -> None:
    gate = Gate()

    async def main(s: StandIn) -> None:
        c = AsyncClient(s.name)
        tasks = [asyncio.create_task(c.open_fd(files["a"])) for _ in range(5)]
        await eventually(lambda: len(s.requests) == 1)
        await c.close()
        for task in tasks:
            with pytest.raises(BrokerUnavailable) as info:
                await task
            assert info.value.errno == errno.ECONNABORTED
        gate.open()
        os.close(await c.open_fd(files["a"]))  # a closed client reconnects
        await c.close()
        await c.close()

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 2


def test_close_while_calls_wait_to_send(
    files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = count_send_waits(monkeypatch)
    gate = Gate(lambda r: r.id == 1)

    async def main(s: StandIn) -> None:
        async with AsyncClient(s.name, timeout=None) as c:
            tasks = [asyncio.create_task(c.open_fd(files["a"])) for _ in range(3000)]
            await eventually(lambda: bool(waits))
            await c.close()
            gate.open()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        aborted = [r for r in results if isinstance(r, BrokerUnavailable)]
        opened = [r for r in results if isinstance(r, int)]
        assert len(aborted) + len(opened) == 3000 and aborted and opened
        assert all(r.errno == errno.ECONNABORTED for r in aborted)  # they had been sent
        unix.close_fds(opened)  # the unsent ones went out on a new connection

    with StandIn(gate) as s:
        run(main(s))
        assert s.connections == 2


# ------------------------------------------------------ loops and forks


def test_a_client_used_on_other_loops_reconnects(standin: StandIn, files: dict[str, str]) -> None:
    c = AsyncClient(standin.name)

    async def use() -> None:
        os.close(await c.open_fd(files["a"]))

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(use())
        run(use())  # the first loop is open but not running: its connection is closed
        link = c._link
        run(use())  # the second loop is closed: its connection is dropped, not reused
        assert link is not None and link.closed
    finally:
        first.close()
    run(c.close())
    assert standin.connections == 3


def test_a_dropped_client_closes_its_connection(standin: StandIn, files: dict[str, str]) -> None:
    async def main() -> None:
        c = AsyncClient(standin.name)
        os.close(await c.open_fd(files["a"]))
        link = c._link
        assert link is not None
        del c
        gc.collect()
        await eventually(lambda: link.closed)  # closed on the loop, no ResourceWarning

    run(main())


def test_open_privileged_shares_one_connection_per_loop(
    standin: StandIn, files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(protocol.SOCKET_ENV, standin.name)

    async def main() -> list[str]:
        with await open_privileged(files["a"]) as f, await open_privileged(files["b"], "rb") as g:
            return [f.read(), g.read().decode()]

    assert run(main()) == ["contents of a\n", "contents of b\n"]
    assert run(main()) == ["contents of a\n", "contents of b\n"]
    # Two loops, two shared clients; both went with their loops (no_fd_leak checks).
    assert standin.connections == 2


def test_open_privileged_timeout() -> None:
    async def main(name: str) -> None:
        with pytest.raises(BrokerUnavailable) as info:
            await open_privileged("/etc/hostname", socket=name, timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT
        await aio._shared_client(name).close()

    with StandIn(lambda r: SILENT) as s:
        run(main(s.name))


def _in_fork_child(c: AsyncClient, parent_fd: int, path: str, name: str) -> tuple[bool, str]:
    forgotten = c._link is None and not os.path.exists(f"/proc/self/fd/{parent_fd}")

    async def read() -> str:
        async with AsyncClient(name) as own:
            with await own.open(path) as f:
                return f.read()

    return forgotten, run(read())


def test_a_fork_child_never_uses_the_parents_connection(
    standin: StandIn, files: dict[str, str]
) -> None:
    async def main() -> tuple[bool, str]:
        async with AsyncClient(standin.name) as c:
            os.close(await c.open_fd(files["a"]))
            assert c._link is not None
            args = (c, c._link.sock.fileno(), files["b"], standin.name)
            # From a thread with no running loop, as a fork child needs.
            loop = asyncio.get_running_loop()
            got: tuple[bool, str] = await loop.run_in_executor(
                None, run_as, 0, 0, _in_fork_child, *args
            )
            os.close(await c.open_fd(files["c"]))  # the parent's connection still works
            return got

    assert run(main()) == (True, "contents of b\n")
    assert standin.connections == 2


def test_status_and_explain(standin: StandIn) -> None:
    async def main() -> None:
        async with AsyncClient(standin.name) as c:
            assert await c.status() == {"requests": 1, "policy": "none"}
            answer = await c.explain(1000, [1000, 27], "/etc/passwd", ["read", "write"])
            assert answer.allowed and answer.rule == "stand-in"

    run(main())
    req = standin.requests[1]
    assert isinstance(req, protocol.ExplainRequest)
    assert (req.uid, req.gids, req.path) == (1000, (1000, 27), "/etc/passwd")


# ------------------------------------------------------- a real broker


def test_real_broker_opens_errors_and_admin(start_broker: Any, tree: dict[str, str]) -> None:
    b = start_broker(tree_policy(tree))

    async def main() -> None:
        async with AsyncClient(b.name) as c:
            with await c.open(tree["a"]) as f:
                assert f.read() == "contents of a\n"
            with pytest.raises(PolicyDenied) as denied:
                await c.open_fd(tree["hidden"])
            assert denied.value.rule == "hidden stays hidden"
            with pytest.raises(FileNotFoundError):
                await c.open_fd(tree["missing"])
            with pytest.raises(PolicyDenied):
                await c.open_fd(tree["a"], "r+")
            fds = await c.open_many([tree["a"], tree["b"]])
            assert [ino(fd) for fd in fds] == [os.stat(tree[k]).st_ino for k in "ab"]
            unix.close_fds(fds)
            answer = await c.explain(NOBODY, [NOGROUP], tree["hidden"], ["read"])
            assert not answer.allowed and answer.rule == "hidden stays hidden"
            assert (await c.status())["connections"] >= 1
        async with AsyncClient(b.name, expected_uid=4242) as other:
            with pytest.raises(BrokerIdentityError):
                await other.status()

    run(main())


def test_real_broker_gather_on_one_and_several_clients(
    start_broker: Any, tree: dict[str, str]
) -> None:
    b = start_broker(tree_policy(tree))

    async def main() -> tuple[int, int]:
        async with AsyncClient(b.name) as c:
            before = (await c.status())["connections"]
            await asyncio.gather(*(open_and_check(c, tree, n) for n in range(100)))
            clients = [AsyncClient(b.name) for _ in range(4)]
            try:
                await asyncio.gather(
                    *(open_and_check(x, tree, n) for n in range(100) for x in clients)
                )
                during = (await c.status())["connections"]
            finally:
                for x in clients:
                    await x.close()
            return before, during

    before, during = run(main())
    assert during - before == 4  # one connection per client, however many calls


def test_real_broker_random_cancellations_leak_no_fd(
    start_broker: Any, tree: dict[str, str]
) -> None:
    b = start_broker(tree_policy(tree))

    async def main() -> dict[str, int]:
        async with AsyncClient(b.name) as c:
            await c.status()  # connected: the snapshot includes the socket
            link = c._link
            before = fd_set()
            counts = await churn_until_quiet(c, tree, 5)
            # With the connection still open: no received fd outlived its call.
            assert fd_set() == before and c._link is link
            os.close(await c.open_fd(tree["a"]))
            return counts

    counts = run(main())
    assert counts["done"] and counts["cancelled"], counts


def _read_as_nobody(name: str, path: str, denied: str) -> tuple[str, str]:
    async def main() -> tuple[str, str]:
        async with AsyncClient(name) as c:
            with await c.open(path) as f:
                text = f.read()
            try:
                await c.open_fd(denied)
            except PolicyDenied as exc:
                return text, exc.rule or ""
            return text, ""

    return run(main())


def test_real_broker_as_nobody(start_broker: Any, tree: dict[str, str]) -> None:
    b = start_broker(tree_policy(tree))
    got = run_as(NOBODY, NOGROUP, _read_as_nobody, b.name, tree["a"], tree["hidden"])
    assert got == ("contents of a\n", "hidden stays hidden")
