"""What one open needs from the policy, step by step. Pure: no I/O.

One truth for three readers: files/opener.py asks the policy exactly these
questions around its syscalls, `judge_open` asks them without the syscalls
(for `privbroker explain --mode`), and compile.py (`privbroker check`) uses
`open_needs` to find access words that no open mode can use.

The steps, as the opener takes them:
1. the request itself (`request_error`): read, write or append must be asked
   for; exclusive only with create; truncate only with write or append;
2. the named path, before any lookup (`named_needs`): the words asked for,
   without `truncate` when the open may create the file (it may not exist);
3. an existing file, with its real type (`existing_needs`): what the fd will
   allow (`fd_allows`): a writable fd on a regular file can ftruncate it and,
   unless the file is append-only, drop O_APPEND; then the type itself may
   refuse the open (`type_error`: a directory for writing, a socket);
4. a file the open creates (`created_needs`): what the fd will allow, but
   `truncate`: the client owns the new, empty file and could truncate it anyway.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from privbroker.protocol import Access, access_for_mode

from .decision import Decision, FileType

WRITES = Access.WRITE | Access.APPEND
NOT_FOR_DIRS = Access.WRITE | Access.APPEND | Access.CREATE | Access.TRUNCATE
# Every open() mode, without b/t (which change nothing here).
MODES = ("r", "w", "a", "x", "r+", "w+", "a+", "x+")

WRITABLE_MEANS = (
    "a writable fd on a regular file can also truncate it and, unless the file is "
    "append-only (chattr +a), write anywhere in it; so the rule must grant those too:"
)


def fd_allows(access: Access, ftype: FileType | None, append_only: bool = False) -> Access:
    """What a client can really do with the fd `access` gives it, on a file of `ftype`.

    The kernel lets any fd open for writing on a regular file ftruncate it, and
    lets the owner of an O_APPEND fd clear O_APPEND with fcntl, except on an
    append-only inode (`append_only`), where it also refuses truncation.
    """
    if ftype is not FileType.FILE or not access & WRITES:
        return access
    if Access.APPEND in access and append_only:
        return access
    return access | Access.WRITE | Access.TRUNCATE


def request_error(access: Access, exclusive: bool) -> str | None:
    """Why the request itself is invalid (EINVAL), before the policy is asked; None if not."""
    if not access & (Access.READ | WRITES):
        # "create" or "truncate" alone would still yield a (readable) fd.
        return "no read, write or append asked for"
    if exclusive and Access.CREATE not in access:
        return "exclusive without create"
    if Access.TRUNCATE in access and not access & WRITES:
        return "truncate without write or append"
    return None


def named_needs(access: Access) -> Access:
    """What the named path is judged for before any lookup: a create needs no truncate."""
    return access & ~Access.TRUNCATE if Access.CREATE in access else access


def existing_needs(access: Access, ftype: FileType, append_only: bool = False) -> Access:
    """What an existing file of `ftype` is judged for: everything the fd will allow."""
    return fd_allows(access, ftype, append_only)


def created_needs(access: Access) -> Access:
    """What a file the open creates is judged for: what the fd allows, but truncate."""
    return fd_allows(access, FileType.FILE) & ~Access.TRUNCATE


def type_error(access: Access, ftype: FileType) -> tuple[int, str] | None:
    """(errno, reason) when a file of this type cannot be opened so, policy or not."""
    if ftype is FileType.DIR and access & NOT_FOR_DIRS:
        return errno.EISDIR, "a directory can only be opened for reading"
    if ftype is FileType.SOCKET:
        return errno.ENXIO, "a socket cannot be opened; connect to it instead"
    return None


@dataclass(frozen=True)
class OpenJudgement:
    """What the broker would do with one open: `errno` 0 when it would succeed.

    `decision` is the policy's last answer (the refusal, for a denial; None
    when the request was refused before the policy was asked). `effective`
    is what the fd would allow; `needs` what the policy was asked for last.
    """

    errno: int
    reason: str
    decision: Decision | None
    access: Access
    effective: Access
    needs: Access
    created: bool

    @property
    def allowed(self) -> bool:
        return self.errno == 0


def judge_open(
    decide: Callable[[str, Access, FileType | None], Decision],
    path: str,
    mode: str,
    ftype: FileType | None,
    *,
    append_only: bool = False,
) -> OpenJudgement:
    """The opener's decisions for `open(path, mode)`, without the filesystem.

    `ftype` is the type of the file at `path`, None when nothing is there
    (the open would create it, if the mode creates). `decide` is the policy
    bound to the client, as the opener gets it. Kernel failures other than
    "exists" and "does not exist" (permissions of root, a FIFO with no
    reader, a hard-linked file) are the filesystem's and are not judged here.

    Raises:
        ValueError: `mode` is not one open() accepts.
    """
    access, exclusive = access_for_mode(mode)
    created = ftype is None or exclusive
    effective = fd_allows(access, FileType.FILE if created else ftype)

    def result(code: int, reason: str, d: Decision | None, needs: Access) -> OpenJudgement:
        return OpenJudgement(code, reason, d, access, effective, needs, created and code == 0)

    bad = request_error(access, exclusive)
    if bad is not None:
        return result(errno.EINVAL, bad, None, access)
    needs = named_needs(access)
    d0 = decide(path, needs, None)
    if not d0.allowed:
        return result(errno.EACCES, d0.reason, d0, needs)
    if ftype is None and Access.CREATE not in access:
        return result(errno.ENOENT, "no such file or directory", d0, needs)
    if created:
        needs = created_needs(access)
        d1 = decide(path, needs, FileType.FILE)
        if not d1.allowed:
            return result(errno.EACCES, d1.reason, d1, needs)
        if ftype is not None:
            return result(errno.EEXIST, "file exists", d1, needs)
        return result(0, d1.reason, d1, needs)
    assert ftype is not None
    effective = fd_allows(access, ftype, append_only)
    needs = existing_needs(access, ftype, append_only)
    d1 = decide(path, needs, ftype)
    if not d1.allowed:
        reason = d1.reason if needs == access else f"{WRITABLE_MEANS} {d1.reason}"
        return result(errno.EACCES, reason, d1, needs)
    refused = type_error(access, ftype)
    if refused is not None:
        return result(refused[0], refused[1], d1, needs)
    return result(0, d1.reason, d1, needs)


# Where an open may land, for check: (file type, append-only, the name is new).
def situations(ftype: FileType) -> Iterator[tuple[bool, bool]]:
    """(append_only, new) pairs an open on a rule of type `ftype` may meet."""
    yield False, False
    if ftype is FileType.FILE:
        yield True, False
        yield False, True


def open_needs(mode: str, ftype: FileType, append_only: bool, new: bool) -> Access | None:
    """Every word the policy must grant for `mode` to succeed in that situation; None
    when it never succeeds there whatever the policy (a directory for writing, r on a
    name that does not exist, x on an existing file)."""
    access, exclusive = access_for_mode(mode)
    if request_error(access, exclusive) is not None:
        return None
    if new or exclusive:
        if not new or Access.CREATE not in access or ftype is not FileType.FILE:
            return None
        return named_needs(access) | created_needs(access)
    if type_error(access, ftype) is not None:
        return None
    return named_needs(access) | existing_needs(access, ftype, append_only)


def _quoted(access: Access) -> str:
    words = [f"'{w}'" for w in access.words()]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def unusable(access: Access, can_take: Mapping[FileType, Access]) -> str | None:
    """For check: what to say of a rule granting words no open mode can use, or None.

    A word is used when some mode, on some listed type and in some situation
    (an existing file, an append-only one, a new name), needs it and the rule
    grants all that open needs (`open_needs`). `can_take` maps each listed
    type to the words it can take at all (others are check's error already);
    the text says what to add.
    """
    types = frozenset(can_take)
    takeable = Access.NONE
    for words in can_take.values():
        takeable |= words
    used = Access.NONE
    missed: list[tuple[Access, str, str, FileType]] = []  # (needs, where, mode, type)
    for ftype in (t for t in FileType if t in types):
        for append_only, new in situations(ftype):
            for mode in MODES:
                needs = open_needs(mode, ftype, append_only, new)
                if needs is None:
                    continue
                if needs & access == needs:
                    used |= needs
                    continue
                where = " on a new file" if new else ""
                where = where or (" on an append-only file" if append_only else "")
                missed.append((needs, where, mode, ftype))
    unused = access & takeable & ~used
    if not unused:
        return None
    # The smallest additions that make an open use an unused word, per situation.
    useful: dict[tuple[Access, str], tuple[list[str], set[FileType]]] = {}
    for needs, where, mode, ftype in missed:
        if needs & unused and needs & can_take[ftype] == needs:
            modes, kinds = useful.setdefault((needs & ~access, where), ([], set()))
            if mode not in modes:
                modes.append(mode)
            kinds.add(ftype)
    useful = {
        (extra, where): found
        for (extra, where), found in useful.items()
        if not any(e2 < extra and w2 == where for e2, w2 in useful)
    }
    for extra, where in list(useful):  # an append-only file's, if new
        if where.startswith(" on an append-only") and (extra, "") in useful:
            del useful[(extra, where)]
    ranked = sorted(useful.items(), key=lambda kv: (len(kv[0][0].words()), kv[0][1]))[:3]
    listed = ", ".join(t.value for t in FileType if t in types)
    on = "a file" if types == {FileType.FILE} else f"types {listed}"
    what = "this rule" if not used else f"{_quoted(unused)} in this rule"
    text = f"no open mode can use {what} on {on}"
    if not ranked:
        return f"{text}: remove {_quoted(unused)}"
    adds = []
    for (extra, where), (modes, kinds) in ranked:
        of = ", ".join(t.value for t in FileType if t in kinds)
        of = "" if len(types) == 1 else f" ({of})"
        adds.append(f"{_quoted(extra)} for {'/'.join(modes)}{where}{of}")
    return f"{text}: add " + ", or ".join(adds)
