"""Lease (pure: the undo plan) and leasefile (records on disk, orphan cleanup in a namespace)."""

from __future__ import annotations

import fcntl
import json
import os
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from privbroker.broker.net import leasefile, tun
from privbroker.broker.net.fields import AddressFields, LinkFields, LinkRef, RouteFields
from privbroker.broker.net.leases import Device, Lease, UndoOp
from privbroker.broker.net.messages import Kind
from privbroker.broker.net.rtnl import Rtnl
from tests.net.conftest import TUNSETPERSIST, ip, ip_json, link_names, needs_root

A4 = AddressFields(7, ip_interface("10.8.0.2/24"))
A6 = AddressFields(7, ip_interface("fd00::2/64"), nodad=True)
R_OTHER = RouteFields(ip_network("10.9.0.0/16"), oif=7)
R_VIA = RouteFields(ip_network("10.10.0.0/16"), gateway=ip_address("10.8.0.1"))
R_LEASED = RouteFields(ip_network("10.11.0.0/16"), oif=20)


def test_undo_plan_is_newest_first_and_skips_what_dies_with_the_device() -> None:
    lease = Lease()
    lease.address_added(A4)  # on device 7, not leased: undone
    lease.device_created(20, "vpn0")
    lease.address_added(AddressFields(20, ip_interface("10.8.0.1/24")))  # dies with vpn0
    lease.route_added(R_LEASED)  # dies with vpn0
    lease.route_added(R_VIA)  # a gateway alone: undone explicitly
    lease.route_added(R_OTHER)
    lease.link_changed(LinkFields(20, up=False))  # leased: nothing to restore
    lease.link_changed(LinkFields(7, mtu=1500))
    assert lease.devices == (Device(20, "vpn0"),)
    assert lease.undo_plan() == [
        UndoOp(Kind.SET_LINK, LinkFields(7, mtu=1500)),
        UndoOp(Kind.DEL_ROUTE, R_OTHER),
        UndoOp(Kind.DEL_ROUTE, R_VIA),
        UndoOp(Kind.DEL_LINK, LinkRef(ifindex=20)),
        UndoOp(Kind.DEL_ADDRESS, A4),
    ]


def test_link_undo_restores_the_original_state() -> None:
    lease = Lease()
    lease.link_changed(LinkFields(7, mtu=1500))  # first change: the original MTU
    lease.link_changed(LinkFields(7, up=False, mtu=1400))  # an intermediate MTU: not kept
    lease.link_changed(LinkFields(8, up=True))
    assert lease.undo_plan() == [
        UndoOp(Kind.SET_LINK, LinkFields(8, up=True)),
        UndoOp(Kind.SET_LINK, LinkFields(7, up=False, mtu=1500)),
    ]


def test_a_deleted_addition_needs_no_undo() -> None:
    lease = Lease()
    lease.address_added(A4)
    lease.address_added(A6)
    lease.route_added(R_OTHER)
    lease.address_deleted(AddressFields(7, ip_interface("fd00::2/64")))  # nodad aside, the same
    lease.route_deleted(R_OTHER)
    lease.route_deleted(R_VIA)  # never added: nothing changes
    assert lease.undo_plan() == [UndoOp(Kind.DEL_ADDRESS, A4)]


def test_forget_device_drops_it_and_everything_on_its_index() -> None:
    lease = Lease()
    lease.device_created(20, "vpn0")
    lease.address_added(A4)
    lease.route_added(R_OTHER)
    lease.route_added(R_VIA)
    assert lease.forget_device(7) is None  # a non-leased device vanished: its entries go
    assert lease.undo_plan() == [
        UndoOp(Kind.DEL_ROUTE, R_VIA),
        UndoOp(Kind.DEL_LINK, LinkRef(ifindex=20)),
    ]
    assert lease.forget_device(20) == Device(20, "vpn0")
    assert lease.undo_plan() == [UndoOp(Kind.DEL_ROUTE, R_VIA)]
    assert not lease.leases(20) and lease.devices == ()


def test_a_device_is_leased_once() -> None:
    lease = Lease()
    lease.device_created(20, "vpn0")
    with pytest.raises(ValueError):
        lease.device_created(20, "vpn0")


