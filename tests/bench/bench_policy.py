"""Per-call cost of decide() on a 10-rule and on 10,000-rule policies.

Run by hand: `python -m tests.bench.bench_policy [N] [--freeze]`. Never part
of the test run. `--freeze` moves the loaded policies out of the garbage
collector's sight (gc.freeze), as a broker can after a load: without it, a
big policy makes every full collection, and so the average call, slower.

The big policies are shaped to defeat one index at a time: many per-user
trees (path prefixes differ), many rules for one shared tree (subjects
differ), many literal device paths, many wildcards in one directory.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from privbroker.broker.policy.decide import FileType, Subject, decide, load_policy
from privbroker.protocol import Access

R, W = Access.READ, Access.WRITE | Access.CREATE | Access.TRUNCATE
WEB = Subject(33, 33, frozenset({33}))
USER = Subject(1000, 1000, frozenset({1000, 4, 20}))
BASE = """version = 1
[[allow]]
name = "web key"
users = [33]
paths = ["/etc/ssl/private/site.key"]
access = ["read"]
[[allow]]
name = "logs"
groups = [4]
paths = ["/var/log/**"]
access = ["read"]
[[allow]]
name = "serial"
groups = [20]
paths = ["/dev/ttyUSB*"]
access = ["read", "write"]
types = ["char"]
[[deny]]
name = "shadow"
paths = ["/etc/shadow"]
"""


def _rule(name: str, who: str, path: str) -> str:
    return f'[[allow]]\nname = "{name}"\n{who}\npaths = ["{path}"]\naccess = ["read"]\n'


def _filler(shape: str, n: int) -> str:
    rules = []
    for i in range(n):
        if shape == "trees":
            rules.append(_rule(f"r{i}", f"users = [{20000 + i}]", f"/srv/app{i}/**"))
        elif shape == "shared":
            rules.append(_rule(f"r{i}", f"users = [{20000 + i}]", "/srv/shared/**"))
        elif shape == "devices":
            rules.append(_rule(f"r{i}", "groups = [20]", f"/dev/ttyX{i}"))
        else:  # wild: many wildcard patterns in one directory, for one group
            rules.append(_rule(f"r{i}", "groups = [20]", f"/dev/tty{i}*"))
    return "\n".join(rules)


def per_call(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20000
    cases = {
        "allow literal": (WEB, "/etc/ssl/private/site.key", R, FileType.FILE),
        "allow ** group": (USER, "/var/log/apt/history.log", R, FileType.FILE),
        "allow * type": (USER, "/dev/ttyUSB0", R | Access.WRITE, FileType.CHAR),
        "deny rule": (USER, "/etc/shadow", R, None),
        "default deny": (USER, "/srv/app5/data/x", W, None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        policies = {}
        # BASE holds 4 rules: "10 rules" adds 6 trees, the others 9,996 of their shape.
        for label, shape, count in [
            ("10 rules", "trees", 6),
            ("trees", "trees", 9_996),
            ("shared", "shared", 9_996),
            ("devices", "devices", 9_996),
            ("wild", "wild", 9_996),
        ]:
            path = Path(tmp, f"{label}.toml")
            path.write_text(BASE + _filler(shape, count))
            start = time.perf_counter()
            policies[label] = load_policy(path)
            load = time.perf_counter() - start
            print(f"{label:8} {policies[label].rule_count:6} rules, load {load:.2f} s")
        if "--freeze" in sys.argv:
            gc.freeze()  # what a long-running broker can do after each load
        print(f"{'case':16}" + "".join(f"{s:>10}" for s in policies) + "   (us per decide)")
        for case, request in cases.items():
            row = []
            for policy in policies.values():
                row.append(per_call(lambda p=policy, r=request: decide(p, *r), n))
            print(f"{case:16}" + "".join(f"{x:10.2f}" for x in row))


if __name__ == "__main__":
    main()
