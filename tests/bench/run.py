"""privbroker's benchmark: every figure as a ratio to a floor measured in the same run.

    python3 -m tests.bench.run            # full run, about 7 minutes
    python3 -m tests.bench.run --quick    # about 2 minutes
    python3 -m tests.bench.run --only latency,batch
    python3 -m tests.bench.run --readme   # and put the table in README.md

Run from the repository root, as root (the broker must be, and the client
checks it is). Builds the C pieces with the machine's cc into tests/bench/build/,
starts every broker itself on a unique abstract socket name and stops it
again, prints a table and writes tests/bench/results/latest.json (and
latest.txt, the table). Never part of the test run.

Method. Each figure is measured REPS times; within a repetition every variant
is measured back to back, so a ratio is taken between figures from the same
moment, and the table shows the median over repetitions with its spread
(half the range, in percent). Latency figures are measured twice: broker and
client both pinned to CPU 0 (`taskset -c 0`: the broker's own cost, no
cross-CPU wake-up) and unpinned. Every privbroker runs as users run it, its
audit to a file (in the run's tmp directory): the headline figures and the
targets; a row that says `--audit off` is a secondary one. The floors:

- floor_broker.c: privbroker's wire protocol with nothing else (no policy),
  so privbroker's own Client, the plain Python client and the C client
  (floor_client.c) can all talk to it;
- floor_client.c: a C client of the real protocol (also the load generator
  and the idle-connection holder);
- ../shared/bench/refbroker.c with refclient.c/refclient.py, for comparison;
- floor_sock.c: the same for the SOCKET request (bind_privileged): a C broker
  doing socket+bind+listen per request, and its C client (bench_sockets.py);
- for add_address + del_address (bench_netconf.py): the broker's own rtnetlink
  module called in-process as root, and netconf_direct.c, the same in C.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import itertools
import json
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tests" / "bench"
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
SHARED = ROOT.parent / "shared" / "bench"
PY = sys.executable
PIN = ["taskset", "-c", "0"]
MODES = ("pinned", "unpinned")
SECTIONS = (
    "latency",
    "throughput",
    "scale",
    "policy",
    "batch",
    "alternatives",
    "sockets",
    "netconf",
    "fairness",
)
DENY_PROBE = "/srv/app1/data/report.csv"  # asked by uid 1000: no generated rule concerns it


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of every figure
    n: int  # timed operations per latency repetition
    warm: int  # untimed operations first
    tput_secs: float  # seconds per throughput run
    tput_reps: int
    decide_n: int  # decide() calls per repetition
    spawn_n: int  # helper spawns per repetition
    clients: tuple[int, ...] = (1, 4, 16, 64)
    hold: int = 10_000
    rules: tuple[int, ...] = (10, 1_000, 10_000)
    batch: tuple[int, ...] = (1, 16, 250)


FULL = Plan(reps=7, n=4000, warm=300, tput_secs=2.0, tput_reps=3, decide_n=20_000, spawn_n=300)
QUICK = Plan(reps=3, n=1500, warm=150, tput_secs=0.7, tput_reps=2, decide_n=5_000, spawn_n=80)


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ figures


def fig(values: list[float]) -> dict[str, Any]:
    """A median over repetitions with its spread (half the range, as % of the median)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "values": []}
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / 2 / med * 100 if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread_pct": spread, "values": values}


def ratios(num: list[float], den: list[float]) -> dict[str, Any]:
    """Per-repetition ratios (each pair from the same moment), then their median."""
    return fig([a / b for a, b in zip(num, den, strict=True) if a is not None and b])


def col(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows]


# ------------------------------------------------------------------ policies


def _existing(names: tuple[str, ...], lookup: Callable[[str], object]) -> list[str]:
    out = []
    for name in names:
        try:
            lookup(name)
            out.append(name)
        except KeyError:
            pass
    return out


