"""The only code that creates sockets as root: one checked SocketTarget in, one fd out.

`create_socket` makes the socket with the client's filesystem uid and gid
(setfsuid/setfsgid around socket(), which change this thread only), so the
kernel records the client as the socket's owner, as `ss -e` shows; then, as
root again, it sets the options the request names, binds, and for TCP
listens. The kernel checks privilege once, at creation (raw, ICMP) or at
bind (ports below net.ipv4.ip_unprivileged_port_start), and never again, so
the fd can be handed over as it is. Last, getsockopt checks that the kernel
made what was asked (defence in depth: a wrong table entry here would
otherwise hand over a socket nobody judged).

Invariants (docs/security.md):
- 11: TCP is handed over listening (SO_ACCEPTCONN checked), never merely
  bound: a bound socket could connect() out from the privileged port. Only
  the requested family, protocol, address, port and device. The options set
  are IPV6_V6ONLY (only when asked), SO_BINDTODEVICE, SO_REUSEPORT,
  SO_REUSEADDR on TCP (a listener may rebind past TIME_WAIT), and for
  ICMP IP_RECVERR and path MTU discovery "want": never SO_MARK,
  IP_TRANSPARENT, SO_PRIORITY or IP_HDRINCL, and never IPPROTO_RAW (it
  implies IP_HDRINCL). CLOEXEC, and owned by the client's uid.
- 5: until it is returned the fd is this module's; every error path closes it.
- 13: `needed_capabilities` names the capabilities a policy's socket rules
  need, so the broker can drop the others.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from privbroker.protocol.targets import IFNAMSIZ, REFUSED_PROTOCOLS, SocketTarget, check_ifname

from ..libc import IdsLost, libc
from ..policy.sockets import SocketSpec

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
# linux/in.h and linux/in6.h: Python 3.11's socket module lacks these.
IP_MTU_DISCOVER = 10
IP_RECVERR = 11
IP_PMTUDISC_WANT = 1  # DF where the route's MTU allows; fragment locally past a smaller one
IPV6_MTU_DISCOVER = 23
IPV6_RECVERR = 25
IPV6_PMTUDISC_WANT = 1
IPV6_HDRINCL = 36
# Asked of listen() when the client names no backlog: the kernel caps it at
# net.core.somaxconn, so this is "as many as the system allows", as Go does.
DEFAULT_BACKLOG = 65535
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: setfsuid/setfsgid change nothing, return the current value
_MAX_ID = 2**32 - 2
_PROC = "/proc/sys/net"

_libc = libc
for _call in (_libc.setfsuid, _libc.setfsgid):
    _call.argtypes = [ctypes.c_uint]
    _call.restype = ctypes.c_int

# What socket() takes for each request kind: (type, protocol).
_TYPES: dict[str, Callable[[SocketTarget], tuple[int, int]]] = {
    "tcp": lambda r: (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "udp": lambda r: (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
    "icmp": lambda r: (
        socket.SOCK_DGRAM,
        socket.IPPROTO_ICMP if r.family == socket.AF_INET else socket.IPPROTO_ICMPV6,
    ),
    "raw": lambda r: (socket.SOCK_RAW, r.protocol),
}


def _set_fs_id(call: Callable[[int], int], value: int) -> int:
    """Set the fsuid or fsgid; return the previous one. Raises PermissionError if refused."""
    # The call never reports failure except by leaving the value unchanged,
    # so ask again with -1 (no change) to learn what it now is.
    previous = call(value)
    if call(_NO_ID) != value:
        raise PermissionError(errno.EPERM, f"cannot set the filesystem id to {value}")
    return previous


def _restore(call: Callable[[int], int], value: int) -> None:
    """Set this thread's fsuid or fsgid back to `value`, or raise IdsLost."""
    call(value)
    if call(_NO_ID) != value:
        raise IdsLost(f"this thread's filesystem id could not be set back to {value}")


