"""Every errno a broker sends, and why: the one table docs/protocol.md and the README render."""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from types import MappingProxyType

# The errno values a broker sends, and why. README.md renders this table.
ERRNO_CAUSES: Mapping[int, str] = MappingProxyType(
    {
        _errno.EACCES: "denied by the policy (denied=true, with the reason and the rule): "
        "no rule grants it, a deny rule, a file on procfs, a hard-linked file, "
        "credentials that differ from the connection's, max_devices reached or an MTU "
        "outside the rule's range; with denied=false, the kernel (for ICMP: gid 0 not in "
        "ping_group_range)",
        _errno.EPERM: "explain or status from a client that is not root (an ERROR reply); "
        "or the kernel refused (an immutable file)",
        _errno.EINVAL: "the item cannot be acted on: a path not absolute or not normalised, "
        "no access word, exclusive without create, truncate without write; a malformed "
        "socket target or network field; or the kernel refused a value (an MTU above the "
        "device's maximum), with its message",
        _errno.ENOENT: "the path or a directory on it is missing (past a followed symlink, "
        "any failure is EACCES instead)",
        _errno.ENOTDIR: "a component of the path is not a directory",
        _errno.ELOOP: "a symlink on the path and the rule does not follow symlinks; a magic "
        "link (/proc/*/fd, /dev/fd); a symlink planted at the name to create",
        _errno.EISDIR: "a directory asked for with write, append, create or truncate",
        _errno.EEXIST: "exclusive create, and the name exists; or (network) the address or "
        "route to add exists already",
        _errno.EAGAIN: "the path kept changing while it was resolved (a rename race), the "
        "file is under a lease, the uid has too many slow opens in flight, or (network) "
        "8 requests are already at the kernel for this connection; try again",
        _errno.ENXIO: "a FIFO opened for writing has no reader, a socket (connect to it "
        "instead), or a device that is absent",
        _errno.ETIMEDOUT: "the open took longer than the broker's --open-timeout (a stalled "
        "filesystem or device)",
        _errno.ENAMETOOLONG: "a path component is longer than the filesystem allows",
        _errno.EROFS: "write access to a file on a read-only filesystem",
        _errno.ETXTBSY: "write access to a running executable",
        _errno.ENOSPC: "no room to create the file",
        _errno.EMFILE: "the broker is out of file descriptors",
        _errno.EIO: "an internal error in the broker (logged); or the device or filesystem",
        _errno.EADDRINUSE: "(socket) the address and port are bound by another socket",
        _errno.EADDRNOTAVAIL: "(socket) the address to bind is not one of this host's; "
        "(network) the address to delete is not on the device",
        _errno.ENODEV: "(socket, network) no device of that name or index",
        _errno.EBUSY: "(tun) a device of that name exists already",
        _errno.ENFILE: "(tun) no free number for the name pattern",
        _errno.ENETDOWN: "(network) the route's device is down",
        _errno.ENETUNREACH: "(network) the route's gateway is not reachable",
        _errno.ESRCH: "(network) the route to delete does not exist",
        _errno.EHOSTUNREACH: "(network) an IPv6 route's gateway is not reachable",
        _errno.ENOBUFS: "(network) the broker's rtnetlink socket overran: the outcome of "
        "the change is unknown; look, then try again",
        _errno.EAFNOSUPPORT: "(socket) the kernel has that address family disabled",
        _errno.EOPNOTSUPP: "an operation this broker does not know (an ERROR reply, from a "
        "newer client most likely); the connection stays usable",
        _errno.EPROTO: "a request in another protocol version (an ERROR reply, then the "
        "broker closes the connection); or (socket) the kernel made another socket than "
        "the one asked for, and it was closed",
    }
)
