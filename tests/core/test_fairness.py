"""Fairness (docs/security.md, invariant 6; docs/design.md, "Fairness").

- Rounds (core/fairness.py), directly: turns by owner and within an owner,
  a newcomer first, debts and credit, items discarded while served.
- A real broker: uid 65534 floods within the default limits (2 x 128
  connections pipelining 250-item batches of denied paths, or 4 KiB paths
  against a `**` pattern) while another uid opens its file; every one of the
  other uid's opens is answered, within the client's default timeout, while
  the flood runs. Bounded by a count of opens; no time is asserted (the
  latency it costs is measured by tests/bench, section 9).
- Batches served a slice at a time come back whole and in order, and a
  connection that leaves mid-batch leaves no fd behind.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from privbroker import Client, unix
from privbroker import protocol as proto
from privbroker.broker.core.fairness import Rounds
from privbroker.protocol import Access, OpenItem
from tests.support.flood import LONG_RULE, flooding, settle
from tests.support.privs import run_as

VICTIM = 65533


# ------------------------------------------------------------------ Rounds


class Clock:
    """Time that passes only when a test serves something (in steps exact in binary)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Serve = Callable[[str], bool]


def make(quantum: float) -> tuple[Rounds[str], Clock, list[str]]:
    """Rounds over items named "uid:conn", a clock, and the log of what was served."""
    return Rounds(lambda item: int(item.split(":")[0]), quantum), Clock(), []


def server(clock: Clock, log: list[str], cost: dict[str, float], work: dict[str, int]) -> Serve:
    """Serving an item costs cost[item] (default 0.125) and one unit of its work."""

    def serve(item: str) -> bool:
        log.append(item)
        clock.now += cost.get(item, 0.125)
        work[item] -= 1
        return work[item] > 0

    return serve


def test_one_turn_per_uid_per_round_whatever_its_backlog() -> None:
    rounds, clock, log = make(quantum=0.125)
    # Each item a batch of pieces: uid 1 has 5 connections, uid 2 one.
    work = {f"1:{c}": 2 for c in range(5)} | {"2:a": 3}
    for item in work:
        rounds.add(item)
    serve = server(clock, log, {}, work)
    for _ in range(4):
        rounds.round(serve, clock)
    # uid 2 arrived last, so goes first; each round one piece per uid; a
    # connection's batch is finished before the uid's next connection.
    assert log == ["2:a", "1:0", "2:a", "1:0", "2:a", "1:1", "1:1"]
    assert "2:a" not in rounds.queued and "1:1" not in rounds.queued and len(rounds) == 3
    while rounds:
        rounds.round(serve, clock)
    assert log[7:] == ["1:2", "1:2", "1:3", "1:3", "1:4", "1:4"]


def test_a_newcomer_goes_first_in_the_next_round() -> None:
    rounds, clock, log = make(quantum=0.125)
    work = {"1:a": 10, "2:a": 10, "3:a": 1}
    rounds.add("1:a")
    rounds.add("2:a")
    serve = server(clock, log, {}, work)
    rounds.round(serve, clock)
    rounds.add("3:a")
    rounds.round(serve, clock)
    assert log == ["2:a", "1:a", "3:a", "2:a", "1:a"]


def test_credit_spans_small_requests_and_a_debt_sits_out_rounds() -> None:
    rounds, clock, log = make(quantum=1.0)
    # uid 1: small requests on 3 connections; uid 2: pieces of 3.5 quanta
    # each (batches the fast path answers whole, which cannot be cut).
    work = {"1:a": 50, "1:b": 50, "1:c": 50, "2:big": 50}
    cost = {"1:a": 0.25, "1:b": 0.25, "1:c": 0.25, "2:big": 3.5}
    for item in work:
        rounds.add(item)
    serve = server(clock, log, cost, work)
    for _ in range(5):
        rounds.round(serve, clock)
    big = log.count("2:big")
    small = len(log) - big
    assert (big, small) == (2, 20)  # uid 2 sits out until uid 1 has had as much
    assert log[:5] == ["2:big", "1:a", "1:a", "1:a", "1:a"]


def test_an_idle_owner_keeps_its_debt_not_its_credit() -> None:
    rounds, clock, log = make(quantum=1.0)
    work = {"1:a": 1, "2:a": 1}
    serve = server(clock, log, {"2:a": 5.0}, work)
    rounds.add("1:a")
    rounds.add("2:a")
    rounds.round(serve, clock)
    assert not rounds and log == ["2:a", "1:a"]
    work.update({"1:a": 1, "2:a": 1})
    rounds.add("2:a")
    rounds.add("1:a")
    rounds.round(serve, clock)
    assert log[2:] == ["1:a"]  # uid 2 still owes 3 quanta; uid 1 saved nothing up
    rounds.forget_debts()  # uid 2 has work: its debt stays
    for _ in range(4):
        rounds.round(serve, clock)
    assert log[3:] == ["2:a"] and not rounds  # in debt again (4 quanta), and idle
    rounds.forget_debts()  # idle: forgotten
    work["2:a"] = 1
    rounds.add("2:a")
    rounds.round(serve, clock)
    assert log[3:] == ["2:a", "2:a"]


