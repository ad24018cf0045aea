"""One import name: `privbroker` is the only top-level package installed, and
`import privbroker` (the client) loads neither the broker nor pydantic
(docs/design.md, "Layout")."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import privbroker, privbroker.aio, privbroker.api, privbroker.calls, privbroker.connection
import privbroker.errors, privbroker.privopen, privbroker.protocol, privbroker.unix
import privbroker.aio_connection, privbroker.protocol.codec, privbroker.protocol.fastwire
loaded = sorted(m for m in sys.modules if m.startswith("privbroker.broker") or m == "pydantic")
assert not loaded, loaded
print("ok")
"""


def test_import_privbroker_loads_neither_broker_nor_pydantic(tmp_path: Path) -> None:
    # From a directory of its own: nothing in a checkout may stand in for it.
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_names_from_privbroker(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import privbroker; print(sorted(privbroker.__all__))"],
        cwd=tmp_path,
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


def test_an_applications_own_client_module_does_not_shadow_it(tmp_path: Path) -> None:
    (tmp_path / "client.py").write_text("raise SystemExit('the application own client.py')\n")
    (tmp_path / "broker.py").write_text("raise SystemExit('the application own broker.py')\n")
    code = "import client, broker; from privbroker import open_privileged; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert "the application own client.py" in out.stderr  # its module, not ours


@pytest.mark.timeout(300)
def test_the_wheel_installs_privbroker_and_nothing_else(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("privbroker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"privbroker"}
    assert "privbroker/broker/admin/demo.toml" in names
    # Every package of the tree is in the wheel (package-dir lists them one by one).
    for init in sorted((REPO / "broker").rglob("__init__.py")):
        sub = init.parent.relative_to(REPO / "broker")
        assert f"privbroker/broker/{sub.as_posix()}/__init__.py".replace("/./", "/") in names
    for init in sorted((REPO / "client").rglob("__init__.py")):
        sub = init.parent.relative_to(REPO / "client")
        assert f"privbroker/{sub.as_posix()}/__init__.py".replace("/./", "/") in names
    assert "privbroker/py.typed" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    always = [r for r in requires if "extra ==" not in r]
    assert [r.split()[1].split(">")[0] for r in always] == ["msgpack"], requires
