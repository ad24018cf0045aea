"""privbroker.broker.files._fast on its own: the decoder, the reply encoder, and serve() on a
real socketpair with an injected table (the integration and attack tests are
in tests/adversarial/test_fast_path*.py).

The decoder must accept a subset of what client/protocol/codec.py accepts, and agree
with it there; the encoder must write what msgpack writes; serve() must
either answer exactly as the table says, with the very file, or hand the
datagram back untouched with nothing opened.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privbroker import protocol as proto
from privbroker import unix
from privbroker.broker.core.budget import FdBudget
from privbroker.broker.files import fastpath
from privbroker.broker.files.openat2 import MountTable
from privbroker.protocol import Access
from privbroker.protocol.codec import encode_result

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def native() -> object:
    if not fastpath.available():
        pytest.skip("privbroker.broker.files._fast not built")
    return fastpath.configure()


def fd_set() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ decoder

paths = st.text(min_size=0, max_size=40)
items = st.lists(
    st.tuples(paths, st.integers(0, int(proto.ALL_ACCESS)), st.booleans()), min_size=1, max_size=20
)


@FUZZ
@given(st.integers(0, proto.MAX_ID), items)
def test_decoder_agrees_on_valid_requests(native: object, ident: int, its: list) -> None:
    req = proto.OpenRequest(ident, tuple(proto.OpenItem(p, Access(a), x) for p, a, x in its))
    data = proto.encode_request(req)
    got = native.decode_open(data)  # type: ignore[attr-defined]
    if any(x for _, _, x in its):
        assert got is None  # exclusive opens are never fast
    else:
        assert got == (ident, [(p, a) for p, a, _ in its])


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    n = len(data)
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: data[:i]),  # cut short
        st.binary(min_size=1, max_size=4).map(lambda tail: data + tail),  # trailing bytes
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
            lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1 :]
        ),  # one byte changed
    )


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    its = draw(items)
    data = proto.encode_request(
        proto.OpenRequest(
            draw(st.integers(0, 2**40)),
            tuple(proto.OpenItem(p, Access(a), False) for p, a, _ in its),
        )
    )
    return draw(_mutations(data))


@FUZZ
@given(st.one_of(mutated_requests(), st.binary(max_size=300)))
def test_decoder_accepts_only_what_the_reference_accepts(native: object, data: bytes) -> None:
    got = native.decode_open(data)  # type: ignore[attr-defined]
    if got is None:
        return  # slow path: the reference decides
    req = proto.decode_request(data)  # must not raise: the C side accepted it
    assert isinstance(req, proto.OpenRequest)
    assert got == (req.id, [(i.path, int(i.access)) for i in req.items])
    assert not any(i.exclusive for i in req.items)


@pytest.mark.parametrize(
    "obj",
    [
        [1, 1, 5, [["/a", 1, False]], None],  # an extra field
        [1, 1, -1, [["/a", 1, False]]],  # negative id
        [1, 1, 2**63, [["/a", 1, False]]],  # id over MAX_ID
        [2, 1, 5, [["/a", 1, False]]],  # another version
        [1, 2, 5, [["/a", 1, False]]],  # another operation
        [1, 1, 5, []],  # no items
        [1, 1, 5, [["/a", 1, False]] * (proto.MAX_BATCH + 1)],
        [1, 1, 5, [["/a", 32, False]]],  # access out of range
        [1, 1, 5, [[b"/a", 1, False]]],  # bin, not str
        [1, 1, 5, [["/a", 1, 0]]],  # exclusive not a bool
        [1, 1, 5, [["/a", 1, False, 0]]],
        [1, 1, 5, {"x": 1}],
    ],
)
def test_decoder_refuses(native: object, obj: list) -> None:
    assert native.decode_open(msgpack.packb(obj, use_bin_type=True)) is None  # type: ignore[attr-defined]


def test_decoder_takes_non_minimal_ints_refuses_bad_utf8(native: object) -> None:
    # msgpack uint16 for the version: valid for the reference, and here.
    data = b"\x94\xcd\x00\x01\x01\x05\x91\x93\xa2/a\x01\xc2"
    assert native.decode_open(data) == (5, [("/a", 1)])  # type: ignore[attr-defined]
    assert proto.decode_request(data).id == 5
    bad = b"\x94\x01\x01\x05\x91\x93\xa2\xff\xfe\x01\xc2"
    assert native.decode_open(bad) is None  # type: ignore[attr-defined]
    with pytest.raises(proto.ProtocolError):
        proto.decode_request(bad)


# ------------------------------------------------------------------ encoder

results = st.builds(
    proto.Result,
    st.just(0),
    st.just(False),
    st.just(""),
    st.one_of(st.none(), st.text(max_size=300)),
)


@FUZZ
@given(st.integers(0, proto.MAX_ID), st.lists(results, min_size=1, max_size=proto.MAX_BATCH))
def test_reply_is_what_msgpack_writes(native: object, ident: int, rs: list) -> None:
    built = native.build_reply(ident, [encode_result(r) for r in rs])  # type: ignore[attr-defined]
    assert built == proto.encode_reply(proto.OpenReply(ident, tuple(rs)))


# ------------------------------------------------------------ serve() itself


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    broker_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    broker_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    broker_end.setblocking(False)
    with broker_end, client_end:
        yield broker_end, client_end


@pytest.fixture(scope="module")
def mounts() -> Iterator[MountTable]:
    table = MountTable()
    yield table
    os.close(table.fileno())


@pytest.fixture
def hot(tmp_path: Path, mounts: MountTable) -> Path:
    f = tmp_path / "hot.txt"
    f.write_bytes(b"hot data\n")
    f.chmod(0o600)
    from privbroker.broker.files.openat2 import mount_id

    fd = os.open(f, os.O_PATH)
    try:
        if mount_id(fd) not in mounts.fast_ids:
            pytest.skip(f"{tmp_path} is not on a filesystem the fast path serves")
    finally:
        os.close(fd)
    return f


def table_for(path: Path, access: Access = Access.READ, flags: int = os.O_RDONLY) -> dict:
    flags |= os.O_CLOEXEC | os.O_NOCTTY
    result = proto.Result(rule="r")
    return {(str(path), int(access)): (flags, False, encode_result(result), "r")}


def ask(client: socket.socket, *paths: str, access: Access = Access.READ, ident: int = 7) -> None:
    items = tuple(proto.OpenItem(p, access) for p in paths)
    client.send(proto.encode_request(proto.OpenRequest(ident, items)))


def serve(native: object, sock: socket.socket, table: dict, mounts: MountTable, **kw: object):
    args = {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "mount_ids": mounts.fast_ids,
        "room": (proto.MAX_BATCH, proto.MAX_BATCH),
        "audit": True,
    }
    args.update(kw)
    room, if_read = args["room"]  # type: ignore[misc]
    return native.serve(  # type: ignore[attr-defined]
        sock.fileno(),
        args["uid"],
        args["gid"],
        table,
        args["mount_ids"],
        mounts.fileno(),
        room,
        if_read,
        args["audit"],
    )


def receive(client: socket.socket) -> tuple[proto.Reply, list[int]]:
    data, fds, _ = unix.recv_message(client, proto.MAX_REPLY_BYTES, proto.MAX_BATCH)
    return proto.decode_reply(data), fds


def test_served_with_the_very_file(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    before = fd_set()
    ask(client, str(hot), str(hot))
    got = serve(native, broker_end, table_for(hot), mounts)
    assert got[0] == 1 and got[1] == 2 and got[2] is None and got[3] is None
    assert got[4] == [((str(hot), 1), "r")] * 2 and got[5] == 0
    reply, fds = receive(client)
    try:
        assert isinstance(reply, proto.OpenReply) and reply.id == 7
        assert [r.rule for r in reply.results] == ["r", "r"]
        for fd in fds:
            assert os.path.samestat(os.fstat(fd), os.stat(hot))
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK) == os.O_RDONLY
            assert os.pread(fd, 100, 0) == b"hot data\n"
    finally:
        unix.close_fds(fds)
    assert fd_set() == before


def test_append_flags(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    ask(client, str(hot), access=Access.APPEND)
    table = table_for(hot, Access.APPEND, os.O_WRONLY | os.O_APPEND)
    assert serve(native, broker_end, table, mounts)[0] == 1
    _, fds = receive(client)
    try:
        flags = fcntl.fcntl(fds[0], fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND
        assert not flags & os.O_NONBLOCK
        os.write(fds[0], b"more\n")
    finally:
        unix.close_fds(fds)
    assert hot.read_bytes() == b"hot data\nmore\n"


def nothing_opened(
    got: object, before: set[str], client: socket.socket, queued: bytes = b""
) -> tuple:
    """serve() handed the datagram back: as recvmsg gives it, nothing opened or sent."""
    assert isinstance(got, tuple) and got[0] == 0, got
    assert fd_set() == before
    if queued:
        assert client.recv(100, socket.MSG_DONTWAIT) == queued
    with pytest.raises(BlockingIOError):
        client.recv(10, socket.MSG_DONTWAIT)
    return got


def test_unknown_paths_and_access_go_back(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    before = fd_set()
    ask(client, str(hot), str(hot) + "x")  # one item not in the table: the whole request
    got = nothing_opened(serve(native, broker_end, table_for(hot), mounts), before, client)
    data, fds, cred = unix.parse_received(
        got[1], got[2], got[3], proto.MAX_REQUEST_BYTES, 0, creds=True
    )
    assert fds == [] and cred is not None and cred.uid == os.getuid()
    assert proto.decode_request(data).items[1].path == str(hot) + "x"
    ask(client, str(hot), access=Access.READ | Access.WRITE)
    nothing_opened(serve(native, broker_end, table_for(hot), mounts), before, client)


@pytest.mark.parametrize(
    "change",
    ["symlink", "hardlink", "fifo", "dir", "unlinked", "parent-symlink"],
)
def test_the_file_changed_goes_back(
    native, pair, hot: Path, mounts: MountTable, change: str
) -> None:
    broker_end, client = pair
    secret = hot.parent / "secret"
    secret.write_bytes(b"secret")
    if change == "symlink":
        hot.unlink()
        hot.symlink_to(secret)
    elif change == "hardlink":
        os.link(hot, hot.parent / "second")
    elif change == "fifo":
        hot.unlink()
        os.mkfifo(hot)
    elif change == "dir":
        hot.unlink()
        hot.mkdir()
    elif change == "unlinked":
        hot.unlink()
    table = table_for(hot)
    if change == "parent-symlink":
        real = hot.parent / "real"
        real.mkdir()
        (real / "hot.txt").write_bytes(b"x")
        link = hot.parent / "link"
        link.symlink_to(real)
        table = table_for(link / "hot.txt")
        hot = link / "hot.txt"
    before = fd_set()
    ask(client, str(hot))
    nothing_opened(serve(native, broker_end, table, mounts), before, client)


def test_hardlinks_when_the_rule_allows_them(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    os.link(hot, hot.parent / "second")
    table = table_for(hot)
    flags, _, packed, rule = table[str(hot), 1]
    table[str(hot), 1] = (flags, True, packed, rule)
    ask(client, str(hot))
    assert serve(native, broker_end, table, mounts)[0] == 1
    unix.close_fds(receive(client)[1])


@pytest.mark.parametrize(
    "kw",
    [
        {"uid": 12345},  # credentials that are not the connection's
        {"gid": 12345},
        {"mount_ids": ()},  # not on a mount the fast path may use
        {"room": (0, 0)},  # over the fd budget
        {"room": (0, 1)},  # over it until the client reads: but it has not read
    ],
)
def test_conditions_send_it_back(native, pair, hot: Path, mounts: MountTable, kw: dict) -> None:
    broker_end, client = pair
    if kw.get("room") == (0, 1):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        broker_end.send(b"unread")  # SIOCOUTQ is not 0
    before = fd_set()
    ask(client, str(hot))
    got = serve(native, broker_end, table_for(hot), mounts, **kw)
    nothing_opened(got, before, client, b"unread" if kw.get("room") == (0, 1) else b"")


def test_room_once_the_client_read_everything(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    ask(client, str(hot))
    got = serve(native, broker_end, table_for(hot), mounts, room=(0, 1))
    assert got[0] == 1 and got[5] == 1  # drained: the caller releases the old charge
    unix.close_fds(receive(client)[1])


def test_fds_sent_to_the_broker_are_never_kept(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    data = proto.encode_request(proto.OpenRequest(1, (proto.OpenItem(str(hot), Access.READ),)))
    extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    client.sendmsg(
        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", extra).tobytes())]
    )
    unix.close_fds(extra)
    before = fd_set()
    got = nothing_opened(serve(native, broker_end, table_for(hot), mounts), before, client)
    with pytest.raises(unix.TruncatedMessage):
        unix.parse_received(got[1], got[2], got[3], proto.MAX_REQUEST_BYTES, 0, creds=True)
    assert fd_set() == before


def test_bad_utf8_and_garbage_go_back(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    before = fd_set()
    for data in (b"\x94\x01\x01\x05\x91\x93\xa2\xff\xfe\x01\xc2", b"\xc1", b"\x00" * 100):
        client.send(data)
        got = nothing_opened(serve(native, broker_end, table_for(hot), mounts), before, client)
        assert got[1] == data


def test_eof_and_nothing_to_read(native, pair, hot: Path, mounts: MountTable) -> None:
    broker_end, client = pair
    assert serve(native, broker_end, table_for(hot), mounts) is None
    client.shutdown(socket.SHUT_WR)
    got = serve(native, broker_end, table_for(hot), mounts)
    assert got[0] == 0 and got[1] == b""


def test_a_full_queue_hands_the_reply_and_fds_over(
    native, pair, hot: Path, mounts: MountTable
) -> None:
    broker_end, client = pair
    broker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while True:  # fill the client's receive queue
        try:
            broker_end.send(b"x" * 512, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    ask(client, str(hot))
    got = serve(native, broker_end, table_for(hot), mounts)
    assert got[0] == 1 and isinstance(got[2], bytes) and len(got[3]) == 1
    try:
        assert os.path.samestat(os.fstat(got[3][0]), os.stat(hot))
        assert proto.decode_reply(got[2]).id == 7
    finally:
        unix.close_fds(got[3])


def test_a_mount_not_read_yet_goes_back(native, pair, mounts: MountTable, tmp_path: Path) -> None:
    broker_end, client = pair
    mnt = tmp_path / "m"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs none {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        (mnt / "f").write_bytes(b"on the new mount")
        before = fd_set()
        ask(client, str(mnt / "f"))
        got = nothing_opened(
            serve(native, broker_end, table_for(mnt / "f"), mounts), before, client
        )
        assert got[4] == 1  # the change was seen (and its event taken): read the table again
        assert not mounts._poll.poll(0)
        mounts.reload()
        ask(client, str(mnt / "f"))
        assert serve(native, broker_end, table_for(mnt / "f"), mounts)[0] == 1
        _, fds = receive(client)
        assert os.pread(fds[0], 100, 0) == b"on the new mount"
        unix.close_fds(fds)
    finally:
        os.system(f"umount {mnt}")
        mounts.reload()


def test_a_reused_mount_id_is_never_trusted(
    native, pair, hot: Path, mounts: MountTable, tmp_path: Path
) -> None:
    # A table read before a mount came or went may name a reused id wrongly:
    # with the change not yet read, even a listed mount goes back to Python.
    broker_end, client = pair
    mnt = tmp_path / "m"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs none {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        before = fd_set()
        ask(client, str(hot))
        got = nothing_opened(serve(native, broker_end, table_for(hot), mounts), before, client)
        assert got[4] == 1
    finally:
        os.system(f"umount {mnt}")
        mounts.reload()


# ------------------------------------------------------------ the budget


class _Peer:
    def __init__(self, uid: int) -> None:
        self.uid = uid


class _Conn:
    def __init__(self, uid: int) -> None:
        self.peer = _Peer(uid)


def test_budget_room_follows_fits() -> None:
    b = FdBudget(total=1000, per_conn=250)
    a, c = _Conn(1), _Conn(1)
    assert b.room(a) == (250, 250)
    b.charge(a, 200)
    assert b.room(a) == (50, 250)
    b.charge(c, 50)  # per uid: a quarter of 1000 = 250, all taken
    assert b.room(a) == (0, 200) and b.room(c) == (0, 50)
    b.drained(a)
    assert b.room(a) == (200, 200) and b.unread == 50 and b.by_uid[1] == 50


def test_built_where_a_compiler_is() -> None:
    # setup.py builds _fast optionally (an install without a compiler still
    # works, in Python only): here, with one, a failed build is a failure.
    import shutil
    import sysconfig

    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers:
        pytest.skip("no C compiler or Python headers: the broker runs in Python only")
    assert fastpath.available()


def test_a_forked_child_uses_its_own_fds(native, hot: Path, mounts: MountTable) -> None:
    # /proc/self/fd is held open; after fork() it would name the parent's
    # fds, so the child must open its own (pthread_atfork) to be served.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            broker_end, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            broker_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]  # the child's numbers
            ask(client, str(hot))
            got = serve(native, broker_end, table_for(hot), mounts)
            code = 2
            if got[0] == 1:  # else nothing was sent: do not wait for it
                _, fds = receive(client)
                code = 0 if os.path.samestat(os.fstat(fds[0]), os.stat(hot)) else 3
                unix.close_fds(fds)
            unix.close_fds(spare)
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"\0"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
