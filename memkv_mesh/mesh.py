"""The daemon's view of the mesh: membership + placement + data plane, glued for the store.

Theory of operation
-------------------
* Membership comes from the gossip service: the alive members whose role is ``flash`` or
  ``both`` and who advertise a data-plane address are the placement candidates, weighted by their
  advertised capacity. ``Rendezvous`` is rebuilt only when that set changes.
* The *owners* of a block are the ``replicas`` best-scoring candidates (``placement.py``); every
  node computes the same owners with no coordinator.
* Put: the daemon stores the block locally and acknowledges (or, with ``ack = "replicated"``,
  waits for its owners); ``replicate`` hands it to the ``Replicator`` (``replication.py``): the
  block is dirty, so never evicted, until every owner holds it; owners are served concurrently in
  arrival order; a death re-places the dead owner's share; puts feel back-pressure (``wait_room``)
  when the dirty bytes reach their bound, never silent loss.
* Delete: mesh-wide (``delete``). The key is tombstoned here, removed from this node, and a
  ``DeleteRequest`` goes to its owners and every holder the directory names; a node that rejoins
  is sent every live tombstone. A push of a tombstoned key is refused ``DELETED`` and the pusher
  deletes its own copy, so a replica never brings a deleted block back. ``drop_local`` drops only
  this node's copies (after any dirty one reached its owners).
* Get: keys the local store misses are fetched from their owners (then any other holder the
  directory names, when the gossiped directory is present), batched per peer, straight into the
  arena by the data plane, which verifies every block's checksum; then the store serves them. A
  peer that is down or returns a corrupt block costs that attempt only: the next candidate is
  tried, and what no candidate has is a miss.
* Self-healing: when the candidate set changes (a join, leave or death), a repair pass places
  every held block against the new ring and the ring of the previous pass, both as numpy batches
  (``Rendezvous.owner_matrix``: about 0.2-1.5 us per key), and looks one key at a time only at
  the blocks whose owners moved. The only state kept between passes is the previous ring, plus
  the keys whose replication failed (bounded), which the next pass retries.
* Nothing here blocks the Trio loop: placement is a few xxh3 calls per key, or numpy batches of
  at most ``_REPAIR_CHUNK`` keys between checkpoints; transfers are the data plane's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import trio
import trio.lowlevel

from memkv_mesh.placement import PLACEMENT_VERSION, Candidate, Rendezvous, key_hashes
from memkv_mesh.replication import Replicator
from memkv_mesh.tombstones import Tombstones

if TYPE_CHECKING:
    from transport.dataplane import OnStored

log = logging.getLogger("memkv_mesh.mesh")

__all__ = ["Mesh", "MeshStats"]

# Keys kept for the next repair pass at most (failed or given-up replication); beyond this the
# oldest are dropped (counted).
_REPLICATION_QUEUE = 65536
# Keys per repair push batch.
_PUSH_BATCH = 64
# Keys placed per numpy batch in a repair pass or a hand-off, between checkpoints of the loop.
_REPAIR_CHUNK = 16384
# Keys per DeleteRequest.
_DELETE_BATCH = 4096


class MeshStats(msgspec.Struct, frozen=True):
    replicas: int
    candidates: int
    fetched: int
    fetch_misses: int
    fetch_errors: int
    replicated: int
    replication_failures: int
    replication_dropped: int
    replication_queued: int
    repair_passes: int
    repaired: int
    repaired_bytes: int
    handed_off: int
    # The write path (replication.py): dirty = acknowledged, not yet on all owners.
    dirty_blocks: int = 0
    dirty_bytes: int = 0
    dirty_peak_bytes: int = 0
    dirty_limit_bytes: int = 0
    backpressure_waits: int = 0
    busy_rejections: int = 0
    replication_lag_p50_s: float = 0.0
    replication_lag_p99_s: float = 0.0
    replication_lag_max_s: float = 0.0
    replication_replaced: int = 0
    replication_given_up: int = 0
    replication_unplaced: int = 0
    persisted_local: int = 0
    # Mesh-wide deletes.
    deletes: int = 0
    delete_requests_failed: int = 0
    tombstones: int = 0


class Mesh:
    def __init__(
        self,
        *,
        node_id: str,
        gossip: Any,
        dataplane: Any,
        store: Any,
        replicas: int,
        repair_bytes_per_s: float = 256e6,
        repair_interval_s: float = 30.0,
        tombstones: Tombstones | None = None,
        dirty_limit_bytes: int = 1 << 62,
        put_wait_s: float = 10.0,
        replication_timeout_s: float = 5.0,
        delete_timeout_s: float = 5.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.tombstones = tombstones if tombstones is not None else Tombstones(600.0, 65536)
        self.delete_timeout_s = delete_timeout_s
        self._delete_retry: dict[str, dict[bytes, None]] = {}  # peer -> keys its delete failed for
        self.replicator = Replicator(
            node_id=node_id, store=store, dataplane=dataplane, owners_of=self._owner_rows,
            addr_of=self._addr, give_up=self._to_repair, limit_bytes=dirty_limit_bytes,
            put_wait_s=put_wait_s, timeout_s=replication_timeout_s,
        )  # fmt: skip
        self.repair_bytes_per_s = repair_bytes_per_s
        self.repair_interval_s = repair_interval_s
        self._prev_ring: Rendezvous | None = None  # the ring of the last repair pass
        self._retry: dict[bytes, None] = {}  # keys whose replication failed, for the next pass
        self._repair_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Membership events seen (member_event); once the gossip delivers them, the ring is
        # rebuilt only after one, not on every put and get.
        self._evented = False
        self._events = 0
        self._seen_events = -1
        self.node_id = node_id
        self.gossip = gossip
        self.dataplane = dataplane
        self.store = store
        self.replicas = replicas
        self._ring_key: tuple[tuple[str, float], ...] | None = None
        self._ring: Rendezvous | None = None
        self._addrs: dict[str, str] = {}
        self._suspects: set[str] = set()
        self._other_placement: set[str] = set()  # peers already warned about
        self._c = dict.fromkeys(
            (
                "fetched", "fetch_misses", "fetch_errors", "replication_failures",
                "replication_dropped", "repair_passes", "repaired", "repaired_bytes", "handed_off",
                "deletes", "delete_requests_failed",
            ),
            0,
        )

    # ---- membership view --------------------------------------------------------------------
    def _refresh(self) -> Rendezvous | None:
        """The placement ring of the current membership (rebuilt only when its candidates change).

        Suspects stay candidates: SWIM suspects a node first and confirms its death seconds later,
        and a suspicion is often refuted (a node stalled, a lost probe). Dropping suspects would
        move owners, and start repair traffic, twice on every false suspicion. Gets try suspects
        last instead (``_peers_for``)."""
        if self._evented and self._seen_events == self._events:
            return self._ring  # no membership event since the last look: nothing can have moved
        self._seen_events = self._events
        members = self.gossip.members()
        cands: list[tuple[str, float]] = []
        addrs: dict[str, str] = {}
        suspects: set[str] = set()
        for m in members:
            meta = m.meta
            if m.state not in ("alive", "suspect") or meta.role not in ("flash", "both") or not meta.data_addr:
                continue
            if meta.capacity_weight <= 0:
                continue
            version = getattr(meta, "placement", PLACEMENT_VERSION)
            if version != PLACEMENT_VERSION:
                if m.node_id not in self._other_placement:
                    self._other_placement.add(m.node_id)
                    log.warning(
                        "flash peer computes owners with another placement version; left out of placement "
                        "(its blocks are still found through the directory): upgrade the whole mesh",
                        extra={"fields": {"peer": m.node_id, "theirs": version, "ours": PLACEMENT_VERSION}},
                    )
                continue
            cands.append((m.node_id, float(meta.capacity_weight)))
            addrs[m.node_id] = meta.data_addr
            if m.state == "suspect":
                suspects.add(m.node_id)
        self._suspects = suspects
        key = tuple(sorted(cands))
        if key != self._ring_key:
            self._ring_key = key
            self._ring = Rendezvous([Candidate(n, w) for n, w in key]) if key else None
            self._repair_wake.set()  # owners moved for some keys: re-replicate
            self.replicator.ring_changed()  # and dirty blocks are placed again
        self._addrs = addrs
        return self._ring

    def owners(self, key: bytes) -> list[str]:
        ring = self._refresh()
        if ring is None:
            return []
        return ring.owners(key, min(self.replicas, len(ring)))

    def _owner_rows(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Per key, its owners under the current ring (fewer than R with few candidates)."""
        ring = self._refresh()
        if ring is None:
            return [[] for _ in keys]
        return ring.owners_many(keys, self.replicas)

    def _peers_for(self, keys: Sequence[bytes], *, owners: bool = True) -> list[list[str]]:
        """Per key we lack, the nodes to try, never ourselves: its owners, or (``owners=False``)
        the other holders the gossiped directory names. Suspects go last."""
        if owners:
            ring = self._refresh()
            if ring is None:
                plans: list[list[str]] = [[] for _ in keys]
            else:
                plans = [[n for n in row if n != self.node_id] for row in ring.owners_many(keys, self.replicas)]
        else:
            holders = getattr(self.gossip, "lookup_holders", None)
            if holders is None or not keys:
                return [[] for _ in keys]
            plans = [[n for n in hs if n != self.node_id] for hs in holders(list(keys))]
        if self._suspects:  # a suspect may be dead: try everyone else first
            plans = [sorted(plan, key=lambda n: n in self._suspects) for plan in plans]
        return plans

    def _addr(self, node: str) -> str | None:
        addr = self._addrs.get(node)
        if addr is None:
            for m in self.gossip.members():
                if m.node_id == node and m.state in ("alive", "suspect") and m.meta.data_addr:
                    return str(m.meta.data_addr)
        return addr

    # ---- lookup --------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Leading keys held here or, by the gossiped directory, by an alive peer. No network.
        A key deleted mesh-wide lately ends the prefix, whatever a stale directory entry says."""
        n = self.store.lookup(keys)
        if n == len(keys):
            return n
        in_mesh = getattr(self.gossip, "prefix_in_mesh", None)
        if in_mesh is None:
            return n
        rest = keys[n:]
        dead = self.tombstones
        if dead:
            for i, k in enumerate(rest):
                if k in dead:
                    rest = rest[:i]
                    break
        return n + int(in_mesh(rest)) if rest else n

    # ---- get path --------------------------------------------------------------------------------
    async def fetch_missing(self, keys: Sequence[bytes], on_stored: OnStored | None = None) -> int:
        """Fetch blocks this node lacks from their owners/holders; returns how many arrived.

        ``on_stored(keys)`` is awaited with each group of blocks as soon as it is stored here
        (see ``DataPlane.fetch``), so a streamed get can hand them on before the rest arrive."""
        keys = list(dict.fromkeys(keys))  # a key asked for twice is fetched once
        dead = self.tombstones
        todo = [
            k for k, have in zip(keys, self.store.contains(keys), strict=True) if not have and k not in dead
        ]  # fmt: skip
        got = 0
        tried: dict[bytes, int] = dict.fromkeys(todo, 0)
        plans = dict(zip(todo, self._peers_for(todo), strict=True))
        asked: set[bytes] = set()  # keys whose directory holders are in their plan
        while todo:
            # Owners first (they hold nearly everything); the directory's other holders (a GPU
            # node's own copy, a block not yet replicated) only once the owners came up short.
            out = [k for k in todo if tried[k] >= len(plans[k]) and k not in asked]
            if out:
                asked.update(out)
                for k, more in zip(out, self._peers_for(out, owners=False), strict=True):
                    plans[k] += [n for n in more if n not in plans[k]]
            by_peer: dict[str, list[bytes]] = {}
            rest: list[bytes] = []
            for k in todo:
                cands = plans[k]
                if tried[k] >= len(cands):
                    self._c["fetch_misses"] += 1
                    continue
                by_peer.setdefault(cands[tried[k]], []).append(k)
                tried[k] += 1
            if not by_peer:
                break
            for peer, ks in by_peer.items():
                addr = self._addr(peer)
                ok = [False] * len(ks)
                if addr is not None:
                    try:
                        ok = await self.dataplane.fetch(addr, ks, on_stored, expect_node=peer)
                    except Exception as e:  # DataPlaneError, or a peer gone mid-transfer
                        self._c["fetch_errors"] += 1
                        log.info("fetch from %s failed: %s", peer, e, extra={"fields": {"peer": peer, "keys": len(ks)}})
                for k, o in zip(ks, ok, strict=True):
                    if o:
                        got += 1
                    else:
                        rest.append(k)
            todo = rest
        self._c["fetched"] += got
        return got

    # ---- put path --------------------------------------------------------------------------------
    def replicate(self, keys: Sequence[bytes]) -> None:
        """Blocks a local client just committed: dirty until their owners hold them. A put after
        a mesh-wide delete is newer than it: the tombstone is lifted here, and the owners lift
        theirs when the fresh push arrives."""
        self.tombstones.discard(keys)
        self.replicator.add(keys)

    async def wait_room(self, nbytes: int) -> bool:
        """Back-pressure before a put of ``nbytes``: False if it did not fit under the dirty bound
        within ``put_wait_s``."""
        return await self.replicator.wait_room(nbytes)

    async def wait_replicated(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """``ack = "replicated"``: wait until the owners hold ``keys``; how many still do not."""
        return await self.replicator.wait_replicated(keys, timeout_s)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Feed the gossiped block directory (when this build's gossip carries one) with what the
        # store holds now (blocks recovered from NVMe) and every change from here on.
        added = getattr(self.gossip, "directory_added", None)
        removed = getattr(self.gossip, "directory_removed", None)
        if added is not None and removed is not None:
            self.store.on_added = added
            self.store.on_removed = removed
            held = list(self.store.held_keys())
            if held:
                added(held)
        if hasattr(self.dataplane, "on_deleted"):
            self.dataplane.on_deleted = self.replicator.discard
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.replicator.run)
            nursery.start_soon(self._repair_loop)
            task_status.started()

    # ---- delete ------------------------------------------------------------------------------------
    async def delete(self, keys: Sequence[bytes]) -> int:
        """Delete mesh-wide: here, on the owners and on every holder the directory names, and
        tombstone the keys. Returns how many keys had a copy deleted somewhere. Peers that cannot
        be reached now get the delete again later (the next periodic pass, or all live tombstones
        when they rejoin)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return 0
        self.tombstones.add(keys, trio.current_time())
        targets: dict[str, list[bytes]] = {}
        holders = self._peers_for(keys, owners=False)
        for k, row, more in zip(keys, self._owner_rows(keys), holders, strict=True):
            for n in dict.fromkeys([*row, *more]):
                if n != self.node_id:
                    targets.setdefault(n, []).append(k)
        self.replicator.discard(keys)
        found = self.store.contains(keys)
        if any(found):
            await self.store.delete([k for k, f in zip(keys, found, strict=True) if f])
        where = {k: i for i, k in enumerate(keys)}
        async with trio.open_nursery() as nursery:
            for node, ks in targets.items():
                nursery.start_soon(self._delete_on, node, ks, where, found)
        self._c["deletes"] += len(keys)
        return sum(found)

    async def _delete_on(self, node: str, keys: list[bytes], where: dict[bytes, int], found: list[bool]) -> None:
        addr = self._addr(node)
        ok: list[bool] | None = None
        if addr is not None:
            with trio.move_on_after(self.delete_timeout_s):
                try:
                    ok = []
                    for i in range(0, len(keys), _DELETE_BATCH):
                        ok += await self.dataplane.delete(addr, keys[i : i + _DELETE_BATCH], expect_node=node)
                except Exception as e:  # DataPlaneError, a peer gone mid-transfer, an old peer
                    log.info("delete on %s failed: %s", node, e, extra={"fields": {"peer": node, "keys": len(keys)}})
                    ok = None
        if ok is None or len(ok) != len(keys):
            self._c["delete_requests_failed"] += 1
            retry = self._delete_retry.setdefault(node, {})
            retry.update(dict.fromkeys(keys))
            while len(retry) > _REPLICATION_QUEUE:
                retry.pop(next(iter(retry)))
            return
        for k, o in zip(keys, ok, strict=True):
            if o:
                found[where[k]] = True

    async def drop_local(self, keys: Sequence[bytes], wait_s: float) -> int:
        """Drop this node's copies only (the mesh keeps its replicas). A dirty block is dropped
        once its owners hold it (waiting at most ``wait_s``); one still dirty then is kept."""
        keys = list(dict.fromkeys(keys))
        if any(self.replicator.pending(k) for k in keys):
            await self.replicator.wait_replicated(keys, wait_s)
        return await self.store.delete([k for k in keys if not self.replicator.pending(k)])

    def member_event(self, event: Any) -> None:
        """A membership event: owners may move (repair follows); a node that (re)joined is sent
        every live tombstone, so it drops blocks deleted while it was away."""
        self._evented = True
        self._events += 1
        self._refresh()
        if getattr(event, "kind", "") == "join" and self.tombstones and self._nursery is not None:
            addr = getattr(event.meta, "data_addr", "")
            if addr and event.node_id != self.node_id:
                self._nursery.start_soon(self._send_tombstones, event.node_id, addr)

    async def _send_tombstones(self, node: str, addr: str) -> None:
        keys = self.tombstones.live()
        with trio.move_on_after(self.delete_timeout_s * 4):
            try:
                for i in range(0, len(keys), _DELETE_BATCH):
                    await self.dataplane.delete(addr, keys[i : i + _DELETE_BATCH], expect_node=node)
                self._delete_retry.pop(node, None)
                return
            except Exception as e:
                log.info("sending tombstones to %s failed: %s", node, e, extra={"fields": {"peer": node}})
        self._c["delete_requests_failed"] += 1

    async def _retry_deletes(self) -> None:
        pending, self._delete_retry = self._delete_retry, {}
        dead = self.tombstones
        for node, ks in pending.items():
            keys = [k for k in ks if k in dead]
            if keys:
                await self._delete_on(node, keys, {k: i for i, k in enumerate(keys)}, [False] * len(keys))

    def _failed(self, keys: list[bytes]) -> None:
        """Replication of these keys failed: count them and let the next repair pass retry."""
        self._c["replication_failures"] += len(keys)
        self._to_repair(keys)

    def _to_repair(self, keys: list[bytes]) -> None:
        """Keys the replicator gave up on (counted there): the next repair pass pushes them."""
        for k in keys:
            self._retry[k] = None
        while len(self._retry) > _REPLICATION_QUEUE:
            self._retry.pop(next(iter(self._retry)))
            self._c["replication_dropped"] += 1

    # ---- self-healing ----------------------------------------------------------------------------
    async def _repair_loop(self) -> None:
        """Re-replicate when the owner set changes (a join, leave or death), and now and then;
        the periodic pass also retries deletes that did not reach a peer and expires tombstones."""
        while True:
            with trio.move_on_after(self.repair_interval_s) as idle:
                await self._repair_wake.wait()
            self._repair_wake = trio.Event()
            self.replicator.replace_if_stale()
            await self.repair_pass()
            if idle.cancelled_caught:
                self.tombstones.expire(trio.current_time())
                if self._delete_retry:
                    await self._retry_deletes()

    async def repair_pass(self) -> int:
        """Push every block this node should hand on to owners that may lack it; returns blocks sent.

        Who pushes a block, with no coordinator: an owner that also owned it before the change
        (the first such survivor in owner order), so one copy travels; if no earlier owner
        survives, every holder (a GPU node that still has the block in DRAM) pushes. A push
        first asks the peer, so a block it already has costs one control message. Blocks whose
        owners did not move since the last pass are skipped without a Python-level look, except
        those whose replication failed, which are retried as if newly put.
        """
        ring = self._refresh()
        self._c["repair_passes"] += 1
        if ring is None:
            return 0
        prev, self._prev_ring = self._prev_ring, ring
        retry, self._retry = self._retry, {}
        if prev is not None and prev.members == ring.members:
            if not retry:
                return 0  # nothing moved and nothing failed: no key needs a look
            # Nothing moved: only the failed keys (still held here) need a look.
            held = [k for k, have in zip(retry, self.store.contains(list(retry)), strict=True) if have]
        else:
            held = list(self.store.held_keys())
        if len(self.replicator):  # dirty blocks are the replicator's to place
            held = [k for k in held if not self.replicator.pending(k)]
        alive = set(self._addrs)
        r = min(self.replicas, len(ring))
        ids = ring.members_ids()
        by_owner: dict[str, list[bytes]] = {}
        # Owner rows of both rings in one id space, so "did this key's owners move" is one compare.
        names = sorted(set(ids) | set(prev.members_ids() if prev is not None else ()))
        gid = {n: j for j, n in enumerate(names)}
        now_g = np.array([gid[n] for n in ids], dtype=np.int32)
        prev_ids = prev.members_ids() if prev is not None else ()
        prev_g = np.array([gid[n] for n in prev_ids], dtype=np.int32)
        pr = min(self.replicas, len(prev_ids))
        for lo in range(0, len(held), _REPAIR_CHUNK):
            await trio.lowlevel.checkpoint()  # a pass over millions of keys must not hog the loop
            chunk = held[lo : lo + _REPAIR_CHUNK]
            kh = key_hashes(chunk)
            now = now_g[ring.owner_matrix(kh, r)]
            if prev is None or pr == 0:
                before = None
                look = np.ones(len(chunk), dtype=bool)
            else:
                before = prev_g[prev.owner_matrix(kh, pr)]
                look = (now != before).any(axis=1) if pr == r else np.ones(len(chunk), dtype=bool)
            if retry:
                look |= np.fromiter((k in retry for k in chunk), dtype=bool, count=len(chunk))
            for i in np.flatnonzero(look).tolist():
                k = chunk[i]
                owners = [names[j] for j in now[i].tolist()]
                if k not in retry:  # (a failed replication is ours to redo, owner or not)
                    was = None if before is None else [names[j] for j in before[i].tolist()]
                    survivors = [o for o in (was or owners) if o in alive and o in owners]
                    if survivors and survivors[0] != self.node_id:
                        continue  # another surviving owner hands this block on
                for o in owners:
                    if o != self.node_id:
                        by_owner.setdefault(o, []).append(k)
        return await self._push_limited(by_owner)

    async def _push_limited(self, by_owner: dict[str, list[bytes]]) -> int:
        """Push blocks to peers, at most ``repair_bytes_per_s`` on average."""
        sent = 0
        for owner, keys in by_owner.items():
            addr = self._addr(owner)
            if addr is None:
                self._failed(keys)  # the next pass tries again
                continue
            for i in range(0, len(keys), _PUSH_BATCH):
                chunk = keys[i : i + _PUSH_BATCH]
                t0 = trio.current_time()
                try:
                    ok = await self.dataplane.push(addr, chunk, expect_node=owner)
                except Exception as e:
                    self._failed(chunk)
                    log.info("repair push to %s failed: %s", owner, e, extra={"fields": {"peer": owner}})
                    continue
                self._failed([k for k, o in zip(chunk, ok, strict=True) if not o])
                moved = self._block_bytes(chunk, ok)
                sent += sum(ok)
                self._c["repaired"] += sum(ok)
                self._c["repaired_bytes"] += moved
                # Token bucket of one batch: sleep so this batch took moved / rate seconds.
                wait = moved / self.repair_bytes_per_s - (trio.current_time() - t0)
                if wait > 0:
                    await trio.sleep(wait)
        return sent

    def _block_bytes(self, keys: list[bytes], ok: list[bool]) -> int:
        lengths = getattr(self.store, "lengths", None)
        if lengths is None:
            return 0
        return sum(n or 0 for n, o in zip(lengths(keys), ok, strict=True) if o)

    async def handoff(self) -> int:
        """Before a graceful leave: push the blocks this node owns to the owners that remain."""
        ring = self._refresh()
        if ring is None:
            return 0
        others = [Candidate(n, w) for n, w in (self._ring_key or ()) if n != self.node_id]
        if not others:
            return 0
        rest = Rendezvous(others)
        ids, rest_ids = ring.members_ids(), rest.members_ids()
        me = ids.index(self.node_id) if self.node_id in ids else -1
        by_owner: dict[str, list[bytes]] = {}
        held = list(self.store.held_keys())
        for lo in range(0, len(held), _REPAIR_CHUNK):
            await trio.lowlevel.checkpoint()
            chunk = held[lo : lo + _REPAIR_CHUNK]
            kh = key_hashes(chunk)
            mine = np.flatnonzero((ring.owner_matrix(kh, self.replicas) == me).any(axis=1))
            if not len(mine):
                continue
            heirs = rest.owner_matrix(kh[mine], self.replicas)
            for i, row in zip(mine.tolist(), heirs.tolist(), strict=True):
                for j in row:
                    by_owner.setdefault(rest_ids[j], []).append(chunk[i])
        n = await self._push_limited(by_owner)
        self._c["handed_off"] += n
        return n

    def statistics(self) -> MeshStats:
        ring = self._refresh()
        r = self.replicator.statistics()
        return MeshStats(
            replicas=self.replicas,
            candidates=len(ring) if ring is not None else 0,
            replication_queued=r.pending_blocks,
            replicated=r.replicated,
            dirty_blocks=r.pending_blocks,
            dirty_bytes=r.dirty_bytes,
            dirty_peak_bytes=r.dirty_peak_bytes,
            dirty_limit_bytes=r.dirty_limit_bytes,
            backpressure_waits=r.backpressure_waits,
            busy_rejections=r.busy_rejections,
            replication_lag_p50_s=r.lag_p50_s,
            replication_lag_p99_s=r.lag_p99_s,
            replication_lag_max_s=r.lag_max_s,
            replication_replaced=r.replaced,
            replication_given_up=r.given_up,
            replication_unplaced=r.unplaced,
            persisted_local=r.persisted_local,
            tombstones=len(self.tombstones),
            **{**self._c, "replication_failures": self._c["replication_failures"] + r.replication_failures},
        )
