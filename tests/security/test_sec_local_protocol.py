"""Property tests of the local protocol: the frame reader, the request decoder, and the daemon's
dispatch of any frame (hypothesis).

- ``FrameBuffer`` yields the same frames however the byte stream is cut, and refuses a length
  over its limit with ``ProtocolError`` (never anything else, never a partial frame).
- ``request_decoder`` on any bytes returns a request or raises msgspec's DecodeError /
  ValidationError: nothing else escapes to the daemon.
- A real ``Daemon`` (in this process, its Trio loop in a thread so hypothesis drives plain
  sockets) answers every framed request with exactly one reply (none for ``Release``; a streamed
  get's parts aside), in order, however malformed, mutated or hostile the frame; any byte stream
  at all ends in a clean close (EOF) after replies that decode; no ERROR is logged (a caught
  exception is logged as one) and no ``internal`` error is answered; a good client connected all
  along keeps being served and its block reads back byte-identical.
"""

from __future__ import annotations

import logging
import os
import socket
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

from memkv_mesh import protocol
from memkv_mesh.client import Client
from memkv_mesh.config import load_config
from memkv_mesh.keys import KEY_BYTES

_enc = msgspec.msgpack.Encoder()

# ---- strategies ---------------------------------------------------------------------------------
_ints = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**32, 2**53, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
_keys = st.lists(
    st.one_of(st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES), st.binary(max_size=KEY_BYTES + 8)),
    max_size=4,
)
_leaf = st.one_of(st.none(), st.booleans(), _ints, st.floats(), st.text(max_size=12), st.binary(max_size=40))
_values = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=12
)
_requests = st.one_of(
    st.builds(protocol.Hello, _ints, st.text(max_size=10), _ints),
    st.builds(protocol.Alloc, _keys, st.lists(_ints, max_size=4)),
    st.builds(protocol.Commit, _keys, st.lists(_ints, max_size=4)),
    st.builds(protocol.Abort, _keys),
    st.builds(protocol.Get, _keys, st.booleans()),
    st.builds(protocol.Release, _ints),
    st.builds(protocol.Lookup, _keys),
    st.builds(protocol.Delete, _keys, st.booleans()),
    st.just(protocol.StatsRequest()),
    st.just(protocol.MembersRequest()),
    st.builds(protocol.Contains, _keys),
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(_enc.encode(draw(_requests)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(0, len(body) - 1)))
        if op == 0 and body:
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del body[i:]
        elif op == 2:
            body[i:i] = draw(st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff", b"\xc1"]))
        elif body:
            body[i] = draw(st.sampled_from([0x00, 0xFF, 0xC0, 0xCF, 0xD3, 0x9F]))
    return bytes(body)


_bodies = st.one_of(
    st.binary(max_size=64),
    _values.map(_enc.encode),
    st.tuples(st.integers(-3, 80), st.lists(_values, max_size=5)).map(lambda t: _enc.encode([t[0], *t[1]])),
    _requests.map(_enc.encode),
    _mutated(),
)


def _frame(body: bytes) -> bytes:
    return protocol.LEN.pack(len(body)) + body


# ---- the frame reader and the decoder (pure) --------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 97), min_size=1, max_size=30))
def test_frame_buffer_same_frames_however_cut(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(_frame(b) for b in bodies)
    fb = protocol.FrameBuffer()
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        fb.feed(stream[pos : pos + n])
        pos += n
        i += 1
        while (f := fb.next_frame()) is not None:
            out.append(f)
    assert out == bodies and len(fb) == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.binary(max_size=64), st.integers(16, 4096))
def test_frame_buffer_refuses_lengths_over_its_limit(n: int, tail: bytes, limit: int) -> None:
    fb = protocol.FrameBuffer(max_frame=limit)
    fb.feed(protocol.LEN.pack(n) + tail)
    if n > limit:
        with pytest.raises(protocol.ProtocolError, match=f"{n} bytes exceeds the limit of {limit}"):
            fb.next_frame()
    elif len(tail) < n:
        assert fb.next_frame() is None  # waits for the rest; never a partial frame
    else:
        assert fb.next_frame() == tail[:n]


@settings(max_examples=500, deadline=None)
@given(_bodies)
def test_request_decoder_returns_a_request_or_a_decode_error(body: bytes) -> None:
    try:
        req = protocol.request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert isinstance(req, protocol.Msg)
    assert protocol.request_decoder.decode(_enc.encode(req)) == req  # and it round-trips


# ---- the daemon's dispatch ----------------------------------------------------------------------
class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Served:
    def __init__(self, sock: Path, errors: _Errors, good: Client, block: tuple[bytes, bytes]) -> None:
        self.sock = sock
        self.errors = errors
        self.good = good
        self.block = block
        self.crash: list[BaseException] = []


@pytest.fixture(scope="module")
def served() -> Iterator[_Served]:
    """A Daemon in this process, its Trio loop in a thread; a good client holding one block."""
    from conftest import write_config

    from memkv_mesh.daemon import Daemon

    d = Path(tempfile.mkdtemp(prefix="mkp-"))
    cfg = load_config(write_config(d / "mesh.toml", d / "data", d / "s.sock"))
    daemon = Daemon(cfg)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    started = threading.Event()
    box: dict[str, Any] = {}
    crash: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            box["token"], box["scope"] = trio.lowlevel.current_trio_token(), nursery.cancel_scope
            await nursery.start(daemon.run)
            started.set()

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported by the tests
            crash.append(e)
            started.set()

    th = threading.Thread(target=thread, daemon=True)
    th.start()
    assert started.wait(30) and not crash, crash
    good = Client(cfg.socket_path, timeout=10, name="good")
    key, value = os.urandom(KEY_BYTES), os.urandom(70_000)
    assert good.put(key, value)
    s = _Served(cfg.socket_path, errors, good, (key, value))
    s.crash = crash
    yield s
    good.close()
    trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
    th.join(30)
    logging.getLogger().removeHandler(errors)
    assert not crash, crash


def _converse(sock: Path, data: bytes) -> tuple[list[protocol.Reply], bool]:
    """Send ``data``, half-close, read to EOF: (replies, whether the daemon closed cleanly)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    fb = protocol.FrameBuffer()
    closed = False
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed first (a length over the limit): read what it said
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            fb.feed(chunk)
    except TimeoutError:
        pass  # not closed within 10 s: the caller fails on closed == False
    finally:
        s.close()
    replies: list[protocol.Reply] = []
    while (body := fb.next_frame()) is not None:
        replies.append(protocol.reply_decoder.decode(body))
    return replies, closed


def _expected_replies(body: bytes) -> int:
    try:
        req = protocol.request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 1  # an Error naming what was wrong
    return 0 if isinstance(req, protocol.Release) else 1


def _healthy(s: _Served) -> None:
    assert not s.crash, s.crash
    assert s.good.lookup([s.block[0]]) == 1
    bad = [r.getMessage() for r in s.errors.records]
    assert not bad, bad


_HELLO = _frame(_enc.encode(protocol.Hello(protocol.PROTOCOL_VERSION, "prop", os.getpid())))
_SENTINEL = _frame(_enc.encode(protocol.Lookup([b"\x00" * KEY_BYTES])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hello=st.booleans(), bodies=st.lists(_bodies, min_size=1, max_size=12))
def test_every_frame_gets_exactly_one_reply(served: _Served, hello: bool, bodies: list[bytes]) -> None:
    data = (_HELLO if hello else b"") + b"".join(_frame(b) for b in bodies) + _SENTINEL
    replies, closed = _converse(served.sock, data)
    assert closed, "the daemon neither answered everything nor closed within 10 s"
    replies = [r for r in replies if not isinstance(r, protocol.LocatedPart)]
    want = (1 if hello else 0) + sum(map(_expected_replies, bodies)) + 1
    assert len(replies) == want, (replies, bodies)
    # the sentinel lookup is answered last, in order
    assert isinstance(replies[-1], protocol.Count | protocol.Error), replies[-1]
    internal = [r for r in replies if isinstance(r, protocol.Error) and r.code == protocol.INTERNAL]
    assert not internal, internal
    _healthy(served)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hello=st.booleans(),
    data=st.one_of(
        st.binary(max_size=200),
        st.tuples(_bodies, st.integers(0, 2**32 - 1)).map(lambda t: protocol.LEN.pack(t[1]) + t[0]),
        st.tuples(_bodies, st.integers(0, 40)).map(lambda t: _frame(t[0])[: t[1]]),  # dropped mid-frame
    ),
)
def test_any_byte_stream_ends_in_a_clean_close(served: _Served, hello: bool, data: bytes) -> None:
    replies, closed = _converse(served.sock, (_HELLO if hello else b"") + data)
    assert closed, "the daemon did not close a connection that ended (EOF) within 10 s"
    internal = [r for r in replies if isinstance(r, protocol.Error) and r.code == protocol.INTERNAL]
    assert not internal, internal
    _healthy(served)


def test_the_good_client_still_reads_its_block(served: _Served) -> None:
    key, value = served.block
    buf = bytearray(len(value))
    assert served.good.get_into(key, buf) == len(value) and bytes(buf) == value
    k2, v2 = os.urandom(KEY_BYTES), os.urandom(5000)
    assert served.good.put(k2, v2)
    lease = served.good.get(k2)
    assert lease is not None and bytes(lease.view) == v2
    lease.release()
    _healthy(served)
