"""Adversarial tests: a real broker process attacked over its socket (docs/security.md)."""
