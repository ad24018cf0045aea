"""The only sendmsg/recvmsg/getsockopt code: datagrams with fds and credentials.

Invariant kept here (docs/security.md, invariant 5): every fd has one owner. `recv_message`
receives with MSG_CMSG_CLOEXEC, so no fd can leak into an exec'd child before
its owner decides; it checks MSG_TRUNC and MSG_CTRUNC and, on any shape error,
closes every fd it received before raising. `socket.recv_fds` is not used: it
ignores truncation.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import mmap
import os
import socket
import struct
from dataclasses import dataclass

# Not in Python 3.11's socket module (linux/asm-generic/socket.h).
SO_PEERGROUPS = 59
SO_PEERPIDFD = 77
MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000))
SCM_CREDENTIALS = socket.SCM_CREDENTIALS
# The MSG_* flags as plain ints: socket's are an IntFlag, whose | and & cost
# more than the syscall's own argument handling, on every message.
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_TRUNCATED = _MSG_TRUNC | _MSG_CTRUNC
# Globals for Receiver's per-message loop: one lookup each, not two.
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_INT = struct.calcsize("i")
# CPython's getsockopt buffer stops at 1024 bytes (256 groups); the kernel
# allows NGROUPS_MAX (65536), which we read through libc when needed.
_NGROUPS_MAX = 65536


class TruncatedMessage(Exception):
    """A datagram or its ancillary data did not fit the buffer (a protocol error)."""


@dataclass(frozen=True, slots=True)
class Ucred:
    pid: int
    uid: int
    gid: int


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send_message(
    sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = (), *, flags: int = 0
) -> None:
    """Send one datagram, with `fds` as SCM_RIGHTS. The caller keeps its fds.

    `flags` are added to send's own (MSG_DONTWAIT: BlockingIOError when full).
    """
    # MSG_NOSIGNAL: a peer that went away is an EPIPE to handle, never a
    # SIGPIPE. Linux sends none for SEQPACKET anyway; this keeps it so on a
    # stream socket too, in a process that did not ignore SIGPIPE.
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc, _MSG_NOSIGNAL | flags)
    else:
        sent = sock.send(data, _MSG_NOSIGNAL | flags)
    if sent != len(data):  # SEQPACKET sends all or nothing; guard anyway
        raise OSError(errno.EMSGSIZE, "short send on a SEQPACKET socket")


def recv_message(
    sock: socket.socket, maxbytes: int, maxfds: int, *, creds: bool = False, flags: int = 0
) -> tuple[bytes, list[int], Ucred | None]:
    """Receive one datagram: (data, fds, credentials).

    The fds are close-on-exec and owned by the caller from here on. Returns
    b"" with no fds at end of stream.

    Raises:
        TruncatedMessage: the datagram was longer than `maxbytes`, or more
            fds than `maxfds` (or other ancillary data) were cut; every fd
            that did arrive has been closed.
        OSError: from recvmsg itself (EAGAIN on a non-blocking socket, ...).
    """
    ancsize = socket.CMSG_SPACE(maxfds * _INT) if maxfds else 0
    if creds:
        ancsize += socket.CMSG_SPACE(_UCRED.size)
    # One byte more than allowed, so an oversized datagram shows as MSG_TRUNC
    # even where the kernel would fill the buffer exactly.
    data, anc, msg_flags, _ = sock.recvmsg(maxbytes + 1, ancsize, MSG_CMSG_CLOEXEC | flags)
    return parse_received(data, anc, msg_flags, maxbytes, maxfds, creds=creds)


def parse_received(
    data: bytes,
    anc: list[tuple[int, int, bytes]],
    msg_flags: int,
    maxbytes: int,
    maxfds: int,
    *,
    creds: bool = False,
) -> tuple[bytes, list[int], Ucred | None]:
    """The checks of recv_message on what recvmsg returned (data, ancillary
    data, flags), for a caller that received the datagram by other means."""
    fds: list[int] = []
    cred: Ucred | None = None
    problem = ""
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _INT])
            fds.extend(arr)
        elif level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS and creds:
            if len(payload) >= _UCRED.size:
                cred = Ucred(*_UCRED.unpack_from(payload))
        else:
            problem = f"unexpected control message {level}/{kind}"
    if msg_flags & _MSG_CTRUNC:
        problem = "control data truncated (too many fds)"
    elif msg_flags & _MSG_TRUNC or len(data) > maxbytes:
        problem = f"datagram longer than {maxbytes} bytes"
    elif len(fds) > maxfds:
        problem = f"{len(fds)} fds, over the {maxfds} limit"
    if problem:
        close_fds(fds)
        raise TruncatedMessage(problem)
    return data, fds, cred


class Receiver:
    """`recv_message` for one size of message, made for a hot loop.

    The buffer sizes are worked out once, and the credentials (which `creds`
    makes room for) are not decoded: a client needs them received, not read.
    The common datagram (not truncated, only fds and credentials, fds within
    the limit) is accepted in one pass; anything else goes to
    `parse_received`, which raises exactly what recv_message raises and
    closes every fd. So the two never disagree, and the fds have one owner.

    With `own_buffer`, it receives into a buffer of its own, made at the
    first receive and kept. recvmsg allocates `maxbytes + 1` bytes per
    message; past malloc's mmap threshold (128 KiB, unless glibc has raised
    it after freeing a bigger block, and never when the environment fixes it)
    that is an mmap, an mremap and a munmap each time, which costs more than
    the rest of a client's exchange. The buffer is an anonymous mapping, so
    only the pages a message touches are ever committed. Such a Receiver is
    for one owner receiving one message at a time (a Client, under its lock).
    """

    __slots__ = ("_ancsize", "_buffers", "_bufsize", "_creds", "_maxbytes", "_maxfds")

    def __init__(
        self, maxbytes: int, maxfds: int, *, creds: bool = False, own_buffer: bool = False
    ) -> None:
        self._maxbytes = maxbytes
        self._maxfds = maxfds
        self._creds = creds
        self._bufsize = maxbytes + 1  # one byte more shows an oversized datagram
        self._ancsize = (socket.CMSG_SPACE(maxfds * _INT) if maxfds else 0) + (
            socket.CMSG_SPACE(_UCRED.size) if creds else 0
        )
        self._buffers: list[mmap.mmap] | None = [] if own_buffer else None

    def recv(self, sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
        """Receive one datagram: (data, fds); b"" with no fds at end of stream.

        Raises what recv_message raises (TruncatedMessage, OSError).
        """
        buffers = self._buffers
        if buffers is None:
            data, anc, msg_flags, _ = sock.recvmsg(
                self._bufsize, self._ancsize, MSG_CMSG_CLOEXEC | flags
            )
        else:
            if not buffers:
                buffers.append(mmap.mmap(-1, self._bufsize))
            size, anc, msg_flags, _ = sock.recvmsg_into(
                buffers, self._ancsize, MSG_CMSG_CLOEXEC | flags
            )
            data = buffers[0][:size]  # a copy: the buffer is the next message's
        if not msg_flags & _TRUNCATED and len(data) <= self._maxbytes:
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == _SOL_SOCKET and kind == _SCM_RIGHTS and not len(payload) % _INT:
                    fds.extend(array.array("i", payload))
                elif level != _SOL_SOCKET or kind != SCM_CREDENTIALS or not self._creds:
                    break  # not ours to judge here
            else:
                if len(fds) <= self._maxfds:
                    return data, fds
        data, fds, _ = parse_received(
            data, anc, msg_flags, self._maxbytes, self._maxfds, creds=self._creds
        )
        return data, fds  # pragma: no cover - only a part of an fd (the kernel sends whole ones)


def peer_cred(sock: socket.socket) -> Ucred:
    """SO_PEERCRED: who connected (or listened), as the kernel recorded it then."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Ucred(*_UCRED.unpack(raw))


