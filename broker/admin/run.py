"""`privbroker serve`: harden, bind (or take systemd's socket), serve.

With --processes N, the first process forks the others once the socket is
listening (broker/core/procs.py) and supervises them; each builds its own broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import sys
from pathlib import Path

from ..core import procs, systemd
from ..core.audit import AuditLog
from ..core.connection import Limits
from ..core.listen import bind_listener
from ..core.ratelimit import PerCause
from ..core.server import Broker
from ..core.status import SUMMED
from ..core.systemd import ActivationError, activated_listener
from ..files.opener import Opener, OpenerUnavailable
from ..net.caps import network_capabilities
from ..net.sockets import ping_range_allows_root
from ..policy.decide import Policy, PolicyError, load_policy
from .harden import drop_to, harden

log = logging.getLogger("privbroker")


def serve(args: argparse.Namespace, name: str) -> int:
    """Serve until SIGTERM; the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="privbroker[%(process)d]: %(levelname)s: %(message)s",
    )
    if os.geteuid() != 0:
        # A broker that is not root can hand out only what its clients could
        # open themselves, and would judge them from a policy it may not own.
        log.error(
            "serve must run as root (it is uid %d): it opens files and makes sockets for "
            "clients as root; start it as root, or under systemd (deploy/README.md)",
            os.geteuid(),
        )
        return 1
    # A storm (of connections, of violations) must not become a storm of lines.
    limiter = PerCause()
    log.addFilter(limiter)
    harden(keep_fds=set(systemd.listen_fds(unset=False)))
    # Every connection costs an fd: allow as many as the hard limit lets us.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = args.processes
    if not 1 <= n <= procs.MAX_PROCESSES:
        log.error("--processes must be 1 to %d", procs.MAX_PROCESSES)
        return 2
    if args.audit_max_bytes < 0:
        log.error("--audit-max-bytes must be 0 (no limit) or more")
        return 2
    if n > 1 and hard // 2 // n < procs.MIN_BUDGET:
        log.error(
            "--processes %d needs RLIMIT_NOFILE of at least %d, not %d: half of it is for fds "
            "in flight to clients, which the kernel counts for all the processes together",
            n,
            2 * n * procs.MIN_BUDGET,
            hard,
        )
        return 1
    # Each connection holds 2 fds (its socket and the peer's pidfd), and half
    # the limit is kept for fds in flight to clients (core/budget.py), split
    # between the processes.
    need = 2 * args.max_connections + hard // 2 // n + 64
    if need > hard:
        log.warning(
            "RLIMIT_NOFILE is %d: too low for --max-connections %d (each connection holds "
            "2 fds, and half the limit is kept for fds in flight); raise LimitNOFILE= or "
            "lower --max-connections",
            hard,
            args.max_connections,
        )
    limits = Limits(  # for each process
        max_connections=args.max_connections,
        max_connections_per_uid=args.max_connections_per_uid,
        idle_timeout=args.idle_timeout,
        max_pending=args.max_pending,
        workers=args.workers,
        open_timeout=args.open_timeout,
    )
    shared = procs.Shared(n, SUMMED) if n > 1 else None
    try:
        opener = Opener()
    except OpenerUnavailable as exc:
        log.error("%s", exc)
        return 1
    # Capabilities are per thread: they are cut before the first thread (the
    # audit writer, the workers) starts, once the policy says what it needs.
    try:
        policy = load_policy(args.policy)
    except (PolicyError, OSError) as exc:
        log.error("cannot load policy %s:\n%s", args.policy, getattr(exc, "strerror", None) or exc)
        return 1
    caps_held = drop_to(network_capabilities(policy))
    _network_notes(policy, caps_held)
    try:
        audit = _audit_log(args)
    except OSError as exc:
        if args.audit == "journal" or args.audit.startswith("journal:"):
            where = args.audit.partition(":")[2] or "/run/systemd/journal/socket"
            log.error(
                "--audit journal: journald is not reachable at %s (%s): is systemd-journald "
                "running? Use --audit FILE or '-' instead",
                where,
                exc.strerror or exc,
            )
        else:
            log.error("cannot open the audit log %s: %s", args.audit, exc.strerror or exc)
        return 1
    try:
        broker = Broker(
            args.policy,
            limits=limits,
            audit=audit,
            opener=opener,
            fast=args.fast_path,
            shared=shared,
            lease_dir=Path(args.lease_dir),
            policy=policy,
        )
    except OSError as exc:
        log.error("cannot start serving %s: %s", args.policy, exc.strerror or exc)
        audit.close()
        return 1
    broker.caps_held = caps_held
    # Handlers first: a SIGTERM that comes as soon as the socket is bound
    # must still end in a clean stop.
    broker.install_signal_handlers()
    try:
        listener = activated_listener()
        listener_activated = listener is not None
        if listener is not None:
            name = _sockname(listener) + " (socket-activated)"
        else:
            listener = bind_listener(name, limits.backlog)
    except ActivationError as exc:
        log.error("%s", exc)
        audit.close()
        return 1
    except OSError as exc:
        log.error("cannot listen on @%s: %s", name, exc.strerror)
        audit.close()
        return 1
    where = name if listener_activated else f"@{name}"
    log.info("serving %s (%d rules) on %s", args.policy, broker.policy.rule_count, where)
    for warning in broker.policy.warnings:
        log.warning("%s", warning)
    supervisor = None
    if shared is not None:
        # The others build their own broker, around this policy, on the same
        # listener (procs.py); this one's objects are left untouched in them.
        def other() -> int:
            return _serve_more(args, limits, listener, shared, broker.policy, broker.caps_held)

        supervisor = procs.Supervisor(broker)
        try:
            supervisor.start(n - 1, shared, other)
        except OSError as exc:  # fork failed (EAGAIN, ENOMEM): stop those started
            log.error("cannot start %d broker processes: %s", n, exc.strerror or exc)
            supervisor.stop()
            listener.close()
            audit.close()
            return 1
        log.info("%d broker processes share the socket", n)
    try:
        broker.serve_forever(listener)
    finally:
        if supervisor is not None:
            supervisor.stop()
        listener.close()
        audit.close()
    limiter.flush()
    log.info("stopped")
    return 1 if supervisor is not None and supervisor.failed else 0


