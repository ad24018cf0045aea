"""What the broker does with a decoded request: open, explain, status.

An open request holds up to MAX_BATCH items. Each is first tried inline, on
the loop's thread, in the opener's non-blocking mode; an item that might
block (a cold dentry cache, a network filesystem, a device) goes to a worker
thread instead. The reply is sent when every item has an outcome, with the
fds in item order. An item whose worker has not answered within the open
timeout gets ETIMEDOUT; whatever that worker opens later is closed on arrival
(the request has been "abandoned"), so no fd outlives its request.

The policy is read once per request (`self.policy` at arrival): a reload that
lands while a request waits for a worker does not change the rules it is
judged by halfway.
"""

from __future__ import annotations

import errno
import logging
import pwd
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from privbroker import protocol as proto
from privbroker import unix
from privbroker.protocol.codec import encode_result
from privbroker.protocol.targets import parse_socket_target

from ..files.fastpath import FastTable
from ..files.opener import Opened, Opener, WouldBlock
from ..policy.decide import Policy, decide, explain
from ..policy.decision import Decision, FileType, Subject
from ..policy.netdecide import decide_socket
from ..policy.phrases import explain_phrase, is_phrase
from .audit import AuditLog
from .connection import Connection
from .workers import Workers

log = logging.getLogger("privbroker")

SendFn = Callable[[Connection, bytes, list[int], int], None]  # conn, datagram, fds, fds reserved
# What the native fast path (broker/files/_fast.c) may answer for one client under
# one policy: (path, access value) -> (open flags, hard links allowed, the
# packed allowing result, its rule).


class PendingOpen:
    """An open request waiting for its workers."""

    __slots__ = (
        "abandoned",
        "conn",
        "deadline",
        "fast",
        "fds",
        "id",
        "items",
        "jobs",
        "results",
        "started",
        "waiting",
    )

    def __init__(
        self, conn: Connection, request: proto.OpenRequest, deadline: float, fast: FastTable
    ) -> None:
        self.conn = conn
        self.fast = fast  # the client's fast table under the policy that judges this
        self.id = request.id
        self.items = request.items
        self.started = time.perf_counter()
        self.results: list[proto.Result | None] = [None] * len(request.items)
        self.fds: list[int] = [-1] * len(request.items)
        self.waiting = 0
        self.deadline = deadline
        self.abandoned = False

    def drop(self) -> None:
        """The connection is gone or the reply was sent: close what is still ours."""
        self.abandoned = True
        unix.close_fds([fd for fd in self.fds if fd >= 0])
        self.fds = [-1] * len(self.fds)


