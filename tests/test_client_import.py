"""`import client` must load neither the broker nor pydantic (DESIGN.md, Layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
import client
import client.api, client.connection, client.errors, client.protocol, client.unix
import client.aio, client.aio_connection, client.calls, client.fastwire, client.wire
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("broker", "pydantic"))
assert not loaded, loaded
print("ok")
"""


def test_import_client_loads_neither_broker_nor_pydantic() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_client_exports() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import client; print(sorted(client.__all__))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    for name in (
        "Client",
        "open_privileged",
        "PolicyDenied",
        "BrokerUnavailable",
        "BrokerIdentityError",
        "ProtocolError",
        "BrokerError",
    ):
        assert repr(name) in out.stdout
