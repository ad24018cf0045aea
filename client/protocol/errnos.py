"""Every errno a broker sends, and why: the one table docs/protocol.md and the README render."""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from types import MappingProxyType

# The errno values a broker sends, and why. README.md renders this table.
ERRNO_CAUSES: Mapping[int, str] = MappingProxyType(
    {
        _errno.EACCES: "denied by the policy (denied=true, with the reason and the rule): "
        "no rule grants it, a deny rule, a file on procfs, a hard-linked file, or "
        "credentials that differ from the connection's; with denied=false, the kernel",
        _errno.EPERM: "explain or status from a client that is not root (an ERROR reply); "
        "or the kernel refused (an immutable file)",
        _errno.EINVAL: "the item cannot be acted on: a path not absolute or not normalised, "
        "no access word, exclusive without create, truncate without write",
        _errno.ENOENT: "the path or a directory on it is missing (past a followed symlink, "
        "any failure is EACCES instead)",
        _errno.ENOTDIR: "a component of the path is not a directory",
        _errno.ELOOP: "a symlink on the path and the rule does not follow symlinks; a magic "
        "link (/proc/*/fd, /dev/fd); a symlink planted at the name to create",
        _errno.EISDIR: "a directory asked for with write, append, create or truncate",
        _errno.EEXIST: "exclusive create, and the name exists",
        _errno.EAGAIN: "the path kept changing while it was resolved (a rename race), the "
        "file is under a lease, or the uid has too many slow opens in flight; try again",
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
        _errno.EOPNOTSUPP: "an operation this broker does not know (an ERROR reply, from a "
        "newer client most likely); the connection stays usable",
        _errno.EPROTO: "a request in another protocol version (an ERROR reply, then the "
        "broker closes the connection)",
    }
)
