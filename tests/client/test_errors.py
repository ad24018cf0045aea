"""str() of each client exception: one sentence, each fact once, no "[Errno N]" where words say it.

The exceptions are built as the client builds them (errors.error_for_result,
connection.library_errors, calls.refusal), and one of each is raised for
real against the stand-in broker, so that what a log line shows is checked
where it is made.
"""

from __future__ import annotations

import errno
import pickle
from typing import Any

import pytest

from privbroker import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    Client,
    PolicyDenied,
    ProtocolError,
    calls,
    protocol,
)
from privbroker.connection import ConnectionLost
from privbroker.errors import error_for_result
from privbroker.protocol import ErrorReply, Result
from tests.support.client_cases import null_fds
from tests.support.standin import StandIn, unique_name


@pytest.mark.parametrize(
    ("reason", "rule", "text"),
    [
        # The broker's usual reasons name the path and the rule: said once each.
        (
            "no rule allows nobody (65534) to read /etc/shadow; rule 'web' grants write only",
            "web",
            "no rule allows nobody (65534) to read /etc/shadow; rule 'web' grants write only",
        ),
        ("denied by rule 'never the shadow files'", "never the shadow files",
         "/etc/shadow: denied by rule 'never the shadow files'"),
        ("no rule allows alice (1000) to read /etc/shadow", None,
         "no rule allows alice (1000) to read /etc/shadow"),
        # A reason that names neither gets both.
        ("never", "shadow rule", "/etc/shadow: never (rule 'shadow rule')"),
        ("", None, "/etc/shadow: denied by the broker's policy"),
    ],
)  # fmt: skip
def test_policy_denied_says_path_reason_and_rule_once(
    reason: str, rule: str | None, text: str
) -> None:
    exc = PolicyDenied("/etc/shadow", reason, rule)
    assert str(exc) == text
    assert str(exc).count("/etc/shadow") == 1
    if rule:
        assert str(exc).count(f"'{rule}'") == 1
    assert str(pickle.loads(pickle.dumps(exc))) == text


def test_a_denied_socket_reads_the_same_way() -> None:
    reason = "tcp:0.0.0.0:81 denied by rule 'no 81'"
    assert str(PolicyDenied("tcp:0.0.0.0:81", reason, "no 81")) == reason


def test_a_kernel_error_reads_as_os_open_s() -> None:
    exc = error_for_result("/srv/x", Result(errno.ENOENT))
    assert isinstance(exc, FileNotFoundError)
    assert str(exc) == "[Errno 2] No such file or directory: '/srv/x'"


def test_broker_error_names_the_refusal_and_its_errno() -> None:
    exc = calls.refusal(ErrorReply(1, errno.EPERM, "only root may ask for status"))
    assert isinstance(exc, BrokerError) and exc.errno == errno.EPERM
    assert str(exc) == "the broker refused the request: only root may ask for status (EPERM)"
    bare = calls.refusal(ErrorReply(1, errno.EBUSY, ""))
    assert str(bare) == "the broker refused the request: Device or resource busy (EBUSY)"


@pytest.mark.parametrize("cls", [BrokerUnavailable, ConnectionLost])
def test_broker_unavailable_is_its_message(cls: type[BrokerUnavailable]) -> None:
    message = "cannot connect to the broker socket @x: Connection refused"
    exc = cls(errno.ECONNREFUSED, message)
    assert str(exc) == message
    assert exc.errno == errno.ECONNREFUSED
    assert str(cls("no errno")) == "no errno"


def test_protocol_error_says_the_reply_was_invalid_once() -> None:
    assert str(ProtocolError("3 fds for one socket")) == (
        "invalid reply from the broker: 3 fds for one socket"
    )
    boundary = "invalid reply on broker socket @x: reply id 3 for request 2"
    assert str(ProtocolError(boundary)) == boundary
    made = "the broker sent an fd that is no socket for tcp:[::]:80"
    assert str(ProtocolError(made)) == made
    assert str(ProtocolError()) == "invalid reply from the broker"


# ------------------------------------------------------- as raised for real


def test_as_raised_no_broker() -> None:
    name = unique_name()
    with Client(name, timeout=2) as c, pytest.raises(BrokerUnavailable) as info:
        c.open_fd("/etc/hostname")
    assert str(info.value) == f"cannot connect to the broker socket @{name}: Connection refused"


def test_as_raised_wrong_identity() -> None:
    with (
        StandIn() as s,
        Client(s.name, expected_uid=4321) as c,
        pytest.raises(BrokerIdentityError) as info,
    ):
        c.open_fd("/etc/hostname")
    text = str(info.value)
    assert text.startswith(f"the process on socket @{s.name} (pid ")
    assert text.endswith("runs as uid 0, not the broker's uid 4321; nothing was sent")
    assert "[Errno" not in text


@pytest.mark.parametrize(
    ("make", "cls", "text"),
    [
        (lambda r: ErrorReply(r.id, errno.EPERM, "only root may ask"), BrokerError,
         "the broker refused the request: only root may ask (EPERM)"),
        (lambda r: (b"\xc1", []), ProtocolError, "invalid reply on broker socket @"),
        (lambda r: (protocol.OpenReply(r.id, (Result(),)), null_fds(2)), ProtocolError,
         "invalid reply on broker socket @"),
    ],
)  # fmt: skip
def test_as_raised_by_the_broker(make: Any, cls: type[Exception], text: str) -> None:
    with StandIn(lambda r: make(r)) as s, Client(s.name) as c, pytest.raises(cls) as info:
        c.open_fd("/etc/hostname")
    assert str(info.value).startswith(text)
    assert str(info.value).count("invalid reply") <= 1
    assert "[Errno" not in str(info.value)
