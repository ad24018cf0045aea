"""The commands: serve wiring, check, explain, status, demo, harden."""

DEFAULT_POLICY = "/etc/privbroker/policy.toml"  # where an admin writes it (deploy/README.md)
