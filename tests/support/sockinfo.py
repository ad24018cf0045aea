"""What the kernel says of a socket, for comparing one the broker made in C
with one it made in Python (tests/net/test_fastsock.py,
tests/adversarial/test_fast_sockets.py)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
from typing import Any


def describe(sock: socket.socket) -> dict[str, Any]:
    """Owner, kind, state, address, device and options of `sock`, as its holder reads them."""
    opt = sock.getsockopt
    st = os.fstat(sock.fileno())
    d: dict[str, Any] = {
        "owner": (st.st_uid, st.st_gid),
        "kind": (sock.family, sock.type, sock.proto),
        "listening": opt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        "name": sock.getsockname(),
        "device": opt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0"),
        "reuseaddr": opt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": opt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
        "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "mark": opt(socket.SOL_SOCKET, socket.SO_MARK),
        "priority": opt(socket.SOL_SOCKET, socket.SO_PRIORITY),
    }
    if sock.family == socket.AF_INET6:
        d["v6only"] = opt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    if sock.type == socket.SOCK_STREAM:
        port = sock.getsockname()[1]
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        d["backlog"] = int(out[2])  # a listener's Send-Q: the backlog it was given
    return d
