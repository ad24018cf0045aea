"""`AsyncClient.net` and privbroker.aio's open_tun, add_address, ...: the network
configuration calls as coroutines.

The same calls as netapi.py (`Client.net`) and privbroker.net, with the same
arguments, checks and errors (tun.py, netconf.py), carried by an
`AsyncClient`'s one exchange (`_call`, with its timeout and retry rules). The
lease rule is the same: a device and the changes made for it belong to the
connection that asked, here the AsyncClient's (the module-level functions use
the running loop's shared client, aio.py), and end with it. Between a TUN
reply and the returned device there is no await, so a cancellation cannot
strand the fd (aio.py, Rule 4).

A TunDevice comes back in blocking mode. On a loop: `os.set_blocking(
dev.fileno(), False)`, then `loop.add_reader(dev.fileno(), ...)` and read a
packet per callback until BlockingIOError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .calls import check_timeout
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
    from .aio_connection import Answer
    from .calls import MakeRequest

__all__ = [
    "AsyncClientNet",
    "add_address",
    "add_route",
    "del_address",
    "del_route",
    "open_tun",
    "set_link",
]


class _Carrier(Protocol):
    """What the calls need of an AsyncClient: its timeout and its one exchange."""

    timeout: float | None

    async def _call(self, make: MakeRequest, timeout: float | None) -> Answer: ...


async def _open(client: _Carrier, call: TunCall, timeout: float | None) -> TunDevice:
    reply, fds = await client._call(call.make, timeout)
    # No await from here on: device_for owns the fds until it returns the device.
    return device_for(call, reply, fds, lease=client)


async def _configure(client: _Carrier, call: NetconfCall, timeout: float | None) -> None:
    reply, _ = await client._call(call.make, timeout)
    check_result(call, reply)


class AsyncClientNet:
    """The network calls of one `AsyncClient`, bound to its connection (`client.net`).

    As `Client.net` (netapi.py), each method a coroutine; arguments and errors
    as for the privbroker.net function of the same name.
    """

    __slots__ = ("_client",)

    def __init__(self, client: _Carrier) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"<AsyncClientNet of {self._client!r}>"

    async def open_tun(
        self, name: str = "tun%d", *, tap: bool = False, mtu: int | None = None
    ) -> TunDevice:
        """A new tun (or tap) device leased to this connection (blocking mode, see above)."""
        return await _open(self._client, tun_call(name, tap, mtu), self._client.timeout)

    async def add_address(self, ifname: str, address: Interface) -> None:
        """Add `address` ("10.8.0.2/24") to `ifname`, as privbroker.net.add_address."""
        await self._configure(address_call("add_address", ifname, address))

    async def del_address(self, ifname: str, address: Interface) -> None:
        """Remove `address` from `ifname`, as privbroker.net.del_address."""
        await self._configure(address_call("del_address", ifname, address))

    async def set_link(
        self, ifname: str, *, up: bool | None = None, mtu: int | None = None
    ) -> None:
        """Set `ifname` up or down and/or its MTU, as privbroker.net.set_link."""
        await self._configure(link_call(ifname, up, mtu))

    async def add_route(
        self,
        dst: Network,
        *,
        dev: str | None = None,
        via: Gateway | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> None:
        """Add a route to `dst`, as privbroker.net.add_route."""
        await self._configure(route_call("add_route", dst, dev, via, metric, table))

    async def del_route(
        self,
        dst: Network,
        *,
        dev: str | None = None,
        via: Gateway | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> None:
        """Delete a route to `dst`, as privbroker.net.del_route."""
        await self._configure(route_call("del_route", dst, dev, via, metric, table))

    async def _configure(self, call: NetconfCall) -> None:
        await _configure(self._client, call, self._client.timeout)


# ------------------------------------------------- module level, as in privbroker.net
# privbroker.aio exports these; each uses the running loop's shared client, so
# what they lease lasts as long as that loop's client (the loop, or the process).


def _shared(socket_name: str | None, timeout: float | None) -> tuple[_Carrier, float | None]:
    # aio.py imports this module; its shared clients are looked up at call time.
    from .aio import _shared_client

    timeout = check_timeout(timeout)
    client = _shared_client(socket_name)
    return client, client.timeout if timeout is None else timeout


async def open_tun(
    name: str = "tun%d",
    *,
    tap: bool = False,
    mtu: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> TunDevice:
    """`privbroker.net.open_tun` from a coroutine, on the loop's shared client."""
    call = tun_call(name, tap, mtu)
    client, timeout = _shared(socket, timeout)
    return await _open(client, call, timeout)


async def add_address(
    ifname: str, address: Interface, *, socket: str | None = None, timeout: float | None = None
) -> None:
    """`privbroker.net.add_address` from a coroutine, on the loop's shared client."""
    await _shared_configure(address_call("add_address", ifname, address), socket, timeout)


async def del_address(
    ifname: str, address: Interface, *, socket: str | None = None, timeout: float | None = None
) -> None:
    """`privbroker.net.del_address` from a coroutine, on the loop's shared client."""
    await _shared_configure(address_call("del_address", ifname, address), socket, timeout)


async def set_link(
    ifname: str,
    *,
    up: bool | None = None,
    mtu: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """`privbroker.net.set_link` from a coroutine, on the loop's shared client."""
    await _shared_configure(link_call(ifname, up, mtu), socket, timeout)


async def add_route(
    dst: Network,
    *,
    dev: str | None = None,
    via: Gateway | None = None,
    metric: int | None = None,
    table: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """`privbroker.net.add_route` from a coroutine, on the loop's shared client."""
    call = route_call("add_route", dst, dev, via, metric, table)
    await _shared_configure(call, socket, timeout)


async def del_route(
    dst: Network,
    *,
    dev: str | None = None,
    via: Gateway | None = None,
    metric: int | None = None,
    table: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """`privbroker.net.del_route` from a coroutine, on the loop's shared client."""
    call = route_call("del_route", dst, dev, via, metric, table)
    await _shared_configure(call, socket, timeout)


async def _shared_configure(
    call: NetconfCall, socket_name: str | None, timeout: float | None
) -> None:
    client, timeout = _shared(socket_name, timeout)
    await _configure(client, call, timeout)
