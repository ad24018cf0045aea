"""What a call means, whichever client carries it: shared by api.py and aio.py.

The sync `Client` and the asyncio `AsyncClient` differ only in how they wait.
Everything else about a call lives here, once, so the two cannot drift apart:

- Rule 1 (validation before I/O): `open_item`, `prepare_open`, `open_items`,
  `explain_request` and `check_wrap_args` raise ValueError (LookupError for an
  unknown encoding) for anything the broker would refuse or the file object
  could not wrap, so a bad call never reaches the broker, let alone creates a
  file.
- Rule 2 (a reply answers its request): `check_reply` matches a decoded reply
  to the request it claims to answer, and its fd count to the results.
- Rule 3 (every fd has one owner): `open_fds` and `wrap` close every fd they
  were given when they raise (`open_fd` is given none when it raises); what
  they return belongs to the caller.
- Rule 4 (retries): `may_retry` is the one statement of when a request is
  resent on a fresh connection.

No socket I/O here; `wrap` only builds a file object around an fd.
"""

from __future__ import annotations

import builtins
import codecs
import errno
import os
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from . import protocol, unix
from .errors import BrokerError, error_for_result
from .protocol import Access, OpenItem, OpenReply, Reply, Request, Result, fastwire
from .protocol.targets import parse_socket_target

if TYPE_CHECKING:
    from _typeshed import StrPath

DEFAULT_TIMEOUT = 5.0
_NEWLINES = (None, "", "\n", "\r", "\r\n")

OpenRequests = Iterable["StrPath | tuple[StrPath, str]"]
MakeRequest = Callable[[int], Request]


# ------------------------------------------------------------ arguments


