"""Binding the broker's abstract socket, and saying who holds it when that fails."""

from __future__ import annotations

import contextlib
import errno
import socket

from privbroker import unix


def bind_listener(name: str, backlog: int = 128) -> socket.socket:
    """Bind and listen on the abstract name @name; refuse clearly if it is taken.

    Raises:
        OSError: EADDRINUSE with a message naming the holder's uid and pid
            when it can be learned (a broker already running, or a squatter).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # Accepted connections inherit SO_PASSCRED, so every request carries
    # kernel-checked credentials from the first datagram on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        sock.bind(unix.abstract_address(name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                errno.EADDRINUSE,
                f"abstract socket @{name} is already bound by another process "
                f"({_holder(name)}); is a broker already running, or is someone "
                "squatting the name?",
            ) from None
        raise
    sock.listen(backlog)
    return sock


def _holder(name: str) -> str:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(0.5)
    try:
        probe.connect(unix.abstract_address(name))
        cred = unix.peer_cred(probe)
        return f"uid {cred.uid}, pid {cred.pid}"
    except OSError:
        return "owner unknown"
    finally:
        probe.close()


# Accept errors that mean "out of fds or memory": the listener stays
# readable, so the loop stops watching it for a moment instead of spinning.
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def accept_some(listener: socket.socket, burst: int) -> tuple[list[socket.socket], str]:
    """Up to `burst` new connections, non-blocking, with SO_PASSCRED set; and
    why accepting must pause a while ("" if it need not).

    SO_PASSCRED is inherited from the listener only as it was at connect()
    time: a client that connected before the broker started (socket
    activation) would otherwise send its first request without credentials.
    """
    socks: list[socket.socket] = []
    while len(socks) < burst:
        try:
            sock, _addr = listener.accept()
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                return socks, exc.strerror or str(exc)
            if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPERM):
                continue
            for s in socks:
                s.close()
            raise
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        socks.append(sock)
    return socks, ""


def drain(sock: socket.socket) -> None:
    """Read a non-blocking socket empty (the loop's wake-up pair)."""
    with contextlib.suppress(BlockingIOError):
        while sock.recv(4096):
            continue
