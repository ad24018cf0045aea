"""What `privbroker status` and systemd's STATUS= line say about a running broker."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Protocol

from privbroker import protocol as proto

if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Sized

    from ..policy.rules import Policy
    from .audit import AuditLog
    from .budget import FdBudget
    from .dispatch import Dispatcher
    from .procs import Shared
    from .routes import Services


class Running(Protocol):
    """What status reads of a running broker (core/server.py's Broker)."""

    started: float
    policy_path: str
    policy_loaded: float
    last_reload_error: str
    stats: Counter[str]
    shared: Shared | None

    @property
    def policy(self) -> Policy: ...

    @property
    def conns(self) -> Sized: ...

    @property
    def fast(self) -> object: ...

    @property
    def dispatch(self) -> Dispatcher: ...

    @property
    def budget(self) -> FdBudget: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def services(self) -> Services: ...


# Counters reported as they are (0 when nothing has happened yet).
COUNTERS = (
    "connections",
    "refused_connections",
    "idle_closed",
    "requests",
    "allowed",
    "denied",
    "failed",
    "protocol_errors",
    "reloads",
    "reload_failures",
    "accept_errors",
    "worker_opens",
    "fast_opens",
    "fast_sockets",
    "timeouts",
    "internal_errors",
    "stale_peers",
    "unsupported_ops",
)


GAUGES = ("connections_open", "requests_at_workers", "fds_unread_by_clients", "audit_dropped")
# The audit log's records written, and decisions summarized (core/audit.py).
AUDIT = ("audit_written", "audit_coalesced", "audit_aggregated")
SUMMED = GAUGES + AUDIT + COUNTERS  # what status adds up over the broker's processes


def counted(b: Running) -> dict[str, int]:
    """This process's counters and gauges: what status sums over processes."""
    values = {
        "connections_open": len(b.conns),
        "requests_at_workers": len(b.dispatch.pending),
        "fds_unread_by_clients": b.budget.unread,
        "audit_dropped": b.audit.dropped,
        "audit_written": b.audit.written,
        "audit_coalesced": b.audit.coalesced,
        "audit_aggregated": b.audit.aggregated,
    }
    for key in COUNTERS:
        values[key] = b.stats[key]
    return values


def status_fields(b: Running) -> dict[str, object]:
    """Everything `privbroker status` shows: a flat map of names to values.

    With several broker processes (procs.py), the counters are the sums over
    all of them; pid, policy and reload fields are this process's."""
    fields: dict[str, object] = {
        "pid": os.getpid(),
        "version": proto.__version__,
        "uptime_s": round(time.time() - b.started, 1),
        "policy": b.policy_path,
        "policy_loaded": b.policy_loaded,
        "rules": b.policy.rule_count,
        "fast_path": b.fast is not None,
        "processes": b.shared.processes if b.shared else 1,
        "last_reload_error": b.last_reload_error,
        # Users and groups rules name that did not resolve: those rules serve without them.
        "disabled_names": _disabled_names(b.policy),
    }
    fields.update(b.services.net.status())
    values = counted(b)
    if b.shared:
        b.shared.publish(values)
        values = b.shared.totals()
    fields.update(values)
    return fields


# Enough to see what is wrong; `privbroker check` lists them all.
MAX_DISABLED_SHOWN = 50


def _disabled_names(policy: Policy) -> list[str]:
    shown = [str(p) for p in policy.unresolved[:MAX_DISABLED_SHOWN]]
    if len(policy.unresolved) > MAX_DISABLED_SHOWN:
        shown.append(f"... and {len(policy.unresolved) - MAX_DISABLED_SHOWN} more")
    return shown


def status_line(b: Running) -> str:
    """One line for `systemctl status` (sd_notify STATUS=)."""
    s = b.stats
    line = (
        f"{b.policy.rule_count} rules, {len(b.conns)} connections, "
        f"{s['allowed']} allowed, {s['denied']} denied"
    )
    if b.last_reload_error:
        line += "; last reload refused (see log)"
    return line
