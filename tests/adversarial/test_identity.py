"""Identity comes from the kernel (invariants 4 and 8).

- A socket connected by root and then used by a process that dropped to
  nobody, or passed over SCM_RIGHTS to a nobody process (or the other way
  round), is judged by the disagreement between SO_PEERCRED and
  SCM_CREDENTIALS: denied, with a reason about credentials.
- More than 256 supplementary groups are read in full.
- Groups are never taken from the client's words.
- Squatting: with the broker down, a nobody process holding the name gets no
  byte from a client (BrokerIdentityError); a broker started while the name
  is held exits non-zero saying so.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from privbroker import (
    BrokerIdentityError,
    BrokerUnavailable,
    Client,
    PolicyDenied,
    open_privileged,
    unix,
)
from privbroker import protocol as proto
from privbroker.protocol import Access
from tests.adversarial._util import (
    Raw,
    as_nobody,
    audit_records,
    broker_healthy,
    make_root_file,
    outcome,
)
from tests.conftest import unique_name
from tests.support.privs import NOBODY, NOGROUP, run_as

pytestmark = pytest.mark.adversarial

R = Access.READ
G0 = 61000  # 300 supplementary gids from here; the rule grants through the 300th
GIDS = tuple(range(G0, G0 + 300))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    p = tmp_path / "secret.txt"
    make_root_file(p, "only by policy\n")
    return p


def both_policy(secret: Path) -> str:
    """root and nobody may each read the file: only a mismatch can deny it."""
    return f"""
        version = 1
        [[allow]]
        name = "root and nobody read the secret"
        users = [0, {NOBODY}]
        paths = ["{secret}"]
        access = ["read"]
    """


def mismatch_denied(reply: proto.OpenReply, fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    (res,) = reply.results
    assert not fds, "an fd came back on a socket whose owner changed"
    assert res.errno == errno.EACCES and res.denied, res
    assert "credentials" in res.reason, res.reason


# ---------------------------------------------------- sockets that change hands


def test_socket_connected_by_root_used_after_dropping_to_nobody(start_broker, secret) -> None:
    b = start_broker(both_policy(secret))
    raw = Raw(b.name)  # connected by root: SO_PEERCRED says uid 0
    try:

        def use() -> tuple[proto.OpenReply, list[int]]:  # in a child, now nobody
            reply, fds = raw.open([(str(secret), R)])
            for fd in fds:
                os.close(fd)
            return reply, fds

        reply, fds = as_nobody(use)
        mismatch_denied(reply, fds)
        # Back in root's hands, the same connection is judged as root again.
        reply, fds = raw.open([(str(secret), R)])
        assert len(fds) == 1 and os.pread(fds[0], 100, 0) == b"only by policy\n"
        os.close(fds[0])
    finally:
        raw.close()
    broker_healthy(b)


def receive_socket_and_open(chan: socket.socket, path: str) -> tuple[object, ...]:
    """As nobody: take a connected broker socket over SCM_RIGHTS and use it."""
    _, fds, _ = unix.recv_message(chan, 16, 1)
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(10)
    unix.send_message(sock, proto.encode_request(proto.OpenRequest(5, (proto.OpenItem(path, R),))))
    data, got, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 4, creds=True)
    reply = proto.decode_reply(data)
    for fd in got:
        os.close(fd)
    # explain through it too: a root-only request on a root-connected socket
    unix.send_message(sock, proto.encode_request(proto.StatusRequest(6)))
    data, _, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 4, creds=True)
    status = proto.decode_reply(data)
    sock.close()
    return reply, got, status


def test_socket_passed_to_a_nobody_process(start_broker, secret) -> None:
    b = start_broker(both_policy(secret))
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw = Raw(b.name)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, receive_socket_and_open, child_end, str(secret))
            unix.send_message(parent_end, b"s", [raw.sock.fileno()])
            reply, got, status = job.result()
    finally:
        raw.close()
        parent_end.close()
        child_end.close()
    mismatch_denied(reply, got)
    assert isinstance(status, proto.ErrorReply) and status.errno == errno.EACCES, status
    assert "credentials" in status.reason
    broker_healthy(b)


def test_socket_passed_from_nobody_to_root(start_broker, secret) -> None:
    """The other way: nobody's connection used by root is denied too."""
    b = start_broker(both_policy(secret))
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def connect_and_pass(chan: socket.socket, name: str) -> bool:
        r = Raw(name)
        unix.send_message(chan, b"s", [r.sock.fileno()])
        r.close()
        return True

    try:
        assert as_nobody(connect_and_pass, child_end, b.name)
        _, fds, _ = unix.recv_message(parent_end, 16, 1)
        sock = socket.socket(fileno=fds[0])
        sock.settimeout(10)
        unix.send_message(
            sock, proto.encode_request(proto.OpenRequest(1, (proto.OpenItem(str(secret), R),)))
        )
        data, got, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 4, creds=True)
        sock.close()
        reply = proto.decode_reply(data)
        assert isinstance(reply, proto.OpenReply)
        mismatch_denied(reply, got)
    finally:
        parent_end.close()
        child_end.close()
    broker_healthy(b)


