"""Long-lived clients against a REAL broker that restarts, and threads sharing a Client.

Both clients, sync and asyncio, must survive a broker restart: the next call
finds the old connection dead, reconnects to the new broker on the same name,
checks its identity again, and goes on. A request lost with the old broker
after it was delivered is resent only when that is safe: never one that
creates or truncates, which the old broker may already have carried out.

To lose a request after delivery, for certain, the test stops the old broker
(SIGSTOP), lets the client send (the request waits in the broker's socket
queue), stops the client right after its send, kills the old broker, starts
the new one, and only then lets the client go on: so a resend, if the client
makes one, finds a broker to answer it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from privbroker import BrokerIdentityError, BrokerUnavailable, Client, PolicyDenied, unix
from privbroker.aio import AsyncClient
from tests.support.client_cases import tree_policy, with_impostor
from tests.support.privs import NOBODY, NOGROUP, run_as


def read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 100, 0).decode()
    finally:
        os.close(fd)


def audited_paths(b: Any) -> list[str]:
    """The paths a broker decided on; stops it first (the audit log is complete then)."""
    b.stop()
    return [str(r["path"]) for r in b.audit_records()]


# ------------------------------------------------- restart between calls


def test_sync_client_survives_a_broker_restart(start_broker: Any, tree: dict[str, str]) -> None:
    b1 = start_broker(tree_policy(tree))
    with Client(b1.name) as c:
        assert read_fd(c.open_fd(tree["a"])) == "contents of a\n"
        b1.stop()
        with pytest.raises(BrokerUnavailable) as info:
            c.open_fd(tree["a"])  # the old connection is dead, and nobody listens
        assert info.value.errno == errno.ECONNREFUSED
        b2 = start_broker(tree_policy(tree), name=b1.name)
        assert read_fd(c.open_fd(tree["b"])) == "contents of b\n"
        b2.stop()
        b3 = start_broker(tree_policy(tree), name=b1.name)
        # The dead connection fails at the send: nothing was delivered, so
        # even a create-and-truncate request is safely resent.
        with c.open(tree["new"], "w") as f:
            f.write("written after two restarts\n")
    assert Path(tree["new"]).read_text() == "written after two restarts\n"
    assert audited_paths(b3) == [tree["new"]]


def test_async_client_survives_a_broker_restart(start_broker: Any, tree: dict[str, str]) -> None:
    b1 = start_broker(tree_policy(tree))

    async def main() -> None:
        async with AsyncClient(b1.name) as c:
            assert read_fd(await c.open_fd(tree["a"])) == "contents of a\n"
            link = c._link
            assert link is not None
            b1.stop()
            await asyncio.sleep(0)  # the reader sees the end of the stream...
            while not link.closed:
                await asyncio.sleep(0.01)
            b2 = start_broker(tree_policy(tree), name=b1.name)
            # ...so this call connects afresh to the new broker.
            assert read_fd(await c.open_fd(tree["b"])) == "contents of b\n"
            b2.stop()
            b3 = start_broker(tree_policy(tree), name=b1.name)
            # No loop turn since the restart: the send finds the connection
            # dead, nothing was delivered, and the create is resent.
            with await c.open(tree["new"], "w") as f:
                f.write("written after two restarts\n")
            assert audited_paths(b3) == [tree["new"]]

    asyncio.run(main())
    assert Path(tree["new"]).read_text() == "written after two restarts\n"


# --------------------------------------------- identity after a restart


def test_a_reconnect_checks_the_brokers_identity_again(
    start_broker: Any, tree: dict[str, str]
) -> None:
    b1 = start_broker(tree_policy(tree))
    sync_client = Client(b1.name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncClient(b1.name) as async_client:
            os.close(sync_client.open_fd(tree["a"]))
            os.close(await async_client.open_fd(tree["a"]))
            b1.stop()

            def sync_meets_the_impostor(name: str) -> None:
                with pytest.raises(BrokerIdentityError):
                    sync_client.open_fd(tree["a"])

            def async_meets_the_impostor(name: str) -> None:
                # This runs on a thread; the client's calls run on its loop.
                future = asyncio.run_coroutine_threadsafe(async_client.open_fd(tree["a"]), loop)
                with pytest.raises(BrokerIdentityError):
                    future.result(30)

            # A squatter on the name while the broker is down (it serves one
            # connection, so one client each): refused, and it received
            # nothing from either client (it saw only EOF).
            for meet in (sync_meets_the_impostor, async_meets_the_impostor):
                received = await loop.run_in_executor(None, with_impostor, False, meet, b1.name)
                assert received == b""
            start_broker(tree_policy(tree), name=b1.name)
            assert read_fd(sync_client.open_fd(tree["b"])) == "contents of b\n"
            assert read_fd(await async_client.open_fd(tree["b"])) == "contents of b\n"

    try:
        asyncio.run(main())
    finally:
        sync_client.close()


# ------------------------------------------ a request lost after delivery


def _stop_after_the_next_send() -> None:
    """In the client's process: SIGSTOP ourselves right after the next datagram goes."""
    send = unix.send_message

    def send_then_stop(*args: Any, **kwargs: Any) -> None:
        unix.send_message = send
        send(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGSTOP)

    unix.send_message = send_then_stop


