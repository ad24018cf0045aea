"""`privbroker serve | check | explain | status | demo`: the broker's command line."""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import pwd
import sys
from collections.abc import Sequence

from privbroker import protocol as proto

from ..net.leasefile import RECORD_DIR
from ..policy.decision import Subject

DEFAULT_POLICY = "/etc/privbroker/policy.toml"

log = logging.getLogger("privbroker")


def _default_socket() -> str:
    return os.environ.get(proto.SOCKET_ENV) or proto.DEFAULT_SOCKET


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..core.connection import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker: serve POLICY on the abstract socket @NAME.",
    )
    p.add_argument(
        "--policy", default=DEFAULT_POLICY, help=f"policy file (default {DEFAULT_POLICY})"
    )
    p.add_argument(
        "--socket",
        default=None,
        metavar="NAME",
        help=f"abstract socket name (default ${proto.SOCKET_ENV} or '{proto.DEFAULT_SOCKET}')",
    )
    p.add_argument(
        "--audit",
        default="-",
        metavar="FILE",
        help="audit log: a file to append JSON lines to; '-' for stderr (the default; "
        "under systemd that is the journal); 'journal' for journald fields; or 'off'",
    )
    p.add_argument(
        "--audit-max-bytes",
        type=int,
        default=0,
        metavar="BYTES",
        help="rename the --audit FILE to FILE.1 (replacing it) once it holds this many "
        "bytes, and start a new one (default 0: never; logrotate's job, deploy/README.md)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help=f"connections open at once (default {d.max_connections})",
    )
    p.add_argument(
        "--max-connections-per-uid",
        type=int,
        default=d.max_connections_per_uid,
        help=f"connections one uid may hold (default {d.max_connections_per_uid})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout,
        metavar="SECONDS",
        help=f"close connections silent this long (default {d.idle_timeout:g})",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=d.max_pending,
        help="requests one connection may have waiting for slow opens before the "
        f"broker stops reading from it (default {d.max_pending})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="threads for opens that may block: network filesystems, devices, "
        f"cold caches (default {d.workers})",
    )
    p.add_argument(
        "--open-timeout",
        type=float,
        default=d.open_timeout,
        metavar="SECONDS",
        help="answer ETIMEDOUT for an open still blocked after this long "
        f"(default {d.open_timeout:g})",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="broker processes sharing the socket, one per core to use (default 1); "
        "the limits apply to each process, the fds in flight to clients are split",
    )
    p.add_argument(
        "--lease-dir",
        default=str(RECORD_DIR),
        metavar="DIR",
        help="where the devices leased to clients are recorded, so that a restarted "
        f"broker deletes what the last one left (default {RECORD_DIR}; root-only)",
    )
    p.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="serve every request in Python, never in the native fast path "
        "(broker/files/_fast.c: repeated opens the broker has already judged)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe messages logged to stderr (the journal under systemd; default info)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privbroker",
        description="privbroker: open privileged files for unprivileged programs, by policy.",
    )
    parser.add_argument("--version", action="version", version=f"privbroker {proto.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)

    p = sub.add_parser(
        "check",
        help="validate a policy file and its includes",
        description="Validate a policy file. Exit 0 when valid, 1 with one "
        "line per problem (FILE:LINE: rule 'NAME': what is wrong).",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help=f"the policy file to check, with its includes (default {DEFAULT_POLICY})",
    )

    p = sub.add_parser(
        "explain",
        help="why a request would be allowed or denied",
        description="Print the decision for a request and the rule that made it. "
        "Exit 0 when allowed, 1 when denied.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--policy", default=None, help=f"policy file (default {DEFAULT_POLICY})")
    src.add_argument(
        "--socket",
        default=None,
        metavar="NAME",
        help="ask the running broker on @NAME about its current policy (root only)",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user name (its groups are looked up)")
    who.add_argument("--uid", type=int, help="a uid (its primary group and groups are looked up)")
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a group name or gid (repeatable); replaces the looked-up groups",
    )
    p.add_argument(
        "--access",
        metavar="WORDS",
        help="for a path: comma-separated access words: read,write,append,create,truncate",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "path",
        nargs="+",
        metavar="PATH|SOCKET|OPERATION",
        help="an absolute path; a socket as privopen --listen names one (tcp:[::]:443, "
        "udp:0.0.0.0:53, icmp, icmp6, raw:icmp, tun:vpn0, ...@DEV); or a network "
        "operation in ip's words (address add 10.8.0.2/24 dev vpn0, route add "
        "10.9.0.0/16 dev vpn0, link set vpn0 up mtu 1400)",
    )

    p = sub.add_parser("status", help="what the running broker is doing (root only)")
    p.add_argument(
        "--socket",
        default=None,
        metavar="NAME",
        help="the running broker's abstract socket (default $PRIVBROKER_SOCKET or 'privbroker')",
    )
    p.add_argument(
        "--json", action="store_true", help="print the fields as one JSON object, keys sorted"
    )

    p = sub.add_parser("demo", help="show a client reading a root-only file through a broker")
    p.add_argument(
        "--policy", help="the policy to serve (default: the demo policy shipped with privbroker)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .run import serve  # the broker itself: loaded only to serve

        return serve(args, args.socket or _default_socket())
    if args.command == "check":
        return check(args.policy)
    if args.command in ("explain", "status"):
        from privbroker import PrivbrokerError

        try:
            return explain_cmd(args) if args.command == "explain" else status_cmd(args)
        except (OSError, PrivbrokerError) as exc:
            # No broker, not root, not the broker we expect: one line, exit 2.
            print(f"privbroker {args.command}: {exc}", file=sys.stderr)
            return 2
    from .demo import run_demo

    return run_demo(args.policy)


def check(path: str) -> int:
    from ..policy.decide import check_policy

    problems = check_policy(path)
    for problem in problems:
        print(problem, file=sys.stdout if problem.warning else sys.stderr)
    errors = [p for p in problems if not p.warning]
    if not errors:
        print(f"{path}: ok", file=sys.stdout)
    return 1 if errors else 0


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
    if " " in args.path:
        return _explain_operation(args, subject)
    is_socket = not args.path.startswith("/")
    if is_socket:
        from privbroker.protocol.targets import parse_socket_target

        if args.access:
            raise SystemExit("privbroker explain: --access is for paths; a socket takes none")
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
    if args.socket is not None:
        from privbroker.api import Client

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

            d = decide_socket(policy, subject, target)
            allowed, rule, reason, near_rule, near_reason = d.allowed, d.rule, d.reason, None, ""
        else:
            ex = explain(policy, subject, args.path, access)
            allowed, rule, reason = ex.decision.allowed, ex.decision.rule, ex.decision.reason
            near_rule, near_reason = ex.near_rule, ex.near_reason
    if args.json:
        print(
            json.dumps(
                {
                    "allowed": allowed,
                    "rule": rule,
                    "reason": reason,
                    "near_rule": near_rule,
                    "near_reason": near_reason,
                    "uid": subject.uid,
                    "gid": subject.gid,
                    "groups": sorted(subject.groups),
                    "path": args.path,
                    "access": access.words(),
                }
            )
        )
    else:
        print(f"{'allowed' if allowed else 'denied'}: {reason}")
        if rule:
            print(f"  rule: {rule}")
        if not allowed and near_rule:
            # near_reason names the rule itself ("rule 'x' would allow it but ...").
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


def status_cmd(args: argparse.Namespace) -> int:
    from privbroker.api import Client

    with Client(args.socket) as client:
        fields = client.status()
    if args.json:
        print(json.dumps(dict(fields), sort_keys=True))
    else:
        width = max(map(len, fields))
        for key in sorted(fields):
            print(f"{key:<{width}}  {fields[key]}")
    return 0
