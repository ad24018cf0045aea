"""Section 8 of the benchmark, netconf: add_address + del_address through the broker (issue 12).

Run by run.py (`python3 -m tests.bench.run --only netconf`), never alone.
Every figure is one pair: 10.8.0.2/24 added to an up tun device and deleted
again, each call returning once the kernel acknowledged it. Measured against:

- the floor: the same two rtnetlink requests in-process, as root, with the
  broker's own module and messages (`privbroker.broker.net.rtnl.Rtnl.call`
  with the `AddressFields` the broker builds, Kind.ADD_ADDRESS and
  DEL_ADDRESS); and, for reference, the same message built and sent in C
  (netconf_direct.c), which shows the floor's own Python share;
- privbroker as users run it: a client that leased a tun device through the
  broker (`Client.net.open_tun("bench%d")`, set up) calling
  `client.net.add_address` and `del_address`, the default audit on (to a
  file); `--audit off` as a secondary row;
- what scripts use: `ip addr add 10.8.0.2/24 dev DEV` and `ip addr del ...`,
  each run as a command (subprocess.run), per pair.

The floor and `ip` rows change the address on a tun device of their own,
opened the way the broker opens one and set up, so every row asks the kernel
for the same work. The whole section runs in a network namespace of its own
(unshare -n, lo up: tests/support/netns.py), brokers and workers in it:
nothing leaves it, and the devices go with it. The client runs as root, under
a policy granting uid 0 `tun:bench*` and address changes within 10.8.0.0/24.
Issue 12 states no numeric target: the table reports the ratios to the floor
and whether the Client beats `ip` run as commands.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tests.bench.run import MODES, PY, _v, _x, col, fig, ratio_table, ratios
from tests.support.netns import fresh_netns

ADDRESS = "10.8.0.2/24"


class NetconfUnavailable(Exception):
    """The section cannot run here (no /dev/net/tun, no `ip`, ...)."""


def policy_text() -> str:
    return "\n".join(
        [
            "version = 1",
            "",
            "[[allow]]",
            'name = "bench"',
            "users = [0]",
            'sockets = ["tun:bench*"]',
            'network = ["address", "link", "route"]',
            'addresses = ["10.8.0.0/24"]',
            # The policy refuses "route" in network without routes to judge them by.
            'routes = ["10.8.0.0/24"]',
            "",
        ]
    )


def _preflight() -> None:
    import shutil

    if not Path("/dev/net/tun").exists():
        raise NetconfUnavailable("no /dev/net/tun (modprobe tun)")
    if shutil.which("ip") is None:
        raise NetconfUnavailable("needs `ip` (iproute2)")


def section(b: Any) -> dict[str, Any]:
    """Both modes, every row measured back to back in each repetition."""
    _preflight()
    policy = b.tmp / "netconf.toml"
    policy.write_text(policy_text())
    if not b.has("netconf_direct"):
        b.notes.append("netconf: no C compiler: the in-process C row is skipped")
    out: dict[str, Any] = {"address": ADDRESS}
    with fresh_netns():
        for mode in MODES:
            out[mode] = _measure(b, mode == "pinned", policy)
    return out


def _worker(b: Any, mode: str, name: str, n: int, warm: int, pinned: bool) -> dict[str, float]:
    args = [PY, "-m", "tests.bench.netconf_worker", mode, name, ADDRESS, str(n), str(warm)]
    return json.loads(b._run(args, pinned).strip().splitlines()[-1])[0]  # type: ignore[no-any-return]


def _measure(b: Any, pinned: bool, policy: Path) -> dict[str, Any]:
    p = b.plan
    mode = "pinned" if pinned else "unpinned"
    rows: dict[str, list[dict[str, float]]] = {}
    # A pair is two round trips (and two execs for `ip`): half the latency section's count.
    n, warm = max(200, p.n // 2), max(50, p.warm // 2)
    ip_n, ip_warm = max(40, p.spawn_n // 2), max(5, p.spawn_n // 20)
    addr, plen = ADDRESS.split("/")

    def add(key: str, value: dict[str, float]) -> None:
        rows.setdefault(key, []).append(value)

    def client(srv: Any) -> dict[str, float]:
        before = srv.cpu_s()
        r = _worker(b, "client", srv.name, n, warm, pinned)
        # The lease's open_tun and set_link are in it too: 2 of 2 * (n + warm) + 2 requests.
        r["server_cpu_us"] = (srv.cpu_s() - before) / (n + warm) * 1e6
        return r

    with contextlib.ExitStack() as stack:
        pb = stack.enter_context(b.server("privbroker", pinned, policy))  # audit to a file
        pb_off = stack.enter_context(b.server("privbroker", pinned, policy, audit=False))
        for rep in range(p.reps):
            b.log(f"netconf {mode} {rep + 1}/{p.reps}")
            if b.has("netconf_direct"):
                cmd = [str(b.bin["netconf_direct"]), addr, plen, str(n), str(warm)]
                add("direct_c", json.loads(b._run(cmd, pinned).strip().splitlines()[-1]))
            add("floor", _worker(b, "floor", "-", n, warm, pinned))
            add("pb_client", client(pb))
            add("pb_client_noaudit", client(pb_off))
            add("ip", _worker(b, "ip", "-", ip_n, ip_warm, pinned))
            b.check_alive(pb, "during the netconf section")
            b.check_alive(pb_off, "during the netconf section")
    res: dict[str, Any] = {k: {f: fig(col(v, f)) for f in v[0]} for k, v in rows.items()}
    base = rows["floor"]
    for key, reps in rows.items():
        res[key]["x_floor_p50"] = ratios(col(reps, "p50_us"), col(base, "p50_us"))
        res[key]["x_floor_p99"] = ratios(col(reps, "p99_us"), col(base, "p99_us"))
    for key in ("pb_client", "pb_client_noaudit"):
        # Above 1: privbroker's Client is that many times faster than `ip` as commands.
        res[key]["ip_over_pb_p50"] = ratios(col(rows["ip"], "p50_us"), col(rows[key], "p50_us"))
        res[key]["ip_over_pb_p99"] = ratios(col(rows["ip"], "p99_us"), col(rows[key], "p99_us"))
    return res


# ------------------------------------------------------------------ report

LABELS = (
    ("direct_c", "the same messages in-process (C)"),
    ("floor", "Rtnl.call in-process, root   [the floor]"),
    ("pb_client", "privbroker <- Client.net (audit file)"),
    ("pb_client_noaudit", "  the same, --audit off"),
    ("ip", "`ip addr add` + `ip addr del`, commands"),
)


def render(nc: dict[str, Any]) -> list[str]:
    L = ratio_table(
        f"8. Netconf: add_address + del_address of {nc['address']} on an up tun device, "
        "one pair (us); x = ratio to Rtnl.call in-process (the floor)",
        nc,
        LABELS,
        ("ip",),
    )
    a_all, u_all = nc.get("pinned", {}), nc.get("unpinned", {})
    for key, label in (
        ("pb_client", "`ip` commands / Client.net (audit file)"),
        ("pb_client_noaudit", "  the same, --audit off"),
    ):
        a, u = a_all.get(key, {}), u_all.get(key, {})
        if a.get("ip_over_pb_p50") or u.get("ip_over_pb_p50"):
            L.append(
                f"  {label:44}{_x(a.get('ip_over_pb_p50')):>13}{_x(a.get('ip_over_pb_p99')):>9}"
                f"{'':15}   {_x(u.get('ip_over_pb_p50')):>12}{_x(u.get('ip_over_pb_p99')):>8}"
            )
    L.append("  broker CPU per pair (us):")
    for key, label in (
        ("pb_client", "privbroker, audit to a file"),
        ("pb_client_noaudit", "privbroker, --audit off"),
    ):
        a, u = a_all.get(key, {}), u_all.get(key, {})
        if a.get("server_cpu_us") or u.get("server_cpu_us"):
            L.append(
                f"    {label:42}{_v(a.get('server_cpu_us')):>13}{'':24}   "
                f"{_v(u.get('server_cpu_us')):>12}"
            )
    L.append("  issue 12 states no numeric target; privbroker (audit file) against `ip` commands:")
    for mode in MODES:
        f = (nc.get(mode, {}).get("pb_client") or {}).get("ip_over_pb_p50") or {}
        v = f.get("median")
        if v is not None:
            verdict = "beats" if v > 1 else "does NOT beat"
            L.append(
                f"    {mode}: Client.net {verdict} `ip` as commands "
                f"(p50: `ip` takes {_x(f)} the Client's time)"
            )
    return L
