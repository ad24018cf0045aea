"""The broker itself: what it gives up at start (docs/security.md, invariant 13)."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from tests.adversarial._util import broker_healthy, fd_targets, proc_status
from tests.support.privs import NOBODY

pytestmark = pytest.mark.adversarial

CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN, CAP_SYS_MODULE = 6, 7, 12, 16
CAP_SYS_RAWIO, CAP_SYS_ADMIN, CAP_SYS_BOOT, CAP_MKNOD, CAP_BPF = 17, 21, 22, 27, 39


def policy(tmp: Path) -> str:
    return f"""
        version = 1
        [[allow]]
        name = "nobody reads the probe"
        users = [{NOBODY}]
        paths = ["{tmp}/probe.txt"]
        access = ["read"]
    """


def test_no_new_privs_capabilities_and_umask(start_broker, tmp_path: Path) -> None:
    b = start_broker(policy(tmp_path))
    st = proc_status(b.proc.pid)
    assert st["NoNewPrivs"] == "1"
    assert st["Umask"] == "0077"
    for key in ("CapBnd", "CapEff", "CapPrm"):
        caps = int(st[key], 16)
        for cap in (
            CAP_SETGID,
            CAP_SETUID,
            CAP_NET_ADMIN,
            CAP_SYS_MODULE,
            CAP_SYS_RAWIO,
            CAP_SYS_ADMIN,
            CAP_SYS_BOOT,
            CAP_MKNOD,
            CAP_BPF,
        ):
            assert not caps & (1 << cap), f"{key} still has capability {cap}: {st[key]}"
    assert int(st["CapInh"], 16) == 0 and int(st.get("CapAmb", "0"), 16) == 0
    broker_healthy(b)


def test_inherited_fds_are_closed(launch, tmp_path: Path) -> None:
    r, w = os.pipe()
    leaked = os.readlink(f"/proc/self/fd/{w}")
    os.set_inheritable(w, True)
    try:
        b = launch(policy(tmp_path), pass_fds=(w,))
        held = fd_targets(b.proc.pid)
        assert leaked not in held.values(), f"the broker kept an inherited fd: {held}"
        stray = {fd: t for fd, t in held.items() if fd > 2 and t.startswith("pipe:")}
        assert not stray, f"pipes open in the broker: {stray}"
        os.close(w)
        w = -1
        # Our write end was the last one: the read end sees EOF at once.
        assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b""
        broker_healthy(b)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
