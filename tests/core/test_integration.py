"""End to end: a real broker process, clients in children dropped to other uids."""

from __future__ import annotations

import contextlib
import grp
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from privbroker import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    Client,
    PolicyDenied,
    open_privileged,
    unix,
)
from privbroker import protocol as proto
from tests.conftest import unique_name
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.searchable import searchable

ADM = grp.getgrnam("adm").gr_gid


@pytest.fixture(autouse=True)
def _searchable_tmp(tmp_path: Path) -> None:
    """Clients run as nobody here and look at the kernel's errno: the way to
    tmp_path must be one nobody may search (docs/security.md, invariant 9)."""
    searchable(tmp_path)


def secret(path: Path, text: str = "top secret\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, 0, 0)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "srv"
    (root / "ro").mkdir(parents=True)
    (root / "rw").mkdir()
    (root / "grp").mkdir()
    secret(root / "ro" / "a.txt", "alpha\n")
    secret(root / "ro" / "b.txt", "bravo\n")
    secret(root / "ro" / "hidden.txt")
    secret(root / "grp" / "g.txt", "group file\n")
    secret(tmp_path / "outside.txt", "outside\n")
    return root


def policy_for(root: Path) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "nobody reads ro"
        users = ["nobody"]
        paths = ["{root}/ro/*"]
        access = ["read"]

        [[allow]]
        name = "nobody writes rw"
        users = [{NOBODY}]
        paths = ["{root}/rw/**"]
        access = ["read", "write", "create", "truncate", "append"]
        create_mode = "0640"

        [[allow]]
        name = "adm reads grp"
        groups = ["adm"]
        paths = ["{root}/grp/*"]
        access = ["read"]

        [[deny]]
        name = "hidden stays hidden"
        paths = ["{root}/ro/hidden.txt"]
    """


def as_nobody(fn, *args, groups=()):  # type: ignore[no-untyped-def]
    return run_as(NOBODY, NOGROUP, fn, *args, groups=groups)


def read_via(name: str, path: str) -> str:
    with open_privileged(path, socket=name) as f:
        return f.read()


def denial(name: str, path: str, mode: str = "r") -> tuple[str, str | None, int]:
    try:
        with Client(name) as c:
            c.open(path, mode).close()
    except PolicyDenied as exc:
        assert isinstance(exc, PermissionError)
        assert exc.filename == path
        return exc.reason, exc.rule, exc.errno
    raise AssertionError(f"{path} ({mode}) was not denied")


def test_nobody_reads_root_only_file(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    target = str(tree / "ro" / "a.txt")
    with pytest.raises(PermissionError):
        as_nobody(Path(target).read_text)
    assert as_nobody(read_via, b.name, target) == "alpha\n"


def test_write_and_create_only_where_granted(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    new = tree / "rw" / "sub"
    new.mkdir()

    def write(path: str) -> None:
        with open_privileged(path, "w", socket=b.name) as f:
            f.write("written by nobody\n")

    as_nobody(write, str(new / "n.txt"))
    st = os.stat(new / "n.txt")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOGROUP, 0o640)
    assert (new / "n.txt").read_text() == "written by nobody\n"

    reason, rule, err = as_nobody(denial, b.name, str(tree / "ro" / "a.txt"), "w")
    assert err == 13 and "write" in reason and rule == "nobody reads ro"
    assert (tree / "ro" / "a.txt").read_text() == "alpha\n"  # not truncated
    reason, rule, _ = as_nobody(denial, b.name, str(tree / "ro" / "new.txt"), "w")
    assert not (tree / "ro" / "new.txt").exists()


def test_append_mode_appends(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    log = secret(tree / "rw" / "log.txt", "one\n")

    def append() -> None:
        with open_privileged(str(log), "a", socket=b.name) as f:
            f.write("two\n")

    as_nobody(append)
    assert log.read_text() == "one\ntwo\n"


def test_deny_beats_allow_and_reason_names_rule(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    reason, rule, _ = as_nobody(denial, b.name, str(tree / "ro" / "hidden.txt"))
    assert rule == "hidden stays hidden"
    assert "hidden stays hidden" in reason


def test_supplementary_group_grants(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    target = str(tree / "grp" / "g.txt")
    assert as_nobody(read_via, b.name, target, groups=(ADM,)) == "group file\n"
    reason, rule, _ = as_nobody(denial, b.name, target)
    assert rule is None or rule != "adm reads grp" or "group" in reason
    assert "nobody reads ro" not in reason  # a rule for another path is not named


def test_root_is_denied_without_a_rule(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    with pytest.raises(PolicyDenied), Client(b.name) as c:
        c.open(str(tree / "ro" / "a.txt"))


def test_symlink_out_of_allowed_tree(start_broker, tree: Path, tmp_path: Path) -> None:
    (tree / "ro" / "link.txt").symlink_to(tmp_path / "outside.txt")
    (tree / "ro" / "inside.txt").symlink_to(tree / "ro" / "a.txt")
    policy = (
        policy_for(tree)
        + f"""
        [[allow]]
        name = "nobody follows links in ln"
        users = ["nobody"]
        paths = ["{tree}/ln/*"]
        access = ["read"]
        follow_symlinks = true
    """
    )
    (tree / "ln").mkdir()
    (tree / "ln" / "out.txt").symlink_to(tmp_path / "outside.txt")
    (tree / "ln" / "in.txt").symlink_to(tree / "ro" / "a.txt")
    b = start_broker(policy)

    def attempt(path: str) -> str:
        try:
            return read_via(b.name, path)
        except OSError as exc:
            return type(exc).__name__

    assert as_nobody(attempt, str(tree / "ro" / "link.txt")) != "outside\n"
    assert as_nobody(attempt, str(tree / "ro" / "inside.txt")) != "alpha\n"  # no follow
    assert as_nobody(attempt, str(tree / "ln" / "out.txt")) == "PolicyDenied"
    assert as_nobody(attempt, str(tree / "ln" / "in.txt")) == "alpha\n"


@pytest.mark.parametrize(
    "path",
    ["relative/x", "/a/../etc/shadow", "/a//b", "/a/./b", "/a/b/", "/a\0b", "/" + "x" * 5000],
)
def test_invalid_paths_rejected_before_io(path: str) -> None:
    with pytest.raises(ValueError):
        open_privileged(path, socket=unique_name("nobroker"))


def test_invalid_path_from_raw_client_is_an_error_reply(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    sock = raw_connect(b.name)
    req = proto.encode_request(
        proto.OpenRequest(7, (proto.OpenItem("/x/../y", proto.Access.READ),))
    )
    unix.send_message(sock, req)
    data, fds, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 4)
    reply = proto.decode_reply(data)
    assert fds == [] and isinstance(reply, proto.OpenReply)
    assert reply.results[0].errno == 22 and reply.id == 7
    sock.close()


def test_fifo_and_device_need_their_type(start_broker, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    b = start_broker(f"""
        version = 1
        [[allow]]
        name = "files only"
        users = ["nobody"]
        paths = ["{tmp_path}/fifo", "/dev/null"]
        access = ["read"]
    """)
    for path in (str(tmp_path / "fifo"), "/dev/null"):
        reason, rule, _ = as_nobody(denial, b.name, path)
        assert rule == "files only" and ("fifo" in reason or "char" in reason)


def test_no_broker_is_unavailable() -> None:
    with pytest.raises(BrokerUnavailable):
        open_privileged("/etc/hostname", socket=unique_name("absent"))


def test_broker_not_of_expected_uid(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    with pytest.raises(BrokerIdentityError), Client(b.name, expected_uid=4242) as c:
        c.open_fd(str(tree / "ro" / "a.txt"))


def test_one_connection_many_requests_and_open_many(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    paths = [str(tree / "ro" / n) for n in ("a.txt", "b.txt")]

    def work() -> tuple[list[str], list[str]]:
        with Client(b.name) as c:
            singles = []
            for _ in range(50):
                fd = c.open_fd(paths[0])
                singles.append(os.read(fd, 100).decode())
                os.close(fd)
            fds = c.open_many(paths)
            many = [os.read(fd, 100).decode() for fd in fds]
            for fd in fds:
                os.close(fd)
            return sorted(set(singles)), many

    with Client(b.name) as c:
        before = c.status()
        singles, many = as_nobody(work)
        after = c.status()
    assert singles == ["alpha\n"] and many == ["alpha\n", "bravo\n"]
    assert after["connections"] - before["connections"] == 1  # nobody used one connection
    assert after["requests"] - before["requests"] == 52  # 50 singles, 1 batch, 1 status
    assert after["allowed"] - before["allowed"] == 52  # 50 singles, 2 in the batch


def test_client_leaks_no_fd(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))

    def churn() -> tuple[int, int]:
        before = len(os.listdir("/proc/self/fd"))
        with Client(b.name) as c:
            for path in ("ro/a.txt", "ro/hidden.txt", "ro/missing.txt", "ro/a.txt"):
                with contextlib.suppress(OSError):
                    c.open(str(tree / path)).close()
            with contextlib.suppress(OSError):
                c.open_many([str(tree / "ro/a.txt"), str(tree / "ro/hidden.txt")])
        return before, len(os.listdir("/proc/self/fd"))

    before, after = as_nobody(churn)
    assert before == after


def test_kernel_errors_map_like_os_open(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    missing = str(tree / "ro" / "missing.txt")

    def attempt() -> tuple[str, str | None]:
        try:
            read_via(b.name, missing)
        except FileNotFoundError as exc:
            return type(exc).__name__, exc.filename
        return "no error", None

    assert as_nobody(attempt) == ("FileNotFoundError", missing)


def raw_connect(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(5)
    s.connect(unix.abstract_address(name))
    return s


JUNK = {
    "empty": b"",
    "reserved-byte": b"\xc1",
    "short-array": b"\x93\x01\x01",
    "text": b"garbage" * 100,
    "op-not-an-integer": b"\x94\x01\xa1x\x01\x90",
    "oversized": b"\x00" * (proto.MAX_REQUEST_BYTES + 10),
}


@pytest.mark.parametrize("junk", list(JUNK.values()), ids=list(JUNK))
def test_malformed_datagram_closes_only_its_connection(start_broker, tree: Path, junk) -> None:
    b = start_broker(policy_for(tree))
    good = Client(b.name)
    with pytest.raises(PolicyDenied):
        good.open_fd(str(tree / "ro" / "a.txt"))  # connected and answered before the junk
    bad = raw_connect(b.name)
    bad.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    bad.send(junk)
    if junk:
        assert bad.recv(100) == b""  # closed, no reply
    bad.close()
    with pytest.raises(PolicyDenied):
        good.open_fd(str(tree / "ro" / "a.txt"))  # root has no rule: a reply, not a hang
    assert as_nobody(read_via, b.name, str(tree / "ro" / "a.txt")) == "alpha\n"
    good.close()
    assert b.proc.poll() is None


def test_fds_sent_to_broker_are_refused(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    s = raw_connect(b.name)
    r, w = os.pipe()
    req = proto.encode_request(proto.OpenRequest(1, (proto.OpenItem("/x", proto.Access.READ),)))
    unix.send_message(s, req, [r, w])
    assert s.recv(100) == b""
    s.close()
    os.close(r)
    os.close(w)
    # The broker kept no fd of ours (the kernel discarded them: no room for SCM_RIGHTS).
    broker_fds = os.listdir(f"/proc/{b.proc.pid}/fd")
    targets = {os.readlink(f"/proc/{b.proc.pid}/fd/{fd}") for fd in broker_fds}
    assert not any(t.startswith("pipe:") for t in targets)


def test_passed_socket_with_other_credentials_is_denied(start_broker, tree: Path) -> None:
    b = start_broker(
        policy_for(tree)
        + f"""
        [[allow]]
        name = "root reads ro"
        users = ["root"]
        paths = ["{tree}/ro/*"]
        access = ["read"]
    """
    )
    sock = raw_connect(b.name)  # connected as root

    def use_inherited() -> tuple[int, bool, str]:
        req = proto.encode_request(
            proto.OpenRequest(1, (proto.OpenItem(str(tree / "ro" / "a.txt"), proto.Access.READ),))
        )
        unix.send_message(sock, req)
        data, fds, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 4)
        unix.close_fds(fds)
        r = proto.decode_reply(data)
        assert isinstance(r, proto.OpenReply)
        return r.results[0].errno, r.results[0].denied, r.results[0].reason

    err, denied, reason = as_nobody(use_inherited)
    assert (err, denied) == (13, True) and "credentials" in reason
    sock.close()


def test_status_and_explain_are_root_only(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))

    def status() -> str:
        try:
            with Client(b.name) as c:
                c.status()
        except BrokerError as exc:
            return f"{exc.errno}"
        return "answered"

    assert as_nobody(status) == "1"
    with Client(b.name) as c:
        fields = c.status()
        assert fields["rules"] == 4 and fields["policy"] == str(b.policy)
        rep = c.explain(NOBODY, (NOGROUP,), str(tree / "ro" / "a.txt"), ["read"])
        assert rep.allowed and rep.rule == "nobody reads ro"
        rep = c.explain(NOBODY, (NOGROUP,), str(tree / "ro" / "a.txt"), ["write"])
        assert not rep.allowed


def test_audit_records_every_decision(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    as_nobody(read_via, b.name, str(tree / "ro" / "a.txt"))
    as_nobody(denial, b.name, str(tree / "ro" / "hidden.txt"))
    b.stop()
    recs = b.audit_records()
    assert [r["decision"] for r in recs] == ["allow", "deny"]
    for r in recs:
        assert r["uid"] == NOBODY and r["gid"] == NOGROUP and isinstance(r["pid"], int)
        for key in ("time", "path", "access", "rule", "errno", "duration_us", "exe", "groups"):
            assert key in r
    assert recs[1]["rule"] == "hidden stays hidden" and recs[1]["errno"] == 13


def test_sighup_reload_and_invalid_edit_keeps_old_policy(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    target = str(tree / "grp" / "g.txt")
    assert as_nobody(denial, b.name, target)
    b.policy.write_text(b.policy.read_text().replace(f"{tree}/ro/*", f"{tree}/grp/*"))
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with Client(b.name) as c:
            if c.status()["reloads"] >= 1:
                break
        time.sleep(0.05)
    assert as_nobody(read_via, b.name, target) == "group file\n"
    b.policy.write_text("version = 1\n[[allow]]\nname = 'broken'\nusers = ['nobody']\n")
    b.proc.send_signal(signal.SIGHUP)
    while time.monotonic() < deadline:
        with Client(b.name) as c:
            if c.status()["reload_failures"] >= 1:
                break
        time.sleep(0.05)
    assert as_nobody(read_via, b.name, target) == "group file\n"
    assert b.proc.poll() is None


def test_sigterm_exits_cleanly(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    assert b.stop() == 0


def test_name_already_taken_is_a_clear_error(start_broker, tree: Path) -> None:
    b = start_broker(policy_for(tree))
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "privbroker.broker",
            "serve",
            "--policy",
            str(b.policy),
            "--socket",
            b.name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "already bound" in out.stderr


def test_peer_that_exited_before_accept_is_not_served(start_broker, tree: Path) -> None:
    """Pinned by its pidfd: a connection whose connecting process is gone when
    the broker accepts it (the socket passed on, or the pid free for reuse) is
    dropped, and what was queued on it is never served."""
    b = start_broker(policy_for(tree))
    target = str(tree / "ro" / "a.txt")
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        carrier, hand = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        pid = os.fork()
        if pid == 0:  # connect and send as nobody, hand the socket on, exit
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            s = raw_connect(b.name)
            req = proto.OpenRequest(1, (proto.OpenItem(target, proto.Access.READ),))
            unix.send_message(s, proto.encode_request(req))
            unix.send_message(hand, b"s", [s.fileno()])
            os._exit(0)
        os.waitpid(pid, 0)  # the connecting process is gone
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    # The parent (root) still holds the passed socket: the broker never answers it.
    with carrier, hand:
        _, fds, _ = unix.recv_message(carrier, 16, 1)
    with socket.socket(fileno=fds[0]) as held:
        held.settimeout(10)
        try:
            answer = held.recv(100)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""  # closed, no reply
    with Client(b.name) as c:
        assert c.status()["stale_peers"] >= 1
    assert not [r for r in b.audit_records() if r["path"] == target]
