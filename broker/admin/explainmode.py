"""`privbroker explain --mode M [--type T | --new] PATH`: one open, judged as the broker would.

The judgement is policy/opens.py `judge_open`, through policy/decide.py
`explain_open`: the very questions files/opener.py asks the policy, in its
order, so what explain approves the broker serves. Only the filesystem's own
refusals (root's permissions, a FIFO with no reader, hard links) are left out.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from ..policy.decision import FileType, Subject


def _file_type(args: argparse.Namespace) -> FileType | None:
    """The type of the file at the path: --type, --new (None), else what is there now."""
    if args.new:
        if args.type is not None:
            raise SystemExit("privbroker explain: --new and --type exclude each other")
        return None
    if args.type is not None:
        return FileType(args.type)
    try:
        st = os.stat(args.path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SystemExit(
            f"privbroker explain: cannot look at {args.path} ({exc.strerror}); give --type or --new"
        ) from None
    return FileType.from_mode(st.st_mode)


def explain_mode(args: argparse.Namespace, subject: Subject, policy_path: str) -> int:
    from ..policy.decide import PolicyError, explain_open, load_policy

    if args.mode is None:
        raise SystemExit("privbroker explain: --new goes with --mode")
    if args.socket is not None:
        raise SystemExit(
            "privbroker explain: --mode needs --policy; the running broker (--socket) "
            "is asked about access words only (--access)"
        )
    if not args.path.startswith("/"):
        raise SystemExit("privbroker explain: --mode is for a path")
    ftype = _file_type(args)
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        ex = explain_open(policy, subject, args.path, args.mode, ftype)
    except ValueError as exc:
        raise SystemExit(f"privbroker explain: {exc}") from None
    j = ex.judgement
    d = j.decision
    verdict = "allowed" if j.allowed else "denied" if j.errno == errno.EACCES else "fails"
    rule = d.rule if d is not None else None
    near = ex.explanation
    near_rule, near_reason = None, ""
    if near is not None and not j.allowed and near.near_rule:
        near_rule, near_reason = near.near_rule, near.near_reason
    code = errno.errorcode.get(j.errno) if j.errno else None
    if args.json:
        print(
            json.dumps(
                {
                    "allowed": j.allowed,
                    "verdict": verdict,
                    "errno": j.errno,
                    "error": code,
                    "rule": rule,
                    "reason": j.reason,
                    "near_rule": near_rule,
                    "near_reason": near_reason,
                    "uid": subject.uid,
                    "gid": subject.gid,
                    "groups": sorted(subject.groups),
                    "path": args.path,
                    "mode": args.mode,
                    "type": None if ftype is None else ftype.value,
                    "new": ftype is None,
                    "access": j.access.words(),
                    "needs": j.needs.words(),
                    "effective_access": j.effective.words(),
                }
            )
        )
    else:
        what = f"a new file at {args.path}" if ftype is None else f"{ftype.value} {args.path}"
        print(f"{verdict}: {j.reason}" + (f" ({code})" if verdict == "fails" else ""))
        print(f"  open {args.mode!r} of {what}: asks for {', '.join(j.access.words())}")
        if rule:
            print(f"  rule: {rule}")
        print(f"  the fd will allow: {', '.join(j.effective.words())}")
        if near_rule:
            print(f"  nearest: {near_reason}")
    return 0 if j.allowed else 1