@contextmanager
def _owned_by(uid: int, gid: int) -> Iterator[None]:
    """Within the block, what this thread creates belongs to uid:gid.

    Raises:
        PermissionError: the ids could not be set (nothing changed).
        IdsLost: they could not be set back (the broker must stop).
    """
    old_gid = _set_fs_id(_libc.setfsgid, gid)
    try:
        old_uid = _set_fs_id(_libc.setfsuid, uid)
        try:
            yield
        finally:
            _restore(_libc.setfsuid, old_uid)
    finally:
        _restore(_libc.setfsgid, old_gid)


def create_socket(
    req: SocketTarget,
    *,
    uid: int,
    gid: int,
    backlog: int | None = None,
    v6only: bool | None = None,
    interface: str | None = None,
    reuse_port: bool = False,
) -> int:
    """Create the socket `req` names, owned by uid:gid; TCP listening, UDP bound.

    Args:
        req: a request the policy allowed (it is already in canonical form).
        uid, gid: the client's; the socket's owner.
        backlog: TCP only; None asks for net.core.somaxconn.
        v6only: IPv6 TCP/UDP only; None leaves the kernel's default (dual-stack).
        interface: the device to bind to (SO_BINDTODEVICE), when the rule forces
            one; it must agree with `req.interface` when both are given.
        reuse_port: TCP/UDP only: SO_REUSEPORT.

    Returns:
        A CLOEXEC fd that the caller owns.

    Raises:
        ValueError: an option that does not apply to this kind, or tun/tap.
        OSError: the kernel's error (EADDRINUSE, EADDRNOTAVAIL, ENODEV, EACCES,
            ...), or EPROTO when the socket made is not the one asked for.
    """
    if req.kind not in _TYPES:
        raise ValueError(f"{req.kind} is not a socket: tun and tap devices are made elsewhere")
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise ValueError(f"uid {uid} or gid {gid} is outside 0..{_MAX_ID}")
    _check_options(req, backlog, v6only, reuse_port)
    device = _device(req, interface)
    stype, proto = _TYPES[req.kind](req)
    if stype == socket.SOCK_RAW and proto in REFUSED_PROTOCOLS:
        raise ValueError(REFUSED_PROTOCOLS[proto])  # SocketTarget refuses it too
    scope_id = _scope_id(req)
    with _owned_by(uid, gid):
        sock = socket.socket(req.family, stype | socket.SOCK_CLOEXEC, proto)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if req.kind == "tcp":
            # A restarted server binds again while its old connections sit in
            # TIME_WAIT. On Linux it never lets a second socket listen there.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if req.kind == "icmp":
            v4 = req.family == socket.AF_INET
            level = socket.IPPROTO_IP if v4 else socket.IPPROTO_IPV6
            sock.setsockopt(level, IP_RECVERR if v4 else IPV6_RECVERR, 1)
            sock.setsockopt(
                level,
                IP_MTU_DISCOVER if v4 else IPV6_MTU_DISCOVER,
                IP_PMTUDISC_WANT if v4 else IPV6_PMTUDISC_WANT,
            )
        if req.kind in ("tcp", "udp"):
            v6 = req.family == socket.AF_INET6
            # A link-local address needs its scope id: only the 4-tuple carries it.
            sock.bind((req.address, req.port, 0, scope_id) if v6 else (req.address, req.port))
        if req.kind == "tcp":
            sock.listen(DEFAULT_BACKLOG if backlog is None else backlog)
        _verify(sock, req, stype, proto, device, scope_id)
        return sock.detach()
    except BaseException:
        sock.close()
        raise


def _check_options(
    req: SocketTarget, backlog: int | None, v6only: bool | None, reuse_port: bool
) -> None:
    if backlog is not None and (req.kind != "tcp" or not 0 <= backlog <= DEFAULT_BACKLOG):
        raise ValueError(f"backlog {backlog}: only TCP takes one, 0-{DEFAULT_BACKLOG}")
    bound = req.kind in ("tcp", "udp")
    if v6only is not None and not (bound and req.family == socket.AF_INET6):
        raise ValueError("v6only applies to IPv6 TCP and UDP sockets only")
    if reuse_port and not bound:
        raise ValueError("reuse_port applies to TCP and UDP sockets only")


