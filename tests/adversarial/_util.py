"""Shared tools for the adversarial suite: raw protocol clients, fd accounting,
privilege-dropped children and an attacker process that races the filesystem.

Everything here talks to a REAL broker process over its socket. Loops are
bounded by count AND by time; nothing asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import platform
import select
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privbroker import Client, unix
from privbroker import protocol as proto
from privbroker.protocol import Access, OpenItem
from tests.support.privs import NOBODY, NOGROUP, run_as

O_PATH = getattr(os, "O_PATH", 0o10000000)
AT_FDCWD = -100
RENAME_EXCHANGE = 2
_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
# What the suite exercised, printed at the end of the run (conftest.py).
TALLY: Counter[str] = Counter()


def as_nobody(
    fn: Callable[..., Any], *args: Any, groups: tuple[int, ...] = (), timeout: float = 90.0
) -> Any:
    return run_as(NOBODY, NOGROUP, fn, *args, groups=groups, timeout=timeout)


# ------------------------------------------------------------------ filesystem


def exchange(a: str, b: str) -> None:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE): swap two names atomically."""
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 number unknown here")
    rc = _libc.syscall(
        ctypes.c_long(_RENAMEAT2),
        ctypes.c_long(AT_FDCWD),
        os.fsencode(a),
        ctypes.c_long(AT_FDCWD),
        os.fsencode(b),
        ctypes.c_uint(RENAME_EXCHANGE),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def ident(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_dev, st.st_ino


def make_root_file(path: str | os.PathLike[str], text: str, mode: int = 0o600) -> tuple[int, int]:
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return ident(path)


@dataclass
class Flipper:
    pid: int
    flips: int = 0
    errors: int = 0


@contextlib.contextmanager
def flipping(
    workdir: str | os.PathLike[str],
    step: Callable[[], None],
    *,
    uid: int = NOBODY,
    gid: int = NOGROUP,
    max_seconds: float = 60.0,
) -> Iterator[Flipper]:
    """An attacker process: chdir(workdir), drop to uid/gid, call step() in a tight loop.

    It runs until the block ends (or max_seconds). step() may raise OSError
    (counted as an error, the loop goes on). On exit `flips` and `errors` are set.
    """
    r_stop, w_stop = os.pipe()
    r_res, w_res = os.pipe()
    pid = os.fork()
    if pid == 0:  # the attacker: never returns into pytest
        n = bad = 0
        try:
            os.close(w_stop)
            os.close(r_res)
            os.chdir(workdir)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.set_blocking(r_stop, False)
            end = time.monotonic() + max_seconds
            while time.monotonic() < end:
                for _ in range(32):
                    try:
                        step()
                        n += 1
                    except OSError:
                        bad += 1
                try:
                    if os.read(r_stop, 1) == b"":
                        break
                except BlockingIOError:
                    pass
            os.write(w_res, f"{n} {bad}".encode())
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(w_res, traceback.format_exc().encode()[:4000])
        finally:
            os._exit(0)
    os.close(r_stop)
    os.close(w_res)
    flipper = Flipper(pid)
    try:
        time.sleep(0.05)  # let it get going
        yield flipper
    finally:
        os.close(w_stop)
        ready, _, _ = select.select([r_res], [], [], 15)
        data = os.read(r_res, 8192).decode() if ready else ""
        os.close(r_res)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        parts = data.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            flipper.flips, flipper.errors = int(parts[0]), int(parts[1])
        else:
            raise AssertionError(f"the flipper failed: {data!r}")


# ----------------------------------------------------------------- raw client


class Raw:
    """A bare protocol connection: send anything, see exactly what comes back."""

    def __init__(self, name: str, *, timeout: float = 15.0, passcred: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if passcred:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(unix.abstract_address(name))
        except BaseException:
            self.sock.close()
            raise
        self.ids = itertools.count(1)

    @classmethod
    def adopt(cls, sock: socket.socket, *, timeout: float = 15.0) -> Raw:
        """A Raw around a socket connected elsewhere (one passed over SCM_RIGHTS)."""
        raw = cls.__new__(cls)
        raw.sock = sock
        sock.settimeout(timeout)
        raw.ids = itertools.count(1)
        return raw

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        unix.send_message(self.sock, data, fds)

    def send_open(self, items: list[tuple[str, Access]] | list[OpenItem]) -> int:
        its = tuple(i if isinstance(i, OpenItem) else OpenItem(i[0], i[1]) for i in items)
        rid = next(self.ids)
        self.send(proto.encode_request(proto.OpenRequest(rid, its)))
        return rid

    def recv(self) -> tuple[proto.Reply | None, list[int]]:
        """One reply and its fds; (None, []) when the broker closed the connection."""
        try:
            data, fds, _ = unix.recv_message(self.sock, proto.MAX_REPLY_BYTES, 253, creds=True)
        except ConnectionResetError:
            return None, []
        if not data:
            unix.close_fds(fds)
            return None, []
        try:
            return proto.decode_reply(data), fds
        except BaseException:
            unix.close_fds(fds)
            raise

    def open(
        self, items: list[tuple[str, Access]] | list[OpenItem]
    ) -> tuple[proto.OpenReply, list[int]]:
        rid = self.send_open(items)
        reply, fds = self.recv()
        if reply is None:
            raise ConnectionResetError(errno.ECONNRESET, "broker closed the connection")
        if not isinstance(reply, proto.OpenReply) or reply.id != rid:
            unix.close_fds(fds)
            raise AssertionError(f"unexpected reply {reply!r} to open request {rid}")
        if len(fds) != reply.nfds:
            unix.close_fds(fds)
            raise AssertionError(f"{len(fds)} fds for {reply.nfds} successful results")
        return reply, fds


def outcome(sock: socket.socket, timeout: float = 10.0) -> tuple[str, proto.Reply | None, int]:
    """What the broker did with what we sent: ("closed" | "reply" | "silent", reply, nfds).

    "closed" is EOF or ECONNRESET; "reply" a decodable reply (its fds are
    closed here and counted); "silent" nothing within `timeout`.
    """
    sock.settimeout(timeout)
    try:
        data, fds, _ = unix.recv_message(sock, proto.MAX_REPLY_BYTES, 253, creds=True)
    except (ConnectionResetError, BrokenPipeError):
        return "closed", None, 0
    except (TimeoutError, BlockingIOError):
        return "silent", None, 0
    unix.close_fds(fds)
    if not data:
        return "closed", None, len(fds)
    return "reply", proto.decode_reply(data), len(fds)


def raw_socket(name: str, *, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.settimeout(timeout)
    try:
        s.connect(unix.abstract_address(name))
    except BaseException:
        s.close()
        raise
    return s


# -------------------------------------------------------------- fd accounting


def fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stable_fd_count(pid: int, seconds: float = 5.0) -> int:
    """The broker's fd count once two readings 0.2 s apart agree."""
    last = fd_count(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def settle_fds(pid: int, baseline: int, seconds: float = 15.0) -> int:
    """Poll until the broker holds at most `baseline` fds; return its count then."""
    end = time.monotonic() + seconds
    n = fd_count(pid)
    while n > baseline and time.monotonic() < end:
        time.sleep(0.05)
        n = fd_count(pid)
    return n


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def wait_for(pred: Callable[[], Any], seconds: float = 10.0, interval: float = 0.05) -> Any:
    end = time.monotonic() + seconds
    while True:
        value = pred()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)


# ---------------------------------------------------- a well-behaved bystander


@dataclass
class Prober:
    """A well-behaved client (in a thread of the test process) reading one file
    through its own connection again and again; every failure is kept."""

    name: str
    path: str
    expected: bytes
    interval: float = 0.02
    timeout: float = 10.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def once(self, client: Client) -> None:
        try:
            fd = client.open_fd(self.path)
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        try:
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        if data != self.expected:
            self.failures.append(f"read {data!r}")
        else:
            self.ok += 1

    def _run(self) -> None:
        with Client(self.name, timeout=self.timeout) as client:
            while not self._stop.is_set():
                self.once(client)
                self._stop.wait(self.interval)

    def __enter__(self) -> Prober:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        # One more, after the attack: the broker still serves.
        with Client(self.name, timeout=self.timeout) as client:
            self.once(client)

    def check(self) -> None:
        assert not self.failures, f"the well-behaved client failed: {self.failures[:5]}"
        assert self.ok >= 1


def broker_healthy(b: Any) -> None:
    """The broker process is alive and logged no traceback."""
    assert b.proc.poll() is None, f"broker died ({b.proc.returncode}):\n{b.log_text()[-3000:]}"
    log = b.log_text()
    assert "Traceback" not in log, log[-4000:]


def errno_names(results: Counter[int]) -> dict[str, int]:
    return {errno.errorcode.get(k, str(k)) if k else "ok": v for k, v in results.items()}


def audit_records(
    b: Any, want: Callable[[list[dict[str, Any]]], bool] | None = None, seconds: float = 10.0
) -> list[dict[str, Any]]:
    """The broker's audit records, once written (a writer thread flushes them a
    few times a second): until `want(records)` holds, or the count stops changing."""
    end = time.monotonic() + seconds
    last = -1
    while True:
        recs = b.audit_records()
        if want is not None and want(recs):
            return recs
        if want is None and len(recs) == last:
            return recs
        if time.monotonic() >= end:
            return recs
        last = len(recs)
        time.sleep(0.5)


def probe_policy(probe: Path) -> str:
    """Root and nobody may read the probe file, and nothing else."""
    return f"""
        version = 1
        [[allow]]
        name = "everyone here reads the probe"
        users = [0, {NOBODY}]
        paths = ["{probe}"]
        access = ["read"]
    """
