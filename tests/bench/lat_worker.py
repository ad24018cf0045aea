"""The Python side of the benchmark: one measurement per process, JSON out.

Run by tests/bench/run.py (under `taskset -c 0` for the pinned figures), never
by hand or by pytest. Every mode prints one JSON line: a list with one entry
per repetition, each {"n", "p50_us", "p99_us", "mean_us", "cpu_us"} (per
operation; cpu_us is this process's user+system CPU per operation).

    client NAME PATH N REPS WARM        Client(NAME).open_fd(PATH), then os.close
    aclient NAME PATH N REPS WARM       await AsyncClient(NAME).open_fd(PATH), then
                                        os.close, timed inside one running loop
    privileged NAME PATH N REPS WARM    open_privileged(PATH, "rb", buffering=0)
    plain NAME PATH N REPS WARM         the plainest Python client of the real
                                        protocol (as ../shared/bench/refclient.py
                                        is for refbroker's): msgpack + recvmsg
    osopen - PATH N REPS WARM           os.open + os.close in this process
    batch NAME LIST K N REPS WARM       Client.open_many(first K paths of LIST)
    decide POLICY PATH N REPS WARM      broker.policy.decide in this process: root
                                        reading PATH (allowed), and uid 1000
                                        reading /srv/app1/data/report.csv (denied)
    spawn HELPER PATH N REPS WARM       posix_spawn HELPER per open, fd back over
                                        a socketpair (SCM_RIGHTS)
    popen HELPER PATH N REPS WARM       the same with subprocess.Popen(pass_fds=...)
    cat - PATH N REPS WARM              subprocess.run(["cat", PATH]): reading the
                                        file through a child (`sudo cat` minus sudo)
    sudo - PATH N REPS WARM             subprocess.run(["sudo", "-n", "cat", PATH])
    bind NAME PORT N REPS WARM          Client(NAME).bind_privileged(("127.0.0.1", PORT)),
                                        then close (bench_sockets.py)
    pybind - PORT N REPS WARM           socket + bind(127.0.0.1:PORT) + listen + close
                                        in this process (as root)
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable


def _stats(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    n = len(ns)
    return {
        "n": n,
        "p50_us": ns[n // 2] / 1e3,
        "p99_us": ns[min(n - 1, int(n * 0.99))] / 1e3,
        "mean_us": sum(ns) / n / 1e3,
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(op: Callable[[], object], n: int, reps: int, warm: int) -> list[dict[str, float]]:
    for _ in range(warm):
        op()
    out = []
    clock = time.perf_counter_ns
    for _ in range(reps):
        ns: list[int] = []
        append = ns.append
        cpu0 = _cpu()
        for _ in range(n):
            t0 = clock()
            op()
            append(clock() - t0)
        stats = _stats(ns)
        stats["cpu_us"] = (_cpu() - cpu0) / n * 1e6
        out.append(stats)
    return out


def _client(name: str, path: str) -> Callable[[], None]:
    from privbroker.api import Client

    client = Client(name)

    def op() -> None:
        os.close(client.open_fd(path))

    return op


def _aclient(name: str, path: str, n: int, reps: int, warm: int) -> list[dict[str, float]]:
    """As _measure, for AsyncClient: the whole run is one coroutine on one loop,
    so each figure is the call's own cost (send, the loop's wake-up on the reply,
    the future), not the cost of starting a loop per call."""
    import asyncio

    from privbroker.aio import AsyncClient

    async def run() -> list[dict[str, float]]:
        client = AsyncClient(name)
        open_fd, close = client.open_fd, os.close
        for _ in range(warm):
            close(await open_fd(path))
        out = []
        clock = time.perf_counter_ns
        for _ in range(reps):
            ns: list[int] = []
            append = ns.append
            cpu0 = _cpu()
            for _ in range(n):
                t0 = clock()
                close(await open_fd(path))
                append(clock() - t0)
            stats = _stats(ns)
            stats["cpu_us"] = (_cpu() - cpu0) / n * 1e6
            out.append(stats)
        await client.close()
        return out

    return asyncio.run(run())


def _privileged(name: str, path: str) -> Callable[[], None]:
    from privbroker.shared import open_privileged

    def op() -> None:
        open_privileged(path, "rb", buffering=0, socket=name).close()

    return op


def _plain(name: str, path: str) -> Callable[[], None]:
    import msgpack  # type: ignore[import-untyped]

    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    c.connect("\0" + name)
    space = socket.CMSG_SPACE(array.array("i").itemsize)
    ids = iter(range(1, 1 << 62))
    packb, unpackb = msgpack.packb, msgpack.unpackb
    rights = socket.SCM_RIGHTS
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)

    def op() -> None:
        c.send(packb([1, 1, next(ids), [[path, 1, False]]]))
        data, anc, _, _ = c.recvmsg(4096, space, flags)
        for _level, kind, payload in anc:
            if kind == rights:
                for fd in array.array("i", payload):
                    os.close(fd)
        if unpackb(data)[3][0][0] != 0:
            raise SystemExit(f"open failed: {unpackb(data)}")

    return op


def _osopen(path: str) -> Callable[[], None]:
    flags = os.O_RDONLY | os.O_CLOEXEC

    def op() -> None:
        os.close(os.open(path, flags))

    return op


def _batch(name: str, listing: str, k: int) -> Callable[[], None]:
    from privbroker.api import Client

    with open(listing) as f:
        paths = f.read().split("\n")[:k]
    client = Client(name)

    def op() -> None:
        for fd in client.open_many(paths):
            os.close(fd)

    return op


def _decide(policy_path: str, allowed: str) -> dict[str, Callable[[], object]]:
    from privbroker.broker.policy.decide import FileType, Subject, decide, load_policy
    from privbroker.protocol import Access

    start = time.perf_counter()
    policy = load_policy(policy_path)
    load_s = time.perf_counter() - start
    root = Subject(0, 0, frozenset({0}))
    user = Subject(1000, 1000, frozenset({1000}))
    denied = "/srv/app1/data/report.csv"
    read = Access.READ

    def allow() -> object:
        # The opener asks twice: on the named path, then on the real one with its type.
        decide(policy, root, allowed, read, None)
        return decide(policy, root, allowed, read, FileType.FILE)

    def deny() -> object:
        return decide(policy, user, denied, read, None)

    assert allow().allowed, "the bench path must be allowed"  # type: ignore[attr-defined]
    assert not deny().allowed, "the deny probe must be denied"  # type: ignore[attr-defined]
    return {"allow": allow, "deny": deny, "load_s": lambda: load_s}


def _spawner(helper: str, path: str, use_popen: bool) -> Callable[[], None]:
    space = socket.CMSG_SPACE(array.array("i").itemsize)

    def op() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if use_popen:
                fd = theirs.fileno()
                proc = subprocess.Popen([helper, path, str(fd)], pass_fds=(fd,))
                pid = proc.pid
            else:
                pid = os.posix_spawn(
                    helper,
                    [helper, path],
                    os.environ,
                    file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)],
                )
            theirs.close()
            _data, anc, _, _ = ours.recvmsg(4, space)
            fds = [fd for _l, _k, p in anc for fd in array.array("i", p)]
            if len(fds) != 1:
                raise SystemExit("the helper sent no fd")
            os.close(fds[0])
            if use_popen:
                proc.wait()
            else:
                os.waitpid(pid, 0)
        finally:
            ours.close()
            theirs.close()

    return op


def _bind(name: str, port: int) -> Callable[[], None]:
    from privbroker.api import Client

    client = Client(name)
    address = ("127.0.0.1", port)
    if hasattr(Client, "bind_privileged"):

        def op() -> None:
            client.bind_privileged(address).close()

        return op
    # A client from before bind_privileged: the same request by hand.
    from privbroker import protocol as proto

    target = f"tcp:127.0.0.1:{port}"

    def raw() -> None:
        reply, fds = client._request(lambda i: proto.SocketRequest(i, target), 5.0)
        if reply.result.errno or len(fds) != 1:  # type: ignore[union-attr]
            raise SystemExit(f"bind failed: {reply}")
        socket.socket(fileno=fds[0]).close()

    return raw


def _pybind(port: int) -> Callable[[], None]:
    address = ("127.0.0.1", port)

    def op() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(65535)
        s.close()

    return op


def _run(argv: list[str]) -> Callable[[], None]:
    def op() -> None:
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

    return op


def main() -> None:
    mode, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
    n, reps, warm = (int(x) for x in sys.argv[-3:])
    result: list[dict[str, float]]
    if mode == "client":
        result = _measure(_client(a, b), n, reps, warm)
    elif mode == "aclient":
        result = _aclient(a, b, n, reps, warm)
    elif mode == "privileged":
        result = _measure(_privileged(a, b), n, reps, warm)
    elif mode == "plain":
        result = _measure(_plain(a, b), n, reps, warm)
    elif mode == "osopen":
        result = _measure(_osopen(b), n, reps, warm)
    elif mode == "batch":
        result = _measure(_batch(a, b, int(sys.argv[4])), n, reps, warm)
    elif mode == "decide":
        fns = _decide(a, b)
        load_s = float(fns.pop("load_s")())  # type: ignore[arg-type]
        result = []
        allow = _measure(fns["allow"], n, reps, warm)
        deny = _measure(fns["deny"], n, reps, warm)
        for x, y in zip(allow, deny, strict=True):
            result.append(
                {**x, "deny_p50_us": y["p50_us"], "deny_mean_us": y["mean_us"], "load_s": load_s}
            )
    elif mode == "spawn":
        result = _measure(_spawner(a, b, False), n, reps, warm)
    elif mode == "popen":
        result = _measure(_spawner(a, b, True), n, reps, warm)
    elif mode == "cat":
        result = _measure(_run(["cat", b]), n, reps, warm)
    elif mode == "bind":
        result = _measure(_bind(a, int(b)), n, reps, warm)
    elif mode == "pybind":
        result = _measure(_pybind(int(b)), n, reps, warm)
    elif mode == "sudo":
        result = _measure(_run(["sudo", "-n", "cat", b]), n, reps, warm)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
