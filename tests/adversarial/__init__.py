"""Adversarial tests: a real broker process attacked over its socket (DESIGN.md, security model)."""
