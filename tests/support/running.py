"""Asking a running broker (tests/conftest.py start_broker) how it is doing:
wait for a condition, read its status, try a read as nobody."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privbroker import Client, PolicyDenied
from tests.support.privs import NOBODY, NOGROUP, run_as


def wait_for(cond: Callable[[], Any], seconds: float = 15.0) -> Any:
    """cond()'s first true value, polled; AssertionError if none within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if got := cond():
            return got
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def status(name: str) -> dict[str, Any]:
    with Client(name) as c:
        return c.status()


def can_read(name: str, path: str | Path) -> bool:
    """Whether nobody gets `path` opened through the broker on @name."""

    def attempt() -> bool:
        try:
            with Client(name) as c:
                os.close(c.open_fd(str(path)))
            return True
        except PolicyDenied:
            return False

    return run_as(NOBODY, NOGROUP, attempt)
