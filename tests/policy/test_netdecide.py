"""Network rules: loading (`sockets`, `addresses`, `interfaces`), the decision
for a socket as a table of cases, and the capabilities a policy needs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from privbroker.broker.net import caps
from privbroker.broker.policy.decide import Policy, PolicyError, Subject, load_policy
from privbroker.broker.policy.load import check_policy
from privbroker.broker.policy.netdecide import decide_socket
from privbroker.protocol.targets import SocketTarget, parse_socket_target

POLICY = """\
version = 1

[[allow]]
name = "files"
users = [1001]
paths = ["/srv/**"]
access = ["read"]

[[allow]]
name = "web"
users = [1001]
sockets = ["tcp:80", "tcp:443", "udp:53", "tcp:8000-8100"]
addresses = ["::", "0.0.0.0", "192.0.2.0/24"]

[[allow]]
name = "ping"
groups = [2000]
sockets = ["icmp", "icmp6"]

[[allow]]
name = "lab raw"
users = [1002]
sockets = ["raw:icmp", "udp:5353"]
interfaces = ["lab*"]

[[allow]]
name = "everyone high"
users = ["*"]
sockets = ["udp:5000-5010"]

[[deny]]
name = "no rpcbind"
sockets = ["udp:111", "tcp:111", "tcp:8080"]

