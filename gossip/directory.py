"""The gossiped block directory: which node may hold which block, answered from local memory.

Theory of operation
-------------------
Every node is a *holder* (of its own blocks) and a *receiver* (of everyone else's summary). No I/O,
no clock: the SWIM core (``gossip/swim.py``) feeds it packets, streams, timers and the live peer
list, and carries what it emits; ``transport/gossip_driver.py`` and ``transport/memory.py`` run it
unchanged.

Holder side. The daemon reports its holdings changes (``local_added(keys)``,
``local_removed(keys)``). A key is reduced to a 64-bit fingerprint (``directory_filter``). Changes
are batched for ``batch_s`` (an add and a remove of the same key inside one batch cancel) and then
published as ``DirDelta(node, epoch, gen, prev, ver, added, removed)`` packets, each under the UDP
limit (146 fingerprints), sent *directly* to every live member. Each packet advances the holder's
version by one; ``prev`` lets a receiver see a gap. ``marker_s`` after the last packet of a burst
the holder sends a *marker* (``prev == ver``, no keys) to all members once, so a receiver that
lost the tail of a burst notices; and every ``refresh_s`` it sends a marker to ``refresh_fanout``
members round-robin (only once it has published something: with no blocks there is no directory
traffic at all, and the membership byte figures stay what they were). A member that becomes live
gets a marker at once, so it fetches our summary.

Receiver side. For each live holder a receiver keeps a *view*: the holder's blocked Bloom filter
(from a ``DirSummary``), plus a *removed set* of fingerprints removed since. A delta with
``prev == view.ver`` is applied: added fingerprints set their bits (and leave the removed set),
removed ones enter the removed set. A gap (``prev > ver``), a new holder epoch (a restart), or a
view without a filter make the receiver fetch a fresh ``DirSummary`` from the holder over a stream
(one in flight per holder, retried every ``fetch_timeout_s`` until the view has caught up with
the newest version heard of); deltas that arrive meanwhile are stashed and replayed on top of it.
The holder builds a summary from its *true* holdings as of its last published version.

Rebuilds. Bits of removed keys cannot be cleared and a filter loaded past its design count gets
less precise, so the holder raises its *generation* ``gen`` after ``removed_frac`` x count removals
or ``grow_frac`` x count additions since the last one (at least ``min_keys``). Receivers that see a
higher ``gen`` refetch; until then their answer is still right up to the false positive rate.

Maths (defaults: ``bits_per_key`` 12, ``k`` 5, ``batch_s`` 0.25, N members, c blocks per holder).

- Memory per holder view: 12 bits = 1.5 bytes per block at build time, plus at most
  ``removed_frac`` x c x 8 bytes of removed fingerprints (1/16 x 8 = 0.5 B) before the holder
  rebuilds: <= 2.0 bytes per (holder, block) pair, whatever N (measured 1.69 at N = 64). Per
  *unique* block of the mesh it is that times the number of copies (R = 2 replicas: ~3 B).
- False positives: a one-word (blocked) Bloom filter at 12 bits/key and k = 5 answers ~1.2% of
  absent keys "present" (measured; a classic Bloom filter would give 0.3%). A lookup across N - 1
  views names some wrong holder for an absent key with probability 1 - (1 - 0.012)^(N-1): 30% at
  N = 32, 51% at N = 64 (both measured). Each costs one failed fetch, reported as a miss, never wrong bytes (the
  get path checksums and the holder answers "not found"); in ``prefix_in_mesh`` it can extend
  the prefix past its true end by one key with that probability (two with its square, ...).
- Staleness: a change reaches every live member ``batch_s`` + one datagram after it is made:
  p50 0.14 s, p99 0.25 s (measured, loopback, N = 64; 0.61 s p99 at 1% loss). A lost delta is
  repaired by the next delta, the burst's marker (``marker_s`` later) or a refresh marker (each
  member within ceil((N - 1) / ``refresh_fanout``) x ``refresh_s``), plus one summary fetch.
- Traffic per holder: 9 bytes per changed fingerprint per member, ~55 bytes of packet overhead
  per batch per member, and a summary (1.5 x c bytes) per member every c / 16 removals (about
  24 bytes per removal per member): all proportional to N x change rate, nothing when idle
  (measured: 32 KB/s per node at N = 64 and 30 holding changes per second per node).
- Lookup: one xxh3 hash per key, then one gather over a (keys x views) index matrix (numpy): a
  64-key prefix against 63 views is ~33 us (measured p50, 2-core VM; 43 us against 127).

Rules: a view never goes backwards ((epoch, ver) only grows); deltas are applied in version order
or not at all; views of members that are dead or have left are dropped (SWIM calls ``forget``).

Public API: ``DirectoryConfig``, ``DirectoryStats``, ``Directory`` (``local_added``,
``local_removed``, ``holds``, ``lookup_holders``, ``prefix_in_mesh``, ``handle_delta``,
``handle_stream``, ``handle_timer``, ``next_deadline``, ``take_outbox``, ``take_streams``,
``peer_joined``, ``forget``, ``memory_bytes``, ``statistics``, ``observer``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from gossip.directory_filter import MAX_K, BloomWords, U64Array, fingerprint, masks
from gossip.messages import DirDelta, DirSummary, DirSummaryReq

_INF = math.inf
_FP_BYTES = 9  # msgpack of a 64-bit unsigned int (0xcf + 8 bytes)
_DELTA_RESERVE = 48  # a delta's own fields (tag, epoch, gen, versions, array headers)
_STASH = 64  # deltas kept while a summary is being fetched
_SHIFT32 = np.uint64(32)


class DirectoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # 12 bits per block = 1.5 B: leaves 0.5 B of the 2 B/block budget to the removed sets.
    bits_per_key: float = 12.0
    # 5 bits per key in one 64-bit word: the measured optimum at 12 bits/key (~1.0% FPR).
    k: int = 5
    # Changes are batched this long: 250 ms keeps staleness a quarter of the 1 s target, turns a
    # put burst into a few packets and amortises the ~55 bytes of per-packet overhead (AEAD
    # envelope + delta header), which is sent to every member: at 0.1 s and 30 changes/s per node
    # the overhead was twice the fingerprints themselves.
    batch_s: float = 0.25
    # A marker to everyone after a burst (lost tails are noticed this soon) ...
    marker_s: float = 0.5
    # ... and a marker to a few members round-robin: ~3 x 40 B per 5 s per holder.
    refresh_s: float = 5.0
    refresh_fanout: int = 3
    # One summary fetch in flight per holder; a lost one is retried after this.
    fetch_timeout_s: float = 3.0
    # Filters are sized for at least this many keys, and no rebuild happens for fewer changes.
    min_keys: int = 64
    # Rebuild (new generation) after this share of additions: the filter is then 1.25x loaded.
    grow_frac: float = 0.25
    # Rebuild after this share of removals: bounds the removed sets to 1/16 x 8 B = 0.5 B/block.
    removed_frac: float = 0.0625

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("bits_per_key", 1.0 <= self.bits_per_key <= 64.0),
            ("k", 1 <= self.k <= MAX_K),
            ("batch_s", self.batch_s >= 0.0),
            ("marker_s", self.marker_s > 0.0),
            ("refresh_s", self.refresh_s > 0.0),
            ("refresh_fanout", self.refresh_fanout >= 0),
            ("fetch_timeout_s", self.fetch_timeout_s > 0.0),
            ("min_keys", self.min_keys >= 1),
            ("grow_frac", 0.0 < self.grow_frac <= 4.0),
            ("removed_frac", 0.0 < self.removed_frac <= 1.0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"directory.{name}: out of range ({getattr(self, name)!r})")


class DirectoryStats(msgspec.Struct, frozen=True, kw_only=True):
    local_blocks: int
    version: int
    generation: int
    views: int
    view_blocks: int  # sum over views of the holder's count at summary time plus deltas since
    filter_bytes: int
    removed_entries: int
    memory_bytes: int  # filter_bytes + 8 x removed_entries
    deltas_sent: int
    deltas_applied: int
    gaps: int
    summaries_sent: int
    summaries_installed: int
    summaries_rejected: int
    stale_ignored: int


class _View:
    __slots__ = (
        "node", "addr", "epoch", "gen", "ver", "filt", "removed", "stash", "fetch_until", "count",
        "want_epoch", "want_gen", "want_ver",
    )  # fmt: skip

    def __init__(self, node: str, addr: str) -> None:
        self.node = node
        self.addr = addr
        self.epoch = -1
        self.gen = -1
        self.ver = -1
        self.filt: BloomWords | None = None
        self.removed: set[int] = set()
        self.stash: list[DirDelta] = []
        self.fetch_until = -_INF
        self.count = 0
        # the newest (epoch, gen, ver) the holder told us about: behind it -> fetch until caught up
        self.want_epoch = -1
        self.want_gen = -1
        self.want_ver = -1

    @property
    def behind(self) -> bool:
        return self.filt is None or (self.epoch, self.ver) < (self.want_epoch, self.want_ver) or (
            self.epoch == self.want_epoch and self.gen < self.want_gen
        )


class Directory:
    def __init__(
        self,
        node_id: str,
        config: DirectoryConfig,
        rng: random.Random,
        *,
        epoch: int,
        udp_limit: int = 1400,
        wire_overhead: int = 29,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        room = udp_limit - wire_overhead - _DELTA_RESERVE - len(node_id.encode())
        if room < 4 * _FP_BYTES:
            raise ValueError(f"udp_limit {udp_limit} leaves no room for a directory delta")
        self.id = node_id
        self.config = config
        self.rng = rng
        self.epoch = epoch
        self._per_packet = room // _FP_BYTES
        # holder state
        self._mine: set[int] = set()
        self._pend_add: set[int] = set()
        self._pend_rm: set[int] = set()
        self._ver = 0
        self._gen = 0
        self._count_at_gen = 0
        self._adds_since = 0
        self._rms_since = 0
        self._flush_at = _INF
        self._marker_at = _INF
        self._refresh_at = _INF
        self._rr = 0
        self._summary: DirSummary | None = None
        # receiver state
        self._views: dict[str, _View] = {}
        self._behind: set[str] = set()  # views waiting for a summary (retried on a timer)
        self._rm_index: dict[int, set[str]] = {}
        self._dirty = True
        self._cols: list[_View] = []
        self._col_of: dict[str, int] = {}
        self._arena: U64Array = np.zeros(0, dtype=np.uint64)
        self._offs = np.zeros(0, dtype=np.int64)
        self._ws = np.zeros(0, dtype=np.int64)
        # output
        self._outbox: list[tuple[str, DirDelta]] = []
        self._streams: list[tuple[str, DirSummaryReq]] = []
        # (holder, version, now) whenever a view (or our own publication) reaches a version
        self.observer: Callable[[str, int, float], None] | None = None
        self._c = dict.fromkeys(
            (
                "deltas_sent", "deltas_applied", "gaps", "summaries_sent",
                "summaries_installed", "summaries_rejected", "stale_ignored",
            ),
            0,
        )  # fmt: skip

    # ---------------------------------------------------------------- holder side

    @property
    def version(self) -> int:
        return self._ver

    def local_added(self, keys: Iterable[bytes], now: float) -> None:
        """Blocks now held here (put/commit, fetched replica, NVMe recovery)."""
        mine, pa, pr = self._mine, self._pend_add, self._pend_rm
        for key in keys:
            fp = fingerprint(_key(key))
            if fp in mine:
                continue
            mine.add(fp)
            if fp in pr:
                pr.discard(fp)
            else:
                pa.add(fp)
        self._schedule(now)

    def local_removed(self, keys: Iterable[bytes], now: float) -> None:
        """Blocks no longer held here (eviction, drop, delete)."""
        mine, pa, pr = self._mine, self._pend_add, self._pend_rm
        for key in keys:
            fp = fingerprint(_key(key))
            if fp not in mine:
                continue
            mine.discard(fp)
            if fp in pa:
                pa.discard(fp)
            else:
                pr.add(fp)
        self._schedule(now)

    def holds(self, key: bytes) -> bool:
        return fingerprint(_key(key)) in self._mine

    def _schedule(self, now: float) -> None:
        if (self._pend_add or self._pend_rm) and self._flush_at == _INF:
            self._flush_at = now + self.config.batch_s

    def _publish(self, now: float, peers: Sequence[tuple[str, str]]) -> None:
        self._flush_at = _INF
        adds = list(self._pend_add)
        rms = list(self._pend_rm)
        self._pend_add = set()
        self._pend_rm = set()
        if not adds and not rms:
            return
        cfg = self.config
        self._adds_since += len(adds)
        self._rms_since += len(rms)
        base = max(cfg.min_keys, self._count_at_gen)
        if self._adds_since > cfg.grow_frac * base or self._rms_since > cfg.removed_frac * base:
            self._gen += 1
            self._count_at_gen = len(self._mine)
            self._adds_since = 0
            self._rms_since = 0
        per = self._per_packet
        items: list[tuple[bool, int]] = [(True, fp) for fp in adds] + [(False, fp) for fp in rms]
        for i in range(0, len(items), per):
            chunk = items[i : i + per]
            prev = self._ver
            self._ver += 1
            d = DirDelta(
                self.id, self.epoch, self._gen, prev, self._ver,
                tuple(fp for a, fp in chunk if a), tuple(fp for a, fp in chunk if not a),
            )  # fmt: skip
            for _, addr in peers:
                self._outbox.append((addr, d))
            self._c["deltas_sent"] += 1
        if self.observer is not None:
            self.observer(self.id, self._ver, now)
        self._marker_at = now + cfg.marker_s
        if self._refresh_at == _INF:  # a random phase, so holders' refreshes do not line up
            self._refresh_at = now + (0.5 + self.rng.random()) * cfg.refresh_s

    def _marker(self) -> DirDelta:
        return DirDelta(self.id, self.epoch, self._gen, self._ver, self._ver)

    def summary(self) -> DirSummary:
        """Our filter, built from the true holdings (what a fetching receiver gets).

        Built once per published version: the N - 1 fetches that follow a new generation share
        one build."""
        c = self._summary
        if c is not None and c.ver == self._ver and c.epoch == self.epoch and c.gen == self._gen:
            return c
        cfg = self.config
        n = len(self._mine) + len(self._pend_rm) - len(self._pend_add)  # as of version _ver
        fps = (self._mine | self._pend_rm) - self._pend_add if self._pend_add or self._pend_rm else (
            self._mine
        )
        f = BloomWords.build(fps, max(n, cfg.min_keys), cfg.bits_per_key, cfg.k)
        c = DirSummary(self.id, self.epoch, self._gen, self._ver, cfg.k, f.to_bytes(), n)
        self._summary = c
        return c

    # ---------------------------------------------------------------- driver interface

    @property
    def has_packets(self) -> bool:
        return bool(self._outbox)

    @property
    def has_streams(self) -> bool:
        return bool(self._streams)

    def take_outbox(self) -> list[tuple[str, DirDelta]]:
        out = self._outbox
        self._outbox = []
        return out

    def take_streams(self) -> list[tuple[str, DirSummaryReq]]:
        out = self._streams
        self._streams = []
        return out

    def next_deadline(self) -> float:
        t = min(self._flush_at, self._marker_at, self._refresh_at)
        if self._behind:
            views = self._views
            for node in self._behind:
                v = views.get(node)
                if v is not None and v.fetch_until < t:
                    t = v.fetch_until
        return t

    def handle_timer(self, now: float, peers: Sequence[tuple[str, str]]) -> None:
        """``peers``: (node id, address) of the live members other than us."""
        if self._flush_at <= now:
            self._publish(now, peers)
        if self._marker_at <= now:
            self._marker_at = _INF
            m = self._marker()
            for _, addr in peers:
                self._outbox.append((addr, m))
        if self._refresh_at <= now:
            self._refresh_at = now + self.config.refresh_s
            k = min(self.config.refresh_fanout, len(peers))
            if k:
                m = self._marker()
                for j in range(k):
                    self._outbox.append((peers[(self._rr + j) % len(peers)][1], m))
                self._rr = (self._rr + k) % len(peers)
        if self._behind:
            for node in list(self._behind):
                v = self._views.get(node)
                if v is None or not v.behind:
                    self._behind.discard(node)
                elif v.fetch_until <= now:  # the fetch was lost (stream failed): ask again
                    self._fetch(v, now)

    def peer_joined(self, addr: str) -> None:
        """A member became alive: tell it our version so it fetches our summary."""
        if self._ver > 0:
            self._outbox.append((addr, self._marker()))

    def forget(self, node: str) -> None:
        """Drop the view of a member that died or left."""
        v = self._views.pop(node, None)
        self._behind.discard(node)
        if v is not None:
            self._drop_removed(v)
            self._dirty = True

    # ---------------------------------------------------------------- receiver side

    def handle_delta(self, d: DirDelta, src: str, now: float) -> None:
        if d.node == self.id:
            return
        if d.prev > d.ver or d.prev < 0:
            self._c["summaries_rejected"] += 1
            return
        v = self._views.get(d.node)
        if v is None:
            v = self._views[d.node] = _View(d.node, src)
        v.addr = src
        if d.epoch < v.epoch or d.epoch < v.want_epoch:
            self._c["stale_ignored"] += 1
            return
        if d.epoch > v.want_epoch:
            v.want_epoch, v.want_gen, v.want_ver = d.epoch, d.gen, d.ver
        else:
            v.want_gen = max(v.want_gen, d.gen)
            v.want_ver = max(v.want_ver, d.ver)
        if d.epoch > v.epoch and v.filt is not None:
            self._reset(v)  # the holder restarted: what we knew is void
        if v.filt is None or d.epoch > v.epoch:
            self._stash(v, d)
            self._fetch(v, now)
            return
        if d.ver <= v.ver and d.prev != d.ver:
            self._c["stale_ignored"] += 1
        elif d.prev == v.ver:
            if d.ver != d.prev:
                self._apply(v, d)
                self._reached(v, now)
        elif d.prev > v.ver or d.ver > v.ver:
            self._c["gaps"] += 1
            self._stash(v, d)
            self._fetch(v, now)
            return
        if d.gen > v.gen:
            self._fetch(v, now)

    def handle_stream(self, msg: DirSummaryReq | DirSummary, src: str, now: float) -> (
        DirSummary | None
    ):
        if isinstance(msg, DirSummaryReq):
            if msg.node != self.id:
                return None
            self._c["summaries_sent"] += 1
            return self.summary()
        self._install(msg, src, now)
        return None

    def _stash(self, v: _View, d: DirDelta) -> None:
        if d.prev != d.ver and len(v.stash) < _STASH:
            v.stash.append(d)

    def _fetch(self, v: _View, now: float) -> None:
        self._behind.add(v.node)
        if v.fetch_until > now:
            return
        v.fetch_until = now + self.config.fetch_timeout_s
        self._streams.append((v.addr, DirSummaryReq(v.node)))

    def _reset(self, v: _View) -> None:
        self._drop_removed(v)
        v.filt = None
        v.removed = set()
        v.stash = []
        v.fetch_until = -_INF
        self._dirty = True

    def _install(self, s: DirSummary, src: str, now: float) -> None:
        if s.node == self.id or s.k != self.config.k:
            self._c["summaries_rejected"] += 1
            return
        try:
            filt = BloomWords.from_bytes(s.words, s.k)
        except ValueError:
            self._c["summaries_rejected"] += 1
            return
        v = self._views.get(s.node)
        if v is None:
            v = self._views[s.node] = _View(s.node, src)
        v.fetch_until = -_INF
        if (s.epoch, s.ver) < (v.epoch, v.ver):
            self._c["stale_ignored"] += 1
            return
        self._drop_removed(v)
        v.epoch, v.gen, v.ver, v.filt, v.count = s.epoch, s.gen, s.ver, filt, s.count
        v.removed = set()
        self._dirty = True
        self._c["summaries_installed"] += 1
        stash = sorted(
            (d for d in v.stash if d.epoch == v.epoch and d.ver > v.ver), key=lambda d: d.prev
        )
        v.stash = []
        for d in stash:
            if d.prev == v.ver:
                self._apply(v, d)
            elif d.prev > v.ver:
                self._c["gaps"] += 1
                v.stash.append(d)
        if v.stash:
            self._fetch(v, now)
        self._reached(v, now)

    def _apply(self, v: _View, d: DirDelta) -> None:
        filt = v.filt
        assert filt is not None
        removed = v.removed
        idx = self._rm_index
        for fp in d.added:
            filt.add(fp)
            if fp in removed:
                removed.discard(fp)
                s = idx.get(fp)
                if s is not None:
                    s.discard(v.node)
                    if not s:
                        del idx[fp]
        for fp in d.removed:
            removed.add(fp)
            idx.setdefault(fp, set()).add(v.node)
        v.count += len(d.added) - len(d.removed)
        v.ver = d.ver
        self._c["deltas_applied"] += 1

    def _reached(self, v: _View, now: float) -> None:
        if not v.behind:
            self._behind.discard(v.node)
            v.stash = []
        if self.observer is not None:
            self.observer(v.node, v.ver, now)

    def _drop_removed(self, v: _View) -> None:
        idx = self._rm_index
        for fp in v.removed:
            s = idx.get(fp)
            if s is not None:
                s.discard(v.node)
                if not s:
                    del idx[fp]

    # ---------------------------------------------------------------- lookup

    def _repack(self) -> None:
        cols = [v for v in self._views.values() if v.filt is not None]
        self._cols = cols
        self._col_of = {v.node: i for i, v in enumerate(cols)}
        sizes = [v.filt.words.size for v in cols if v.filt is not None]
        offs = np.zeros(len(cols), dtype=np.int64)
        if cols:
            offs[1:] = np.cumsum(sizes)[:-1]
        arena = np.concatenate([v.filt.words for v in cols if v.filt is not None]) if cols else (
            np.zeros(0, dtype=np.uint64)
        )
        for v, off, size in zip(cols, offs.tolist(), sizes, strict=True):
            assert v.filt is not None
            v.filt.words = arena[off : off + size]  # deltas now write into the arena
        self._arena = arena
        self._offs = offs
        self._ws = np.array(sizes, dtype=np.int64)
        self._dirty = False

    def _match(self, keys: Sequence[bytes]) -> tuple[list[int], np.ndarray]:
        """Fingerprints of ``keys`` and the (keys x views) matrix of "may hold"."""
        fps = [fingerprint(_key(k)) for k in keys]
        if self._dirty:
            self._repack()
        ncols = len(self._cols)
        if not fps or not ncols:
            return fps, np.zeros((len(fps), ncols), dtype=bool)
        a = np.array(fps, dtype=np.uint64)
        # word index = (hi32 * W) >> 32 (< 2**63: int64 arithmetic, no conversions)
        hi = (a >> _SHIFT32).astype(np.int64)[:, None]
        idx = (hi * self._ws) >> 32
        idx += self._offs
        m = masks(a, self.config.k)[:, None]
        hits: np.ndarray = (self._arena[idx] & m) == m
        rm = self._rm_index
        if rm:
            col_of = self._col_of
            for i, fp in enumerate(fps):
                nodes = rm.get(fp)
                if nodes:
                    for node in nodes:
                        c = col_of.get(node)
                        if c is not None:
                            hits[i, c] = False
        return fps, hits

    def lookup_holders(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Per key, the other nodes that may hold it (stale or false positives possible)."""
        _, hits = self._match(keys)
        names = [v.node for v in self._cols]
        out: list[list[str]] = [[] for _ in range(hits.shape[0])]
        rows, cs = np.nonzero(hits)
        for r, c in zip(rows.tolist(), cs.tolist(), strict=True):
            out[r].append(names[c])
        return out

    def prefix_in_mesh(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held here or may be held by another node."""
        fps, hits = self._match(keys)
        if not fps:
            return 0
        held: npt.NDArray[np.bool_] = np.any(hits, axis=1) if hits.shape[1] else np.zeros(
            len(fps), dtype=bool
        )
        mine = self._mine
        if mine:
            held |= np.array([fp in mine for fp in fps], dtype=bool)
        missing = np.flatnonzero(~held)
        return int(missing[0]) if missing.size else len(fps)

    # ---------------------------------------------------------------- inspection

    def view_version(self, node: str) -> int | None:
        v = self._views.get(node)
        return v.ver if v is not None and v.filt is not None else None

    def memory_bytes(self) -> int:
        """Bytes of remote-holder state: filter words + 8 per removed fingerprint."""
        total = 0
        for v in self._views.values():
            if v.filt is not None:
                total += v.filt.nbytes
            total += 8 * len(v.removed)
        return total

    def statistics(self) -> DirectoryStats:
        filt = sum(v.filt.nbytes for v in self._views.values() if v.filt is not None)
        removed = sum(len(v.removed) for v in self._views.values())
        return DirectoryStats(
            local_blocks=len(self._mine),
            version=self._ver,
            generation=self._gen,
            views=sum(1 for v in self._views.values() if v.filt is not None),
            view_blocks=sum(v.count for v in self._views.values() if v.filt is not None),
            filter_bytes=filt,
            removed_entries=removed,
            memory_bytes=filt + 8 * removed,
            **self._c,
        )


def _key(key: bytes) -> bytes:
    if type(key) is bytes:
        return key
    if not isinstance(key, (bytearray, memoryview)):
        raise TypeError(f"block key must be bytes, got {type(key).__name__}")
    return bytes(key)
