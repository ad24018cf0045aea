"""What `privbroker explain` is asked about, as an admin writes it. Pure.

A question is a path (with access words), a socket target ("tcp:[::]:443",
"tun:vpn0"), or a network operation in `ip`'s words:

    address add|del CIDR dev DEV
    route add|del DST [dev DEV] [via GATEWAY]
    link set DEV [up|down] [mtu N]

A network operation is judged as the broker would judge it for a client
that leases DEV when DEV is a name the subject may create (a tun:/tap: glob
of a rule that grants it), else as a device it does not lease; the answer
says which it assumed.
"""

from __future__ import annotations

import fnmatch
from ipaddress import ip_address, ip_interface, ip_network

from .decision import Decision, Subject
from .netdecide import NetOp, decide_netop
from .rules import Policy

USAGE = (
    "address add|del CIDR dev DEV; route add|del DST [dev DEV] [via GATEWAY]; "
    "link set DEV [up|down] [mtu N]"
)


def is_phrase(text: str) -> bool:
    return " " in text.strip()


def explain_phrase(policy: Policy, s: Subject, text: str) -> Decision:
    """The decision for a network operation written as `ip` words.

    Raises:
        ValueError: the words are not one of USAGE's forms.
    """
    words = text.split()
    if len(words) < 3:
        raise ValueError(f"expected {USAGE}")
    what, verb, rest = words[0], words[1], words[2:]
    options = _options(rest[1:])
    if what == "address" and verb in ("add", "del") and set(options) == {"dev"}:
        iface = ip_interface(rest[0])
        dev = options["dev"]
        op = NetOp("address", f"{verb} address {iface.with_prefixlen} on {dev}", dev, False, iface)
    elif what == "route" and verb in ("add", "del") and set(options) <= {"dev", "via"}:
        dst = ip_network(rest[0])
        dev = options.get("dev", "")
        via = ip_address(options["via"]) if "via" in options else None
        where = (f" dev {dev}" if dev else "") + (f" via {via}" if via else "")
        op = NetOp("route", f"{verb} route {dst}{where}", dev, False, dst=dst, via=via)
    elif what == "link" and verb == "set" and set(options) <= {"up", "down", "mtu"} and options:
        dev = rest[0]
        mtu = int(options["mtu"]) if "mtu" in options else None
        change = " ".join(k if k != "mtu" else f"mtu {mtu}" for k in options)
        op = NetOp("link", f"set {dev} {change}", dev, False, mtu=mtu)
    else:
        raise ValueError(f"cannot read {text!r}: expected {USAGE}")
    leased = bool(op.ifname) and _may_lease(policy, s, op.ifname)
    decision = decide_netop(policy, s, _with_lease(op, leased))
    note = " (judged as a device this client leases)" if leased else ""
    return Decision(decision.allowed, decision.rule, decision.reason + note)


def _options(words: list[str]) -> dict[str, str]:
    """`dev X via Y` / `up mtu 1400` as a map; flags (up, down) map to ""."""
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        key = words[i]
        if key in ("up", "down"):
            if "up" in found or "down" in found:
                raise ValueError("up or down, once")
            found[key] = ""
            i += 1
        elif key in ("dev", "via", "mtu") and i + 1 < len(words) and key not in found:
            found[key] = words[i + 1]
            i += 2
        else:
            raise ValueError(f"unexpected {key!r}: expected {USAGE}")
    return found


def _may_lease(policy: Policy, s: Subject, dev: str) -> bool:
    return any(
        spec.kind in ("tun", "tap") and fnmatch.fnmatchcase(dev, spec.glob)
        for rule in policy.net_allow
        if rule.grants(s)
        for spec in rule.grant.specs
    )


def _with_lease(op: NetOp, leased: bool) -> NetOp:
    return NetOp(op.word, op.what, op.ifname, leased, op.address, op.dst, op.via, op.mtu)
