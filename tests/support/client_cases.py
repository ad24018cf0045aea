"""Cases and fixtures shared by the client tests (sync, asyncio, restart).

- `no_fd_leak`, `standin`, `files`: the stand-in
  broker's tests; `tree` and `tree_policy`: a real broker's.
- `with_impostor(answer, body)`: a process running as nobody listens on a
  fresh abstract name (as a squatter would while the broker is down), and
  `body(name)` runs against it; returns what the impostor received.
- `BAD_REPLIES`: stand-in handlers that answer an open of two paths with
  something that is not a valid answer, each with real fds where fds matter.

The fixtures reach the tests through tests/conftest.py; a module opts in to
`no_fd_leak` for all its tests with `pytestmark = pytest.mark.usefixtures(...)`.
"""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import os
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from privbroker import protocol, unix
from privbroker.protocol import MAX_BATCH, ErrorReply, OpenReply, Result, StatusReply
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.standin import StandIn, unique_name


def fd_set() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def ino(fd: int) -> int:
    return os.fstat(fd).st_ino


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """The test ends with the fds it started with (sockets of dropped clients included)."""
    before = fd_set()
    yield
    gc.collect()
    assert fd_set() == before


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Files for the stand-in, which denies any path with "secret" in it."""
    made = {}
    for name in ("a", "b", "c"):
        p = tmp_path / name
        p.write_text(f"contents of {name}\n")
        made[name] = str(p)
    made["missing"] = str(tmp_path / "missing")
    made["secret"] = str(tmp_path / "secret")
    Path(made["secret"]).write_text("s")
    made["dir"] = str(tmp_path)
    return made


def _root_only(path: Path, text: str) -> str:
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, str]:
    """Root-only files for a real broker: ro/{a,b,c,hidden}, ro/missing, rw/new
    (below a tmp_path nobody may search: its errnos are the kernel's)."""
    from tests.support.searchable import searchable

    searchable(tmp_path)
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    made = {name: _root_only(tmp_path / "ro" / name, f"contents of {name}\n") for name in "abc"}
    made["hidden"] = _root_only(tmp_path / "ro" / "hidden", "no\n")
    made["missing"] = str(tmp_path / "ro" / "missing")
    made["new"] = str(tmp_path / "rw" / "new")
    made["root"] = str(tmp_path)
    return made


def tree_policy(tree: dict[str, str]) -> str:
    """root and nobody read ro/*, root writes rw/*, nobody reads ro/hidden."""
    return f"""
        version = 1
        [[allow]]
        name = "read ro"
        users = ["root", "nobody"]
        paths = ["{tree["root"]}/ro/*"]
        access = ["read"]

        [[allow]]
        name = "root writes rw"
        users = ["root"]
        paths = ["{tree["root"]}/rw/*"]
        access = ["read", "write", "create", "truncate", "append"]

        [[deny]]
        name = "hidden stays hidden"
        paths = ["{tree["hidden"]}"]
    """


def _listen_as_nobody(name: str, ready_w: int, answer: bool) -> bytes:
    """In a child as uid 65534: listen, accept one client, return what it sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(unix.abstract_address(name))
        listener.listen(4)
        os.write(ready_w, b"1")
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            data = conn.recv(protocol.MAX_REQUEST_BYTES)  # b"": closed, nothing sent
            if answer and data:
                req = protocol.decode_request(data)
                reply = OpenReply(req.id, (Result(errno.ENOENT),))
                unix.send_message(conn, protocol.encode_reply(reply))
                conn.recv(16)  # wait for the client to hang up
            return data


def with_impostor(answer: bool, body: Callable[[str], None], name: str | None = None) -> bytes:
    """Run body(name) while a nobody process listens on `name`; return what it received.

    With `answer`, the impostor answers one open request with ENOENT.
    """
    name = name or unique_name()
    ready_r, ready_w = os.pipe()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            child = pool.submit(run_as, NOBODY, NOGROUP, _listen_as_nobody, name, ready_w, answer)
            assert select.select([ready_r], [], [], 20)[0], "listener child never got ready"
            body(name)
            result: bytes = child.result(30)
            return result
    finally:
        os.close(ready_r)
        os.close(ready_w)


def null_fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


# Each answers a request to open two paths; every fd listed is sent, then closed.
BAD_REPLIES: list[tuple[str, Any]] = [
    ("not msgpack", lambda r: (b"\xc1", [])),
    ("empty array", lambda r: (msgpack.packb([]), [])),
    ("wrong version", lambda r: (msgpack.packb([2, 1, r.id, [[0, False, "", None]]]), null_fds(1))),
    ("wrong id", lambda r: (OpenReply(r.id + 1, (Result(),)), null_fds(1))),
    ("status to open", lambda r: StatusReply(r.id, {})),
    ("fewer fds", lambda r: (OpenReply(r.id, (Result(), Result())), null_fds(1))),
    ("more fds", lambda r: (OpenReply(r.id, (Result(), Result())), null_fds(3))),
    ("fds with a failure", lambda r: (OpenReply(r.id, (Result(2), Result(2))), null_fds(1))),
    ("fds on an error", lambda r: (ErrorReply(r.id, errno.EBUSY, "busy"), null_fds(2))),
    ("too few results", lambda r: (OpenReply(r.id, (Result(),)), null_fds(1))),
    ("too many results", lambda r: (OpenReply(r.id, (Result(),) * 3), null_fds(3))),
    ("oversized", lambda r: (b"\x00" * (protocol.MAX_REPLY_BYTES + 100), [])),
    ("too many fds", lambda r: (OpenReply(r.id, (Result(),) * 2), null_fds(MAX_BATCH + 2))),
]
