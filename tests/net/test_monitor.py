"""LinkMonitor: RTM_DELLINK notifications, and the resynchronising dump after an overrun."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

import pytest

from privbroker.broker.net import tun
from privbroker.broker.net.monitor import LinkEvent, LinkMonitor
from tests.net.conftest import ip, needs_root

pytestmark = [needs_root, pytest.mark.timeout(30)]


def drive(monitor: LinkMonitor, until: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, "the monitor never got there"
        if select.select([monitor], [], [], 0.2)[0]:
            monitor.on_readable()


def test_sees_a_device_deleted_by_ip_link_del(ns: None) -> None:
    ip("tuntap", "add", "mode", "tun", "name", "watched0")
    events: list[LinkEvent] = []
    with LinkMonitor(events.append) as monitor:
        drive(monitor, lambda: "watched0" in monitor.known.values())
        assert events == []  # the first dump only learns what exists
        index = next(i for i, n in monitor.known.items() if n == "watched0")
        ip("link", "del", "watched0")
        drive(monitor, lambda: LinkEvent(index, "watched0", deleted=True) in events)
        assert index not in monitor.known
        fresh = tun.create("fresh%d")
        try:
            drive(monitor, lambda: LinkEvent(fresh.ifindex, fresh.name, False) in events)
            assert monitor.known[fresh.ifindex] == fresh.name
        finally:
            os.close(fresh.fd)
        drive(monitor, lambda: LinkEvent(fresh.ifindex, fresh.name, True) in events)
        assert monitor.resyncs == 0


def test_after_an_overrun_a_dump_reports_what_vanished(ns: None) -> None:
    events: list[LinkEvent] = []
    victim = tun.create("victim%d")
    with LinkMonitor(events.append, rcvbuf=1) as monitor:
        drive(monitor, lambda: victim.ifindex in monitor.known)
        # Far more notifications than the tiny buffer holds, the victim's deletion among them.
        for _ in range(30):
            os.close(tun.create("churn%d").fd)
        os.close(victim.fd)
        for _ in range(30):
            os.close(tun.create("churn%d").fd)
        drive(monitor, lambda: monitor.resyncs > 0 and victim.ifindex not in monitor.known)
        drive(monitor, lambda: LinkEvent(victim.ifindex, victim.name, True) in events)
        assert set(monitor.known.values()) == {"lo"}
