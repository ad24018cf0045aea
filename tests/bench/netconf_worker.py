"""The netconf section's worker: one measurement per process, JSON out (bench_netconf.py).

Run by bench_netconf.py inside the section's network namespace (under
`taskset -c 0` for the pinned figures), never by hand or by pytest. Each mode
times one pair, ADDRESS added to a tun device and deleted again, and prints
what lat_worker prints: a JSON list with one entry {"n", "p50_us", "p99_us",
"mean_us", "cpu_us"} (per pair; cpu_us is this process's CPU, not its
children's).

    floor - ADDRESS N WARM     privbroker.broker.net.rtnl.Rtnl.call(ADD_ADDRESS), then
                               DEL_ADDRESS, with the AddressFields the broker builds,
                               in this process, as root (the floor)
    client NAME ADDRESS N WARM Client(NAME).net.open_tun("bench%d"), set up; then
                               client.net.add_address + del_address through the broker
    ip - ADDRESS N WARM        subprocess.run(["ip", "addr", "add", ADDRESS, "dev", DEV]),
                               then the same with "del": what a script does

The floor and `ip` open a tun device of their own (TUNSETIFF on
/dev/net/tun, as the broker does) and set it up with the broker's rtnetlink
module, so all three rows change an address on an up tun device whose fd is
held: the same kernel work. The device goes with the process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from ipaddress import ip_interface

from tests.bench.lat_worker import _measure

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_IFREQ = struct.Struct("=16sH22x")


def _own_tun(pattern: str) -> tuple[int, str]:
    """A non-persistent tun device attached to a new fd: (fd, name). Needs CAP_NET_ADMIN."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(pattern.encode(), IFF_TUN | IFF_NO_PI))
    return fd, _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()


def _set_up(name: str) -> None:
    from privbroker.broker.net.fields import LinkFields
    from privbroker.broker.net.messages import Kind
    from privbroker.broker.net.rtnl import Rtnl

    with Rtnl() as rtnl:
        rtnl.call(Kind.SET_LINK, LinkFields(socket.if_nametoindex(name), up=True))


def _floor(address: str) -> tuple[Callable[[], None], object]:
    from privbroker.broker.net.fields import AddressFields
    from privbroker.broker.net.messages import Kind
    from privbroker.broker.net.rtnl import Rtnl

    fd, name = _own_tun("benchfl%d")
    _set_up(name)
    iface = ip_interface(address)
    # What broker/net/netops.py builds for a leased device: nodad only for IPv6.
    fields = AddressFields(socket.if_nametoindex(name), iface, nodad=iface.version == 6)
    rtnl = Rtnl()
    call, add, delete = rtnl.call, Kind.ADD_ADDRESS, Kind.DEL_ADDRESS

    def op() -> None:
        call(add, fields)
        call(delete, fields)

    return op, (fd, rtnl)


def _client(name: str, address: str) -> tuple[Callable[[], None], object]:
    from privbroker.api import Client

    client = Client(name)
    net = client.net
    dev = net.open_tun("bench%d")
    net.set_link(dev.name, up=True)
    ifname = dev.name

    def op() -> None:
        net.add_address(ifname, address)
        net.del_address(ifname, address)

    return op, (client, dev)


def _ip(address: str) -> tuple[Callable[[], None], object]:
    fd, name = _own_tun("benchip%d")
    _set_up(name)
    add = ["ip", "addr", "add", address, "dev", name]
    delete = ["ip", "addr", "del", address, "dev", name]
    run, null = subprocess.run, subprocess.DEVNULL

    def op() -> None:
        run(add, stdout=null, check=True)
        run(delete, stdout=null, check=True)

    return op, fd


def main() -> None:
    mode, name, address = sys.argv[1:4]
    n, warm = int(sys.argv[4]), int(sys.argv[5])
    if mode == "floor":
        op, keep = _floor(address)
    elif mode == "client":
        op, keep = _client(name, address)
    elif mode == "ip":
        op, keep = _ip(address)
    else:
        raise SystemExit(f"unknown mode {mode}")
    result = _measure(op, n, 1, warm)
    del keep  # the device (and the client's lease) lived through the measurement
    print(json.dumps(result))


if __name__ == "__main__":
    main()