def _kind(exc: OSError) -> str:
    return "BrokerUnavailable" if isinstance(exc, BrokerUnavailable) else type(exc).__name__


def _outcome(open_fd: Callable[[], int]) -> tuple[str, int]:
    try:
        fd = open_fd()
    except OSError as exc:
        return _kind(exc), exc.errno or 0
    ino = os.fstat(fd).st_ino
    os.close(fd)
    return "opened", ino


def _sync_client(name: str, first: str, path: str, mode: str, report: int, go: int) -> Any:
    with Client(name, timeout=60) as c:
        os.close(c.open_fd(first))  # the connection is established and reused below
        os.write(report, b"%d\n" % os.getpid())
        os.read(go, 1)
        _stop_after_the_next_send()
        return _outcome(lambda: c.open_fd(path, mode))


def _async_client(name: str, first: str, path: str, mode: str, report: int, go: int) -> Any:
    async def main() -> tuple[str, int]:
        async with AsyncClient(name, timeout=60) as c:
            os.close(await c.open_fd(first))
            os.write(report, b"%d\n" % os.getpid())
            os.read(go, 1)
            _stop_after_the_next_send()
            try:
                fd = await c.open_fd(path, mode)
            except OSError as exc:
                return _kind(exc), exc.errno or 0
            return _outcome(lambda: fd)

    return asyncio.run(main())


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.005)
    raise AssertionError(f"client {pid} never stopped after its send")


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("mode", "resent"), [("r", True), ("w", False), ("a", False)])
def test_a_request_lost_after_delivery_is_resent_only_when_safe(
    start_broker: Any, tree: dict[str, str], kind: str, mode: str, resent: bool
) -> None:
    b1 = start_broker(tree_policy(tree))
    path = tree["a"] if mode == "r" else tree["new"]
    child_fn = _sync_client if kind == "sync" else _async_client
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            args = (b1.name, tree["b"], path, mode, report_w, go_r)
            child = pool.submit(run_as, 0, 0, child_fn, *args, timeout=60)
            pid = int(os.read(report_r, 32))
            os.kill(b1.proc.pid, signal.SIGSTOP)  # the old broker reads no more
            os.write(go_w, b"g")
            _wait_stopped(pid)  # the request waits, delivered, in the old broker's queue
            b1.proc.kill()
            b1.proc.wait()
            b2 = start_broker(tree_policy(tree), name=b1.name)
            os.kill(pid, signal.SIGCONT)  # the client sees its connection die
            outcome = child.result(60)
    finally:
        for fd in (report_r, report_w, go_r, go_w):
            os.close(fd)
    if resent:
        assert outcome == ("opened", os.stat(path).st_ino)
        assert audited_paths(b2) == [path]
    else:
        assert outcome == ("BrokerUnavailable", errno.ECONNRESET)
        assert audited_paths(b2) == []
        assert not os.path.exists(path)  # neither broker created it


# ------------------------------------------------------------- threads


def _threads_share_one_client(
    name: str, paths: dict[str, str], inodes: dict[str, int]
) -> tuple[int, list[str], bool]:
    """As nobody: 16 threads, 200 opens each, one Client; (opens, errors, no fd leaked)."""
    before = set(os.listdir("/proc/self/fd"))
    errors: list[str] = []
    opened = [0] * 16
    with Client(name, timeout=30) as c:

        def worker(n: int) -> None:
            try:
                for i in range(200):
                    if i % 25 == 0:
                        with pytest.raises(PolicyDenied):
                            c.open_fd(paths["hidden"])
                        continue
                    if i % 25 == 1:
                        with pytest.raises(FileNotFoundError):
                            c.open_fd(paths["missing"])
                        continue
                    key = "abc"[(n + i) % 3]
                    fd = c.open_fd(paths[key])
                    try:
                        if os.fstat(fd).st_ino != inodes[key]:
                            errors.append(f"thread {n}: fd {fd} is not {key}")
                        if os.pread(fd, 100, 0) != f"contents of {key}\n".encode():
                            errors.append(f"thread {n}: wrong contents for {key}")
                    finally:
                        os.close(fd)
                    opened[n] += 1
            except BaseException as exc:
                errors.append(f"thread {n}: {exc!r}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sum(opened), errors, set(os.listdir("/proc/self/fd")) == before


def test_threads_share_one_client(start_broker: Any, tree: dict[str, str]) -> None:
    b = start_broker(tree_policy(tree))
    inodes = {k: os.stat(tree[k]).st_ino for k in "abc"}
    with Client(b.name) as admin:
        before = admin.status()
        opened, errors, no_leak = run_as(
            NOBODY, NOGROUP, _threads_share_one_client, b.name, tree, inodes, timeout=120
        )
        after = admin.status()
    assert not errors, errors[:10]
    assert opened == 16 * 184 and no_leak
    assert after["connections"] - before["connections"] == 1  # one connection for all
    assert after["requests"] - before["requests"] == 16 * 200 + 1  # and the status call
