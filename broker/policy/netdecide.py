"""The policy's decision for a socket: `decide_socket(policy, subject, target)`.

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

from privbroker.protocol.targets import SocketTarget

from .decision import Decision, Subject
from .rules import NetRule, Policy


def decide_socket(policy: Policy, s: Subject, target: SocketTarget) -> Decision:
    """Whether `s` may have the socket `target`, the rule that decided, and why."""
    for rule in policy.net_deny:
        if rule.refuses(s) and rule.grant.matches(target, deny=True)[0]:
            text = f"{target} denied by rule '{rule.name}'"
            if not rule.concerns(s):
                text += " (it names groups, and this client's group list could not be read in full)"
            return Decision(False, rule.name, text)
    near: tuple[NetRule, str] | None = None
    for rule in policy.net_allow:
        if not rule.grants(s):
            continue
        covered, why = rule.grant.matches(target)
        if covered:
            return Decision(True, rule.name, f"{target} allowed by rule '{rule.name}'")
        if near is None:
            near = (rule, why)
    text = f"no rule allows {_who(s)} the socket {target}"
    if near is None:
        return Decision(False, None, text)
    rule, why = near
    return Decision(False, rule.name, f"{text}; rule '{rule.name}': {why}")


def _who(s: Subject) -> str:
    gids = ", ".join(str(g) for g in sorted(s.groups | {s.gid}))
    more = "" if s.groups_complete else ", list incomplete"
    return f"uid {s.uid} (gids {gids}{more})"
