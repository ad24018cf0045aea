"""The synchronous client: `Client` and `open_privileged`.

A `Client` owns at most one SOCK_SEQPACKET connection to the broker, opened on
the first call and reused. Each call is one exchange (one request datagram,
one reply datagram with the fds), made under a lock, so a client can be shared
by threads. How it keeps the design's invariants:

- Rule 1 (docs/security.md, invariant 8): on every fresh connection the broker's
  SO_PEERCRED uid is checked against `expected_uid` before a byte is sent.
- Rule 2: arguments are validated (path, mode, batch size, encoding) before
  any I/O, so a bad call never reaches the broker, let alone creates a file.
- Rule 3: OSErrors from the socket become privbroker's errors in one place,
  `connection.library_errors`; a reply that is not valid, or an exchange cut
  short (a timeout, an interrupt), poisons the connection: it is closed, and
  the next call connects afresh (and checks the broker's identity again).
- Rule 3b: a fork child never uses its parent's connection: an at-fork hook
  drops every client's connection (and lock) in the child.
- Rule 4: every fd that arrives has one owner. Until a call returns them, the
  client closes them on any error, and `open_many` is all-or-nothing.
- Rule 5: a request is resent once, on a fresh connection, only when that is
  safe: the reused connection failed on send (nothing was delivered), or it
  died before the reply and the request neither creates nor truncates
  (`calls.may_retry`). So a long-lived client survives a broker restart: the
  next call finds the old connection dead, connects to the new broker, checks
  its identity, and goes on.

What a call means (validation, requests, reply checks, retry rules) is in
calls.py (files), netcalls.py (sockets: bind_privileged, icmp_socket,
raw_socket) and tun.py, netconf.py (devices and configuration, `Client.net`, in
netapi.py), shared with the asyncio client in aio.py; this module only adds the
blocking transport, the lock and the fork handling. `open_privileged`, with
the one Client per socket name it uses, is in shared.py. A one-path open, the
commonest call, takes a fast lane (`calls.prepare_open`, fastwire) that
decides exactly as the general codec does; every rule above holds on it.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import weakref
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, TypeVar

from . import calls, connection, netcalls, protocol, unix
from .calls import DEFAULT_TIMEOUT, MakeRequest, OpenRequests
from .connection import ConnectionLost, Exchange, Trip, connect, library_errors
from .errors import BrokerUnavailable
from .netapi import ClientNet
from .netcalls import Address, SocketCall
from .protocol import ExplainReply, OpenItem, OpenRequest, Reply, Request, fastwire

if TYPE_CHECKING:
    from _typeshed import StrPath

_R = TypeVar("_R")  # what a Trip brings back: a reply, or one path's result


class Client:
    """A connection to the broker, opened lazily, reused, and shared by threads.

    Args:
        socket: the broker's abstract socket name; default the environment's
            PRIVBROKER_SOCKET, else "privbroker".
        timeout: seconds each call may take in all (connecting, sending,
            waiting for the reply); None waits forever.
        expected_uid: the uid the broker must run as (SO_PEERCRED).

    `close()` (or leaving a `with` block) closes the connection; a client used
    again afterwards simply reconnects.

    Raises:
        ValueError: the socket name or the timeout is invalid.
    """

    _sock: socket.socket | None

    def __init__(
        self,
        socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        expected_uid: int = 0,
    ) -> None:
        self.socket_name = calls.socket_name(socket)
        self._address = unix.abstract_address(self.socket_name)
        self.timeout = calls.check_timeout(timeout)
        self.expected_uid = expected_uid
        self._lock = threading.Lock()
        self._sock = None
        self._rx = connection.Replies(own_buffer=True)  # used under the lock
        self._ids = itertools.count(1)
        _ALL_CLIENTS.add(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the connection (waiting for a call in flight); a later call reconnects."""
        with self._lock:
            self._disconnect()

    # ------------------------------------------------------------ opening

    def open_fd(self, path: StrPath, mode: str = "r") -> int:
        """Open `path` through the broker and return the file descriptor.

        Args:
            path: an absolute, normalised path (no `.`, `..`, `//`, trailing `/`).
            mode: an open() mode; it decides the access words the policy must grant.

        Returns:
            A close-on-exec fd, owned by the caller.

        Raises:
            ValueError: invalid path or mode (before any I/O).
            PolicyDenied: the policy does not allow it (a PermissionError).
            OSError: the subclass os.open would raise (FileNotFoundError, ...).
            BrokerError: the broker refused the request as a whole.
            BrokerUnavailable: no broker, it went away, or the timeout passed.
            BrokerIdentityError: the broker does not run as expected_uid.
            ProtocolError: the reply was invalid; the connection was dropped.
        """
        return self._open_one(calls.prepare_open(path, mode), self.timeout)

    def open_many(self, requests: OpenRequests) -> list[int]:
        """Open several paths in one round trip, all or nothing.

        Args:
            requests: paths (opened "r") or (path, mode) pairs, at most MAX_BATCH.

        Returns:
            One fd per request, in order (an empty list for no requests).

        Raises:
            ValueError: an invalid path or mode, or more than MAX_BATCH (no I/O).
            PolicyDenied, OSError: the error of the FIRST request that failed;
                every fd the others produced has been closed.
            BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
                as for open_fd.
        """
        items = calls.open_items(requests)
        return self._open(items, self.timeout) if items else []

    def open(
        self,
        path: StrPath,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Open `path` through the broker and return what builtin open() returns.

        The arguments mean what they mean to open(); the file object's `name`
        is the path.

        Raises:
            ValueError, LookupError: invalid arguments (before any I/O).
            PolicyDenied, OSError, BrokerError, BrokerUnavailable,
            BrokerIdentityError, ProtocolError: as for open_fd.
        """
        return self._open_file(path, mode, buffering, encoding, errors, newline, self.timeout)

    def _open_file(
        self,
        path: StrPath,
        mode: str,
        buffering: int,
        encoding: str | None,
        errors: str | None,
        newline: str | None,
        timeout: float | None,
    ) -> IO[Any]:
        prepared = calls.prepare_open(path, mode)
        calls.check_wrap_args(mode, buffering, encoding, errors, newline)
        fd = self._open_one(prepared, timeout)
        return calls.wrap(fd, prepared.item.path, mode, buffering, encoding, errors, newline)

    def _open_one(self, prepared: calls.PreparedOpen, timeout: float | None) -> int:
        # One path, the commonest call: fastwire encodes it and checks its reply.
        request = OpenRequest(next(self._ids), (prepared.item,))
        data = fastwire.encode_open(request.id, prepared.body)
        result, fds = self._call(request, data, timeout, connection.open_one_trip)
        return calls.open_fd(prepared.item.path, result, fds)

    def _open(self, items: list[OpenItem], timeout: float | None) -> list[int]:
        reply, fds = self._request(calls.open_request(items), timeout)
        return calls.open_fds(items, reply, fds)

    # ------------------------------------------------------------ sockets

    def bind_privileged(
        self,
        address: Address,
        type: int = socket.SOCK_STREAM,
        *,
        backlog: int | None = None,
        v6only: bool | None = None,
        interface: str | None = None,
        reuse_port: bool = False,
    ) -> socket.socket:
        """A TCP socket listening on, or a UDP socket bound to, a privileged address.

        Args:
            address: numeric, as bind() takes it: ("::", 443), ("0.0.0.0", 53),
                ("fe80::1%eth0", 547) or (host, port, flowinfo, scope_id).
            type: SOCK_STREAM (returned listening) or SOCK_DGRAM (returned bound).
            backlog: TCP only, 1-65535; None for the system's maximum.
            v6only: IPv6 only; None keeps the kernel's default (dual-stack).
            interface: a device to bind it to (SO_BINDTODEVICE).
            reuse_port: set SO_REUSEPORT.

        Returns:
            A close-on-exec socket owned by the caller's uid, and by the caller.

        Raises:
            ValueError: a hostname (no DNS), a bad port, type or option (no I/O).
            PolicyDenied: the policy does not allow it (reason, rule).
            OSError: the kernel's error as its subclass (EADDRINUSE, ...), with
                the target text ("tcp:[::]:443") as filename.
            BrokerError, BrokerUnavailable, BrokerIdentityError, ProtocolError:
                as for open_fd.
        """
        call = netcalls.bind_call(address, type, backlog, v6only, interface, reuse_port)
        return self._new_socket(call, self.timeout)

    def icmp_socket(
        self, family: int = socket.AF_INET, *, interface: str | None = None
    ) -> socket.socket:
        """An ICMP or ICMPv6 datagram socket, IP_RECVERR on, path MTU discovery "want".

        Raises:
            ValueError: another family or a bad interface (no I/O); the rest as
                for bind_privileged.
        """
        return self._new_socket(netcalls.icmp_call(family, interface), self.timeout)

    def raw_socket(self, family: int, proto: int, *, interface: str | None = None) -> socket.socket:
        """A raw socket for one IP protocol (1-254), under a rule that names it.

        Raises:
            ValueError: another family, protocol 0, 255 or out of range (no I/O);
                the rest as for bind_privileged.
        """
        return self._new_socket(netcalls.raw_call(family, proto, interface), self.timeout)

    def _new_socket(self, call: SocketCall, timeout: float | None) -> socket.socket:
        request = call.make(next(self._ids))
        data = fastwire.encode_socket(request.id, call.body)  # encode_request's bytes
        got: tuple[Reply, list[int]] = self._call(request, data, timeout, connection.socket_trip)
        reply, fds = got
        return netcalls.socket_for(call, reply, fds)

    @property
    def net(self) -> ClientNet:
        """tun/tap devices and their configuration, leased to this client's connection:
        `client.net.open_tun(...)`, `.add_address`, `.set_link`, `.add_route`, ...
        (netapi.py). The devices and changes are undone when the connection ends."""
        return ClientNet(self)  # made per use: a stored one would tie a cycle to the client

    # ------------------------------------------------------- administration

    def explain(
        self, uid: int, gids: Iterable[int], path: str, access_words: Iterable[str]
    ) -> ExplainReply:
        """Ask the running broker whether its policy allows uid/gids `access_words` on path.

        Args:
            uid: the client uid to judge.
            gids: its primary and supplementary gids.
            path: an absolute, normalised path.
            access_words: e.g. ["read", "write"].

        Returns:
            The broker's answer: allowed, the deciding rule and reason, and
            for a denial the rule that came closest and why it did not match.

        Raises:
            ValueError: an invalid path or access word (before any I/O).
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        make = calls.explain_request(uid, gids, path, access_words)
        reply, _ = self._request(make, self.timeout)
        assert isinstance(reply, ExplainReply)
        return reply

    def status(self) -> dict[str, Any]:
        """The running broker's counters and state, as a dict.

        Raises:
            BrokerError: the broker refused (EPERM: only root may ask).
            BrokerUnavailable, BrokerIdentityError, ProtocolError: as for open_fd.
        """
        reply, _ = self._request(protocol.StatusRequest, self.timeout)
        assert isinstance(reply, protocol.StatusReply)
        return dict(reply.fields)

    def declare(self, program: str) -> None:
        """Tell the broker which program this connection's requests are for
        (privopen declares the command it runs); the audit records it as the
        client's claim. It grants nothing."""
        if not isinstance(program, str) or len(program) > protocol.MAX_PROGRAM_CHARS:
            raise ValueError("program must be a str of at most MAX_PROGRAM_CHARS characters")
        self._request(lambda ident: protocol.DeclareRequest(ident, program), self.timeout)

    # ------------------------------------------------------------ exchange

    def _request(self, make: MakeRequest, timeout: float | None) -> tuple[Reply, list[int]]:
        # `make(id)` builds the request, encoded before any I/O: a request over
        # a limit is a ValueError with nothing sent.
        request = make(next(self._ids))
        return self._call(request, protocol.encode_request(request), timeout, connection.round_trip)

    def _call(
        self, request: Request, data: bytes, timeout: float | None, trip: Trip[_R]
    ) -> tuple[_R, list[int]]:
        """Carry `request` (encoded as `data`) by `trip`, retried once when that is safe."""
        ex = Exchange(timeout)
        lock = self._lock  # the lock released below is the one acquired here
        # Uncontended (nearly always), a non-blocking try skips a timed wait's
        # setup. Waiting for another thread's call counts against the timeout.
        if not lock.acquire(False):
            left = ex.remaining()
            if not lock.acquire(timeout=-1 if left is None else left):
                raise BrokerUnavailable(
                    errno.ETIMEDOUT, "timed out waiting for another thread's call to finish"
                )
        try:
            for attempt in (1, 2):
                ex.phase, ex.sent = "connect to", False
                reused = self._sock is not None
                try:
                    with library_errors(self.socket_name, ex):
                        if self._sock is None:
                            self._sock = connect(
                                self._address, self.socket_name, self.expected_uid, ex
                            )
                        reply, fds = trip(self._sock, request, data, ex, self._rx)
                except ConnectionLost:
                    self._disconnect()
                    if calls.may_retry(
                        attempt=attempt, reused=reused, sent=ex.sent, request=request
                    ):
                        continue
                    raise
                except BaseException:
                    # A bad reply, a timeout, an interrupt: the stream is out of step.
                    self._disconnect()
                    raise
                if isinstance(reply, protocol.ErrorReply):
                    if calls.closes_connection(reply):
                        self._disconnect()
                    raise calls.refusal(reply)
                return reply, fds
        finally:
            lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _forget_after_fork(self) -> None:
        # In a fork child: the lock may have been held by a thread that no
        # longer exists, and the connection is the parent's. Close our copy.
        self._lock = threading.Lock()
        self._disconnect()


# ------------------------------------------------------------ fork handling

_ALL_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_ALL_CLIENTS):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