def make_policy(count: int, bench_dir: Path) -> str:
    """A realistic policy of `count` rules, the bench's own rule last.

    Many users (real names that exist on this machine, and numeric uids) and
    groups, many path patterns under different top-level directories (/srv,
    /var/lib, /etc, /home, /var/log, /opt, /dev, /run, /data, and /tmp, where
    the bench's files are), literals, `*` and `**`, some deny rules, some
    rules for root elsewhere. None of them can match the bench's request but
    its own rule, so a decision's cost should not grow with `count`.
    """
    users = _existing(
        ("root", "daemon", "bin", "sys", "nobody", "www-data", "backup"), pwd.getpwnam
    )
    groups = _existing(
        ("adm", "tty", "dialout", "disk", "staff", "www-data", "backup"), grp.getgrnam
    )
    shapes = [
        ("/srv/app{i}/**", ["read"], None),
        ("/var/lib/svc{i}/*.db", ["read", "write"], None),
        ("/etc/svc{i}/conf.d/*.conf", ["read"], None),
        ("/home/u{i}/.config/tool/**", ["read", "write", "create"], None),
        ("/var/log/svc{i}/**", ["read"], ["file", "dir"]),
        ("/opt/vendor{i}/etc/license.key", ["read"], None),
        ("/dev/ttyUSB{i}", ["read", "write"], ["char"]),
        ("/run/svc{i}/*.pid", ["read"], None),
        ("/data/tenant{i}/shared/**", ["read", "append", "create"], None),
        ("/tmp/cache{i}/*", ["read", "write", "create", "truncate"], None),
    ]
    out = ["version = 1", ""]
    for i in range(count - 1):
        if i % 25 == 24:
            out += [
                "[[deny]]",
                f'name = "deny {i}: secrets of app {i}"',
                f'paths = ["/srv/app{i}/secrets/**", "/etc/svc{i}/conf.d/private-*.conf"]',
                "",
            ]
            continue
        pattern, access, types = shapes[i % len(shapes)]
        k = i // len(shapes)
        if i % 9 == 0 and users:
            who = 'users = ["root"]'
        elif i % 3 == 0 and users:
            who = f'users = ["{users[k % len(users)]}", {20000 + i}]'
        elif i % 3 == 1:
            who = f"users = [{20000 + i}]"
        elif groups and k % 2:
            who = f'groups = ["{groups[k % len(groups)]}"]'
        else:
            who = f"groups = [{30000 + i}]"
        words = ", ".join(f'"{w}"' for w in access)
        rule = [
            "[[allow]]",
            f'name = "rule {i}: {pattern.split("/")[1]} {access[0]}"',
            who,
            f'paths = ["{pattern.format(i=i)}"]',
            f"access = [{words}]",
        ]
        if types:
            rule.append("types = [" + ", ".join(f'"{t}"' for t in types) + "]")
        out += [*rule, ""]
    out += [
        "[[allow]]",
        'name = "bench: root reads the bench files"',
        'users = ["root"]',
        f'paths = ["{bench_dir}/**"]',
        'access = ["read"]',
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------ processes


@dataclass
class Server:
    kind: str
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """User+system CPU seconds the server has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def nfds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def serve_args(policy: Path | None, name: str, audit: Path | str) -> list[str]:
    """`-m privbroker.broker serve` as the benchmark runs it: its policy and name,
    warnings only, and `audit`: a FILE, as users run it (the default configuration,
    the headline's), or "off" (a secondary row)."""
    return [
        "-m",
        "privbroker.broker",
        "serve",
        "--policy",
        str(policy),
        "--socket",
        name,
        "--audit",
        str(audit),
        "--log-level",
        "warning",
    ]


class Bench:
    def __init__(self, plan: Plan, tmp: Path) -> None:
        self.plan = plan
        self.tmp = tmp
        self.data = tmp / "data"
        self.small = self.data / "small.txt"
        self.listing = tmp / "batch-paths.txt"
        self.policies = tmp / "policies"
        self.logs = RESULTS / "logs"  # kept after the run, for a look at what failed
        self._ids = itertools.count(1)
        self._live: list[subprocess.Popen[bytes]] = []
        self._reported: set[str] = set()
        self.bin: dict[str, Path] = {}
        self.notes: list[str] = []

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        for d in (self.data / "batch", self.policies):
            d.mkdir(parents=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.small.write_bytes(b"privbroker bench: a small root-only file\n")
        self.small.chmod(0o600)
        paths = []
        for i in range(max(self.plan.batch)):
            p = self.data / "batch" / f"f{i:03d}"
            p.write_bytes(b"x\n")
            p.chmod(0o600)
            paths.append(str(p))
        self.listing.write_text("\n".join(paths))
        for count in self.plan.rules:
            (self.policies / f"rules-{count}.toml").write_text(make_policy(count, self.data))

    def policy(self, count: int) -> Path:
        return self.policies / f"rules-{count}.toml"

    def build(self) -> None:
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            self.notes.append("no C compiler: the C floors, load generator and helper are skipped")
            return
        BUILD.mkdir(exist_ok=True)
        sources = {
            "floor_broker": BENCH / "floor_broker.c",
            "floor_client": BENCH / "floor_client.c",
            "spawn_helper": BENCH / "spawn_helper.c",
            "floor_sock": BENCH / "floor_sock.c",
            "bind_once": BENCH / "bind_once.c",
            "netconf_direct": BENCH / "netconf_direct.c",
            "refbroker": SHARED / "refbroker.c",
            "refclient": SHARED / "refclient.c",
        }
        for name, src in sources.items():
            if not src.exists():
                self.notes.append(f"{src} not found: {name} skipped")
                continue
            out = BUILD / name
            if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
                r = subprocess.run(
                    [cc, "-O2", "-Wall", "-o", str(out), str(src)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if r.returncode:
                    raise BenchError(f"cc {src.name} failed:\n{r.stderr}")
            self.bin[name] = out
        self.cc = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]

    def has(self, *names: str) -> bool:
        return all(n in self.bin for n in names)

    # ---------------------------------------------------------- servers

    def _name(self, kind: str) -> str:
        return f"pbbench-{os.getpid()}-{kind}-{next(self._ids)}"

    def audit_file(self, name: str) -> Path:
        """Where the broker called `name` writes its audit: the run's tmp directory."""
        d = self.tmp / "audit"
        d.mkdir(exist_ok=True)
        return d / f"{name}.log"

    @contextlib.contextmanager
    def server(
        self,
        kind: str,
        pinned: bool,
        policy: Path | None = None,
        *extra: str,
        audit: bool = True,
    ) -> Iterator[Server]:
        """A broker of `kind`, stopped on exit. privbroker runs as users run it, its
        audit to a file (in the run's tmp directory); audit=False: `--audit off`."""
        name = self._name(kind)
        if kind == "privbroker":
            cmd = [
                PY,
                *serve_args(policy, name, self.audit_file(name) if audit else "off"),
                "--max-connections",
                "20000",
                "--max-connections-per-uid",
                "20000",
                "--idle-timeout",
                "600",
                *extra,
            ]
        elif kind == "floor":
            cmd = [str(self.bin["floor_broker"]), name]
        elif kind == "refbroker":
            cmd = [str(self.bin["refbroker"]), name]
        elif kind == "floor_sock":
            cmd = [str(self.bin["floor_sock"]), "broker", name]
        else:
            raise ValueError(kind)
        log = self.logs / f"{name}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                (PIN if pinned else []) + cmd,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
            )
        self._live.append(proc)
        srv = Server(kind, name, proc, log)
        try:
            self._wait_ready(srv)
            yield srv
        finally:
            self._stop(proc)

    def _wait_ready(self, srv: Server, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if srv.proc.poll() is not None:
                raise BenchError(
                    f"{srv.kind} exited with {srv.proc.returncode}:\n" + srv.log.read_text()[-2000:]
                )
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                s.connect("\0" + srv.name)
                return
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        raise BenchError(f"{srv.kind} @{srv.name} not ready after {timeout:.0f} s")

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self._live.remove(proc)

    def hold(self, srv: Server, n: int) -> tuple[subprocess.Popen[bytes], int]:
        """Open n connections to srv (one open on each) and keep them: (holder, how many)."""
        holder = subprocess.Popen(
            [str(self.bin["floor_client"]), "hold", srv.name, str(self.small), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._live.append(holder)
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 300)
        line = holder.stdout.readline().decode() if ready else ""
        if not line.startswith("ready"):
            self.release(holder)
            err = holder.stderr.read().decode()[-500:] if holder.stderr else ""
            raise BenchError(f"connection holder failed: {err}")
        return holder, int(line.split()[1])

    def release(self, holder: subprocess.Popen[bytes]) -> None:
        if holder.stdin:
            holder.stdin.close()  # EOF: the holder exits, closing its connections
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        for f in (holder.stdout, holder.stderr):
            if f:
                f.close()
        with contextlib.suppress(ValueError):
            self._live.remove(holder)

    def check_alive(self, srv: Server, when: str) -> None:
        if srv.proc.poll() is not None:
            tail = srv.log.read_text().strip().splitlines()[-1:] or ["(no log)"]
            raise BenchError(
                f"{srv.kind} exited ({srv.proc.returncode}) {when}: {tail[0]} (log: {srv.log})"
            )

    def crashed(self) -> list[str]:
        """The last line of every broker log that shows a traceback."""
        out = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text and log.name not in self._reported:
                self._reported.add(log.name)
                out.append(f"{log.name}: {text.strip().splitlines()[-1]}")
        return out

    def stop_all(self) -> None:
        for proc in list(self._live):
            self._stop(proc)

    # ---------------------------------------------------------- clients

    def _run(self, cmd: list[str], pinned: bool, timeout: float = 300) -> str:
        r = subprocess.run(
            (PIN if pinned else []) + cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode:
            raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        return r.stdout

    def py(
        self, mode: str, a: str, b: str, *extra: str, n: int, pinned: bool, warm: int | None = None
    ) -> dict[str, float]:
        """One repetition of a lat_worker measurement."""
        warm = self.plan.warm if warm is None else warm
        out = self._run(
            [PY, "-m", "tests.bench.lat_worker", mode, a, b, *extra, str(n), "1", str(warm)], pinned
        )
        return json.loads(out.strip().splitlines()[-1])[0]  # type: ignore[no-any-return]

    def c(self, *args: str, pinned: bool) -> dict[str, float]:
        out = self._run([str(self.bin["floor_client"]), *args], pinned)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def c_lat(self, srv: Server, pinned: bool) -> dict[str, float]:
        # A warm-up of its own (the C client has no warm-up argument).
        self.c("lat", srv.name, str(self.small), str(self.plan.warm), pinned=pinned)
        return self.c("lat", srv.name, str(self.small), str(self.plan.n), pinned=pinned)

    def client_lat(self, srv: Server, pinned: bool, n: int | None = None) -> dict[str, float]:
        """Client.open_fd against srv, with the server's CPU per request."""
        n = self.plan.n if n is None else n
        before = srv.cpu_s()
        r = self.py("client", srv.name, str(self.small), n=n, pinned=pinned)
        r["server_cpu_us"] = (srv.cpu_s() - before) / (n + self.plan.warm) * 1e6
        return r

    def log(self, msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ sections


def latency(b: Bench) -> dict[str, Any]:
    p = b.plan
    small = str(b.small)
    out: dict[str, Any] = {}
    for mode in MODES:
        pinned = mode == "pinned"
        rows: dict[str, list[dict[str, float]]] = {}

        def add(key: str, value: dict[str, float], _rows: dict[str, list[Any]] = rows) -> None:
            _rows.setdefault(key, []).append(value)

        with contextlib.ExitStack() as stack:
            pb = stack.enter_context(b.server("privbroker", pinned, b.policy(10)))
            pb_off = stack.enter_context(b.server("privbroker", pinned, b.policy(10), audit=False))
            fl = stack.enter_context(b.server("floor", pinned)) if b.has("floor_broker") else None
            rb = (
                stack.enter_context(b.server("refbroker", pinned))
                if b.has("refbroker", "refclient")
                else None
            )
            for rep in range(p.reps):
                b.log(f"latency {mode} {rep + 1}/{p.reps}")
                add("os_open_py", b.py("osopen", "-", small, n=p.n, pinned=pinned))
                if b.has("floor_client"):
                    add("open_c", b.c("direct", small, str(p.n), pinned=pinned))
                if fl is not None and b.has("floor_client"):
                    add("floor_c", b.c_lat(fl, pinned))
                if fl is not None:
                    add("floor_plain", b.py("plain", fl.name, small, n=p.n, pinned=pinned))
                    add("floor_client", b.client_lat(fl, pinned))
                if b.has("floor_client"):
                    before = pb.cpu_s()
                    r = b.c_lat(pb, pinned)
                    r["server_cpu_us"] = (pb.cpu_s() - before) / (p.n + p.warm) * 1e6
                    add("pb_c", r)
                add("pb_plain", b.py("plain", pb.name, small, n=p.n, pinned=pinned))
                add("pb_client", b.client_lat(pb, pinned))
                add("pb_client_noaudit", b.client_lat(pb_off, pinned))  # a secondary row
                add("pb_aclient", b.py("aclient", pb.name, small, n=p.n, pinned=pinned))
                add("pb_privileged", b.py("privileged", pb.name, small, n=p.n, pinned=pinned))
                if rb is not None:
                    for key, cmd in (
                        ("ref_c", [str(b.bin["refclient"]), str(p.n), small, rb.name]),
                        ("ref_py", [PY, str(SHARED / "refclient.py"), str(p.n), small, rb.name]),
                    ):
                        line = b._run(cmd, pinned).strip()  # "... 12.34 us/op"
                        add(key, {"mean_us": float(line.split()[-2])})
        res: dict[str, Any] = {}
        for key, reps in rows.items():
            res[key] = {k: fig(col(reps, k)) for k in reps[0]}
        base = rows.get("floor_c")
        if base:
            for key, reps in rows.items():
                if "p50_us" in reps[0]:
                    res[key]["x_floor_p50"] = ratios(col(reps, "p50_us"), col(base, "p50_us"))
                    res[key]["x_floor_p99"] = ratios(col(reps, "p99_us"), col(base, "p99_us"))
        if "floor_plain" in rows:
            # The targets' ratio: pb_client (audit to a file); the audit-off row's for comparison.
            for key in ("pb_client", "pb_client_noaudit"):
                res[key]["x_plain_floor_p50"] = ratios(
                    col(rows[key], "p50_us"), col(rows["floor_plain"], "p50_us")
                )
        # What the audit adds to a Client.open_fd round trip (p50, per repetition).
        on, off = col(rows["pb_client"], "p50_us"), col(rows["pb_client_noaudit"], "p50_us")
        res["pb_client"]["audit_cost_p50_us"] = fig([x - y for x, y in zip(on, off, strict=True)])
        out[mode] = res
    return out


def throughput(b: Bench) -> dict[str, Any]:
    p = b.plan
    if not b.has("floor_client", "floor_broker"):
        raise BenchError("needs the C load generator and floor (no C compiler)")
    out: dict[str, Any] = {}
    procs = str(os.cpu_count() or 1)  # `serve --processes`: one per core
    noaudit_at = 16  # the target's client count: its audit-off row, a secondary one
    policy = b.policy(10)
    with contextlib.ExitStack() as stack:
        pb = stack.enter_context(b.server("privbroker", False, policy))
        pbn = stack.enter_context(b.server("privbroker", False, policy, "--processes", procs))
        fl = stack.enter_context(b.server("floor", False))
        if noaudit_at in p.clients:
            pb_off = stack.enter_context(b.server("privbroker", False, policy, audit=False))
            pbn_off = stack.enter_context(
                b.server("privbroker", False, policy, "--processes", procs, audit=False)
            )

        def load(srv: Server, args: tuple[str, ...]) -> tuple[float, float]:
            """(opens/s, the broker's CPU in % of one core) under one load run."""
            c0, t0 = srv.cpu_s(), time.monotonic()
            ops = b.c("load", srv.name, *args, pinned=False)["ops_per_s"]
            return ops, (srv.cpu_s() - c0) / (time.monotonic() - t0) * 100

        for k in p.clients:
            pbv, pbnv, flv, cpu = [], [], [], []
            offv, offnv, offcpu = [], [], []
            for rep in range(p.tput_reps):
                b.log(f"throughput {k} clients {rep + 1}/{p.tput_reps}")
                args = (str(b.small), str(k), str(p.tput_secs))
                flv.append(b.c("load", fl.name, *args, pinned=False)["ops_per_s"])
                ops, pct = load(pb, args)
                pbv.append(ops)
                cpu.append(pct)
                pbnv.append(b.c("load", pbn.name, *args, pinned=False)["ops_per_s"])
                if k == noaudit_at:
                    ops, pct = load(pb_off, args)
                    offv.append(ops)
                    offcpu.append(pct)
                    offnv.append(b.c("load", pbn_off.name, *args, pinned=False)["ops_per_s"])
            out[str(k)] = {
                "privbroker": fig(pbv),
                "floor": fig(flv),
                "x_floor": ratios(pbv, flv),
                "broker_cpu_pct": fig(cpu),
                "processes": int(procs),
                "privbroker_procs": fig(pbnv),
                "x_floor_procs": ratios(pbnv, flv),
            }
            if offv:
                out[str(k)]["noaudit"] = {
                    "privbroker": fig(offv),
                    "x_floor": ratios(offv, flv),
                    "broker_cpu_pct": fig(offcpu),
                    "privbroker_procs": fig(offnv),
                    "x_floor_procs": ratios(offnv, flv),
                }
    return out


def scale(b: Bench) -> dict[str, Any]:
    p = b.plan
    if not b.has("floor_client"):
        raise BenchError("needs the C connection holder (no C compiler)")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {}
    for mode in MODES:
        pinned = mode == "pinned"
        with b.server("privbroker", pinned, b.policy(10)) as pb:
            base = []
            for rep in range(p.reps):
                b.log(f"scale {mode}: no idle connections {rep + 1}/{p.reps}")
                base.append(b.client_lat(pb, pinned))
            rss0, fds0 = pb.rss_mb(), pb.nfds()
            # How many fds does a connection cost the broker? Hold as many as
            # its fd limit allows (keeping room for the active client), up to
            # p.hold: a broker at its fd limit serves nobody.
            probe, got = b.hold(pb, 200)
            per_conn = max(1.0, (pb.nfds() - fds0) / max(got, 1))
            b.release(probe)
            want = min(p.hold, int((hard - fds0 - 64) / per_conn))
            deadline = time.monotonic() + 10
            while pb.nfds() > fds0 + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            b.log(f"scale {mode}: opening {want} idle connections")
            t0 = time.monotonic()
            holder, held_n = b.hold(pb, want)
            try:
                setup_s = time.monotonic() - t0
                time.sleep(0.5)
                b.check_alive(pb, f"while {want} connections were opened")
                rss1, fds1 = pb.rss_mb(), pb.nfds()
                if held_n < p.hold:
                    b.notes.append(
                        f"scale ({mode}): {held_n} connections held, not {p.hold}: privbroker "
                        f"holds {(fds1 - fds0) / max(held_n, 1):.1f} fds per connection (a "
                        f"socket and a pidfd) and RLIMIT_NOFILE's hard limit here is {hard} "
                        "(raising it needs CAP_SYS_RESOURCE); at its limit it serves nobody"
                    )
                held = []
                for rep in range(p.reps):
                    b.log(f"scale {mode}: {p.hold} idle connections {rep + 1}/{p.reps}")
                    held.append(b.client_lat(pb, pinned))
                rss2 = pb.rss_mb()
            finally:
                b.release(holder)
        out[mode] = {
            "held": held_n,
            "rss_mb_none": rss0,
            "rss_mb_held": max(rss1, rss2),
            "kb_per_conn": (max(rss1, rss2) - rss0) * 1024 / max(held_n, 1),
            "fds_none": fds0,
            "fds_held": fds1,
            "setup_s": setup_s,
            "p50_none": fig(col(base, "p50_us")),
            "p99_none": fig(col(base, "p99_us")),
            "p50_held": fig(col(held, "p50_us")),
            "p99_held": fig(col(held, "p99_us")),
            "x_p99": ratios(col(held, "p99_us"), col(base, "p99_us")),
            "x_p50": ratios(col(held, "p50_us"), col(base, "p50_us")),
        }
    return out


def policy_size(b: Bench) -> dict[str, Any]:
    p = b.plan
    out: dict[str, Any] = {}
    for mode in MODES:
        pinned = mode == "pinned"
        dec: dict[int, list[dict[str, float]]] = {}
        for count in p.rules:
            b.log(f"policy {mode}: decide() with {count} rules")
            out_ = b._run(
                [
                    PY,
                    "-m",
                    "tests.bench.lat_worker",
                    "decide",
                    str(b.policy(count)),
                    str(b.small),
                    str(p.decide_n),
                    str(p.reps),
                    "1000",
                ],
                pinned,
            )
            dec[count] = json.loads(out_.strip().splitlines()[-1])
        rt: dict[int, list[dict[str, float]]] = {c: [] for c in p.rules}
        with contextlib.ExitStack() as stack:
            t0 = time.monotonic()
            servers = {
                c: stack.enter_context(b.server("privbroker", pinned, b.policy(c))) for c in p.rules
            }
            b.log(f"policy {mode}: brokers up in {time.monotonic() - t0:.1f} s")
            for rep in range(p.reps):
                b.log(f"policy {mode}: round trips {rep + 1}/{p.reps}")
                for c, srv in servers.items():
                    rt[c].append(b.client_lat(srv, pinned))
            rss = {c: srv.rss_mb() for c, srv in servers.items()}
        first = p.rules[0]
        res = {}
        for c in p.rules:
            res[str(c)] = {
                "decide_allow_us": fig(col(dec[c], "p50_us")),
                "decide_deny_us": fig(col(dec[c], "deny_p50_us")),
                "load_s": dec[c][0]["load_s"],
                "x_decide": ratios(col(dec[c], "p50_us"), col(dec[first], "p50_us")),
                "rt_p50": fig(col(rt[c], "p50_us")),
                "rt_p99": fig(col(rt[c], "p99_us")),
                "x_rt_p50": ratios(col(rt[c], "p50_us"), col(rt[first], "p50_us")),
                "server_cpu_us": fig(col(rt[c], "server_cpu_us")),
                "rss_mb": rss[c],
            }
        out[mode] = res
    return out


def batch(b: Bench) -> dict[str, Any]:
    p = b.plan
    out: dict[str, Any] = {}
    for mode in MODES:
        pinned = mode == "pinned"
        single: list[dict[str, float]] = []
        priv: list[dict[str, float]] = []
        per: dict[int, list[dict[str, float]]] = {k: [] for k in p.batch}
        floor_per: list[dict[str, float]] = []
        with contextlib.ExitStack() as stack:
            pb = stack.enter_context(b.server("privbroker", pinned, b.policy(10)))
            fl = stack.enter_context(b.server("floor", pinned)) if b.has("floor_broker") else None
            for rep in range(p.reps):
                b.log(f"batch {mode} {rep + 1}/{p.reps}")
                single.append(b.client_lat(pb, pinned))
                priv.append(b.py("privileged", pb.name, str(b.small), n=p.n, pinned=pinned))
                for k in p.batch:
                    calls = max(40, p.n // k)
                    per[k].append(
                        b.py(
                            "batch",
                            pb.name,
                            str(b.listing),
                            str(k),
                            n=calls,
                            pinned=pinned,
                            warm=min(p.warm, calls),
                        )
                    )
                if fl is not None:
                    k = max(p.batch)
                    calls = max(40, p.n // k)
                    floor_per.append(
                        b.py(
                            "batch",
                            fl.name,
                            str(b.listing),
                            str(k),
                            n=calls,
                            pinned=pinned,
                            warm=min(p.warm, calls),
                        )
                    )
        s50, o50 = col(single, "p50_us"), col(priv, "p50_us")
        res: dict[str, Any] = {"single_p50": fig(s50), "privileged_p50": fig(o50)}
        for k in p.batch:
            call = col(per[k], "p50_us")
            fd = [v / k for v in call]
            res[str(k)] = {
                "call_p50": fig(call),
                "per_fd": fig(fd),
                "x_single": ratios(fd, s50),
                "x_privileged": ratios(fd, o50),
            }
        if floor_per:
            k = max(p.batch)
            res["floor_per_fd"] = fig([v / k for v in col(floor_per, "p50_us")])
        out[mode] = res
    return out


def alternatives(b: Bench) -> dict[str, Any]:
    p = b.plan
    small = str(b.small)
    sudo = shutil.which("sudo")
    if sudo is None:
        b.notes.append(
            "sudo is not installed: `sudo cat` not measured; `cat` in a "
            "subprocess (what sudo cat costs at the very least) stands in"
        )
    out: dict[str, Any] = {}
    for mode in MODES:
        pinned = mode == "pinned"
        rows: dict[str, list[dict[str, float]]] = {}
        with b.server("privbroker", pinned, b.policy(10)) as pb:
            for rep in range(p.reps):
                b.log(f"alternatives {mode} {rep + 1}/{p.reps}")
                rows.setdefault("privbroker", []).append(b.client_lat(pb, pinned))
                w = max(5, p.spawn_n // 20)
                if b.has("spawn_helper"):
                    helper = str(b.bin["spawn_helper"])
                    rows.setdefault("posix_spawn", []).append(
                        b.py("spawn", helper, small, n=p.spawn_n, pinned=pinned, warm=w)
                    )
                    rows.setdefault("popen", []).append(
                        b.py("popen", helper, small, n=p.spawn_n, pinned=pinned, warm=w)
                    )
                rows.setdefault("cat", []).append(
                    b.py("cat", "-", small, n=p.spawn_n, pinned=pinned, warm=w)
                )
                if sudo:
                    rows.setdefault("sudo_cat", []).append(
                        b.py("sudo", "-", small, n=max(20, p.spawn_n // 4), pinned=pinned, warm=w)
                    )
        base = col(rows["privbroker"], "p50_us")
        out[mode] = {
            key: {
                "p50_us": fig(col(reps, "p50_us")),
                "p99_us": fig(col(reps, "p99_us")),
                "x_privbroker": ratios(col(reps, "p50_us"), base),
            }
            for key, reps in rows.items()
        }
    return out


def sockets(b: Bench) -> dict[str, Any]:
    """bind_privileged against its C floor and authbind: bench_sockets.py."""
    from tests.bench import bench_sockets  # it imports this module's helpers

    try:
        return bench_sockets.section(b)
    except bench_sockets.SocketsUnavailable as exc:
        raise BenchError(str(exc)) from exc


def netconf(b: Bench) -> dict[str, Any]:
    """add_address + del_address against Rtnl.call in-process and `ip`: bench_netconf.py."""
    from tests.bench import bench_netconf  # it imports this module's helpers

    try:
        return bench_netconf.section(b)
    except bench_netconf.NetconfUnavailable as exc:
        raise BenchError(str(exc)) from exc


def fairness(b: Bench) -> dict[str, Any]:
    """A victim uid's latency while another floods, against the victim alone: bench_fairness.py."""
    from tests.bench import bench_fairness  # it imports this module's helpers

    return bench_fairness.section(b)


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "latency": latency,
    "throughput": throughput,
    "scale": scale,
    "policy": policy_size,
    "batch": batch,
    "alternatives": alternatives,
    "sockets": sockets,
    "netconf": netconf,
    "fairness": fairness,
}


# ------------------------------------------------------------------ targets


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def targets(res: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and PASS/MISS."""
    t: list[dict[str, Any]] = []

    def add(what: str, value: Any, limit: float, below: bool, unit: str = "x") -> None:
        v = value["median"] if isinstance(value, dict) else value
        if v is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (v <= limit if below else v >= limit) else "MISS"
        t.append(
            {
                "target": what,
                "value": v,
                "limit": limit,
                "unit": unit,
                "verdict": verdict,
                "rule": ("<=" if below else ">="),
            }
        )

    lat = res.get("latency", {})
    add(
        "pinned p50 Client.open_fd / (plain Python -> C floor)",
        _get(lat, "pinned", "pb_client", "x_plain_floor_p50"),
        2.5,
        True,
    )
    add(
        "unpinned p50 Client.open_fd / (plain Python -> C floor)",
        _get(lat, "unpinned", "pb_client", "x_plain_floor_p50"),
        1.3,
        True,
    )
    procs = _get(res, "throughput", "16", "processes")
    add(
        f"throughput at 16 clients / C floor (--processes {procs})",
        _get(res, "throughput", "16", "x_floor_procs"),
        0.5,
        False,
    )
    for mode in MODES:
        sc = _get(res, "scale", mode) or {}
        held = sc.get("held", plan.hold)
        n = f"{held}" if held == plan.hold else f"{held} (of {plan.hold}, see note)"
        add(f"{n} idle connections: broker RSS ({mode})", sc.get("rss_mb_held"), 100.0, True, "MB")
        add(
            f"{n} idle connections: active p99 / idle-free p99 ({mode})", sc.get("x_p99"), 1.5, True
        )
    big, small = str(max(plan.rules)), str(min(plan.rules))
    for mode in MODES:
        add(
            f"{big} rules: round trip p50 / {small} rules ({mode})",
            _get(res, "policy", mode, big, "x_rt_p50"),
            1.2,
            True,
        )
    k = str(max(plan.batch))
    for mode in MODES:
        # The issue's measure: per fd, against one open_privileged().
        add(
            f"open_many of {k}: per-fd / single open_privileged p50 ({mode})",
            _get(res, "batch", mode, k, "x_privileged"),
            0.2,
            True,
        )
    if "sockets" in res:
        from tests.bench import bench_sockets

        for row in bench_sockets.target_rows(res):
            add(*row)
    if "fairness" in res:
        from tests.bench import bench_fairness

        for row in bench_fairness.target_rows(res):
            add(*row)
    return t


# ------------------------------------------------------------------ table


def _v(f: Any, digits: int = 1) -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "-"
    return f"{f['median']:.{digits}f}"


def _vs(f: Any, digits: int = 1) -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "-"
    return f"{f['median']:.{digits}f} ±{f['spread_pct']:.0f}%"


def _x(f: Any) -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "-"
    m = f["median"]
    return f"{m:.2f}x" if m < 10 else f"{m:.0f}x"


def ratio_table(
    title: str, res: dict[str, Any], labels: Iterable[tuple[str, str]], whole: Collection[str] = ()
) -> list[str]:
    """A network section's table (bench_sockets.py, bench_netconf.py): a row
    per (key, label) measured, p50 and p99 and their ratios to the floor,
    pinned then unpinned; the rows in `whole` are printed without decimals."""
    L = [
        "",
        title,
        f"  {'':44}{'pinned (taskset -c 0)':>34}   {'unpinned':>30}",
        f"  {'':44}{'p50':>13}{'p99':>9}{'x p50':>8}{'x p99':>7}   "
        f"{'p50':>12}{'p99':>8}{'x p50':>7}{'x p99':>7}",
    ]
    a_all, u_all = res.get("pinned", {}), res.get("unpinned", {})
    for key, label in labels:
        a, u = a_all.get(key), u_all.get(key)
        if not a and not u:
            continue
        a, u = a or {}, u or {}
        digits = 0 if key in whole else 1
        L.append(
            f"  {label:44}"
            f"{_vs(a.get('p50_us'), digits):>13}{_v(a.get('p99_us'), digits):>9}"
            f"{_x(a.get('x_floor_p50')):>8}{_x(a.get('x_floor_p99')):>7}   "
            f"{_vs(u.get('p50_us'), digits):>12}{_v(u.get('p99_us'), digits):>8}"
            f"{_x(u.get('x_floor_p50')):>7}{_x(u.get('x_floor_p99')):>7}"
        )
    return L


def render(res: dict[str, Any], tg: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    L: list[str] = []
    w = L.append
    plan = meta["plan"]
    w(f"privbroker benchmark ({meta['run']}): {meta['machine']}")
    w(
        f"  {plan['reps']} repetitions per figure: median ±spread (half the range); "
        "ratios are medians of per-repetition ratios"
    )
    w(
        "  privbroker as users run it, audit to a file unless a row says otherwise"
        " (--audit off); targets from the audit-on rows"
    )
    w(f"  load average before/after: {meta['loadavg_before']} / {meta.get('loadavg_after')}")
    other = meta.get("others", {})
    if other:
        w(
            f"  other processes used {other['cpu_pct']:.0f}% of the machine's CPU during the run"
            f" (hypervisor steal {other['steal_pct']:.0f}%)"
            + "".join(f"; {k} {v:.0f}%" for k, v in meta.get("others_by_section", {}).items())
        )
        if other["cpu_pct"] > 10:
            w(
                "  WARNING: the machine was busy with other work, which shares the CPUs and caches:"
                " expect wide spreads, and trust ratios over absolute values"
            )
    errors = res.get("errors", {})

    lat = res.get("latency")
    if lat:
        w("")
        w(
            "1. Latency: one client, sequential open+close of a small file (us); "
            "x = ratio to C client -> C floor"
        )
        w(f"  {'':42}{'pinned (taskset -c 0)':>34}   {'unpinned':>30}")
        w(
            f"  {'':42}{'p50':>13}{'p99':>9}{'x p50':>8}{'x p99':>7}   "
            f"{'p50':>12}{'p99':>8}{'x p50':>7}{'x p99':>7}"
        )
        names = [
            ("os_open_py", "os.open+close, in-process (Python)"),
            ("open_c", "open+close, in-process (C)"),
            ("floor_c", "C floor <- C client   [the floor]"),
            ("floor_plain", "C floor <- plain Python client"),
            ("floor_client", "C floor <- privbroker Client"),
            ("pb_c", "privbroker <- C client"),
            ("pb_plain", "privbroker <- plain Python client"),
            ("pb_client", "privbroker <- Client.open_fd"),
            ("pb_client_noaudit", "privbroker <- Client.open_fd, --audit off"),
            ("pb_aclient", "privbroker <- AsyncClient.open_fd"),
            ("pb_privileged", "privbroker <- open_privileged()"),
        ]
        for key, label in names:
            a, u = lat["pinned"].get(key), lat["unpinned"].get(key)
            if not a and not u:
                continue
            a, u = a or {}, u or {}
            w(
                f"  {label:42}{_vs(a.get('p50_us')):>13}{_v(a.get('p99_us')):>9}"
                f"{_x(a.get('x_floor_p50')):>8}{_x(a.get('x_floor_p99')):>7}   "
                f"{_vs(u.get('p50_us')):>12}{_v(u.get('p99_us')):>8}"
                f"{_x(u.get('x_floor_p50')):>7}{_x(u.get('x_floor_p99')):>7}"
            )
        for key, label in (
            ("ref_c", "refbroker <- refclient.c (mean)"),
            ("ref_py", "refbroker <- refclient.py (mean)"),
        ):
            a, u = lat["pinned"].get(key), lat["unpinned"].get(key)
            if a or u:
                w(
                    f"  {label:42}{_vs((a or {}).get('mean_us')):>13}{'':24}   "
                    f"{_vs((u or {}).get('mean_us')):>12}"
                )
        w("  where the time goes (us per request, CPU):")
        for key, label in (
            ("pb_c", "privbroker CPU, C client load"),
            ("pb_client", "privbroker CPU, Client load"),
            ("pb_client_noaudit", "privbroker CPU, Client load, --audit off"),
            ("floor_client", "C floor CPU, Client load"),
        ):
            a, u = lat["pinned"].get(key, {}), lat["unpinned"].get(key, {})
            if a.get("server_cpu_us") or u.get("server_cpu_us"):
                w(
                    f"    {label:40}{_v(a.get('server_cpu_us')):>13}{'':24}   "
                    f"{_v(u.get('server_cpu_us')):>12}"
                )
        a, u = lat["pinned"].get("pb_client", {}), lat["unpinned"].get("pb_client", {})
        if a.get("audit_cost_p50_us") or u.get("audit_cost_p50_us"):
            w(
                f"    {'the audit, Client p50 (file - off)':40}"
                f"{_v(a.get('audit_cost_p50_us')):>13}{'':24}   "
                f"{_v(u.get('audit_cost_p50_us')):>12}"
            )
        for key, label in (
            ("pb_client", "Client CPU (client process)"),
            ("pb_aclient", "AsyncClient CPU (client process)"),
            ("floor_plain", "plain Python client CPU"),
        ):
            a, u = lat["pinned"].get(key, {}), lat["unpinned"].get(key, {})
            if a.get("cpu_us"):
                w(f"    {label:40}{_v(a.get('cpu_us')):>13}{'':24}   {_v(u.get('cpu_us')):>12}")
    elif "latency" in errors:
        w(f"\n1. Latency: ERROR {errors['latency']}")

    tp = res.get("throughput")
    if tp:
        w("")
        w(
            "2. Throughput: N clients, own connections, sequential opens (opens/s, unpinned); "
            "x = ratio to the C floor"
        )
        n = next(iter(tp.values())).get("processes", 1)
        w(
            f"  {'clients':>9}{'C floor':>20}{'privbroker':>20}{'x floor':>9}{'broker CPU':>12}"
            f"{f'{n} processes':>20}{'x floor':>9}"
        )
        for k, r in tp.items():
            w(
                f"  {k:>9}{_vs(r['floor'], 0):>20}{_vs(r['privbroker'], 0):>20}"
                f"{_x(r['x_floor']):>9}{_v(r['broker_cpu_pct'], 0) + '%':>12}"
                f"{_vs(r.get('privbroker_procs'), 0):>20}{_x(r.get('x_floor_procs')):>9}"
            )
            off = r.get("noaudit")
            if off:
                w(
                    f"  {k + ', --audit off':>29}{_vs(off['privbroker'], 0):>20}"
                    f"{_x(off['x_floor']):>9}{_v(off['broker_cpu_pct'], 0) + '%':>12}"
                    f"{_vs(off.get('privbroker_procs'), 0):>20}{_x(off.get('x_floor_procs')):>9}"
                )
    elif "throughput" in errors:
        w(f"\n2. Throughput: ERROR {errors['throughput']}")

    sc = res.get("scale")
    if sc:
        w("")
        w(
            f"3. Scale: {plan['hold']} idle connections held open (each made one open first); "
            "active client Client.open_fd (us)"
        )
        w(f"  {'':30}{'pinned':>22}{'unpinned':>22}")
        rows: list[tuple[str, Callable[[str], str]]] = [
            ("broker RSS, none held (MB)", lambda m: f"{sc[m]['rss_mb_none']:.1f}"),
            ("broker RSS, held (MB)", lambda m: f"{sc[m]['rss_mb_held']:.1f}"),
            ("connections held", lambda m: f"{sc[m]['held']}"),
            ("RSS per connection (KB)", lambda m: f"{sc[m]['kb_per_conn']:.1f}"),
            ("broker fds, held", lambda m: f"{sc[m]['fds_held']}"),
            ("time to open them (s)", lambda m: f"{sc[m]['setup_s']:.1f}"),
            ("active p50, none held", lambda m: _vs(sc[m]["p50_none"])),
            ("active p50, held", lambda m: _vs(sc[m]["p50_held"])),
            ("active p99, none held", lambda m: _vs(sc[m]["p99_none"])),
            ("active p99, held", lambda m: _vs(sc[m]["p99_held"])),
            ("p99 held / none", lambda m: _x(sc[m]["x_p99"])),
        ]
        for label, fn in rows:
            w(f"  {label:30}" + "".join(f"{fn(m) if m in sc else '-':>22}" for m in MODES))
    elif "scale" in errors:
        w(f"\n3. Scale: ERROR {errors['scale']}")

    po = res.get("policy")
    if po:
        w("")
        w(
            "4. Policy size: decide() in-process (us per open: the opener's two calls) and "
            "Client.open_fd round trip p50 (us); x = ratio to the smallest policy"
        )
        w(
            f"  {'rules':>7}{'load s':>8}  {'decide':>14}{'x':>7}{'deny':>8}  "
            f"{'rt pinned':>14}{'x':>7}  {'rt unpinned':>14}{'x':>7}  {'RSS MB':>7}"
        )
        for c in po.get("pinned") or po.get("unpinned"):
            a, u = po["pinned"][c], po["unpinned"][c]
            w(
                f"  {c:>7}{a['load_s']:>8.2f}  {_vs(a['decide_allow_us'], 2):>14}"
                f"{_x(a['x_decide']):>7}{_v(a['decide_deny_us'], 2):>8}  "
                f"{_vs(a['rt_p50']):>14}{_x(a['x_rt_p50']):>7}  "
                f"{_vs(u['rt_p50']):>14}{_x(u['x_rt_p50']):>7}  {a['rss_mb']:>7.1f}"
            )
    elif "policy" in errors:
        w(f"\n4. Policy size: ERROR {errors['policy']}")

    ba = res.get("batch")
    if ba:
        w("")
        w(
            "5. Batch: Client.open_many of K paths in one round trip (us); "
            "x = per-fd cost / a single Client.open_fd p50, xp = / a single open_privileged p50"
        )
        w(f"  {'':24}{'pinned':>42}{'unpinned':>42}")
        w(f"  {'':24}" + f"{'per call':>16}{'per fd':>10}{'x':>8}{'xp':>8}" * 2)
        for key, label in (("single_p50", "single open_fd"), ("privileged_p50", "open_privileged")):
            w(f"  {label:24}" + "".join(f"{_vs(ba[m].get(key)):>16}{'':>26}" for m in MODES))
        for k in plan["batch"]:
            k = str(k)
            w(
                f"  {'open_many of ' + k:24}"
                + "".join(
                    f"{_vs(ba[m][k]['call_p50']):>16}{_v(ba[m][k]['per_fd'], 2):>10}"
                    f"{_x(ba[m][k]['x_single']):>8}{_x(ba[m][k].get('x_privileged')):>8}"
                    for m in MODES
                )
            )
        if "floor_per_fd" in ba["pinned"]:
            k = str(max(plan["batch"]))
            w(
                f"  {'C floor, ' + k + ', per fd':24}"
                + "".join(f"{'':>16}{_v(ba[m].get('floor_per_fd'), 2):>10}{'':>16}" for m in MODES)
            )
    elif "batch" in errors:
        w(f"\n5. Batch: ERROR {errors['batch']}")

    al = res.get("alternatives")
    if al:
        w("")
        w(
            "6. Alternatives: one privileged open each way (p50 us); "
            "x = how many times privbroker's Client.open_fd is faster"
        )
        w(f"  {'':44}{'pinned':>22}{'unpinned':>22}")
        labels = {
            "privbroker": "privbroker Client.open_fd",
            "posix_spawn": "posix_spawn a C helper, fd via SCM_RIGHTS",
            "popen": "subprocess.Popen the same helper",
            "cat": "subprocess cat (sudo cat minus sudo)",
            "sudo_cat": "sudo -n cat",
        }
        for key, label in labels.items():
            if key not in al["pinned"]:
                continue
            w(
                f"  {label:44}"
                + "".join(
                    f"{_vs(al[m][key]['p50_us'], 0) + ' ' + _x(al[m][key]['x_privbroker']):>22}"
                    for m in MODES
                )
            )
    elif "alternatives" in errors:
        w(f"\n6. Alternatives: ERROR {errors['alternatives']}")

    if res.get("sockets"):
        from tests.bench import bench_sockets

        L.extend(bench_sockets.render(res["sockets"]))
    elif "sockets" in errors:
        w(f"\n7. Sockets: ERROR {errors['sockets']}")

    if res.get("netconf"):
        from tests.bench import bench_netconf

        L.extend(bench_netconf.render(res["netconf"]))
    elif "netconf" in errors:
        w(f"\n8. Netconf: ERROR {errors['netconf']}")

    if res.get("fairness"):
        from tests.bench import bench_fairness

        L.extend(bench_fairness.render(res["fairness"]))
    elif "fairness" in errors:
        w(f"\n9. Fairness: ERROR {errors['fairness']}")

    if tg:
        w("")
        w("Targets (issue 5; sockets: issue 11; fairness: issue 14), from the audit-on rows")
        for x in tg:
            v = (
                "-"
                if x["value"] is None
                else (f"{x['value']:.1f} MB" if x["unit"] == "MB" else f"{x['value']:.2f}x")
            )
            lim = f"{x['limit']:g} MB" if x["unit"] == "MB" else f"{x['limit']:g}x"
            w(f"  {x['verdict']:5} {x['target']:66} {v:>10}  ({x['rule']} {lim})")
    for note in meta.get("notes", []):
        w(f"note: {note}")
    for sec, err in errors.items():
        w(f"error in {sec}: {err.splitlines()[0] if err else err}")
    return "\n".join(L)


# ------------------------------------------------------------------ main


class Others:
    """CPU used by processes that are not this run's, from /proc/stat minus our own."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, ours, v[7] / hz

    def since(
        self, start: tuple[float, float, float, float] | None = None, live: float = 0.0
    ) -> dict[str, float]:
        """Others' share of all CPUs since `start`; `live`: CPU of children not yet reaped."""
        t0, busy0, ours0, steal0 = start or self.start
        t1, busy1, ours1, steal1 = self._now()
        cap = (t1 - t0) * (os.cpu_count() or 1) or 1.0
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0) - live)
        return {"cpu_pct": others / cap * 100, "steal_pct": (steal1 - steal0) / cap * 100}


def _src_digest() -> str:
    """A digest of the code under test, to notice an edit landing mid-run."""
    import hashlib

    h = hashlib.sha1()
    for d in ("broker", "client"):
        for f in sorted((ROOT / d).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _git_rev() -> str:
    r = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return r.stdout.strip() or "unknown"


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m tests.bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, about 2 minutes")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections (default all: {','.join(SECTIONS)})",
    )
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON results file")
    ap.add_argument(
        "--readme",
        action="store_true",
        help="also put the table in README.md, between its bench-table markers",
    )
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in RUNNERS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        print(
            "privbroker bench: run as root (the broker opens as root, and the client "
            "checks the broker is root)",
            file=sys.stderr,
        )
        return 2
    if shutil.which("taskset") is None:
        print(
            "privbroker bench: taskset (util-linux) is needed for the pinned figures",
            file=sys.stderr,
        )
        return 2
    plan = QUICK if args.quick else FULL
    # The idle-connection broker needs a socket and a pidfd per connection,
    # the holder a socket per connection; children inherit this.
    _raise_nofile(4 * plan.hold + 1024)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "run": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": _git_rev(),
        "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "plan": asdict(plan),
        "sections": only,
    }
    results: dict[str, Any] = {"errors": {}}
    others = Others()
    meta["source"] = digest = _src_digest()
    changed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="privbroker-bench-") as tmp:
        b = Bench(plan, Path(tmp))

        def on_term(*_: object) -> None:
            b.stop_all()
            raise SystemExit(130)

        signal.signal(signal.SIGTERM, on_term)
        try:
            b.setup()
            b.build()
            meta["cc"] = getattr(b, "cc", None)
            for section in only:
                t0 = time.monotonic()
                mark = others._now()
                try:
                    results[section] = RUNNERS[section](b)
                except (BenchError, subprocess.SubprocessError, OSError, KeyError) as exc:
                    crashes = b.crashed()
                    why = f"{type(exc).__name__}: {exc}"
                    if crashes:
                        why = "a broker crashed: " + "; ".join(crashes) + "\n" + why
                    results["errors"][section] = why
                    print(f"  !! {section}: {why}", file=sys.stderr)
                meta.setdefault("section_s", {})[section] = round(time.monotonic() - t0, 1)
                # Every broker of a section is stopped (and reaped) by its end.
                meta.setdefault("others_by_section", {})[section] = others.since(mark)["cpu_pct"]
                if _src_digest() != digest:
                    changed.append(section)
                    digest = _src_digest()
                b.log(f"{section} done in {time.monotonic() - t0:.0f} s")
        except KeyboardInterrupt:
            b.stop_all()
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            b.stop_all()
        if changed:
            b.notes.append(
                "broker/ or client/ changed during the run (in or before: "
                + ", ".join(changed)
                + "): sections measured different code; run again for one version"
            )
        meta["notes"] = b.notes
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["others"] = others.since()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    tg = targets(results, plan)
    table = render(results, tg, meta)
    table += f"\n({meta['duration_s']:.0f} s, git {meta['git']}, {meta['date']})"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "targets": tg}, indent=1))
    out.with_suffix(".txt").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    if args.readme:
        _update_readme(table)
    return 0


def _update_readme(table: str) -> None:
    """Replace what lies between README.md's bench-table markers with the table."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench-table -->", "<!-- end bench-table -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        print(f"{readme}: no {start} ... {end} markers; not updated", file=sys.stderr)
        return
    body = f"{start}\n```\n{table}\n```\n"
    readme.write_text(text[:i] + body + text[j:])
    print(f"updated {readme}")


if __name__ == "__main__":
    sys.exit(main())
