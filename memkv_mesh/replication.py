"""The write path to the mesh: acknowledged blocks reach their owners, and none is lost on the way.

Theory of operation
-------------------
* A block a local client put is *dirty* until every one of its owners holds it. ``add`` marks it
  dirty in the store (a dirty block is never an eviction victim) and queues it on one FIFO per
  owner, in arrival order. This node is one of the owners to satisfy when it owns the block and
  writes through to NVMe (``store.write_through``): its own copy is made durable by
  ``store.persist``, like a push to itself.
* One worker per owner pushes that owner's queue, a batch at a time (``batch_keys`` /
  ``batch_bytes``; a queue shorter than a batch lingers ``linger_s`` first so a few puts travel
  together), each push bounded by ``timeout_s``. Owners are served concurrently, so a slow
  or SIGSTOPped owner delays its own share only; its worker backs off (0.25 s doubling to 5 s) and
  retries while the owner is still in the placement ring.
* A block is clean once its last owner confirmed it: ``store.mark_clean`` makes it evictable again
  and its replication lag (acknowledgement to last confirmation) is recorded.
* When the ring changes (gossip confirmed a death, a node joined) every dirty block is placed
  again: the share of an owner that left goes to the new owners (never retried forever), owners
  that confirmed stay done, and a block whose owners now all hold it is clean. A block with no
  candidate at all (no flash peer alive) is given up on: clean, counted (``unplaced``) and handed
  to the mesh's repair pass, which pushes it when candidates come back.
* A live owner that refuses a block ``max_refusals`` times (full, block too large) is given up on
  for that block, counted (``given_up``) and handed to the repair pass, so one owner that cannot
  take a block never pins DRAM for good.
* Back-pressure: ``wait_room`` lets a put go ahead when its bytes fit under ``limit`` with the
  dirty bytes (or nothing is dirty) and otherwise waits up to ``put_wait_s`` for replication to
  catch up; the daemon answers ``busy`` when it cannot. The bound is soft by the puts admitted at
  the same moment on other connections (each checked before any of them committed).
  ``wait_replicated`` is the ``ack = "replicated"`` path: the put returns once every owner holds
  its blocks.
* A deleted block (``discard``) leaves its queues at once. Everything runs on the Trio loop;
  transfers are the data plane's and local writes the store's worker threads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import numpy as np
import trio

log = logging.getLogger("memkv_mesh.replication")

__all__ = ["Replicator", "ReplicationStats"]

_BACKOFF_MIN_S = 0.25
_BACKOFF_MAX_S = 5.0
_LAGS_KEPT = 8192
# A worker whose queue holds less than a batch waits this long before pushing, so the puts of a
# few requests travel together: a push of 24 blocks of 16 KiB cost 20% less CPU per block than
# two of 12 (PushRequest/Ready/Done, a thread hop for the write-through, on both ends), for 10 ms
# of replication lag (the directory itself takes ~140 ms to tell other nodes).
_LINGER_S = 0.01


class _Store(Protocol):
    write_through: bool
    nvme: Any

    @property
    def dirty_bytes(self) -> int: ...

    def mark_dirty(self, keys: Sequence[bytes]) -> list[int]: ...

    def mark_clean(self, keys: Sequence[bytes]) -> None: ...

    async def persist(self, keys: Sequence[bytes]) -> list[bool]: ...


class _Plane(Protocol):
    async def push(
        self, peer: str, keys: list[bytes], *, fresh: bool = False, expect_node: str | None = None
    ) -> list[bool]: ...


class ReplicationStats(msgspec.Struct, frozen=True):
    pending_blocks: int  # dirty blocks being replicated
    dirty_bytes: int
    dirty_peak_bytes: int
    dirty_limit_bytes: int
    replicated: int  # block copies confirmed by an owner (pushes; local write-through excluded)
    persisted_local: int  # this node's own owner copies written through to NVMe
    replication_failures: int  # block copies a push attempt failed to deliver (retried)
    replaced: int  # owner shares moved to new owners after a ring change
    given_up: int  # block copies given up on (refused too often; handed to repair)
    unplaced: int  # blocks put while no owner was a candidate (handed to repair)
    backpressure_waits: int  # puts that had to wait for the dirty bound
    busy_rejections: int  # puts refused after waiting put_wait_s
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float


class _Block:
    __slots__ = ("done", "event", "need", "refusals", "since", "size")

    def __init__(self, need: set[str], since: float, size: int) -> None:
        self.need = need
        self.size = size
        self.done: set[str] = set()
        self.since = since
        self.event: trio.Event | None = None
        self.refusals = 0


class Replicator:
    def __init__(
        self,
        *,
        node_id: str,
        store: _Store,
        dataplane: _Plane,
        owners_of: Callable[[Sequence[bytes]], list[list[str]]],
        addr_of: Callable[[str], str | None],
        give_up: Callable[[list[bytes]], None],
        limit_bytes: int,
        put_wait_s: float = 10.0,
        timeout_s: float = 5.0,
        batch_keys: int = 256,
        batch_bytes: int = 16 << 20,
        max_refusals: int = 5,
        linger_s: float = _LINGER_S,
    ) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
        self.node_id = node_id
        self.store = store
        self.dataplane = dataplane
        self._owners_of = owners_of
        self._addr_of = addr_of
        self._give_up = give_up
        self.limit = limit_bytes
        self.put_wait_s = put_wait_s
        self.timeout_s = timeout_s
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        self.max_refusals = max_refusals
        self.linger_s = linger_s
        self._blocks: dict[bytes, _Block] = {}  # insertion order = arrival order
        self._queues: dict[str, dict[bytes, None]] = {}
        self._workers: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._stale = False
        self._room = trio.Event()
        self._peak = 0
        self._lags: deque[float] = deque(maxlen=_LAGS_KEPT)
        self._c = dict.fromkeys(
            ("replicated", "persisted_local", "replication_failures", "replaced", "given_up",
             "unplaced", "backpressure_waits", "busy_rejections"),
            0,
        )  # fmt: skip

    # ---- service ----------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for owner in self._queues:
                self._start(owner)
            task_status.started()
            await trio.sleep_forever()

    def _start(self, owner: str) -> None:
        if owner not in self._workers and self._nursery is not None:
            self._workers.add(owner)
            self._nursery.start_soon(self._worker, owner)

    # ---- questions --------------------------------------------------------------------------------
    def pending(self, key: bytes) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def statistics(self) -> ReplicationStats:
        lags = np.fromiter(self._lags, dtype=np.float64, count=len(self._lags))
        p50, p99, top = (np.percentile(lags, [50, 99, 100]).tolist() if len(lags) else (0.0, 0.0, 0.0))
        return ReplicationStats(
            pending_blocks=len(self._blocks),
            dirty_bytes=self.store.dirty_bytes,
            dirty_peak_bytes=self._peak,
            dirty_limit_bytes=self.limit,
            lag_p50_s=round(p50, 6),
            lag_p99_s=round(p99, 6),
            lag_max_s=round(top, 6),
            **self._c,
        )

    # ---- the write path -----------------------------------------------------------------------------
    def add(self, keys: Sequence[bytes]) -> None:
        """Blocks just committed by a local client: dirty until all their owners hold them."""
        fresh = [k for k in dict.fromkeys(keys) if k not in self._blocks]
        if not fresh:
            return
        rows = self._owners_of(fresh)  # may notice a ring change (ring_changed)
        if self._stale:
            self.replace()
        local = self._local_owner()
        now = trio.current_time()
        unplaced: list[bytes] = []
        todo: list[tuple[bytes, set[str]]] = []
        for k, row in zip(fresh, rows, strict=True):
            if not row:
                unplaced.append(k)
                continue
            need = {o for o in row if o != self.node_id or local}
            if need:
                todo.append((k, need))
        if unplaced:
            self._c["unplaced"] += len(unplaced)
            self._give_up(unplaced)
        if not todo:
            return
        sizes = self.store.mark_dirty([k for k, _ in todo])
        for (k, need), size in zip(todo, sizes, strict=True):
            if not size:
                continue  # not in DRAM (deleted meanwhile): nothing to protect
            self._blocks[k] = _Block(need, now, size)
            for o in need:
                self._enqueue(o, k)
        self._peak = max(self._peak, self.store.dirty_bytes)

    def _local_owner(self) -> bool:
        return bool(self.store.write_through and self.store.nvme is not None)

    def _enqueue(self, owner: str, key: bytes) -> None:
        q = self._queues.get(owner)
        if q is None:
            q = self._queues[owner] = {}
        q[key] = None
        self._start(owner)

    def ring_changed(self) -> None:
        """The placement ring moved; dirty blocks are placed again at the next step."""
        self._stale = True

    def replace_if_stale(self) -> None:
        if self._stale:
            self.replace()

    def replace(self) -> None:
        """Place every dirty block against the current ring (owners that left lose their share)."""
        self._stale = False
        keys = list(self._blocks)
        if not keys:
            self._queues = {}
            return
        rows = self._owners_of(keys)
        local = self._local_owner()
        queues: dict[str, dict[bytes, None]] = {}
        clean: list[bytes] = []
        unplaced: list[bytes] = []
        for k, row in zip(keys, rows, strict=True):
            b = self._blocks[k]
            if not row:
                unplaced.append(k)
                continue
            need = {o for o in row if o != self.node_id or local} - b.done
            self._c["replaced"] += len(need - b.need)
            b.need = need
            if not need:
                clean.append(k)
                continue
            for o in need:
                q = queues.get(o)
                if q is None:
                    q = queues[o] = {}
                q[k] = None
        self._queues = queues
        now = trio.current_time()
        self._clean(clean, now)
        if unplaced:
            self._c["unplaced"] += len(unplaced)
            self._clean(unplaced, now, lag=False)
            self._give_up(unplaced)
            log.warning(
                "no flash peer is a placement candidate: dirty blocks handed to repair",
                extra={"fields": {"blocks": len(unplaced)}},
            )
        for owner in queues:
            self._start(owner)

    def discard(self, keys: Sequence[bytes]) -> None:
        """Deleted blocks: stop replicating them."""
        gone = []
        for k in keys:
            b = self._blocks.pop(k, None)
            if b is None:
                continue
            gone.append(k)
            for o in b.need:
                q = self._queues.get(o)
                if q is not None:
                    q.pop(k, None)
            if b.event is not None:
                b.event.set()
        if gone:
            self.store.mark_clean(gone)
            self._wake_room()

    def _clean(self, keys: list[bytes], now: float, *, lag: bool = True) -> None:
        """Every owner of ``keys`` holds them (or they were given up on): evictable again."""
        done: list[bytes] = []
        for key in keys:
            b = self._blocks.pop(key, None)
            if b is None:
                continue
            done.append(key)
            if lag:
                self._lags.append(now - b.since)
            if b.event is not None:
                b.event.set()
        if done:
            self.store.mark_clean(done)
            self._wake_room()

    def _wake_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    # ---- back-pressure and ack = "replicated" -------------------------------------------------------
    def _fits(self, nbytes: int) -> bool:
        dirty = self.store.dirty_bytes
        return dirty == 0 or dirty + nbytes <= self.limit  # a batch bigger than the bound goes alone

    async def wait_room(self, nbytes: int) -> bool:
        """True once a put of ``nbytes`` fits under the limit with the dirty bytes (at once,
        usually); False if it did not for ``put_wait_s`` (the put is refused ``busy``)."""
        if self._fits(nbytes):
            return True
        self._c["backpressure_waits"] += 1
        with trio.move_on_after(self.put_wait_s):
            while not self._fits(nbytes):
                await self._room.wait()
            return True
        self._c["busy_rejections"] += 1
        return False

    async def wait_replicated(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Wait until every owner holds ``keys`` (at most ``timeout_s``); how many are still dirty."""
        with trio.move_on_after(timeout_s):
            for k in keys:
                b = self._blocks.get(k)
                if b is None:
                    continue
                if b.event is None:
                    b.event = trio.Event()
                await b.event.wait()
        return sum(k in self._blocks for k in keys)

    # ---- workers ------------------------------------------------------------------------------------
    def _take(self, owner: str, q: dict[bytes, None]) -> list[bytes]:
        """The first keys of ``owner``'s queue, up to a batch; keys no longer due are dropped."""
        out: list[bytes] = []
        stale: list[bytes] = []
        nbytes = 0
        for k in q:
            b = self._blocks.get(k)
            if b is None or owner not in b.need:
                stale.append(k)
                continue
            out.append(k)
            nbytes += b.size
            if len(out) >= self.batch_keys or nbytes >= self.batch_bytes:
                break
        for k in stale:
            del q[k]
        return out

    async def _worker(self, owner: str) -> None:
        delay = 0.0
        try:
            while True:
                if self._stale:
                    self.replace()
                q = self._queues.get(owner)
                if not q:
                    return
                if self.linger_s and len(q) < self.batch_keys:
                    await trio.sleep(self.linger_s)  # let a few more puts join this push
                    q = self._queues.get(owner)
                    if not q:
                        continue
                batch = self._take(owner, q)
                if not batch:
                    continue
                ok = await self._push(owner, batch)
                if ok is None:  # the owner is unreachable or timed out: back off, try again
                    self._c["replication_failures"] += len(batch)
                    delay = min(max(delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
                    await trio.sleep(delay)
                    continue
                delay = 0.0
                if self._settle(owner, batch, ok):
                    await trio.sleep(_BACKOFF_MIN_S)  # refusals: give the owner a moment
        finally:
            self._workers.discard(owner)

    def _settle(self, owner: str, batch: list[bytes], ok: list[bool]) -> bool:
        """Apply one push's answer; True if the owner refused any block."""
        now = trio.current_time()
        q = self._queues.get(owner)
        refused = False
        given_up: list[bytes] = []
        clean: list[bytes] = []
        for k, good in zip(batch, ok, strict=True):
            b = self._blocks.get(k)
            if b is None or owner not in b.need:
                continue
            if good:
                b.need.discard(owner)
                b.done.add(owner)
                self._c["persisted_local" if owner == self.node_id else "replicated"] += 1
            else:
                refused = True
                self._c["replication_failures"] += 1
                b.refusals += 1
                if b.refusals < self.max_refusals:
                    continue  # stays at the front of the queue
                b.need.discard(owner)
                self._c["given_up"] += 1
                given_up.append(k)
                log.warning(
                    "owner keeps refusing a block; handed to repair",
                    extra={"fields": {"owner": owner, "key": k.hex()}},
                )
            if q is not None:
                q.pop(k, None)
            if not b.need:
                clean.append(k)
        self._clean(clean, now)
        if given_up:
            self._give_up(given_up)
        return refused

    async def _push(self, owner: str, keys: list[bytes]) -> list[bool] | None:
        """One batch to one owner (this node: write-through); None if it could not be reached."""
        if owner == self.node_id:
            return await self.store.persist(keys)
        addr = self._addr_of(owner)
        if addr is None:
            return None
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                # expect_node: a peer answering at that address under another name is refused.
                return await self.dataplane.push(addr, keys, fresh=True, expect_node=owner)
            except Exception as e:  # DataPlaneError, or the peer gone mid-transfer
                log.info("replication to %s failed: %s", owner, e, extra={"fields": {"peer": owner, "keys": len(keys)}})
                return None
        if scope.cancelled_caught:
            log.info(
                "replication to %s timed out after %.1f s", owner, self.timeout_s,
                extra={"fields": {"peer": owner, "keys": len(keys)}},
            )  # fmt: skip
        return None