_libc = ctypes.CDLL(None, use_errno=True)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: the peer's supplementary groups, read in full.

    Tries CPython's 1024-byte buffer first; on ERANGE (more than 256 groups)
    asks libc with a buffer for NGROUPS_MAX. Never returns a partial list.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            raise
        size = _NGROUPS_MAX * 4
        buf = ctypes.create_string_buffer(size)
        length = ctypes.c_uint32(size)
        rc = _libc.getsockopt(
            sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(length)
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err)) from None
        raw = buf.raw[: length.value]
    arr = array.array("I")
    arr.frombytes(raw[: len(raw) - len(raw) % 4])
    return tuple(arr)


def peer_pidfd(sock: socket.socket) -> int | None:
    """SO_PEERPIDFD (Linux 6.5+): a pidfd of the peer, or None where unsupported."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.ENODATA):
            return None
        raise


def abstract_address(name: str) -> bytes:
    """The sockaddr path of an abstract socket: a NUL then the name.

    A leading "@" (systemd's and ss's spelling of an abstract name) is dropped.
    """
    name = name.removeprefix("@")
    if not name or "\0" in name:
        raise ValueError(f"invalid abstract socket name: {name!r}")
    raw = name.encode()
    if len(raw) > 107:
        raise ValueError(f"socket name longer than 107 bytes: {name!r}")
    return b"\0" + raw
