"""A venv of Debian's python3 with this checkout installed, for programs run as another uid.

The machines' default Python lives under /root, which other uids cannot
enter, so a test that runs privbroker's own commands (privopen) as nobody
needs an interpreter every uid may execute: Debian's /usr/bin/python3. The
`debian_venv` fixture builds one venv of it per session, in a directory
every uid may read, with this checkout (copied, so the build leaves nothing
in the tree) and gunicorn (for tests/client/test_privopen_listen.py)
installed; its bin/privopen is the installed script. It skips the test when
that python3, its venv module or the install is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"


def _copy_checkout(into: Path) -> Path:
    """The files a build needs, copied: pip builds in the source tree, and must not in ours."""
    src = into / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("client", "broker"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    return src


@pytest.fixture(scope="session")
def debian_venv() -> Iterator[Path]:
    """A venv of Debian's python3 with gunicorn and this checkout, readable by every uid."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.skip(f"{DEBIAN_PYTHON} (Debian's python3, which every uid may run) is missing")
    old = os.umask(0o022)
    root = Path(tempfile.mkdtemp(prefix="privbroker-venv-"))
    try:
        root.chmod(0o755)
        venv = root / "venv"
        made = subprocess.run(
            [DEBIAN_PYTHON, "-m", "venv", str(venv)], capture_output=True, text=True
        )
        if made.returncode != 0:
            pytest.skip(
                f"{DEBIAN_PYTHON} -m venv failed (apt package python3-venv?): {made.stderr}"
            )
        src = _copy_checkout(root)
        subprocess.run(
            [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "gunicorn", str(src)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        shutil.rmtree(src)
    except BaseException:  # a skip included: leave no directory behind
        shutil.rmtree(root)
        raise
    finally:
        os.umask(old)
    try:
        yield venv
    finally:
        shutil.rmtree(root)
