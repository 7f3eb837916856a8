"""The LMCache multi-process (MP) mode L2 adapter, against the real lmcache package and a real daemon.

LMCache builds the adapter itself: its ``--l2-adapter`` parser reads the ``plugin`` entry, finds
``MemkvL2AdapterConfig`` by name, and its factory checks the class is an ``L2AdapterInterface``
and constructs it. The tests then drive the non-blocking interface as LMCache's L2 controllers do
(submit, wait on the operation's event fd, pop or query the result), and run LMCache's own
``test_l2_adapter`` check mode against it. Without lmcache these tests skip, saying so, unless
``MEMKV_REQUIRE_LMCACHE=1`` (set by ``scripts/test`` for its LMCache stage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import select
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,  # real daemon subprocesses
    pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated"),
]

MODULE = "memkv_mesh.integrations.lmcache_mp"
N = 1024  # float32 elements per object: 4 KiB


@pytest.fixture
def node(daemon_process: Any) -> Any:
    return daemon_process("mp", store={"dram_bytes": 32 << 20, "max_block_bytes": 4 << 20})


def _spec(sock: str, **params: Any) -> str:
    return json.dumps({"type": "plugin", "module_path": MODULE, "class_name": "MemkvL2Adapter",
                       "adapter_params": {"socket": sock, **params}})  # fmt: skip


def _adapter(sock: str, **params: Any) -> Any:
    """Build the adapter the way LMCache's MP server does: parse ``--l2-adapter``, then the factory."""
    from lmcache.v1.distributed.l2_adapters import create_l2_adapter
    from lmcache.v1.distributed.l2_adapters.config import (
        add_l2_adapters_args,
        parse_args_to_l2_adapters_config,
    )

    parser = add_l2_adapters_args(argparse.ArgumentParser())
    cfg = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", _spec(sock, **params)]))
    assert len(cfg.adapters) == 1
    return create_l2_adapter(cfg.adapters[0])


def _key(i: int, salt: str = "", model: str = "tiny-llama") -> Any:
    from lmcache.v1.distributed.api import ObjectKey

    return ObjectKey(chunk_hash=(0xC0FFEE00 + i).to_bytes(16, "big"), model_name=model, kv_rank=0, cache_salt=salt)


def _obj(seed: int | None, n: int = N) -> Any:
    """A CPU ``TensorMemoryObj`` as LMCache's L1 hands out: random data, or zeros (a load buffer)."""
    import torch
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    if seed is None:
        raw = torch.zeros(n, dtype=torch.float32)
    else:
        raw = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    meta = MemoryObjMetadata(shape=torch.Size([n]), dtype=torch.float32, address=raw.data_ptr(),
                             phy_size=n * 4, fmt=MemoryFormat.KV_2LTD, ref_count=1)  # fmt: skip
    return TensorMemoryObj(raw, meta, parent_allocator=None)


def _wait(fd: int) -> None:
    from lmcache.v1.platform import consume_fd

    poll = select.poll()
    poll.register(fd, select.POLLIN)
    assert poll.poll(20_000), "the adapter never signalled its event fd"
    consume_fd(fd)


def _store(ad: Any, keys: list[Any], objs: list[Any]) -> Any:
    tid = ad.submit_store_task(keys, objs)
    _wait(ad.get_store_event_fd())
    done = ad.pop_completed_store_tasks()
    assert tid in done
    return done[tid]


def _bits(bitmap: Any, n: int) -> list[bool]:
    return [bool(bitmap.test(i)) for i in range(n)]


def _lookup(ad: Any, keys: list[Any]) -> list[bool]:
    tid = ad.submit_lookup_and_lock_task(keys, {})
    _wait(ad.get_lookup_and_lock_event_fd())
    bitmap = ad.query_lookup_and_lock_result(tid)
    assert bitmap is not None
    assert ad.query_lookup_and_lock_result(tid) is None  # a result is handed out once
    ad.submit_unlock(keys)
    return _bits(bitmap, len(keys))


