"""The broker's rtnetlink sockets: the only code that opens NETLINK_ROUTE as root.

`Rtnl` is made for the broker's epoll loop, which must never block (invariant
6): `submit` builds a request from a fields object (`messages.build`, never
bytes from a client: invariant 12), gives it the next sequence number, sends
it with NLM_F_REQUEST|NLM_F_ACK and returns at once. A send to the kernel does
not wait: the kernel handles the request inside `send` and queues its answer.
When the socket is readable the loop calls `on_readable`, which reads what is
queued (a bounded number of datagrams per call; the loop is level-triggered and
calls again), matches each message to its request by sequence number and port
id, gathers a dump's parts, and calls the request's callback once its
NLMSG_ERROR (an ACK is an error of 0) or NLMSG_DONE arrives:
`callback(errno, extended_ack_text, records)`. `call` is the same machinery
with a poll and a deadline, for startup and cleanup code outside the loop.

Only datagrams from the kernel (sender port 0) are read. Messages that answer
no pending request go to `on_notify` when the socket is bound to multicast
groups (the `monitor` module's use), and are dropped otherwise (a reply to a
request `call` gave up on).

Overrun: when the receive buffer is full the kernel drops what it would have
queued and the next read fails with ENOBUFS. Requests are answered inside
`send`, so once the queue has been read empty after an ENOBUFS, a non-dump
request still pending has lost its answer: its callback gets ENOBUFS ("state
unknown"). A dump is not lost (the kernel waits for room before producing its
next part) and stays pending. `MAX_PENDING` and a large receive buffer keep
this from happening in practice; `on_overrun` tells a multicast listener that
it missed events.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from . import messages, replies
from .messages import Kind
from .replies import Record, Reply

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors echo only the request's header, not the whole request
NETLINK_EXT_ACK = 11  # errors carry the kernel's reason as text (what `ip` prints)
RTMGRP_LINK = 0x1
# Not in typeshed; 33 is asm-generic/socket.h (x86, arm, riscv) where Python lacks it.
SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
MAX_PENDING = 256  # requests in flight per socket: their ACKs must fit the receive buffer
RCVBUF = 1 << 20  # bytes; 256 ACKs take about 200 KiB of kernel accounting
RECV_SIZE = 1 << 16  # the kernel makes dump datagrams of at most 32 KiB
DATAGRAMS_PER_CALL = 64  # one long dump cannot hold the loop; epoll calls again

Callback = Callable[[int, str | None, list[Record]], None]


def open_socket(groups: int = 0, rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking, close-on-exec NETLINK_ROUTE socket bound to `groups`."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        try:  # root may exceed net.core.rmem_max; anyone else gets what the sysctl allows
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))  # port id 0: the kernel picks a unique one
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Pending:
    callback: Callback
    dump: bool
    records: list[Record] = field(default_factory=list)
    interrupted: bool = False


class Rtnl:
    """One NETLINK_ROUTE socket with its pending requests; see the module docstring."""

    def __init__(
        self,
        *,
        groups: int = 0,
        on_notify: Callable[[Reply], None] | None = None,
        on_overrun: Callable[[], None] | None = None,
        rcvbuf: int = RCVBUF,
    ) -> None:
        self._sock = open_socket(groups, rcvbuf)
        self._port: int = self._sock.getsockname()[0]
        self._groups = groups
        self._on_notify = on_notify
        self._on_overrun = on_overrun
        self._pending: dict[int, _Pending] = {}
        self._seqs = itertools.count(1)
        self._overrun = False
        self._buf = bytearray(RECV_SIZE)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _next_seq(self) -> int:
        while True:  # 32-bit and never 0 (the kernel's own notifications carry 0)
            seq = next(self._seqs) % 2**32
            if seq and seq not in self._pending:
                return seq

    def submit(self, kind: Kind, fields: object, callback: Callback) -> int:
        """Send one request; `callback` runs from a later `on_readable`, never from here.

        Returns:
            The request's sequence number.
        Raises:
            TypeError, ValueError: `fields` is not a valid fields object for `kind`.
            BlockingIOError: MAX_PENDING requests are already in flight.
            OSError: the send failed; the request was not made.
        """
        if len(self._pending) >= MAX_PENDING:
            raise BlockingIOError(errno.EAGAIN, "too many rtnetlink requests in flight")
        request = messages.build(kind, fields)
        seq = self._next_seq()
        self._sock.send(messages.encode(request, seq))
        self._pending[seq] = _Pending(callback, request.dump)
        return seq

    def on_readable(self) -> None:
        """Read up to DATAGRAMS_PER_CALL datagrams and complete what they answer.

        Callbacks run from here. A callback that raises propagates: its request is
        already complete, and what else that datagram held is lost (an ACK is a
        datagram of its own; a dump's parts belong to that one request).
        """
        for _ in range(DATAGRAMS_PER_CALL):
            try:
                n, _, flags, (sender, _) = self._sock.recvmsg_into([self._buf])
            except BlockingIOError:
                self._drained()
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._overrun = True
                if self._on_overrun is not None:
                    self._on_overrun()
                continue
            if sender != 0:  # only the kernel speaks on this socket
                continue
            if flags & socket.MSG_TRUNC:  # cannot happen at RECV_SIZE; if it did, parts are lost
                self._overrun = True
                continue
            for reply in replies.parse(bytes(self._buf[:n])):
                self._dispatch(reply)

    def _drained(self) -> None:
        # The queue is empty: after an overrun, what is still pending lost its answer.
        if not self._overrun:
            return
        self._overrun = False
        for seq, p in list(self._pending.items()):
            if not p.dump:
                self._complete(seq, errno.ENOBUFS, "rtnetlink answer lost: receive buffer overrun")

    def _dispatch(self, reply: Reply) -> None:
        p = self._pending.get(reply.seq) if reply.pid == self._port else None
        if p is None:
            if self._groups and self._on_notify is not None and reply.record is not None:
                self._on_notify(reply)
            return
        if reply.flags & messages.NLM_F_DUMP_INTR:
            p.interrupted = True
        if reply.errno is not None:
            code, text = reply.errno, reply.text
            if p.interrupted and code == 0:
                code, text = errno.EINTR, "dump interrupted by a change: it may be inconsistent"
            self._complete(reply.seq, code, text)
        elif reply.record is not None:
            p.records.append(reply.record)

    def _complete(self, seq: int, code: int, text: str | None) -> None:
        p = self._pending.pop(seq)
        p.callback(code, text, p.records if code == 0 else [])

    def call(self, kind: Kind, fields: object, timeout: float = 5.0) -> list[Record]:
        """Send one request and wait for its answer: for code outside the loop only.

        Returns:
            The records of a dump or a get; [] for a change.
        Raises:
            OSError: the kernel refused; errno is its errno, strerror carries the
                extended-ack text where there is one.
            TimeoutError: no answer within `timeout` seconds (the request is forgotten).
        """
        answer: list[tuple[int, str | None, list[Record]]] = []
        seq = self.submit(kind, fields, lambda e, t, r: answer.append((e, t, r)))
        deadline = time.monotonic() + timeout
        poll = select.poll()
        poll.register(self._sock, select.POLLIN)
        while not answer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending.pop(seq, None)
                raise TimeoutError(f"no rtnetlink answer to {kind.value} in {timeout} s")
            if poll.poll(left * 1000):
                self.on_readable()
        code, text, records = answer[0]
        if code:
            raise OSError(code, f"{os.strerror(code)}: {text}" if text else os.strerror(code))
        return records
