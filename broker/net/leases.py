"""What the broker did for one client, and how to undo it. Pure: no I/O.

A `Lease` belongs to one client connection. It holds the devices the broker
created for the client and an undo log: for every change the kernel
acknowledged on the client's behalf, the request that reverses it. When the
client goes, `undo_plan()` gives those requests newest first, ending each
device with RTM_DELLINK whatever the holder did to its fd (TUNSETPERSIST,
TUNSETOWNER): invariant 12, "a lease ends with the client and is undone".

What needs no undo is not logged: an address or route on a device the client
leases goes away with the device. What cannot be undone safely is not logged
either: the broker records a change only after the kernel acknowledged it
(adds use NLM_F_EXCL, so an address or route that already existed, and so is
someone else's, is refused rather than adopted). A link change on a device the
client does not lease records the state before the first change, so the undo
restores the original, not an intermediate state. When the link monitor
reports that a device vanished, `forget_device` drops it and every entry on
its index, so an undo can never touch a later device that reuses the index.

Persisting the devices across a broker restart is the `leasefile` module's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .fields import AddressFields, LinkFields, LinkRef, RouteFields
from .messages import Kind

UndoFields = AddressFields | LinkFields | LinkRef | RouteFields


@dataclass(frozen=True)
class Device:
    ifindex: int
    name: str


@dataclass(frozen=True)
class UndoOp:
    """One request of an undo plan, ready for `Rtnl.submit(op.kind, op.fields, ...)`."""

    kind: Kind
    fields: UndoFields

    @property
    def ifindex(self) -> int | None:
        f = self.fields
        return f.oif if isinstance(f, RouteFields) else f.ifindex


class Lease:
    """The devices and the undo log of one client; see the module docstring."""

    def __init__(self) -> None:
        self._devices: dict[int, Device] = {}
        self._log: list[UndoOp] = []  # oldest first

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self._devices.values())

    def leases(self, ifindex: int) -> bool:
        return ifindex in self._devices

    def __len__(self) -> int:
        return len(self._log)

    def device_created(self, ifindex: int, name: str) -> None:
        if ifindex in self._devices:
            raise ValueError(f"ifindex {ifindex} is already leased")
        self._devices[ifindex] = Device(ifindex, name)
        self._log.append(UndoOp(Kind.DEL_LINK, LinkRef(ifindex=ifindex)))

    def address_added(self, fields: AddressFields) -> None:
        if not self.leases(fields.ifindex):
            self._log.append(UndoOp(Kind.DEL_ADDRESS, fields))

    def address_deleted(self, fields: AddressFields) -> None:
        """The client deleted an address: if the broker had added it, nothing is left to undo."""
        self._drop(Kind.DEL_ADDRESS, lambda f: _same_address(f, fields))

    def route_added(self, fields: RouteFields) -> None:
        # A route through a leased device dies with it; one through a gateway alone might
        # use any device, so it is undone explicitly (a delete of a gone route is harmless).
        if fields.oif is None or not self.leases(fields.oif):
            self._log.append(UndoOp(Kind.DEL_ROUTE, fields))

    def route_deleted(self, fields: RouteFields) -> None:
        self._drop(Kind.DEL_ROUTE, lambda f: f == fields)

    def link_changed(self, previous: LinkFields) -> None:
        """Record the state a link change replaced (`previous`: the values before it)."""
        if self.leases(previous.ifindex):
            return
        for i, op in enumerate(self._log):
            if op.kind is Kind.SET_LINK and op.ifindex == previous.ifindex:
                assert isinstance(op.fields, LinkFields)
                # Keep the oldest value of each attribute: the undo restores the original.
                merged = replace(
                    op.fields,
                    up=op.fields.up if op.fields.up is not None else previous.up,
                    mtu=op.fields.mtu if op.fields.mtu is not None else previous.mtu,
                )
                self._log[i] = UndoOp(Kind.SET_LINK, merged)
                return
        self._log.append(UndoOp(Kind.SET_LINK, previous))

    def forget_device(self, ifindex: int) -> Device | None:
        """The device is gone (the monitor said so): drop it and everything logged on it.

        Returns:
            The leased device that was forgotten, or None if `ifindex` was not leased
            (its entries, if any, are dropped all the same).
        """
        self._log = [op for op in self._log if op.ifindex != ifindex]
        return self._devices.pop(ifindex, None)

    def undo_plan(self) -> list[UndoOp]:
        """Every undo request, newest change first; devices are deleted where they were made."""
        return list(reversed(self._log))

    def _drop(self, kind: Kind, match: Callable[[UndoFields], bool]) -> None:
        for i in range(len(self._log) - 1, -1, -1):  # the newest matching entry
            if self._log[i].kind is kind and match(self._log[i].fields):
                del self._log[i]
                return


def _same_address(logged: UndoFields, deleted: AddressFields) -> bool:
    # nodad changes how an address was added, not which address it is.
    return (
        isinstance(logged, AddressFields)
        and logged.ifindex == deleted.ifindex
        and logged.interface == deleted.interface
    )
