"""Fixtures for the network tests: a fresh namespace each, an Rtnl and a tun device in it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from privbroker.broker.net import tun
from privbroker.broker.net.rtnl import Rtnl
from tests.support.netns import fresh_netns

TUNSETPERSIST = 0x400454CB  # what a holder may do to its fd, with no capability

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(tun.TUN_PATH),
    reason="network tests make namespaces and devices: root and /dev/net/tun",
)


def ip_json(*args: str) -> Any:
    """The kernel's own answer, through iproute2: `ip -j ARGS` parsed."""
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def link_names() -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show")}


@pytest.fixture
def ns() -> Iterator[None]:
    with fresh_netns():
        yield


@pytest.fixture
def rtnl(ns: None) -> Iterator[Rtnl]:
    with Rtnl() as r:
        yield r


@pytest.fixture
def tundev(ns: None) -> Iterator[tun.Created]:
    dev = tun.create("tst%d")
    try:
        yield dev
    finally:
        with contextlib.suppress(OSError):  # a test closed it already
            os.close(dev.fd)
