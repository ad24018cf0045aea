"""Lease records on disk, so that a restarted broker leaves no orphan device.

While a lease holds devices, the broker keeps one small JSON file for it under
a root-only directory (RECORD_DIR, on tmpfs: a reboot rightly forgets it):
the network namespace it was written in, and each device's ifindex and name.
It is replaced atomically (write, then rename) after every device the lease
gains or loses, and removed when the lease ends. At the next start,
`cleanup_orphans` reads every record of this namespace and deletes each
device whose ifindex still carries the recorded name. Both must match: a
device that reused the name (it has another index) or the index (it has
another name) belongs to someone else and is spared. Between the check and
the RTM_DELLINK only a CAP_NET_ADMIN process could swap the device, and the
broker does not create devices while it cleans up.

A record is data from a root-owned directory and is still parsed strictly
(sizes, types, names); one that does not parse is left in place and reported.
This module and `tun` are the broker's only file I/O for network resources.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .fields import LinkRef, check_ifname
from .leases import Device
from .messages import Kind
from .replies import Link
from .rtnl import Rtnl

RECORD_DIR = Path("/run/privbroker/leases")
MAX_RECORD = 1 << 16  # bytes; a record lists a client's few devices
_KEY = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,63}")  # one file name, never a path
VERSION = 1


def netns_id() -> list[int]:
    """The identity of this process's network namespace: an ifindex means nothing outside it."""
    st = os.stat("/proc/self/ns/net")
    return [st.st_dev, st.st_ino]


def _path(record_dir: Path, key: str) -> Path:
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid lease record key {key!r}")
    return record_dir / f"{key}.json"


def write(record_dir: Path, key: str, devices: Iterable[Device]) -> None:
    """Record `devices` for the lease `key`, or remove its record if there are none."""
    devices = list(devices)
    path = _path(record_dir, key)
    if not devices:
        remove(record_dir, key)
        return
    body = {
        "version": VERSION,
        "netns": netns_id(),
        "devices": [{"ifindex": d.ifindex, "name": d.name} for d in devices],
    }
    record_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    os.replace(tmp, path)  # a reader sees the old record or the new one, never half


def hold(record_dir: Path) -> int:
    """Take this broker's lock, `<pid>.lock`, for as long as it runs: its lease
    records (`<pid>-N.json`) are a live broker's exactly while the lock is held
    (a pid reused by another program holds no lock). Returns the lock's fd,
    which the caller keeps open."""
    record_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(record_dir / f"{os.getpid()}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def held(record: Path) -> bool:
    """Whether the broker that wrote `record` still runs (holds its pid's lock)."""
    pid = record.stem.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        fd = os.open(record.parent / f"{pid}.lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # a lock taken here goes with the fd
    return False


def remove(record_dir: Path, key: str) -> None:
    _path(record_dir, key).unlink(missing_ok=True)


def _parse(data: bytes) -> tuple[list[int], list[Device]]:
    if len(data) > MAX_RECORD:
        raise ValueError("record too large")
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise ValueError("not a version 1 lease record")
    netns, raw = body.get("netns"), body.get("devices")
    if not isinstance(raw, list) or not (isinstance(netns, list) and len(netns) == 2):
        raise ValueError("record without netns and devices")
    devices = []
    for d in raw:
        if not isinstance(d, dict) or type(d.get("ifindex")) is not int or d["ifindex"] <= 0:
            raise ValueError(f"bad device entry {d!r}")
        devices.append(Device(d["ifindex"], check_ifname(d.get("name"))))
    return netns, devices


@dataclass(frozen=True)
class Orphan:
    record: Path
    device: Device


def _scan(record_dir: Path) -> tuple[list[Orphan], list[Path]]:
    found: list[Orphan] = []
    unreadable: list[Path] = []
    here = netns_id()
    try:
        paths = sorted(record_dir.glob("*.json"))
    except FileNotFoundError:
        return found, unreadable
    for path in paths:
        try:
            netns, devices = _parse(path.read_bytes())
        except (OSError, ValueError):  # JSONDecodeError is a ValueError
            unreadable.append(path)
            continue
        if netns == here:  # another namespace's indices are not ours to judge
            found.extend(Orphan(path, d) for d in devices)
    return found, unreadable


def orphans(record_dir: Path = RECORD_DIR) -> list[Orphan]:
    """Every device recorded in this network namespace by a broker that is gone."""
    return _scan(record_dir)[0]


@dataclass
class Cleanup:
    deleted: list[Device] = field(default_factory=list)
    spared: list[Device] = field(default_factory=list)  # the index now has another name
    gone: list[Device] = field(default_factory=list)  # no device has the index any more
    unreadable: list[Path] = field(default_factory=list)


def cleanup_orphans(
    rtnl: Rtnl, record_dir: Path = RECORD_DIR, skip: Callable[[Path], bool] = lambda _: False
) -> Cleanup:
    """Delete the recorded devices that are still the same devices; remove their records.

    For startup, before the loop runs: it waits on `rtnl.call`.

    Raises:
        OSError: a refusal other than "no such device"; that record stays for next time.
    """
    found, unreadable = _scan(record_dir)
    # Records of a broker still running (another of --processes N) are its own.
    found = [o for o in found if not skip(o.record)]
    result = Cleanup(unreadable=unreadable)
    for orphan in found:
        d = orphan.device
        try:
            links = rtnl.call(Kind.GET_LINK, LinkRef(ifindex=d.ifindex))
            if [x.name for x in links if isinstance(x, Link)] != [d.name]:
                result.spared.append(d)
                continue
            rtnl.call(Kind.DEL_LINK, LinkRef(ifindex=d.ifindex))
            result.deleted.append(d)
        except OSError as e:
            if e.errno != errno.ENODEV:
                raise
            result.gone.append(d)
    for path in sorted({o.record for o in found}):
        path.unlink(missing_ok=True)
    return result
