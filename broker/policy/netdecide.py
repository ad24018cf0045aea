"""The policy's decisions for network rules: a socket (`decide_socket`) and a
network operation (`decide_netop`).

Pure: a function of the compiled policy, the client's kernel identity and
the target it asked for (a SocketTarget, already checked when built).

Precedence, the same as for files (policy/decide.py):
1. A deny rule that refuses the subject and covers the target decides:
   denied. Deny rules judge the worst case (a wildcard address is in every
   network of its family, a socket with no device could reach any device),
   so a deny can never be walked around by the spelling of a request.
2. Else the first allow rule, in load order, that grants the subject and
   covers the target decides: allowed.
3. Else denied by default; the reason names the allow rule that concerns
   this client and came closest, and why it did not cover the target. Rules
   that do not concern the client are never named (docs/security.md,
   invariant 9).
Root is judged like anyone else: default deny holds for root clients too.
"""

from __future__ import annotations

import fnmatch
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from privbroker.protocol.targets import SocketTarget

from .decision import Decision, Subject
from .names import who
from .rules import NetRule, Policy
from .sockets import Network, SocketGrant


def decide_socket(
    policy: Policy, s: Subject, target: SocketTarget, *, v6only: bool | None = None
) -> Decision:
    """Whether `s` may have the socket `target`, the rule that decided, and why.

    A TCP or UDP socket bound to "::" without v6only is dual-stack: it takes
    IPv4 on every address too, so it is allowed only where "0.0.0.0" would be
    (docs/security.md, invariant 11)."""
    decision = socket_rule(policy, s, target)[0]
    if decision.allowed and v6only is not True and _dual_stack(target):
        twin = SocketTarget(
            target.kind, socket.AF_INET, target.port, "0.0.0.0", 0, "", target.interface
        )
        other = socket_rule(policy, s, twin)[0]
        if not other.allowed:
            why = (
                f"{target} without v6only takes IPv4 too, as {twin}: {other.reason}; ask for v6only"
            )
            return Decision(False, other.rule, why)
    return decision


def _dual_stack(target: SocketTarget) -> bool:
    return (
        target.kind in ("tcp", "udp")
        and target.family == socket.AF_INET6
        and target.address == "::"
    )


def socket_rule(
    policy: Policy, s: Subject, target: SocketTarget
) -> tuple[Decision, NetRule | None]:
    """decide_socket's answer, and the allow rule that granted (its limits apply)."""
    for rule in policy.net_deny:
        if rule.grant.specs and rule.refuses(s) and rule.grant.matches(target, deny=True)[0]:
            text = f"{target} denied by rule '{rule.name}'"
            if not rule.concerns(s):
                text += " (it names groups, and this client's group list could not be read in full)"
            return Decision(False, rule.name, text), None
    near: tuple[int, NetRule, str] | None = None
    for rule in policy.net_allow:
        if not rule.grant.specs or not rule.grants(s):
            continue
        covered, why = rule.grant.matches(target)
        if covered:
            return Decision(True, rule.name, f"{target} allowed by rule '{rule.name}'"), rule
        distance = _distance(rule, target)
        if near is None or distance < near[0]:
            near = (distance, rule, why)
    text = f"no rule allows {who(s)} the socket {target}"
    if near is None:
        return Decision(False, None, text), None
    _, rule, why = near
    return Decision(False, rule.name, f"{text}; rule '{rule.name}': {why}"), None


def _distance(rule: NetRule, target: SocketTarget) -> int:
    """How far a rule is from covering `target`: 0 when only the address or the
    device is wrong, 1 when the kind is right but not the port or protocol,
    2 when it grants no socket of that kind. The nearest is named."""
    kinds = [spec for spec in rule.grant.specs if spec.kind == target.spec_kind]
    if not kinds:
        return 2
    only_kind = SocketGrant(tuple(kinds))
    return 0 if only_kind.matches(target)[0] else 1


