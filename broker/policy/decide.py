"""The policy: load a policy file, and decide requests against it. Pure decisions.

`decide(policy, subject, path, access, ftype)` answers one question with a
`Decision`; it does no I/O and keeps no state, so it is tested as a table.
Precedence, in this order:

1. A path that is not absolute and normalised, or a request with no access
   word, is denied (the policy only ever judges the one canonical spelling).
2. A deny rule that matches the subject, the path and (when it lists access)
   any of the requested access words denies: deny wins over every allow.
3. An allow rule that grants the subject, matches the path, grants every
   requested access word and lists the file type allows; the first such rule
   in load order decides and its options (follow_symlinks, hardlinks,
   create_mode) go to the opener. With `ftype` None (the opener's check
   before it touches the filesystem) types are ignored and follow_symlinks
   is True when any allowing rule follows symlinks: the opener then judges
   the real target again, with its real type.
4. Otherwise the request is denied by default, root (uid 0) included.

Subjects: an allow rule grants a subject whose uid it lists (or any, with
"*") or any of whose gids it lists; with an incomplete group list only the
primary gid counts for allow rules, while a deny rule naming any group is
taken to match (never judge on a partial list in the client's favour).

Reasons go back to the client and must never name a rule that does not
concern it (one that names neither its uid nor one of its gids, nor "*"):
a default denial cites only the nearest rule that does. `explain` is for
administrators and may cite any rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from privbroker.protocol import Access, check_path

from .decision import Decision, FileType, Subject
from .load import check_policy, load_policy
from .names import who
from .opens import OpenJudgement, judge_open
from .rules import Policy, PolicyError, Problem, Rule

__all__ = [
    "Decision",
    "Explanation",
    "FileType",
    "OpenExplanation",
    "Policy",
    "PolicyError",
    "Problem",
    "Rule",
    "Subject",
    "check_policy",
    "decide",
    "explain",
    "explain_open",
    "load_policy",
]

_TYPE_NAMES = {
    FileType.FILE: "regular file",
    FileType.DIR: "directory",
    FileType.CHAR: "character device",
    FileType.BLOCK: "block device",
    FileType.FIFO: "FIFO",
    FileType.SOCKET: "socket",
}


@dataclass(frozen=True)
class Explanation:
    """A decision and, for a denial, the allow rule that came nearest and why it did not."""

    decision: Decision
    near_rule: str | None
    near_reason: str


def decide(
    policy: Policy, subject: Subject, path: str, access: Access, ftype: FileType | None
) -> Decision:
    """Judge one request; see the module docstring for the precedence.

    Args:
        policy: a loaded policy.
        subject: the client, as the kernel reported it.
        path: the absolute, normalised path asked for (or found, after a symlink).
        access: every access word the open needs.
        ftype: the file's real type, or None before the opener has looked.

    Returns:
        A Decision whose reason can be sent to the client as is.
    """
    refused = _refuse_request(path, access)
    if refused is not None:
        return refused
    deny = _deny_rule(policy, subject, path, access)
    if deny is not None:
        return Decision(False, deny.name, _denied_text(deny, subject))
    best: Rule | None = None
    follow = False
    near: list[Rule] = []
    for rule in policy.allow_index.lookup(subject, path):
        if _allows(rule, subject, access, ftype):
            if best is None or rule.order < best.order:
                best = rule
            follow = follow or rule.follow_symlinks
        elif rule.concerns(subject):
            near.append(rule)
    if best is None:
        return _default_denial(subject, path, access, ftype, near)
    return Decision(
        True,
        best.name,
        f"allowed by rule '{best.name}'",
        follow_symlinks=follow if ftype is None else best.follow_symlinks,
        hardlinks=best.hardlinks,
        create_mode=best.create_mode,
    )


def _refuse_request(path: str, access: Access) -> Decision | None:
    try:
        check_path(path)
    except ValueError as exc:
        return Decision(False, None, f"invalid path: {exc}")
    if not access & (Access.READ | Access.WRITE | Access.APPEND):
        # An open needs read, write or append; "create" or "truncate" alone
        # would still yield an fd, and slip past deny rules on what it allows.
        return Decision(False, None, "the request names no read, write or append access")
    return None


def _allows(rule: Rule, s: Subject, access: Access, ftype: FileType | None) -> bool:
    return (
        access & rule.access == access and (ftype is None or ftype in rule.types) and rule.grants(s)
    )


def _deny_rule(policy: Policy, s: Subject, path: str, access: Access) -> Rule | None:
    """The first deny rule (in load order) that refuses this request, if any."""
    found: Rule | None = None
    for rule in policy.deny_index.lookup(s, path, any_group=not s.groups_complete):
        if rule.access & access and rule.refuses(s) and (found is None or rule.order < found.order):
            found = rule
    return found


def _denied_text(rule: Rule, s: Subject) -> str:
    text = f"denied by rule '{rule.name}'"
    if not rule.concerns(s):
        text += " (it names groups, and this client's group list could not be read in full)"
    return text


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _shortfalls(rule: Rule, access: Access, ftype: FileType | None) -> list[str]:
    """What a rule lacks in access words and file types for this request."""
    why = []
    if access & rule.access != access:
        why.append(f"grants {_join(rule.access.words())} only")
    if ftype is not None and ftype not in rule.types:
        types = ", ".join(t.value for t in FileType if t in rule.types)
        why.append(f"allows types {types}, not {ftype.value}")
    return why


def _default_denial(
    s: Subject, path: str, access: Access, ftype: FileType | None, near: list[Rule]
) -> Decision:
    what = f"{_join(access.words())} {path}"
    if ftype is not None:
        what += f" (a {_TYPE_NAMES[ftype]})"
    text = f"no rule allows {who(s)} to {what}"
    if not near:
        return Decision(False, None, text)
    # Nearest: fewest shortfalls, a subject shortfall counting most; then load order.
    rule = min(near, key=lambda r: (_weight(r, s, access, ftype), r.order))
    why = _shortfalls(rule, access, ftype)
    if not rule.grants(s):
        why.insert(
            0,
            "grants it through a supplementary group, and this client's group "
            "list could not be read in full",
        )
    return Decision(False, rule.name, f"{text}; rule '{rule.name}' {_join(why)}")


def _weight(rule: Rule, s: Subject, access: Access, ftype: FileType | None) -> int:
    return (
        4 * (not rule.grants(s))
        + 2 * (access & rule.access != access)
        + (ftype is not None and ftype not in rule.types)
    )


def explain(
    policy: Policy,
    subject: Subject,
    path: str,
    access: Access,
    ftype: FileType | None = None,
) -> Explanation:
    """The decision, and for a denial the allow rule that came nearest and why not.

    For administrators: unlike a Decision's reason, this may name any rule.
    """
    decision = decide(policy, subject, path, access, ftype)
    if decision.allowed or _refuse_request(path, access) is not None:
        return Explanation(decision, None, "")
    if not policy.allow_rules:
        return Explanation(decision, None, "the policy has no allow rules")
    rule = min(
        policy.allow_rules, key=lambda r: (-_score(r, subject, path, access, ftype), r.order)
    )
    why = []
    if not rule.grants(subject):
        why.append(
            "grants it through a supplementary group the broker could not confirm"
            if rule.concerns(subject)
            else f"is for {_for_whom(rule)}"
        )
    if not rule.matches_path(path):
        patterns = ", ".join(p.text for p in rule.patterns[:4])
        more = ", ..." if len(rule.patterns) > 4 else ""
        why.append(f"its paths ({patterns}{more}) do not match {path}")
    why.extend(_shortfalls(rule, access, ftype))
    if not why:
        # It allows everything asked, so only a deny rule can have refused.
        why.append(f"is overridden by deny rule '{decision.rule}'")
    return Explanation(decision, rule.name, f"rule '{rule.name}' would allow it but {_join(why)}")


@dataclass(frozen=True)
class OpenExplanation:
    """What the broker would do with one open, and the explanation of the policy's last
    answer on the way (None when the request was refused before the policy was asked)."""

    judgement: OpenJudgement
    explanation: Explanation | None


def explain_open(
    policy: Policy,
    subject: Subject,
    path: str,
    mode: str,
    ftype: FileType | None,
    *,
    append_only: bool = False,
) -> OpenExplanation:
    """`open(path, mode)` judged as the opener judges it (policy/opens.py `judge_open`):
    `ftype` is the type of the file at `path`, None for a name that does not exist.

    Raises:
        ValueError: `mode` is not one open() accepts.
    """
    asked: list[tuple[str, Access, FileType | None]] = []

    def bound(p: str, access: Access, t: FileType | None) -> Decision:
        asked.append((p, access, t))
        return decide(policy, subject, p, access, t)

    judgement = judge_open(bound, path, mode, ftype, append_only=append_only)
    explanation = explain(policy, subject, *asked[-1]) if asked else None
    return OpenExplanation(judgement, explanation)


def _score(rule: Rule, s: Subject, path: str, access: Access, ftype: FileType | None) -> int:
    # A rule for this path weighs more than one for this subject: "rule 'web'
    # is for users www-data" tells an administrator more than a path mismatch.
    return (
        4 * rule.matches_path(path)
        + 3 * rule.grants(s)
        + 2 * (access & rule.access == access)
        + (ftype is None or ftype in rule.types)
    )


def _for_whom(rule: Rule) -> str:
    parts = []
    if rule.user_labels:
        parts.append("users " + ", ".join(rule.user_labels))
    if rule.group_labels:
        parts.append("groups " + ", ".join(rule.group_labels))
    return " and ".join(parts)
