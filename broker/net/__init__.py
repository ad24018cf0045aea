"""The root side's network resources: the only code that creates sockets, tun
and tap devices, and speaks rtnetlink as root (docs/design.md, "Layout")."""
