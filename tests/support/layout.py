"""The installed layout, staged from a checkout: client/ as privbroker/ and
broker/ as privbroker/broker/, as symlinks, for tools that look for packages
by directory (mypy) rather than through the editable install's import hook.

    python3 -m tests.support.layout DIR    # prints DIR, with DIR/privbroker
"""

from __future__ import annotations

import sys
from pathlib import Path


def stage(repo: Path, into: Path) -> Path:
    """Make `into`/privbroker mirror the installed package; return `into`."""
    pkg = into / "privbroker"
    pkg.mkdir(parents=True)
    for entry in (repo / "client").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "broker").symlink_to(repo / "broker")
    return into


if __name__ == "__main__":
    print(stage(Path(__file__).resolve().parents[2], Path(sys.argv[1])))
