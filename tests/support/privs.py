"""Run a function in a forked child that has dropped to another uid and groups.

The tests run as root. The interpreter lives under /root, which other uids
cannot enter, so a child cannot exec Python as another uid; instead we fork
(everything is already imported), drop privileges in the child, run the
function, and send its result (or its exception) back pickled through a pipe.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

NOBODY = 65534
NOGROUP = 65534


class ChildFailed(Exception):
    """The child died without sending a result."""


def run_as(
    uid: int,
    gid: int,
    fn: Callable[..., Any],
    *args: Any,
    groups: tuple[int, ...] = (),
    timeout: float = 30.0,
) -> Any:
    """Call fn(*args) as uid/gid with the supplementary `groups`; return its result.

    An exception raised by fn in the child is re-raised here (pickled), with
    the child's traceback text in its notes.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(rfd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException as exc:
                exc.add_note(traceback.format_exc())
                try:
                    payload = pickle.dumps(("err", exc))
                except Exception:
                    payload = pickle.dumps(("err", RuntimeError(traceback.format_exc())))
            with os.fdopen(wfd, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        import select

        ready, _, _ = select.select([inp], [], [], timeout)
        data = inp.read() if ready else b""
    if not ready:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    if not data:
        raise ChildFailed(f"child as uid {uid} sent no result")
    kind, value = pickle.loads(data)
    if kind == "err":
        raise value
    return value
