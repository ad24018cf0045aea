"""Names where people read: "www-data (33)" for a uid, "ssl-cert (108)" for a
gid, in reasons and explanations (decisions are made on the numbers alone).

The user and group databases are read through NSS, which may be slow; the
answers are remembered (a handful of clients ask again and again), so a
flood of denials costs a dictionary lookup each. A name that changes is seen
after a restart; a number with no name reads as the number alone.
"""

from __future__ import annotations

import functools
import grp
import pwd

from .decision import Subject


@functools.lru_cache(maxsize=1024)
def user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"uid {uid}"


@functools.lru_cache(maxsize=1024)
def group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return f"gid {gid}"


def who(s: Subject) -> str:
    """The subject as a reason names it: its user, and its groups."""
    groups = ", ".join(group(g) for g in sorted(s.groups | {s.gid}))
    more = "" if s.groups_complete else ", list incomplete"
    name = user(s.uid)
    return f"{name if name.startswith('uid ') else 'user ' + name}, groups {groups}{more},"
