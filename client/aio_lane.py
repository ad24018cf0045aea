"""The asyncio client's fast lane for a one-path open: the sync client's, on a pipelined link.

`Client.open_fd` sends a one-path OPEN encoded by fastwire (its body
remembered per path and mode, `calls.prepare_open`) and has the usual reply
parsed by `fastwire.decode_open_result`, which builds no reply message.
`AsyncClient.open_fd` and `.open` take the same lane: `open_request` makes the
request and its bytes, and the link's reader (aio_connection.py) tries
`fast_result` on every reply before the general decoder.

One thing differs from the sync lane: many requests are in flight on a link,
so the reader must learn which one a reply answers before it can ask
fastwire. `reply_id` reads the id from the reply's head. It is a hint, not a
decision: `fast_result` hands the hint to fastwire, which checks the whole
reply against that id (fastwire's Rule 2) and returns None for anything it
would not decode exactly as codec.py does. So a wrong hint, or a reply of
any other shape, simply goes to the general decoder, which accepts it or
poisons the link as it always did; this lane can make a call faster, never
decide differently (tests/client/test_aio_lane.py).

Pure: no I/O.
"""

from __future__ import annotations

from .calls import PreparedOpen
from .protocol import OpenRequest, Result, fastwire

# A reply is [VERSION, op, id, *body]: a short array's header (a fixarray of
# at least 3), two positive fixints, then the id as msgpack's unsigned integer
# (a positive fixint, or one of these heads and then its bytes, big-endian).
_FIXARRAY, _FIXARRAY_MASK = 0x90, 0xF0
_UINT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def open_request(ident: int, prepared: PreparedOpen) -> tuple[OpenRequest, bytes]:
    """The request opening `prepared`'s one path with id `ident`, and its datagram."""
    return OpenRequest(ident, (prepared.item,)), fastwire.encode_open(ident, prepared.body)


def reply_id(raw: bytes) -> int | None:
    """The id a reply's head names, or None when the head is not the expected shape."""
    if len(raw) < 4 or raw[0] & _FIXARRAY_MASK != _FIXARRAY or raw[0] - _FIXARRAY < 3:
        return None
    if raw[1] >= 0x80 or raw[2] >= 0x80:
        return None
    head = raw[3]
    if head < 0x80:  # positive fixint: the ids of a young connection
        return head
    size = _UINT_BYTES.get(head)
    if size is None or len(raw) < 4 + size:
        return None
    return int.from_bytes(raw[4 : 4 + size], "big")


def fast_result(raw: bytes, ident: int, nfds: int) -> Result | None:
    """The one result of the reply `raw` to request `ident` carrying `nfds` fds, or None.

    A Result exactly when the general decoder and `calls.check_reply` would
    accept `raw` as the OPEN reply to a one-path request `ident` with that
    many fds (one for a success, none for a failure); None for everything
    else, which the caller then decodes the general way.
    """
    result = fastwire.decode_open_result(raw, ident)
    if result is None or nfds != (0 if result.errno else 1):
        return None
    return result
