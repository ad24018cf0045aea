"""Let every uid search (not list) the way down to a test's tmp_path.

pytest makes its temporary directories root's alone (0700). The broker
answers a client below a directory that client cannot search with one
EACCES that says nothing (docs/security.md, invariant 9), which would hide
the errno and reason that tests running clients as nobody look at. Those
tests call this first; tests/adversarial/test_errno_oracle.py tests the rule
itself with directories of its own.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def searchable(path: Path) -> None:
    """Add search for group and others (o+x, g+x) to `path` and its parents,
    up to the system's temporary directory, where they lack it."""
    top = Path(tempfile.gettempdir())
    for d in (path, *path.parents):
        if d in (top, Path("/")):
            break
        st = d.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o001:
            d.chmod(stat.S_IMODE(st.st_mode) | 0o011)
