"""The socket error queue, client side: ICMP errors and path MTU for sockets a client holds.

With IP_RECVERR (IPV6_RECVERR) on, the kernel keeps every error a datagram socket meets,
such as an ICMP "port unreachable", "fragmentation needed" or "packet too big", or a local
EMSGSIZE, on the socket's error queue rather than only in a one-shot `SO_ERROR`. Each entry
is read with `recvmsg(MSG_ERRQUEUE)`: the data is the start of the payload that failed, and
one control message carries `struct sock_extended_err` followed by the sockaddr of the host
that sent the error (the "offender"). `parse_extended_err` turns those control bytes into a
`SocketError` and is pure (no I/O), so it is fuzzed on its own; `read_errors` drains the
queue. Invariants: reading never blocks, whatever the socket's timeout (the queue is read
through a non-blocking view of the same fd, so the file's flags are never changed); an empty
queue is `[]`, not an error; and an entry whose control data the kernel had to truncate is
reported (ENOBUFS), never silently dropped. No broker is involved: these calls work on any
socket, whether the broker handed it over or the client made it.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Origin",
    "SocketError",
    "enable_recverr",
    "parse_extended_err",
    "path_mtu",
    "read_errors",
    "set_pmtu_discover",
]

# Option numbers from linux/in.h and linux/in6.h; the socket module lacks most of them.
SOL_IP = 0
SOL_IPV6 = 41
IP_MTU_DISCOVER = 10
IP_RECVERR = 11
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
IPV6_RECVERR = 25
# IP_PMTUDISC_* and IPV6_PMTUDISC_* share these values.
PMTUDISC = {"dont": 0, "want": 1, "do": 2, "probe": 3}

# struct sock_extended_err, in host byte order: errno, origin, type, code, pad, info, data.
_EE = struct.Struct("=IBBBBII")
# struct sockaddr_in is 16 bytes and sockaddr_in6 28: the kernel appends the one of its level.
_SOCKADDR_SIZE = {SOL_IP: 16, SOL_IPV6: 28}
_RECVERR_TYPE = {SOL_IP: IP_RECVERR, SOL_IPV6: IPV6_RECVERR}
_FAMILY = {SOL_IP: socket.AF_INET, SOL_IPV6: socket.AF_INET6}

# A datagram's payload is at most 65535 bytes; the kernel returns at most that much of it.
MAX_PAYLOAD = 65535
# Room for the error (16 + 28 bytes) and for what else a socket may have asked the kernel to
# attach (timestamps, packet info); truncation beyond that is detected through MSG_CTRUNC.
ANCILLARY_SIZE = 512


class Origin(enum.IntEnum):
    """Who reported the error (SO_EE_ORIGIN_* in linux/errqueue.h)."""

    NONE = 0
    LOCAL = 1
    ICMP = 2
    ICMP6 = 3
    TXSTATUS = 4  # also SO_EE_ORIGIN_TIMESTAMPING
    ZEROCOPY = 5
    TXTIME = 6

    @classmethod
    def _missing_(cls, value: object) -> Origin | None:
        # A newer kernel may report an origin this module does not know: keep its number
        # rather than fail the whole read.
        if not isinstance(value, int) or not 0 <= value <= 255:
            return None
        member = int.__new__(cls, value)
        member._name_ = f"ORIGIN_{value}"
        member._value_ = value
        return member


@dataclass(frozen=True)
class SocketError:
    """One entry of a socket's error queue.

    `type` and `code` are the ICMP (ICMPv6) type and code when `origin` is ICMP (ICMP6);
    `info` is the path MTU for "fragmentation needed" and "packet too big" (and for a local
    EMSGSIZE); `offender` is the address of the host that sent the error, or None when the
    kernel names none (local errors); `payload` is the start of the datagram that failed.
    """

    errno: int
    origin: Origin
    type: int
    code: int
    info: int
    data: int
    offender: str | None
    payload: bytes = b""

    def __str__(self) -> str:
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        where = f" from {self.offender}" if self.offender is not None else ""
        return (
            f"{name} ({os.strerror(self.errno)}){where}: origin {self.origin.name}, "
            f"type {self.type} code {self.code}, info {self.info}, "
            f"{len(self.payload)}-byte payload"
        )


def parse_extended_err(level: int, type: int, data: bytes, payload: bytes = b"") -> SocketError:
    """Parse one IP_RECVERR or IPV6_RECVERR control message.

    Args:
        level: the control message's level, SOL_IP or SOL_IPV6.
        type: its type, IP_RECVERR or IPV6_RECVERR.
        data: its data: `struct sock_extended_err` then the offender's sockaddr.
        payload: the data recvmsg returned with it, kept as the error's payload.

    Returns:
        The error, with the offender's address as text (None for AF_UNSPEC).

    Raises:
        ValueError: the level and type are not an error message's, the data is shorter than
            the structure and sockaddr of that level, or the offender's family is neither
            AF_UNSPEC nor that of the level.
    """
    if _RECVERR_TYPE.get(level) != type:
        raise ValueError(f"not an error-queue control message: level {level}, type {type}")
    need = _EE.size + _SOCKADDR_SIZE[level]
    if len(data) < need:
        raise ValueError(f"error control message of {len(data)} bytes, need {need}")
    ee_errno, origin, ee_type, code, _pad, info, ee_data = _EE.unpack_from(data)
    return SocketError(
        errno=ee_errno,
        origin=Origin(origin),
        type=ee_type,
        code=code,
        info=info,
        data=ee_data,
        offender=_offender(level, data[_EE.size : need]),
        payload=bytes(payload),
    )


def _offender(level: int, sockaddr: bytes) -> str | None:
    (family,) = struct.unpack_from("=H", sockaddr)
    if family == socket.AF_UNSPEC:
        return None
    if family != _FAMILY[level]:
        raise ValueError(f"offender of family {family} in a level {level} error")
    if level == SOL_IP:
        return str(ipaddress.IPv4Address(sockaddr[4:8]))
    # A dual-stack socket gets IPv4 offenders as v4-mapped addresses: kept as the kernel
    # gives them, so they compare equal to the mapped peer the socket is connected to.
    address = str(ipaddress.IPv6Address(sockaddr[8:24]))
    (scope,) = struct.unpack_from("=I", sockaddr, 24)
    return f"{address}%{scope}" if scope else address


def read_errors(sock: socket.socket) -> list[SocketError]:
    """Drain the socket's error queue, oldest error first.

    Args:
        sock: an IPv4 or IPv6 socket, normally with `enable_recverr` on (without it the
            kernel queues local and timestamping entries only).

    Returns:
        The errors read, possibly none; never blocks.

    Raises:
        OSError: recvmsg failed (other than with an empty queue), or ENOBUFS when the kernel
            truncated an entry's control data so that its error could not be read (the entry
            is gone from the queue; the rest stay for the next call).
        ValueError: an entry came without a well-formed error control message.
    """
    # A socket with a timeout would have recvmsg wait for readability first; a view of the
    # same fd with SOCK_NONBLOCK in its type has timeout 0 and leaves the fd's flags alone.
    view = socket.socket(sock.family, sock.type | socket.SOCK_NONBLOCK, sock.proto, sock.fileno())
    try:
        errors: list[SocketError] = []
        while True:
            try:
                payload, ancdata, flags, _ = view.recvmsg(
                    MAX_PAYLOAD, ANCILLARY_SIZE, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return errors
            errors.append(_entry(payload, ancdata, flags))
    finally:
        view.detach()


def _entry(payload: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> SocketError:
    for level, type, data in ancdata:
        if _RECVERR_TYPE.get(level) == type:
            # A truncated message may still hold the error whole: then it is kept.
            if flags & socket.MSG_CTRUNC and len(data) < _EE.size + _SOCKADDR_SIZE[level]:
                break
            return parse_extended_err(level, type, data, payload)
    if flags & socket.MSG_CTRUNC:
        raise OSError(errno_mod.ENOBUFS, "error queue entry lost: control data truncated")
    raise ValueError("error queue entry without an IP_RECVERR or IPV6_RECVERR message")


def _level(sock: socket.socket) -> int:
    if sock.family == socket.AF_INET:
        return SOL_IP
    if sock.family == socket.AF_INET6:
        return SOL_IPV6
    raise OSError(errno_mod.EAFNOSUPPORT, f"not an IP socket: {sock.family!r}")


def path_mtu(sock: socket.socket) -> int:
    """The path MTU the kernel knows towards a connected socket's peer (IP_MTU, IPV6_MTU).

    Args:
        sock: a connected IPv4 or IPv6 socket.

    Returns:
        The MTU in bytes, IP header included.

    Raises:
        OSError: ENOTCONN if the socket is not connected; EAFNOSUPPORT if it is not an IP
            socket.
    """
    level = _level(sock)
    return sock.getsockopt(level, IP_MTU if level == SOL_IP else IPV6_MTU)


def set_pmtu_discover(
    sock: socket.socket, mode: Literal["do", "want", "probe", "dont"] = "do"
) -> None:
    """Set path MTU discovery on the socket (IP_MTU_DISCOVER, IPV6_MTU_DISCOVER).

    Args:
        sock: an IPv4 or IPv6 socket.
        mode: "do" sets DF and refuses (EMSGSIZE) a datagram above the known path MTU;
            "want" sets DF but fragments locally above it; "probe" sets DF and ignores the
            known path MTU (for probing); "dont" never sets DF.

    Raises:
        ValueError: an unknown mode.
        OSError: the kernel refused the option; EAFNOSUPPORT if not an IP socket.
    """
    if mode not in PMTUDISC:
        raise ValueError(f"unknown path MTU discovery mode {mode!r}")
    level = _level(sock)
    sock.setsockopt(
        level, IP_MTU_DISCOVER if level == SOL_IP else IPV6_MTU_DISCOVER, PMTUDISC[mode]
    )


def enable_recverr(sock: socket.socket) -> None:
    """Have the kernel queue the socket's errors for `read_errors` (IP_RECVERR, IPV6_RECVERR).

    Args:
        sock: an IPv4 or IPv6 socket.

    Raises:
        OSError: the kernel refused the option; EAFNOSUPPORT if not an IP socket.
    """
    level = _level(sock)
    sock.setsockopt(level, _RECVERR_TYPE[level], 1)
