"""Where a request's time goes inside the broker: profile it under the latency load.

    python3 -m tests.bench.profile_broker                 # py-spy if installed, else cProfile
    python3 -m tests.bench.profile_broker --tool cprofile --seconds 10 --pinned
    python3 -m tests.bench.profile_broker --client python --rules 10000 --batch 250

Starts privbroker on a unique abstract name with the benchmark's policy and its
audit to a file, as users run it (as every broker of the benchmark), then:
1. measures its CPU per request under a sequential load with no profiler
   (the C client by default, so the client costs the broker nothing extra);
2. runs the same load again with the broker sampled by py-spy (`pip install
   py-spy`; --nonblocking, so the broker is not paused) or traced by cProfile
   (the broker runs under `python -m cProfile`; tracing inflates small calls);
3. prints the top functions by own time and by inclusive time, each as a share
   of the samples and as microseconds per request (share x CPU per request).

py-spy samples wall time while the broker is runnable. With --pinned and a
Python client, the broker's sendmsg wakes the client, which preempts it on the
shared CPU: the client's whole turn then shows as the broker's send_message.
The C client (the default) costs so little that this all but vanishes.
Run as root, from the repository root. Never part of the test run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.run import BUILD, PIN, PY, QUICK, ROOT, Bench, serve_args


def _load(b: Bench, name: str, seconds: float, client: str, pinned: bool, batch: int) -> int:
    """Sequential opens on one connection for about `seconds`; returns how many requests."""
    if client == "c" and batch == 1:
        # Size the run from a short probe, then run that many.
        probe = b.c("lat", name, str(b.small), "500", pinned=pinned)
        n = max(1000, int(seconds / (probe["mean_us"] / 1e6)))
        b.c("lat", name, str(b.small), str(n), pinned=pinned)
        return n + 500
    mode, args = (
        ("client", [str(b.small)]) if batch == 1 else ("batch", [str(b.listing), str(batch)])
    )
    probe = b.py(mode, name, *args, n=50, pinned=pinned, warm=10)
    n = max(200, int(seconds / (probe["mean_us"] / 1e6)))
    b.py(mode, name, *args, n=n, pinned=pinned, warm=10)
    return n + 60


def _short(frame: str, lines: bool = False) -> str:
    # py-spy raw frames: "function (path/file.py:LINE)"; group by function and file
    # (and line, with lines=True).
    m = re.match(r"(.*) \((.*?)(:\d+)?\)$", frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    for prefix in (str(ROOT) + "/", "/root/.pyenv/versions/", "/usr/lib/"):
        path = path.removeprefix(prefix)
    return f"{fn} ({path}{line or ''})" if lines else f"{fn} ({path})"


def _report(
    own: collections.Counter[str],
    incl: collections.Counter[str],
    total: float,
    per_req_us: float,
    top: int,
    unit: str,
) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {"own": [], "inclusive": []}
    for title, counter in (("own", own), ("inclusive", incl)):
        print(
            f"\n  top {top} by {title} time ({unit}); us/request = share x "
            f"{per_req_us:.1f} us broker CPU per request"
        )
        for fn, v in counter.most_common(top):
            share = v / total
            row = {"function": fn, "share": share, "us_per_request": share * per_req_us}
            out[title].append(row)
            print(f"  {share * 100:6.1f}%  {share * per_req_us:7.1f} us  {fn}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m tests.bench.profile_broker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tool", choices=["auto", "py-spy", "cprofile"], default="auto")
    ap.add_argument(
        "--client",
        choices=["c", "python"],
        default="c",
        help="load: the C client (default) or privbroker's Client",
    )
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--pinned", action="store_true", help="broker and client on CPU 0")
    ap.add_argument("--rules", type=int, default=10, choices=[10, 1000, 10000])
    ap.add_argument("--batch", type=int, default=1, help="open_many of this many paths")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="py-spy: by line, not by function")
    ap.add_argument("--out", default=str(BUILD.parent / "results" / "profile.json"))
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "py-spy" if shutil.which("py-spy") else "cprofile"
    client = "python" if args.batch > 1 else args.client
    with tempfile.TemporaryDirectory(prefix="privbroker-prof-") as tmp:
        b = Bench(QUICK, Path(tmp))
        b.setup()
        b.build()
        policy = b.policy(args.rules)
        try:
            # 1. CPU per request, no profiler.
            with b.server("privbroker", args.pinned, policy) as srv:
                _load(b, srv.name, 1.0, client, args.pinned, args.batch)  # warm up
                c0, t0 = srv.cpu_s(), time.monotonic()
                reqs = _load(b, srv.name, args.seconds / 2, client, args.pinned, args.batch)
                per_req = (srv.cpu_s() - c0) / reqs * 1e6
                wall = (time.monotonic() - t0) / reqs * 1e6
            print(
                f"privbroker, {args.rules} rules, {client} client, "
                f"{'pinned' if args.pinned else 'unpinned'}, batch {args.batch}: "
                f"{per_req:.1f} us broker CPU per request ({wall:.1f} us wall per request)"
            )
            result: dict[str, object] = {
                "broker_cpu_us_per_request": per_req,
                "wall_us_per_request": wall,
                "tool": tool,
                "client": client,
                "pinned": args.pinned,
                "rules": args.rules,
                "batch": args.batch,
            }
            # 2. The same load, profiled.
            own: collections.Counter[str] = collections.Counter()
            incl: collections.Counter[str] = collections.Counter()
            total: float = 0
            if tool == "py-spy":
                with b.server("privbroker", args.pinned, policy) as srv:
                    raw = Path(tmp) / "spy.txt"
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            str(srv.pid),
                            "-r",
                            "997",
                            "-f",
                            "raw",
                            "--nonblocking",
                            "-o",
                            str(raw),
                            "-d",
                            str(int(args.seconds) + 2),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)
                    _load(b, srv.name, args.seconds, client, args.pinned, args.batch)
                    spy.wait(args.seconds + 30)
                for line in raw.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    frames = [_short(f, args.lines) for f in stack.split(";")]
                    if not frames or not count.isdigit():
                        continue
                    c = int(count)
                    # Idle samples (the loop waiting in epoll) are not request time.
                    if "poll" in frames[-1] and "serve_forever" in frames[-2]:
                        continue
                    total += c
                    own[frames[-1]] += c
                    for f in set(frames):
                        incl[f] += c
                unit = f"{total} samples"
            else:
                prof = Path(tmp) / "broker.prof"
                name = b._name("prof")
                cmd = [
                    PY,
                    "-m",
                    "cProfile",
                    "-o",
                    str(prof),
                    *serve_args(policy, name, b.audit_file(name)),
                ]
                proc = subprocess.Popen(
                    (PIN if args.pinned else []) + cmd,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    from tests.bench.run import Server

                    srv = Server("privbroker", name, proc, Path(os.devnull))
                    b._wait_ready(srv)
                    _load(b, name, args.seconds, client, args.pinned, args.batch)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                st = pstats.Stats(str(prof))
                for (file, line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
                    key = _short(f"{fn} ({file}:{line})")
                    if fn == "<method 'poll' of 'select.epoll' objects>":
                        continue  # idle
                    own[key] += tt
                    incl[key] += ct
                    total += tt
                unit = f"{total:.2f} s traced"
            result["profile"] = _report(own, incl, total, per_req, args.top, unit)
        finally:
            b.stop_all()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