@dataclass(frozen=True)
class NetOp:
    """One network operation, as the policy judges it (built by net/netconf.py
    from a checked request): its `word` (address, link, route), whether the
    connection leases the device, and the values the rule's limits bound."""

    word: str
    what: str  # for reasons: "add address 10.8.0.2/24 on vpn0"
    ifname: str
    leased: bool
    address: IPv4Interface | IPv6Interface | None = None
    dst: Network | None = None
    via: IPv4Address | IPv6Address | None = None
    mtu: int | None = None


def decide_netop(policy: Policy, s: Subject, op: NetOp) -> Decision:
    """Whether `s` may have the broker do `op`; the same precedence as sockets.

    Allowed only on a device the connection leases, or one a rule's
    `interfaces` names; an address's whole network within the rule's
    `addresses` (or, with none, its `routes`); a route's destination and
    gateway within its `routes` (or, for the gateway, `addresses`); an MTU
    within its `mtu` range."""
    for rule in policy.net_deny:
        if op.word in rule.network and rule.refuses(s) and _deny_covers(rule, op):
            return Decision(False, rule.name, f"{op.what} denied by rule '{rule.name}'")
    near: tuple[int, NetRule, str] | None = None
    for rule in policy.net_allow:
        if op.word not in rule.network or not rule.grants(s):
            continue
        distance, why = _shortfall(rule, op)
        if not why:
            return Decision(True, rule.name, f"{op.what} allowed by rule '{rule.name}'")
        if near is None or distance < near[0]:
            near = (distance, rule, why)
    text = f"no rule allows {who(s)} to {op.what}"
    if near is None:
        return Decision(False, None, text)
    _, rule, why = near
    return Decision(False, rule.name, f"{text}; rule '{rule.name}': {why}")


def _matches_device(rule: NetRule, ifname: str) -> bool:
    return any(fnmatch.fnmatchcase(ifname, g) for g in rule.grant.interfaces)


def _shortfall(rule: NetRule, op: NetOp) -> tuple[int, str]:
    """Why `rule` does not allow `op` ("" when it does), and how far it is from
    it: the wrong device is further than a value outside its limits."""
    if not op.leased and not (op.ifname and _matches_device(rule, op.ifname)):
        if not op.ifname:
            return 2, "a route must name its device (dev=): without it, it could use any"
        return 2, f"{op.ifname} is not a device this client leases, nor one the rule names"
    return 1, _outside(rule, op)


def _outside(rule: NetRule, op: NetOp) -> str:
    """Which of the rule's limits `op` is outside ("" when none)."""
    # An address's prefix is a route too (the kernel adds it): with no
    # `addresses`, it must fall within `routes`.
    nets = rule.grant.networks or rule.routes
    if op.address is not None and not _within(op.address.network, nets):
        where = _nets(nets) or "any addresses or routes the rule names"
        return f"{op.address.with_prefixlen} is not within {where}"
    if op.dst is not None and not _within(op.dst, rule.routes):
        return f"route {op.dst} is not within {_nets(rule.routes) or 'any routes it allows'}"
    if op.via is not None and not any(op.via in n for n in (*rule.routes, *rule.grant.networks)):
        return f"gateway {op.via} is not within the rule's routes or addresses"
    if op.mtu is not None and rule.mtu is not None and not rule.mtu[0] <= op.mtu <= rule.mtu[1]:
        return f"mtu {op.mtu} is outside {rule.mtu[0]}-{rule.mtu[1]}"
    return ""


def _deny_covers(rule: NetRule, op: NetOp) -> bool:
    """A deny judges the worst case: any overlap with what it names counts."""
    if rule.grant.interfaces and not (op.ifname and _matches_device(rule, op.ifname)):
        return not op.ifname  # a route with no device could use a denied one
    nets = rule.grant.networks or rule.routes
    if nets and op.address is not None and not _overlaps(op.address.network, nets):
        return False
    return not (rule.routes and op.dst is not None and not _overlaps(op.dst, rule.routes))


def _within(net: Network, allowed: tuple[Network, ...]) -> bool:
    return any(net.version == a.version and net.subnet_of(a) for a in allowed)  # type: ignore[arg-type]


def _overlaps(net: Network, named: tuple[Network, ...]) -> bool:
    return any(net.version == n.version and net.overlaps(n) for n in named)


def _nets(nets: tuple[Network, ...]) -> str:
    return ", ".join(map(str, nets))
