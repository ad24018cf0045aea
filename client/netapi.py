"""`Client.net`: tun/tap devices and network configuration on one client's connection.

A device the broker creates for a client, and every address, link change and
route it makes for it, belong to that client's connection (a lease,
docs/security.md invariant 12): the broker checks "a device it leases" against
the connection a request arrives on, and when the connection ends (the
client's close(), a call that timed out or failed mid-exchange, a broker
restart, the process's exit) it deletes the devices and undoes the changes,
newest first. So a device is configured through the client that opened it:

    with privbroker.Client() as client:
        dev = client.net.open_tun("vpn%d", mtu=1400)
        client.net.add_address(dev.name, "10.8.0.2/24")
        client.net.set_link(dev.name, up=True)
        client.net.add_route("10.9.0.0/16", dev=dev.name)
        ...                                  # dev.read(), dev.write(packet)
    # the connection closed: the device, its address and its route are gone

`privbroker.net.open_tun` and the rest do the same on the process's shared
client (shared.py), whose connection lasts as long as the process. What a
call means is tun.py's and netconf.py's, shared with the asyncio client
(aio_netapi.py); this module only carries them on a sync `Client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .netconf import (
    Gateway,
    Interface,
    NetconfCall,
    Network,
    address_call,
    check_result,
    link_call,
    route_call,
)
from .tun import TunCall, TunDevice, device_for, tun_call

if TYPE_CHECKING:
    from .api import Client

__all__ = ["ClientNet", "configure", "open_device"]


def open_device(client: Client, call: TunCall, timeout: float | None) -> TunDevice:
    """Carry a checked open_tun on `client`; the device keeps the client alive."""
    reply, fds = client._request(call.make, timeout)
    return device_for(call, reply, fds, lease=client)


def configure(client: Client, call: NetconfCall, timeout: float | None) -> None:
    """Carry a checked network configuration call on `client`; None once acknowledged."""
    reply, _ = client._request(call.make, timeout)
    check_result(call, reply)


class ClientNet:
    """The network calls of one `Client`, bound to its connection (`client.net`).

    Each method is the `privbroker.net` function of the same name (see there
    for Args, Raises), on this client's connection and with its timeout. The
    devices it opens, and the changes it makes, last as long as that
    connection (see the module's docstring).
    """

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"<ClientNet of {self._client!r}>"

    def open_tun(
        self, name: str = "tun%d", *, tap: bool = False, mtu: int | None = None
    ) -> TunDevice:
        """A new tun (or tap) device leased to this connection; see privbroker.net.open_tun."""
        return open_device(self._client, tun_call(name, tap, mtu), self._client.timeout)

    def add_address(self, ifname: str, address: Interface) -> None:
        """Add `address` ("10.8.0.2/24", "fd00:8::2/64") to `ifname`; see privbroker.net."""
        self._configure(address_call("add_address", ifname, address))

    def del_address(self, ifname: str, address: Interface) -> None:
        """Remove `address` (with its prefix length) from `ifname`; see privbroker.net."""
        self._configure(address_call("del_address", ifname, address))

    def set_link(self, ifname: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Set `ifname` up or down and/or its MTU; see privbroker.net.set_link."""
        self._configure(link_call(ifname, up, mtu))

    def add_route(
        self,
        dst: Network,
        *,
        dev: str | None = None,
        via: Gateway | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> None:
        """Add a route to `dst` ("10.9.0.0/16"); see privbroker.net.add_route."""
        self._configure(route_call("add_route", dst, dev, via, metric, table))

    def del_route(
        self,
        dst: Network,
        *,
        dev: str | None = None,
        via: Gateway | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> None:
        """Delete the route to `dst` that matches; see privbroker.net.del_route."""
        self._configure(route_call("del_route", dst, dev, via, metric, table))

    def _configure(self, call: NetconfCall) -> None:
        configure(self._client, call, self._client.timeout)
