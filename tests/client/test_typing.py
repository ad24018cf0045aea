"""Both packages are fully typed: mypy --strict passes on privbroker, the client
and the broker (pyproject config), as .ci/run also checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.layout import stage

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_privbroker_passes_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    tree = stage(REPO, tmp_path / "stage")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "--config-file", str(REPO / "pyproject.toml"), "-p", "privbroker"],
        cwd=tmp_path,
        env={"MYPYPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
