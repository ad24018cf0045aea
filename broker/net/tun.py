"""Create tun and tap devices as root: the only code that opens /dev/net/tun.

`create` opens /dev/net/tun (O_CLOEXEC, invariant 3's rule for every fd the
broker makes) and asks TUNSETIFF for a NEW device: IFF_TUN_EXCL makes the
kernel refuse (EBUSY) rather than attach to a device of that name that already
exists, so the broker never hands a client someone else's persistent device,
nor later deletes it as if it were the client's lease. The flags are fixed
here: IFF_NO_PI (packets without the 4-byte protocol header) and never
IFF_VNET_HDR (the offload header lets a writer describe GSO work the kernel
must trust). The device is not persistent: it goes away when the last fd
closes, and the lease deletes it with RTM_DELLINK anyway (invariant 12),
whatever the holder did to its fd.

Owner and group (TUNSETOWNER, TUNSETGROUP) are deliberately left unset. They
only decide who may attach to the device later by name; the client needs none
of that, since it reads and writes through the fd it is given. Leaving them
unset means only CAP_NET_ADMIN can attach, so a client cannot keep a device
outside its lease by re-attaching. (It can set them on its own fd without a
capability, as it can TUNSETPERSIST; that is why the lease ends by deletion.)

The name may be a kernel pattern with one "%d" ("vpn%d"); the kernel picks the
number and the actual name is read back from the ifreq it returns.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import NamedTuple

from .fields import IFNAMSIZ

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_TUN_EXCL = 0x8000  # create, never attach to an existing device
_IFREQ = struct.Struct("=16sH22x")  # struct ifreq: ifr_name, ifr_flags, union padding (40 bytes)


class Created(NamedTuple):
    fd: int  # the caller owns it: hand it over, then close the broker's copy
    name: str
    ifindex: int


def check_pattern(name: object) -> str:
    """A name for a new device: what dev_valid_name accepts, with at most one "%d".

    Raises:
        ValueError: not 1..15 printable ASCII characters; '/', ':' or whitespace;
            '.' or '..'; a '%' that is not the one "%d".
    """
    if type(name) is not str or name in ("", ".", "..") or len(name) >= IFNAMSIZ:
        raise ValueError(f"invalid device name {name!r}")
    if not name.isascii() or not name.isprintable() or any(c in name for c in "/: \t"):
        raise ValueError(f"invalid device name {name!r}")
    # The kernel allows exactly one "%d" and no other '%' (dev_prep_valid_name).
    if name.count("%") > name.count("%d") or name.count("%d") > 1:
        raise ValueError(f"device name {name!r}: at most one %d and no other %")
    return name


def create(name: str, *, tap: bool = False) -> Created:
    """Create a new tun (or tap) device and return its attached fd, actual name and index.

    Raises:
        ValueError: an invalid name (see check_pattern).
        OSError: from the kernel: EBUSY if a device of that name exists, EPERM without
            CAP_NET_ADMIN, ENFILE if a pattern has no free number.
    """
    check_pattern(name)
    flags = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | IFF_TUN_EXCL
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode("ascii"), flags))
        actual = ifreq[:IFNAMSIZ].split(b"\0", 1)[0].decode("ascii")
        # By name, right after creation: only CAP_NET_ADMIN could have renamed it since.
        ifindex = socket.if_nametoindex(actual)
    except BaseException:
        os.close(fd)
        raise
    return Created(fd, actual, ifindex)
