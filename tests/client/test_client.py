"""The synchronous client against a stand-in broker (tests/standin.py).

Real abstract SOCK_SEQPACKET sockets and the real protocol; only the policy is
absent. Every test checks, through the autouse `no_fd_leak` fixture, that the
process holds the same fds after the test as before it.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import pickle
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import privbroker
from privbroker import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    Client,
    PolicyDenied,
    ProtocolError,
    connection,
    open_privileged,
    protocol,
    unix,
)
from privbroker import shared as client_shared
from privbroker.protocol import MAX_BATCH, ErrorReply, OpenReply, OpenRequest, Result
from tests.support.client_cases import BAD_REPLIES, ino, with_impostor
from tests.support.privs import NOBODY, run_as
from tests.support.standin import (
    CLOSE,
    SILENT,
    StandIn,
    default_handler,
    open_items,
    unique_name,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

# ----------------------------------------------------------- results


def test_open_fd_returns_a_cloexec_fd_of_the_file(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name) as c:
        fd = c.open_fd(files["a"])
        try:
            assert ino(fd) == os.stat(files["a"]).st_ino
            assert not os.get_inheritable(fd)
            assert os.read(fd, 100) == b"contents of a\n"
        finally:
            os.close(fd)
    req = standin.requests[0]
    assert isinstance(req, OpenRequest)
    assert req.items == (protocol.OpenItem(files["a"], protocol.Access.READ, False),)


@pytest.mark.parametrize(
    ("mode", "buffering"),
    [
        ("r", -1),
        ("rt", 1),
        ("rb", -1),
        ("rb", 0),
        ("r+", -1),
        ("r+b", -1),
        ("w", -1),
        ("wb", 0),
        ("w+b", 4096),
        ("a", -1),
        ("ab", -1),
        ("a+", -1),
        ("x", -1),
        ("xb", 0),
    ],
)
def test_open_returns_what_builtin_open_returns(
    standin: StandIn, tmp_path: Path, mode: str, buffering: int
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    if "x" not in mode:
        ours.write_bytes(b"old\n")
        theirs.write_bytes(b"old\n")
    with (
        Client(standin.name) as c,
        c.open(ours, mode, buffering) as f,
        open(theirs, mode, buffering) as g,
    ):
        assert type(f) is type(g)
        assert f.mode == g.mode
        assert f.name == str(ours)
        if isinstance(f, io.TextIOWrapper):
            assert f.buffer.name == str(ours)
        if f.writable():
            f.write(b"new\n" if "b" in mode else "new\n")
    expected = {"r": b"old\n", "w": b"new\n", "a": b"old\nnew\n", "x": b"new\n"}
    kind = mode.strip("bt+")
    assert ours.read_bytes() == (b"new\n" if kind == "r" and "+" in mode else expected[kind])


def test_open_text_arguments_reach_the_wrapper(standin: StandIn, tmp_path: Path) -> None:
    p = tmp_path / "latin"
    p.write_bytes("café\r\n".encode("latin-1"))
    with Client(standin.name) as c, c.open(p, encoding="latin-1", newline="") as f:
        assert f.read() == "café\r\n"
        assert f.encoding == "latin-1"


def test_open_many_one_round_trip_in_order(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name) as c:
        fds = c.open_many([files["a"], (files["b"], "r"), (files["c"], "rb")])
        try:
            assert [ino(fd) for fd in fds] == [os.stat(files[k]).st_ino for k in "abc"]
        finally:
            unix.close_fds(fds)
        assert c.open_many([]) == []
    assert len(standin.requests) == 1


def test_open_many_is_all_or_nothing_and_raises_the_first_error(
    standin: StandIn, files: dict[str, str]
) -> None:
    with Client(standin.name) as c:
        with pytest.raises(FileNotFoundError) as info:
            c.open_many([files["a"], files["missing"], files["secret"], files["b"]])
        assert info.value.filename == files["missing"]
        with pytest.raises(PolicyDenied):
            c.open_many([files["secret"], files["missing"]])
    # no fd of a or b stays open: checked by no_fd_leak


def test_open_many_at_the_batch_limit(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name) as c:
        fds = c.open_many([files["a"]] * MAX_BATCH)
        assert len(fds) == MAX_BATCH
        unix.close_fds(fds)


# ------------------------------------------------------------ errors


def test_kernel_errors_map_to_the_os_open_exception(
    standin: StandIn, files: dict[str, str]
) -> None:
    with Client(standin.name) as c:
        with pytest.raises(FileNotFoundError) as info:
            c.open_fd(files["missing"])
        assert info.value.errno == errno.ENOENT
        assert info.value.filename == files["missing"]
        with pytest.raises(IsADirectoryError):
            c.open(files["dir"], "w")
        with pytest.raises(FileExistsError):
            c.open(files["a"], "x")
        with pytest.raises(NotADirectoryError):
            c.open_fd(files["a"] + "/below")


def test_denial_is_policy_denied_a_permission_error(
    standin: StandIn, files: dict[str, str]
) -> None:
    with Client(standin.name) as c, pytest.raises(PermissionError) as info:
        c.open(files["secret"])
    exc = info.value
    assert isinstance(exc, PolicyDenied)
    assert exc.errno == errno.EACCES
    assert exc.filename == files["secret"]
    assert exc.reason == "no rule allows this"
    assert exc.rule == "no secrets"
    assert "no secrets" in str(exc)


NEVER_CREATED = f"/tmp/{unique_name()}"
BAD_CALLS: list[tuple[str, Any]] = [
    ("relative path", lambda c: c.open_fd("etc/passwd")),
    ("dot-dot", lambda c: c.open_fd("/etc/../etc/passwd")),
    ("double slash", lambda c: c.open_fd("/etc//passwd")),
    ("trailing slash", lambda c: c.open_fd("/etc/")),
    ("NUL", lambda c: c.open_fd("/etc/pass\0wd")),
    ("bytes path", lambda c: c.open_fd(b"/etc/passwd")),
    ("surrogate", lambda c: c.open_fd("/tmp/\udcff")),
    ("too long", lambda c: c.open_fd("/" + "a" * 5000)),
    ("empty mode", lambda c: c.open_fd("/etc/passwd", "")),
    ("two kinds", lambda c: c.open_fd("/etc/passwd", "rw")),
    ("unknown letter", lambda c: c.open_fd("/etc/passwd", "rq")),
    ("binary and text", lambda c: c.open("/etc/passwd", "rbt")),
    ("binary encoding", lambda c: c.open("/etc/passwd", "rb", encoding="utf-8")),
    ("binary errors", lambda c: c.open("/etc/passwd", "rb", errors="strict")),
    ("binary newline", lambda c: c.open("/etc/passwd", "wb", newline="")),
    ("unbuffered text", lambda c: c.open("/etc/passwd", "w", buffering=0)),
    ("bad newline", lambda c: c.open("/etc/passwd", "w", newline="x")),
    ("bad encoding", lambda c: c.open(NEVER_CREATED, "w", encoding="no-such-codec")),
    ("batch too big", lambda c: c.open_many(["/etc/passwd"] * (MAX_BATCH + 1))),
    ("bad item", lambda c: c.open_many(["/etc/passwd", ("/etc/x", "z")])),
    ("bad access word", lambda c: c.explain(0, [0], "/etc/passwd", ["read", "exec"])),
    ("negative uid", lambda c: c.explain(-1, [0], "/etc/passwd", ["read"])),
    ("bad gid", lambda c: c.explain(0, [2**32], "/etc/passwd", ["read"])),
    ("explain bad path", lambda c: c.explain(0, [], "relative", ["read"])),
]


@pytest.mark.parametrize(("what", "call"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_invalid_arguments_fail_before_any_io(standin: StandIn, what: str, call: Any) -> None:
    with Client(standin.name) as c:
        with pytest.raises((ValueError, LookupError)):
            call(c)
        os.close(c.open_fd("/dev/null"))  # one valid call, to sync with the stand-in
    # The valid call made the only connection and the only request.
    assert standin.connections == 1
    assert len(standin.requests) == 1
    assert not os.path.exists(NEVER_CREATED)


def test_invalid_client_arguments() -> None:
    with pytest.raises(ValueError):
        Client("")
    with pytest.raises(ValueError):
        Client("x" * 200)
    with pytest.raises(ValueError):
        Client("ok", timeout=0)
    with pytest.raises(ValueError):
        open_privileged("/etc/passwd", timeout=-1, socket=unique_name())


def test_nothing_listening_is_broker_unavailable() -> None:
    with Client(unique_name()) as c, pytest.raises(BrokerUnavailable) as info:
        c.open_fd("/etc/passwd")
    assert isinstance(info.value, ConnectionError)
    assert info.value.errno == errno.ECONNREFUSED


def test_full_backlog_connect_is_bounded_by_the_timeout() -> None:
    name = unique_name()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as filler,
    ):
        listener.bind(unix.abstract_address(name))
        listener.listen(0)  # one pending connection fits, and nobody accepts
        filler.connect(unix.abstract_address(name))
        with Client(name, timeout=0.3) as c, pytest.raises(BrokerUnavailable) as info:
            c.open_fd("/etc/passwd")
        assert info.value.errno == errno.ETIMEDOUT


# ---------------------------------------------------- broker identity


def test_broker_of_the_wrong_uid_is_refused_before_sending() -> None:
    def body(name: str) -> None:
        with Client(name) as c, pytest.raises(BrokerIdentityError) as info:
            c.open_fd("/etc/passwd")
        assert "65534" in str(info.value)
        assert isinstance(info.value, ConnectionError)

    assert with_impostor(False, body) == b""  # the listener received nothing


def test_expected_uid_other_than_root_is_accepted() -> None:
    def body(name: str) -> None:
        with Client(name, expected_uid=NOBODY) as c, pytest.raises(FileNotFoundError):
            c.open_fd("/nowhere")

    assert with_impostor(True, body) != b""


# ----------------------------------------------------------- protocol errors


@pytest.mark.parametrize(("what", "make"), BAD_REPLIES, ids=[b[0] for b in BAD_REPLIES])
def test_bad_reply_is_protocol_error_and_poisons_the_connection(
    what: str, make: Any, files: dict[str, str]
) -> None:
    state = {"bad": True}

    def handler(req: protocol.Request) -> Any:
        if state["bad"]:
            return make(req)
        return default_handler(req)

    with StandIn(handler) as s, Client(s.name) as c:
        with pytest.raises(ProtocolError):
            c.open_many([files["a"], files["b"]])
        state["bad"] = False
        unix.close_fds(c.open_many([files["a"], files["b"]]))
        assert s.connections == 2  # the bad connection was dropped, a new one made


def test_error_reply_is_broker_error_and_keeps_the_connection(files: dict[str, str]) -> None:
    replies = iter([ErrorReply(0, errno.EBUSY, "too many requests in flight")])

    def handler(req: protocol.Request) -> Any:
        nxt = next(replies, None)
        return default_handler(req) if nxt is None else ErrorReply(req.id, nxt.errno, nxt.reason)

    with StandIn(handler) as s, Client(s.name) as c:
        with pytest.raises(BrokerError) as info:
            c.open_fd(files["a"])
        assert info.value.errno == errno.EBUSY
        assert "in flight" in str(info.value)
        os.close(c.open_fd(files["a"]))
        assert s.connections == 1


def test_eproto_error_reply_drops_the_connection(files: dict[str, str]) -> None:
    replies = iter([ErrorReply(0, errno.EPROTO, "version")])

    def handler(req: protocol.Request) -> Any:
        nxt = next(replies, None)
        return default_handler(req) if nxt is None else ErrorReply(req.id, nxt.errno, nxt.reason)

    with StandIn(handler) as s, Client(s.name) as c:
        with pytest.raises(BrokerError):
            c.open_fd(files["a"])
        os.close(c.open_fd(files["a"]))
        assert s.connections == 2


# ------------------------------------------------- timeouts and reconnects


def test_timeout_when_the_broker_never_replies(files: dict[str, str]) -> None:
    state = {"handler": lambda r: SILENT}
    with StandIn(lambda r: state["handler"](r)) as s, Client(s.name, timeout=0.3) as c:
        with pytest.raises(BrokerUnavailable) as info:
            c.open_fd(files["a"])
        assert info.value.errno == errno.ETIMEDOUT
        state["handler"] = default_handler
        os.close(c.open_fd(files["a"]))  # a fresh connection: the old one may be out of step
        assert s.connections == 2


def test_reconnect_after_the_broker_dropped_an_idle_connection(files: dict[str, str]) -> None:
    with StandIn() as s, Client(s.name) as c:
        os.close(c.open_fd(files["a"]))
        s.drop_connections()
        # Both a read and a create are resent: the send failed, nothing was delivered.
        os.close(c.open_fd(files["a"]))
        s.drop_connections()
        with c.open(files["b"], "w") as f:
            f.write("x")
        assert s.connections == 3
        assert len(s.requests) == 3


@pytest.mark.parametrize(
    ("mode", "retried"), [("r", True), ("rb", True), ("w", False), ("a", False)]
)
def test_a_request_lost_after_delivery_is_resent_only_when_safe(
    files: dict[str, str], mode: str, retried: bool
) -> None:
    calls = []

    def handler(req: protocol.Request) -> Any:
        calls.append(req)
        return CLOSE if len(calls) == 2 else default_handler(req)

    with StandIn(handler) as s, Client(s.name) as c:
        os.close(c.open_fd(files["a"]))
        if retried:
            os.close(c.open_fd(files["b"], mode))
        else:
            with pytest.raises(BrokerUnavailable):
                c.open_fd(files["b"], mode)
            os.close(c.open_fd(files["b"], mode))  # the next call reconnects
        assert s.connections == 2
        assert len(s.requests) == 3


def test_a_fresh_connection_that_dies_is_not_retried(files: dict[str, str]) -> None:
    with StandIn(lambda r: CLOSE) as s, Client(s.name) as c:
        with pytest.raises(BrokerUnavailable) as info:
            c.open_fd(files["a"])
        assert info.value.errno == errno.ECONNRESET
        assert len(s.requests) == 1


def test_broker_restart_on_the_same_name(files: dict[str, str]) -> None:
    name = unique_name()
    with Client(name) as c:
        with StandIn(name=name) as s1:
            os.close(c.open_fd(files["a"]))
        with pytest.raises(BrokerUnavailable):
            c.open_fd(files["a"])  # reconnects, and nothing listens
        with StandIn(name=name) as s2:
            os.close(c.open_fd(files["a"]))
        assert (s1.connections, s2.connections) == (1, 1)


def test_close_then_reuse_reconnects(standin: StandIn, files: dict[str, str]) -> None:
    c = Client(standin.name)
    os.close(c.open_fd(files["a"]))
    c.close()
    c.close()
    os.close(c.open_fd(files["a"]))
    c.close()
    assert standin.connections == 2


# ------------------------------------------------------------ threads


def test_threads_share_one_client(standin: StandIn, files: dict[str, str]) -> None:
    inodes = {k: os.stat(files[k]).st_ino for k in "abc"}
    errors: list[BaseException] = []

    def worker(n: int, c: Client) -> None:
        try:
            for i in range(40):
                key = "abc"[(n + i) % 3]
                fd = c.open_fd(files[key])
                try:
                    assert ino(fd) == inodes[key]
                finally:
                    os.close(fd)
                if i % 10 == 0:
                    with pytest.raises(FileNotFoundError):
                        c.open_fd(files["missing"])
        except BaseException as exc:
            errors.append(exc)

    with Client(standin.name) as c:
        threads = [threading.Thread(target=worker, args=(n, c)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert standin.connections == 1
    assert len(standin.requests) == 16 * 44


# ------------------------------------------------------- admin helpers


def test_status_and_explain(standin: StandIn) -> None:
    with Client(standin.name) as c:
        assert c.status() == {"requests": 1, "policy": "none"}
        answer = c.explain(1000, [1000, 27], "/etc/passwd", ["read", "write"])
        assert answer.allowed and answer.rule == "stand-in"
    req = standin.requests[1]
    assert isinstance(req, protocol.ExplainRequest)
    assert (req.uid, req.gids, req.path) == (1000, (1000, 27), "/etc/passwd")
    assert req.access == protocol.Access.READ | protocol.Access.WRITE


def test_admin_error_reply_is_broker_error() -> None:
    with StandIn(lambda r: ErrorReply(r.id, errno.EPERM, "root only")) as s, Client(s.name) as c:
        with pytest.raises(BrokerError) as info:
            c.status()
        assert info.value.errno == errno.EPERM
        with pytest.raises(BrokerError):
            c.explain(0, [], "/x", ["read"])
        assert s.connections == 1


def test_explain_reply_to_status_is_protocol_error() -> None:
    explain = lambda r: protocol.ExplainReply(r.id, True, None, "")  # noqa: E731
    with StandIn(explain) as s, Client(s.name) as c, pytest.raises(ProtocolError):
        c.status()


# ---------------------------------------------------- open_privileged


def _close_shared(name: str) -> None:
    client_shared._shared_client(name).close()


def test_open_privileged_uses_the_environment(
    standin: StandIn, files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(protocol.SOCKET_ENV, standin.name)
    try:
        with open_privileged(files["a"]) as f:
            assert f.read() == "contents of a\n"
        with open_privileged(files["b"], "rb") as g:
            assert g.read() == b"contents of b\n"
        assert Client().socket_name == standin.name
    finally:
        _close_shared(standin.name)
    assert standin.connections == 1


def test_default_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(protocol.SOCKET_ENV, raising=False)
    assert Client().socket_name == "privbroker"
    assert Client("other").socket_name == "other"


def test_open_privileged_socket_and_timeout_arguments(files: dict[str, str]) -> None:
    with StandIn(lambda r: SILENT) as s:
        try:
            with pytest.raises(BrokerUnavailable) as info:
                open_privileged(files["a"], socket=s.name, timeout=0.3)
            assert info.value.errno == errno.ETIMEDOUT
        finally:
            _close_shared(s.name)


def _read_in_child(path: str, name: str) -> str:
    with open_privileged(path, socket=name) as f:
        return f.read()


def test_a_fork_child_gets_its_own_connection(standin: StandIn, files: dict[str, str]) -> None:
    try:
        with open_privileged(files["a"], socket=standin.name) as f:
            assert f.read() == "contents of a\n"
        assert run_as(0, 0, _read_in_child, files["b"], standin.name) == "contents of b\n"
        with open_privileged(files["c"], socket=standin.name) as f:  # parent's still works
            assert f.read() == "contents of c\n"
    finally:
        _close_shared(standin.name)
    assert standin.connections == 2


def test_policy_denied_crosses_a_process_boundary(standin: StandIn, files: dict[str, str]) -> None:
    try:
        with pytest.raises(PolicyDenied) as info:
            run_as(0, 0, _read_in_child, files["secret"], standin.name)
    finally:
        _close_shared(standin.name)
    assert (info.value.filename, info.value.rule) == (files["secret"], "no secrets")


def test_public_names() -> None:
    for name in privbroker.__all__:
        assert hasattr(privbroker, name)
    assert issubclass(BrokerUnavailable, ConnectionError)
    assert issubclass(PolicyDenied, PermissionError)
    assert issubclass(ProtocolError, protocol.ProtocolError)


def test_fd_is_owned_by_the_file_object(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name) as c:
        f = c.open(files["a"], "rb", buffering=0)
        fd = f.fileno()
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        f.close()
        with pytest.raises(OSError):
            os.fstat(fd)


def test_open_items_helper_is_the_stand_in_policy(files: dict[str, str]) -> None:
    req = OpenRequest(1, (protocol.OpenItem(files["secret"], protocol.Access.READ),))
    reply, fds = open_items(req)
    assert reply.results[0].denied and fds == []


# ------------------------------------------------------------ edges


def test_a_dropped_client_closes_its_connection(standin: StandIn, files: dict[str, str]) -> None:
    c = Client(standin.name)
    os.close(c.open_fd(files["a"]))
    del c
    gc.collect()  # no ResourceWarning (an error here), and no_fd_leak sees the socket gone


def test_a_failed_wrap_closes_the_fd(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name) as c, pytest.raises(TypeError):
        c.open(files["a"], "r", buffering="big")  # type: ignore[arg-type]
    assert len(standin.requests) == 1  # the open happened; its fd was closed (no_fd_leak)


def test_waiting_for_another_threads_call_counts_against_the_timeout(
    standin: StandIn, files: dict[str, str]
) -> None:
    with Client(standin.name, timeout=0.2) as c:
        c._lock.acquire()  # as a call in flight on another thread would
        try:
            with pytest.raises(BrokerUnavailable) as info:
                c.open_fd(files["a"])
            assert info.value.errno == errno.ETIMEDOUT
        finally:
            c._lock.release()
        os.close(c.open_fd(files["a"]))


def test_no_timeout(standin: StandIn, files: dict[str, str]) -> None:
    with Client(standin.name, timeout=None) as c:
        os.close(c.open_fd(files["a"]))


def test_a_passed_deadline_is_a_timeout() -> None:
    ex = connection.Exchange(1e-9)
    time.sleep(0.001)
    with pytest.raises(TimeoutError):
        ex.remaining()


def test_kernel_error_reason_is_in_the_message(files: dict[str, str]) -> None:
    def handler(req: protocol.Request) -> Any:
        return OpenReply(req.id, (Result(errno.ELOOP, False, "a symlink on the path"),))

    with StandIn(handler) as s, Client(s.name) as c, pytest.raises(OSError) as info:
        c.open_fd(files["a"])
    assert info.value.errno == errno.ELOOP
    assert "a symlink on the path" in str(info.value)
    assert info.value.filename == files["a"]


def test_policy_denied_pickles() -> None:
    exc = PolicyDenied("/etc/shadow", "never", "shadow rule")
    exc.add_note("a note")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is PolicyDenied
    assert (back.filename, back.reason, back.rule, back.errno) == (
        "/etc/shadow",
        "never",
        "shadow rule",
        errno.EACCES,
    )
    assert back.__notes__ == ["a note"]
    assert str(back) == str(exc)
