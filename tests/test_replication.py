"""The write path (issue 10): dirty blocks are never evicted, replication runs in arrival order to
all owners at once, a stopped owner costs only its share, a death re-places it, and puts feel
back-pressure at the dirty bound instead of blocks being lost.

The store is real (a small arena); the data plane and the ring are fakes; time is Trio's autojump
clock, so the timeouts and back-offs cost no wall time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_dataplane_helpers import make_store, payload, put, read

from memkv_mesh.placement import Candidate, Rendezvous
from memkv_mesh.replication import Replicator
from memkv_mesh.store import BlockStore, StoreError

SIZE = 64 << 10


class _Plane:
    """A data plane whose owners can be stopped (pushes hang), fail, or refuse blocks."""

    def __init__(self) -> None:
        self.held: dict[str, list[bytes]] = {}
        self.stopped: set[str] = set()
        self.down: set[str] = set()
        self.refuse: set[str] = set()
        self.calls: list[str] = []

    async def push(
        self, peer: str, keys: list[bytes], *, fresh: bool = False, expect_node: str | None = None
    ) -> list[bool]:
        assert fresh  # the replicator's pushes are fresh puts (they override tombstones)
        self.calls.append(peer)
        await trio.sleep(0.01)
        if peer in self.stopped:
            await trio.sleep_forever()
        if peer in self.down:
            raise OSError(f"{peer} is unreachable")
        if peer in self.refuse:
            return [False] * len(keys)
        self.held.setdefault(peer, []).extend(keys)
        return [True] * len(keys)


class _Ring:
    def __init__(self, live: list[str]) -> None:
        self.live = live
        self.changed: Any = None

    def owners(self, keys: Sequence[bytes]) -> list[list[str]]:
        if not self.live:
            return [[] for _ in keys]
        return Rendezvous([Candidate(n) for n in self.live]).owners_many(keys, 2)

    def kill(self, node: str) -> None:
        self.live = [n for n in self.live if n != node]
        self.changed()


def _replicator(store: BlockStore, plane: _Plane, ring: _Ring, **kw: Any) -> tuple[Replicator, list[bytes]]:
    handed: list[bytes] = []
    r = Replicator(
        node_id="g", store=store, dataplane=plane, owners_of=ring.owners, addr_of=lambda n: n,
        give_up=handed.extend, limit_bytes=kw.pop("limit_bytes", 1 << 40), **kw,
    )  # fmt: skip
    ring.changed = r.ring_changed
    return r, handed


async def _put(store: BlockStore, r: Replicator, keys: list[bytes]) -> None:
    for i, k in enumerate(keys):
        await put(store, k, payload(SIZE, i))
    r.add(keys)


async def _drained(r: Replicator) -> None:
    while len(r):  # noqa: ASYNC110 - the workers change it; there is no event to wait on
        await trio.sleep(0.1)


def _keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


async def test_a_dirty_block_is_never_evicted_and_full_means_full(tmp_path: Path) -> None:
    store = make_store(tmp_path / "arena", size=8 * SIZE, max_block=SIZE)
    keys = _keys(12)
    for i, k in enumerate(keys[:8]):
        await put(store, k, payload(SIZE, i))
    assert store.mark_dirty(keys[:8]) == [SIZE] * 8
    assert store.dirty_bytes == 8 * SIZE and store.statistics().dirty_blocks == 8
    with pytest.raises(StoreError) as e:  # every block is dirty: nothing may go
        await put(store, keys[8], payload(SIZE, 8))
    assert e.value.code == "full" and "dirty" in e.value.message
    assert all([await read(store, k) == payload(SIZE, i) for i, k in enumerate(keys[:8])])
    store.mark_clean(keys[:4])  # the owners hold these now: they may be evicted
    for i, k in enumerate(keys[8:12], start=8):
        await put(store, k, payload(SIZE, i))
        store.mark_dirty([k])  # fresh puts are dirty too
    held = store.contains(keys)
    assert held[4:] == [True] * 8 and held[:4] == [False] * 4  # only clean blocks were evicted
    assert store.dirty_bytes == 8 * SIZE


async def test_a_deleted_dirty_block_stops_counting(tmp_path: Path) -> None:
    store = make_store(tmp_path / "arena", size=8 * SIZE, max_block=SIZE)
    k = os.urandom(32)
    await put(store, k, payload(SIZE, 0))
    store.mark_dirty([k])
    assert await store.delete([k]) == 1
    assert store.dirty_bytes == 0 and store.dirty_blocks == 0


async def test_replication_goes_to_all_owners_in_arrival_order(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b", "c"])
    r, _ = _replicator(store, plane, ring, batch_keys=4)
    keys = _keys(40)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, keys[:20])
        await _put(store, r, keys[20:])
        await _drained(r)
        nursery.cancel_scope.cancel()
    for node in ("a", "b", "c"):
        mine = [k for k in keys if node in ring.owners([k])[0]]
        assert plane.held[node] == mine  # every block it owns, in put order
    assert store.dirty_bytes == 0
    st = r.statistics()
    assert st.replicated == 80 and st.pending_blocks == 0 and st.lag_p99_s > 0


async def test_a_stopped_owner_costs_only_its_share_and_its_death_replaces_it(
    tmp_path: Path, autojump_clock: Any
) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b", "c", "d"])
    r, handed = _replicator(store, plane, ring, timeout_s=2.0)
    keys = _keys(60)
    plane.stopped = {"b"}  # SIGSTOP: pushes to b hang
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, keys)
        await trio.sleep(1.0)
        # Everything that does not need b is already clean; b's share is still dirty.
        need_b = {k for k in keys if "b" in ring.owners([k])[0]}
        assert need_b and {k for k in keys if r.pending(k)} == need_b
        for node in ("a", "c", "d"):
            assert set(plane.held.get(node, [])) == {k for k in keys if node in ring.owners([k])[0]}
        await trio.sleep(10.0)  # the push times out and is retried with back-off, still dirty
        assert {k for k in keys if r.pending(k)} == need_b
        assert store.dirty_bytes == len(need_b) * SIZE
        ring.kill("b")  # gossip confirms the death: b's share goes to the new owners
        await _drained(r)
        nursery.cancel_scope.cancel()
    for k in keys:
        for node in ring.owners([k])[0]:
            assert k in plane.held[node]
    assert r.statistics().replaced == len(need_b) and not handed


async def test_back_pressure_waits_then_refuses_busy(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b"])
    r, _ = _replicator(store, plane, ring, limit_bytes=8 * SIZE, put_wait_s=3.0)
    keys = _keys(12)
    plane.down = {"a", "b"}
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, keys[:8])
        assert store.dirty_bytes == 8 * SIZE
        t0 = trio.current_time()
        assert not await r.wait_room(4 * SIZE)  # the owners are unreachable: refused after put_wait_s
        assert trio.current_time() - t0 == pytest.approx(3.0)
        st = r.statistics()
        assert st.busy_rejections == 1 and st.backpressure_waits == 1

        async def later() -> None:
            await trio.sleep(2.0)
            plane.down = set()  # the owners come back: the dirty bytes drain

        nursery.start_soon(later)
        r.put_wait_s = 10.0  # longer than the back-off's 5 s cap
        assert await r.wait_room(4 * SIZE)  # waited, then admitted
        assert r.statistics().backpressure_waits == 2
        await _put(store, r, keys[8:])
        await _drained(r)
        nursery.cancel_scope.cancel()
    assert all([await read(store, k) is not None for k in keys])  # nothing was lost meanwhile
    assert r.statistics().dirty_peak_bytes >= 8 * SIZE


async def test_a_put_waits_if_its_own_bytes_would_cross_the_bound(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b"])
    r, _ = _replicator(store, plane, ring, limit_bytes=8 * SIZE, put_wait_s=1.0)
    assert await r.wait_room(20 * SIZE)  # nothing dirty: even a batch over the bound goes (alone)
    plane.down = {"a", "b"}
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, _keys(4))
        assert await r.wait_room(4 * SIZE)  # 4 + 4 fits
        assert not await r.wait_room(5 * SIZE)  # 4 + 5 would cross it: waits, then busy
        nursery.cancel_scope.cancel()


async def test_ack_replicated_waits_for_the_owners(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b"])
    r, _ = _replicator(store, plane, ring)
    keys = _keys(5)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        plane.stopped = {"a"}
        await _put(store, r, keys)
        assert await r.wait_replicated(keys, 1.0) == 5  # a is stopped: not confirmed in time
        plane.stopped = set()
        ring.kill("a")  # a dies; with one candidate left, b alone is the owner
        assert await r.wait_replicated(keys, 30.0) == 0
        nursery.cancel_scope.cancel()
    assert set(plane.held["b"]) == set(keys)


async def test_a_refusing_owner_is_given_up_on_and_handed_to_repair(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b"])
    r, handed = _replicator(store, plane, ring, max_refusals=3)
    keys = _keys(4)
    plane.refuse = {"a"}
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, keys)
        await _drained(r)
        nursery.cancel_scope.cancel()
    assert sorted(handed) == sorted(keys) and r.statistics().given_up == 4
    assert plane.calls.count("a") == 3 and set(plane.held["b"]) == set(keys)


async def test_no_candidate_means_unplaced_not_dirty_forever(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring([])
    r, handed = _replicator(store, plane, ring)
    keys = _keys(3)
    await _put(store, r, keys)
    assert not len(r) and store.dirty_bytes == 0 and handed == keys
    assert r.statistics().unplaced == 3


async def test_a_deleted_block_leaves_the_queues(tmp_path: Path, autojump_clock: Any) -> None:
    store, plane, ring = make_store(tmp_path / "arena"), _Plane(), _Ring(["a", "b"])
    r, _ = _replicator(store, plane, ring)
    keys = _keys(6)
    plane.down = {"a", "b"}
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await _put(store, r, keys)
        await store.delete(keys[:3])
        r.discard(keys[:3])
        plane.down = set()
        await _drained(r)
        nursery.cancel_scope.cancel()
    assert set(plane.held["a"]) | set(plane.held["b"]) == set(keys[3:])


# ---- write-through (a flash node's replicas go to NVMe before they are confirmed) -------------------


def _tiered_store(tmp_path: Path, fsync: str, dram_blocks: int = 8, nvme_blocks: int = 32) -> BlockStore:
    from memkv_mesh.arena import Arena
    from memkv_mesh.nvme import NvmeTier

    nvme = NvmeTier(tmp_path / "nvme", nvme_blocks * (SIZE + 4096), sync=fsync == "always")
    nvme.open()
    arena = Arena(tmp_path / "arena", dram_blocks * SIZE, preallocate=False)
    arena.open()
    return BlockStore(arena, max_block_bytes=SIZE, nvme=nvme, fsync=fsync)


@pytest.mark.parametrize("fsync", ["off", "batch", "always"])
async def test_persist_writes_through_and_a_reopened_tier_has_the_blocks(tmp_path: Path, fsync: str) -> None:
    from memkv_mesh.nvme import NvmeTier

    store = _tiered_store(tmp_path, fsync)
    keys = _keys(6)
    for i, k in enumerate(keys[:5]):
        await put(store, k, payload(SIZE, i))
    assert store.nvme is not None
    assert await store.persist([*keys[:5], keys[5]]) == [True] * 5 + [False]  # the 6th is not held
    assert await store.persist(keys[:2]) == [True, True]  # already there: nothing rewritten
    st = store.statistics()
    assert st.persisted == 5 and st.nvme_blocks == 5 and st.dram_blocks == 5
    assert store.nvme.statistics().syncs == (2 if fsync == "batch" else 0)
    store.nvme.close()  # as after a kill -9: the DRAM arena is gone, the tier reopens
    again = NvmeTier(tmp_path / "nvme", 32 * (SIZE + 4096))
    assert again.open().recovered == 5
    buf = bytearray(SIZE)
    assert [again.read_into(k, buf) == SIZE and bytes(buf) == payload(SIZE, i) for i, k in enumerate(keys[:5])] == [True] * 5
    again.close()


async def test_a_block_deleted_while_it_is_written_through_does_not_come_back(tmp_path: Path) -> None:
    store = _tiered_store(tmp_path, "off")
    k = os.urandom(32)
    await put(store, k, payload(SIZE, 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.persist, [k])
        await trio.testing.wait_all_tasks_blocked()  # the write is in its worker thread now
        await store.delete([k])
    assert not store.contains([k])[0]
    assert store.nvme is not None and k not in store.nvme
