"""Hot reload against a real broker: SIGHUP, in-place edits, rename-over, drop-ins."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from privbroker import Client, PolicyDenied
from tests.support.privs import NOBODY, NOGROUP, run_as
from tests.support.running import can_read, status, wait_for


def allow(name: str, path: str) -> str:
    return f"""
[[allow]]
name = "{name}"
users = ["nobody"]
paths = ["{path}"]
access = ["read"]
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    for f in (a, b):
        f.write_text(f.name)
        f.chmod(0o600)
    return a, b


def test_in_place_edit_is_picked_up(start_broker, files) -> None:
    a, b = files
    br = start_broker("version = 1\n" + allow("a", str(a)))
    assert can_read(br.name, str(a)) and not can_read(br.name, str(b))
    with open(br.policy, "a") as f:  # an editor that writes in place
        f.write(allow("b", str(b)))
    wait_for(lambda: status(br.name)["reloads"] >= 1)
    assert can_read(br.name, str(b))


def test_rename_over_is_picked_up(start_broker, files, tmp_path: Path) -> None:
    a, b = files
    br = start_broker("version = 1\n" + allow("a", str(a)))
    new = tmp_path / ".policy.toml.swp"
    new.write_text("version = 1\n" + allow("b", str(b)))
    os.rename(new, br.policy)  # vim, sed -i, ansible: a new file renamed over
    wait_for(lambda: status(br.name)["reloads"] >= 1)
    assert can_read(br.name, str(b)) and not can_read(br.name, str(a))


def test_drop_in_added_and_changed(start_broker, files, tmp_path: Path) -> None:
    a, b = files
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    br = start_broker('version = 1\ninclude = ["policy.d/*.toml"]\n' + allow("a", str(a)))
    policy_d = br.policy.parent / "policy.d"
    assert policy_d == dropins
    (dropins / "10-b.toml").write_text(allow("b", str(b)))
    wait_for(lambda: status(br.name)["reloads"] >= 1)
    assert can_read(br.name, str(b))
    (dropins / "10-b.toml").write_text(allow("b", str(tmp_path / "other")))
    wait_for(lambda: status(br.name)["reloads"] >= 2)
    assert not can_read(br.name, str(b))


def test_invalid_edit_is_refused_and_old_policy_serves(start_broker, files) -> None:
    a, _ = files
    br = start_broker("version = 1\n" + allow("a", str(a)))
    br.policy.write_text("version = 1\n[[allow]]\nname = 'a'\nusers = ['nobody']\nacess = []\n")
    wait_for(lambda: status(br.name)["reload_failures"] >= 1)
    fields = status(br.name)
    assert f"{br.policy}:" in str(fields["last_reload_error"])
    assert "acess" in str(fields["last_reload_error"])
    assert can_read(br.name, str(a))
    assert "policy reload refused" in br.log_text()
    assert status(br.name)["reloads"] == 0  # a refusal is not a reload
    # Putting it right is noticed too.
    br.policy.write_text("version = 1\n" + allow("a", str(a)))
    wait_for(lambda: status(br.name)["reloads"] >= 1 and not status(br.name)["last_reload_error"])
    assert br.proc.poll() is None


def test_moving_the_old_file_back_clears_the_refusal(start_broker, files, tmp_path: Path) -> None:
    """A revert that restores the very file that loaded (same inode, same
    times) is a change too: the refusal it puts right is cleared."""
    a, _ = files
    br = start_broker("version = 1\n" + allow("a", str(a)))
    saved = tmp_path / "saved.toml"
    os.link(br.policy, saved)  # the loaded file itself, kept aside
    broken = tmp_path / "broken.toml"
    broken.write_text("version = 1\n[[allow]]\nname = 'a'\nusers = ['nobody']\nacess = []\n")
    os.rename(broken, br.policy)
    wait_for(lambda: status(br.name)["reload_failures"] >= 1)
    assert status(br.name)["last_reload_error"]
    os.rename(saved, br.policy)  # back: the signature is the loaded one again
    wait_for(lambda: not status(br.name)["last_reload_error"])
    assert status(br.name)["reloads"] >= 1 and can_read(br.name, str(a))


def test_sighup_reloads_even_without_a_change(start_broker, files) -> None:
    a, _ = files
    br = start_broker("version = 1\n" + allow("a", str(a)))
    br.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status(br.name)["reloads"] >= 1)


def test_requests_during_reloads_see_one_policy_each(start_broker, files) -> None:
    a, b = files
    both = "version = 1\n" + allow("a", str(a)) + allow("b", str(b))
    none = "version = 1\n" + allow("x", "/nonexistent/x")
    br = start_broker(both)
    stop = threading.Event()

    def flip() -> None:
        n = 0
        while not stop.is_set():
            br.policy.write_text(none if n % 2 == 0 else both)
            br.proc.send_signal(signal.SIGHUP)
            n += 1
            time.sleep(0.01)

    def batches() -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        with Client(br.name) as c:
            # At least 300 batches, and on until both policies were seen a few
            # times (reloads lag on a loaded machine), bounded by count and time.
            counts = {"allowed": 0, "denied": 0}
            while len(seen) < 300 or (
                min(counts.values()) < 20 and len(seen) < 20000 and time.monotonic() < deadline
            ):
                try:
                    fds = c.open_many([str(a), str(b)])
                except PolicyDenied:
                    # All-or-nothing on the client: see which items were denied.
                    seen.append("denied")
                    counts["denied"] += 1
                    continue
                for fd in fds:
                    os.close(fd)
                seen.append("allowed")
                counts["allowed"] += 1
        return seen

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        seen = run_as(NOBODY, NOGROUP, batches, timeout=120)
    finally:
        stop.set()
        flipper.join()
    assert set(seen) == {"allowed", "denied"}  # both policies served during the run

    def nobody_decisions() -> Counter[str]:
        # Past a rate, denials are aggregated and identical allows coalesced
        # (core/audit.py): a record may stand for `count` decisions.
        got: Counter[str] = Counter()
        for r in br.audit_records():
            if r.get("uid") == NOBODY:
                got[str(r["decision"])] += int(str(r.get("count", 1)))
        return got

    # Items of one request are judged by one policy: a batch the client saw
    # allowed had both items allowed, a denied one both denied (one allowed
    # item in a denied batch would be one allow too many).
    want = Counter({"allow": 2 * seen.count("allowed"), "deny": 2 * seen.count("denied")})
    wait_for(lambda: nobody_decisions() == want, seconds=30)  # aggregates: every few s
    assert br.proc.poll() is None
