"""Exceptions of the client library, and the one errno -> exception boundary.

errno is the wire vocabulary (as in seatd): a failed open comes back as a
number, and `error_for_result` turns it into the exception `os.open` would have
raised for the same errno, with `filename` set, so `except FileNotFoundError`
works exactly as with the builtin `open()`. A policy denial is the one
exception: it becomes `PolicyDenied`, still a `PermissionError`.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .protocol import ProtocolError as _WireProtocolError
from .protocol import Result


class PrivbrokerError(Exception):
    """Base of the errors that are privbroker's own (not an OSError of a path)."""


class PolicyDenied(PermissionError):
    """The broker's policy does not allow this open.

    Attributes:
        reason: why, in words meant for the developer reading the traceback.
        rule: the name of the rule that decided, when one did (a deny rule, or
            the allow rule that came closest), else None.
    """

    def __init__(self, path: str, reason: str, rule: str | None = None) -> None:
        super().__init__(errno.EACCES, reason or "denied by policy", path)
        self.reason = reason
        self.rule = rule

    def __str__(self) -> str:
        rule = f" (rule {self.rule!r})" if self.rule else ""
        return f"[privbroker] {self.filename}: {self.reason}{rule}"

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles as (errno, strerror, filename), which is not this
        # constructor's signature; a PolicyDenied must survive a process pipe
        # (with its notes and other attributes, which live in __dict__).
        return type(self), (self.filename, self.reason, self.rule), self.__dict__


class BrokerUnavailable(ConnectionError):
    """No broker answers on the socket, or it went away mid-request."""


class BrokerIdentityError(PrivbrokerError, ConnectionError):
    """The process on the socket is not the broker we expect (wrong uid)."""


class ProtocolError(PrivbrokerError, _WireProtocolError):
    """The broker sent something that is not a valid reply; the connection is dropped."""


class BrokerError(PrivbrokerError, OSError):
    """The broker refused the request as a whole (an ERROR reply)."""


def error_for_result(path: str, result: Result) -> OSError:
    """The exception for one failed open result (errno != 0)."""
    if result.denied:
        return PolicyDenied(path, result.reason, result.rule)
    message = os.strerror(result.errno)
    if result.reason and result.reason.lower() != message.lower():
        message = f"{message} ({result.reason})"
    # OSError's constructor picks the subclass from the errno, as os.open does.
    return OSError(result.errno, message, path)