# -------------------------------------------------------- supplementary groups


def groups_policy(secret: Path, gid: int) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "through one supplementary group"
        groups = [{gid}]
        paths = ["{secret}"]
        access = ["read"]
    """


def read_secret(name: str, path: str) -> str:
    with open_privileged(path, socket=name) as f:
        return f.read()


def denied(name: str, path: str) -> bool:
    try:
        read_secret(name, path)
    except PolicyDenied:
        return True
    return False


@pytest.mark.parametrize("count", [300, 3000])
def test_more_than_256_groups_read_in_full(start_broker, secret, count: int) -> None:
    gids = tuple(range(G0, G0 + count))
    b = start_broker(groups_policy(secret, gids[-1]))
    got = run_as(NOBODY, NOGROUP, read_secret, b.name, str(secret), groups=gids)
    assert got == "only by policy\n"
    # and without that last group: denied (the rule really is what allowed it)
    assert run_as(NOBODY, NOGROUP, denied, b.name, str(secret), groups=gids[:-1])
    recs = audit_records(b, lambda rs: any(r["decision"] == "allow" for r in rs))
    allowed = [r for r in recs if r["decision"] == "allow"]
    assert allowed and len(allowed[0]["groups"]) >= count
    broker_healthy(b)


def claims(name: str, path: str) -> dict[str, object]:
    """As nobody with no supplementary groups: every way to claim a group."""
    out: dict[str, object] = {}
    with Raw(name) as raw:  # a groups list appended to an open request: malformed
        raw.send(msgpack.packb([1, 1, 1, [[path, 1, False]], [GIDS[-1]]]))
        out["appended"] = outcome(raw.sock)[0]
    with Raw(name) as raw:  # explain with a claimed gid: root only
        raw.send(proto.encode_request(proto.ExplainRequest(2, NOBODY, (GIDS[-1],), path, R)))
        reply, _ = raw.recv()
        out["explain"] = (type(reply).__name__, getattr(reply, "errno", None))
    with Raw(name) as raw:  # forged SCM_CREDENTIALS naming the group as our gid
        forged = struct.pack("iII", os.getpid(), NOBODY, GIDS[-1])
        data = proto.encode_request(proto.OpenRequest(3, (proto.OpenItem(path, R),)))
        try:
            raw.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, forged)])
        except PermissionError:
            out["forged"] = "kernel refused"
        else:
            reply, fds = raw.recv()
            for fd in fds:
                os.close(fd)
            out["forged"] = ("sent", reply.results[0].errno if reply else None, len(fds))
    try:
        with Client(name) as c:
            os.close(c.open_fd(path))
        out["plain"] = "opened"
    except PolicyDenied:
        out["plain"] = "denied"
    return out


def test_groups_are_never_taken_from_the_client(start_broker, secret) -> None:
    b = start_broker(groups_policy(secret, GIDS[-1]))
    got = as_nobody(claims, b.name, str(secret))
    assert got["appended"] == "closed", got
    assert got["explain"] == ("ErrorReply", errno.EPERM), got
    assert got["forged"] == "kernel refused" or (
        isinstance(got["forged"], tuple) and got["forged"][2] == 0
    ), got
    assert got["plain"] == "denied", got
    broker_healthy(b)


# ------------------------------------------------------------------- squatting


def squat(
    name: str, ready_w: int, accepts: int, kind: int = socket.SOCK_SEQPACKET, wait: float = 15.0
) -> list[bytes]:
    """As nobody: bind @name, listen, accept up to `accepts` connections, and
    return everything each sent before hanging up."""
    srv = socket.socket(socket.AF_UNIX, kind)
    srv.bind(unix.abstract_address(name))
    srv.listen(16)
    os.write(ready_w, b"r")
    got = []
    srv.settimeout(wait)
    for _ in range(accepts):
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            break
        conn.settimeout(15)
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            data += b"<no EOF>"
        got.append(data)
        conn.close()
    srv.close()
    return got


def _with_squatter(
    name: str,
    accepts: int,
    kind: int,
    fn,  # type: ignore[no-untyped-def]
    wait: float = 15.0,
):
    ready_r, ready_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(as_nobody, squat, name, ready_w, accepts, kind, wait)
            assert select.select([ready_r], [], [], 30)[0], "the squatter did not start"
            result = fn()
            return result, job.result()
    finally:
        os.close(ready_r)
        os.close(ready_w)


def test_squatter_gets_nothing_and_client_raises_identity_error(tmp_path: Path) -> None:
    name = unique_name("squat")

    def victim() -> list[str]:
        raised = []
        for call in (
            lambda: open_privileged("/etc/hostname", socket=name, timeout=5),
            lambda: Client(name, timeout=5).open_fd("/etc/shadow", "w"),
            lambda: Client(name, timeout=5).status(),
        ):
            with pytest.raises(BrokerIdentityError) as info:
                call()
            raised.append(str(info.value))
        return raised

    raised, received = _with_squatter(name, 3, socket.SOCK_SEQPACKET, victim)
    assert len(received) == 3, received
    assert received == [b"", b"", b""], f"the squatter received {received!r}"
    assert all(str(NOBODY) in r for r in raised), raised


def test_stream_squatter_gets_nothing(tmp_path: Path) -> None:
    name = unique_name("squat")

    def victim() -> str:
        with pytest.raises((BrokerUnavailable, BrokerIdentityError)) as info:
            open_privileged("/etc/hostname", socket=name, timeout=3)
        return type(info.value).__name__

    # A SEQPACKET client cannot even connect to a stream listener.
    raised, received = _with_squatter(name, 1, socket.SOCK_STREAM, victim, wait=2)
    assert raised in ("BrokerUnavailable", "BrokerIdentityError")
    assert all(r == b"" for r in received), received


def test_long_lived_client_meets_a_squatter_after_broker_exit(start_broker, secret) -> None:
    b = start_broker(both_policy(secret))
    client = Client(b.name, timeout=5)
    os.close(client.open_fd(str(secret)))
    b.stop()

    def victim() -> None:
        with pytest.raises(BrokerIdentityError):
            client.open_fd(str(secret))

    try:
        _, received = _with_squatter(b.name, 1, socket.SOCK_SEQPACKET, victim)
    finally:
        client.close()
    assert received == [b""], received


def test_broker_refuses_to_start_on_a_held_name(tmp_path: Path, secret) -> None:
    name = unique_name("held")
    policy = tmp_path / "p.toml"
    policy.write_text(both_policy(secret))

    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "privbroker.broker",
                "serve",
                "--policy",
                str(policy),
                "--socket",
                name,
                "--audit",
                "off",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    # The broker's own probe of the holder is one (empty) connection.
    done, received = _with_squatter(name, 1, socket.SOCK_SEQPACKET, start)
    assert done.returncode != 0, done
    text = done.stdout + done.stderr
    assert "already bound" in text, text
    assert "Traceback" not in text, text
    assert all(r == b"" for r in received), received
