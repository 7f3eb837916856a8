"""The mesh simulator's discrete-event engine, in virtual time.

Theory of operation
-------------------
Requests are admitted in trace order at their arrival time; everything else (prefill completions
that write blocks to the mesh, flash-node deaths, their detection, re-replication ticks) is an
event on a heap, processed in time order before each admission (ties: events first, then
admissions in file order).

On admission a request is routed to a GPU node (see ``routing``), then:

1. **Prefix lookup.** Walk its blocks in order: a block in the node's DRAM cache is a local hit; else
   a block some flash peer holds (the mesh directory) is a mesh hit; the first block that is neither
   ends the prefix. Hits may still be in flight (a block another request is computing, or a replica
   being written); the request then waits for them (``ready_at``).
2. **Loads.** Mesh hits are fetched from a holder per block (the least busy live one), grouped per
   holder: that flash node's NVMe read, its NIC out and the GPU node's NIC in are reserved
   (``resources``). All hit blocks then cross the node's PCIe link into the GPU. A holder that is
   dead but not yet detected costs a failed fetch (a timeout) before the next holder is tried.
3. **Prefill** of the missed suffix runs FIFO on the node's GPUs at the model's prefill rate; TTFT =
   prefill end + one decode step - arrival.
4. **DRAM update.** Every block of the request is inserted into (or refreshed in) the node's DRAM
   cache in order, with the eviction policy; new blocks become ready at prefill end. This happens at
   admission, in file order, so with one GPU node and no flash the hit ratio is exactly the classic
   prefix-LRU ratio of the trace (the tests hold this).
5. **Mesh write** (an event at prefill end): blocks the mesh lacks (or holds on fewer than R
   nodes) are sent to their owners that lack them, the
   R live flash nodes the *current membership view* ranks highest in the real weighted rendezvous
   placement (``memkv_mesh.placement``), inserting into each owner's NVMe cache (which evicts by the
   same policy, dropping evicted blocks from the directory). A put to a node whose queue is more
   than ``write_backlog_s`` behind is dropped (best effort); a later write of the block repairs it.
   Step 2 likewise fetches only when that beats recomputing (``fetch_if_faster``). With
   ``put_policy = "on-reuse"`` only blocks the node re-used from its DRAM (local hits) are put,
   so one-off blocks never cost flash writes.

**The daemon's write path** (``cluster.write_path = "async"``; the default ``"instant"`` is the
above). Only the blocks the node computed are put (step 5 with what a real engine sends), and a
put is not on its owners at once: the block is *dirty* on the GPU node, pinned in its DRAM (never
evicted) until every owner holds it. Replication runs per node in put order, to all owners at
once, and lands ``replication_lag_s`` after the put, or later when the NICs/NVMe are busy. Past
``dirty_blocks`` dirty blocks a put waits until enough of them are clean (back-pressure). Another
node's lookup sees a block ``directory_delay_s`` after its first put (the gossiped directory names
the GPU node that put it) and fetches it from a flash holder, else from any GPU node holding it
in DRAM. Blocks still being computed or written by the node itself are not hits (the daemon
holds nothing until the put is acknowledged). ``Engine.run(put_at=...)`` takes the time each
request's put was acknowledged, as a replay measured it, instead of the prefill end.

Failures: a killed flash node stops serving at once but stays in every peer's view until its
detection time (a fixed delay, or the real SWIM cores via ``gossip_detect``); writes to it in that
window are lost. On detection the view drops it, placement is recomputed, and every block it held
or should have received is copied from a surviving holder to its new owners at a mesh-wide rate cap
(re-replication). Blocks with no surviving holder are lost. A restarted node (``t_restart``) rejoins
the view with the blocks it held when it died (its disk survived). A per-window timeline records
the dip.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np

from memkv_mesh.placement import Candidate, Rendezvous

from .resources import Resource
from .routing import make_router
from .spec import SimSpec, parse_kill
from .trace import Request

__all__ = [
    "Engine",
    "EngineStats",
    "RunResult",
    "FailureEvent",
    "simulate",
    "fixed_delay_failures",
    "with_restarts",
]

# Event kinds, in tie-break order at equal times.
_EV_KILL = 0
_EV_DETECT = 1
_EV_WRITE = 2
_EV_REREP = 3
_EV_LAND = 4  # async write path: a replica lands on a flash owner
_EV_CLEAN = 5  # async write path: every owner holds the blocks; the GPU node may evict them
_EV_RESTART = 6

_INF = math.inf

_REREP_TICK_S = 1.0


@dataclass(frozen=True)
class FailureEvent:
    """Flash node ``flash`` dies at ``t_kill`` and every peer's view drops it at ``t_detect``; it
    comes back on its old disk at ``t_restart`` (never by default)."""

    flash: int
    t_kill: float
    t_detect: float
    t_restart: float = math.inf


@dataclass(frozen=True)
class EngineStats:
    """``Engine.statistics()``: counters of a run in progress."""

    admitted: int
    refs: int
    local_hits: int
    mesh_hits: int
    mesh_blocks: int
    alive_flash: int
    rereplication_pending: int
    failed_fetches: int
    dropped_write_bytes: int
    backpressure_waits: int = 0
    dirty_blocks: int = 0


@dataclass
class Window:
    """Counters of one timeline window."""

    requests: int = 0
    refs: int = 0
    hits: int = 0
    mesh_hits: int = 0
    rerep_bytes: int = 0
    alive_flash: int = 0


@dataclass
class RunResult:
    """Everything one run measured. ``statistics()``-style: plain data, no behaviour but summaries."""

    mesh: bool
    n_requests: int
    refs: int
    local_hits: int
    mesh_hits: int
    hit_tokens: int
    input_tokens: int
    output_tokens: int
    start_s: float
    end_s: float
    ttft_s: np.ndarray
    gpu_busy_s: list[float]
    gpu_requests: list[int]
    gpu_nic_in: list[Resource]
    gpu_nic_out: list[Resource]
    gpu_pcie: list[Resource]
    flash_nic_in: list[Resource]
    flash_nic_out: list[Resource]
    flash_nvme: list[Resource]
    flash_read_bytes: list[int]
    flash_write_bytes: list[int]
    flash_blocks: list[int]
    window_s: float
    timeline: list[Window]
    failures: list[FailureEvent]
    failed_fetches: int = 0
    skipped_fetches: int = 0
    dropped_write_bytes: int = 0
    lost_write_bytes: int = 0
    lost_blocks: int = 0
    rerep_bytes: int = 0
    rerep_blocks: int = 0
    rerep_done_s: list[float] = field(default_factory=list)
    # The async write path (zero / empty with "instant"):
    write_path: str = "instant"
    blocks_put: int = 0  # distinct blocks the GPU nodes put
    blocks_held_nowhere: int = 0  # of those, held by no live node at the end (a read-back misses)
    backpressure_waits: int = 0  # puts that waited for dirty blocks to clear
    backpressure_wait_s: float = 0.0
    dirty_peak_blocks: list[int] = field(default_factory=list)  # per GPU node
    dram_pinned_overflow: int = 0  # inserts that found every DRAM block dirty (cache ran over)

    @property
    def hits(self) -> int:
        return self.local_hits + self.mesh_hits

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.refs if self.refs else 0.0

    @property
    def duration_s(self) -> float:
        return max(self.end_s - self.start_s, 1e-9)


class _Cache:
    """A block cache of fixed capacity (None = unbounded): block id -> ready_at time."""

    __slots__ = ("d", "cap", "lru")

    def __init__(self, cap: int | None, policy: str) -> None:
        self.d: OrderedDict[int, float] = OrderedDict()
        self.cap = cap
        self.lru = policy == "lru"


class Engine:
    """One simulation run over one spec. ``mesh=False`` runs the same cluster without flash peers
    (the baseline: per-node DRAM caches only)."""

    def __init__(
        self,
        spec: SimSpec,
        *,
        mesh: bool = True,
        failures: Sequence[FailureEvent] = (),
        window_s: float = 10.0,
        util_window_s: float = 10.0,
        progress: bool = False,
        progress_desc: str = "simulate",
    ) -> None:
        spec.validate()
        self.spec = spec
        c = spec.cluster
        self.mesh = mesh and c.flash_nodes > 0
        self.G = c.gpu_nodes
        self.F = c.flash_nodes if self.mesh else 0
        self.bb = spec.block_bytes
        self.bt = c.block_tokens
        self.R = c.replicas
        ideal = c.ideal_network
        uw = util_window_s

        def res(name: str, gbps: float) -> Resource:
            return Resource(name, None if ideal else gbps, uw)

        self.gpu_nic_in = [res(f"gpu-{i}.nic-in", c.nic_gbps) for i in range(self.G)]
        self.gpu_nic_out = [res(f"gpu-{i}.nic-out", c.nic_gbps) for i in range(self.G)]
        self.gpu_pcie = [res(f"gpu-{i}.pcie", c.pcie_gbps) for i in range(self.G)]
        self.flash_nic_in = [res(f"flash-{i}.nic-in", c.nic_gbps) for i in range(self.F)]
        self.flash_nic_out = [res(f"flash-{i}.nic-out", c.nic_gbps) for i in range(self.F)]
        # One NVMe queue per flash node; reads and writes share it at their own rates, expressed
        # as a read-rate resource with writes scaled up by read/write.
        self.flash_nvme = [res(f"flash-{i}.nvme", c.nvme_read_gbps) for i in range(self.F)]
        self._write_scale = c.nvme_read_gbps / c.nvme_write_gbps
        self.dram = [_Cache(spec.dram_capacity_blocks, c.eviction) for _ in range(self.G)]
        self.nvme = [_Cache(spec.nvme_capacity_blocks, c.eviction) for _ in range(self.F)]
        self.directory: dict[int, list[int]] = {}
        self.alive = [True] * self.F
        self.in_view = [True] * self.F
        self._ring_idx: list[int] = []
        self._ring = self._make_ring()
        self._owners: dict[int, tuple[int, ...]] = {}
        self.gpu_free = [0.0] * self.G
        self.gpu_busy = [0.0] * self.G
        self.gpu_reqs = [0] * self.G
        self.flash_read = [0] * self.F
        self.flash_write = [0] * self.F
        self.node_tps = spec.model.prefill_tokens_per_s_per_gpu * c.gpus_per_node
        self.decode_step = 1.0 / spec.model.decode_tokens_per_s
        self.failed_fetch_s = spec.failure.failed_fetch_s
        self.rerep_rate = spec.failure.rereplication_gbps * 1e9
        self.failures = list(failures) if self.mesh else []
        for f in self.failures:
            if not 0 <= f.flash < self.F:
                raise ValueError(f"failure names flash node {f.flash}, cluster has {self.F}")
            if f.t_detect < f.t_kill:
                raise ValueError(f"failure of flash-{f.flash}: detection before death")
        self.window_s = window_s
        self.timeline: list[Window] = []
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._rerep_queue: list[tuple[int, int]] = []  # (block, dst)
        self._rerep_scheduled = False
        self._pending_lost: dict[int, set[int]] = {}  # dead flash -> blocks written to it in vain
        self.failed_fetches = 0
        self.skipped_fetches = 0
        self.dropped_write_bytes = 0
        self.write_backlog_s = c.write_backlog_s
        self.fetch_if_faster = c.fetch_if_faster
        self.put_all = c.put_policy == "all"
        self.lost_write_bytes = 0
        self.lost_blocks = 0
        self.rerep_bytes = 0
        self.rerep_blocks = 0
        self.rerep_done: list[float] = []
        self.progress = progress
        self.progress_desc = progress_desc
        self.router = make_router(c.routing, self)
        # The async write path (see the module docstring).
        self.async_write = c.write_path == "async"
        self.lag = c.replication_lag_s
        self.dir_delay = c.directory_delay_s
        self.dirty_bound = c.dirty_blocks
        self._dirty: list[dict[int, float]] = [{} for _ in range(self.G)]  # block -> clean time
        self._clean_heap: list[list[float]] = [[] for _ in range(self.G)]  # dirty blocks' clean times
        self._gpu_holders: dict[int, list[int]] = {}  # block -> GPU nodes holding it in DRAM
        self._vis: dict[int, float] = {}  # block -> when other nodes' directories see it
        self._put_blocks: set[int] = set()
        self._detect_at = [_INF] * self.F
        for f in self.failures:
            self._detect_at[f.flash] = min(self._detect_at[f.flash], f.t_detect)
        self._held_at_detect: dict[int, list[int]] = {}
        self.backpressure_waits = 0
        self.backpressure_wait_s = 0.0
        self.dirty_peak = [0] * self.G
        self.dram_overflow = 0
        self._admitted = 0
        self._local = self._mesh = self._hit_tokens = self._refs = 0
        self._ran = False

    # ----------------------------------------------------------------------------- placement
    def _make_ring(self) -> Rendezvous:
        w = max(self.spec.cluster.nvme_tb_per_flash_node, 1e-9)
        ring = Rendezvous([Candidate(f"flash-{i}", w) for i in range(self.F) if self.in_view[i]])
        # Member index (members sort by node id) -> flash index.
        self._ring_idx = [int(m.node_id[6:]) for m in ring.members]
        return ring

    def owners(self, block: int) -> tuple[int, ...]:
        """Flash indexes of ``block``'s owners under the current view (cached per view)."""
        o = self._owners.get(block)
        if o is None:
            key = block.to_bytes(8, "little", signed=True)
            idx = self._ring_idx
            o = tuple([idx[i] for i in self._ring.owner_indexes(key, self.R)])
            self._owners[block] = o
        return o

    # ----------------------------------------------------------------------------- events
    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def _window(self, t: float) -> Window:
        i = int(t / self.window_s)
        tl = self.timeline
        while len(tl) <= i:
            tl.append(Window(alive_flash=sum(self.alive)))
        return tl[i]

    def _run_events_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, kind, _, payload = heapq.heappop(heap)
            if kind == _EV_WRITE:
                wg, wblocks = cast(tuple[int, list[int]], payload)
                if self.async_write:
                    self._async_write(when, wg, wblocks)
                else:
                    self._mesh_write(when, wg, wblocks)
            elif kind == _EV_LAND:
                lf, lblocks = cast(tuple[int, list[int]], payload)
                self._land(when, lf, lblocks)
            elif kind == _EV_CLEAN:
                cg, cblocks = cast(tuple[int, list[int]], payload)
                dirty = self._dirty[cg]
                for b in cblocks:
                    dirty.pop(b, None)
            elif kind == _EV_KILL:
                self._kill(when, cast(int, payload))
            elif kind == _EV_DETECT:
                self._detect(when, cast(int, payload))
            elif kind == _EV_RESTART:
                self._restart(when, cast(int, payload))
            else:
                self._rerep_tick(when)

    # ----------------------------------------------------------------------------- nvme cache
    def _nvme_insert(self, f: int, block: int, ready: float) -> None:
        cache = self.nvme[f]
        d = cache.d
        d[block] = ready
        hs = self.directory.get(block)
        if hs is None:
            self.directory[block] = [f]
        elif f not in hs:
            hs.append(f)
        cap = cache.cap
        if cap is not None and len(d) > cap:
            old, _ = d.popitem(last=False)
            hs2 = self.directory.get(old)
            if hs2 is not None:
                if f in hs2:
                    hs2.remove(f)
                if not hs2:
                    del self.directory[old]

    def _mesh_write(self, now: float, g: int, blocks: list[int]) -> None:
        """Write the blocks the mesh lacks to their owners (one batch per owner)."""
        directory = self.directory
        per_owner: dict[int, list[int]] = {}
        alive = self.alive
        R = self.R
        for b in blocks:
            hs = directory.get(b)
            if hs is not None and len(hs) >= R:
                continue
            for f in self.owners(b):
                if hs is None or f not in hs:
                    per_owner.setdefault(f, []).append(b)
        bb = self.bb
        limit = now + self.write_backlog_s
        for f, bs in per_owner.items():
            nbytes = len(bs) * bb
            if not alive[f]:
                self.lost_write_bytes += nbytes
                self._pending_lost.setdefault(f, set()).update(bs)
                continue
            if (
                self.flash_nvme[f].free_at > limit
                or self.flash_nic_in[f].free_at > limit
                or self.gpu_nic_out[g].free_at > limit
            ):
                # A put is best effort (the mesh is a cache): shed it rather than queue reads
                # behind an ever-growing write backlog.
                self.dropped_write_bytes += nbytes
                continue
            t1 = self.gpu_nic_out[g].reserve(now, nbytes)
            t2 = self.flash_nic_in[f].reserve(now, nbytes)
            t3 = self.flash_nvme[f].reserve(now, int(nbytes * self._write_scale))
            ready = max(t1, t2, t3)
            self.flash_write[f] += nbytes
            for b in bs:
                self._nvme_insert(f, b, ready)

    def _async_write(self, now: float, g: int, computed: list[int]) -> None:
        """The daemon's put path: wait out back-pressure, store the blocks in DRAM (dirty, so
        pinned), then replicate to every owner at once; each replica lands after the lag (or the
        transfers); the blocks stay dirty until all have landed."""
        dirty = self._dirty[g]
        heap = self._clean_heap[g]
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        t = now
        bound = self.dirty_bound
        if bound is not None and len(heap) >= bound:
            # Back-pressure: the put waits until the dirty blocks are under the bound again. Like
            # the daemon's, the bound is soft by one batch: a put that starts under it goes ahead.
            for _ in range(len(heap) - bound + 1):
                t = heapq.heappop(heap)
            if t > now:
                self.backpressure_waits += 1
                self.backpressure_wait_s += t - now
            else:
                t = now
        cache = self.dram[g]
        d = cache.d
        cap = cache.cap
        gpu_holders = self._gpu_holders
        blocks: list[int] = []
        for b in computed:
            if b in d:
                continue  # stored meanwhile (another request computed it too): the put is a no-op
            blocks.append(b)
            if cap == 0:
                continue
            d[b] = t
            dirty[b] = _INF  # pinned until every owner holds it
            _add_holder(gpu_holders, b, g)
            if cap is not None and len(d) > cap:
                self._dram_evict(g, d)
        if not blocks:
            return
        if len(heap) + len(blocks) > self.dirty_peak[g]:
            self.dirty_peak[g] = len(heap) + len(blocks)
        directory = self.directory
        vis = self._vis
        seen_at = t + self.dir_delay
        for b in blocks:
            self._put_blocks.add(b)
            if b not in vis or (not directory.get(b) and gpu_holders.get(b) == [g]):
                vis[b] = seen_at  # nobody else holds it: others see it once our delta arrives
        per_owner: dict[int, list[int]] = {}
        for b in blocks if self.F else ():
            hs = directory.get(b)
            for f in self.owners(b):
                if hs is None or f not in hs:
                    per_owner.setdefault(f, []).append(b)
        clean_at = dict.fromkeys(blocks, t)
        bb = self.bb
        for f, bs in per_owner.items():
            nbytes = len(bs) * bb
            if not self.alive[f]:
                # The push fails; the blocks stay dirty until the view drops the dead owner and
                # repair reaches the new one.
                self.lost_write_bytes += nbytes
                self._pending_lost.setdefault(f, set()).update(bs)
                until = self._detect_at[f] + self.lag
                for b in bs:
                    if until > clean_at[b]:
                        clean_at[b] = until
                continue
            t1 = self.gpu_nic_out[g].reserve(t, nbytes)
            t2 = self.flash_nic_in[f].reserve(t, nbytes)
            t3 = self.flash_nvme[f].reserve(t, int(nbytes * self._write_scale))
            land = max(t + self.lag, t1, t2, t3)
            self.flash_write[f] += nbytes
            self._push(land, _EV_LAND, (f, bs))
            for b in bs:
                if land > clean_at[b]:
                    clean_at[b] = land
        by_time: dict[float, list[int]] = {}
        for b, tc in clean_at.items():
            if cap != 0:
                dirty[b] = tc
            by_time.setdefault(tc, []).append(b)
            heapq.heappush(heap, tc)
        for tc, bs in by_time.items():
            if math.isfinite(tc):
                self._push(tc, _EV_CLEAN, (g, bs))

    def _land(self, now: float, f: int, blocks: list[int]) -> None:
        if not self.alive[f]:  # died while the replica was on its way
            self.lost_write_bytes += len(blocks) * self.bb
            self._pending_lost.setdefault(f, set()).update(blocks)
            return
        for b in blocks:
            self._nvme_insert(f, b, now)

    def _dram_evict(self, g: int, d: OrderedDict[int, float]) -> None:
        """Drop node ``g``'s least recently used block that is not dirty (async write path)."""
        dirty = self._dirty[g]
        victim = None
        if len(dirty) >= len(d):
            self.dram_overflow += 1  # everything is dirty: the cache runs over its size
            return
        if dirty:
            for x in d:
                if x not in dirty:
                    victim = x
                    break
            if victim is None:
                self.dram_overflow += 1  # everything is dirty: the cache runs over its size
                return
            del d[victim]
        else:
            victim, _ = d.popitem(last=False)
        hs = self._gpu_holders.get(victim)
        if hs is not None:
            if g in hs:
                hs.remove(g)
            if not hs:
                del self._gpu_holders[victim]

    # ----------------------------------------------------------------------------- failures
    def _kill(self, now: float, f: int) -> None:
        self.alive[f] = False
        self._window(now).alive_flash = sum(self.alive)

    def _detect(self, now: float, f: int) -> None:
        if not self.in_view[f] or self.alive[f]:  # (restarted before anyone noticed)
            return
        self.in_view[f] = False
        self._ring = self._make_ring()
        self._owners.clear()
        held = list(self.nvme[f].d)
        self._held_at_detect[f] = held
        self.nvme[f].d.clear()
        directory = self.directory
        for b in held:
            hs = directory.get(b)
            if hs is not None and f in hs:
                hs.remove(f)
                if not hs:
                    del directory[b]
        todo = held + sorted(self._pending_lost.pop(f, set()))
        alive = self.alive
        seen: set[int] = set()
        for b in todo:
            if b in seen:
                continue
            seen.add(b)
            hs = directory.get(b)
            if not hs or not any(alive[h] for h in hs):
                # With the async write path a GPU node still holds what never reached flash
                # (it stays dirty there) and repair pushes it from there.
                if not (self.async_write and self._gpu_holders.get(b)):
                    self.lost_blocks += 1
                    continue
            for dst in self.owners(b):
                if (not hs or dst not in hs) and alive[dst]:
                    self._rerep_queue.append((b, dst))
        self._rerep_queue.reverse()  # pop() from the end serves in placement order
        if self._rerep_queue and not self._rerep_scheduled:
            self._rerep_scheduled = True
            self._push(now, _EV_REREP, None)

    def _rerep_tick(self, now: float) -> None:
        """Move up to rate x tick bytes of re-replication copies, then reschedule."""
        budget = self.rerep_rate * _REREP_TICK_S
        bb = self.bb
        q = self._rerep_queue
        directory = self.directory
        alive = self.alive
        moved = 0
        while q and budget >= bb:
            b, dst = q.pop()
            hs = directory.get(b)
            if not alive[dst] or (hs is not None and dst in hs):
                continue
            srcs = [h for h in hs if alive[h]] if hs else []
            if srcs:
                src = min(srcs, key=lambda h: self.flash_nvme[h].free_at)
                t1 = self.flash_nvme[src].reserve(now, bb)
                t2 = self.flash_nic_out[src].reserve(now, bb)
                self.flash_read[src] += bb
            elif self.async_write and self._gpu_holders.get(b):
                t1 = t2 = self.gpu_nic_out[self._gpu_holders[b][0]].reserve(now, bb)
            else:
                continue
            t3 = self.flash_nic_in[dst].reserve(now, bb)
            t4 = self.flash_nvme[dst].reserve(now, int(bb * self._write_scale))
            self.flash_write[dst] += bb
            self._nvme_insert(dst, b, max(t1, t2, t3, t4))
            budget -= bb
            moved += bb
            self.rerep_blocks += 1
        self.rerep_bytes += moved
        self._window(now).rerep_bytes += moved
        if q:
            self._push(now + _REREP_TICK_S, _EV_REREP, None)
        else:
            self._rerep_scheduled = False
            self.rerep_done.append(now)

    def _restart(self, now: float, f: int) -> None:
        """Flash node ``f`` comes back on its old disk and rejoins the view."""
        if self.alive[f]:
            return
        self.alive[f] = True
        if not self.in_view[f]:
            self.in_view[f] = True
            self._ring = self._make_ring()
            self._owners.clear()
            for b in self._held_at_detect.pop(f, []):
                self._nvme_insert(f, b, now)
        self._window(now).alive_flash = sum(self.alive)

    # ----------------------------------------------------------------------------- admission
    def local_prefix(self, g: int, blocks: Sequence[int]) -> int:
        """How many leading blocks node ``g`` holds in DRAM (used by prefix-aware routing)."""
        d = self.dram[g].d
        n = 0
        for b in blocks:
            if b not in d:
                break
            n += 1
        return n

    def _holder_stages(self, h: int) -> tuple[Resource, Resource]:
        """The two resources a fetch from holder ``h`` reads through: a flash node's NVMe and NIC
        out, or (``h < 0``: GPU node ``-1 - h``, async write path) that node's NIC out twice."""
        if h >= 0:
            return self.flash_nvme[h], self.flash_nic_out[h]
        nic = self.gpu_nic_out[-1 - h]
        return nic, nic

    def _admit(self, req: Request, now: float, put_s: float | None = None) -> float:
        g = self.router(req, now)
        blocks = req.blocks
        cache = self.dram[g]
        d = cache.d
        directory = self.directory
        alive = self.alive
        flash_nvme = self.flash_nvme
        async_write = self.async_write
        vis = self._vis
        gpu_holders = self._gpu_holders
        dram = self.dram
        bb = self.bb
        bt = self.bt
        tokens = req.input_tokens
        ready = now  # when the local hits are all computed
        ready0 = now  # the same, for the local hits before the first mesh hit
        local = 0
        first_mesh = -1
        dead_tried: list[int] = []
        mesh_blocks: list[tuple[int, int]] = []  # (block, holder: flash index, or -1 - GPU index)
        for b in blocks:
            r = d.get(b)
            if r is not None and (r <= now or not async_write):
                local += 1
                if r > ready:
                    ready = r
                    if first_mesh < 0:
                        ready0 = r
                continue
            if async_write:
                v = vis.get(b)
                if v is None or v > now:
                    break  # no other node's directory names it yet
            hs = directory.get(b) if directory else None
            if not hs and not async_write:
                break
            best = -1
            bf = 0.0
            for h in hs or ():
                if alive[h]:
                    fa = flash_nvme[h].free_at
                    if best < 0 or fa < bf:
                        best, bf = h, fa
                elif h not in dead_tried:
                    dead_tried.append(h)
            if best < 0 and async_write:
                # No flash holder yet: the GPU node that put it (or fetched it) serves it.
                for h in gpu_holders.get(b, ()):
                    if h != g and dram[h].d[b] <= now:
                        best = -1 - h
                        break
                else:
                    break
            elif best < 0:
                break
            if first_mesh < 0:
                first_mesh = local + len(mesh_blocks)
            mesh_blocks.append((b, best))
        hit = local + len(mesh_blocks)
        free = self.gpu_free[g]
        tps = self.node_tps
        per_holder: dict[int, int] = {}
        mesh_ready: dict[int, float] = {}
        penalty = 0.0
        if mesh_blocks:
            nvme = self.nvme
            for b, h in mesh_blocks:
                per_holder[h] = per_holder.get(h, 0) + 1
                rr = nvme[h].d[b] if h >= 0 else dram[-1 - h].d[b]
                if rr > mesh_ready.get(h, 0.0):
                    mesh_ready[h] = rr
            penalty = len(dead_tried) * self.failed_fetch_s
            if self.fetch_if_faster:
                # Fetch from the mesh only if that ends the prefill sooner than recomputing the
                # mesh part (a scheduler's choice, on the queues as they stand now).
                start = now + penalty
                est = max(ready, start, self.gpu_pcie[g].peek(start, hit * bb),
                          self.gpu_nic_in[g].peek(start, len(mesh_blocks) * bb))  # fmt: skip
                for h, n in per_holder.items():
                    t0 = max(start, mesh_ready[h])
                    s1, s2 = self._holder_stages(h)
                    est = max(est, s1.peek(t0, n * bb), s2.peek(t0, n * bb))
                miss_with = max(0, tokens - hit * bt)
                end_with = max(est, free) + miss_with / tps
                est0 = max(ready0, now, self.gpu_pcie[g].peek(now, first_mesh * bb))
                miss_without = max(0, tokens - first_mesh * bt)
                end_without = max(est0, free) + miss_without / tps
                if end_without <= end_with:
                    self.skipped_fetches += 1
                    hit = local = first_mesh
                    ready = ready0
                    mesh_blocks = []
                    per_holder = {}
                    dead_tried = []
                    penalty = 0.0
        mesh = len(mesh_blocks)
        if mesh:
            nvme = self.nvme
            flash_read = self.flash_read
            for b, h in mesh_blocks:
                if h < 0:
                    continue
                c = nvme[h]
                if c.lru:
                    c.d.move_to_end(b)
                flash_read[h] += bb
            self.failed_fetches += len(dead_tried)
        start = now + penalty
        load_done = ready if ready > start else start
        if per_holder:
            nic_in = self.gpu_nic_in[g]
            for h, n in per_holder.items():
                t0 = mesh_ready[h]
                if t0 < start:
                    t0 = start
                nbytes = n * bb
                if h >= 0:
                    t1 = flash_nvme[h].reserve(t0, nbytes)
                    t2 = self.flash_nic_out[h].reserve(t0, nbytes)
                else:
                    t1 = t2 = self.gpu_nic_out[-1 - h].reserve(t0, nbytes)
                t3 = nic_in.reserve(t0, nbytes)
                t = max(t1, t2, t3)
                if t > load_done:
                    load_done = t
        if hit:
            t = self.gpu_pcie[g].reserve(start, hit * bb)
            if t > load_done:
                load_done = t
        hit_tokens = min(tokens, hit * bt)
        miss_tokens = tokens - hit_tokens
        p_start = load_done if load_done > free else free
        dur = miss_tokens / tps
        end = p_start + dur
        if put_s is not None and put_s > end:
            end = put_s  # the replay's measured put acknowledgement
        self.gpu_free[g] = end
        self.gpu_busy[g] += dur
        self.gpu_reqs[g] += 1
        # DRAM update, in order: hits refreshed, new blocks ready at prefill end.
        cap = cache.cap
        # Async: as in the daemon, the hits are refreshed by the get, the blocks the node computed
        # are stored by their put at prefill end, and a block after the first miss that the node
        # happens to hold is not touched (the engine neither gets it nor re-stores it).
        put: list[int] = []
        if cap != 0:
            lru = cache.lru
            for i, b in enumerate(blocks):
                if b in d:
                    if lru and (i < hit or not async_write):
                        d.move_to_end(b)
                elif not async_write:
                    d[b] = end if i >= hit else load_done
                    if cap is not None and len(d) > cap:
                        d.popitem(last=False)
                elif i >= hit:
                    put.append(b)
                else:  # fetched from the mesh: in DRAM once loaded
                    d[b] = load_done
                    _add_holder(gpu_holders, b, g)
                    if cap is not None and len(d) > cap:
                        self._dram_evict(g, d)
        elif async_write:
            put = list(blocks[hit:])
        if async_write:
            if put:
                self._push(end, _EV_WRITE, (g, put))
        elif self.F and blocks:
            if self.put_all:
                self._push(end, _EV_WRITE, (g, list(blocks)))
            elif local:
                # on-reuse: only the blocks this node just re-used from its DRAM.
                self._push(end, _EV_WRITE, (g, list(blocks[:local])))
        w = self._window(now)
        w.requests += 1
        w.refs += len(blocks)
        w.hits += hit
        w.mesh_hits += mesh
        self._local += local
        self._mesh += mesh
        self._hit_tokens += hit_tokens
        self._refs += len(blocks)
        return end + self.decode_step - now

    # ----------------------------------------------------------------------------- run
    def statistics(self) -> EngineStats:
        """An immutable snapshot of the run so far (safe to call between events)."""
        return EngineStats(
            admitted=self._admitted,
            refs=self._refs,
            local_hits=self._local,
            mesh_hits=self._mesh,
            mesh_blocks=len(self.directory),
            alive_flash=sum(self.alive),
            rereplication_pending=len(self._rerep_queue),
            failed_fetches=self.failed_fetches,
            dropped_write_bytes=self.dropped_write_bytes,
            backpressure_waits=self.backpressure_waits,
            dirty_blocks=sum(len(x) for x in self._dirty),
        )

    def run(self, requests: Sequence[Request], *, put_at: Sequence[float] | None = None) -> RunResult:
        """Simulate ``requests`` (in arrival order). An engine runs once; build another to rerun.

        ``put_at``: per request, when its blocks were put (a replay's measured acknowledgements);
        a request's put is never earlier than its prefill end. Default: at prefill end."""
        if self._ran:
            raise RuntimeError("an Engine runs once; build a new one for another run")
        self._ran = True
        if not requests:
            raise ValueError("no requests to simulate")
        if put_at is not None and len(put_at) != len(requests):
            raise ValueError(f"put_at has {len(put_at)} times for {len(requests)} requests")
        for f in self.failures:
            self._push(f.t_kill, _EV_KILL, f.flash)
            if math.isfinite(f.t_detect):  # never detected: the view keeps the dead node
                self._push(f.t_detect, _EV_DETECT, f.flash)
            if math.isfinite(f.t_restart):
                self._push(f.t_restart, _EV_RESTART, f.flash)
        ttft = np.empty(len(requests), dtype=np.float64)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(requests),
                desc=self.progress_desc,
                unit="req",
                file=sys.stderr,
                mininterval=0.5,
                leave=False,
            )
        in_tok = out_tok = 0
        last = 0.0
        for i, req in enumerate(requests):
            now = req.arrival_s
            if now < last:
                raise ValueError(f"request {i} arrives at {now} s, before request {i - 1}")
            last = now
            if self._heap:
                self._run_events_until(now)
            ttft[i] = self._admit(req, now, None if put_at is None else put_at[i])
            self._admitted = i + 1
            in_tok += req.input_tokens
            out_tok += req.output_tokens
            if bar is not None and (i & 255) == 255:
                bar.update(256)
        self._run_events_until(float("inf"))
        if bar is not None:
            bar.update(len(requests) - bar.n)
            bar.close()
        end = max(
            [requests[-1].arrival_s, *self.gpu_free, *(r.free_at for r in self.flash_nvme)]
        )
        held: set[int] = set()
        if self.async_write:
            for fi in range(self.F):
                if self.alive[fi]:
                    held.update(self.nvme[fi].d)
            for dc in self.dram:
                held.update(dc.d)
        return RunResult(
            mesh=self.mesh,
            n_requests=len(requests),
            refs=self._refs,
            local_hits=self._local,
            mesh_hits=self._mesh,
            hit_tokens=self._hit_tokens,
            input_tokens=in_tok,
            output_tokens=out_tok,
            start_s=requests[0].arrival_s,
            end_s=end,
            ttft_s=ttft,
            gpu_busy_s=self.gpu_busy,
            gpu_requests=self.gpu_reqs,
            gpu_nic_in=self.gpu_nic_in,
            gpu_nic_out=self.gpu_nic_out,
            gpu_pcie=self.gpu_pcie,
            flash_nic_in=self.flash_nic_in,
            flash_nic_out=self.flash_nic_out,
            flash_nvme=self.flash_nvme,
            flash_read_bytes=self.flash_read,
            flash_write_bytes=self.flash_write,
            flash_blocks=[len(c.d) for c in self.nvme],
            window_s=self.window_s,
            timeline=self.timeline,
            failures=self.failures,
            failed_fetches=self.failed_fetches,
            skipped_fetches=self.skipped_fetches,
            dropped_write_bytes=self.dropped_write_bytes,
            lost_write_bytes=self.lost_write_bytes,
            lost_blocks=self.lost_blocks,
            rerep_bytes=self.rerep_bytes,
            rerep_blocks=self.rerep_blocks,
            rerep_done_s=self.rerep_done,
            write_path="async" if self.async_write else "instant",
            blocks_put=len(self._put_blocks),
            blocks_held_nowhere=len(self._put_blocks - held),
            backpressure_waits=self.backpressure_waits,
            backpressure_wait_s=self.backpressure_wait_s,
            dirty_peak_blocks=list(self.dirty_peak) if self.async_write else [],
            dram_pinned_overflow=self.dram_overflow,
        )