def _load(ad: Any, keys: list[Any], bufs: list[Any]) -> list[bool]:
    tid = ad.submit_load_task(keys, bufs)
    _wait(ad.get_load_event_fd())
    bitmap = ad.query_load_result(tid)
    assert bitmap is not None and ad.query_load_result(tid) is None
    return _bits(bitmap, len(keys))


def test_lmcache_builds_the_adapter_from_its_plugin_entry(lmc: Any, node: Any) -> None:
    from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface

    from memkv_mesh.integrations.lmcache_mp import MemkvL2Adapter, MemkvL2AdapterConfig

    ad = _adapter(str(node.sock), tenant="t1", num_workers=3)
    try:
        assert type(ad) is MemkvL2Adapter and isinstance(ad, L2AdapterInterface)
        assert isinstance(ad.config, MemkvL2AdapterConfig)
        assert (ad.config.tenant, ad.config.num_workers, str(ad.socket_path)) == ("t1", 3, str(node.sock))
        fds = {ad.get_store_event_fd(), ad.get_lookup_and_lock_event_fd(), ad.get_load_event_fd()}
        assert len(fds) == 3  # LMCache's controllers route completions by fd
        assert not ad.supports_global_eviction  # the daemon evicts by itself
        status = ad.report_status()
        assert status["is_healthy"] is True and status["node_id"] == ad.client.node_id
    finally:
        ad.close()
        ad.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ad.submit_lookup_and_lock_task([_key(0)], {})

    for bad, msg in [({"num_workers": 0}, "num_workers must be a positive integer"),
                     ({"tenant": 5}, "tenant must be a string"),
                     ({"sokcet": "/x"}, "unknown memkv L2 adapter field")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            _adapter(str(node.sock), **bad)


def test_l2_adapter_store_lookup_load_round_trip(lmc: Any, node: Any) -> None:
    import torch

    ad = _adapter(str(node.sock))
    try:
        keys = [_key(i) for i in range(4)]
        objs = [_obj(i) for i in range(4)]
        absent = _key(99)
        assert _lookup(ad, keys) == [False] * 4

        res = _store(ad, keys[:3], objs[:3])
        assert res.is_successful() and res.bytes_transferred() == 3 * N * 4
        res = _store(ad, keys, objs)  # the first three are in the mesh already: only one is copied
        assert res.is_successful() and res.bytes_transferred() == N * 4
        assert ad.get_usage().total_bytes_used == 4 * N * 4

        assert _lookup(ad, [keys[0], keys[1], absent, keys[2], keys[3]]) == [True, True, False, True, True]

        bufs = [_obj(None) for _ in range(5)]
        hit = _load(ad, [keys[2], absent, keys[0], keys[3], keys[1]], bufs)
        assert hit == [True, False, True, True, True]
        for b, want in zip([bufs[0], bufs[2], bufs[3], bufs[4]], [objs[2], objs[0], objs[3], objs[1]], strict=True):
            assert torch.equal(b.tensor, want.tensor)
        assert torch.count_nonzero(bufs[1].tensor) == 0  # a miss leaves its buffer alone

        # A buffer of another size than the stored chunk: a miss, never a partial or overlong copy.
        small, big = _obj(None, N // 2), _obj(None, 2 * N)
        assert _load(ad, [keys[0], keys[0]], [small, big]) == [False, False]
        assert torch.count_nonzero(small.tensor) == 0 and torch.count_nonzero(big.tensor) == 0

        # Several tasks in flight at once, completed in any order, each result handed out once.
        tids = [ad.submit_lookup_and_lock_task([keys[i % 4], absent], {}) for i in range(6)]
        got: dict[int, list[bool]] = {}
        while len(got) < len(tids):
            _wait(ad.get_lookup_and_lock_event_fd())
            for t in tids:
                if t not in got and (b := ad.query_lookup_and_lock_result(t)) is not None:
                    got[t] = _bits(b, 2)
        assert all(v == [True, False] for v in got.values())

        ad.delete([keys[1], absent])
        assert _lookup(ad, keys) == [True, False, True, True]
        assert ad.get_usage().total_bytes_used == 3 * N * 4
        assert _load(ad, [keys[1]], [_obj(None)]) == [False]
    finally:
        ad.close()


def test_l2_adapter_keys_are_shared_across_processes_and_scoped(lmc: Any, node: Any) -> None:
    """Two cache servers on one node (two adapters, two clients) see one store; a tenant, a salt,
    a rank or a model name keeps chunks apart."""
    import torch

    from memkv_mesh.integrations.lmcache_mp import object_key_name

    a, b, other = _adapter(str(node.sock)), _adapter(str(node.sock)), _adapter(str(node.sock), tenant="other")
    try:
        obj = _obj(5)
        assert _store(a, [_key(1, salt="alice")], [obj]).is_successful()
        buf = _obj(None)
        assert _load(b, [_key(1, salt="alice")], [buf]) == [True] and torch.equal(buf.tensor, obj.tensor)
        assert _lookup(b, [_key(1), _key(1, salt="bob"), _key(1, salt="alice", model="m2")]) == [False] * 3
        assert _lookup(other, [_key(1, salt="alice")]) == [False]
        assert object_key_name(_key(1, salt="alice")) == "tiny-llama@00000000@0@" + (0xC0FFEE01).to_bytes(16, "big").hex() + "@alice"
        # The name is what the in-process plugin's ChunkStore hashes: the same 32-byte key.
        assert a.client.contains([a.store.key(object_key_name(_key(1, salt="alice")))]) == [True]
    finally:
        for ad in (a, b, other):
            ad.close()


def test_lmcache_own_l2_adapter_check_passes(lmc: Any, node: Any) -> None:
    """LMCache's ``python -m lmcache.v1.basic_check --mode test_l2_adapter`` check, in-process."""
    from lmcache.v1.check.check_mode_test_l2_adapter import run_test_mode

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(run_test_mode("tiny-llama", l2_adapter=[_spec(str(node.sock))], num_keys=6))
    text = out.getvalue()
    assert "Test Failed" not in text and "FAIL" not in text, text
    assert "=== Testing L2 adapter #0 (MemkvL2Adapter) ===" in text, text
    for line in ("6/6 correctly absent", "Batch store OK", "Validation: 6/6 found",
                 "Validation (loaded): 6/6", "Validation (content): 6/6"):  # fmt: skip
        assert line in text, text


def test_l2_adapter_reports_a_missing_daemon(lmc: Any, tmp_path: Any) -> None:
    with pytest.raises(ConnectionError, match="cannot connect to the memkv-mesh daemon"):
        _adapter(str(tmp_path / "nothing.sock"))


def test_l2_adapter_failed_store_is_a_failed_task(lmc: Any, daemon_process: Any) -> None:
    """A store the daemon refuses (a block over its size limit) fails the task; nothing is stored."""
    tiny = daemon_process("tiny", store={"dram_bytes": 8 << 20, "max_block_bytes": 64 << 10})
    ad = _adapter(str(tiny.sock))
    try:
        res = _store(ad, [_key(0), _key(1)], [_obj(0), _obj(1, n=64 << 10)])  # 4 KiB and 256 KiB
        assert not res.is_successful() and res.bytes_transferred() == 0
        assert ad.get_usage().total_bytes_used == 0
        assert _store(ad, [_key(0)], [_obj(0)]).is_successful()
        assert _lookup(ad, [_key(0), _key(1)]) == [True, False]
    finally:
        ad.close()


def test_lmcache_storage_manager_writes_through_and_restores_from_the_mesh(lmc: Any, node: Any) -> None:
    """LMCache's own MP-mode ``StorageManager`` (built from the cache server's arguments) writes
    chunks through its L2 store controller into memkv-mesh; a second, empty ``StorageManager`` (a
    second cache server) prefetches them from memkv-mesh into its L1 through its prefetch
    controller, and the bytes are the ones written."""
    import time

    import torch
    from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, PrefetchTaskSpec
    from lmcache.v1.distributed.config import add_storage_manager_args, parse_args_to_config
    from lmcache.v1.distributed.storage_manager import StorageManager

    from memkv_mesh.integrations.chunk_store import ChunkStore
    from memkv_mesh.integrations.lmcache_mp import object_key_name

    def manager() -> Any:
        parser = add_storage_manager_args(argparse.ArgumentParser())
        args = parser.parse_args(["--l1-size-gb", "0.02", "--eviction-policy", "LRU", "--l2-adapter", _spec(str(node.sock))])
        return StorageManager(parse_args_to_config(args))

    layout = MemoryLayoutDesc(shapes=[torch.Size([N])], dtypes=[torch.float32])
    keys = [_key(i) for i in range(4)]
    want = [_obj(i).tensor.clone() for i in range(4)]
    writer = manager()
    try:
        objs = writer.reserve_write(keys, layout)
        assert set(objs) == set(keys)
        for k, w in zip(keys, want, strict=True):
            objs[k].tensor.view(-1).copy_(w)
        writer.finish_write(keys)
        with node.client() as c:
            mesh_keys = [ChunkStore(c).key(object_key_name(k)) for k in keys]
            deadline = time.monotonic() + 20
            while not all(c.contains(mesh_keys)):
                assert time.monotonic() < deadline, "LMCache's store controller never wrote the chunks to memkv-mesh"
                time.sleep(0.05)
    finally:
        writer.close()

    reader = manager()
    try:
        spec = PrefetchTaskSpec(key_groups=[GroupedObjectKeys(keys=keys + [_key(99)], object_group_id=0, layout_desc=layout)])
        handle = reader.submit_prefetch_task(spec)
        assert reader.wait_prefetch_status(handle, 20)
        res = reader.query_prefetch_status(handle)
        assert res is not None
        assert _bits(res.l2_hit_cells[0], 5) == [True] * 4 + [False]
        assert _bits(res.l1_hit_cells[0], 5) == [False] * 5
        with reader.read_prefetched_results(keys, res.l1_owners) as got:
            assert got is not None
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g.tensor.view(-1), w)
    finally:
        reader.close()


def test_l2_lookup_and_lock_pins_chunks_until_unlocked(lmc: Any, daemon_process: Any) -> None:
    """A locked chunk survives a daemon that evicts everything else; unlocked, it is evicted too."""
    import torch

    from memkv_mesh.integrations.lmcache_mp import object_key_name

    # LRU: without its lock, the oldest chunk would be the first to go.
    small = daemon_process("pin", store={"dram_bytes": 8 << 20, "max_block_bytes": 2 << 20, "eviction": "lru"})
    ad = _adapter(str(small.sock))
    m = 1 << 18  # float32 elements: 1 MiB chunks

    def resident(key: Any) -> bool:
        return bool(ad.client.contains([ad.store.key(object_key_name(key))])[0])

    def churn(base: int) -> None:  # 24 MiB through an 8 MiB store
        for i in range(24):
            assert _store(ad, [_key(base + i)], [_obj(base + i, n=m)]).is_successful()

    try:
        k0 = _key(0)
        want = _obj(0, n=m)
        assert _store(ad, [k0], [want]).is_successful()
        tid = ad.submit_lookup_and_lock_task([k0, _key(1), k0], {})  # k0 locked twice
        _wait(ad.get_lookup_and_lock_event_fd())
        assert _bits(ad.query_lookup_and_lock_result(tid), 3) == [True, False, True]
        assert ad.locked_keys() == 1 and ad.report_status()["locked_keys"] == 1

        churn(100)
        assert resident(k0) and not resident(_key(100))  # the others were evicted, k0 was not
        buf = _obj(None, n=m)
        assert _load(ad, [k0], [buf]) == [True] and torch.equal(buf.tensor, want.tensor)

        ad.submit_unlock([k0, _key(1), _key(2)])  # one of two locks; keys without a lock: nothing
        assert ad.locked_keys() == 1
        churn(200)
        assert resident(k0)
        ad.submit_unlock([k0])
        assert ad.locked_keys() == 0
        churn(300)
        assert not resident(k0)
        ad.submit_unlock([k0])  # unlocking again does nothing
    finally:
        ad.close()
