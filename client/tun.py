"""tun and tap devices leased from the broker: `TunDevice`, and what open_tun means.

The broker creates a new device (never attaching to an existing one), with
IFF_NO_PI (packets carry no 4-byte header) and never IFF_VNET_HDR, and hands
over the fd attached to it. The device is leased to the connection that asked
(docs/security.md, invariant 12): when that connection closes or the process
exits, the broker deletes it, whatever the holder did to it. So:

- Rule 1 (validation before I/O): `tun_call` raises ValueError for a name the
  kernel would not take (1-15 printable ASCII characters, at most one "%d",
  which the kernel fills in), an MTU outside 68-65535, a non-bool `tap`.
- Rule 2 (every fd has one owner, as trio's _FdHolder): `device_for` owns the
  fds it is given: they end up in the returned TunDevice or closed. What
  arrives must be /dev/net/tun (a character device, fstat), attached to a
  device of the kind asked for and of the name the reply gives (TUNGETIFF,
  which needs no capability); anything else is a ProtocolError. A TunDevice
  closes its fd once; a closed device's fd is -1.
- Rule 3 (the lease outlives no connection, and no device outlives its
  lease's owner): a TunDevice holds a reference to the client whose
  connection leases it, so that dropping the client while keeping the device
  does not end the lease under it.

No I/O here but on the received fd.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import unix
from .errors import ProtocolError
from .netconf import check_mtu, kernel_error
from .protocol import Reply, TunReply, TunRequest
from .protocol.limits import MAX_IFNAME_CHARS

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["TunCall", "TunDevice", "device_for", "tun_call"]

TUN_PATH = "/dev/net/tun"
TUN_RDEV = os.makedev(10, 200)  # the misc device /dev/net/tun (Documentation/admin-guide/devices)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int): the attached device's name and flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_IFREQ = struct.Struct("=16sH22x")  # struct ifreq: ifr_name, ifr_flags, union padding (40 bytes)
DEFAULT_READ = 65536  # more than any packet a device with MTU <= 65535 delivers


class TunDevice:
    """A tun (IP packets) or tap (Ethernet frames) device leased from the broker.

    One `read()` returns one packet, one `write()` sends one; the fd is in
    blocking mode (`os.set_blocking(dev.fileno(), False)` for an event loop).
    The device lives as long as the connection of the client that opened it:
    `close()` closes the fd; the broker deletes the device, with the
    addresses and routes set on it, when that connection closes (the
    client's close(), a call that timed out or failed mid-exchange) or the
    process exits. The device holds a reference to its client, so dropping
    the client alone does not end the lease under it.

    Attributes:
        name: the device's name, as the kernel gave it ("vpn0" for "vpn%d").
        ifindex: its interface index.
        tap: True for a tap device.
    """

    __slots__ = ("_fd", "_lease", "ifindex", "name", "tap")

    def __init__(self, fd: int, name: str, ifindex: int, tap: bool, lease: object = None) -> None:
        self._fd = fd
        self.name = name
        self.ifindex = ifindex
        self.tap = tap
        self._lease = lease  # the client whose connection holds the lease

    def fileno(self) -> int:
        """The device's fd, or -1 once closed (as socket.socket)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def read(self, size: int = DEFAULT_READ) -> bytes:
        """One packet (a tap: one frame), at most `size` bytes of it; waits for one.

        Raises:
            ValueError: the device is closed.
            OSError: from the kernel; EBADFD once the device was deleted.
        """
        return os.read(self._live(), size)

    def write(self, packet: ReadableBuffer) -> int:
        """Send one packet (a tap: one frame) as if it arrived on the device.

        Returns:
            The number of bytes written: the whole packet.

        Raises:
            ValueError: the device is closed.
            OSError: from the kernel (EINVAL for a malformed packet, EIO while
                the device is down, EBADFD once it was deleted).
        """
        return os.write(self._live(), packet)

    def close(self) -> None:
        """Close the fd (once; again does nothing). The lease ends with the connection."""
        fd, self._fd = self._fd, -1
        self._lease = None
        if fd >= 0:
            os.close(fd)

    def _live(self) -> int:
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed device {self.name}")
        return self._fd

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # As trio's _FdHolder: a device dropped unclosed still closes its fd.
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        kind = "tap" if self.tap else "tun"
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<TunDevice {kind} {self.name!r} ifindex={self.ifindex} {state}>"


@dataclass(frozen=True, slots=True)
class TunCall:
    """A checked open_tun call."""

    name: str
    tap: bool = False
    mtu: int = 0  # the wire's 0: the kernel's default (1500)

    def make(self, ident: int) -> TunRequest:
        return TunRequest(ident, self.name, self.tap, self.mtu)

    def matches(self, name: str) -> bool:
        """Whether `name` is one the kernel could have given for this call's name."""
        head, percent, tail = self.name.partition("%d")
        if not percent:
            return name == self.name
        return re.fullmatch(f"{re.escape(head)}[0-9]+{re.escape(tail)}", name) is not None


def tun_call(name: object = "tun%d", tap: object = False, mtu: object = None) -> TunCall:
    """A checked open_tun call; ValueError (before any I/O) if it cannot be made."""
    if type(name) is not str:
        raise ValueError(f"name must be a str such as 'vpn%d' or 'vpn0', not {name!r}")
    if not name or name in (".", "..") or len(name) > MAX_IFNAME_CHARS:
        raise ValueError(f"name {name!r}: a device name is 1 to {MAX_IFNAME_CHARS} characters")
    if not (name.isascii() and name.isprintable()) or any(c in name for c in "/: \t"):
        raise ValueError(f"name {name!r}: a device name is printable ASCII, no '/', ':', spaces")
    if name.count("%") != name.count("%d") or name.count("%d") > 1:
        raise ValueError(
            f"name {name!r}: at most one '%d' (the kernel picks the number) and no other '%'"
        )
    if type(tap) is not bool:
        raise ValueError(f"tap must be True or False, not {tap!r}")
    return TunCall(name, tap, 0 if mtu is None else check_mtu(mtu))


def device_for(call: TunCall, reply: Reply, fds: list[int], lease: object = None) -> TunDevice:
    """The device of a checked TUN reply (calls.check_reply), or its exception.

    Owns `fds`: each is in the returned device or closed when this raises.

    Raises:
        PolicyDenied: the policy refused (reason and rule from the broker).
        OSError: the kernel's error as its subclass (EBUSY: a device of that
            name exists), with the name asked for as filename.
        ProtocolError: what arrived is not a tun fd attached as the reply says.
    """
    try:
        if not isinstance(reply, TunReply):
            raise ProtocolError(f"{type(reply).__name__} to a tun request")
        if reply.result.errno:
            raise kernel_error(call.name, reply.result)
        if len(fds) != 1:
            raise ProtocolError(f"{len(fds)} fds for one device")
        if not call.matches(reply.name) or not 0 < reply.ifindex < 2**31:
            raise ProtocolError(
                f"device {reply.name!r} (ifindex {reply.ifindex}) for a request of {call.name!r}"
            )
        _check_attached(fds[0], reply.name, call.tap)
    except BaseException:
        unix.close_fds(fds)
        raise
    return TunDevice(fds[0], reply.name, reply.ifindex, call.tap, lease)


def _check_attached(fd: int, name: str, tap: bool) -> None:
    """ProtocolError unless `fd` is /dev/net/tun attached to `name`, of the kind asked for."""
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != TUN_RDEV:
        raise ProtocolError(f"the broker sent an fd that is not {TUN_PATH} for device {name}")
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as exc:
        raise ProtocolError(f"the fd the broker sent for {name} is attached to no device") from exc
    raw, flags = _IFREQ.unpack(ifreq)
    actual = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    want = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI
    if actual != name or flags & (IFF_TUN | IFF_TAP | IFF_NO_PI) != want:
        raise ProtocolError(
            f"the fd the broker sent is attached to {actual!r} (flags {flags:#x}), "
            f"not to {name!r} (flags {want:#x})"
        )