def _device(req: SocketTarget, interface: str | None) -> str:
    if interface is None:
        return req.interface
    if req.interface and interface != req.interface:
        raise ValueError(f"interface {interface} disagrees with the request's {req.interface}")
    return check_ifname(interface, "interface")


def _scope_id(req: SocketTarget) -> int:
    if req.scope_id or not req.zone:
        return req.scope_id
    try:
        return socket.if_nametoindex(req.zone)
    except OSError:
        raise OSError(errno.ENODEV, f"no device named {req.zone}") from None


def _verify(
    sock: socket.socket, req: SocketTarget, stype: int, proto: int, device: str, scope_id: int
) -> None:
    """Raise OSError(EPROTO) unless the kernel made the socket that was asked for."""
    opt = sock.getsockopt
    made = [
        opt(socket.SOL_SOCKET, o) for o in (socket.SO_DOMAIN, socket.SO_TYPE, socket.SO_PROTOCOL)
    ]
    wrong = [] if made == [req.family, stype, proto] else [f"domain/type/protocol {made}"]
    if req.kind == "tcp" and not opt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        wrong.append("not listening")
    if stype == socket.SOCK_RAW:
        v4 = req.family == socket.AF_INET
        if opt(
            socket.IPPROTO_IP if v4 else socket.IPPROTO_IPV6,
            socket.IP_HDRINCL if v4 else IPV6_HDRINCL,
        ):
            wrong.append("IP_HDRINCL set")
    # Binding a link-local address binds the socket to its scope's device too.
    device = device or (socket.if_indextoname(scope_id) if scope_id else "")
    bound = opt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, IFNAMSIZ).rstrip(b"\0").decode()
    if bound != device:
        wrong.append(f"bound to device {bound!r}")
    if req.kind in ("tcp", "udp"):
        host, port = sock.getsockname()[:2]
        # inet_ntop and ipaddress spell some IPv6 addresses differently (::ffff:a.b.c.d).
        if (ipaddress.ip_address(host.partition("%")[0]), port) != (
            ipaddress.ip_address(req.address),
            req.port,
        ):
            wrong.append(f"bound to {host} port {port}")
    if wrong:
        raise OSError(
            errno.EPROTO, f"the kernel made another socket than asked: {', '.join(wrong)}"
        )


def _read_sysctl(name: str) -> list[int]:
    with open(f"{_PROC}/{name}", encoding="ascii") as f:
        return [int(word) for word in f.read().split()]


def unprivileged_port_start() -> int:
    """net.ipv4.ip_unprivileged_port_start of this thread's network namespace."""
    return _read_sysctl("ipv4/ip_unprivileged_port_start")[0]


def ping_range_allows_root() -> bool:
    """True when gid 0 is in net.ipv4.ping_group_range, so the broker can create ICMP sockets.

    The kernel checks the creator's egid (not its fsgid) at socket(); the
    default range "1 0" is empty, root included. The range is per network
    namespace.
    """
    low, high = _read_sysctl("ipv4/ping_group_range")
    return low <= 0 <= high


def needed_capabilities(
    specs: Iterable[SocketSpec], *, network: bool = False, port_start: int | None = None
) -> set[int]:
    """The capabilities the broker must keep to serve these `sockets` entries.

    CAP_NET_BIND_SERVICE for a tcp/udp range reaching below `port_start`
    (default: this namespace's ip_unprivileged_port_start), CAP_NET_RAW for
    raw, CAP_NET_ADMIN for tun/tap and when `network` operations are granted.
    ICMP needs none, only gid 0 in ping_group_range (ping_range_allows_root);
    SO_BINDTODEVICE needs none when set once, on a fresh socket.
    """
    start = unprivileged_port_start() if port_start is None else port_start
    caps = {CAP_NET_ADMIN} if network else set()
    for spec in specs:
        if spec.kind in ("tcp", "udp") and spec.low < start:
            caps.add(CAP_NET_BIND_SERVICE)
        elif spec.kind == "raw":
            caps.add(CAP_NET_RAW)
        elif spec.kind in ("tun", "tap"):
            caps.add(CAP_NET_ADMIN)
    return caps