def test_discard_while_waiting_and_while_served() -> None:
    rounds, clock, log = make(quantum=10.0)
    for item in ("1:a", "1:b", "2:a", "3:x"):
        rounds.add(item)
    rounds.add("1:a")  # already there: no second place
    rounds.discard("1:b")
    rounds.discard("3:x")  # uid 3 is left with nothing: it leaves at its turn
    rounds.discard("9:z")  # never there

    def serve(item: str) -> bool:
        log.append(item)
        rounds.discard(item)  # its connection closed while it was served
        return True

    assert rounds
    rounds.round(serve, clock)
    assert log == ["2:a", "1:a"]
    assert not rounds and not rounds.queued and len(rounds) == 0


# ------------------------------------------------------------- a real broker


@pytest.fixture()
def victim_file(tmp_path: Path) -> Path:
    f = tmp_path / "victim.txt"
    f.write_text("the victim's file\n")
    f.chmod(0o600)
    return f


def _policy(victim_file: Path) -> str:
    return f"""
        version = 1

        [[allow]]
        name = "the victim reads its file"
        users = [{VICTIM}, 0]
        paths = ["{victim_file}", "{victim_file.parent}/batch/*"]
        access = ["read"]
        {LONG_RULE}
        """


def _victim_opens(name: str, path: str, count: int) -> list[str]:
    """`count` opens with the default Client (timeout 5 s): what each gave."""
    out = []
    with Client(name) as client:
        for _ in range(count):
            try:
                os.close(client.open_fd(path))
                out.append("ok")
            except Exception as exc:
                out.append(f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.parametrize("kind", ["deny", "long"])
def test_a_flooding_uid_does_not_stop_another_uids_opens(
    start_broker, victim_file: Path, kind: str
) -> None:
    b = start_broker(_policy(victim_file))
    with flooding(b.name, kind) as flood:
        settle()
        got = run_as(VICTIM, VICTIM, _victim_opens, b.name, str(victim_file), 100, timeout=600)
    assert got == ["ok"] * 100
    assert flood.replies > 0  # the flood was served too, not shut out
    assert b.proc.poll() is None
    log = b.log_text()
    assert "Traceback" not in log and "internal error" not in log


def _raw(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.settimeout(30)
    s.connect(unix.abstract_address(name))
    return s


def test_a_sliced_batch_comes_back_whole_and_in_order(
    start_broker, victim_file: Path, tmp_path: Path
) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    items = []
    for i in range(proto.MAX_BATCH):
        if i % 3:
            (batch / f"f{i}").write_text(f"{i}\n")
            items.append(OpenItem(str(batch / f"f{i}"), Access.READ))
        else:
            items.append(OpenItem(f"/srv/nowhere/{i}", Access.READ))
    b = start_broker(_policy(victim_file))
    # Another uid floods meanwhile, so the batch is served in many slices,
    # between the flooder's.
    with flooding(b.name, "deny", procs=1, conns=16), _raw(b.name) as s:
        settle(0.1)
        for rid in (1, 2):
            unix.send_message(s, proto.encode_request(proto.OpenRequest(rid, tuple(items))))
        for rid in (1, 2):
            data, fds, _ = unix.recv_message(s, proto.MAX_REPLY_BYTES, 253, creds=True)
            try:
                reply = proto.decode_reply(data)
                assert isinstance(reply, proto.OpenReply) and reply.id == rid
                assert [r.errno == 0 for r in reply.results] == [bool(i % 3) for i in range(250)]
                assert len(fds) == reply.nfds
                texts = [os.pread(fd, 16, 0).decode() for fd in fds]
                assert texts == [f"{i}\n" for i in range(250) if i % 3]
            finally:
                unix.close_fds(fds)


def test_leaving_mid_batch_leaves_no_fd(start_broker, victim_file: Path, tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    for i in range(proto.MAX_BATCH):
        (batch / f"f{i}").write_text("x\n")
    items = tuple(OpenItem(str(batch / f"f{i}"), Access.READ) for i in range(proto.MAX_BATCH))
    b = start_broker(_policy(victim_file))
    pid = b.proc.pid

    def count() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    with Client(b.name) as c:  # one round trip first: the broker's own fds are open
        os.close(c.open_fd(str(victim_file)))
    before = count()
    with flooding(b.name, "deny", procs=1, conns=16):
        for _ in range(20):
            s = _raw(b.name)
            unix.send_message(s, proto.encode_request(proto.OpenRequest(1, items)))
            s.close()  # gone before the batch is done, most times
        with Client(b.name) as c:  # the loop has taken in every close by now
            for _ in range(3):
                os.close(c.open_fd(str(victim_file)))
    with Client(b.name) as c:
        os.close(c.open_fd(str(victim_file)))
    # The flooder's connections are gone too; what remains is the baseline.
    deadline = time.monotonic() + 10
    while count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() <= before
