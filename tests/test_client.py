"""The local clients against an in-process daemon (AsyncClient) and a subprocess daemon (Client)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import trio
import trio.lowlevel

from memkv_mesh.client import AsyncClient, MemkvError


def _keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


async def test_put_get_lookup_delete(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        keys = _keys(5)
        vals = [os.urandom(100_000 + i) for i in range(5)]
        assert await c.put_many(keys, vals) == 5
        assert await c.put_many(keys, vals) == 0  # already stored: no copy, no new block
        assert await c.lookup(keys) == 5
        assert await c.lookup(keys[:2] + _keys(1) + keys[3:]) == 2
        assert await c.contains([keys[0], _keys(1)[0]]) == [True, False]
        bufs = [bytearray(200_000) for _ in keys]
        assert await c.get_many_into(keys, bufs) == [len(v) for v in vals]
        assert all(bytes(b[: len(v)]) == v for b, v in zip(bufs, vals, strict=True))
        packed = bytearray(sum(map(len, vals)))
        assert await c.get_many_into(keys, packed) == [len(v) for v in vals]
        assert bytes(packed) == b"".join(vals)
        lease = await c.get(keys[1])
        assert lease is not None and bytes(lease.view) == vals[1]
        assert lease.view.readonly
        await c.release(lease)
        assert await c.delete(keys[1]) == 1
        assert await c.get(keys[1]) is None
        assert await c.lookup(keys) == 1
        st = await c.stats()
        assert st["store"]["puts"] == 5 and st["store"]["deletes"] == 1
        assert st["store"]["active_leases"] == 0


async def test_async_large_copies_run_in_threads(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        keys = _keys(3)
        vals = [np.random.default_rng(i).integers(0, 255, 3 << 20, dtype=np.uint8) for i in range(3)]
        assert await c.put_many(keys, vals) == 3
        out = np.empty(9 << 20, dtype=np.uint8)
        assert await c.get_many_into(keys, out) == [3 << 20] * 3
        assert np.array_equal(out, np.concatenate(vals))


async def test_lease_pins_block_against_delete_until_released(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        (k,) = _keys(1)
        await c.put(k, b"a" * 8192)
        lease = await c.get(k)
        assert lease is not None
        assert await c.delete(k) == 1
        # The deleted block's bytes stay intact while leased: its extent is not reused.
        await c.put(_keys(1)[0], b"b" * 8192)
        assert bytes(lease.view) == b"a" * 8192
        await c.release(lease)
        assert (await c.stats())["store"]["active_leases"] == 0


async def test_client_errors_are_clear(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        with pytest.raises(ValueError, match="key 0 is 5 bytes"):
            await c.lookup([b"short"])
        with pytest.raises(ValueError, match="2 keys but 1 values"):
            await c.put_many(_keys(2), [b"x"])
        with pytest.raises(ValueError, match="limit"):
            await c.put(_keys(1)[0], bytes(9 << 20))
        with pytest.raises(ValueError, match="empty"):
            await c.put(_keys(1)[0], b"")
        with pytest.raises(TypeError, match="buffer protocol"):
            await c.put(_keys(1)[0], "text")  # type: ignore[arg-type]
        k = _keys(1)
        await c.put(k[0], b"z" * 100)
        with pytest.raises(ValueError, match="buffer 0 holds 10 bytes"):
            await c.get_many_into(k, [bytearray(10)])
        # The failed copy still released its lease.
        assert (await c.stats())["store"]["active_leases"] == 0


async def test_connect_to_missing_socket_is_clear(tmp_path) -> None:
    with pytest.raises(ConnectionError, match="is `memkv-mesh daemon` running"):
        await AsyncClient.connect(tmp_path / "nope.sock")


def test_sync_client_threads_share_one_connection(daemon_process) -> None:
    d = daemon_process()
    with d.client() as c:
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            try:
                rng = np.random.default_rng(seed)
                for _ in range(20):
                    keys = _keys(4)
                    vals = [rng.integers(0, 255, 65536, dtype=np.uint8) for _ in keys]
                    assert c.put_many(keys, vals) == 4
                    out = [np.empty(65536, dtype=np.uint8) for _ in keys]
                    assert c.get_many_into(keys, out) == [65536] * 4
                    assert all(np.array_equal(a, b) for a, b in zip(out, vals, strict=True))
                    with c.get_many(keys) as lease:
                        assert all(bytes(v) == a.tobytes() for v, a in zip(lease.views, vals, strict=True))
                    assert c.delete(keys) == 4
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        st = c.stats()["store"]
        assert st["active_leases"] == 0 and st["pending_slots"] == 0 and st["dram_blocks"] == 0


def test_sync_client_full_store_is_an_error_and_keeps_data(daemon_process) -> None:
    d = daemon_process(store={"dram_bytes": 4 << 20, "max_block_bytes": 1 << 20})
    with d.client() as c:
        keys = _keys(3)
        assert c.put_many(keys, [bytes([i]) * (1 << 20) for i in range(3)]) == 3
        lease = c.get_many(keys)  # pin everything
        with pytest.raises(MemkvError) as ei:
            c.put_many(_keys(2), [b"q" * (1 << 20)] * 2)
        assert ei.value.code == "full"
        assert [bytes(v[:1]) for v in lease.views if v is not None] == [b"\x00", b"\x01", b"\x02"]
        lease.release()
        # Unpinned, the oldest block is evicted (no NVMe tier: dropped) to make room.
        assert c.put_many(_keys(2), [b"q" * (1 << 20)] * 2) == 2
        assert c.stats()["store"]["dram_drops"] >= 1


async def test_trio_cancellation_mid_put_leaves_no_slots(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        with trio.move_on_after(0):
            await c.put_many(_keys(2), [b"x" * 4096] * 2)
        st = await c.stats()
        assert st["store"]["pending_slots"] == 0


async def test_cancel_mid_request_closes_the_connection_cleanly(daemon) -> None:
    c = await AsyncClient.connect(daemon.socket_path)
    keys = _keys(3)
    await c.put_many(keys, [b"v" * 4096] * 3)
    with trio.CancelScope() as scope:
        # Cancel while the Get is in flight (after it was sent, before the reply is read).
        async def cancel_soon() -> None:
            await trio.lowlevel.checkpoint()
            scope.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(cancel_soon)
            for _ in range(1000):
                await c.get_many_into(keys, [bytearray(4096)] * 3)
    # Either the cancel landed mid-request (the client closed itself: a stale reply can never
    # answer a later request) or between requests (the client still works and stays in step).
    try:
        assert await c.lookup(keys) == 3
        assert await c.get_many_into(keys, [bytearray(4096)] * 3) == [4096] * 3
    except ConnectionError as e:
        assert "closed" in str(e)
    await c.aclose()
    async with await AsyncClient.connect(daemon.socket_path) as c2:
        # The daemon frees the closed connection's lease when its handler sees EOF.
        with trio.fail_after(5):
            leases = (await c2.stats())["store"]["active_leases"]
            while leases:  # noqa: ASYNC110 - polling another process's state
                await trio.sleep(0.01)
                leases = (await c2.stats())["store"]["active_leases"]
        assert await c2.lookup(keys) == 3


async def test_puts_are_hashed_by_the_daemon_unless_the_node_trusts_its_clients(make_config) -> None:
    """[store] verify_puts: on (the default) the daemon records the hash of the bytes in the slot
    and refuses a commit whose checksums lie; off, the client sends its own (asked to by the
    Welcome) and the daemon records them as given, so only a verifying read catches a lie."""
    from memkv_mesh.daemon import Daemon

    for verify in (True, False):
        cfg = make_config(store={"dram_bytes": 8 << 20, "max_block_bytes": 1 << 20, "verify_puts": verify})
        async with trio.open_nursery() as nursery:
            d = await nursery.start(Daemon(cfg).run)
            async with await AsyncClient.connect(d.socket_path) as honest:
                assert honest.checksum is (not verify)  # asked for checksums only when trusted
                k, v = os.urandom(32), os.urandom(4096)
                assert await honest.put(k, v)
                buf = bytearray(4096)
                assert await honest.get_into(k, buf, verify=True) == 4096 and bytes(buf) == v
            async with await AsyncClient.connect(d.socket_path, checksum=True) as liar:
                liar._fill = lambda offsets, keys, values: (keys, [7] * len(keys))  # type: ignore[method-assign]
                k = os.urandom(32)
                if verify:
                    with pytest.raises(MemkvError) as e:
                        await liar.put(k, os.urandom(4096))
                    assert e.value.code == "bad_checksum"
                    assert await liar.contains([k]) == [False]
                else:
                    assert await liar.put(k, os.urandom(4096))  # trusted: recorded as given
                    assert await liar.get_into(k, bytearray(4096), verify=True) is None  # and caught on read
                    assert liar.corrupt_reads == 1
            nursery.cancel_scope.cancel()


def test_lists_of_buffers_gather_puts_and_scatter_gets(daemon_process) -> None:
    """A value given as a list of buffers is one block (gathered in order); a get buffer given as
    a list receives the block scattered in order (a shorter block fills the first bytes); both
    with and without client checksums and verifying reads, for the sync and async clients."""
    from memkv_mesh.client import Client

    rng = np.random.default_rng(7)
    for trusted in (False, True):
        d = daemon_process(store={"dram_bytes": 32 << 20, "max_block_bytes": 4 << 20, "verify_puts": not trusted})
        with Client(d.sock, checksum=trusted) as c:
            parts = [[rng.integers(0, 255, n, dtype=np.uint8) for n in (3000, 1, 70_000)] for _ in range(3)]
            whole = [np.concatenate(p) for p in parts]
            keys = _keys(3)
            # A mix: two gathered values and one plain buffer (a tuple counts as a list).
            assert c.put_many(keys, [parts[0], tuple(parts[1]), whole[2]]) == 3
            with c.get_many(keys) as lease:  # stored as the concatenation
                assert [bytes(v) for v in lease.views] == [w.tobytes() for w in whole]
            for verify in (False, True):
                outs = [[np.zeros(n, dtype=np.uint8) for n in (10, 73_000)] for _ in keys]  # room to spare
                plain = np.zeros(80_000, dtype=np.uint8)
                got = c.get_many_into(keys + [os.urandom(32)], [outs[0], outs[1], plain, [np.zeros(4)]], verify=verify)
                assert got == [73_001, 73_001, 73_001, None]
                for out, w in zip(outs[:2], whole, strict=False):
                    assert out[0].tobytes() == w[:10].tobytes() and out[1][:72_991].tobytes() == w[10:].tobytes()
                    assert not out[1][72_991:].any()  # past the block: untouched
                assert plain[:73_001].tobytes() == whole[2].tobytes()
            # Too little room across the parts is an error naming the buffer, and nothing is lost.
            with pytest.raises(ValueError, match="buffer 0 holds 73000 bytes"):
                c.get_many_into(keys[:1], [[np.zeros(3000, dtype=np.uint8), np.zeros(70_000, dtype=np.uint8)]])
            assert c.lookup(keys) == 3
            with pytest.raises(ValueError, match="value 0 is an empty list"):
                c.put_many(_keys(1), [[]])
            with pytest.raises(TypeError, match="value 0 .*str.* buffer protocol"):
                c.put_many(_keys(1), [[b"ok", "not bytes"]])
            st = c.stats()["store"]
            assert st["active_leases"] == 0 and st["pending_slots"] == 0
        d.stop()


async def test_async_client_scatters_and_gathers(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        (k,) = _keys(1)
        a, b = os.urandom(5000), os.urandom(9000)
        assert await c.put_many([k], [[a, bytearray(b)]]) == 1
        x, y = bytearray(5000), bytearray(9000)
        assert await c.get_many_into([k], [[x, y]]) == [14_000]
        assert bytes(x) == a and bytes(y) == b
