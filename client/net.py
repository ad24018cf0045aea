"""`privbroker.net`: privileged sockets through the broker, and a socket's error queue.

Some sockets need privilege once, when they are made: a TCP or UDP port below
1024 (at bind), an ICMP datagram ("ping") socket (net.ipv4.ping_group_range),
a raw socket (CAP_NET_RAW). The broker makes such a socket as root, for the
client's uid, as the policy allows, and hands it over; after that the kernel
checks nothing, so it is an ordinary socket in the client's hands:

    sock = privbroker.bind_privileged(("::", 443))   # listening, dual-stack
    conn, peer = sock.accept()

The calls here use one shared `Client` per socket name, as `open_privileged`
does (shared.py); `Client` has the same calls as methods, and
`privbroker.aio` has them for asyncio. What a call means (its target text,
the checks before any I/O, the reply) is in netcalls.py, shared by all of
them. `target_for` shows the text a call asks the broker for, which is also
what the policy's `sockets` and `addresses` judge and `privbroker explain`
takes.

The error queue (`read_errors`, `path_mtu`, ...) is errqueue.py's: plain
socket options and recvmsg on a socket the client holds, no broker involved.

Devices and their configuration (`open_tun`, `add_address`, `set_link`,
`add_route`, ...) are done by the broker over its own rtnetlink socket; a
device and the changes made for it are leased to the connection that asked
(here the shared client's, which lasts as long as the process): they are
undone when it ends. `Client.net` has the same calls on a connection of
one's own (netapi.py); what they mean is tun.py's and netconf.py's.
"""

from __future__ import annotations

import socket as _socket
from typing import TYPE_CHECKING

from . import calls
from .errqueue import Origin, SocketError, enable_recverr, path_mtu, read_errors, set_pmtu_discover
from .netapi import configure, open_device
from .netcalls import Address, SocketCall, bind_call, icmp_call, raw_call, target_for
from .netconf import Gateway, Interface, NetconfCall, Network, address_call, link_call, route_call
from .shared import _shared_client
from .tun import TunDevice, tun_call

if TYPE_CHECKING:
    from .api import Client

__all__ = [
    "Origin",
    "SocketError",
    "TunDevice",
    "add_address",
    "add_route",
    "bind_privileged",
    "del_address",
    "del_route",
    "enable_recverr",
    "icmp_socket",
    "open_tun",
    "path_mtu",
    "raw_socket",
    "read_errors",
    "set_link",
    "set_pmtu_discover",
    "target_for",
]


