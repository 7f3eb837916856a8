"""The node's tiered block store: DRAM arena -> NVMe tier -> dropped.

Theory of operation
-------------------
* A block is immutable bytes under a 32-byte key. Put is two steps so the bytes cross memory
  once: ``alloc`` reserves arena extents (all or nothing for a batch) and remembers them as the
  connection's *pending* slots; the client copies its bytes in; ``commit`` publishes them with the
  xxh3-64 checksum the client computed while the bytes were hot in its cache. A key that is already
  stored is not allocated again (offset -1): blocks are content-named, a second put is a no-op.
* Get pins the blocks it finds under a *lease* and returns their arena offsets. A pinned block is
  never evicted, demoted or freed; deleting or demoting it only *dooms* it (gone from the index, its
  extent freed when the last lease ends). Leases and pending slots belong to a connection, and
  ``drop_owner`` releases them all when the client goes away, however it went.
* When the arena is full, the eviction policy picks an unpinned victim; it is written to the NVMe
  tier (in a worker thread, the block pinned meanwhile) unless NVMe already holds it, then its
  extent is freed. The NVMe tier drops its own victims when it is full. A get that misses DRAM but
  hits NVMe promotes the block: a fresh extent, a read in a worker thread that verifies the
  checksum (a corrupt block is dropped and is a miss), then it is served like any DRAM block.
* A block can be *dirty*: acknowledged to a client and not yet held by all of its owners in the
  mesh (``mark_dirty`` / ``mark_clean``, driven by ``memkv_mesh/replication.py``). A dirty block is
  never an eviction victim, so the only copy of an acknowledged block cannot be dropped before it
  reached its owners; the mesh bounds the dirty bytes and makes puts wait (back-pressure) instead.
* ``persist`` writes DRAM blocks through to the NVMe tier (a flash node's replicas: its DRAM is a
  cache over NVMe), in one worker-thread hop per batch, then makes them durable per the fsync
  policy: ``"off"`` (the page cache: survives kill -9, not power loss), ``"batch"`` (one fdatasync
  of the data files and the journal per batch, before the caller confirms) or ``"always"`` (the
  tier syncs every write).
* Segments (``memkv_mesh/arena.py``): the arena is one address space cut into segments, one per
  tenant plus ``_mesh`` (or a single ``default`` one). Each has its own allocator and eviction
  policy, so a tenant's DRAM quota is its segment and its puts evict only its own blocks. A
  client's ``alloc`` and ``get`` name its segment; blocks the data plane receives land in segment
  0. A get that finds a block in another segment (a replica or fetch that landed in ``_mesh``)
  *relocates* it: a copy into the reader's segment, the old extent freed at its last unpin. Only
  the reader's tenant can name the (tenant-scoped) key, so this never hands one tenant's block
  to another.
* ``pending_checksums`` hashes the bytes of pending slots (xxh3-64, worker threads for large
  batches): the daemon commits a client's put with the checksum of the bytes actually there, so
  a committed block's recorded checksum always matches what was committed.
* All index state lives on the Trio loop and is changed only between awaits; only payload I/O
  runs in threads.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import msgspec
import trio
import xxhash

from memkv_mesh.alloc import ExtentAllocator
from memkv_mesh.arena import Arena
from memkv_mesh.eviction import DEFAULT_POLICY, make_policy
from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.nvme import NvmeFullError

if TYPE_CHECKING:
    from memkv_mesh.nvme import NvmeTier

log = logging.getLogger("memkv_mesh.store")

__all__ = ["FSYNC_POLICIES", "BlockStore", "StoreError", "StoreStats"]

# How write-through blocks are made durable (``[store] fsync``; docs/configuration.md).
FSYNC_POLICIES = ("off", "batch", "always")


class StoreError(Exception):
    """A request the store refuses; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SegmentStats(msgspec.Struct, frozen=True, array_like=False):
    name: str
    used_bytes: int
    capacity_bytes: int
    blocks: int


