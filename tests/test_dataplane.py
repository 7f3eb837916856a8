"""The data plane over TCP: fetch/push into real arenas, authentication, corruption, peer death."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import xxhash
from test_dataplane_helpers import (
    KEY_A,
    KEY_B,
    config,
    eventually,
    key,
    make_store,
    payload,
    planes,
    put,
    read,
)

from transport.dataplane import (
    DataPlane,
    DataPlaneError,
    FetchReply,
    FetchRequest,
    PushReady,
    PushRequest,
    Session,
    encode_frame,
    server_handshake,
)
from transport.dataplane_config import decode_keys
from transport.tcp_dataplane import TcpChannel

SIZES = (1, 4096, 300_000, (4 << 20) + 1)


async def test_fetch_lands_blocks_in_our_arena(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        keys = [key(i) for i in range(len(SIZES))]
        for i, (k, n) in enumerate(zip(keys, SIZES, strict=True)):
            await put(b.store, k, payload(n, i))
        missing = key(99)
        with trio.fail_after(20):
            got = await a.fetch(addr_b, [*keys, missing])
        assert got == [True, True, True, True, False]
        for i, (k, n) in enumerate(zip(keys, SIZES, strict=True)):
            assert await read(a.store, k) == payload(n, i)
        assert await read(a.store, missing) is None
        sa = a.store.statistics()
        assert sa.pending_slots == 0 and sa.active_leases == 0
        # the server releases its lease once its send returns
        await eventually(lambda: b.store.statistics().active_leases == 0)
        st = a.statistics()
        assert st.transport == "tcp" and st.blocks_in == 4 and st.bytes_in == sum(SIZES)
        assert b.statistics().blocks_out == 4
        # Already held: no transfer at all, still True.
        before = b.statistics().requests_served
        assert await a.fetch(addr_b, keys[:2]) == [True, True]
        assert b.statistics().requests_served == before


async def test_push_replicates_and_is_idempotent(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        keys = [key(i, 1) for i in range(3)]
        for i, k in enumerate(keys):
            await put(a.store, k, payload(100_000 * (i + 1), 10 + i))
        not_held = key(50, 1)
        with trio.fail_after(20):
            assert await a.push(addr_b, [*keys, not_held]) == [True, True, True, False]
        for i, k in enumerate(keys):
            assert await read(b.store, k) == payload(100_000 * (i + 1), 10 + i)
        out_before = a.statistics().bytes_out
        assert await a.push(addr_b, keys) == [True, True, True]  # already there: no bytes move
        assert a.statistics().bytes_out == out_before
        assert b.store.statistics().pending_slots == 0
        assert a.store.statistics().active_leases == 0


async def test_connections_are_pooled_and_reused(tmp_path: Path) -> None:
    async with planes(tmp_path, config(max_connections_per_peer=2), config()) as ((a, _), (b, addr_b)):
        keys = [key(i, 2) for i in range(16)]
        for i, k in enumerate(keys):
            await put(b.store, k, payload(20_000, i))
        for k in keys[:4]:
            assert await a.fetch(addr_b, [k]) == [True]
        assert a.statistics().connections_opened == 1
        async with trio.open_nursery() as n:
            for k in keys[4:]:
                n.start_soon(a.fetch, addr_b, [k])
        assert all(x is not None for x in [await read(a.store, k) for k in keys])
        st = a.statistics()
        assert st.connections_opened <= 8  # max_concurrent_transfers bounds parallel connections
        assert st.connections_open <= 2  # only max_connections_per_peer are kept idle
        assert st.active_transfers == 0


async def test_wrong_key_can_neither_fetch_nor_store(tmp_path: Path) -> None:
    async with planes(tmp_path, config(keys=[KEY_B]), config(keys=[KEY_A])) as ((evil, _), (b, addr_b)):
        k = key(1, 3)
        await put(b.store, k, payload(5000, 1))
        await put(evil.store, key(2, 3), payload(5000, 2))
        with pytest.raises(DataPlaneError, match="refused|key"):
            await evil.fetch(addr_b, [k])
        with pytest.raises(DataPlaneError, match="refused|key"):
            await evil.push(addr_b, [key(2, 3)])
        assert await read(evil.store, k) is None
        assert await read(b.store, key(2, 3)) is None
        await eventually(lambda: b.statistics().auth_failures == 2)
        assert evil.statistics().auth_failures == 2
        assert b.statistics().blocks_out == 0 and b.statistics().blocks_in == 0


async def test_server_without_our_key_is_not_trusted(tmp_path: Path) -> None:
    """The client checks the server's proof too: a server that cannot prove the key gets nothing."""
    async with planes(tmp_path, config(keys=[KEY_A]), config(keys=[KEY_B])) as ((a, _), (b, addr_b)):
        await put(a.store, key(1, 4), payload(1000, 1))
        with pytest.raises(DataPlaneError):
            await a.push(addr_b, [key(1, 4)])
        assert await read(b.store, key(1, 4)) is None


async def test_key_rotation_accepts_every_key_of_the_ring(tmp_path: Path) -> None:
    async with planes(tmp_path, config(keys=[KEY_B]), config(keys=[KEY_A, KEY_B])) as ((a, _), (b, addr_b)):
        await put(b.store, key(1, 5), payload(1000, 1))
        assert await a.fetch(addr_b, [key(1, 5)]) == [True]


async def test_corrupt_bytes_in_flight_are_never_committed(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        good, bad = key(1, 6), key(2, 6)
        await put(b.store, good, payload(70_000, 1))
        await put(b.store, bad, payload(2 << 20, 2))

        def flip(k: bytes, view: memoryview) -> memoryview:
            if k != bad:
                return view
            corrupt = bytearray(view)
            corrupt[len(corrupt) // 2] ^= 0xFF
            return memoryview(corrupt)

        b._send_hook = flip
        assert await a.fetch(addr_b, [bad, good]) == [False, True]
        assert await read(a.store, bad) is None
        assert await read(a.store, good) == payload(70_000, 1)
        sa = a.store.statistics()
        assert sa.pending_slots == 0 and sa.dram_blocks == 1
        assert a.statistics().corrupt_blocks == 1
        # The connection survives a corrupt block: the next fetch reuses it.
        b._send_hook = None
        assert await a.fetch(addr_b, [bad]) == [True]
        assert a.statistics().connections_opened == 1


@pytest.mark.parametrize("size", [3000, 700_000])  # the Trio receive loop, and the bulk thread
async def test_fetch_hands_on_each_stored_block_once_and_never_a_corrupt_one(tmp_path: Path, size: int) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        keys = [key(i, 30) for i in range(5)]
        for i, k in enumerate(keys):
            await put(b.store, k, payload(size, i))
        bad = keys[2]

        def flip(k: bytes, view: memoryview) -> memoryview:
            if k != bad:
                return view
            corrupt = bytearray(view)
            corrupt[0] ^= 0xFF
            return memoryview(corrupt)

        b._send_hook = flip
        handed: list[bytes] = []

        async def on_stored(ks: list[bytes]) -> None:
            assert all(a.store.contains(ks))  # committed before it is handed on
            handed.extend(ks)
            await trio.sleep(0.001)  # a slow consumer does not stop the transfer

        assert await a.fetch(addr_b, [*keys, key(99, 30)], on_stored) == [True, True, False, True, True, False]
        if size * len(keys) < (1 << 20):
            assert handed == []  # a small fetch lands in one go: nothing is handed on early
        else:
            assert handed == [k for k in keys if k != bad]  # in order, each once, the corrupt one never
        assert a.statistics().corrupt_blocks == 1


async def test_corrupt_push_is_refused_by_the_receiver(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        k = key(1, 7)
        await put(a.store, k, payload(1 << 20, 3))

        def flip(_k: bytes, view: memoryview) -> memoryview:
            c = bytearray(view)
            c[0] ^= 1
            return memoryview(c)

        a._send_hook = flip
        assert await a.push(addr_b, [k]) == [False]
        assert await read(b.store, k) is None
        assert b.statistics().corrupt_blocks == 1
        assert b.store.statistics().pending_slots == 0
        assert b.store.statistics().dram_used_bytes == 0


async def _fake_server(
    tmp: Path, behaviour: str, data: bytes, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """A peer that authenticates properly and then misbehaves on the data path."""
    keys = decode_keys([KEY_A])

    async def handle(stream: trio.SocketStream) -> None:
        chan = TcpChannel(stream, "client", max_frame=1 << 20, io_timeout=5)
        await server_handshake(chan, keys, "fake", 5)
        req = await chan.recv_msg(5)
        if behaviour == "die_mid_block":
            assert isinstance(req, FetchRequest)
            await chan.send_msg(FetchReply([len(data)], [xxhash.xxh3_64_intdigest(data)]))
            await chan.send_blocks([memoryview(data)[: len(data) // 2]])
            await stream.aclose()
        elif behaviour == "stall_mid_block":
            await chan.send_msg(FetchReply([len(data)], [xxhash.xxh3_64_intdigest(data)]))
            await chan.send_blocks([memoryview(data)[: len(data) // 3]])
            await trio.sleep_forever()  # connection open, no more bytes
        elif behaviour == "garbage":
            await stream.send_all(b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1")
            await trio.sleep_forever()
        elif behaviour == "short_reply":
            await chan.send_msg(FetchReply([], []))
            await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(f"127.0.0.1:{port}")


@pytest.mark.parametrize("behaviour", ["die_mid_block", "garbage", "short_reply"])
async def test_misbehaving_peer_raises_and_frees_every_slot(tmp_path: Path, behaviour: str) -> None:
    data = payload(3 << 20, 9)
    async with planes(tmp_path, config()) as ((a, _),), trio.open_nursery() as n:
        addr = await n.start(_fake_server, tmp_path, behaviour, data)
        with trio.fail_after(10), pytest.raises(DataPlaneError):
            await a.fetch(addr, [key(1, 8)])
        st = a.store.statistics()
        assert st.dram_blocks == 0 and st.pending_slots == 0 and st.dram_used_bytes == 0
        assert a.statistics().connections_open == 0  # the broken connection was not pooled
        n.cancel_scope.cancel()


async def test_peer_down_is_an_error(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    async with planes(tmp_path, config()) as ((a, _),):
        with trio.fail_after(10), pytest.raises(DataPlaneError, match="cannot reach|connect"):
            await a.fetch(f"127.0.0.1:{port}", [key(1)])
        with pytest.raises(DataPlaneError, match="host:port"):
            await a.fetch("no-port-here", [key(1)])
        with pytest.raises(ValueError, match="key 0 is 3 bytes"):
            await a.fetch(f"127.0.0.1:{port}", [b"abc"])


async def test_server_answers_bad_requests_and_keeps_serving(tmp_path: Path) -> None:
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        await put(b.store, key(1, 9), payload(10, 1))
        host, port = addr_b.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        chan = TcpChannel(stream, addr_b, max_frame=1 << 20, io_timeout=5)
        from transport.dataplane import client_handshake

        await client_handshake(chan, decode_keys([KEY_A]), "raw", 5)
        await chan.send_msg(FetchRequest([b"short"]))
        err = await chan.recv_msg(5)
        assert type(err).__name__ == "Error" and "key 0 is 5 bytes" in err.message  # type: ignore[attr-defined]
        await chan.send_msg(PushRequest([key(3, 9)], [10, 20], [0]))
        err = await chan.recv_msg(5)
        assert "1 keys but 2 sizes" in err.message  # type: ignore[attr-defined]
        await chan.send_msg(PushReady([0]))  # a reply type where a request belongs: connection closed
        err = await chan.recv_msg(5)
        assert "unexpected PushReady" in err.message  # type: ignore[attr-defined]
        await stream.aclose()
        # A request before authentication is refused too; the server still serves others.
        raw = await trio.open_tcp_stream(host, int(port))
        await raw.send_all(encode_frame(FetchRequest([key(1, 9)])))
        await raw.aclose()
        assert await a.fetch(addr_b, [key(1, 9)]) == [True]
        assert b.statistics().protocol_errors >= 3


async def test_stale_pooled_connection_is_replaced_once(tmp_path: Path) -> None:
    store_b = make_store(tmp_path / "b.arena")
    try:
        async with planes(tmp_path, config()) as ((a, _),):
            await put(store_b, key(1, 10), payload(1000, 1))
            async with trio.open_nursery() as n:
                b = DataPlane(config(), store_b, node_id="b")
                addr = await n.start(b.run)
                assert await a.fetch(addr, [key(1, 10)]) == [True]
                n.cancel_scope.cancel()  # b restarts: a's pooled connection is now dead
            await a.store.delete([key(1, 10)])
            port = int(addr.rsplit(":", 1)[1])
            async with trio.open_nursery() as n:
                b2 = DataPlane(config(port=port), store_b, node_id="b")
                await n.start(b2.run)
                assert await a.fetch(addr, [key(1, 10)]) == [True]
                assert a.statistics().connections_opened == 2
                n.cancel_scope.cancel()
    finally:
        store_b.arena.close()


async def test_statistics_name_the_transport_and_why(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="tcp")) as ((a, addr),):
        st = a.statistics()
        assert st.transport == a.transport == "tcp"
        assert "configured" in a.reason and st.reason == a.reason
        assert st.address == addr and st.ucx_transports == []
        assert math.isfinite(st.bytes_in)


class _MemChannel:
    """One end of an in-memory channel pair, for handshake tests without sockets."""

    def __init__(self, send: trio.MemorySendChannel[object], recv: trio.MemoryReceiveChannel[object]) -> None:
        self.peer = "mem"
        self._send, self._recv = send, recv
        self.session: Session | None = None

    async def send_msg(self, msg: object) -> None:
        await self._send.send(msg)

    async def recv_msg(self, limit_s: float | None) -> object:
        with trio.fail_after(limit_s or 5):
            return await self._recv.receive()

    def start_session(self, session: Session) -> None:
        self.session = session


def _pair() -> tuple[_MemChannel, _MemChannel]:
    s1, r1 = trio.open_memory_channel[object](10)
    s2, r2 = trio.open_memory_channel[object](10)
    return _MemChannel(s1, r2), _MemChannel(s2, r1)


async def test_handshake_binds_fresh_nonces_and_rejects_replay_and_forgery() -> None:
    from transport.dataplane import (
        AuthError,
        Challenge,
        Hello,
        Proof,
        Welcome,
        client_handshake,
        key_id,
    )

    keys = decode_keys([KEY_A])
    c, s = _pair()
    async with trio.open_nursery() as n:
        n.start_soon(server_handshake, s, keys, "server", 5)  # type: ignore[arg-type]
        assert await client_handshake(c, keys, "client", 5) == "server"  # type: ignore[arg-type]
    assert c.session is not None and s.session is not None
    # each side's tag nonce is the other's remote, and what one seals the other opens
    assert (c.session.local_nonce, c.session.remote_nonce) == (s.session.remote_nonce, s.session.local_nonce)
    assert s.session.open(c.session.seal(b"request")) == b"request"
    assert c.session.open(s.session.seal(b"reply")) == b"reply"

    # Record a whole genuine client session, then replay its Hello and Proof to a fresh server.
    c, s = _pair()
    recorded: list[object] = []
    orig = c.send_msg

    async def record(msg: object) -> None:
        recorded.append(msg)
        await orig(msg)

    c.send_msg = record  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        n.start_soon(server_handshake, s, keys, "server", 5)  # type: ignore[arg-type]
        await client_handshake(c, keys, "client", 5)  # type: ignore[arg-type]
    hello, proof = recorded
    assert isinstance(hello, Hello) and isinstance(proof, Proof)
    c, s = _pair()
    async with trio.open_nursery() as n:

        async def replay() -> None:
            await c.send_msg(hello)
            challenge = await c.recv_msg(5)
            assert isinstance(challenge, Challenge) and challenge.nonce != hello.nonce
            await c.send_msg(proof)
            refusal = await c.recv_msg(5)
            assert not isinstance(refusal, Welcome)

        n.start_soon(replay)
        with pytest.raises(AuthError, match="failed to prove"):
            await server_handshake(s, keys, "server", 5)  # type: ignore[arg-type]

    # Knowing the key id is not knowing the key: a forged proof is refused.
    c, s = _pair()
    async with trio.open_nursery() as n:

        async def forge() -> None:
            await c.send_msg(Hello(2, "mallory", key_id(keys[0]), b"\x01" * 32))
            await c.recv_msg(5)
            await c.send_msg(Proof(b"\x00" * 32))
            assert not isinstance(await c.recv_msg(5), Welcome)

        n.start_soon(forge)
        with pytest.raises(AuthError, match="failed to prove"):
            await server_handshake(s, keys, "server", 5)  # type: ignore[arg-type]

    # And a server that does not hold the key cannot pass itself off as a mesh member.
    c, s = _pair()
    async with trio.open_nursery() as n:

        async def fake_server() -> None:
            await s.recv_msg(5)
            await s.send_msg(Challenge(2, "fake", b"\x02" * 32, b"\x00" * 32))

        n.start_soon(fake_server)
        with pytest.raises(AuthError, match="could not prove"):
            await client_handshake(c, keys, "client", 5)  # type: ignore[arg-type]


async def test_real_peer_dying_mid_block_commits_nothing(tmp_path: Path) -> None:
    from test_dataplane_helpers import peer_dies_mid_block

    await peer_dies_mid_block(tmp_path, "tcp")


async def test_stalled_peer_times_out_and_cancel_is_prompt(tmp_path: Path) -> None:
    """A peer that goes silent mid-block: the bulk thread gives up after io_timeout_s, and a
    caller's cancel reaches it within its 50 ms check; either way no slot stays reserved."""
    data = payload(3 << 20, 11)
    async with planes(tmp_path, config(io_timeout_s=1.5)) as ((a, _),), trio.open_nursery() as n:
        addr = await n.start(_fake_server, tmp_path, "stall_mid_block", data)
        t0 = trio.current_time()
        with trio.fail_after(10), pytest.raises(DataPlaneError, match="stalled"):
            await a.fetch(addr, [key(1, 12)])
        assert trio.current_time() - t0 < 5
        assert a.store.statistics().pending_slots == 0 and a.store.statistics().dram_used_bytes == 0
        t0 = trio.current_time()
        with trio.move_on_after(0.2) as cs:
            await a.fetch(addr, [key(1, 12)])
        assert cs.cancelled_caught and trio.current_time() - t0 < 1.2  # well before io_timeout_s
        assert a.store.statistics().pending_slots == 0 and a.store.statistics().dram_used_bytes == 0
        assert a.statistics().connections_open == 0
        n.cancel_scope.cancel()


async def test_a_failing_or_cancelled_hand_on_never_breaks_the_transfer(tmp_path: Path) -> None:
    """``on_stored`` raising, or the fetch being cancelled while the receive thread still lands
    blocks, must neither crash the Trio run nor lose what arrived whole."""
    async with planes(tmp_path, config(), config()) as ((a, _), (b, addr_b)):
        keys = [key(i, 31) for i in range(12)]
        for i, k in enumerate(keys):
            await put(b.store, k, payload(1 << 20, i))

        async def boom(ks: list[bytes]) -> None:
            raise RuntimeError("a consumer bug")

        assert await a.fetch(addr_b, keys, boom) == [True] * 12  # logged, the fetch goes on
        for k in keys:
            assert await read(a.store, k) is not None
        await a.store.delete(keys)

        async def stuck(ks: list[bytes]) -> None:
            await trio.sleep_forever()

        with trio.move_on_after(0.002):
            await a.fetch(addr_b, keys, stuck)
        await eventually(lambda: a.store.statistics().pending_slots == 0)
        # whatever landed whole is stored and correct; the rest is a miss, never garbage
        for i, k in enumerate(keys):
            got = await read(a.store, k)
            assert got is None or got == payload(1 << 20, i)
        assert await a.fetch(addr_b, keys) == [True] * 12  # and the plane still works