[[deny]]
name = "not on the documentation net for 1001's group"
groups = [3000]
sockets = ["tcp:80"]
addresses = ["192.0.2.0/24"]
"""

WEB = Subject(1001, 1001, frozenset({1001}))
PINGER = Subject(1003, 1003, frozenset({1003, 2000}))
LAB = Subject(1002, 1002, frozenset({1002}))
NOBODY = Subject(65534, 65534, frozenset({65534}))
ROOT = Subject(0, 0, frozenset({0}))
WEB_IN_3000 = Subject(1001, 1001, frozenset({1001, 3000}))
WEB_PARTIAL = Subject(1001, 1001, frozenset({1001}), groups_complete=False)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("net") / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


CASES = [
    # (subject, target, allowed, rule, words the reason holds)
    (WEB, "tcp:[::]:80", True, "web", ["allowed"]),
    (WEB, "tcp:0.0.0.0:443", True, "web", []),
    (WEB, "tcp:192.0.2.7:8050", True, "web", []),
    (WEB, "udp:0.0.0.0:53", True, "web", []),
    (WEB, "tcp:0.0.0.0:81", False, "web", ["port 81"]),
    (WEB, "tcp:10.0.0.1:80", False, "web", ["address 10.0.0.1"]),
    (WEB, "tcp:[::ffff:192.0.2.9]:80", True, "web", []),  # v4-mapped: judged as IPv4
    (WEB, "tcp:[::ffff:10.0.0.1]:80", False, "web", ["10.0.0.1"]),
    (WEB, "udp:0.0.0.0:111", False, "no rpcbind", ["denied by rule"]),
    (WEB, "tcp:0.0.0.0:8080", False, "no rpcbind", ["denied by rule"]),  # deny inside a range
    (WEB, "icmp", False, "web", ["icmp is not in"]),
    (WEB, "raw:icmp", False, "web", ["raw is not in"]),
    (WEB_IN_3000, "tcp:192.0.2.1:80", False, "not on the documentation net for 1001's group", []),
    # the deny judges the worst case: "::" reaches 192.0.2.0/24 too
    (WEB_IN_3000, "tcp:[::]:80", False, "not on the documentation net for 1001's group", []),
    (WEB_IN_3000, "tcp:0.0.0.0:443", True, "web", []),
    # a partial group list: a deny that names groups refuses
    (
        WEB_PARTIAL,
        "tcp:192.0.2.1:80",
        False,
        "not on the documentation net for 1001's group",
        ["group list"],
    ),
    (PINGER, "icmp", True, "ping", []),
    (PINGER, "icmp6", True, "ping", []),
    (PINGER, "tcp:[::]:80", False, "ping", ["tcp is not in"]),
    (LAB, "raw:icmp@lab0", True, "lab raw", []),
    (LAB, "raw:icmp", False, "lab raw", ["no interface given"]),
    (LAB, "raw:icmp@eth0", False, "lab raw", ["interface eth0 does not match lab*"]),
    (LAB, "raw6:icmp", False, "lab raw", ["no interface given"]),  # raw:icmp: both families
    (LAB, "raw6:icmp@lab2", True, "lab raw", []),
    (LAB, "raw:tcp@lab1", False, "lab raw", ["protocol tcp"]),
    (LAB, "udp:[fe80::1%lab3]:5353", True, "lab raw", []),  # the zone is the device
    (LAB, "udp:[fe80::1%eth0]:5353", False, "lab raw", ["interface eth0"]),
    (NOBODY, "udp:0.0.0.0:5005", True, "everyone high", []),
    (NOBODY, "udp:0.0.0.0:111", False, "no rpcbind", []),
    (
        NOBODY,
        "tcp:[::]:80",
        False,
        "everyone high",
        ["no rule allows user nobody (65534)", "tcp is not"],
    ),
    (ROOT, "tcp:[::]:80", False, "everyone high", ["no rule allows user root (0)"]),  # root too
    (ROOT, "udp:0.0.0.0:5000", True, "everyone high", []),
]


@pytest.mark.parametrize(("subject", "target", "allowed", "rule", "words"), CASES)
def test_decide_socket(
    policy: Policy, subject: Subject, target: str, allowed: bool, rule: str | None, words: list[str]
) -> None:
    d = decide_socket(policy, subject, parse_socket_target(target))
    assert (d.allowed, d.rule) == (allowed, rule), d.reason
    for word in words:
        assert word in d.reason


def test_reasons_never_name_rules_that_do_not_concern_the_client(policy: Policy) -> None:
    d = decide_socket(policy, NOBODY, parse_socket_target("tcp:[::]:80"))
    assert "'web'" not in d.reason and d.rule == "everyone high"  # it names everyone
    only = Policy(policy.path, policy.files, (), (), (), net_allow=policy.net_allow[:1])
    d = decide_socket(only, NOBODY, parse_socket_target("tcp:[::]:80"))
    assert (d.rule, "web" in d.reason) == (None, False)


def test_file_and_network_rules_are_apart(policy: Policy) -> None:
    assert [r.name for r in policy.allow_rules] == ["files"]
    assert [r.name for r in policy.net_allow] == ["web", "ping", "lab raw", "everyone high"]
    assert policy.rule_count == 7


def test_a_file_only_policy_needs_no_network_capability(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'version = 1\n[[allow]]\nname = "f"\nusers = [1]\npaths = ["/x"]\naccess = ["read"]\n'
    )
    assert caps.network_capabilities(load_policy(path)) == frozenset()


def test_capabilities_follow_the_rules(policy: Policy, tmp_path: Path) -> None:
    need = caps.network_capabilities(policy)
    assert {caps.CAP_SETUID, caps.CAP_SETGID, 13} <= need  # owner ids; raw
    assert 12 not in need  # no tun/tap, no network operations
    held = frozenset({0, 1, 2, 3, 19})
    why = caps.missing(policy, held)
    assert "CAP_NET_RAW" in why and "restart" in why
    assert caps.missing(policy, held | need) == ""
    assert caps.missing(policy, None) == ""  # nothing was dropped


BAD = [
    ('sockets = ["tcp:0"]', "port 0 is outside 1-65535"),
    ('sockets = ["tcp:90-80"]', "90-80"),
    ('sockets = ["sctp:80"]', "unknown socket kind"),
    ('sockets = ["raw:255"]', "IPPROTO_RAW"),
    ('sockets = ["tcp:80"]\naddresses = ["192.0.2.1/24"]', "host bits"),
    ('sockets = ["tcp:80"]\naddresses = ["example.com"]', "addresses"),
    ('sockets = ["tcp:80"]\ninterfaces = ["eth/0"]', "interfaces"),
    ('sockets = ["tcp:80"]\npaths = ["/x"]', "not both"),
    ("sockets = []", "sockets or network is empty"),
    ("network = []", "sockets or network is empty"),
    ('network = ["dance"]', "unknown word"),
    ('network = ["link"]\nmtu = [1500, 1000]', "LOW <= HIGH"),
    ('network = ["link"]\nmax_devices = 0', "1..1024"),
    ('addresses = ["::"]', "needs sockets or network"),
    ('sockets = ["tcp:80"]\naddresses = []', "addresses is empty"),
    ('sockets = ["tcp:80"]\nports = [80]', "unknown key 'ports'"),
    ("sockets = 80", "sockets"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_check_names_what_is_wrong_with_a_network_rule(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'version = 1\n[[allow]]\nname = "n"\nusers = [1]\n{body}\n')
    problems = [p for p in check_policy(path) if not p.warning]
    assert problems, body
    assert any(message in p.message for p in problems), problems
    assert all(p.rule == "n" and p.line >= 3 - ("needs" in message) for p in problems)
    with pytest.raises(PolicyError):
        load_policy(path)


@pytest.mark.parametrize(
    ("sockets", "warning"),
    [
        ('["raw:icmp"]', "forge"),
        ('["udp:111"]', "111"),
        ('["tcp:2049"]', "2049"),
        ('["tcp:600"]', "rsh"),
    ],
)
def test_check_warns_on_risky_grants(tmp_path: Path, sockets: str, warning: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'version = 1\n[[allow]]\nname = "n"\nusers = [1]\nsockets = {sockets}\n')
    problems = check_policy(path)
    assert problems and all(p.warning for p in problems)
    assert any(warning in p.message for p in problems), problems


def test_an_allow_rule_needs_a_subject(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('version = 1\n[[allow]]\nname = "n"\nsockets = ["tcp:80"]\n')
    assert any("needs users or groups" in p.message for p in check_policy(path))


def test_a_deny_rule_without_subject_denies_everyone(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\nsockets = ["udp:5000"]\n'
        '[[deny]]\nname = "d"\nsockets = ["udp:5000"]\naddresses = ["127.0.0.0/8"]\n'
    )
    policy = load_policy(path)
    target = SocketTarget("udp", socket.AF_INET, 5000, "127.0.0.1")
    assert decide_socket(policy, ROOT, target).rule == "d"
    assert decide_socket(policy, NOBODY, parse_socket_target("udp:0.0.0.0:5000")).rule == "d"
    assert decide_socket(policy, NOBODY, parse_socket_target("udp:10.1.1.1:5000")).allowed
