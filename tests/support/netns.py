"""Network namespaces for tests: a fresh one for the test itself, named ones around it.

`fresh_netns()` moves the calling thread (pytest's main thread) into a new network namespace
with `lo` up and ping sockets allowed for every gid, and moves it back on exit; processes the
test starts (`ip`) inherit it. `named_netns()` adds a namespace under /run/netns with
`ip netns add` and deletes it on exit; `in_named_netns()` enters one for a block, so sockets
made there live there. `router_chain()` builds client (the current namespace) -- router --
far over two veth pairs, for path MTU tests. Everything is torn down on exit, and every
address used is a documentation prefix inside these namespaces: no traffic leaves them.
Python 3.11 has neither os.unshare nor os.setns, hence ctypes.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count()


def _check(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


@contextmanager
def _entered(path: str) -> Iterator[None]:
    """Enter the network namespace at path, as an `unshare` or `setns`, and come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if path:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
        else:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def ip(*args: str, netns: str | None = None) -> str:
    """Run iproute2's `ip` (in netns if given, else in the calling thread's namespace)."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def sysctl(key: str, value: str) -> None:
    """Write a sysctl in the calling thread's network namespace (net.* keys are per netns)."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


@contextmanager
def fresh_netns(ping_group_range: str = "0 2147483647") -> Iterator[None]:
    """Run the block in a new network namespace: lo up, ping sockets for the
    gids in `ping_group_range` (by default all)."""
    with _entered(""):
        ip("link", "set", "lo", "up")
        sysctl("net.ipv4.ping_group_range", ping_group_range)
        yield


@contextmanager
def in_named_netns(name: str) -> Iterator[None]:
    """Run the block in the namespace /run/netns/NAME."""
    with _entered(f"/run/netns/{name}"):
        yield


@contextmanager
def named_netns(tag: str = "ns") -> Iterator[str]:
    """A new namespace under /run/netns, lo up, IPv6 DAD off; deleted on exit."""
    name = f"pbt-{tag}-{os.getpid()}-{next(_names)}"
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        with in_named_netns(name):
            _no_dad()
        yield name
    finally:
        ip("netns", "del", name)


def _no_dad() -> None:
    # Addresses usable at once: tests must not wait out duplicate address detection.
    sysctl("net.ipv6.conf.all.accept_dad", "0")
    sysctl("net.ipv6.conf.default.accept_dad", "0")


def veth(name: str, peer: str, peer_netns: str, *, netns: str | None = None) -> None:
    """A veth pair: name in netns (default: the current one), peer in peer_netns."""
    ip("link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_netns, netns=netns)


def wait_link_up(dev: str, netns: str | None = None, timeout: float = 10.0) -> None:
    """Wait until dev is operationally up. Until the kernel's link watcher (which may wait
    up to a second) has seen the carrier, the device drops what is sent on it: the first
    ARP or neighbour solicitation would be lost and answered only at the next retry."""
    deadline = time.monotonic() + timeout
    while json.loads(ip("-j", "link", "show", "dev", dev, netns=netns))[0]["operstate"] != "UP":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dev} not up after {timeout}s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Chain:
    """client (the current namespace) -- router -- far; the router-far link is narrow."""

    router: str
    far: str
    narrow_mtu: int
    router4: str = "192.0.2.1"  # the router's address on the client's link
    client4: str = "192.0.2.2"
    far4: str = "198.51.100.2"
    router6: str = "2001:db8:1::1"
    client6: str = "2001:db8:1::2"
    far6: str = "2001:db8:2::2"


@contextmanager
def router_chain(narrow_mtu: int = 1280) -> Iterator[Chain]:
    """Build client -- router -- far with forwarding on; call inside `fresh_netns()`."""
    with ExitStack() as stack:
        router = stack.enter_context(named_netns("rtr"))
        far = stack.enter_context(named_netns("far"))
        _no_dad()
        with in_named_netns(router):
            sysctl("net.ipv4.ip_forward", "1")
            sysctl("net.ipv6.conf.all.forwarding", "1")
        chain = Chain(router, far, narrow_mtu)
        veth("c0", "r0", router)
        veth("r1", "f0", far, netns=router)
        for dev, ns, addrs in [
            ("c0", None, ["192.0.2.2/24", "2001:db8:1::2/64"]),
            ("r0", router, ["192.0.2.1/24", "2001:db8:1::1/64"]),
            ("r1", router, ["198.51.100.1/24", "2001:db8:2::1/64"]),
            ("f0", far, ["198.51.100.2/24", "2001:db8:2::2/64"]),
        ]:
            if dev in ("r1", "f0"):
                ip("link", "set", dev, "mtu", str(narrow_mtu), netns=ns)
            for addr in addrs:
                ip(
                    "address",
                    "add",
                    addr,
                    "dev",
                    dev,
                    *(["nodad"] if ":" in addr else []),
                    netns=ns,
                )
            ip("link", "set", dev, "up", netns=ns)
        for dev, ns in [("c0", None), ("r0", router), ("r1", router), ("f0", far)]:
            wait_link_up(dev, ns)
        ip("route", "add", "198.51.100.0/24", "via", chain.router4)
        ip("-6", "route", "add", "2001:db8:2::/64", "via", chain.router6)
        ip("route", "add", "192.0.2.0/24", "via", "198.51.100.1", netns=far)
        ip("-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:2::1", netns=far)
        yield chain


# The kernel's own answer about the calling thread's namespace, through `ip -j`.


def links() -> dict[str, dict[str, Any]]:
    """Every device, by name."""
    return {link["ifname"]: link for link in json.loads(ip("-j", "link", "show"))}


def addresses(dev: str) -> list[str]:
    """The addresses on `dev`, as ADDRESS/PREFIX."""
    found = json.loads(ip("-j", "addr", "show", "dev", dev))
    return [f"{a['local']}/{a['prefixlen']}" for a in found[0]["addr_info"]] if found else []


def routes() -> list[str]:
    """The destinations of every route, in every table."""
    return [r["dst"] for r in json.loads(ip("-j", "route", "show", "table", "all"))]
