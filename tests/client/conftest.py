"""The client tests' fixtures beyond tests/conftest.py's: the Debian venv (support/venv.py)."""

from tests.support.venv import debian_venv  # noqa: F401 (a session fixture, used by name)