class StoreStats(msgspec.Struct, frozen=True):
    dram_blocks: int
    dram_used_bytes: int
    dram_capacity_bytes: int
    dram_largest_free_bytes: int
    nvme_blocks: int
    nvme_used_bytes: int
    nvme_capacity_bytes: int
    puts: int
    put_bytes: int
    hits_dram: int
    hits_nvme: int
    misses: int
    get_bytes: int
    lookups: int
    deletes: int
    demotions: int
    dram_drops: int
    nvme_drops: int
    corrupt_dropped: int
    active_leases: int
    pending_slots: int
    dirty_blocks: int = 0
    dirty_bytes: int = 0
    persisted: int = 0
    persist_failures: int = 0
    relocations: int = 0  # blocks copied into a tenant's segment on its first local read
    nvme_degraded: bool = False  # the NVMe tier refuses writes (disk full, I/O errors); resumes by itself
    nvme_degraded_reason: str = ""
    nvme_degraded_since: float = 0.0
    nvme_write_errors: int = 0
    nvme_read_errors: int = 0
    segments: list[SegmentStats] = []  # per arena segment, with tenants declared


class _Entry:
    __slots__ = ("checksum", "dirty", "doomed", "key", "length", "offset", "pins", "seg")

    def __init__(self, key: bytes, offset: int, length: int, checksum: int, seg: int = 0) -> None:
        self.key = key
        self.seg = seg  # the arena segment holding it
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.pins = 0
        self.doomed = False
        self.dirty = False  # acknowledged, and not yet held by all of its owners (never evicted)


class _Segment:
    """One arena segment's allocator and eviction policy (offsets are the arena's, global)."""

    __slots__ = ("alloc", "base", "idx", "name", "policy")

    def __init__(self, idx: int, name: str, base: int, size: int, eviction: str, align: int) -> None:
        self.idx = idx
        self.name = name
        self.base = base
        self.alloc = ExtentAllocator(size, align=align)
        self.policy = make_policy(eviction, size)

    def take(self, size: int) -> int | None:
        off = self.alloc.alloc(size)
        return None if off is None else off + self.base

    def free(self, offset: int) -> None:
        self.alloc.free(offset - self.base)

    def extent_size(self, offset: int) -> int:
        return self.alloc.extent_size(offset - self.base)


# Pending bytes hashed on the event loop at most; more goes to worker threads.
_HASH_INLINE_BYTES = 1 << 20


def _hash_views(views: Sequence[memoryview]) -> list[int]:
    return [xxhash.xxh3_64_intdigest(v) for v in views]


def _copy_view(dst: memoryview, src: memoryview) -> None:
    dst[:] = src


def _check_keys(keys: Sequence[bytes]) -> None:
    for i, k in enumerate(keys):
        if len(k) != KEY_BYTES:
            raise StoreError("bad_key", f"key {i} is {len(k)} bytes; keys are {KEY_BYTES} bytes")


