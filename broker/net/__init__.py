"""The root side's network resources: the only code that creates sockets, tun
and tap devices, and speaks rtnetlink as root (docs/design.md, "Layout").

`sockets` creates sockets for socket rules and `service` serves the SOCKET
op; `caps` says which capabilities a policy's network rules need. `rtnl`
owns the broker's NETLINK_ROUTE sockets (`messages` builds requests from the
validated `fields`, `replies` parses answers, `monitor` watches links come
and go); `tun` creates devices; `leases` is the pure undo log of what was
done for one client and `leasefile` its record on disk, for orphans after a
restart.

Invariant 13 (docs/security.md): the broker keeps CAP_NET_ADMIN and the
socket capabilities only when the policy has rules that need them; pyroute2,
which `messages` loads on first use, is never loaded otherwise.
"""
