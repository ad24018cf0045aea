"""Exceptions of the client library, and the one errno -> exception boundary.

errno is the wire vocabulary (as in seatd): a failed open comes back as a
number, and `error_for_result` turns it into the exception `os.open` would have
raised for the same errno, with `filename` set, so `except FileNotFoundError`
works exactly as with the builtin `open()`. A policy denial is the one
exception: it becomes `PolicyDenied`, still a `PermissionError`.

str() of each exception is one sentence for a person reading a log line or
a traceback: what happened, to what, and why, each said once. OSError's own
"[Errno 111] ..." prefix is not repeated where the message already says it
in words; the errno stays on `.errno` for programs.
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
        # The broker's reasons usually name the path and the deciding rule
        # ("no rule allows alice (1000) to read /etc/shadow; rule 'web' ...");
        # each is added here only when the reason does not say it already.
        reason = self.reason or "denied by the broker's policy"
        text = reason if str(self.filename) in reason else f"{self.filename}: {reason}"
        if self.rule and f"'{self.rule}'" not in reason:
            text += f" (rule '{self.rule}')"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles as (errno, strerror, filename), which is not this
        # constructor's signature; a PolicyDenied must survive a process pipe
        # (with its notes and other attributes, which live in __dict__).
        return type(self), (self.filename, self.reason, self.rule), self.__dict__


class BrokerUnavailable(ConnectionError):
    """No broker answers on the socket, or it went away mid-request.

    Made as BrokerUnavailable(errno, message); str() is the message, which
    names the socket and the kernel's words ("cannot connect to the broker
    socket @privbroker: Connection refused").
    """

    def __str__(self) -> str:
        return self.strerror if self.errno is not None and self.strerror else super().__str__()


class BrokerIdentityError(PrivbrokerError, ConnectionError):
    """The process on the socket is not the broker we expect (wrong uid)."""


# Messages made at the error boundary (connection.library_errors) and by the
# reply checks that say who sent what already start so.
_SAYS_WHO = ("invalid reply", "the broker")


class ProtocolError(PrivbrokerError, _WireProtocolError):
    """The broker sent something that is not a valid reply; the connection is dropped."""

    def __str__(self) -> str:
        detail = super().__str__()
        if detail.startswith(_SAYS_WHO):
            return detail
        return (
            f"invalid reply from the broker: {detail}"
            if detail
            else "invalid reply from the broker"
        )


class BrokerError(PrivbrokerError, OSError):
    """The broker refused the request as a whole (an ERROR reply): BrokerError(errno, reason)."""

    def __str__(self) -> str:
        if self.errno is None:
            return super().__str__()
        name = errno.errorcode.get(self.errno, f"errno {self.errno}")
        reason = self.strerror or os.strerror(self.errno)
        return f"the broker refused the request: {reason} ({name})"


def error_for_result(path: str, result: Result) -> OSError:
    """The exception for one failed open result (errno != 0)."""
    if result.denied:
        return PolicyDenied(path, result.reason, result.rule)
    message = os.strerror(result.errno)
    if result.reason and result.reason.lower() != message.lower():
        message = f"{message} ({result.reason})"
    # OSError's constructor picks the subclass from the errno, as os.open does.
    return OSError(result.errno, message, path)
