"""What the native fast path may make again of a socket the broker made: the
table entry for broker/net/_fastsock.c.

After the Python broker has allowed a SOCKET request and made its socket
(service.py), the same request from the same client under the same policy
gets the same answer: decide_socket() is a pure function of (policy, client,
target), and the target is a pure function of the request's text. So
service.py records, in the client's fast table (core/dispatch.py, dropped on
every reload), an entry keyed by the request exactly as it came on the wire:
(target text, backlog, v6only, reuse_port). From then on _fastsock.c answers
that request in C: it creates the socket as net/sockets.py does, checks it
the same way, and sends it; the Python broker audits it with the record it
would have written (`Fast.info`).

Only the plainest requests qualify (`entry` returns None for the rest, which
stay in Python): TCP or UDP on a numeric address with no zone or scope id
(a zone names a device by index or name, which the kernel may give to another
device meanwhile), and not link-local or multicast (the kernel scopes them to
a device, which _fastsock.c does not check). A device to bind to (`@eth0`) is
fine: it is a name, the one the rule matched, and SO_BINDTODEVICE takes it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

from privbroker import protocol as proto
from privbroker.protocol.codec import encode_result
from privbroker.protocol.targets import SocketTarget

from .sockets import DEFAULT_BACKLOG

# What _fastsock.c reads from an entry, in this order (read_entry there).
Entry = tuple[int, int, int, bytes, int, bytes, int, int, int, int, bytes, "Fast"]
Key = tuple[str, int, bool | None, bool]

_MADE = {
    "tcp": (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "udp": (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
}


class Fast(NamedTuple):
    """An entry's audit information: the request, its target and its result
    as the Python broker answered them, for the record of each fast answer."""

    request: proto.SocketRequest
    target: SocketTarget
    result: proto.Result


def key(req: proto.SocketRequest) -> Key:
    """The request as _fastsock.c reads it from the wire."""
    return (req.target, req.backlog, req.v6only, req.reuse_port)


def entry(req: proto.SocketRequest, target: SocketTarget, result: proto.Result) -> Entry | None:
    """The fast table's entry for an allowed request whose socket was made, or None."""
    if target.kind not in _MADE or target.zone or target.scope_id or result.errno:
        return None
    ip = ipaddress.ip_address(target.address)
    if ip.is_link_local or ip.is_multicast:  # the kernel gives them a scope: Python's to check
        return None
    stype, protocol = _MADE[target.kind]
    tcp = target.kind == "tcp"
    return (  # plain ints, as _fastsock.c takes them (not IntEnum members)
        int(target.family),
        int(stype),
        int(protocol),
        socket.inet_pton(target.family, target.address),
        target.port,
        target.interface.encode(),
        (req.backlog or DEFAULT_BACKLOG) if tcp else -1,
        -1 if req.v6only is None else int(req.v6only),
        int(req.reuse_port),
        int(tcp),  # SO_REUSEADDR on TCP, as sockets.create_socket sets it
        encode_result(result),
        Fast(req, target, result),
    )
