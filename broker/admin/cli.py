"""`privbroker serve | check | explain | status | demo`: the broker's command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from privbroker import protocol as proto

from ..net.leasefile import RECORD_DIR
from ..policy.decision import FileType
from . import DEFAULT_POLICY

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
        help="ask the running broker on @NAME about its current policy (root only; "
        "access words only: --mode, --type and --new need --policy)",
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
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--access",
        metavar="WORDS",
        help="for a path: comma-separated access words: read,write,append,create,truncate",
    )
    what.add_argument(
        "--mode",
        metavar="MODE",
        help="for a path, instead of --access: an open() mode (r, w, a, x, r+, w+, a+, x+; "
        "b or t accepted), judged step by step as the broker judges that open, with what "
        "the fd will allow",
    )
    p.add_argument(
        "--type",
        choices=[t.value for t in FileType],
        help="the type of the file at PATH (default: what is there now; nothing there: a new name)",
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="with --mode: PATH does not exist yet (the open would create it)",
    )
    p.add_argument(
        "--v6only",
        action="store_true",
        help="for a tcp or udp socket on [::]: judged as bind_privileged(..., v6only=True) "
        "asks, IPv6 only (without it, [::] takes IPv4 too and is judged for both); "
        "needs --policy",
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
            if args.command == "explain":
                from .explain import explain_cmd

                return explain_cmd(args)
            return status_cmd(args)
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
