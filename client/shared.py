"""`open_privileged`: the builtin open() through the broker, one shared
`Client` per socket name.

A process that calls open_privileged from many threads uses one connection
per broker socket, made on the first call; a fork child starts with none
(its parent's connections are its parent's: api.py drops them in the child).
"""

from __future__ import annotations

import os
import threading
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TextIO, overload

from . import calls
from .api import Client

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode, OpenTextMode, StrPath

_shared_lock = threading.Lock()
_shared: dict[str, Client] = {}


def _after_fork_in_child() -> None:
    global _shared_lock, _shared
    _shared_lock = threading.Lock()
    _shared = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_client(socket_name: str | None) -> Client:
    name = calls.socket_name(socket_name)
    # Lock-free once made: a dict lookup is atomic; the lock guards making one.
    if (client := _shared.get(name)) is not None:
        return client
    with _shared_lock:
        if (client := _shared.get(name)) is None:
            client = _shared[name] = Client(name)
        return client


@overload
def open_privileged(
    path: StrPath,
    mode: OpenTextMode = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> TextIO: ...
@overload
def open_privileged(
    path: StrPath,
    mode: OpenBinaryMode,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> BinaryIO: ...
@overload
def open_privileged(
    path: StrPath,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> IO[Any]: ...
def open_privileged(
    path: StrPath,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    socket: str | None = None,
    timeout: float | None = None,
) -> IO[Any]:
    """Open `path` through the broker, like the builtin open().

    Uses one connection per socket name, shared by the process's threads (a
    fork child gets its own).

    Args:
        path, mode, buffering, encoding, errors, newline: as for open();
            path must be absolute and normalised.
        socket: the broker's socket name (default PRIVBROKER_SOCKET, else
            "privbroker").
        timeout: seconds for this call; None means the default, 5 seconds.

    Returns:
        What open() returns for that mode (TextIOWrapper, BufferedReader, ...).

    Raises:
        ValueError, LookupError: invalid arguments (before any I/O).
        PolicyDenied: the policy does not allow it (a PermissionError).
        OSError: the subclass os.open would raise (FileNotFoundError, ...).
        BrokerError: the broker refused the request as a whole.
        BrokerUnavailable: no broker, it went away, or the timeout passed.
        BrokerIdentityError: the socket is not served by root.
        ProtocolError: the reply was invalid.
    """
    client = _shared_client(socket)
    timeout = client.timeout if timeout is None else calls.check_timeout(timeout)
    return client._open_file(path, mode, buffering, encoding, errors, newline, timeout)
