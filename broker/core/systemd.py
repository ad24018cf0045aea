"""What the broker needs of systemd, spoken directly: no libsystemd, no extra package.

- Socket activation (sd_listen_fds): LISTEN_PID must be us, LISTEN_FDS counts
  fds from 3; we take the one that is an AF_UNIX SOCK_SEQPACKET listener and
  refuse anything else, so a mis-written unit fails loudly instead of serving
  on the wrong kind of socket.
- Notification (sd_notify): one datagram of "KEY=VALUE" lines to the socket in
  NOTIFY_SOCKET (a path, or "@name" for an abstract one). Never raises: a
  broker must not die because systemd went away.
- The journal's native protocol: one datagram to /run/systemd/journal/socket
  with "FIELD=value" lines (values with a newline use the binary form).
"""

from __future__ import annotations

import os
import socket
import struct

SD_LISTEN_FDS_START = 3
JOURNAL_SOCKET = "/run/systemd/journal/socket"


class ActivationError(Exception):
    """LISTEN_FDS passed something the broker cannot serve on."""


def listen_fds(unset: bool = True) -> list[int]:
    """The fds systemd passed us, or [] when not socket-activated."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def activated_listener() -> socket.socket | None:
    """The socket-activated SEQPACKET listener, or None if not activated.

    Raises:
        ActivationError: fds were passed but none is an AF_UNIX SOCK_SEQPACKET
            listening socket (extra fds are closed).
    """
    fds = listen_fds()
    if not fds:
        return None
    chosen: socket.socket | None = None
    problems = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            problems.append(f"fd {fd}: {exc.strerror}")
            os.close(fd)
            continue
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        kind = (sock.family, sock.type)
        if chosen is None and kind == (socket.AF_UNIX, socket.SOCK_SEQPACKET) and listening:
            chosen = sock
        else:
            problems.append(
                f"fd {fd}: {sock.family.name}/{sock.type.name}"
                f"{'' if listening else ' (not listening)'}"
            )
            sock.close()
    if chosen is None:
        raise ActivationError(
            "socket activation passed no AF_UNIX SOCK_SEQPACKET listener: " + "; ".join(problems)
        )
    chosen.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return chosen


def _address(value: str) -> str | bytes:
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def notify(*lines: str) -> bool:
    """sd_notify: send state lines ("READY=1", "STATUS=..."); False if not under systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(target))
            s.send("\n".join(lines).encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wpid = os.environ.get("WATCHDOG_PID")
    if wpid and wpid != str(os.getpid()):
        return None
    return usec / 2e6 if usec > 0 else None


def journal_message(fields: dict[str, object]) -> bytes:
    """Encode one journal entry in the native protocol."""
    out = bytearray()
    for key, value in fields.items():
        if value is None:
            continue
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        name = key.upper().encode()
        if b"\n" in raw:
            out += name + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += name + b"=" + raw + b"\n"
    return bytes(out)


class Journal:
    """A connected datagram socket to journald; `send` never blocks or raises."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sock.connect(path)

    def send(self, fields: dict[str, object]) -> bool:
        try:
            self.sock.send(journal_message(fields))
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or ":" not in stream:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    dev, _, ino = stream.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"
