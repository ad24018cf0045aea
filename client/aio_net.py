"""The socket calls of `AsyncClient` (privbroker.aio), kept apart from its file calls,
and its `net` (devices and their configuration, aio_netapi.py).

`AsyncSockets` is a mixin: `AsyncClient` inherits these methods and supplies
`_call`, its one exchange (with its timeout, retry and cancellation rules).
What a call means is netcalls.py's, shared with the sync `Client`, so the two
cannot drift apart. Between the reply and the returned socket there is no
await: a cancellation cannot strand the fd (aio.py, Rule 4).

The sockets come back in blocking mode, as the broker made them: an asyncio
program sets them non-blocking itself (`sock.setblocking(False)`), or hands
them to `loop.create_server(sock=...)` / `asyncio.start_server(sock=...)`,
which do.
"""

from __future__ import annotations

import socket as _socket
from typing import TYPE_CHECKING

from . import netcalls
from .aio_netapi import AsyncClientNet
from .calls import check_timeout
from .netcalls import Address, SocketCall, bind_call, icmp_call, raw_call

if TYPE_CHECKING:
    from .aio_connection import Answer
    from .calls import MakeRequest


class AsyncSockets:
    """bind_privileged, icmp_socket and raw_socket, as coroutines."""

    timeout: float | None

    if TYPE_CHECKING:

        async def _call(self, make: MakeRequest, timeout: float | None) -> Answer: ...

    async def bind_privileged(
        self,
        address: Address,
        type: int = _socket.SOCK_STREAM,
        *,
        backlog: int | None = None,
        v6only: bool | None = None,
        interface: str | None = None,
        reuse_port: bool = False,
    ) -> _socket.socket:
        """As `Client.bind_privileged`; the socket is in blocking mode (see above).

        Raises:
            ValueError: a hostname (no DNS), a bad port, type or option (no I/O).
            PolicyDenied, OSError, BrokerError, BrokerUnavailable,
            BrokerIdentityError, ProtocolError: as for open_fd.
        """
        call = netcalls.bind_call(address, type, backlog, v6only, interface, reuse_port)
        return await self._new_socket(call, self.timeout)

    async def icmp_socket(
        self, family: int = _socket.AF_INET, *, interface: str | None = None
    ) -> _socket.socket:
        """As `Client.icmp_socket`: an ICMP or ICMPv6 datagram socket, blocking mode."""
        return await self._new_socket(netcalls.icmp_call(family, interface), self.timeout)

    async def raw_socket(
        self, family: int, proto: int, *, interface: str | None = None
    ) -> _socket.socket:
        """As `Client.raw_socket`: a raw socket for one IP protocol, blocking mode."""
        return await self._new_socket(netcalls.raw_call(family, proto, interface), self.timeout)

    @property
    def net(self) -> AsyncClientNet:
        """tun/tap devices and their configuration, leased to this client's connection:
        `await client.net.open_tun(...)`, `.add_address`, ... (aio_netapi.py)."""
        return AsyncClientNet(self)  # made per use: a stored one would tie a cycle to the client

    async def _new_socket(self, call: SocketCall, timeout: float | None) -> _socket.socket:
        reply, fds = await self._call(call.make, timeout)
        # No await from here on: socket_for owns the fds until it returns the socket.
        return netcalls.socket_for(call, reply, fds)


# ------------------------------------------------- module level, as in privbroker.net
# privbroker.aio exports these; each uses the running loop's shared client.


async def bind_privileged(
    address: Address,
    type: int = _socket.SOCK_STREAM,
    *,
    backlog: int | None = None,
    v6only: bool | None = None,
    interface: str | None = None,
    reuse_port: bool = False,
    socket: str | None = None,
    timeout: float | None = None,
) -> _socket.socket:
    """`privbroker.bind_privileged` from a coroutine, on the loop's shared client."""
    call = bind_call(address, type, backlog, v6only, interface, reuse_port)
    return await _socket_call(call, socket, timeout)


async def icmp_socket(
    family: int = _socket.AF_INET,
    *,
    interface: str | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> _socket.socket:
    """`privbroker.icmp_socket` from a coroutine, on the loop's shared client."""
    return await _socket_call(icmp_call(family, interface), socket, timeout)


async def raw_socket(
    family: int,
    proto: int,
    *,
    interface: str | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> _socket.socket:
    """`privbroker.raw_socket` from a coroutine, on the loop's shared client."""
    return await _socket_call(raw_call(family, proto, interface), socket, timeout)


async def _socket_call(
    call: SocketCall, socket_name: str | None, timeout: float | None
) -> _socket.socket:
    # aio.py imports this module for AsyncClient's base class; its shared
    # clients are looked up at call time, when both modules are loaded.
    from .aio import _shared_client

    timeout = check_timeout(timeout)
    client = _shared_client(socket_name)
    return await client._new_socket(call, client.timeout if timeout is None else timeout)