class BlockStore:
    def __init__(
        self,
        arena: Arena,
        *,
        max_block_bytes: int,
        eviction: str = DEFAULT_POLICY,
        nvme: NvmeTier | None = None,
        align: int = 4096,
        fsync: str = "off",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.arena = arena
        self.max_block_bytes = max_block_bytes
        self.nvme = nvme
        self.fsync = fsync
        # Replicas pushed here are written through to NVMe before they are confirmed (a flash
        # node in a mesh); set by the daemon.
        self.write_through = False
        self._dirty_bytes = 0
        self._dirty_blocks = 0
        self._segs = [
            _Segment(i, sg.name, sg.base, sg.size, eviction, align) for i, sg in enumerate(arena.segments)
        ]
        self._bases = [sg.base for sg in self._segs]
        self._index: dict[bytes, _Entry] = {}
        self._pending: dict[Hashable, dict[bytes, tuple[int, int]]] = {}
        self._leases: dict[int, tuple[Hashable, list[_Entry]]] = {}
        self._owner_leases: dict[Hashable, set[int]] = {}
        self._lease_ids = itertools.count(1)
        self._promoting: dict[bytes, trio.Event] = {}
        # Told when a key becomes held by this node (any tier) or stops being held at all; the
        # mesh feeds these to the gossiped block directory. Plain calls: they must not block.
        self.on_added: Callable[[list[bytes]], None] | None = None
        self.on_removed: Callable[[list[bytes]], None] | None = None
        self._unpromote: set[bytes] = set()  # deleted while being promoted
        self._c = dict.fromkeys(
            (
                "puts", "put_bytes", "hits_dram", "hits_nvme", "misses", "get_bytes", "lookups",
                "deletes", "demotions", "dram_drops", "nvme_drops", "persisted", "persist_failures", "relocations",
            ),
            0,
        )  # fmt: skip

    # ---- segments -----------------------------------------------------------------------------------
    def _seg_of(self, offset: int) -> _Segment:
        segs = self._segs
        return segs[0] if len(segs) == 1 else segs[bisect.bisect_right(self._bases, offset) - 1]

    def _free(self, offset: int) -> None:
        self._seg_of(offset).free(offset)

    def segment_base(self, segment: int) -> int:
        return self._segs[segment].base

    def lease_count(self, owner: Hashable) -> int:
        return len(self._owner_leases.get(owner, ()))

    def pending_count(self, owner: Hashable) -> int:
        return len(self._pending.get(owner, ()))

    # ---- questions answered without waiting -----------------------------------------------------
    def _present(self, key: bytes) -> bool:
        return key in self._index or (self.nvme is not None and key in self.nvme)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present in any tier."""
        self._c["lookups"] += 1
        index, nvme = self._index, self.nvme
        n = 0
        for k in keys:
            if k in index or (nvme is not None and k in nvme):
                n += 1
            else:
                break
        return n

    def dram_checksum(self, key: bytes, offset: int) -> int | None:
        """The checksum recorded at put time for the DRAM block at ``offset`` (None: not that block)."""
        e = self._index.get(key)
        return e.checksum if e is not None and e.offset == offset else None

    def lengths(self, keys: Sequence[bytes]) -> list[int | None]:
        """Each key's block length in whichever tier holds it (None: not held)."""
        out: list[int | None] = []
        for k in keys:
            e = self._index.get(k)
            out.append(e.length if e is not None else (self.nvme.length(k) if self.nvme is not None else None))
        return out

    def held_keys(self) -> set[bytes]:
        """Every key held in any tier (for announcing holdings at start-up)."""
        out = set(self._index)
        if self.nvme is not None:
            out.update(self.nvme.keys())
        return out

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [self._present(k) for k in keys]

    # ---- put --------------------------------------------------------------------------------------
    async def alloc(
        self, owner: Hashable, keys: Sequence[bytes], sizes: Sequence[int], segment: int = 0
    ) -> list[int]:
        """Reserve extents (in ``segment``) for the keys not yet stored; -1 for those already stored."""
        if len(keys) != len(sizes):
            raise StoreError("bad_request", f"{len(keys)} keys but {len(sizes)} sizes")
        _check_keys(keys)
        if len(set(keys)) != len(keys):
            raise StoreError("bad_request", "the same key appears twice in one batch")
        pending = self._pending.setdefault(owner, {})
        for i, (k, size) in enumerate(zip(keys, sizes, strict=True)):
            if size <= 0:
                raise StoreError("bad_request", f"block {i} has size {size}; sizes must be > 0")
            if size > self.max_block_bytes:
                raise StoreError(
                    "too_large",
                    f"block {i} is {size} bytes; the limit is store.max_block_bytes = {self.max_block_bytes}",
                )
            if k in pending:
                raise StoreError("bad_request", f"key {i} is already allocated and not yet committed")
        offsets: list[int] = []
        got: list[tuple[bytes, int, int]] = []
        gone: list[bytes] = []  # evicted to make room: the listener hears of them once, at the end
        try:
            for k, size in zip(keys, sizes, strict=True):
                if k in self._index and not self._index[k].doomed:
                    offsets.append(-1)
                    continue
                off = await self._make_room(size, gone, segment)
                got.append((k, off, size))
                offsets.append(off)
        except BaseException:
            for _, off, _ in got:
                self._free(off)
            raise
        finally:
            self._gone(gone)
        for k, off, size in got:
            pending[k] = (off, size)
        return offsets

    def commit(self, owner: Hashable, keys: Sequence[bytes], checksums: Sequence[int]) -> int:
        """Publish pending slots; returns how many became new blocks."""
        if len(keys) != len(checksums):
            raise StoreError("bad_request", f"{len(keys)} keys but {len(checksums)} checksums")
        if len(set(keys)) != len(keys):
            raise StoreError("bad_request", "the same key appears twice in one commit")
        pending = self._pending.get(owner, {})
        missing = [i for i, k in enumerate(keys) if k not in pending]
        if missing:
            raise StoreError(
                "not_allocated", f"key {missing[0]} of the commit was not allocated on this connection"
            )
        stored = 0
        added: list[bytes] = []
        for k, c in zip(keys, checksums, strict=True):
            off, size = pending.pop(k)
            old = self._index.get(k)
            if old is not None and not old.doomed:
                self._free(off)  # a concurrent put of the same block won the race
                continue
            seg = self._seg_of(off)
            self._index[k] = _Entry(k, off, size, c, seg.idx)
            seg.policy.insert(k, seg.extent_size(off))
            self._c["puts"] += 1
            self._c["put_bytes"] += size
            stored += 1
            if self.nvme is None or k not in self.nvme:
                added.append(k)
        if added and self.on_added is not None:
            self.on_added(added)
        return stored

    def abort(self, owner: Hashable, keys: Sequence[bytes] | None = None) -> int:
        pending = self._pending.get(owner, {})
        todo = list(pending) if keys is None else [k for k in dict.fromkeys(keys) if k in pending]
        for k in todo:
            off, _ = pending.pop(k)
            self._free(off)
        return len(todo)

    async def pending_checksums(self, owner: Hashable, keys: Sequence[bytes]) -> list[int]:
        """xxh3-64 of the bytes now in ``owner``'s pending slots for ``keys`` (what a commit
        will record). Large batches are hashed in worker threads, two at a time."""
        if len(set(keys)) != len(keys):
            raise StoreError("bad_request", "the same key appears twice in one commit")
        pending = self._pending.get(owner, {})
        missing = [i for i, k in enumerate(keys) if k not in pending]
        if missing:
            raise StoreError("not_allocated", f"key {missing[0]} of the commit was not allocated on this connection")
        views = [self.arena.slice(*pending[k]) for k in keys]
        try:
            if sum(v.nbytes for v in views) <= _HASH_INLINE_BYTES:
                return _hash_views(views)
            half = (len(views) + 1) // 2
            parts: list[list[int]] = [[], []]

            async def run(i: int, vs: Sequence[memoryview]) -> None:
                parts[i] = await trio.to_thread.run_sync(_hash_views, vs)

            async with trio.open_nursery() as n:
                n.start_soon(run, 0, views[:half])
                if views[half:]:
                    n.start_soon(run, 1, views[half:])
            return parts[0] + parts[1]
        finally:
            for v in views:
                v.release()

    async def _make_room(self, size: int, gone: list[bytes], segment: int = 0) -> int:
        """An extent of ``size`` bytes in ``segment``, evicting its unpinned blocks until one
        exists; keys that left this node altogether are added to ``gone`` for the caller's ``_gone``."""
        seg = self._segs[segment]
        while True:
            off = seg.take(size)
            if off is not None:
                return off
            victim = seg.policy.pop_victim(self._evictable)
            if victim is None:
                where = f"segment {seg.name!r}" if len(self._segs) > 1 else "arena"
                raise StoreError(
                    "full",
                    f"no room for a {size}-byte block: the {where}'s {seg.alloc.used_bytes} used bytes "
                    f"are all pinned by leases or pending puts, or dirty ({self._dirty_bytes} bytes "
                    "not yet on their owners)",
                )
            await self._evict(self._index[victim], gone)  # type: ignore[index]

    def _evictable(self, key: object) -> bool:
        e = self._index.get(key)  # type: ignore[call-overload]
        return e is not None and e.pins == 0 and not e.dirty

    # ---- dirty blocks (acknowledged, not yet on their owners) -----------------------------------
    @property
    def dirty_bytes(self) -> int:
        return self._dirty_bytes

    @property
    def dirty_blocks(self) -> int:
        return self._dirty_blocks

    def mark_dirty(self, keys: Sequence[bytes]) -> list[int]:
        """Make DRAM blocks unevictable until ``mark_clean``. Per key, the block's length if it
        is now dirty (it was in DRAM), else 0 (not in DRAM: nothing to protect here)."""
        out: list[int] = []
        for k in keys:
            e = self._index.get(k)
            if e is None or e.doomed:
                out.append(0)
                continue
            if not e.dirty:
                e.dirty = True
                self._dirty_bytes += e.length
                self._dirty_blocks += 1
            out.append(e.length)
        return out

    def mark_clean(self, keys: Sequence[bytes]) -> None:
        """The blocks' owners hold them (or they were given up on): evictable again."""
        for k in keys:
            e = self._index.get(k)
            if e is not None and e.dirty:
                self._clean(e)

    def _clean(self, e: _Entry) -> None:
        e.dirty = False
        self._dirty_bytes -= e.length
        self._dirty_blocks -= 1

    async def _evict(self, e: _Entry, gone: list[bytes]) -> None:
        """Move one unpinned DRAM block to NVMe (or drop it) and free its extent; keys this node no
        longer holds in any tier go to ``gone``."""
        nvme = self.nvme
        if nvme is not None and e.key not in nvme and not nvme.accepts_writes:
            # The tier is degraded (disk full, I/O errors) and no probe is due: victims are never
            # dirty (their owners hold them), so the block is dropped without a thread hop.
            self._c["dram_drops"] += 1
            self._remove(e)
            gone.append(e.key)
            return
        if nvme is not None and e.key not in nvme:
            e.pins += 1
            view = self.arena.slice(e.offset, e.length)
            try:
                dropped = await trio.to_thread.run_sync(nvme.put, e.key, view, e.checksum)
            except (NvmeFullError, ValueError, OSError) as err:
                # NVMe cannot take it (everything there pinned, the block too big for a data
                # file, ENOSPC or EIO: NvmeIOError/NvmeDegradedError): it is a cache and the
                # victim is clean, so the block is dropped rather than failing the put.
                self._c["nvme_drops"] += len(getattr(err, "dropped", ()))
                self._c["dram_drops"] += 1
                gone.extend(getattr(err, "dropped", ()))
            except BaseException:
                # (a closed tier, a cancelled thread wait) pop_victim already took it out of the
                # policy: put it back, or it would stay indexed and never evictable again.
                if not e.doomed and self._index.get(e.key) is e:
                    seg = self._segs[e.seg]
                    seg.policy.insert(e.key, seg.extent_size(e.offset))
                raise
            else:
                self._c["demotions"] += 1
                self._c["nvme_drops"] += len(dropped)
                gone.extend(dropped)
                if e.doomed:  # deleted while it was being written: do not resurrect it
                    await trio.to_thread.run_sync(nvme.delete, e.key)
                    gone.append(e.key)
            finally:
                view.release()
                e.pins -= 1
                if e.doomed and e.pins == 0:
                    self._free(e.offset)
            if e.doomed:
                return
            self._remove(e)
            gone.append(e.key)  # gone only if NVMe could not take it
            return
        if nvme is None:
            self._c["dram_drops"] += 1
        self._remove(e)
        if nvme is None or e.key not in nvme:
            gone.append(e.key)

    def _gone(self, keys: Sequence[bytes]) -> None:
        """Tell the listener which of ``keys`` this node no longer holds in any tier."""
        if self.on_removed is None or not keys:
            return
        nvme = self.nvme
        gone = [k for k in keys if k not in self._index and (nvme is None or k not in nvme)]
        if gone:
            self.on_removed(gone)

    def _remove(self, e: _Entry) -> None:
        """Take a block out of the DRAM index; its extent is freed now or at its last unpin."""
        if e.doomed:
            return
        if e.dirty:
            self._clean(e)
        if self._index.get(e.key) is e:
            del self._index[e.key]
        self._segs[e.seg].policy.remove(e.key)
        e.doomed = True
        if e.pins == 0:
            self._free(e.offset)

    # ---- write-through ----------------------------------------------------------------------------
    async def persist(self, keys: Sequence[bytes]) -> list[bool]:
        """Write DRAM blocks through to the NVMe tier and make them durable per ``fsync``.

        True per key now on NVMe (already there, or written now); False where the block is not
        held here or the tier refused it (larger than a data file, everything there pinned, an I/O
        error), and for every key without an NVMe tier. The whole batch is one worker-thread hop.
        """
        nvme = self.nvme
        out = [False] * len(keys)
        if nvme is None:
            return out
        todo: list[tuple[int, _Entry]] = []
        for i, k in enumerate(keys):
            if k in nvme:
                out[i] = True
                continue
            e = self._index.get(k)
            if e is not None and not e.doomed:
                e.pins += 1
                todo.append((i, e))
        if todo and not nvme.accepts_writes:  # degraded and no probe due: refuse without a thread hop
            self._unpin([e for _, e in todo])
            self._c["persist_failures"] += len(todo)
            return out
        if not todo and (self.fsync != "batch" or not any(out)):
            return out
        views = [self.arena.slice(e.offset, e.length) for _, e in todo]
        sync = self.fsync == "batch"

        def write() -> tuple[list[bool], list[bytes]]:
            try:  # one journal append for the batch
                ok, dropped = nvme.put_many([(e.key, v, e.checksum) for (_, e), v in zip(todo, views, strict=True)])
            except OSError:  # the journal append failed: nothing of the batch is published
                return [False] * len(todo), []
            if sync:
                try:
                    nvme.sync()
                except OSError:
                    return [False] * len(ok), dropped
            return ok, dropped

        try:
            ok, dropped = await trio.to_thread.run_sync(write)
        finally:
            for v in views:
                v.release()
            self._unpin([e for _, e in todo])
        if sync and len(ok) and not any(ok):
            out = [False] * len(keys)  # the batch sync failed: nothing here is known durable
        self._gone(dropped)
        doomed: list[bytes] = []
        for (i, e), good in zip(todo, ok, strict=True):
            if good and e.doomed and self._index.get(e.key) is None:
                doomed.append(e.key)  # deleted while it was being written: do not resurrect it
                continue
            out[i] = good
        for k in doomed:
            await trio.to_thread.run_sync(nvme.delete, k)
        self._gone(doomed)
        self._c["persisted"] += sum(ok)
        self._c["persist_failures"] += len(ok) - sum(ok)
        return out

    # ---- get --------------------------------------------------------------------------------------
    async def get(
        self, owner: Hashable, keys: Sequence[bytes], *, count: bool = True, segment: int | None = None
    ) -> tuple[int, list[tuple[int, int] | None]]:
        """Pin what is found (promoting from NVMe) under one lease: (lease id or 0, locations).

        ``segment``: every block returned lies in that segment (a local client's), relocated
        there if it was elsewhere; None: wherever it is (the data plane).
        ``count=False``: a second look at keys whose hit or miss was already counted (the daemon
        pinning blocks it just fetched from the mesh), so hits and misses are not counted twice."""
        _check_keys(keys)
        pinned: list[_Entry] = []
        out: list[tuple[int, int] | None] = []
        try:
            for k in keys:
                e = self._index.get(k)
                if e is None and self.nvme is not None and k in self.nvme:
                    e = await self._promote(k, segment or 0)
                    if e is not None and count:
                        self._c["hits_nvme"] += 1
                elif e is not None and count:
                    self._c["hits_dram"] += 1
                if e is not None and segment is not None and e.seg != segment:
                    e = await self._relocate(e, segment)
                if e is None:
                    self._c["misses"] += count
                    out.append(None)
                    continue
                e.pins += 1
                pinned.append(e)
                self._segs[e.seg].policy.touch(k)
                self._c["get_bytes"] += e.length
                out.append((e.offset, e.length))
        except BaseException:
            self._unpin(pinned)
            raise
        if not pinned:
            return 0, out
        lease = next(self._lease_ids)
        self._leases[lease] = (owner, pinned)
        self._owner_leases.setdefault(owner, set()).add(lease)
        return lease, out

    async def _relocate(self, e: _Entry, segment: int) -> _Entry | None:
        """Move DRAM block ``e`` into ``segment`` (a local reader's); the entry that now serves
        it there, or None if it was deleted or replaced meanwhile (a miss for this get)."""
        self._c["relocations"] += 1
        gone: list[bytes] = []
        e.pins += 1
        off = -1
        try:
            off = await self._make_room(e.length, gone, segment)
            dst, src = self.arena.slice(off, e.length), self.arena.slice(e.offset, e.length)
            try:
                if e.length > _HASH_INLINE_BYTES:
                    await trio.to_thread.run_sync(_copy_view, dst, src)
                else:
                    dst[:] = src
            finally:
                dst.release()
                src.release()
        except BaseException:
            if off >= 0:
                self._free(off)
            raise
        finally:
            e.pins -= 1
            if e.doomed and e.pins == 0:
                self._free(e.offset)
            self._gone(gone)
        if self._index.get(e.key) is not e or e.doomed:
            self._free(off)
            return None
        was_dirty = e.dirty
        self._remove(e)  # its extent is freed now, or at its last unpin
        new = self._index[e.key] = _Entry(e.key, off, e.length, e.checksum, segment)
        seg = self._segs[segment]
        seg.policy.insert(e.key, seg.extent_size(off))
        if was_dirty:
            new.dirty = True
            self._dirty_bytes += new.length
            self._dirty_blocks += 1
        return new

    async def _promote(self, key: bytes, segment: int = 0) -> _Entry | None:
        """Copy an NVMe block into the arena, verifying its checksum; None if it is gone or corrupt."""
        ev = self._promoting.get(key)
        if ev is not None:
            await ev.wait()
            return self._index.get(key)
        nvme = self.nvme
        assert nvme is not None
        length = nvme.length(key)
        checksum = nvme.checksum(key)
        if length is None or checksum is None:
            return None
        ev = self._promoting[key] = trio.Event()
        gone: list[bytes] = []
        try:
            off = await self._make_room(length, gone, segment)
            try:
                view = self.arena.slice(off, length)
                try:
                    got = await trio.to_thread.run_sync(nvme.read_into, key, view)
                finally:
                    view.release()
            except Exception as err:  # a backend error, a closed tier, the block replaced meanwhile
                self._free(off)
                log.warning("promoting a block from NVMe failed: %s", err, extra={"fields": {"key": key.hex()}})
                return None  # a miss
            except BaseException:
                self._free(off)
                raise
            existing = self._index.get(key)
            if got is None or existing is not None or key in self._unpromote:
                # Corrupt (dropped by the tier), put again meanwhile, or deleted meanwhile.
                self._free(off)
                if got is None:
                    gone.append(key)
                return existing
            e = _Entry(key, off, got, checksum, segment)
            self._index[key] = e
            self._segs[segment].policy.insert(key, self._segs[segment].extent_size(off))
            return e
        finally:
            del self._promoting[key]
            self._unpromote.discard(key)
            self._gone(gone)
            ev.set()

    def release(self, owner: Hashable, lease: int) -> bool:
        got = self._leases.get(lease)
        if got is None or got[0] != owner:
            return False
        del self._leases[lease]
        self._owner_leases[owner].discard(lease)
        self._unpin(got[1])
        return True

    def _unpin(self, entries: list[_Entry]) -> None:
        for e in entries:
            e.pins -= 1
            if e.pins == 0 and e.doomed:
                self._free(e.offset)

    def drop_owner(self, owner: Hashable) -> tuple[int, int]:
        """A connection is gone: end its leases and free its pending slots. Returns (leases, slots)."""
        leases = self._owner_leases.pop(owner, set())
        for lease in leases:
            _, entries = self._leases.pop(lease)
            self._unpin(entries)
        slots = self.abort(owner)
        self._pending.pop(owner, None)
        return len(leases), slots

    # ---- delete -----------------------------------------------------------------------------------
    async def delete(self, keys: Sequence[bytes]) -> int:
        _check_keys(keys)
        n = 0
        for k in keys:
            found = False
            if k in self._promoting:
                self._unpromote.add(k)
            e = self._index.get(k)
            if e is not None:
                self._remove(e)
                found = True
            if self.nvme is not None and k in self.nvme:
                found = await trio.to_thread.run_sync(self.nvme.delete, k) or found
            n += found
        self._c["deletes"] += n
        self._gone(list(keys))
        return n

    # ---- introspection ----------------------------------------------------------------------------
    def statistics(self) -> StoreStats:
        nv = self.nvme.statistics() if self.nvme is not None else None
        c = self._c
        return StoreStats(
            dram_blocks=len(self._index),
            dram_used_bytes=sum(sg.alloc.used_bytes for sg in self._segs),
            dram_capacity_bytes=sum(sg.alloc.capacity for sg in self._segs),
            dram_largest_free_bytes=max(sg.alloc.largest_free for sg in self._segs),
            nvme_blocks=nv.blocks if nv else 0,
            nvme_used_bytes=nv.used_bytes if nv else 0,
            nvme_capacity_bytes=nv.capacity if nv else 0,
            puts=c["puts"],
            put_bytes=c["put_bytes"],
            hits_dram=c["hits_dram"],
            hits_nvme=c["hits_nvme"],
            misses=c["misses"],
            get_bytes=c["get_bytes"],
            lookups=c["lookups"],
            deletes=c["deletes"],
            demotions=c["demotions"],
            dram_drops=c["dram_drops"],
            nvme_drops=c["nvme_drops"],
            corrupt_dropped=(nv.dropped_corrupt + nv.dropped_torn) if nv else 0,
            active_leases=len(self._leases),
            pending_slots=sum(len(p) for p in self._pending.values()),
            dirty_blocks=self._dirty_blocks,
            dirty_bytes=self._dirty_bytes,
            persisted=c["persisted"],
            persist_failures=c["persist_failures"],
            relocations=c["relocations"],
            nvme_degraded=nv.degraded if nv else False,
            nvme_degraded_reason=nv.degraded_reason if nv else "",
            nvme_degraded_since=nv.degraded_since if nv else 0.0,
            nvme_write_errors=nv.write_errors if nv else 0,
            nvme_read_errors=nv.read_errors if nv else 0,
            segments=[
                SegmentStats(sg.name, sg.alloc.used_bytes, sg.alloc.capacity, len(sg.policy)) for sg in self._segs
            ] if len(self._segs) > 1 else [],
        )  # fmt: skip
