"""Issue 11: what a data-plane connection may cost the server, before and after it authenticates,
and that no exception while serving one request reaches the listener (or the daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_dataplane_helpers import KEY_A, config, eventually, key, payload, planes, put

from memkv_mesh.protocol import LEN
from transport.dataplane import DataPlaneError, client_handshake
from transport.dataplane_config import DataPlaneConfig, decode_keys
from transport.tcp_dataplane import TcpChannel


async def _connect(addr: str) -> trio.SocketStream:
    host, port = addr.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def _closed_by_server(stream: trio.SocketStream) -> None:
    """Read until the server closes (EOF or reset); whatever it sent first is ignored."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        pass


async def test_unauthenticated_peer_cannot_make_us_buffer_a_big_frame(tmp_path: Path) -> None:
    """Before: a frame header announcing 1 MiB was read into memory (up to 4 MiB) until the
    handshake timed out. Now more than 64 KiB before authenticating closes the connection."""
    async with planes(tmp_path, config(connect_timeout_s=30)) as ((b, addr_b),):
        stream = await _connect(addr_b)
        await stream.send_all(LEN.pack(1 << 20))
        with trio.fail_after(5):
            try:
                await stream.send_all(b"\0" * (200 << 10))
            except trio.BrokenResourceError:
                pass
            await _closed_by_server(stream)
        await eventually(lambda: b.statistics().peer_errors == 1)
        await stream.aclose()


async def test_slow_handshake_is_closed(tmp_path: Path) -> None:
    """A connection that sends half a Hello and stalls is closed after connect_timeout_s (this
    held before too; kept as a regression test)."""
    async with planes(tmp_path, config(connect_timeout_s=0.5)) as ((b, addr_b),):
        stream = await _connect(addr_b)
        await stream.send_all(LEN.pack(100) + b"\x93")
        with trio.fail_after(5):
            await _closed_by_server(stream)
        await eventually(lambda: b.statistics().handshake_timeouts == 1)


async def test_handshakes_beyond_the_cap_push_out_the_oldest(tmp_path: Path) -> None:
    """Before: every silent connection was held for the whole handshake timeout, any number."""
    async with planes(tmp_path, config(), config(max_handshakes=3, connect_timeout_s=30)) as (
        (a, _), (b, addr_b),
    ):  # fmt: skip
        await put(b.store, key(1, 600), payload(1000, 1))
        idle = []
        for _ in range(3):
            idle.append(await _connect(addr_b))
        await eventually(lambda: b.statistics().connections_handshaking == 3)
        late = await _connect(addr_b)  # one more: the oldest silent one goes
        with trio.fail_after(5):
            await _closed_by_server(idle[0])
        await eventually(lambda: b.statistics().handshakes_evicted == 1)
        # a genuine peer still gets through (pushing out another silent one)
        with trio.fail_after(5):
            assert await a.fetch(addr_b, [key(1, 600)]) == [True]
        for s in [*idle, late]:
            await s.aclose()


async def test_connections_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config(max_connections=2, connect_timeout_s=30)) as (
        (a, _), (b, addr_b),
    ):  # fmt: skip
        await put(b.store, key(1, 601), payload(1000, 1))
        held = [await _connect(addr_b), await _connect(addr_b)]
        await eventually(lambda: b.statistics().connections_handshaking == 2)
        extra = await _connect(addr_b)
        with trio.fail_after(5):
            await _closed_by_server(extra)
        assert b.statistics().connections_refused == 1
        with pytest.raises(DataPlaneError):
            await a.fetch(addr_b, [key(1, 601)])
        for s in held:
            await s.aclose()
        await eventually(lambda: b.statistics().connections_open == 0)
        assert await a.fetch(addr_b, [key(1, 601)]) == [True]


async def test_partial_frame_after_authenticating_is_closed(tmp_path: Path) -> None:
    """Before: after the handshake, half a frame held the connection (and its task) forever."""
    async with planes(tmp_path, config(io_timeout_s=0.5)) as ((b, addr_b),):
        stream = await _connect(addr_b)
        chan = TcpChannel(stream, addr_b, max_frame=1 << 20, io_timeout=5)
        await client_handshake(chan, decode_keys([KEY_A]), "slowloris", 5)
        await stream.send_all(LEN.pack(64))  # a frame of 64 bytes begins, and nothing follows
        with trio.fail_after(5):
            await _closed_by_server(stream)
        await stream.aclose()


async def test_idle_authenticated_connection_is_closed_and_replaced(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config(idle_timeout_s=0.3)) as ((a, _), (b, addr_b)):
        await put(b.store, key(1, 602), payload(1000, 1))
        await put(b.store, key(2, 602), payload(1000, 2))
        assert await a.fetch(addr_b, [key(1, 602)]) == [True]
        await eventually(lambda: b.statistics().idle_closed == 1)
        # the client's pooled connection is dead now: replaced transparently
        assert await a.fetch(addr_b, [key(2, 602)]) == [True]
        assert a.statistics().connections_opened == 2


async def test_an_exception_while_serving_drops_only_that_connection(tmp_path: Path) -> None:
    """Before: any exception other than DataPlaneError in a request handler escaped into the
    listener's nursery and took the whole data plane (and the daemon) down."""
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        await put(b.store, key(1, 603), payload(1000, 1))
        real_get = b.store.get
        calls = 0

        async def broken_get(*args: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a store bug")
            return await real_get(*args, **kw)

        b.store.get = broken_get
        with trio.fail_after(5), pytest.raises(DataPlaneError):
            await a.fetch(addr_b, [key(1, 603)])
        with trio.fail_after(5):
            assert await a.fetch(addr_b, [key(1, 603)]) == [True]
        assert b.statistics().handler_errors == 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_connections", 0, "max_connections must be at least 1"),
        ("max_handshakes", 0, "max_handshakes must be at least 1"),
        ("idle_timeout_s", 0.0, "idle_timeout_s must be > 0"),
        ("io_timeout_s", float("inf"), "io_timeout_s must be > 0"),
        ("connect_timeout_s", float("nan"), "connect_timeout_s must be > 0"),
    ],
)
def test_limit_fields_are_validated(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataPlaneConfig(**{field: value}).validate()  # type: ignore[arg-type]


async def test_big_frames_after_authenticating_are_still_read_at_full_speed(tmp_path: Path) -> None:
    """The 64 KiB bound is for unauthenticated peers only: a 65,536-key request (2.2 MiB) from an
    authenticated one is read in big chunks and answered at once."""
    import os

    from transport.dataplane import FetchReply, FetchRequest
    from transport.tcp_dataplane import open_channel

    async with planes(tmp_path, config()) as ((b, addr_b),):
        chan = await open_channel(addr_b, decode_keys([KEY_A]), "big")
        keys = [os.urandom(32) for _ in range(65536)]
        with trio.fail_after(10):
            await chan.send_msg(FetchRequest(keys, "big"))
            reply = await chan.recv_msg(10)
        assert isinstance(reply, FetchReply) and reply.sizes == [-1] * 65536
        await chan.aclose()
