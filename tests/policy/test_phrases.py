"""explain for network operations in ip's words (policy/phrases.py), locally
and from a running broker, against the same decisions the broker makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from privbroker.api import Client
from privbroker.broker.policy.decide import Policy, Subject, load_policy
from privbroker.broker.policy.phrases import explain_phrase, is_phrase

POLICY = """\
version = 1

[[allow]]
name = "vpn"
users = [1001]
sockets = ["tun:vpn*"]
network = ["address", "link", "route"]
addresses = ["10.8.0.0/24"]
routes = ["10.9.0.0/16"]
mtu = [1280, 9000]

[[allow]]
name = "wg"
users = [1001]
network = ["link"]
interfaces = ["wg0"]  # and, as for any network rule, devices the client leases
mtu = [1280, 1420]

[[deny]]
name = "nothing that reaches the lab"
network = ["route"]
routes = ["192.0.2.0/24"]
"""

VPN = Subject(1001, 1001, frozenset({1001}))
OTHER = Subject(1002, 1002, frozenset({1002}))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("phrases") / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


CASES = [
    (VPN, "address add 10.8.0.2/24 dev vpn0", True, "vpn", "leases"),
    (VPN, "address del 10.8.0.2/24 dev vpn0", True, "vpn", ""),
    (VPN, "address add 10.8.0.2/16 dev vpn0", False, "vpn", "10.8.0.2/16"),
    (VPN, "route add 10.9.1.0/24 dev vpn0", True, "vpn", ""),
    (VPN, "route add 10.9.1.0/24 dev vpn0 via 10.8.0.1", True, "vpn", ""),
    (VPN, "route add 10.10.0.0/16 dev vpn0", False, "vpn", "10.10.0.0/16"),
    (VPN, "route add 10.9.0.0/16 via 10.8.0.1", False, "vpn", "name its device"),
    # a deny judges the worst case: a default route reaches the lab too
    (VPN, "route add 0.0.0.0/0 dev vpn0", False, "nothing that reaches the lab", "denied"),
    (VPN, "link set vpn0 up mtu 1400", True, "vpn", ""),
    (VPN, "link set vpn0 mtu 100", False, "vpn", "mtu 100"),
    (VPN, "link set vpn0 mtu 9000", True, "vpn", ""),
    (VPN, "link set wg0 mtu 9000", False, "wg", "mtu 9000 is outside 1280-1420"),
    (VPN, "link set wg0 down", True, "wg", ""),
    (VPN, "link set eth0 down", False, "vpn", "eth0 is not a device"),
    (OTHER, "link set vpn0 up", False, None, "no rule allows uid 1002"),
]


@pytest.mark.parametrize(("subject", "words", "allowed", "rule", "said"), CASES)
def test_explain_phrase(
    policy: Policy, subject: Subject, words: str, allowed: bool, rule: str | None, said: str
) -> None:
    d = explain_phrase(policy, subject, words)
    assert (d.allowed, d.rule) == (allowed, rule), d.reason
    assert said in d.reason


@pytest.mark.parametrize(
    "words",
    [
        "address add 10.8.0.2/24",
        "address add 10.8.0.2/24 dev vpn0 via 10.8.0.1",
        "route add nowhere dev vpn0",
        "link set vpn0",
        "link set vpn0 up down",
        "link set vpn0 mtu",
        "route flap 10.9.0.0/16 dev vpn0",
        "hello world",
    ],
)
def test_malformed_phrases_say_what_is_expected(policy: Policy, words: str) -> None:
    with pytest.raises(ValueError):
        explain_phrase(policy, VPN, words)
    assert is_phrase(words)


def explain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privbroker.broker", "explain", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_line_reads_ip_words(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    ok = explain(
        "--policy", str(path), "--uid", "1001", "route", "add", "10.9.0.0/16", "dev", "vpn0"
    )
    assert ok.returncode == 0 and "allowed" in ok.stdout and "rule: vpn" in ok.stdout
    no = explain("--policy", str(path), "--uid", "1001", "link", "set", "eth0", "down")
    assert no.returncode == 1 and "eth0 is not a device" in no.stdout
    bad = explain("--policy", str(path), "--uid", "1001", "route", "flap")
    assert bad.returncode == 1 and "expected address add" in bad.stderr


def test_the_running_broker_explains_operations(start_broker: Any) -> None:
    b = start_broker(POLICY)
    with Client(b.name) as client:
        rep = client.explain(1001, [1001], "route add 10.9.0.0/16 dev vpn0", [])
        assert (rep.allowed, rep.rule) == (True, "vpn")
        rep = client.explain(1001, [1001], "link set eth0 down", [])
        assert not rep.allowed and "eth0" in rep.reason
        rep = client.explain(1001, [1001], "tun:evil0", [])
        assert not rep.allowed
