"""The capabilities a policy's network rules need the broker to keep
(docs/security.md, invariant 13).

The broker starts with root's full set and, once the policy is loaded, keeps
only what opening files needs (admin/harden.py KEEP) and what this module
says the policy's network rules need:
- CAP_SETUID and CAP_SETGID for any socket rule: the socket is created
  under the client's filesystem ids (setfsuid/setfsgid), so it belongs to
  the client, for `ss -e` and for firewall rules matching its owner;
- CAP_NET_BIND_SERVICE for ports below ip_unprivileged_port_start;
- CAP_NET_RAW for raw sockets; CAP_NET_ADMIN for tun/tap and network
  operations. ICMP needs no capability: gid 0 within ping_group_range.
A capability dropped cannot come back, so a reload whose policy needs one
the broker no longer holds is refused (`missing`), and the broker says to
restart it.
"""

from __future__ import annotations

from ..policy.rules import Policy
from .sockets import needed_capabilities

CAP_SETGID = 6
CAP_SETUID = 7
_SOCKET_KINDS = frozenset({"tcp", "udp", "icmp", "icmp6", "raw"})
NAMES = {
    CAP_SETGID: "CAP_SETGID",
    CAP_SETUID: "CAP_SETUID",
    10: "CAP_NET_BIND_SERVICE",
    12: "CAP_NET_ADMIN",
    13: "CAP_NET_RAW",
}


def network_capabilities(policy: Policy) -> frozenset[int]:
    """What the policy's network allow rules need beyond the file opener's set."""
    specs = [spec for rule in policy.net_allow for spec in rule.grant.specs]
    caps = needed_capabilities(specs, network=any(rule.network for rule in policy.net_allow))
    if any(spec.kind in _SOCKET_KINDS for spec in specs):
        caps |= {CAP_SETUID, CAP_SETGID}
    return frozenset(caps)


def missing(policy: Policy, held: frozenset[int] | None) -> str:
    """Why `policy` cannot be served with the capabilities `held` ("" if it can;
    None held means none were dropped)."""
    if held is None:
        return ""
    lacking = sorted(network_capabilities(policy) - held)
    if not lacking:
        return ""
    names = ", ".join(NAMES.get(c, str(c)) for c in lacking)
    return (
        f"this policy needs {names}, which the broker dropped at start (it keeps only what "
        "the policy it started with needs): restart the broker to serve it"
    )
