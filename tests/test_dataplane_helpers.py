"""Shared helpers for the data-plane tests (no tests here): stores on tmp arenas, block puts, planes."""

from __future__ import annotations

import base64
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
import xxhash

from memkv_mesh.arena import Arena
from memkv_mesh.store import BlockStore
from transport.dataplane import DataPlane
from transport.dataplane_config import DataPlaneConfig

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()


def make_store(path: Path, size: int = 32 << 20, max_block: int = 8 << 20) -> BlockStore:
    arena = Arena(path, size, preallocate=False)
    arena.open()
    return BlockStore(arena, max_block_bytes=max_block)


def key(i: int, salt: int = 0) -> bytes:
    return xxhash.xxh3_128_digest(f"{salt}:{i}".encode()) * 2


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def put(store: BlockStore, k: bytes, data: bytes) -> None:
    owner = object()
    (off,) = await store.alloc(owner, [k], [len(data)])
    assert off >= 0
    with store.arena.slice(off, len(data)) as v:
        v[:] = data
    store.commit(owner, [k], [xxhash.xxh3_64_intdigest(data)])


async def read(store: BlockStore, k: bytes) -> bytes | None:
    owner = object()
    lease, locs = await store.get(owner, [k])
    try:
        if locs[0] is None:
            return None
        off, n = locs[0]
        with store.arena.slice(off, n) as v:
            return bytes(v)
    finally:
        if lease:
            store.release(owner, lease)


def config(**kw: Any) -> DataPlaneConfig:
    kw.setdefault("keys", [KEY_A])
    kw.setdefault("transport", "tcp")
    kw.setdefault("connect_timeout_s", 5.0)
    kw.setdefault("io_timeout_s", 5.0)
    return DataPlaneConfig(**kw)


@contextlib.asynccontextmanager
async def planes(tmp: Path, *cfgs: DataPlaneConfig) -> AsyncIterator[list[tuple[DataPlane, str]]]:
    """Start one DataPlane per config, each on its own store; yields [(plane, address)]."""
    stores = [make_store(tmp / f"n{i}-{os.getpid()}.arena") for i in range(len(cfgs))]
    try:
        async with trio.open_nursery() as nursery:
            out = []
            for i, (cfg, st) in enumerate(zip(cfgs, stores, strict=True)):
                dp = DataPlane(cfg, st, node_id=f"n{i}")
                addr = await nursery.start(dp.run)
                out.append((dp, addr))
            yield out
            nursery.cancel_scope.cancel()
    finally:
        for st in stores:
            st.arena.close()


async def peer_dies_mid_block(tmp: Path, transport: str) -> None:
    """Node b is cancelled (its data plane torn down) while a block is on its way to node a:
    a's fetch raises, and a's store holds no half-written block and no reserved slot."""
    from transport.dataplane import DataPlaneError

    store_b = make_store(tmp / f"b-{transport}.arena")
    try:
        async with planes(tmp, config(transport=transport, io_timeout_s=2.0)) as ((a, _),):
            k = key(1, 77)
            await put(store_b, k, payload(6 << 20, 77))
            async with trio.open_nursery() as outer:
                b_scope = trio.CancelScope()
                b = DataPlane(config(transport=transport), store_b, node_id="b")

                def die(_k: bytes, view: memoryview) -> memoryview:
                    b_scope.cancel()  # b goes down while sending this block
                    return view[: len(view) // 2]

                b._send_hook = die

                async def run_b(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    with b_scope:
                        await b.run(task_status=task_status)

                addr = await outer.start(run_b)
                with trio.fail_after(20):
                    try:
                        await a.fetch(addr, [k])
                    except DataPlaneError:
                        pass
                    else:
                        raise AssertionError("fetch from a dying peer did not raise")
            st = a.store.statistics()
            assert st.dram_blocks == 0 and st.pending_slots == 0 and st.dram_used_bytes == 0
            assert await read(a.store, k) is None
    finally:
        store_b.arena.close()


async def eventually(pred: Any, limit_s: float = 5.0) -> None:
    """Wait until ``pred()`` holds: the server side of a connection may finish its bookkeeping
    (a counter, a lease release) just after the client already has its answer."""
    with trio.fail_after(limit_s):
        while True:
            if pred():
                return
            await trio.sleep(0.001)
