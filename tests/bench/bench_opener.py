"""Per-call cost of Opener.open, against a plain os.open of the same file.

Run by hand (as root): `python -m tests.bench.bench_opener [N]`; pin it with
`taskset -c 0` for steadier figures. Never part of the test run.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable

from privbroker.broker.files.opener import Opener
from privbroker.broker.policy.decision import Decision, FileType
from privbroker.protocol import Access, OpenItem

ALLOW = Decision(True, "bench", "allowed")
DENY = Decision(False, None, "denied")


def allow(path: str, access: Access, ftype: FileType | None) -> Decision:
    return ALLOW


def deny(path: str, access: Access, ftype: FileType | None) -> Decision:
    return DENY


def per_call(fn: Callable[[], None], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    opener = Opener()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small")
        with open(path, "w") as f:
            f.write("x")
        read = OpenItem(path, Access.READ)
        create = OpenItem(os.path.join(tmp, "new"), Access.WRITE | Access.CREATE, True)

        def plain() -> None:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))

        def opened() -> None:
            os.close(opener.open(allow, read, 0, 0).fd)

        def denied() -> None:
            opener.open(deny, read, 0, 0)

        def created() -> None:
            os.close(opener.open(allow, create, 0, 0).fd)
            os.unlink(create.path)

        floor = per_call(plain, n)
        print(f"os.open+close          {floor:7.2f} us")
        for name, fn in (
            ("Opener.open read", opened),
            ("denied (no syscall)", denied),
            ("create+unlink", created),
        ):
            us = per_call(fn, n)
            print(f"{name:22s} {us:7.2f} us  ({us / floor:.1f}x the plain open)")


if __name__ == "__main__":
    main()
