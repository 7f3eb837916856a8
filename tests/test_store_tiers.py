"""DRAM -> NVMe -> dropped: eviction, promotion, corruption and restart recovery through the daemon."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from memkv_mesh.client import AsyncClient, MemkvError
from memkv_mesh.daemon import Daemon
from memkv_mesh.tenants import scope_keys

MiB = 1 << 20


def _keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def _vals(n: int, size: int = MiB) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def _tiered(make_config, dram: int = 8 * MiB, nvme: int = 16 * MiB, eviction: str = "lru"):
    return make_config(store={"dram_bytes": dram, "nvme_bytes": nvme, "max_block_bytes": 2 * MiB, "eviction": eviction})


async def test_dram_overflow_demotes_to_nvme_and_get_promotes(make_config) -> None:
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_tiered(make_config)).run)
        async with await AsyncClient.connect(d.socket_path) as c:
            keys, vals = _keys(12), _vals(12)  # 12 MiB into an 8 MiB arena
            for k, v in zip(keys, vals, strict=True):
                assert await c.put(k, v)
            st = (await c.stats())["store"]
            assert st["demotions"] >= 4 and st["dram_drops"] == 0
            assert st["dram_used_bytes"] <= 8 * MiB
            assert st["nvme_blocks"] >= 4
            assert await c.lookup(keys) == 12  # present in some tier
            buf = bytearray(MiB)
            for k, v in zip(keys, vals, strict=True):  # the oldest come back from NVMe
                assert await c.get_into(k, buf) == MiB
                assert bytes(buf) == v
            st = (await c.stats())["store"]
            assert st["hits_nvme"] >= 4 and st["misses"] == 0
        nursery.cancel_scope.cancel()


async def test_nvme_overflow_drops_oldest(make_config) -> None:
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_tiered(make_config, dram=4 * MiB, nvme=6 * MiB)).run)
        async with await AsyncClient.connect(d.socket_path) as c:
            keys, vals = _keys(16), _vals(16)
            for k, v in zip(keys, vals, strict=True):
                await c.put(k, v)
            st = (await c.stats())["store"]
            assert st["nvme_drops"] > 0
            assert st["nvme_used_bytes"] <= 6 * MiB
            # The newest blocks are all still readable; the dropped ones are misses, never garbage.
            assert await c.lookup(keys[-4:]) == 4
            buf = bytearray(MiB)
            for k, v in zip(keys, vals, strict=True):
                n = await c.get_into(k, buf)
                assert n is None or bytes(buf) == v
        nursery.cancel_scope.cancel()


async def test_delete_reaches_both_tiers(make_config) -> None:
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_tiered(make_config)).run)
        async with await AsyncClient.connect(d.socket_path) as c:
            keys = _keys(12)
            with pytest.raises(MemkvError, match="full"):  # a batch must fit the arena at once
                await c.put_many(keys, _vals(12))
            assert (await c.stats())["store"]["pending_slots"] == 0
            for k, v in zip(keys, _vals(12), strict=True):
                await c.put(k, v)
            assert await c.delete(keys) == 12
            assert await c.contains(keys) == [False] * 12
            st = (await c.stats())["store"]
            assert st["dram_blocks"] == 0 and st["nvme_blocks"] == 0
        nursery.cancel_scope.cancel()


def _corrupt_payload(nvme_dir: Path, needle: bytes) -> None:
    for f in sorted(nvme_dir.glob("blocks-*.dat")):
        data = f.read_bytes()
        i = data.find(needle)
        if i >= 0:
            with open(f, "r+b") as fh:
                fh.seek(i + 100)
                b = fh.read(1)
                fh.seek(i + 100)
                fh.write(bytes([b[0] ^ 0xFF]))
            return
    raise AssertionError("block not found in the data files")


def test_restart_recovers_nvme_and_drops_corrupt(daemon_process) -> None:
    d = daemon_process(store={"dram_bytes": 4 * MiB, "nvme_bytes": 32 * MiB, "max_block_bytes": 2 * MiB})
    keys, vals = _keys(10), _vals(10)
    with d.client() as c:
        assert c.put_many(keys[:4], vals[:4]) == 4
        for k, v in zip(keys[4:], vals[4:], strict=True):
            c.put(k, v)
    # Blocks still only in DRAM are lost with the process; blocks on NVMe survive it.
    d.stop()
    d.start()
    with d.client() as c:
        present = c.contains(keys)
        st = c.stats()
        assert st["nvme_recovery"]["recovered"] == sum(present) >= 6
        assert present[:6] == [True] * 6  # the first six were demoted by the later puts
        buf = bytearray(MiB)
        for k, v, p in zip(keys, vals, present, strict=True):
            if p:
                assert c.get_into(k, buf) == MiB and bytes(buf) == v
    d.stop()
    # Corrupt one block on disk: it is a miss, dropped and counted, never served.
    nvme_dir = Path(d.config_path).parent / "data" / "nvme"
    _corrupt_payload(nvme_dir, vals[1][:64])
    d.start()
    with d.client() as c:
        buf = bytearray(MiB)
        assert c.get_into(keys[1], buf) is None
        assert c.get_into(keys[0], buf) == MiB and bytes(buf) == vals[0]
        st = c.stats()["store"]
        assert st["corrupt_dropped"] == 1
        assert not c.contains([keys[1]])[0]


def test_restart_after_kill9_serves_only_verified_blocks(daemon_process) -> None:
    d = daemon_process(store={"dram_bytes": 2 * MiB, "nvme_bytes": 16 * MiB, "max_block_bytes": MiB})
    keys, vals = _keys(12), _vals(12, MiB // 2)
    with d.client() as c:
        c.put_many(keys[:4], vals[:4])
        for k, v in zip(keys[4:], vals[4:], strict=True):
            c.put(k, v)
    d.kill()
    d.start()
    with d.client() as c:
        buf = bytearray(MiB // 2)
        served = 0
        for k, v in zip(keys, vals, strict=True):
            n = c.get_into(k, buf)
            if n is not None:
                assert bytes(buf) == v
                served += 1
        assert served >= 8  # everything demoted before the kill


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
async def test_policies_work_end_to_end(make_config, policy: str) -> None:
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_tiered(make_config, eviction=policy)).run)
        async with await AsyncClient.connect(d.socket_path) as c:
            keys, vals = _keys(20), _vals(20, MiB // 2)
            for k, v in zip(keys, vals, strict=True):
                await c.put(k, v)
            buf = bytearray(MiB // 2)
            for k, v in zip(keys, vals, strict=True):
                if await c.get_into(k, buf) is not None:
                    assert bytes(buf) == v
            st = (await c.stats())["store"]
            assert st["dram_used_bytes"] <= 8 * MiB and st["nvme_used_bytes"] <= 16 * MiB
        nursery.cancel_scope.cancel()


async def test_listeners_hear_what_the_node_holds(make_config) -> None:
    added: list[bytes] = []
    removed: list[bytes] = []
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_tiered(make_config, dram=4 * MiB, nvme=6 * MiB)).run)
        d.store.on_added = added.extend
        d.store.on_removed = removed.extend
        async with await AsyncClient.connect(d.socket_path) as c:
            keys, vals = _keys(14), _vals(14)
            for k, v in zip(keys, vals, strict=True):
                await c.put(k, v)
            assert added == scope_keys(keys)  # each block announced once, demotions are not news
            held = set(added) - set(removed)
            assert held == {k for k, p in zip(scope_keys(keys), await c.contains(keys), strict=True) if p}
            assert removed  # 14 MiB into 4 + 6 MiB: some blocks left the node
            await c.delete(keys[-1])
            assert removed[-1] == scope_keys(keys[-1:])[0]
        nursery.cancel_scope.cancel()


async def test_kvikio_backend_without_kvikio_is_a_clear_start_error(make_config) -> None:
    import importlib.util

    if importlib.util.find_spec("kvikio") is not None:
        pytest.skip("kvikio is installed here")
    from memkv_mesh.daemon import DaemonError

    cfg = make_config(store={"dram_bytes": 8 * MiB, "nvme_bytes": 16 * MiB, "max_block_bytes": 2 * MiB,
                             "nvme_backend": "kvikio"})
    with pytest.raises(BaseException) as ei:  # noqa: PT011 - unwrapped below
        async with trio.open_nursery() as nursery:
            await nursery.start(Daemon(cfg).run)
    err = ei.value
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    assert isinstance(err, DaemonError)
    assert "kvikio" in str(err) and "memkv-mesh[gpu]" in str(err)
