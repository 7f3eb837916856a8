"""The store over a segmented arena: per-tenant quotas, and blocks relocated into the reader's
segment (a replica or fetch lands in ``_mesh``; a tenant reads it from its own segment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import xxhash

from memkv_mesh.arena import Arena
from memkv_mesh.store import BlockStore

MiB = 1 << 20
MESH, A, B = 0, 1, 2


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    arena = Arena(tmp_path / "arena", [("_mesh", 4 * MiB), ("a", 4 * MiB), ("b", 4 * MiB)], preallocate=False)
    arena.open()
    yield BlockStore(arena, max_block_bytes=2 * MiB)
    arena.close()


async def _put(store: BlockStore, owner: object, key: bytes, data: bytes, segment: int) -> int:
    (off,) = await store.alloc(owner, [key], [len(data)], segment)
    with store.arena.slice(off, len(data)) as v:
        v[:] = data
    sums = await store.pending_checksums(owner, [key])
    assert sums == [xxhash.xxh3_64_intdigest(data)]
    assert store.commit(owner, [key], sums) == 1
    return off


def _in(store: BlockStore, segment: int, off: int) -> bool:
    seg = store.arena.segments[segment]
    return seg.base <= off < seg.base + seg.size


async def test_allocations_land_in_the_segment_asked_for(store: BlockStore) -> None:
    for seg in (MESH, A, B):
        off = await _put(store, "c", os.urandom(32), os.urandom(4096), seg)
        assert _in(store, seg, off)
    st = store.statistics()
    assert [s.name for s in st.segments] == ["_mesh", "a", "b"] and all(s.blocks == 1 for s in st.segments)


async def test_a_tenant_filling_its_segment_evicts_only_its_own_blocks(store: BlockStore) -> None:
    b_keys = [os.urandom(32) for _ in range(2)]
    for k in b_keys:
        await _put(store, "b", k, os.urandom(MiB), B)
    for _ in range(12):  # 12 MiB through a 4 MiB segment
        await _put(store, "a", os.urandom(32), os.urandom(MiB), A)
    assert store.contains(b_keys) == [True, True]
    st = {s.name: s for s in store.statistics().segments}
    assert st["a"].used_bytes <= 4 * MiB and st["b"].blocks == 2


async def test_a_get_relocates_a_block_into_the_readers_segment(store: BlockStore) -> None:
    key, data = os.urandom(32), os.urandom(256 * 1024)
    first = await _put(store, "dataplane", key, data, MESH)  # a replica pushed here
    assert store.mark_dirty([key]) == [len(data)]  # and not yet on its owners
    lease, [loc] = await store.get("reader", [key], segment=A)
    assert loc is not None and _in(store, A, loc[0])
    with store.arena.slice(*loc) as v:
        assert bytes(v) == data
    assert store.dirty_bytes == len(data)  # still dirty, counted once
    assert store.dram_checksum(key, loc[0]) == xxhash.xxh3_64_intdigest(data)
    st = store.statistics()
    assert st.relocations == 1 and st.dram_blocks == 1
    assert {s.name: s.used_bytes for s in st.segments}["_mesh"] == 0  # the old extent is free
    store.release("reader", lease)
    lease2, [loc2] = await store.get("reader", [key], segment=A)  # already there: no second copy
    assert loc2 == loc and store.statistics().relocations == 1
    store.release("reader", lease2)
    _, [anywhere] = await store.get("dataplane", [key])  # the data plane takes it where it is
    assert anywhere == loc
    assert first != loc[0]


async def test_a_block_pinned_in_the_mesh_segment_is_freed_at_its_last_unpin(store: BlockStore) -> None:
    key, data = os.urandom(32), os.urandom(64 * 1024)
    await _put(store, "dataplane", key, data, MESH)
    pin, _ = await store.get("sender", [key])  # the data plane is sending it to a peer
    lease, [loc] = await store.get("reader", [key], segment=B)
    assert loc is not None and _in(store, B, loc[0])
    used = {s.name: s.used_bytes for s in store.statistics().segments}
    assert used["_mesh"] > 0  # still pinned by the sender
    store.release("sender", pin)
    assert {s.name: s.used_bytes for s in store.statistics().segments}["_mesh"] == 0
    store.release("reader", lease)


async def test_a_block_deleted_while_it_is_relocated_is_a_miss(store: BlockStore, monkeypatch) -> None:
    key, data = os.urandom(32), os.urandom(MiB + 4096)  # over 1 MiB: copied in a worker thread
    await _put(store, "dataplane", key, data, MESH)
    real = trio.to_thread.run_sync

    async def slow_copy(fn, *args, **kw):  # the delete lands while the copy runs
        await store.delete([key])
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", slow_copy)
    lease, [loc] = await store.get("reader", [key], segment=A)
    monkeypatch.setattr(trio.to_thread, "run_sync", real)
    assert loc is None and lease == 0
    assert all(s.used_bytes == 0 for s in store.statistics().segments)