def _add_holder(holders: dict[int, list[int]], block: int, node: int) -> None:
    hs = holders.get(block)
    if hs is None:
        holders[block] = [node]
    elif node not in hs:
        hs.append(node)


def fixed_delay_failures(spec: SimSpec) -> list[FailureEvent]:
    """The spec's kills with the fixed detection delay model; each restart goes to the latest
    earlier kill of the same node."""
    out = []
    for k in spec.failure.kill:
        idx, t = parse_kill(k, spec.cluster.flash_nodes)
        out.append(FailureEvent(idx, t, t + spec.failure.detect_delay_s))
    return with_restarts(out, spec)


def with_restarts(failures: Sequence[FailureEvent], spec: SimSpec) -> list[FailureEvent]:
    """``failures`` with the spec's ``failure.restart`` times filled in."""
    out = list(failures)
    for r in spec.failure.restart:
        idx, t = parse_kill(r, spec.cluster.flash_nodes, field="failure.restart")
        best = -1
        for i, f in enumerate(out):
            if f.flash == idx and f.t_kill < t and not math.isfinite(f.t_restart):
                if best < 0 or f.t_kill > out[best].t_kill:
                    best = i
        if best < 0:
            raise ValueError(f"restart {r!r}: flash-{idx} is not down before {t:g} s")
        out[best] = replace(out[best], t_restart=t)
    return out


def simulate(
    spec: SimSpec,
    requests: Sequence[Request],
    *,
    mesh: bool = True,
    failures: Sequence[FailureEvent] | None = None,
    progress: bool = False,
    progress_desc: str = "simulate",
    window_s: float = 10.0,
    on_engine: Callable[[Engine], None] | None = None,
    put_at: Sequence[float] | None = None,
) -> RunResult:
    """Run one simulation. ``failures=None`` uses the spec's kills with its fixed delay; ``put_at``
    see ``Engine.run``."""
    fs = fixed_delay_failures(spec) if failures is None else list(failures)
    eng = Engine(
        spec,
        mesh=mesh,
        failures=fs if mesh else (),
        window_s=window_s,
        progress=progress,
        progress_desc=progress_desc,
    )
    if on_engine is not None:
        on_engine(eng)
    return eng.run(requests, put_at=put_at)
