"""The protocol's named limits, each with the reason for its value. No I/O."""

__version__ = "0.1.0"

VERSION = 1
DEFAULT_SOCKET = "privbroker"
SOCKET_ENV = "PRIVBROKER_SOCKET"

# Linux PATH_MAX: a longer path could not be opened by the kernel anyway.
MAX_PATH_BYTES = 4096
NAME_MAX_BYTES = 255  # NAME_MAX: the longest component, in bytes
# SCM_MAX_FD is 253 fds per message; keep headroom below the kernel's cap.
MAX_BATCH = 250
# A full batch of typical paths fits; stays under the default unix sk_sndbuf
# (212992 bytes), beyond which a SEQPACKET send fails with EMSGSIZE.
MAX_REQUEST_BYTES = 128 * 1024
# Reasons are clipped so that a full batch of results still fits in one reply.
MAX_REASON_CHARS = 400
MAX_RULE_CHARS = 200
MAX_REPLY_BYTES = 200 * 1024
# An explain reply's reasons are prose about a whole rule; still bounded.
MAX_EXPLAIN_REASON_CHARS = MAX_REASON_CHARS * 4
# Linux NGROUPS_MAX: no process can have more groups than this to explain.
MAX_GIDS = 65536
# A socket target is a kind, an address, a port and a device name: far below this.
MAX_TARGET_CHARS = 128
# listen()'s backlog is an int the kernel caps at net.core.somaxconn (a u32 sysctl).
MAX_BACKLOG = 65535
# A device name: IFNAMSIZ (16) less its NUL; an address or CIDR as text.
MAX_IFNAME_CHARS = 15
MAX_ADDRESS_CHARS = 64
# The kernel's MTU is a u32; route metrics and tables are u32 too.
MAX_U32 = 2**32 - 1
# A declared program: a path, as long as a path may be.
MAX_PROGRAM_CHARS = 4096
# Request ids are msgpack uint64 on the wire; keep them in a signed int64.
MAX_ID = 2**63 - 1
