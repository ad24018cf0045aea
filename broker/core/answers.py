"""Answers the loop gives from the policy alone, with no resource touched:
EXPLAIN for root (a path with access words, a socket target, or a network
operation in ip's words), STATUS, and the remembered decisions the opener
asks for (`judge_with_cache`).
"""

from __future__ import annotations

import errno
import pwd
from collections.abc import Callable
from typing import Any

from privbroker import protocol as proto
from privbroker.protocol.targets import parse_socket_target

from ..policy.decide import Policy, decide, explain
from ..policy.decision import Decision, FileType, Subject
from ..policy.netdecide import decide_socket
from ..policy.phrases import explain_phrase, is_phrase


def admin_reply(
    policy: Policy, req: proto.Request, mismatch: str, status: Callable[[], dict[str, Any]]
) -> proto.Reply:
    """The reply to an EXPLAIN or STATUS request (the loop has checked it is root's)."""
    if mismatch:
        return proto.ErrorReply(req.id, errno.EACCES, mismatch)
    if isinstance(req, proto.ExplainRequest):
        return explain_reply(policy, req)
    return proto.StatusReply(req.id, status())


def explain_reply(policy: Policy, req: proto.ExplainRequest) -> proto.Reply:
    gid = req.gids[0] if req.gids else _primary_gid(req.uid)
    subject = Subject(req.uid, gid, frozenset((gid, *req.gids)))
    if not req.path.startswith("/"):  # a socket or an operation (docs/protocol.md)
        try:
            if is_phrase(req.path):
                d = explain_phrase(policy, subject, req.path)
            else:
                d = decide_socket(policy, subject, parse_socket_target(req.path))
        except ValueError as exc:
            return proto.ErrorReply(req.id, errno.EINVAL, f"{req.path!r}: {exc}")
        return proto.ExplainReply(req.id, d.allowed, d.rule, d.reason)
    ex = explain(policy, subject, req.path, req.access)
    d = ex.decision
    return proto.ExplainReply(req.id, d.allowed, d.rule, d.reason, ex.near_rule, ex.near_reason)


# decide() is pure: the same question about the same policy has the same
# answer, so answers are remembered, per policy and subject, up to this many.
DECISION_CACHE_SIZE = 4096
DECISION_CACHE_SUBJECTS = 256
DECISION_CACHE_PATH = 512


def judge_with_cache(
    policy: Policy, subject: Subject, cache: dict[tuple[str, int, int], Decision]
) -> Callable[[str, proto.Access, FileType | None], Decision]:
    def judge(path: str, access: proto.Access, ftype: FileType | None) -> Decision:
        # Enum hashing runs Python code; the member's value and identity do not.
        key = (path, access._value_, id(ftype))
        d = cache.get(key)
        if d is None:
            d = decide(policy, subject, path, access, ftype)
            # Remember what is worth it and small: not the default denials any
            # client can ask for endlessly, not long paths.
            if len(path) <= DECISION_CACHE_PATH and (d.allowed or d.rule is not None):
                if len(cache) >= DECISION_CACHE_SIZE:
                    cache.clear()
                cache[key] = d
        return d

    return judge


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid
