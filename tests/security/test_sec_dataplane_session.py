"""Issue 11: every data-plane frame after the handshake is authenticated (an on-path attacker can
neither inject, alter nor replay one), block bytes may be sealed too, and a node speaks only under
its own name.

The attacker is a TCP proxy between two real data planes that sees every byte and may rewrite the
client's frames (it knows the framing, not the mesh key)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from test_dataplane_helpers import KEY_A, config, eventually, key, payload, planes, put, read

from memkv_mesh.protocol import LEN
from transport import ucx_dataplane
from transport.dataplane import (
    DataPlaneError,
    DeleteRequest,
    FetchRequest,
    FrameAuthError,
    Session,
    client_handshake,
    encode_frame,
)
from transport.dataplane_config import decode_keys
from transport.tcp_dataplane import TcpChannel

# The client's frames on a connection: 0 Hello, 1 Proof, 2 its first request.
FIRST_REQUEST = 2
Rewrite = Callable[[int, bytes], list[bytes]]


async def _pump_frames(src: trio.SocketStream, dst: trio.SocketStream, rewrite: Rewrite) -> None:
    buf = bytearray()
    i = 0
    while True:
        data = await src.receive_some(1 << 16)
        if not data:
            await dst.aclose()
            return
        buf += data
        while len(buf) >= 4 and len(buf) >= 4 + LEN.unpack_from(buf, 0)[0]:
            n = 4 + LEN.unpack_from(buf, 0)[0]
            frame, buf = bytes(buf[:n]), buf[n:]
            for out in rewrite(i, frame):
                await dst.send_all(out)
            i += 1
            if i > FIRST_REQUEST:  # past the first request: pass everything through untouched
                if buf:
                    await dst.send_all(bytes(buf))
                buf = bytearray()
                while data := await src.receive_some(1 << 16):
                    await dst.send_all(data)
                await dst.aclose()
                return


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    while data := await src.receive_some(1 << 16):
        await dst.send_all(data)
    await dst.aclose()


async def _proxy(target: str, rewrite: Rewrite, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """An on-path attacker: forwards connections to ``target``, rewriting the client's frames."""
    host, port = target.rsplit(":", 1)

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(host, int(port))
        try:
            async with trio.open_nursery() as n:
                n.start_soon(_pump_frames, client, server, rewrite)
                n.start_soon(_pump, server, client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")


def _settled(st: Any, frames: int) -> bool:
    """The server has dealt with ``frames`` request frames: served them or refused them."""
    return st.requests_served + getattr(st, "frame_auth_failures", 0) >= frames


async def test_injected_frame_after_the_handshake_is_refused(tmp_path: Path) -> None:
    """Before: a plain DeleteRequest slipped into an authenticated connection deleted the block."""
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)), trio.open_nursery() as n:
        victim = key(1, 500)
        await put(b.store, victim, payload(1000, 1))
        await put(b.store, key(2, 500), payload(1000, 2))

        def inject(i: int, frame: bytes) -> list[bytes]:
            if i == FIRST_REQUEST:
                return [bytes(encode_frame(DeleteRequest([victim]))), frame]
            return [frame]

        proxy = await n.start(_proxy, addr_b, inject)
        with trio.fail_after(10):
            try:
                await a.fetch(proxy, [key(2, 500)])
            except DataPlaneError:
                pass
        await eventually(lambda: _settled(b.statistics(), 1))
        assert b.store.contains([victim]) == [True]
        assert b.statistics().requests_served == 0 and b.statistics().frame_auth_failures == 1
        n.cancel_scope.cancel()


async def test_altered_frame_is_refused(tmp_path: Path) -> None:
    """Before: a request with a flipped byte was served (for whatever key it now named)."""
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)), trio.open_nursery() as n:
        await put(b.store, key(1, 501), payload(1000, 1))

        def flip(i: int, frame: bytes) -> list[bytes]:
            if i == FIRST_REQUEST:
                return [frame[:-1] + bytes([frame[-1] ^ 1])]
            return [frame]

        proxy = await n.start(_proxy, addr_b, flip)
        with trio.fail_after(10), pytest.raises(DataPlaneError):
            await a.fetch(proxy, [key(1, 501)])
        await eventually(lambda: b.statistics().frame_auth_failures == 1)
        assert b.statistics().requests_served == 0
        assert a.store.contains([key(1, 501)]) == [False]
        # the genuine path still works
        assert await a.fetch(addr_b, [key(1, 501)]) == [True]
        n.cancel_scope.cancel()


async def test_replayed_frame_is_refused(tmp_path: Path) -> None:
    """Before: a request sent twice by the attacker was served twice."""
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)), trio.open_nursery() as n:
        await put(b.store, key(1, 502), payload(1000, 1))

        def twice(i: int, frame: bytes) -> list[bytes]:
            return [frame, frame] if i == FIRST_REQUEST else [frame]

        proxy = await n.start(_proxy, addr_b, twice)
        with trio.fail_after(10):
            try:
                await a.fetch(proxy, [key(1, 502)])
            except DataPlaneError:
                pass
        await eventually(lambda: _settled(b.statistics(), 2))
        assert b.statistics().requests_served == 1 and b.statistics().frame_auth_failures == 1
        n.cancel_scope.cancel()


def _sessions(bulk: bool = False) -> tuple[Session, Session]:
    k = decode_keys([KEY_A])[0]
    nc, ns = os.urandom(32), os.urandom(32)
    return (
        Session(k, nc, ns, "c", "s", is_client=True, encrypt_bulk=bulk),
        Session(k, nc, ns, "c", "s", is_client=False, encrypt_bulk=bulk),
    )


def test_session_detects_reorder_drop_reflection_and_other_sessions() -> None:
    c, s = _sessions()
    f0, f1, f2 = (c.seal(b"frame %d" % i) for i in range(3))
    assert s.open(f0) == b"frame 0"
    with pytest.raises(FrameAuthError, match="frame 1"):
        s.open(f2)  # f1 dropped (or f2 moved ahead): fails
    c, s = _sessions()
    f0, f1 = c.seal(b"a"), c.seal(b"b")
    with pytest.raises(FrameAuthError):
        s.open(f1)  # reordered
    c, s = _sessions()
    with pytest.raises(FrameAuthError):
        c.open(c.seal(b"reflected"))  # a client's own frame sent back to it
    c2, s2 = _sessions()
    with pytest.raises(FrameAuthError):
        s2.open(c.seal(b"from another connection"))
    # distinct names give distinct keys: a session is bound to both node ids
    k = decode_keys([KEY_A])[0]
    nc, ns = os.urandom(32), os.urandom(32)
    honest = Session(k, nc, ns, "node-a", "s", is_client=True)
    other = Session(k, nc, ns, "node-b", "s", is_client=False)
    with pytest.raises(FrameAuthError):
        other.open(honest.seal(b"x"))


def test_sealed_blocks_round_trip_and_detect_tampering() -> None:
    c, s = _sessions(bulk=True)
    data = memoryview(payload(70_000, 3))
    sealed = c.seal_block(data)
    assert len(sealed) == len(data) + 16 and bytes(sealed[:64]) != bytes(data[:64])  # not plaintext
    out = memoryview(bytearray(len(data)))
    s.open_block_into(memoryview(sealed), out)
    assert out == data
    bad = bytearray(c.seal_block(data))
    bad[5] ^= 1
    with pytest.raises(FrameAuthError, match="block 1"):
        s.open_block_into(memoryview(bad), out)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_encrypted_bulk_moves_blocks_and_hides_them(tmp_path: Path, transport: str) -> None:
    if transport == "ucx" and ucx_dataplane.probe().error:
        pytest.skip(f"UCX unavailable: {ucx_dataplane.probe().error}")
    sizes = (1, 70_000, (3 << 20) + 5, 300_000)
    cfg_a = config(transport=transport, encrypt_bulk=True)
    async with planes(tmp_path, cfg_a, config(transport=transport)) as ((a, _), (b, addr_b)):
        keys = [key(i, 503) for i in range(len(sizes))]
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            await put(b.store, k, payload(n, i))
        handed: list[bytes] = []

        async def on_stored(ks: list[bytes]) -> None:
            handed.extend(ks)

        with trio.fail_after(30):
            assert await a.fetch(addr_b, [*keys, key(9, 503)], on_stored) == [True] * 4 + [False]
        assert sorted(handed) == sorted(keys)
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            assert await read(a.store, k) == payload(n, i)
        pk = [key(i, 504) for i in range(3)]
        for i, k in enumerate(pk):
            await put(a.store, k, payload(1 << 20, 20 + i))
        with trio.fail_after(30):
            assert await a.push(addr_b, pk) == [True] * 3
        for i, k in enumerate(pk):
            assert await read(b.store, k) == payload(1 << 20, 20 + i)
        assert a.statistics().encrypt_bulk and not b.statistics().encrypt_bulk
        assert a.statistics().corrupt_blocks == b.statistics().corrupt_blocks == 0


async def test_encrypted_bulk_is_ciphertext_on_the_wire_and_tamper_evident(tmp_path: Path) -> None:
    """With encrypt_bulk the block's bytes never appear on the wire (before: they did, always),
    and the holder's checksum is still verified after opening (a block altered at the sender
    is a corrupt block, never committed)."""
    data = payload(200_000, 7)
    cfg = config(encrypt_bulk=True)
    async with planes(tmp_path, cfg, config()) as ((a, _), (b, addr_b)):
        await put(b.store, key(1, 505), data)
        seen = bytearray()

        def flip(_k: bytes, view: memoryview) -> memoryview:
            raw = bytearray(view)
            raw[1000] ^= 0xFF
            return memoryview(raw)

        b._send_hook = flip  # the server alters the plaintext before sealing: checksum catches it
        assert await a.fetch(addr_b, [key(1, 505)]) == [False]
        assert a.statistics().corrupt_blocks == 1
        b._send_hook = None
        # Sniff the wire with a pass-through proxy: the plaintext is not there.
        async with trio.open_nursery() as n:

            async def sniff(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                while chunk := await src.receive_some(1 << 16):
                    seen.extend(chunk)
                    await dst.send_all(chunk)
                await dst.aclose()

            host, port = addr_b.rsplit(":", 1)

            async def handle(client: trio.SocketStream) -> None:
                server = await trio.open_tcp_stream(host, int(port))
                try:
                    async with trio.open_nursery() as m:
                        m.start_soon(_pump, client, server)
                        m.start_soon(sniff, server, client)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            n.start_soon(trio.serve_listeners, handle, listeners)
            proxy = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            assert await a.fetch(proxy, [key(1, 505)]) == [True]
            n.cancel_scope.cancel()
        assert await read(a.store, key(1, 505)) == data
        assert len(seen) > len(data) and data[5000:5064] not in seen


async def test_a_peer_cannot_claim_this_nodes_own_name(tmp_path: Path) -> None:
    """Before: a key holder could connect to n1 calling itself n1 and was welcomed."""
    async with planes(tmp_path, config()) as ((b, addr_b),):
        host, port = addr_b.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        chan = TcpChannel(stream, addr_b, max_frame=1 << 20, io_timeout=5)
        with pytest.raises(DataPlaneError, match="identity"):
            await client_handshake(chan, decode_keys([KEY_A]), "n0", 5)
        await stream.aclose()
        await eventually(lambda: b.statistics().identity_refusals == 1)
        assert b.statistics().auth_failures == 0


async def test_requests_under_another_nodes_name_are_refused(tmp_path: Path) -> None:
    from transport.dataplane import Error, FetchReply, PushRequest
    from transport.tcp_dataplane import open_channel

    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        keys = decode_keys([KEY_A])
        chan = await open_channel(addr_b, keys, "mallory")
        assert chan.peer_node == "n1" and chan.session is not None
        await chan.send_msg(PushRequest([key(1, 506)], [10], [0], False, "n0"))
        err = await chan.recv_msg(5)
        assert isinstance(err, Error) and err.code == "identity" and "'mallory', not 'n0'" in err.message
        with pytest.raises(DataPlaneError):
            await chan.recv_msg(5)  # and the connection is closed
        await chan.aclose()
        assert b.statistics().identity_refusals == 1 and b.store.statistics().pending_slots == 0
        # Under its own name (or none) the same client is served.
        chan = await open_channel(addr_b, keys, "mallory")
        await chan.send_msg(FetchRequest([key(1, 506)], "mallory"))
        assert isinstance(await chan.recv_msg(5), FetchReply)
        await chan.aclose()
        # The client side can insist on whom it talks to.
        await put(b.store, key(2, 506), payload(100, 1))
        assert await a.fetch(addr_b, [key(2, 506)], expect_node="n1") == [True]
        with pytest.raises(DataPlaneError, match="authenticated as 'n1', not as the expected 'n7'"):
            await a.delete(addr_b, [key(2, 506)], expect_node="n7")
        assert b.store.contains([key(2, 506)]) == [True]
