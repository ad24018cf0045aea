"""`privbroker explain`: the decision for a request and the rule that made it,
from the policy file or from the running broker. A request is a path with
access words (or an open mode: explainmode.py), a socket target, or a network
operation in ip's words (policy/phrases.py)."""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import sys

from privbroker import protocol as proto

from ..policy.decision import FileType, Subject
from ..policy.opens import fd_allows
from . import DEFAULT_POLICY


def _subject(args: argparse.Namespace) -> Subject:
    if args.user is not None:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise SystemExit(f"privbroker explain: no such user: {args.user}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    else:
        uid = args.uid
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    if args.group:
        gids = [_gid(g) for g in args.group]
        gid = gids[0]
    else:
        try:
            name = pwd.getpwuid(uid).pw_name
            gids = os.getgrouplist(name, gid)
        except KeyError:
            gids = [gid]
    return Subject(uid, gid, frozenset((gid, *gids)))


def _gid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise SystemExit(f"privbroker explain: no such group: {text}") from None


def explain_cmd(args: argparse.Namespace) -> int:
    subject = _subject(args)
    args.path = " ".join(args.path)
    if args.v6only and (args.path.startswith("/") or " " in args.path):
        raise SystemExit("privbroker explain: --v6only is for a socket such as tcp:[::]:443")
    if args.mode is not None or args.new:
        from .explainmode import explain_mode

        return explain_mode(args, subject, args.policy or DEFAULT_POLICY)
    if " " in args.path:
        return _explain_operation(args, subject)
    is_socket = not args.path.startswith("/")
    if is_socket:
        from privbroker.protocol.targets import parse_socket_target

        if args.access or args.type:
            raise SystemExit("privbroker explain: --access and --type are for paths")
        if args.v6only and args.socket is not None:
            raise SystemExit("privbroker explain: --v6only needs --policy, not --socket")
        try:
            target = parse_socket_target(args.path)
        except ValueError as exc:
            raise SystemExit(f"privbroker explain: {exc}") from None
    elif not args.access:
        raise SystemExit("privbroker explain: a path needs --access (e.g. --access read)")
    try:
        words = (args.access or "").split(",")
        access = proto.Access.from_words(w.strip() for w in words if w.strip())
    except ValueError as exc:
        raise SystemExit(f"privbroker explain: {exc}") from None
    ftype = None if args.type is None else FileType(args.type)
    if args.socket is not None:
        from privbroker.api import Client

        if ftype is not None:
            raise SystemExit("privbroker explain: --type needs --policy, not --socket")
        with Client(args.socket) as client:
            gids = (subject.gid, *sorted(subject.groups - {subject.gid}))
            rep = client.explain(subject.uid, gids, args.path, access.words())
        allowed, rule, reason = rep.allowed, rep.rule, rep.reason
        near_rule, near_reason = rep.near_rule, rep.near_reason
    else:
        from ..policy.decide import PolicyError, explain, load_policy

        path = args.policy or DEFAULT_POLICY
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            return 2
        if is_socket:
            from ..policy.netdecide import decide_socket

            d = decide_socket(policy, subject, target, v6only=True if args.v6only else None)
            allowed, rule, reason, near_rule, near_reason = d.allowed, d.rule, d.reason, None, ""
        else:
            ex = explain(policy, subject, args.path, access, ftype)
            allowed, rule, reason = ex.decision.allowed, ex.decision.rule, ex.decision.reason
            near_rule, near_reason = ex.near_rule, ex.near_reason
    effective = [] if ftype is None else fd_allows(access, ftype).words()
    # The rule that decided: the allow rule that granted or the deny rule that
    # refused; a default denial has none (the rule it names came nearest).
    decided = rule if allowed or (rule and f"denied by rule '{rule}'" in reason) else None
    nearest = None if decided else (near_rule or rule)
    if args.json:
        print(
            json.dumps(
                {
                    "allowed": allowed,
                    "rule": decided,
                    "reason": reason,
                    "near_rule": nearest,
                    "near_reason": near_reason if nearest else "",
                    "uid": subject.uid,
                    "gid": subject.gid,
                    "groups": sorted(subject.groups),
                    "path": args.path,
                    "access": access.words(),
                    "type": args.type,
                    "effective_access": None if ftype is None else effective,
                }
            )
        )
    else:
        # Each fact once: the reason names the rule; the nearest rule only
        # when the reason does not already say why it fell short.
        print(f"{'allowed' if allowed else 'denied'}: {reason}")
        if ftype is not None:
            print(f"  the fd will allow: {', '.join(effective)}")
        if nearest and near_reason and near_reason not in reason and f"'{nearest}'" not in reason:
            print(f"  nearest: {near_reason}")
    return 0 if allowed else 1


def _explain_operation(args: argparse.Namespace, subject: Subject) -> int:
    """explain for a network operation (policy/phrases.py), from the file or the broker."""
    if args.access:
        raise SystemExit("privbroker explain: --access is for paths; an operation takes none")
    if args.socket is not None:
        from privbroker.api import Client

        with Client(args.socket) as client:
            gids = (subject.gid, *sorted(subject.groups - {subject.gid}))
            rep = client.explain(subject.uid, gids, args.path, [])
        allowed, rule, reason = rep.allowed, rep.rule, rep.reason
    else:
        from ..policy.decide import PolicyError, load_policy
        from ..policy.phrases import explain_phrase

        try:
            policy = load_policy(args.policy or DEFAULT_POLICY)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            d = explain_phrase(policy, subject, args.path)
        except ValueError as exc:
            raise SystemExit(f"privbroker explain: {exc}") from None
        allowed, rule, reason = d.allowed, d.rule, d.reason
    if args.json:
        fields = {"allowed": allowed, "rule": rule, "reason": reason, "operation": args.path}
        print(json.dumps({**fields, "uid": subject.uid, "gid": subject.gid}))
    else:
        print(f"{'allowed' if allowed else 'denied'}: {reason}")
        if rule:
            print(f"  rule: {rule}")
    return 0 if allowed else 1