def bind_privileged(
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
    """A TCP socket listening on, or a UDP socket bound to, a privileged address.

    The broker creates the socket as the policy allows (the port and address
    against a rule's `sockets` and `addresses`), owned by the caller's uid,
    close-on-exec, in blocking mode.

    Args:
        address: as bind() takes it, numeric: ("::", 443), ("0.0.0.0", 53),
            ("fe80::1%eth0", 547), or (host, port, flowinfo, scope_id). The
            family follows from the address. "::" is dual-stack (it also
            accepts IPv4) unless v6only=True.
        type: socket.SOCK_STREAM (TCP, returned listening) or
            socket.SOCK_DGRAM (UDP, returned bound).
        backlog: TCP's listen() backlog, 1-65535; None for the system's
            maximum (net.core.somaxconn).
        v6only: IPv6 only: True refuses IPv4, False accepts it, None keeps
            the kernel's default (dual-stack on Linux).
        interface: a device to bind the socket to (SO_BINDTODEVICE); a rule
            with `interfaces` requires one.
        reuse_port: set SO_REUSEPORT.
        socket: the broker's socket name (default PRIVBROKER_SOCKET, else
            "privbroker").
        timeout: seconds for this call; None means the client's default.

    Returns:
        The socket, owned by the caller.

    Raises:
        ValueError: a hostname (no DNS here), port 0 or out of range, another
            type, an option that does not apply (before any I/O).
        PolicyDenied: the policy does not allow it (a PermissionError, with
            the reason and the rule).
        OSError: the kernel's error as its subclass, with the target text as
            `filename` (EADDRINUSE is an OSError, EADDRNOTAVAIL, ENODEV...).
        BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
            as for open_privileged.
    """
    call = bind_call(address, type, backlog, v6only, interface, reuse_port)
    return _request(call, socket, timeout)


def icmp_socket(
    family: int = _socket.AF_INET,
    *,
    interface: str | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> _socket.socket:
    """An ICMP (AF_INET) or ICMPv6 (AF_INET6) datagram ("ping") socket.

    The kernel rewrites the echo id and refuses other ICMP types and
    IP_HDRINCL. IP_RECVERR (IPV6_RECVERR) is on and path MTU discovery is
    "want", so `read_errors` and `path_mtu` work on it at once.

    Args:
        family: socket.AF_INET or socket.AF_INET6.
        interface: a device to bind it to (SO_BINDTODEVICE).
        socket, timeout: as for bind_privileged.

    Raises:
        ValueError: another family, a bad interface (before any I/O).
        PolicyDenied, OSError, BrokerError, BrokerUnavailable,
        BrokerIdentityError, ProtocolError: as for bind_privileged.
    """
    return _request(icmp_call(family, interface), socket, timeout)


def raw_socket(
    family: int,
    proto: int,
    *,
    interface: str | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> _socket.socket:
    """A raw socket for one IP protocol (never IPPROTO_RAW), under a rule naming it.

    Its holder sees every packet of that protocol and can forge them: grant
    it sparingly.

    Args:
        family: socket.AF_INET or socket.AF_INET6.
        proto: the IP protocol, 1-254 (socket.IPPROTO_ICMP, ...).
        interface, socket, timeout: as for bind_privileged.

    Raises:
        ValueError: another family, protocol 0 or 255 or out of range.
        PolicyDenied, OSError, BrokerError, BrokerUnavailable,
        BrokerIdentityError, ProtocolError: as for bind_privileged.
    """
    return _request(raw_call(family, proto, interface), socket, timeout)


def _request(call: SocketCall, socket_name: str | None, timeout: float | None) -> _socket.socket:
    client = _shared_client(socket_name)
    return client._new_socket(
        call, client.timeout if timeout is None else calls.check_timeout(timeout)
    )


# ------------------------------------------------------- devices and configuration


def open_tun(
    name: str = "tun%d",
    *,
    tap: bool = False,
    mtu: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> TunDevice:
    """A new tun (or tap) device, created by the broker and leased to this process.

    The device is new (never one that exists), carries packets without a
    protocol header (IFF_NO_PI), and is the caller's to read and write until
    the shared client's connection ends (at the latest, when the process
    exits): then the broker deletes it, with the addresses and routes it set
    for it. The kernel does not let the holder configure it: that is
    add_address, set_link and add_route, through the broker.

    Args:
        name: the device's name, or a pattern with one "%d" the kernel fills
            in ("vpn%d" -> "vpn0"); 1-15 printable ASCII characters. The
            policy's `sockets` must grant "tun:NAME" (a tap: "tap:NAME").
        tap: a tap device (Ethernet frames) instead of tun (IP packets).
        mtu: the device's MTU, 68-65535, within the rule's `mtu` range;
            None keeps the kernel's default (1500).
        socket: the broker's socket name (default PRIVBROKER_SOCKET, else
            "privbroker").
        timeout: seconds for this call; None means the client's default.

    Returns:
        The device, owned by the caller: `.name`, `.ifindex`, `.read()`,
        `.write()`, `.close()`; a context manager.

    Raises:
        ValueError: an invalid name, mtu or tap (before any I/O).
        PolicyDenied: the policy does not allow it (the name, the MTU, or the
            uid's max_devices), with the reason and the rule.
        OSError: the kernel's error as its subclass, with the name as
            `filename` (EBUSY: a device of that name exists).
        BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
            as for open_privileged.
    """
    call = tun_call(name, tap, mtu)
    client, timeout = _client(socket, timeout)
    return open_device(client, call, timeout)


def add_address(
    ifname: str, address: Interface, *, socket: str | None = None, timeout: float | None = None
) -> None:
    """Add an IPv4 or IPv6 address to a device (`ip addr add ADDRESS dev IFNAME`).

    Returns once the kernel has acknowledged it. An IPv6 address on a device
    this process leases skips duplicate address detection (usable at once).

    Args:
        ifname: a device this process leases (open_tun), or one the rule's
            `interfaces` names.
        address: the address with its prefix length, "10.8.0.2/24" or
            "fd00:8::2/64" (no prefix: /32 or /128), or an ipaddress
            IPv4Interface/IPv6Interface; its network must fall within the
            rule's `addresses` (or `routes`).
        socket, timeout: as for open_tun.

    Raises:
        ValueError: an invalid device name or address (before any I/O).
        PolicyDenied: the policy does not allow it (reason and rule).
        OSError: the kernel's error as its subclass, with the device as
            `filename` and the kernel's message as `ip` prints it
            (FileExistsError: the address is already there).
        BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
            as for open_privileged.
    """
    _configure(address_call("add_address", ifname, address), socket, timeout)


def del_address(
    ifname: str, address: Interface, *, socket: str | None = None, timeout: float | None = None
) -> None:
    """Remove an address from a device (`ip addr del ADDRESS dev IFNAME`).

    Arguments and exceptions as for add_address (EADDRNOTAVAIL: no such
    address on the device).
    """
    _configure(address_call("del_address", ifname, address), socket, timeout)


def set_link(
    ifname: str,
    *,
    up: bool | None = None,
    mtu: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """Set a device up or down and/or its MTU (`ip link set IFNAME up mtu N`).

    Args:
        ifname: as for add_address.
        up: True (up), False (down), None (unchanged).
        mtu: 68-65535, within the rule's `mtu` range; None (unchanged).
        socket, timeout: as for open_tun.

    Raises:
        ValueError: an invalid name or mtu, or neither up nor mtu given (no I/O).
        PolicyDenied, OSError, BrokerError, BrokerUnavailable,
        BrokerIdentityError, ProtocolError: as for add_address.
    """
    _configure(link_call(ifname, up, mtu), socket, timeout)


def add_route(
    dst: Network,
    *,
    dev: str | None = None,
    via: Gateway | None = None,
    metric: int | None = None,
    table: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """Add a unicast route (`ip route add DST dev DEV via VIA metric M table T`).

    Returns once the kernel has acknowledged it. A route through a device
    needs the device up (set_link(up=True)) and, with `via`, a gateway the
    device reaches.

    Args:
        dst: the destination network, "10.9.0.0/16", "fd00:9::/64" (no host
            bits set), or an ipaddress network; within the rule's `routes`.
        dev: the device; the broker requires one (a device this process
            leases, or one the rule's `interfaces` names).
        via: a gateway of dst's IP version, "10.8.0.1", or None.
        metric: the route's priority, 0-4294967295; None for the kernel's.
        table: a routing table, 1-4294967295 but 255 (local); None for main.
        socket, timeout: as for open_tun.

    Raises:
        ValueError: an invalid network (host bits set), device, gateway,
            metric or table, or neither dev nor via (before any I/O).
        PolicyDenied: the policy does not allow it (reason and rule).
        OSError: the kernel's error as its subclass, with the destination as
            `filename` (FileExistsError: the route exists; ENETUNREACH: the
            gateway is not reachable).
        BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
            as for open_privileged.
    """
    _configure(route_call("add_route", dst, dev, via, metric, table), socket, timeout)


def del_route(
    dst: Network,
    *,
    dev: str | None = None,
    via: Gateway | None = None,
    metric: int | None = None,
    table: int | None = None,
    socket: str | None = None,
    timeout: float | None = None,
) -> None:
    """Delete a route (`ip route del ...`): arguments and exceptions as for add_route
    (ESRCH, ProcessLookupError: no such route)."""
    _configure(route_call("del_route", dst, dev, via, metric, table), socket, timeout)


def _client(socket_name: str | None, timeout: float | None) -> tuple[Client, float | None]:
    timeout = calls.check_timeout(timeout)
    client = _shared_client(socket_name)
    return client, client.timeout if timeout is None else timeout


def _configure(call: NetconfCall, socket_name: str | None, timeout: float | None) -> None:
    client, timeout = _client(socket_name, timeout)
    configure(client, call, timeout)
