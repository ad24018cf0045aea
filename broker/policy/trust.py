"""Whether only root can change a policy: the files, and every directory and
symlink on the way to them (docs/security.md, invariant 10).

Whoever can write a policy file, or replace it, or add a file where an
include glob looks, grants themselves root's files. So, as sshd's
StrictModes does for authorized_keys, everything the policy is read through
must be owned by root (or by the uid running the check, so an administrator
can check a policy in a checkout of their own) and not writable by group or
others:

- the policy file itself and each included file (checked on the opened fd);
- each include glob's base directory and the directory of each file a glob
  matched: others could add a file there even when the directory is sticky;
- every directory path resolution passes through to reach those, and every
  symlink it follows: here a sticky directory such as /tmp is acceptable,
  since others can neither rename nor remove an entry they do not own.

Symlinks are followed the way the kernel follows them (`resolve` walks the
path one component at a time), so the directories checked are the ones the
file is really read through, including those a symlink leads through. Only
stat and readlink are used: nothing is opened.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

# The kernel's own limit on symlinks followed in one resolution (MAXSYMLINKS).
_MAX_LINKS = 40
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def owner_problem(st: os.stat_result) -> str | None:
    """Why this owner cannot be trusted with the policy, or None."""
    euid = os.geteuid()
    if st.st_uid in (0, euid):
        return None
    if euid == 0:
        return f"is owned by uid {st.st_uid}, not root"
    return f"is owned by uid {st.st_uid}, not root or uid {euid}"


def distrust(st: os.stat_result, *, sticky_ok: bool = False) -> str | None:
    """Why someone other than root could change this file or directory, or None.

    `sticky_ok`: a directory passed through, not listed, for which the
    sticky bit is protection enough."""
    why = owner_problem(st)
    if why is not None:
        return why
    mode = st.st_mode
    if mode & _OTHERS_WRITE and not (sticky_ok and stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        return f"is writable by group/others (mode {stat.S_IMODE(mode):04o})"
    return None


def resolve(path: str, checked: dict[str, str | None]) -> list[str]:
    """Problems with the directories and symlinks that resolving `path` passes
    through (not with what it names: the caller checks that).

    `checked` caches directories already judged during one load (a directory
    on the way to many drop-ins is judged, and reported, once). A path that
    does not exist has no problem here: reading it reports that.
    """
    problems: list[str] = []
    full = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    parts = deque(p for p in full.split("/") if p not in ("", "."))
    current = "/"
    _judge_dir(current, None, checked, problems)
    links = 0
    while parts:
        name = parts.popleft()
        if name == "..":
            current = os.path.dirname(current)  # judged on the way down
            continue
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                problems.append(f"cannot check {candidate}: {exc.strerror}")
            return problems
        if stat.S_ISLNK(st.st_mode):
            # Its own mode means nothing; whoever owns it can replace it in a sticky directory.
            if candidate not in checked:
                checked[candidate] = why = owner_problem(st)
                if why is not None:
                    problems.append(f"symlink {candidate} {why}")
            links += 1
            try:
                target = os.readlink(candidate)
            except OSError as exc:
                problems.append(f"cannot check {candidate}: {exc.strerror}")
                return problems
            if links > _MAX_LINKS:
                problems.append(f"cannot check {path}: {os.strerror(errno.ELOOP)}")
                return problems
            if target.startswith("/"):
                current = "/"
            parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if not parts:
            break  # what the path names: the caller's to judge
        _judge_dir(candidate, st, checked, problems)
        current = candidate
    return problems


def _judge_dir(
    path: str, st: os.stat_result | None, checked: dict[str, str | None], problems: list[str]
) -> None:
    if path in checked:
        return
    why: str | None
    try:
        why = distrust(st or os.lstat(path), sticky_ok=True)
    except OSError as exc:
        why = f"cannot be checked: {exc.strerror}"
    checked[path] = why
    if why is not None:
        problems.append(f"directory {path} {why}")
