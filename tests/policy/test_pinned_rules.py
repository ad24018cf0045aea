"""Rules only random tests (or no test) guarded, pinned with fixed cases (issue 14).

- A peer whose SO_PEERGROUPS cannot be read (ENOPROTOOPT, EINVAL) has an
  incomplete group list: no allow rule grants through a supplementary group,
  and a deny rule naming any group refuses it (docs/security.md, invariant 4).
- `/home/*/public/**` never matches `/home/a/private/x`; `/*/**` never
  matches `/`.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from privbroker import unix
from privbroker.broker.core.peer import Peer, read_peer
from privbroker.broker.policy.decide import Policy, decide, load_policy
from privbroker.broker.policy.decision import FileType
from privbroker.broker.policy.patterns import compile_pattern
from privbroker.protocol import Access

OTHER_GID = 4242  # a group this process is not in


def _policy(tmp_path: Path, text: str) -> Policy:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    p.chmod(0o644)
    return load_policy(p)


@pytest.fixture
def peer_without_groups(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Peer]:
    """read_peer on a real connected pair, SO_PEERGROUPS failing with request.param."""
    code = request.param

    def refuse(sock: socket.socket) -> tuple[int, ...]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(unix, "peer_groups", refuse)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        peer = read_peer(a)
        try:
            yield peer
        finally:
            peer.close()


@pytest.mark.parametrize("peer_without_groups", [errno.ENOPROTOOPT, errno.EINVAL], indirect=True)
def test_unreadable_groups_mark_the_list_incomplete(
    peer_without_groups: Peer, tmp_path: Path
) -> None:
    peer = peer_without_groups
    assert peer.uid == os.getuid() and peer.gid == os.getgid()
    subject = peer.subject
    assert subject.groups_complete is False
    assert subject.groups == frozenset({peer.gid})
    policy = _policy(
        tmp_path,
        f"""
        version = 1
        [[allow]]
        name = "this uid reads"
        users = [{peer.uid}]
        paths = ["/srv/f", "/srv/g"]
        access = ["read"]

        [[allow]]
        name = "a supplementary group reads"
        groups = [{OTHER_GID}]
        paths = ["/srv/h"]
        access = ["read"]

        [[deny]]
        name = "not group {OTHER_GID}"
        groups = [{OTHER_GID}]
        paths = ["/srv/f"]
        """.replace("\n        ", "\n"),
    )
    R = Access.READ
    # The deny rule names a group the list may hide: it refuses.
    d = decide(policy, subject, "/srv/f", R, FileType.FILE)
    assert not d.allowed and d.rule == f"not group {OTHER_GID}", d
    # Without the deny rule in the way, the uid's own grant stands.
    assert decide(policy, subject, "/srv/g", R, FileType.FILE).allowed
    # A grant through a supplementary group is not made on a partial list.
    assert not decide(policy, subject, "/srv/h", R, FileType.FILE).allowed
    # Control: the same peer with its list complete is allowed /srv/f.
    complete = type(subject)(subject.uid, subject.gid, subject.groups, True)
    assert decide(policy, complete, "/srv/f", R, FileType.FILE).allowed


def test_other_getsockopt_errors_are_not_taken_as_incomplete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(sock: socket.socket) -> tuple[int, ...]:
        raise OSError(errno.EBADF, "bad")

    monkeypatch.setattr(unix, "peer_groups", broken)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(OSError):
        read_peer(a)


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("/home/*/public/**", "/home/a/private/x"),
        ("/home/*/public/**", "/home/a/private"),
        ("/home/*/public/**", "/home/a/publicx/y"),
        ("/home/*/public/**", "/home/public/x"),
        ("/*/**", "/"),
    ],
)
def test_fixed_non_matches(pattern: str, path: str, tmp_path: Path) -> None:
    assert not compile_pattern(pattern).match(path)
    # And through a whole policy (its path index), for a client the rule names.
    policy = _policy(
        tmp_path,
        f'version = 1\n[[allow]]\nname = "p"\nusers = ["*"]\npaths = ["{pattern}"]\n'
        'access = ["read"]\ntypes = ["file", "dir"]\n',
    )
    from privbroker.broker.policy.decision import Subject

    who = Subject(1000, 1000, frozenset({1000}))
    for ftype in (None, FileType.FILE, FileType.DIR):
        assert not decide(policy, who, path, Access.READ, ftype).allowed


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("/home/*/public/**", "/home/a/public/x"),
        ("/home/*/public/**", "/home/a/public"),
        ("/*/**", "/etc"),
        ("/*/**", "/etc/x/y"),
    ],
)
def test_fixed_matches(pattern: str, path: str) -> None:
    assert compile_pattern(pattern).match(path)
