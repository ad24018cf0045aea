"""The README and docs/protocol.md say what the code does: the commands, the errno table.

`python3 -m tests.admin.test_readme` rewrites both errno tables from
privbroker.protocol.ERRNO_CAUSES; the test fails when they disagree.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import pytest

from privbroker import protocol as proto

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TABLED = (README, REPO / "docs" / "protocol.md")
_TABLE = re.compile(r"(<!-- errno-table:[^\n]*-->\n)(.*?)(<!-- end errno-table -->)", re.S)


def errno_table() -> str:
    rows = ["| errno | cause |", "|---|---|"]
    for code, cause in proto.ERRNO_CAUSES.items():
        rows.append(f"| `{errno.errorcode[code]}` ({code}) | {cause} |")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("doc", TABLED, ids=lambda p: p.name)
def test_errno_table_matches_the_protocol(doc: Path) -> None:
    match = _TABLE.search(doc.read_text())
    assert match, f"{doc.name} lacks the errno-table markers"
    assert match.group(2) == errno_table(), "run: python3 -m tests.admin.test_readme"


def test_first_lines_give_the_two_commands() -> None:
    head = README.read_text().splitlines()[:8]
    commands = [line.strip() for line in head if line.startswith("    python3 -m pip")]
    assert len(commands) == 2
    run, test = commands
    assert "broker demo" in run and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs the README's test command (its install part, then pytest).
    assert "-e '.[test]'" in ci and "python3 -m pytest" in ci


if __name__ == "__main__":
    changed = False
    for doc in TABLED:
        text = doc.read_text()
        new = _TABLE.sub(lambda m: m.group(1) + errno_table() + m.group(3), text)
        doc.write_text(new)
        changed = changed or new != text
    sys.exit(0 if changed else 1)
