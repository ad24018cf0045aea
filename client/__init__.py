"""privbroker's client: open privileged files through the broker, like open()."""

from .api import Client
from .errors import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    PolicyDenied,
    PrivbrokerError,
    ProtocolError,
)
from .protocol import __version__
from .shared import open_privileged

__all__ = [
    "BrokerError",
    "BrokerIdentityError",
    "BrokerUnavailable",
    "Client",
    "PolicyDenied",
    "PrivbrokerError",
    "ProtocolError",
    "__version__",
    "open_privileged",
]
