"""Rtnl against the kernel, in a namespace of the test's own: each change checked with `ip -j`."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any

import pytest

from privbroker.broker.net import rtnl as rtnl_mod
from privbroker.broker.net import tun
from privbroker.broker.net.fields import AddressFields, Dump, LinkFields, LinkRef, RouteFields
from privbroker.broker.net.messages import NLM_F_DUMP_INTR, NLM_F_MULTI, NLMSG_DONE, Kind
from privbroker.broker.net.replies import Address, Link, Reply, Route
from privbroker.broker.net.rtnl import Rtnl
from tests.net.conftest import ip, ip_json, needs_root

pytestmark = [needs_root, pytest.mark.timeout(30)]


def addresses(dev: str) -> set[str]:
    info = ip_json("addr", "show", "dev", dev)
    return {f"{a['local']}/{a['prefixlen']}" for a in info[0]["addr_info"]}


def routes() -> list[dict[str, Any]]:
    return list(ip_json("route", "show", "table", "all")) + list(
        ip_json("-6", "route", "show", "table", "all")
    )


def find_route(dst: str) -> dict[str, Any] | None:
    return next((r for r in routes() if r["dst"] == dst), None)


@pytest.mark.parametrize(
    ("address", "nodad"), [("10.8.0.1/24", False), ("fd00:8::1/64", True), ("fd00:9::1/64", False)]
)
def test_address_add_and_del(rtnl: Rtnl, tundev: tun.Created, address: str, nodad: bool) -> None:
    fields = AddressFields(tundev.ifindex, ip_interface(address), nodad=nodad)
    assert rtnl.call(Kind.ADD_ADDRESS, fields) == []
    assert address in addresses(tundev.name)
    flags = [a for a in ip_json("addr", "show", "dev", tundev.name)[0]["addr_info"]]
    assert any(a.get("nodad") for a in flags) == nodad
    rtnl.call(Kind.DEL_ADDRESS, fields)
    assert address not in addresses(tundev.name)


def test_address_added_twice_is_refused(rtnl: Rtnl, tundev: tun.Created) -> None:
    # NLM_F_EXCL: an address that exists is someone else's and must not be adopted.
    fields = AddressFields(tundev.ifindex, ip_interface("10.8.0.1/24"))
    rtnl.call(Kind.ADD_ADDRESS, fields)
    with pytest.raises(FileExistsError):
        rtnl.call(Kind.ADD_ADDRESS, fields)


def test_link_up_and_mtu(rtnl: Rtnl, tundev: tun.Created) -> None:
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, up=True, mtu=1280))
    (link,) = ip_json("link", "show", "dev", tundev.name)
    assert "UP" in link["flags"] and link["mtu"] == 1280
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, mtu=9000))  # up is left alone
    (link,) = ip_json("link", "show", "dev", tundev.name)
    assert "UP" in link["flags"] and link["mtu"] == 9000
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, up=False))
    (link,) = ip_json("link", "show", "dev", tundev.name)
    assert "UP" not in link["flags"] and link["mtu"] == 9000


def test_get_link_by_name_and_index(rtnl: Rtnl, tundev: tun.Created) -> None:
    by_name = rtnl.call(Kind.GET_LINK, LinkRef(name=tundev.name))
    by_index = rtnl.call(Kind.GET_LINK, LinkRef(ifindex=tundev.ifindex))
    assert by_name == by_index == [Link(tundev.ifindex, tundev.name, up=False, mtu=1500)]
    with pytest.raises(OSError) as e:
        rtnl.call(Kind.GET_LINK, LinkRef(name="nosuchdev"))
    assert e.value.errno == errno.ENODEV


def test_routes_dev_via_metric_table(rtnl: Rtnl, tundev: tun.Created) -> None:
    rtnl.call(Kind.ADD_ADDRESS, AddressFields(tundev.ifindex, ip_interface("10.8.0.1/24")))
    rtnl.call(Kind.ADD_ADDRESS, AddressFields(tundev.ifindex, ip_interface("fd00::1/64"), True))
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, up=True))
    cases = [
        (RouteFields(ip_network("10.9.0.0/16"), oif=tundev.ifindex), {"scope": "link"}),
        (
            RouteFields(ip_network("10.10.0.0/16"), gateway=ip_address("10.8.0.2"), metric=7),
            {"gateway": "10.8.0.2", "metric": 7},
        ),
        (
            RouteFields(ip_network("10.11.0.0/16"), oif=tundev.ifindex, table=100),
            {"table": "100"},
        ),
        (
            RouteFields(ip_network("10.12.0.0/16"), oif=tundev.ifindex, table=1000, metric=3),
            {"table": "1000", "metric": 3},  # above 255: only RTA_TABLE can say it
        ),
        (
            RouteFields(ip_network("fd01::/64"), gateway=ip_address("fd00::2"), metric=50),
            {"gateway": "fd00::2", "metric": 50},
        ),
    ]
    for fields, expected in cases:
        rtnl.call(Kind.ADD_ROUTE, fields)
        seen = find_route(str(fields.dst))
        assert seen is not None, fields
        assert seen["dev"] == tundev.name and seen["protocol"] == "static"
        assert {k: seen.get(k) for k in expected} == expected
    dumped = {r.dst: r for r in rtnl.call(Kind.DUMP_ROUTES, Dump()) if isinstance(r, Route)}
    assert dumped[ip_network("10.12.0.0/16")].table == 1000
    for fields, _ in cases:
        rtnl.call(Kind.DEL_ROUTE, fields)
        assert find_route(str(fields.dst)) is None


def test_delete_leaves_routes_of_another_protocol(rtnl: Rtnl, tundev: tun.Created) -> None:
    # The broker's deletes carry RTPROT_STATIC: a route `ip route add` made (proto boot) stays.
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, up=True))
    ip("route", "add", "10.20.0.0/16", "dev", tundev.name)
    with pytest.raises(OSError) as e:
        rtnl.call(Kind.DEL_ROUTE, RouteFields(ip_network("10.20.0.0/16"), oif=tundev.ifindex))
    assert e.value.errno == errno.ESRCH
    assert find_route("10.20.0.0/16") is not None


@pytest.mark.parametrize(
    ("kind", "make", "code", "text"),
    [
        (Kind.SET_LINK, lambda i: LinkFields(i, mtu=70000), errno.EINVAL, "mtu greater than"),
        (
            Kind.ADD_ROUTE,
            lambda i: RouteFields(ip_network("10.30.0.0/16"), gateway=ip_address("192.0.2.1")),
            errno.ENETUNREACH,
            "gateway",
        ),
        (
            Kind.ADD_ADDRESS,
            lambda i: AddressFields(i + 100, ip_interface("10.8.0.1/24")),
            errno.ENODEV,
            "Device not found",
        ),
    ],
)
def test_kernel_refusals_carry_errno_and_extack(
    rtnl: Rtnl, tundev: tun.Created, kind: Kind, make: Any, code: int, text: str
) -> None:
    rtnl.call(Kind.SET_LINK, LinkFields(tundev.ifindex, up=True))
    with pytest.raises(OSError) as e:
        rtnl.call(kind, make(tundev.ifindex))
    assert e.value.errno == code
    assert text in e.value.strerror
    # The same through the non-blocking path: (errno, text, []) to the callback.
    got: list[tuple[int, str | None, list[Any]]] = []
    rtnl.submit(kind, make(tundev.ifindex), lambda *a: got.append(a))
    while not got:
        select.select([rtnl], [], [], 5)
        rtnl.on_readable()
    assert got[0][0] == code and text in (got[0][1] or "") and got[0][2] == []


def test_many_requests_driven_from_a_select_loop(rtnl: Rtnl, tundev: tun.Created) -> None:
    answers: dict[str, tuple[int, str | None, list[Any]]] = {}

    def recorder(key: str) -> rtnl_mod.Callback:
        return lambda code, text, records: answers.__setitem__(key, (code, text, records))

    wanted = [ip_interface(f"fd00::{i:x}/128") for i in range(1, 121)]
    for a in wanted:
        rtnl.submit(
            Kind.ADD_ADDRESS, AddressFields(tundev.ifindex, a, nodad=True), recorder(str(a))
        )
    rtnl.submit(Kind.ADD_ADDRESS, AddressFields(tundev.ifindex, wanted[0], True), recorder("dup"))
    rtnl.submit(Kind.DUMP_ADDRESSES, Dump(socket.AF_INET6), recorder("dump"))
    assert answers == {}  # callbacks run from on_readable, never from submit
    assert rtnl.pending == len(wanted) + 2
    deadline = time.monotonic() + 10
    while rtnl.pending and time.monotonic() < deadline:
        readable, _, _ = select.select([rtnl], [], [], 1)
        if readable:
            rtnl.on_readable()
    assert rtnl.pending == 0
    assert all(answers[str(a)] == (0, None, []) for a in wanted)
    assert answers["dup"][0] == errno.EEXIST
    dumped = {r.interface for r in answers["dump"][2] if isinstance(r, Address)}
    assert set(wanted) <= dumped
    assert {str(a) for a in wanted} <= addresses(tundev.name)


def test_lost_answers_after_an_overrun_get_enobufs(ns: None) -> None:
    # A receive buffer far too small for the ACKs: the kernel drops some and says ENOBUFS.
    answers: list[int] = []
    with Rtnl(rcvbuf=1) as r:
        for _ in range(100):
            r.submit(Kind.SET_LINK, LinkFields(1, up=True), lambda c, t, rec: answers.append(c))
        while r.pending:
            select.select([r], [], [], 1)
            r.on_readable()
    assert len(answers) == 100
    assert errno.ENOBUFS in answers and set(answers) <= {0, errno.ENOBUFS}


def test_too_many_in_flight_is_refused_before_sending(rtnl: Rtnl) -> None:
    for _ in range(rtnl_mod.MAX_PENDING):
        rtnl.submit(Kind.DUMP_LINKS, Dump(), lambda *a: None)
    with pytest.raises(BlockingIOError):
        rtnl.submit(Kind.DUMP_LINKS, Dump(), lambda *a: None)


def test_unprivileged_sender_gets_eperm(rtnl: Rtnl, tundev: tun.Created) -> None:
    # Why the broker exists: the kernel checks CAP_NET_ADMIN against each message's sender.
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through its exit status)
        status = 100
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with Rtnl() as own:
                own.call(
                    Kind.ADD_ADDRESS, AddressFields(tundev.ifindex, ip_interface("10.8.0.9/24"))
                )
            status = 0
        except OSError as e:
            status = e.errno or 101
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == errno.EPERM
    assert "10.8.0.9/24" not in addresses(tundev.name)


def test_call_times_out_and_forgets(rtnl: Rtnl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtnl, "on_readable", lambda: None)  # as if no answer ever came
    with pytest.raises(TimeoutError):
        rtnl.call(Kind.DUMP_LINKS, Dump(), timeout=0.05)
    assert rtnl.pending == 0


def test_a_late_answer_to_a_forgotten_request_is_dropped(
    rtnl: Rtnl, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(rtnl, "on_readable", lambda: None)
        with pytest.raises(TimeoutError):
            rtnl.call(Kind.GET_LINK, LinkRef(ifindex=1), timeout=0.01)
    rtnl.on_readable()  # the answer arrives: it matches nothing and is dropped
    assert rtnl.pending == 0
    assert rtnl.call(Kind.GET_LINK, LinkRef(ifindex=1))[0].name == "lo"


def test_an_interrupted_dump_is_reported_as_eintr(rtnl: Rtnl) -> None:
    # The kernel flags a dump that raced a change with NLM_F_DUMP_INTR; it cannot be
    # provoked on demand, so the kernel's messages are fed to the dispatcher directly.
    got: list[tuple[int, str | None, list[Any]]] = []
    seq = rtnl.submit(Kind.DUMP_LINKS, Dump(), lambda *a: got.append(a))
    port = rtnl._port
    lo = Link(1, "lo", up=True, mtu=65536)
    rtnl._dispatch(Reply(16, NLM_F_MULTI | NLM_F_DUMP_INTR, seq, port, record=lo))
    rtnl._dispatch(Reply(NLMSG_DONE, NLM_F_MULTI, seq, port, errno=0))
    assert got == [(errno.EINTR, "dump interrupted by a change: it may be inconsistent", [])]
    rtnl.on_readable()  # the real answer, now unmatched
    assert rtnl.pending == 0


def test_notifications_reach_only_a_listener(ns: None) -> None:
    heard: list[Reply] = []
    lo = Reply(16, 0, 5, 4242, record=Link(1, "lo", up=True, mtu=65536))
    with Rtnl(on_notify=heard.append) as plain, Rtnl(groups=1, on_notify=heard.append) as group:
        plain._dispatch(lo)  # not bound to a group: a stray message, dropped
        group._dispatch(lo)
        group._dispatch(Reply(NLMSG_DONE, 0, 5, 4242, errno=0))  # no record: not an event
    assert heard == [lo]