def _network_notes(policy: Policy, held: frozenset[int] | None) -> None:
    """Say, once at start, what keeps network rules from being served."""
    icmp = any(s.kind in ("icmp", "icmp6") for r in policy.net_allow for s in r.grant.specs)
    if icmp and not ping_range_allows_root():
        log.warning(
            "icmp rules cannot be served while net.ipv4.ping_group_range excludes gid 0 "
            '(deploy/99-privbroker.conf sets it to "0 0")'
        )
    if held is None and network_capabilities(policy):
        log.info("capabilities were not dropped: serving with what the broker started with")


def _serve_more(
    args: argparse.Namespace,
    limits: Limits,
    listener: socket.socket,
    shared: procs.Shared,
    policy: Policy,
    caps_held: frozenset[int] | None,
) -> int:
    """One more broker process on `listener` (in a child of `serve`, which
    dropped the capabilities before forking it: `caps_held` says what is left)."""
    audit = _audit_log(args)
    try:
        broker = Broker(
            args.policy,
            limits=limits,
            audit=audit,
            opener=Opener(),
            fast=args.fast_path,
            shared=shared,
            lease_dir=Path(args.lease_dir),
            policy=policy,
        )
        broker.caps_held = caps_held
        broker.install_signal_handlers()
        log.info("broker process %d of %d serving", shared.index + 1, shared.processes)
        broker.serve_forever(listener)
    finally:
        audit.close()
    return 0


def _audit_log(args: argparse.Namespace) -> AuditLog:
    return AuditLog(None if args.audit == "off" else args.audit, max_bytes=args.audit_max_bytes)


def _sockname(sock: object) -> str:
    name = sock.getsockname()  # type: ignore[attr-defined]
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode()
    return str(name)
