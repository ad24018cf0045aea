"""privbroker's client: open privileged files through the broker, like open(), and
get privileged sockets (low ports, ICMP, raw) the same way (privbroker.net)."""

if __name__ != "privbroker":  # a checkout's client/ imported by its folder name
    raise ImportError(f"the client is the package privbroker, not {__name__}")


from .api import Client
from .errors import (
    BrokerError,
    BrokerIdentityError,
    BrokerUnavailable,
    PolicyDenied,
    PrivbrokerError,
    ProtocolError,
)
from .net import bind_privileged, icmp_socket, raw_socket
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
    "bind_privileged",
    "icmp_socket",
    "open_privileged",
    "raw_socket",
]
