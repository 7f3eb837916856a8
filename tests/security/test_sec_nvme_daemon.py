"""A full or failing NVMe disk never wedges a node: end to end, through an in-process daemon.

Before (2026-12-06 main): an ENOSPC from the tier's journal escaped ``BlockStore._evict`` as an
OSError after the victim had left the eviction policy, so the victim stayed indexed and could
never be evicted again; once every DRAM block had been tried, every put failed ``full``, even
after space returned. After: the tier refuses the write (``NvmeIOError``/``NvmeDegradedError``,
both ``NvmeFullError``), the store drops the clean victim, puts go on from DRAM, and the tier
resumes by itself once a probe write succeeds.

Two tests need the store/daemon change described in docs/storage.md ("Disk full and I/O
errors") and in the NVMe helper's report to the lead: they are marked ``NEEDS STORE CHANGE``
in their docstrings and fail until it is applied.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import trio
from test_sec_nvme_faults import fill, small_fs  # noqa: F401  (small_fs is a fixture)

from memkv_mesh.client import AsyncClient
from memkv_mesh.daemon import Daemon
from memkv_mesh.tenants import scope_keys

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB


def _config(make_config: Any, nvme_dir: Path | None = None) -> Any:
    store: dict[str, Any] = {"dram_bytes": MiB, "nvme_bytes": MiB, "max_block_bytes": BLOCK}
    if nvme_dir is not None:
        store["nvme_dir"] = str(nvme_dir)
    return make_config(store=store)


def _blocks(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [((start + i).to_bytes(4, "big") * 8, os.urandom(BLOCK)) for i in range(n)]


def _tier(d: Daemon) -> Any:
    assert d.store is not None and d.store.nvme is not None
    return d.store.nvme


async def test_full_disk_node_keeps_serving_from_dram_and_resumes(make_config: Any, small_fs: Path) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_config(make_config, small_fs / "nvme")).run)
        nv = _tier(d)
        async with await AsyncClient.connect(d.socket_path) as c:
            first = _blocks(4)
            for k, v in first:
                assert await c.put(k, v)
            fill(small_fs / "filler")  # the data files are reserved: the journal hits ENOSPC
            blocks = _blocks(150, start=100)  # 9.4 MiB through a 1 MiB arena
            for k, v in blocks:
                assert await c.put(k, v)  # never "full": victims are dropped instead
            assert nv.degraded and "No space left" in nv.statistics().degraded_reason
            st = (await c.stats())["store"]
            assert st["dram_drops"] > 0 and st["dram_used_bytes"] <= MiB
            buf = bytearray(BLOCK)
            for k, v in blocks[-8:]:  # the newest are served from DRAM
                assert await c.get_into(k, buf) == BLOCK and bytes(buf) == v

            (small_fs / "filler").unlink()  # space returns
            nv.probe_now()  # the next demotion is the probe (instead of waiting 5 s)
            more = _blocks(40, start=1000)
            for k, v in more:
                assert await c.put(k, v)
            ns = nv.statistics()
            assert not ns.degraded, ns
            assert ns.blocks > 0 and ns.probes >= 1
            st = (await c.stats())["store"]
            assert st["demotions"] > 0
            demoted = [(k, v) for (k, v), sk in zip(more, scope_keys([k for k, _ in more]), strict=True) if sk in nv]
            assert demoted
            k, v = demoted[-1]  # promoted back from the tier, verified (the newest: the tier
            # may evict its oldest to take the DRAM victim that makes room for the promotion)
            assert await c.get_into(k, buf) == BLOCK and bytes(buf) == v
        nursery.cancel_scope.cancel()


async def test_tier_write_errors_never_wedge_puts(make_config: Any) -> None:
    """EIO on every payload write of the tier (a dying disk): puts keep succeeding."""
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_config(make_config)).run)
        nv = _tier(d)

        def failing(*_: Any) -> None:
            raise OSError(errno.EIO, "injected EIO")

        nv._io.write = failing
        async with await AsyncClient.connect(d.socket_path) as c:
            blocks = _blocks(60)
            for k, v in blocks:
                assert await c.put(k, v)
            ns = nv.statistics()
            assert ns.degraded and ns.write_errors >= 1 and ns.blocks == 0 and ns.used_bytes == 0
            st = (await c.stats())["store"]
            assert st["dram_drops"] > 0 and st["dram_used_bytes"] <= MiB
            assert await c.lookup([blocks[-1][0]]) == 1
        nursery.cancel_scope.cancel()


async def test_promote_failure_frees_its_arena_extent(make_config: Any) -> None:
    """NEEDS STORE CHANGE (``_promote`` frees its extent on any failure).

    A tier read that fails with something other than an I/O error (a GPUDirect backend raising
    RuntimeError, a tier closed under it, a block replaced by a longer one between ``length``
    and ``read_into``) escaped ``_promote`` with the extent it had just allocated: one leaked
    arena extent per failure, until the arena was all leaks."""
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_config(make_config)).run)
        nv = _tier(d)
        async with await AsyncClient.connect(d.socket_path) as c:
            blocks = _blocks(30)  # 1.9 MiB through a 1 MiB arena: the oldest are on NVMe
            for k, v in blocks:
                assert await c.put(k, v)
            on_nvme = [k for k, sk in zip([k for k, _ in blocks], scope_keys([k for k, _ in blocks]), strict=True) if sk in nv]
            assert len(on_nvme) >= 3
            assert d.store is not None

            def broken(*_: Any) -> None:
                raise RuntimeError("injected backend failure")

            nv._io.read = broken
            buf = bytearray(BLOCK)
            for k in on_nvme[:3]:
                try:
                    got = await c.get_into(k, buf)
                except Exception:  # an error reply is fine; a leak is not
                    got = None
                assert got is None
            st = d.store.statistics()
            assert st.active_leases == 0 and st.pending_slots == 0
            leaked = st.dram_used_bytes - st.dram_blocks * BLOCK  # every extent is one block's
            assert leaked == 0, f"promote leaked {leaked // BLOCK} arena extents"
        nursery.cancel_scope.cancel()


async def test_status_shows_the_nvme_tier_degraded(make_config: Any) -> None:
    """NEEDS STORE CHANGE (``StoreStats`` carries the tier's degraded state and error counts).

    ``memkv-mesh status`` and the metrics read the daemon's stats, which had no trace of a
    degraded tier."""
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(_config(make_config)).run)
        nv = _tier(d)

        def failing(*_: Any) -> None:
            raise OSError(errno.ENOSPC, "injected ENOSPC")

        nv._io.write = failing
        async with await AsyncClient.connect(d.socket_path) as c:
            for k, v in _blocks(30):
                assert await c.put(k, v)
            st = (await c.stats())["store"]
            assert st.get("nvme_degraded") is True, f"no nvme_degraded in the store's stats: {sorted(st)}"
            assert "No space left" in st["nvme_degraded_reason"] or "ENOSPC" in st["nvme_degraded_reason"]
            assert st["nvme_degraded_since"] > 0 and st["nvme_write_errors"] >= 1
            assert st["nvme_read_errors"] == 0
        nursery.cancel_scope.cancel()
