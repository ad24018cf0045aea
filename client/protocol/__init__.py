"""The privbroker wire protocol: message types, limits and bytes. No I/O.

Transport: an AF_UNIX SOCK_SEQPACKET connection. Every datagram holds exactly
one msgpack array; the client sends requests, the broker answers each with one
reply carrying the same request id, and the fds an operation produced ride on
that reply as SCM_RIGHTS, in the order of the successful results.

    request:  [VERSION, op, id, *body]
    reply:    [VERSION, op, id, *body]

The operations, their bodies and replies are listed in messages.py (one class
per operation, in one table) and in docs/protocol.md, with every errno.

Rule 1: decoding checks size, shape and every type before building a message;
anything else raises ProtocolError, and the peer that sent it is a protocol
violator (the broker closes the connection; the client poisons its own).
Rule 2: messages are frozen dataclasses; raw msgpack objects never leave the
protocol.

The package's modules: limits.py (the named limits), access.py (access words,
open modes, paths), messages.py (operations and the message classes, in the
op tables), errnos.py (every errno a broker sends, and why), codec.py (the
bytes; checks.py the field checks, netbodies.py the network ops' bodies),
targets.py (socket targets as text), fastwire.py (the client's shortcut for
the commonest reply).
"""

from .access import ALL_ACCESS, Access, access_for_mode, check_path
from .codec import decode_reply, decode_request, encode_reply, encode_request
from .errnos import ERRNO_CAUSES
from .limits import (
    DEFAULT_SOCKET,
    MAX_ADDRESS_CHARS,
    MAX_BACKLOG,
    MAX_BATCH,
    MAX_EXPLAIN_REASON_CHARS,
    MAX_GIDS,
    MAX_ID,
    MAX_IFNAME_CHARS,
    MAX_PATH_BYTES,
    MAX_PROGRAM_CHARS,
    MAX_REASON_CHARS,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RULE_CHARS,
    MAX_TARGET_CHARS,
    NAME_MAX_BYTES,
    SOCKET_ENV,
    VERSION,
    __version__,
)
from .messages import (
    NETCONF_ACTIONS,
    REPLIES,
    REQUESTS,
    DeclareReply,
    DeclareRequest,
    ErrorReply,
    ExplainReply,
    ExplainRequest,
    NetconfReply,
    NetconfRequest,
    Op,
    OpenItem,
    OpenReply,
    OpenRequest,
    ProtocolError,
    Reply,
    Request,
    Result,
    SocketReply,
    SocketRequest,
    StatusReply,
    StatusRequest,
    TunReply,
    TunRequest,
    UnknownOperation,
    UnsupportedVersion,
)

__all__ = [
    "ALL_ACCESS",
    "DEFAULT_SOCKET",
    "ERRNO_CAUSES",
    "MAX_ADDRESS_CHARS",
    "MAX_BACKLOG",
    "MAX_BATCH",
    "MAX_EXPLAIN_REASON_CHARS",
    "MAX_GIDS",
    "MAX_ID",
    "MAX_IFNAME_CHARS",
    "MAX_PATH_BYTES",
    "MAX_PROGRAM_CHARS",
    "MAX_REASON_CHARS",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_RULE_CHARS",
    "MAX_TARGET_CHARS",
    "NAME_MAX_BYTES",
    "NETCONF_ACTIONS",
    "REPLIES",
    "REQUESTS",
    "SOCKET_ENV",
    "VERSION",
    "Access",
    "DeclareReply",
    "DeclareRequest",
    "ErrorReply",
    "ExplainReply",
    "ExplainRequest",
    "NetconfReply",
    "NetconfRequest",
    "Op",
    "OpenItem",
    "OpenReply",
    "OpenRequest",
    "ProtocolError",
    "Reply",
    "Request",
    "Result",
    "SocketReply",
    "SocketRequest",
    "StatusReply",
    "StatusRequest",
    "TunReply",
    "TunRequest",
    "UnknownOperation",
    "UnsupportedVersion",
    "__version__",
    "access_for_mode",
    "check_path",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]
