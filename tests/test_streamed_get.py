"""Streamed gets: a get that misses locally hands each block to the client as soon as it is on
this node (local hits at once, fetched blocks as each lands), and the client copies it out while
the rest are still on the wire. The client side (``_Sink``) is tested on its own with parts in
every order; the daemon side with two in-process daemons on real gossip and the TCP data plane."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
from test_mesh_dataplane import _cfg, _until, _wait_alive

from memkv_mesh import protocol
from memkv_mesh.client import AsyncClient, Client, MemkvError, _Sink
from memkv_mesh.daemon import Daemon
from memkv_mesh.tenants import scope_keys

MiB = 1 << 20


# ---- the client side, without a daemon ----------------------------------------------------------
class _Arena:
    """Enough of a client for ``_Sink``: an arena to read blocks from."""

    def __init__(self, blocks: list[bytes]) -> None:
        self.buf = bytearray(b"".join(blocks))
        self.locs: list[tuple[int, int]] = []
        pos = 0
        for b in blocks:
            self.locs.append((pos, len(b)))
            pos += len(b)
        self._gpu = None

    def _slot(self, offset: int, length: int) -> memoryview:
        return memoryview(self.buf)[offset : offset + length]


def _blocks(n: int) -> list[bytes]:
    return [bytes([i + 1]) * (100 + 37 * i) for i in range(n)]


def test_sink_packed_buffer_waits_for_earlier_keys() -> None:
    blocks = _blocks(5)
    core = _Arena(blocks)
    L = core.locs
    out = bytearray(sum(map(len, blocks)))
    sink = _Sink(core, out, 5)  # type: ignore[arg-type]
    # Key 3 arrives first: its place depends on keys 0-2, so nothing is copied or released yet.
    assert sink.add(protocol.LocatedPart(7, [3], [L[3]])) == []
    assert out == bytearray(len(out))
    # Keys 0 and 1 arrive: copied at once and their lease is released.
    assert sink.add(protocol.LocatedPart(8, [0, 1], [L[0], L[1]])) == [8]
    assert out[: len(blocks[0]) + len(blocks[1])] == blocks[0] + blocks[1]
    # The final reply: key 2 is a miss, key 4 comes under the final lease (released by the caller).
    assert sink.finish(protocol.Located(9, [None, None, None, None, L[4]])) == [7]
    assert bytes(out[: len(blocks[0]) + len(blocks[1]) + len(blocks[3]) + len(blocks[4])]) == (
        blocks[0] + blocks[1] + blocks[3] + blocks[4]
    )
    assert sink.got == [len(blocks[0]), len(blocks[1]), None, len(blocks[3]), len(blocks[4])]
    assert sink.error is None and sink.abandon() == []


def test_sink_buffer_per_key_copies_every_part_at_once() -> None:
    blocks = _blocks(3)
    core = _Arena(blocks)
    bufs = [bytearray(400) for _ in blocks]
    sink = _Sink(core, bufs, 3)  # type: ignore[arg-type]
    assert sink.add(protocol.LocatedPart(5, [2], [core.locs[2]])) == [5]
    assert bufs[2][: len(blocks[2])] == blocks[2]
    assert sink.finish(protocol.Located(0, [core.locs[0], None, None])) == []
    assert sink.got == [len(blocks[0]), None, len(blocks[2])]


def test_sink_small_buffer_mid_stream_releases_everything_and_copies_nothing_more() -> None:
    blocks = _blocks(4)
    core = _Arena(blocks)
    out = bytearray(len(blocks[0]) + 10)  # room for block 0 only
    sink = _Sink(core, out, 4)  # type: ignore[arg-type]
    assert sink.add(protocol.LocatedPart(1, [2], [core.locs[2]])) == []  # waits for 0 and 1
    assert sink.add(protocol.LocatedPart(2, [0], [core.locs[0]])) == [2]
    # Block 1 does not fit: the error is kept, every lease held is handed back, nothing copied.
    assert sorted(sink.add(protocol.LocatedPart(3, [1], [core.locs[1]]))) == [1, 3]
    assert isinstance(sink.error, ValueError) and "buffer holds" in str(sink.error)
    assert sink.add(protocol.LocatedPart(4, [3], [core.locs[3]])) == [4]
    assert sink.finish(protocol.Located(0, [None] * 4)) == []
    assert bytes(out[: len(blocks[0])]) == blocks[0] and out[len(blocks[0]) :] == bytearray(10)


def test_sink_refuses_a_part_for_a_key_it_already_has() -> None:
    blocks = _blocks(2)
    core = _Arena(blocks)
    sink = _Sink(core, [bytearray(300), bytearray(300)], 2)  # type: ignore[arg-type]
    assert sink.add(protocol.LocatedPart(1, [0], [core.locs[0]])) == [1]
    assert sink.add(protocol.LocatedPart(2, [0], [core.locs[0]])) == [2]  # released, not copied
    assert isinstance(sink.error, MemkvError)
    sink2 = _Sink(core, [bytearray(300)], 1)  # type: ignore[arg-type]
    assert sink2.add(protocol.LocatedPart(3, [5], [core.locs[0]])) == [3]  # index out of range
    assert isinstance(sink2.error, MemkvError)


# ---- through two daemons ----------------------------------------------------------------------
async def _pair(nursery: trio.Nursery, tmp: Path, short_dir: Path) -> tuple[Daemon, Daemon]:
    a = await nursery.start(Daemon(_cfg(tmp, short_dir, "a", "flash", [])).run)
    g = await nursery.start(Daemon(_cfg(tmp, short_dir, "g", "gpu", [a.gossip.local_addr])).run)
    await _wait_alive([a, g], 2)
    return a, g


def _raw_get(path: Path, keys: list[bytes]) -> list[protocol.Msg]:
    """A streamed Get spoken by hand: every message up to the final Located."""
    dec = msgspec.msgpack.Decoder(protocol.Reply)
    frames = protocol.FrameBuffer()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(path))

        def reply() -> protocol.Msg:
            while (body := frames.next_frame()) is None:
                frames.feed(s.recv(65536))
            return dec.decode(body)

        s.sendall(protocol.encode_frame(protocol.Hello(protocol.PROTOCOL_VERSION, "raw")))
        assert isinstance(reply(), protocol.Welcome)
        s.sendall(protocol.encode_frame(protocol.Get(keys, stream=True)))
        msgs = [reply()]
        while isinstance(msgs[-1], protocol.LocatedPart):
            msgs.append(reply())
        for m in msgs:
            if getattr(m, "lease", 0):
                s.sendall(protocol.encode_frame(protocol.Release(m.lease)))  # type: ignore[attr-defined]
        return msgs


async def test_daemon_streams_local_hits_first_then_each_fetched_block(tmp_path: Path, short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        local, remote = os.urandom(32), [os.urandom(32) for _ in range(3)]
        absent = os.urandom(32)
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(remote, [os.urandom(700_000) for _ in remote])  # > 512 KiB: thread path
        async with await AsyncClient.connect(g.socket_path) as cg:
            await cg.put(local, b"L" * 1000)
        await g.store.delete(scope_keys(remote))  # the put replicated nothing to g (gpu), but make sure
        keys = [remote[0], local, remote[1], absent, remote[2]]
        msgs = await trio.to_thread.run_sync(_raw_get, g.socket_path, keys)
        parts, final = msgs[:-1], msgs[-1]
        assert isinstance(final, protocol.Located)
        assert all(isinstance(p, protocol.LocatedPart) for p in parts)
        assert parts[0].index == [1]  # type: ignore[attr-defined]  # the local hit, before any fetch
        delivered = sorted(i for p in parts for i in p.index)  # type: ignore[attr-defined]
        assert delivered == [0, 1, 2, 4]  # every found block in a part, each once
        assert final.blocks == [None] * 5  # nothing left: the absent key is a plain miss
        await _until(lambda: g.store.statistics().active_leases == 0, 5)
        nursery.cancel_scope.cancel()


async def test_streamed_get_into_buffers_matches_bytes(tmp_path: Path, short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        rng = np.random.default_rng(4)
        remote = [os.urandom(32) for _ in range(6)]
        vals = [rng.integers(0, 255, 300_000 + 1000 * i, dtype=np.uint8).tobytes() for i in range(6)]
        local = os.urandom(32)
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(remote, vals)
        async with await AsyncClient.connect(g.socket_path) as cg:
            await cg.put(local, b"L" * 5000)
            keys = [local, remote[0], os.urandom(32), *remote[1:3]]
            want = [b"L" * 5000, vals[0], None, vals[1], vals[2]]
            # One packed buffer: the miss in the middle shifts what follows.
            out = bytearray(sum(len(v) for v in want if v is not None) + 7)
            got = await cg.get_many_into(keys, out)
            assert got == [None if v is None else len(v) for v in want]
            assert bytes(out[: len(out) - 7]) == b"".join(v for v in want if v is not None)
            # A buffer per key, sync client in a thread, the rest of the blocks.
            # g kept the 3 blocks it fetched (under their scoped keys): drop them, fetched again.
            assert await g.store.delete(scope_keys(remote)) == 3

            def sync_get() -> tuple[list[int | None], list[bytearray]]:
                bufs = [bytearray(400_000) for _ in remote]
                with Client(g.socket_path) as c:
                    return c.get_many_into(remote, bufs), bufs

            got2, bufs = await trio.to_thread.run_sync(sync_get)
            assert got2 == [len(v) for v in vals]
            assert all(bytes(b[: len(v)]) == v for b, v in zip(bufs, vals, strict=True))
        await _until(lambda: g.store.statistics().active_leases == 0, 5)
        nursery.cancel_scope.cancel()


async def test_buffer_too_small_mid_stream_keeps_the_connection_in_step(tmp_path: Path, short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        remote = [os.urandom(32) for _ in range(3)]
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(remote, [os.urandom(200_000) for _ in remote])
        async with await AsyncClient.connect(g.socket_path) as cg:
            with pytest.raises(ValueError, match=r"buffer holds 250000 bytes; the blocks found need (at least )?[46]00000"):
                await cg.get_many_into(remote, bytearray(250_000))
            # The reply stream was read to its end: the same connection still answers correctly.
            assert await cg.contains(remote) == [True, True, True]
            assert await cg.get_many_into(remote, bytearray(600_000)) == [200_000] * 3
        await _until(lambda: g.store.statistics().active_leases == 0, 5)
        nursery.cancel_scope.cancel()


async def test_a_plain_get_still_gets_one_reply(tmp_path: Path, short_dir: Path) -> None:
    """Without ``stream`` (an older client) a get that fetches from the mesh is answered by one
    ``Located`` with every block, never by parts."""
    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        remote = [os.urandom(32) for _ in range(2)]
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(remote, [b"r" * 600_000] * 2)
        async with await AsyncClient.connect(g.socket_path) as cg:
            reply = await cg._call(protocol.Get([*remote, os.urandom(32)]))
            assert isinstance(reply, protocol.Located)
            assert [b[1] if b else None for b in reply.blocks] == [600_000, 600_000, None]
            cg._release(reply.lease)
            assert await cg.contains(remote) == [True, True]  # sends the queued Release first
        await _until(lambda: g.store.statistics().active_leases == 0, 5)
        nursery.cancel_scope.cancel()


async def test_status_and_metrics_name_the_transport_and_count_the_mesh(
    tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memkv_mesh.daemon_cli import status_main

    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        remote = [os.urandom(32) for _ in range(4)]
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(remote, [b"m" * 300_000] * 4)
        async with await AsyncClient.connect(g.socket_path) as cg:
            assert await cg.get_many_into(remote, bytearray(1_200_000)) == [300_000] * 4
        st = g.store.statistics()  # each block counted once: a local miss, fetched from the mesh
        assert (st.misses, st.hits_dram, st.get_bytes) == (4, 0, 1_200_000)
        text = g.metrics.render().decode()
        assert 'memkv_dataplane_info{address="' in text and 'transport="tcp"' in text
        assert 'memkv_dataplane_blocks_total{direction="in"} 4.0' in text
        assert 'memkv_dataplane_bytes_total{direction="in"} 1.2e+06' in text
        assert "memkv_mesh_fetched_total 4.0" in text and "memkv_mesh_candidates 1.0" in text
        assert await trio.to_thread.run_sync(status_main, ["--socket", str(g.socket_path)]) == 0
        out = capsys.readouterr().out
        assert "dataplane tcp at " in out and "in 4 blocks / 1.1 MiB" in out
        assert "mesh      R=2 over 1 flash peers; fetched 4 (misses 0)" in out
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_get_streamed_in_many_parts_does_not_wedge_the_socket(
    tmp_path: Path, short_dir: Path, kind: str
) -> None:
    """1,500 parts: the client must not send a Release per part while the daemon, which reads
    nothing until the get is answered, is still streaming (both socket buffers would fill)."""
    from memkv_mesh.daemon import _Conn

    n = 1500
    async with trio.open_nursery() as nursery:
        a, g = await _pair(nursery, tmp_path, short_dir)
        keys = [os.urandom(32) for _ in range(n)]
        async with await AsyncClient.connect(g.socket_path) as cg:
            await cg.put_many(keys, [b"x" * 1000] * n)
        real_get, first = g.store.get, [True]

        async def get(owner: Any, ks: list[bytes], **kw: Any) -> Any:  # the get misses all at first
            if isinstance(owner, _Conn) and first[0]:
                first[0] = False
                return 0, [None] * len(ks)
            return await real_get(owner, ks, **kw)

        async def fetch_missing(ks: list[bytes], on_stored: Any = None) -> int:  # one part per key
            for k in ks:
                await on_stored([k])
            return len(ks)

        g.store.get = get  # type: ignore[method-assign]
        g.mesh.fetch_missing = fetch_missing  # type: ignore[method-assign]

        def sync_get() -> list[int | None]:
            with Client(g.socket_path, timeout=20) as c:
                return c.get_many_into(keys, [bytearray(1000) for _ in keys])

        with trio.fail_after(30):
            if kind == "sync":
                got = await trio.to_thread.run_sync(sync_get)
            else:
                async with await AsyncClient.connect(g.socket_path) as c:
                    got = await c.get_many_into(keys, [bytearray(1000) for _ in keys])
        assert got == [1000] * n
        await _until(lambda: g.store.statistics().active_leases == 0, 5)
        nursery.cancel_scope.cancel()
