"""The bodies of the network operations' messages (SOCKET, TUN, NETCONF): how
each is packed and checked. codec.py's op tables point here. No I/O."""

from __future__ import annotations

from typing import Any

from .checks import _bool, _checked_result, _int, _str
from .limits import MAX_ADDRESS_CHARS, MAX_BACKLOG, MAX_IFNAME_CHARS, MAX_TARGET_CHARS, MAX_U32
from .messages import (
    NETCONF_ACTIONS,
    NetconfReply,
    NetconfRequest,
    ProtocolError,
    SocketReply,
    SocketRequest,
    TunReply,
    TunRequest,
)


def _socket_request_body(req: Any) -> list[Any]:
    if len(req.target) > MAX_TARGET_CHARS:
        raise ValueError(f"socket target is longer than {MAX_TARGET_CHARS} characters")
    if not 0 <= req.backlog <= MAX_BACKLOG:
        raise ValueError(f"backlog {req.backlog} is outside 0-{MAX_BACKLOG}")
    return [req.target, req.backlog, req.v6only, req.reuse_port]


def _tun_request_body(req: Any) -> list[Any]:
    if len(req.name) > MAX_IFNAME_CHARS or not 0 <= req.mtu <= MAX_U32:
        raise ValueError(f"device name of at most {MAX_IFNAME_CHARS} characters, mtu a u32")
    return [req.name, req.tap, req.mtu]


def _netconf_request_body(req: Any) -> list[Any]:
    if req.action not in NETCONF_ACTIONS:
        raise ValueError(f"unknown network action {req.action!r}")
    if (
        len(req.ifname) > MAX_IFNAME_CHARS
        or max(len(req.address), len(req.via)) > MAX_ADDRESS_CHARS
    ):
        raise ValueError("a device name or an address is too long")
    if not (0 <= req.mtu <= MAX_U32 and -1 <= req.metric <= MAX_U32 and 0 <= req.table <= MAX_U32):
        raise ValueError("mtu, metric and table are u32 (metric -1: none)")
    return [req.action, req.ifname, req.address, req.up, req.mtu, req.via, req.metric, req.table]


def _socket_request(ident: int, obj: list[Any]) -> SocketRequest:
    target, backlog, v6only, reuse_port = obj[3:]
    return SocketRequest(
        ident,
        _str(target, "target", MAX_TARGET_CHARS),
        _int(backlog, "backlog", 0, MAX_BACKLOG),
        None if v6only is None else _bool(v6only, "v6only"),
        _bool(reuse_port, "reuse_port"),
    )


def _tun_request(ident: int, obj: list[Any]) -> TunRequest:
    name, tap, mtu = obj[3:]
    return TunRequest(
        ident, _str(name, "name", MAX_IFNAME_CHARS), _bool(tap, "tap"), _int(mtu, "mtu", 0, MAX_U32)
    )


def _netconf_request(ident: int, obj: list[Any]) -> NetconfRequest:
    action, ifname, address, up, mtu, via, metric, table = obj[3:]
    if action not in NETCONF_ACTIONS:
        raise ProtocolError(f"unknown network action {action!r}")
    return NetconfRequest(
        ident,
        action,
        _str(ifname, "ifname", MAX_IFNAME_CHARS),
        _str(address, "address", MAX_ADDRESS_CHARS),
        None if up is None else _bool(up, "up"),
        _int(mtu, "mtu", 0, MAX_U32),
        _str(via, "via", MAX_ADDRESS_CHARS),
        -1 if metric == -1 else _int(metric, "metric", 0, MAX_U32),
        _int(table, "table", 0, MAX_U32),
    )


def _socket_reply(ident: int, obj: list[Any]) -> SocketReply:
    return SocketReply(ident, _checked_result(obj[3]))


def _tun_reply(ident: int, obj: list[Any]) -> TunReply:
    return TunReply(
        ident,
        _checked_result(obj[3]),
        _str(obj[4], "name", MAX_IFNAME_CHARS),
        _int(obj[5], "ifindex", 0, 2**31 - 1),
    )


def _netconf_reply(ident: int, obj: list[Any]) -> NetconfReply:
    return NetconfReply(ident, _checked_result(obj[3]))
