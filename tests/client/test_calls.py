"""client/calls.py, the rules both clients share, tested as tables (no I/O)."""

from __future__ import annotations

import errno

import pytest

from privbroker import calls, protocol
from privbroker.protocol import ErrorReply, ExplainRequest, OpenRequest, StatusRequest


def open_request(*modes: str) -> OpenRequest:
    return OpenRequest(1, tuple(calls.open_item(f"/srv/f{n}", m) for n, m in enumerate(modes)))


@pytest.mark.parametrize(
    ("request_", "safe"),
    [
        (open_request("r"), True),
        (open_request("rb", "r+"), True),
        (open_request("w"), False),  # creates and truncates
        (open_request("a"), False),  # creates
        (open_request("x"), False),  # creates
        (open_request("r", "w"), False),  # one unsafe item makes the batch unsafe
        (StatusRequest(1), True),
        (ExplainRequest(1, 0, (), "/srv", protocol.Access.WRITE), True),
    ],
)
def test_retry_safe(request_: protocol.Request, safe: bool) -> None:
    assert calls.retry_safe(request_) is safe


@pytest.mark.parametrize(
    ("attempt", "reused", "sent", "modes", "expected"),
    [
        (1, True, False, ("w",), True),  # nothing delivered: anything may be resent
        (1, True, True, ("r",), True),  # delivered, but reading twice is harmless
        (1, True, True, ("w",), False),  # delivered: it may have truncated already
        (1, False, False, ("r",), False),  # a connection made for this call died
        (2, True, False, ("r",), False),  # once only
    ],
)
def test_may_retry(
    attempt: int, reused: bool, sent: bool, modes: tuple[str, ...], expected: bool
) -> None:
    request = open_request(*modes)
    assert calls.may_retry(attempt=attempt, reused=reused, sent=sent, request=request) is expected


def test_error_replies() -> None:
    busy = calls.refusal(ErrorReply(1, errno.EBUSY, "busy"))
    assert (busy.errno, busy.strerror) == (errno.EBUSY, "busy")
    assert not calls.closes_connection(ErrorReply(1, errno.EBUSY, "busy"))
    assert calls.closes_connection(ErrorReply(1, errno.EPROTO, "version"))


def test_socket_name_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(protocol.SOCKET_ENV, "from-env")
    assert calls.socket_name(None) == "from-env"
    assert calls.socket_name("given") == "given"
    monkeypatch.setenv(protocol.SOCKET_ENV, "")
    assert calls.socket_name(None) == protocol.DEFAULT_SOCKET
    assert calls.check_timeout(None) is None
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            calls.check_timeout(bad)