def socket_name(name: str | None) -> str:
    """The argument, else PRIVBROKER_SOCKET, else "privbroker"."""
    if name is not None:
        return name
    return os.environ.get(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    return timeout


def open_item(path: StrPath, mode: str) -> OpenItem:
    access, exclusive = protocol.access_for_mode(mode)
    return OpenItem(protocol.check_path(os.fspath(path)), access, exclusive)


class PreparedOpen(NamedTuple):
    """A checked one-path open and its encoded request body (fastwire.open_body)."""

    item: OpenItem
    body: bytes


# Checking a path and encoding its item cost more than the rest of an
# open_fd's own work, and a program opens the same few paths over and over:
# both are remembered per (path, mode). Bounded, and simply emptied when
# full, so a program that opens endless distinct paths pays one clear() per
# _PREPARED_MAX of them. Only exact strs are keys: a str subclass's == or hash
# could lie, and anything unhashable must still get its ValueError.
_PREPARED_MAX = 256
_prepared: dict[tuple[str, str], PreparedOpen] = {}


def prepare_open(path: StrPath, mode: str) -> PreparedOpen:
    """open_item(path, mode) with its request body; ValueError as open_item."""
    fspath = os.fspath(path)
    exact = type(fspath) is str and type(mode) is str
    if exact:
        known = _prepared.get((fspath, mode))
        if known is not None:
            return known
    item = open_item(fspath, mode)
    prepared = PreparedOpen(item, fastwire.open_body(item))
    if exact:
        if len(_prepared) >= _PREPARED_MAX:
            _prepared.clear()
        _prepared[fspath, mode] = prepared
    return prepared


def open_items(requests: OpenRequests) -> list[OpenItem]:
    """Items for open_many: paths (opened "r") or (path, mode) pairs, at most MAX_BATCH."""
    items = [open_item(*r) if isinstance(r, tuple) else open_item(r, "r") for r in requests]
    if len(items) > protocol.MAX_BATCH:
        raise ValueError(f"at most {protocol.MAX_BATCH} paths per call, not {len(items)}")
    return items


def open_request(items: list[OpenItem]) -> MakeRequest:
    return lambda ident: protocol.OpenRequest(ident, tuple(items))


def explain_request(
    uid: int, gids: Iterable[int], path: str, access_words: Iterable[str]
) -> MakeRequest:
    """Validate an explain call's arguments; return its request builder.

    `path` is an absolute path, or a socket target ("tcp:[::]:443", with no
    access words): the broker explains either (docs/protocol.md, EXPLAIN)."""
    access = Access.from_words(access_words)
    gid_tuple = tuple(gids)
    for n in (uid, *gid_tuple):
        if type(n) is not int or not 0 <= n < 2**32:
            raise ValueError(f"not a uid or gid: {n!r}")
    if isinstance(path, str) and not path.startswith("/"):
        if " " not in path.strip():  # an operation in ip's words is the broker's to read
            parse_socket_target(path)
        if access:
            raise ValueError("a socket target or an operation takes no access words")
    else:
        protocol.check_path(path)
    return lambda ident: protocol.ExplainRequest(ident, uid, gid_tuple, path, access)


def check_wrap_args(
    mode: str, buffering: int, encoding: str | None, errors: str | None, newline: str | None
) -> None:
    """Raise what builtin open() would for these arguments, before any I/O.

    Caught late, a bad encoding would fail after the broker had already
    created or truncated the file.
    """
    if "b" in mode:
        for arg, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
            if value is not None:
                raise ValueError(f"binary mode doesn't take an {arg} argument")
        return
    if buffering == 0:
        raise ValueError("can't have unbuffered text I/O")
    if newline not in _NEWLINES:
        raise ValueError(f"illegal newline value: {newline!r}")
    if encoding is not None and encoding != "locale":
        codecs.lookup(encoding)  # LookupError, as TextIOWrapper would raise


def wrap(
    fd: int,
    path: str,
    mode: str,
    buffering: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
) -> IO[Any]:
    """What builtin open() returns for `mode`, owning `fd` (closed if this raises)."""
    try:
        # Not a `with`: the file object is what we return.
        file = builtins.open(fd, mode, buffering, encoding, errors, newline)  # noqa: SIM115
    except BaseException:
        os.close(fd)
        raise
    # Text wraps buffered wraps FileIO (buffering=0 is FileIO alone). Only
    # FileIO's name is writable, and the wrappers report it as their own.
    raw: Any = getattr(file, "buffer", file)
    raw = getattr(raw, "raw", raw)
    raw.name = path
    return file


# --------------------------------------------------------------- replies


def check_reply(request: Request, reply: Reply, nfds: int) -> None:
    """Raise protocol.ProtocolError unless `reply` answers `request` with `nfds` fds."""
    if reply.id != request.id:
        raise protocol.ProtocolError(f"reply id {reply.id} for request {request.id}")
    # The request's class names the reply that answers it; ERROR answers any.
    if not isinstance(reply, (request.reply, protocol.ErrorReply)):
        raise protocol.ProtocolError(f"{type(reply).__name__} to {type(request).__name__}")
    if isinstance(reply, OpenReply):
        assert isinstance(request, protocol.OpenRequest)
        if len(reply.results) != len(request.items):
            raise protocol.ProtocolError(
                f"{len(reply.results)} results for {len(request.items)} paths"
            )
        if nfds != reply.nfds:
            raise protocol.ProtocolError(f"{nfds} fds for {reply.nfds} successful opens")
    elif isinstance(reply, protocol.SocketReply | protocol.TunReply):
        if nfds != reply.nfds:
            raise protocol.ProtocolError(
                f"{nfds} fds for a socket reply of errno {reply.result.errno}"
            )
    elif nfds:
        raise protocol.ProtocolError(f"{nfds} fds on a {type(reply).__name__}")


def refusal(reply: protocol.ErrorReply) -> BrokerError:
    """The exception for an ERROR reply (the request as a whole was refused)."""
    return BrokerError(reply.errno, reply.reason)


def closes_connection(reply: protocol.ErrorReply) -> bool:
    """Whether the broker closes the connection after this ERROR reply (EPROTO)."""
    return reply.errno == errno.EPROTO


def open_fd(path: str, result: Result, fds: list[int]) -> int:
    """The fd of a checked one-path open, or its exception.

    A checked result that failed came with no fd (its reply's fd count was
    checked against it), so there is nothing to close.
    """
    if result.errno:
        raise error_for_result(path, result)
    return fds[0]


def open_fds(items: list[OpenItem], reply: Reply, fds: list[int]) -> list[int]:
    """The fds of a checked open reply, or the first failure's exception.

    All or nothing: when an item failed, every fd is closed before raising.
    """
    assert isinstance(reply, OpenReply)
    for item, result in zip(items, reply.results, strict=True):
        if result.errno:
            unix.close_fds(fds)
            raise error_for_result(item.path, result)
    return fds


# --------------------------------------------------------------- retries


def retry_safe(request: Request) -> bool:
    """Whether resending `request` after it may have been carried out is harmless."""
    return request.retry_safe()


def may_retry(*, attempt: int, reused: bool, sent: bool, request: Request) -> bool:
    """Whether a request whose connection was lost is resent on a fresh one.

    Once only (attempt 1), and only on a connection this call did not just
    make (a broker that drops every new connection is not retried into); then
    when nothing was delivered (the send itself failed), or when the request
    neither creates nor truncates.
    """
    return attempt == 1 and reused and (not sent or retry_safe(request))