class Dispatcher:
    def __init__(
        self,
        policy: Policy,
        opener: Opener,
        audit: AuditLog,
        send: SendFn,
        wake: Callable[[], None],
        *,
        workers: int = 8,
        open_timeout: float = 10.0,
    ) -> None:
        self.policy = policy
        self._cached_policy = policy
        # subject -> (path, access bits, id of the file type) -> decision
        self._cache: dict[Subject, dict[tuple[str, int, int], Decision]] = {}
        self._fast: dict[Subject, FastTable] = {}
        self.opener = opener
        self.audit = audit
        self.stats: Counter[str] = Counter()
        self.open_timeout = open_timeout
        self.workers = Workers(workers)
        self.pending: set[PendingOpen] = set()
        self._send = send
        self._wake = wake
        self._done: deque[
            tuple[PendingOpen, int, int, Opened | BaseException, proto.OpenItem, float]
        ] = deque()

    # ------------------------------------------------------------------ opens

    def _policy(self) -> Policy:
        policy = self.policy
        if policy is not self._cached_policy:  # a reload: old answers no longer hold
            self._cache = {}
            self._fast = {}
            self._cached_policy = policy
        return policy

    def fast_table(self, subject: Subject) -> FastTable:
        """The fast path's answers for `subject` under the current policy."""
        self._policy()
        table = self._fast.get(subject)
        if table is None:
            if len(self._fast) >= DECISION_CACHE_SUBJECTS:
                self._fast.clear()
            table = self._fast[subject] = {}
        return table

    def open(self, conn: Connection, request: proto.OpenRequest, mismatch: str, pid: int) -> None:
        peer = conn.peer
        policy = self._policy()
        fast = self.fast_table(conn.subject)
        p = PendingOpen(conn, request, time.monotonic() + self.open_timeout, fast)
        cache = self._cache.get(conn.subject)
        if cache is None:
            if len(self._cache) >= DECISION_CACHE_SUBJECTS:
                self._cache.clear()
            cache = self._cache[conn.subject] = {}
        judge = _judge(policy, conn.subject, cache)
        for i, item in enumerate(request.items):
            start = time.perf_counter()
            if mismatch:
                opened = Opened(-1, proto.Result(errno.EACCES, True, mismatch, None))
            else:
                try:
                    opened = self.opener.open(judge, item, peer.uid, peer.gid, inline=True)
                except WouldBlock:
                    if self.workers.busy[peer.uid] >= self.workers.per_uid:
                        opened = Opened(
                            -1,
                            proto.Result(
                                errno.EAGAIN,
                                False,
                                f"uid {peer.uid} has too many slow opens in flight; try again",
                            ),
                        )
                    else:
                        self._submit(p, i, item, judge, start)
                        continue
            self._settle(p, i, item, opened, start)
        if p.waiting:
            self.pending.add(p)
            conn.pending.add(p)
        else:
            self._reply(p)

    def _submit(
        self,
        p: PendingOpen,
        i: int,
        item: proto.OpenItem,
        judge: Callable[[str, proto.Access, FileType | None], Decision],
        start: float,
    ) -> None:
        uid, gid = p.conn.peer.uid, p.conn.peer.gid
        p.waiting += 1
        self.stats["worker_opens"] += 1

        def done(
            outcome: Opened | BaseException,
        ) -> None:  # on the worker thread: queue, wake, no more
            self._done.append((p, i, uid, outcome, item, start))
            self._wake()

        self.workers.submit(uid, lambda: self.opener.open(judge, item, uid, gid), done)

    def collect(self) -> None:
        """Take in what the workers finished (on the loop's thread)."""
        while self._done:
            p, i, uid, outcome, item, start = self._done.popleft()
            self.workers.finished(uid)
            if not isinstance(outcome, Opened):
                log.error("open of %s failed in a worker: %r", item.path, outcome)
                outcome = Opened(-1, proto.Result(errno.EIO, False, "internal error"))
            if p.abandoned:
                # Answered already (timed out), or the client left: what was
                # opened is closed, and the audit log says so.
                self._account(p.conn, item, outcome, time.perf_counter() - start, late=True)
                if outcome.fd >= 0:
                    unix.close_fds([outcome.fd])
                continue
            p.waiting -= 1
            self._settle(p, i, item, outcome, start)
            if not p.waiting:
                self._finish(p)

    def expire(self, now: float) -> None:
        """Answer ETIMEDOUT for items whose workers are past the open timeout."""
        for p in [p for p in self.pending if now >= p.deadline]:
            for i, result in enumerate(p.results):
                if result is None:
                    timeout = proto.Result(
                        errno.ETIMEDOUT,
                        False,
                        f"the open took longer than {self.open_timeout:g} s "
                        "(a stalled filesystem or device?)",
                    )
                    p.results[i] = timeout
                    self.stats["timeouts"] += 1
                    took = time.perf_counter() - p.started
                    self._account(p.conn, p.items[i], Opened(-1, timeout), took)
            p.waiting = 0
            self._finish(p)

    def _finish(self, p: PendingOpen) -> None:
        self.pending.discard(p)
        p.conn.pending.discard(p)
        self._reply(p)

    def _settle(
        self, p: PendingOpen, i: int, item: proto.OpenItem, opened: Opened, start: float
    ) -> None:
        p.results[i] = opened.result
        p.fds[i] = opened.fd
        if opened.fast is not None and len(item.path) <= DECISION_CACHE_PATH:
            if len(p.fast) >= DECISION_CACHE_SIZE:
                p.fast.clear()
            r = opened.result
            p.fast[item.path, item.access._value_] = (*opened.fast, encode_result(r), r.rule)
        self._account(p.conn, item, opened, time.perf_counter() - start)

    def _reply(self, p: PendingOpen) -> None:
        results = tuple(r or proto.Result(errno.EIO, False, "no outcome") for r in p.results)
        fds = [fd for fd, r in zip(p.fds, results, strict=True) if fd >= 0 and r.errno == 0]
        try:
            data = proto.encode_reply(proto.OpenReply(p.id, results))
        except Exception:
            p.drop()
            raise
        p.fds = [-1] * len(p.fds)  # the send owns them now
        p.abandoned = True  # late workers (after a timeout) close what they open
        self._send(p.conn, data, fds, len(p.results))

    def drop_connection(self, conn: Connection) -> None:
        """A connection closed with requests still at the workers."""
        for p in list(conn.pending):
            self.pending.discard(p)
            p.drop()
        conn.pending.clear()

    def _account(
        self,
        conn: Connection,
        item: proto.OpenItem,
        opened: Opened,
        took: float,
        late: bool = False,
    ) -> None:
        """Count the outcome and write its audit record.

        `late`: a worker finished after the request was answered (timed out)
        or its client left; the fd, if any, is closed and never sent. Counted
        once already (as the timeout), so only the audit record is written.
        """
        r = opened.result
        verdict = "allow" if r.errno == 0 else ("deny" if r.denied else "error")
        if not late:
            self.stats[_COUNTER[verdict]] += 1
        if self.audit.enabled:
            self._record(conn, item.path, item.access, opened, verdict, took, late)

    def audit_fast(
        self, conn: Connection, items: list[tuple[tuple[str, int], str | None]], took: float
    ) -> None:
        """Audit the opens the fast path made and sent, in `took` s: their
        (path, access) and rule."""
        each = took / len(items)
        for (path, access), rule in items:
            opened = Opened(-1, proto.Result(rule=rule), path, FileType.FILE)
            self._record(conn, path, proto.Access(access), opened, "allow", each, False)

    def _record(
        self,
        conn: Connection,
        path: str,
        access: proto.Access,
        opened: Opened,
        verdict: str,
        took: float,
        late: bool,
    ) -> None:
        p, r = conn.peer, opened.result
        self.audit.record(
            {
                "late": late,
                "uid": p.uid,
                "gid": p.gid,
                "groups": list(p.groups),
                "pid": p.pid,
                "exe": conn.exe,
                "declared": conn.declared,  # the client's words, not the kernel's
                "path": path,
                "real_path": opened.real_path,
                "access": access.words(),
                "type": opened.ftype.value if opened.ftype else None,
                "decision": verdict,
                "rule": r.rule,
                "errno": r.errno,
                "error": errno.errorcode.get(r.errno) if r.errno else None,
                "reason": r.reason,
                "created": opened.created,
                "duration_us": round(took * 1e6, 1),
            }
        )

    # ---------------------------------------------------------- admin requests

    def admin(
        self,
        conn: Connection,
        req: proto.Request,
        mismatch: str,
        status: Callable[[], dict[str, Any]],
    ) -> proto.Reply:
        """The reply to an EXPLAIN or STATUS request (the loop has checked it is root's)."""
        if mismatch:
            return proto.ErrorReply(req.id, errno.EACCES, mismatch)
        if isinstance(req, proto.ExplainRequest):
            return self.explain(conn, req)
        return proto.StatusReply(req.id, status())

    def explain(self, conn: Connection, req: proto.ExplainRequest) -> proto.Reply:
        gid = req.gids[0] if req.gids else _primary_gid(req.uid)
        subject = Subject(req.uid, gid, frozenset((gid, *req.gids)))
        if not req.path.startswith("/"):  # a socket or an operation (docs/protocol.md)
            try:
                if is_phrase(req.path):
                    d = explain_phrase(self.policy, subject, req.path)
                else:
                    d = decide_socket(self.policy, subject, parse_socket_target(req.path))
            except ValueError as exc:
                return proto.ErrorReply(req.id, errno.EINVAL, f"{req.path!r}: {exc}")
            return proto.ExplainReply(req.id, d.allowed, d.rule, d.reason)
        ex = explain(self.policy, subject, req.path, req.access)
        d = ex.decision
        return proto.ExplainReply(req.id, d.allowed, d.rule, d.reason, ex.near_rule, ex.near_reason)


_COUNTER = {"allow": "allowed", "deny": "denied", "error": "failed"}


# decide() is pure: the same question about the same policy has the same
# answer, so answers are remembered, per policy and subject, up to this many.
DECISION_CACHE_SIZE = 4096
DECISION_CACHE_SUBJECTS = 256
DECISION_CACHE_PATH = 512


def _judge(
    policy: Policy, subject: Subject, cache: dict[tuple[str, int, int], Decision]
) -> Callable[[str, proto.Access, FileType | None], Decision]:
    def judge(path: str, access: proto.Access, ftype: FileType | None) -> Decision:
        # Enum hashing runs Python code; the member's value and identity do not.
        key = (path, access._value_, id(ftype))
        d = cache.get(key)
        if d is None:
            d = decide(policy, subject, path, access, ftype)
            # Remember what is worth it and small: not the default denials any
            # client can ask for endlessly, not long paths.
            if len(path) <= DECISION_CACHE_PATH and (d.allowed or d.rule is not None):
                if len(cache) >= DECISION_CACHE_SIZE:
                    cache.clear()
                cache[key] = d
        return d

    return judge


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid
