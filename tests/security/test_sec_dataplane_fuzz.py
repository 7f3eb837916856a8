"""Issue 11: property tests of every data-plane decoder and of the server's request handling.

Generated inputs (random bytes, random msgpack, request-shaped messages with extreme ints and
wrong types, valid frames mutated or cut short) go to the decoders directly and to a live data
plane: before the handshake, and sealed after a valid one (the attacker holds the mesh key). No
exception may escape, and after every input the server still serves a genuine client. A fake
server answers a real client with the same kind of garbage: the client gets ``DataPlaneError``
or an answer, never another exception, and keeps no reserved slot.

The live planes run in one Trio loop on a background thread for the whole module (a loop per
example would cost more than the examples); each example drives them with its own short
``trio.run`` and ``trio.from_thread``."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dataplane_helpers import KEY_A, config, key, payload, planes, put

from memkv_mesh.protocol import LEN
from transport.dataplane import (
    DataPlane,
    DataPlaneError,
    FetchReply,
    FetchRequest,
    PushRequest,
    Session,
    decode_body,
    frame_body,
    open_frame,
    server_handshake,
)
from transport.dataplane_config import decode_keys
from transport.tcp_dataplane import TcpChannel, open_channel

KEYS = decode_keys([KEY_A])
HELD = key(1, 700)
HELD_SIZE = 3000
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

# ---- strategies -----------------------------------------------------------------------------------
_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -(2**63), 1 << 30, (1 << 30) + 1]),
)
_scalars = st.one_of(
    st.none(), st.booleans(), _ints, st.floats(), st.binary(max_size=40), st.text(max_size=20),
    st.binary(min_size=32, max_size=32),
)  # fmt: skip
_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=4), c, max_size=4), max_leaves=24
)
_tags = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 63]), _ints)
_key = st.binary(min_size=32, max_size=32)
_keys = st.one_of(
    st.lists(_key, max_size=6),
    st.lists(st.one_of(_key, st.just(HELD)), max_size=4),
    st.lists(st.one_of(_key, st.binary(max_size=40)), max_size=6),
)
# mostly in range, so that requests reach the handlers, not only the decoder
_lists_of_ints = st.one_of(
    st.lists(st.integers(-1, 3 << 20), max_size=6),
    st.lists(st.integers(0, 2**64 - 1), max_size=6),
    st.lists(_ints, max_size=6),
)
_node = st.one_of(st.just(""), st.just("fuzz"), st.just("n1"), st.text(max_size=300))


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """Request-shaped msgpack: the right tags and field layout, values anywhere in range or not."""
    tag = draw(st.sampled_from([4, 6, 6, 9]))
    keys = draw(_keys)
    if tag == 9:  # a delete of HELD would be obeyed (it is a valid request): keep HELD
        keys = [k for k in keys if k != HELD]
    if tag == 6:
        fields: list[Any] = [keys, draw(_lists_of_ints), draw(_lists_of_ints), draw(st.booleans())]
    else:
        fields = [keys]
    if draw(st.booleans()):
        fields.append(draw(_node))
    if draw(st.integers(0, 3)) == 0:
        fields += draw(st.lists(_values, max_size=2))
    return msgspec.msgpack.encode([tag, *fields])


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid request, then bytes flipped, cut, or inserted."""
    msg = draw(st.sampled_from([
        FetchRequest([HELD], "fuzz"), FetchRequest([HELD, key(2, 700)]),
        PushRequest([key(3, 700)], [100], [5], True, "fuzz"), PushRequest([key(4, 700)] * 2, [1, 2], [0, 0]),
    ]))  # fmt: skip
    raw = bytearray(msgspec.msgpack.encode(msg))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:]
        else:
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


_bodies = st.one_of(
    st.binary(max_size=600),
    _values.map(msgspec.msgpack.encode),
    st.tuples(_tags, st.lists(_values, max_size=6)).map(lambda t: msgspec.msgpack.encode([t[0], *t[1]])),
    _requests(),
    _mutated(),
)


# ---- the decoders, directly ---------------------------------------------------------------------------
@FUZZ
@given(_bodies)
def test_decode_body_raises_only_dataplane_error(body: bytes) -> None:
    try:
        msg = decode_body(body)
    except DataPlaneError:
        return
    # what decodes is in range: nothing a handler could trip over
    for name in ("keys", "sizes", "checksums", "status", "stored", "deleted"):
        assert len(getattr(msg, name, ())) <= 65536
    for s in getattr(msg, "sizes", ()):
        assert -1 <= s <= 1 << 30
    for c in getattr(msg, "checksums", ()):
        assert 0 <= c < 2**64
    assert len(getattr(msg, "node_id", "")) <= 255


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 3))
def test_session_open_raises_only_frame_auth_error(data: bytes, skip: int) -> None:
    nc, ns = b"c" * 32, b"s" * 32
    c = Session(KEYS[0], nc, ns, "c", "s", is_client=True, encrypt_bulk=True)
    s = Session(KEYS[0], nc, ns, "c", "s", is_client=False, encrypt_bulk=True)
    sealed = [c.seal(b"x") for _ in range(skip)]
    with pytest.raises(DataPlaneError):
        open_frame(s, data)  # random bytes never open
    if sealed:
        with pytest.raises(DataPlaneError):
            s.open(sealed[0])  # frame 0's turn has passed: a genuine frame out of turn fails too
    out = memoryview(bytearray(max(0, len(data) - 16)))
    if len(data) >= 16:
        with pytest.raises(DataPlaneError):
            s.open_block_into(memoryview(data), out)


# ---- a live data plane on a background Trio loop ------------------------------------------------------
class _Live:
    """Planes a (a client) and b (the server under test), plus a fake server that answers any
    request with ``self.reply`` (sealed after a valid handshake), all on one background loop."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.reply = b""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop: trio.Event | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the live planes did not start"
        if self.error:
            raise self.error

    def _thread(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported by the tests that use it
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        cfg = config(io_timeout_s=2.0, connect_timeout_s=2.0)
        async with planes(self.tmp, config(io_timeout_s=2.0), cfg) as ((a, _), (b, addr_b)):
            self.a: DataPlane = a
            self.b: DataPlane = b
            self.addr = addr_b
            await put(b.store, HELD, payload(HELD_SIZE, 1))
            for i in range(3):
                await put(a.store, key(10 + i, 700), payload(5000, 10 + i))
            async with trio.open_nursery() as n:
                self.fake = await n.start(self._fake_server)
                self.ready.set()
                await self._stop.wait()
                n.cancel_scope.cancel()

    async def _fake_server(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            chan = TcpChannel(stream, "fuzz-client", max_frame=1 << 20, io_timeout=2)
            try:
                await server_handshake(chan, KEYS, "fake", 2)
                await chan.recv_msg(2)
                await stream.send_all(frame_body(chan.session, self.reply))
                await stream.send_all(b"\0" * 64)  # and some bytes after it, for a reply with sizes
            except (DataPlaneError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, handle, listeners)
            task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")

    def call(self, fn: Any, *args: Any) -> Any:
        assert self.thread.is_alive(), f"the live data plane died: {self.error!r}"
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def stop(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(30)


@pytest.fixture(scope="module")
def live() -> Iterator[_Live]:
    with tempfile.TemporaryDirectory() as tmp:
        lv = _Live(Path(tmp))
        try:
            yield lv
        finally:
            if os.environ.get("FUZZ_STATS"):  # FUZZ_STATS=1 pytest -s: what the inputs reached
                print("\nserver", lv.b.statistics(), "\nclient", lv.a.statistics())
            lv.stop()


async def _send_then_wait(addr: str, body: bytes, *, authenticate: bool, raw: bool = False) -> None:
    """Send one body (framed and sealed as a peer would; or raw bytes), then wait briefly for
    whatever the server does (a reply, an error, a close)."""
    chan = await open_channel(addr, KEYS, "fuzz", authenticate=authenticate, timeout_s=5)
    try:
        if raw:
            await chan.send_raw(body)
        else:
            await chan.send_body(body)
        with trio.move_on_after(0.05):
            try:
                while True:
                    await chan.recv_msg(None)
            except DataPlaneError:
                pass
    finally:
        await chan.aclose()


async def _genuine_fetch(addr: str) -> None:
    """A genuine client is served as ever: HELD is there, with its size."""
    chan = await open_channel(addr, KEYS, "genuine", timeout_s=5)
    try:
        await chan.send_msg(FetchRequest([HELD], "genuine"))
        reply = await chan.recv_msg(5)
        assert isinstance(reply, FetchReply) and reply.sizes == [HELD_SIZE], reply
    finally:
        await chan.aclose()


def _check_server(live: _Live) -> None:
    trio.run(_genuine_fetch, live.addr)
    st = live.b.statistics()
    assert st.handler_errors == 0, "a request raised something other than DataPlaneError (see the log)"


@FUZZ
@given(_bodies)
def test_server_survives_any_frame_after_a_valid_handshake(live: _Live, body: bytes) -> None:
    trio.run(lambda: _send_then_wait(live.addr, body, authenticate=True))
    _check_server(live)


@FUZZ
@given(st.one_of(_requests(), _mutated()))
def test_server_survives_request_shaped_frames(live: _Live, body: bytes) -> None:
    """Mostly decodable requests, so the handlers (not only the decoder) see the odd values."""
    trio.run(lambda: _send_then_wait(live.addr, body, authenticate=True))
    _check_server(live)


@FUZZ
@given(_bodies, st.booleans())
def test_server_survives_any_first_frame_or_bytes_before_the_handshake(live: _Live, body: bytes, raw: bool) -> None:
    if raw:
        body = LEN.pack(len(body)) + body if not body[:1] else body
    trio.run(lambda: _send_then_wait(live.addr, body, authenticate=False, raw=raw))
    _check_server(live)


_replies = st.one_of(
    _bodies,
    st.tuples(st.sampled_from([5, 7, 8, 10, 63]), st.lists(_values, max_size=4)).map(
        lambda t: msgspec.msgpack.encode([t[0], *t[1]])
    ),
    st.tuples(st.lists(_ints, max_size=4), st.lists(_ints, max_size=4)).map(
        lambda t: msgspec.msgpack.encode([5, t[0], t[1]])
    ),
)


@FUZZ
@given(_replies, st.sampled_from(["fetch", "push", "delete"]))
def test_client_survives_any_reply(live: _Live, reply: bytes, op: str) -> None:
    live.reply = reply
    a = live.a
    try:
        if op == "fetch":
            live.call(a.fetch, live.fake, [key(20, 700), key(21, 700)])
        elif op == "push":
            live.call(a.push, live.fake, [key(10, 700), key(11, 700)])
        else:
            live.call(a.delete, live.fake, [key(30, 700)])
    except DataPlaneError:
        pass
    st_a = a.store.statistics()
    assert st_a.pending_slots == 0
    assert all(a.store.contains([key(10 + i, 700) for i in range(3)]))  # a's own blocks untouched
    assert a.statistics().active_transfers == 0