def test_record_round_trip_and_removal(tmp_path: Path) -> None:
    leasefile.write(tmp_path, "123-4", [Device(20, "vpn0"), Device(21, "tap0")])
    body = json.loads((tmp_path / "123-4.json").read_text())
    assert body["netns"] == leasefile.netns_id()
    found = leasefile.orphans(tmp_path)
    assert [o.device for o in found] == [Device(20, "vpn0"), Device(21, "tap0")]
    assert (tmp_path / "123-4.json").stat().st_mode & 0o777 == 0o600
    leasefile.write(tmp_path, "123-4", [])  # a lease with no device keeps no record
    assert leasefile.orphans(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert leasefile.orphans(tmp_path / "missing") == []


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_record_keys_are_file_names(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        leasefile.write(tmp_path, key, [Device(1, "lo")])


@needs_root
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "netns": [1, 2], "devices": []}',
        b'{"version": 1, "devices": []}',
        b'{"version": 1, "netns": [1, 2], "devices": [{"ifindex": "3", "name": "x"}]}',
        b'{"version": 1, "netns": [1, 2], "devices": [{"ifindex": 3, "name": "../x"}]}',
        b" " * (leasefile.MAX_RECORD + 1),
    ],
)
def test_malformed_records_are_left_and_reported(ns: None, tmp_path: Path, body: bytes) -> None:
    (tmp_path / "bad.json").write_bytes(body)
    assert leasefile.orphans(tmp_path) == []
    with Rtnl() as r:
        result = leasefile.cleanup_orphans(r, tmp_path)
    assert result.unreadable == [tmp_path / "bad.json"] and (tmp_path / "bad.json").exists()


@needs_root
def test_cleanup_deletes_a_recorded_device_and_spares_reused_ones(ns: None, tmp_path: Path) -> None:
    held = tun.create("orph%d")  # a device a client still holds after the broker died
    renamed = tun.create("orig0")  # its index will carry another name
    moved = tun.create("moved0")  # its name will carry another index
    try:
        stale_index = moved.ifindex
        os.close(moved.fd)
        ip("tuntap", "add", "mode", "tun", "name", "moved0")  # same name, a new index
        leasefile.write(
            tmp_path,
            "1-1",
            [Device(held.ifindex, held.name), Device(renamed.ifindex, "other0")],
        )
        leasefile.write(tmp_path, "1-2", [Device(stale_index, "moved0")])
        foreign = {"version": 1, "netns": [0, 1], "devices": [{"ifindex": 1, "name": "lo"}]}
        (tmp_path / "9-9.json").write_text(json.dumps(foreign))  # another namespace's
        with Rtnl() as r:
            result = leasefile.cleanup_orphans(r, tmp_path)
        assert result.deleted == [Device(held.ifindex, held.name)]
        assert result.spared == [Device(renamed.ifindex, "other0")]
        assert result.gone == [Device(stale_index, "moved0")]
        assert held.name not in link_names()
        assert {"orig0", "moved0", "lo"} <= link_names()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["9-9.json"]
    finally:
        os.close(held.fd)
        os.close(renamed.fd)


@needs_root
def test_an_undo_plan_run_against_the_kernel_restores_the_namespace(ns: None) -> None:
    lease = Lease()
    dev = tun.create("vpn%d")
    lease.device_created(dev.ifindex, dev.name)
    with Rtnl() as r:

        def done(kind: Kind, fields: AddressFields | LinkFields | RouteFields) -> None:
            r.call(kind, fields)  # the broker records a change once the kernel acked it
            if isinstance(fields, AddressFields):
                lease.address_added(fields)
            elif isinstance(fields, RouteFields):
                lease.route_added(fields)

        done(Kind.ADD_ADDRESS, AddressFields(dev.ifindex, ip_interface("10.8.0.1/24")))
        r.call(Kind.SET_LINK, LinkFields(dev.ifindex, up=True))
        lease.link_changed(LinkFields(dev.ifindex, up=False))
        done(Kind.ADD_ADDRESS, AddressFields(1, ip_interface("10.99.0.1/32")))  # on lo
        r.call(Kind.SET_LINK, LinkFields(1, mtu=1500))
        lease.link_changed(LinkFields(1, mtu=65536))
        done(Kind.ADD_ROUTE, RouteFields(ip_network("10.9.0.0/16"), oif=dev.ifindex))
        done(
            Kind.ADD_ROUTE, RouteFields(ip_network("10.10.0.0/16"), gateway=ip_address("10.8.0.2"))
        )
        fcntl.ioctl(dev.fd, TUNSETPERSIST, 1)  # what a holder may do to outlive its fd
        os.close(dev.fd)
        assert dev.name in link_names()

        assert [op.kind for op in lease.undo_plan()] == [
            Kind.DEL_ROUTE,
            Kind.SET_LINK,
            Kind.DEL_ADDRESS,
            Kind.DEL_LINK,
        ]
        for op in lease.undo_plan():
            r.call(op.kind, op.fields)

    assert link_names() == {"lo"}
    (lo,) = ip_json("addr", "show", "dev", "lo")
    assert lo["mtu"] == 65536
    assert {a["local"] for a in lo["addr_info"]} == {"127.0.0.1", "::1"}
    assert ip_json("route", "show", "table", "main") == []
