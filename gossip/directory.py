"""The gossiped block directory: which node may hold which block, answered from local memory.

Theory of operation
-------------------
Every node is a *holder* (of its own blocks) and a *receiver* (of everyone else's). No I/O, no
clock: the SWIM core (``gossip/swim.py``) feeds it packets, streams, timers and the live peer
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
gets a marker at once, so it fetches our summary. A *summary* (``DirSummary``, fetched over a
stream) is the holder's fingerprints as of its last published version, their top 48 bits (all
that a receiver's table reads), 6 bytes each: format ``SUMMARY_FORMAT`` = 48 in the ``k`` field.
Format 1 (``k`` in 1..10: a blocked Bloom filter, 1.5 B per block) is rejected, as format 48 is
by nodes that still run format 1: a mixed mesh shares deltas but not summaries.

Receiver side. All remote holdings live in *one* cuckoo table of (tag, holder id) entries
(``gossip/directory_table.py``), not in one filter per holder, so a lookup costs the same at any
N and its false-positive rate does not grow with N. Per live holder a receiver keeps a *view*
(versions, an id, a count). A delta with ``prev == view.ver`` is applied: added fingerprints
become entries, removed ones clear theirs, exactly (a removal needs no rebuild, so a holder never
has to publish a new generation). A gap (``prev > ver``, or a marker ahead of us) first makes the
receiver ask the holder to *resend* what it missed: a marker addressed to the holder itself
(``node`` = the holder, ``prev == ver`` = the version we have); the holder answers with the
deltas after it from a log of its last ``resend_log``. If they have not arrived ``resend_wait_s``
later, or for a new holder epoch (a restart) or a view without entries, the receiver fetches a
summary (one in flight per holder, retried every ``fetch_timeout_s`` until the view has caught up
with the newest version heard of); deltas that arrive meanwhile are stashed and replayed on top.
A view that goes on applying deltas while its summary is on the way (in a resize, or fetching a
new generation) keeps them (up to ``_STASH``, then it stashes instead): a summary older than the
view is installed with them replayed on top, not refetched (that looped while a summary took
longer than the holder's next delta).
A node of the previous version ignores a delta that names itself, so the requester falls back to
the summary.

Installing a summary is incremental: no call places more than ``install_step`` work units (an
entry of the vectorised pass is one, a step of an eviction walk ``_WALK_COST``, clearing old
entries one per ``_SCAN_SLOTS`` slots). The call that receives a summary starts it (a small one
ends there); while one is pending ``next_deadline()`` is ``now``, so the driver calls
``handle_timer`` again at once and each call places the next share. Meanwhile the view's entries
stay where they are and keep taking deltas (kept, as above); the new ones go in beside them (in
the new table during a resize, else in the same table under a second holder id) and lookups read
both: no false negatives for the old view. When all are placed the old entries are cleared and
the kept deltas replayed on top: the same end state as an install in one call. A resize restarts
pending installs in the new table; a newer summary, a restart or a death drops one.

Table size. The table keeps 9 bits of each fingerprint, not the key, so it cannot be rehashed in
place. At the first summary it is sized for what the receiver expects (this holder's count times
the number of members, at ``target_load``). When it passes ``max_load`` (or entries start to find
no room) or its expected holdings fall under ``min_load``, the receiver builds a table of the
right size (growing at least 1.25x) and refills it
by fetching every holder's summary again; until a holder's summary arrives, its entries stay in
the old table, and lookups read both (every view lives in exactly one table).

Maths (defaults: ``target_load`` 0.75, ``batch_s`` 0.25, N members, c blocks per holder).

- Memory: 16 bits per (holder, block) entry at the table's load: 2 / 0.75 = 2.67 B at a fresh
  table, 2.35 B at ``max_load``, 2.9 B after a 1.25x growth (at the older 0.88 / 0.95 loads:
  measured 2.2-2.6 B per pair, ~4.5 B per unique block at R = 2), whatever N (up to 127 other
  holders; 32-bit entries beyond). The per-holder filters this replaces used 1.69 B per pair
  (12-bit blocked Bloom plus removed sets). The loads trade bytes for insert time (see
  ``target_load``).
- False positives: an absent key matches one of the 16 tags of its two buckets with probability
  ~ 16 x load / 511: 2.3% at 0.75, whatever N (measured 1.4% at N = 64, load 0.79; the
  per-holder Bloom filters it replaces gave 1 - 0.988^(N-1): 51% at N = 64). One holder is named
  wrongly for ~1/(N-1) of that.
  A false positive costs one failed fetch, reported as a miss, never wrong bytes (the get path
  checksums and the holder answers "not found"); in ``prefix_in_mesh`` it can extend the prefix
  past its true end by one key with that probability (two with its square, ...).
- Staleness: a change reaches every live member ``batch_s`` + one datagram after it is made:
  p50 0.14 s, p99 0.25 s (measured, loopback, N = 64). A lost delta is repaired by the next delta,
  the burst's marker (``marker_s`` later) or a refresh marker (each member within
  ceil((N - 1) / ``refresh_fanout``) x ``refresh_s``), plus one resend (or a summary fetch):
  p99 0.62 s at 1% loss, as with the Bloom filters.
- Traffic per holder: 9 bytes per changed fingerprint per member and ~55 bytes of packet overhead
  per batch per member; summaries (6 B per block) only when a member joins, misses a delta,
  restarts us, or resizes its table: nothing when idle.
- Lookup: a 64-key prefix is one gather of its 128 buckets and a tag compare (numpy), ~10 us; a
  bounded cache (``hash_cache``) keeps each key's record (two buckets and a tag) for the current
  table, so a repeated prefix is neither hashed nor placed again (first sight: ~29 us).

Rules: a view never goes backwards ((epoch, ver) only grows); deltas are applied in version order
or not at all; views of members that are dead or have left are dropped (SWIM calls ``forget``).

Public API: ``DirectoryConfig``, ``DirectoryStats``, ``Directory`` (``local_added``,
``local_removed``, ``holds``, ``lookup_holders``, ``prefix_in_mesh``, ``handle_delta``,
``handle_stream``, ``handle_timer``, ``next_deadline``, ``take_outbox``, ``take_streams``,
``peer_joined``, ``forget``, ``memory_bytes``, ``statistics``, ``observer``), ``SUMMARY_FORMAT``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt
import xxhash

from gossip.directory_filter import fingerprint
from gossip.directory_table import MAX_HID, NARROW_SHIFT, SLOTS, HolderTable, pack48, unpack48
from gossip.messages import DirDelta, DirSummary, DirSummaryReq

_INF = math.inf
_xxh = xxhash.xxh3_64_intdigest  # = directory_filter.fingerprint, without the call in between
_FP_BYTES = 9  # msgpack of a 64-bit unsigned int (0xcf + 8 bytes)
_DELTA_RESERVE = 48  # a delta's own fields (tag, epoch, gen, versions, array headers)
_STASH = 64  # deltas kept while a summary is being fetched
_WALK_COST = 10  # install work units per eviction-walk step (~3 us against ~0.3 us per entry)
_SCAN_SLOTS = 256  # table slots scanned (clearing a holder's old entries) per install work unit
_MIN_BUCKETS = 4
_NARROW_HIDS = (1 << NARROW_SHIFT) - 1  # 16-bit entries hold holder ids 1..127
SUMMARY_FORMAT = 48  # DirSummary.k: top 48 bits of each fingerprint, 6 B (1..10: Bloom, format 1)


class DirectoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
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
    # A receiver that sees a gap first asks the holder to resend the deltas it missed (a few
    # hundred bytes instead of a 6 B/block summary) and fetches a summary only if they have not
    # arrived this much later: many LAN round trips, and what a lost resend adds to staleness.
    resend_wait_s: float = 0.05
    # Deltas a holder keeps for resends (up to 146 fingerprints each); 0 turns resends off.
    resend_log: int = 64
    # A new lookup table is sized for this load: 2 / 0.75 = 2.67 B per entry, and absent keys
    # match a tag with probability 16 x 0.75 / 511 = 2.3%; the load then drifts with holdings.
    # Not higher: the R copies of a block share a bucket pair, and an insert's eviction walk gets
    # long as the table fills. Measured (blocks held 3x, as at R = 2 with the GPU node's copy,
    # inserts of 8 per call): 7 us per entry between loads 0.75 and 0.85, 270 us between 0.88
    # and 0.94; at the old 0.88 / 0.95 the flash daemons of `bench replay` spent most of their
    # event loop placing directory deltas.
    target_load: float = 0.75
    # Above this load the table is rebuilt bigger (refilled from summaries). Fill limits of the
    # 8-slot buckets are 0.97 (blocks held once or twice) and 0.94 (three times), but walks cost
    # 10-40x more past 0.88 (above); past the limit entries spill into the overflow, which also
    # starts a rebuild once it holds more than 1/1024 of the slots.
    max_load: float = 0.85
    # Below this load (holders left) it is rebuilt smaller: memory per entry stays <= 5 B.
    min_load: float = 0.4
    # Evictions tried before an entry goes to the (exact) overflow map; a few hundred is the
    # usual cuckoo bound, and the overflow stays empty below max_load (measured).
    max_kicks: int = 500
    # Keys whose fingerprint is remembered (a prompt's prefix is looked up again and again);
    # ~200 B each in Python objects, so 8192 keys cost ~1.6 MB. 0 turns the cache off.
    hash_cache: int = 8192
    # Summary work placed per call (a bigger summary is installed over several timer calls, the
    # old view answering meanwhile): one unit per entry of the vectorised pass (~0.3 us), 10 per
    # eviction-walk step (~3 us, most entries near a full table). 50,000 units measured <= 11 ms
    # per call filling a table to 0.88 and <= 20 ms up to 0.95, so the Trio loop (SWIM probes,
    # lookups) stays responsive while a 15 M-block holder is installed (~300 calls, not one ~7 s).
    install_step: int = 50000

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("batch_s", self.batch_s >= 0.0),
            ("marker_s", self.marker_s > 0.0),
            ("refresh_s", self.refresh_s > 0.0),
            ("refresh_fanout", self.refresh_fanout >= 0),
            ("fetch_timeout_s", self.fetch_timeout_s > 0.0),
            ("resend_wait_s", self.resend_wait_s > 0.0),
            ("resend_log", self.resend_log >= 0),
            ("target_load", 0.05 <= self.target_load <= 0.95),
            ("max_load", self.target_load < self.max_load <= 1.0),
            ("min_load", 0.0 <= self.min_load < self.target_load),
            ("max_kicks", self.max_kicks >= 0),
            ("hash_cache", self.hash_cache >= 0),
            ("install_step", self.install_step >= 1),
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
    table_bytes: int  # the lookup table (both tables while one is being refilled)
    table_load: float  # entries / slots of the lookup table
    overflow_entries: int  # entries that found no slot (kept exactly, 8 B each)
    memory_bytes: int  # table_bytes + 8 x overflow_entries
    resizes: int  # tables rebuilt (refilled from summaries)
    deltas_sent: int
    deltas_applied: int
    gaps: int
    summaries_sent: int
    summaries_installed: int
    summaries_rejected: int
    stale_ignored: int
    resends_asked: int  # gaps we asked a holder to fill by resending deltas
    resends_sent: int  # resend requests we answered
    installing: int = 0  # summary entries still to be placed (``install_step`` per timer call)


class _View:
    __slots__ = (
        "node", "addr", "epoch", "gen", "ver", "tab", "hid", "stash", "fetch_until", "count",
        "want_epoch", "want_gen", "want_ver", "migrate", "resent", "kept", "kept_from", "inst",
    )  # fmt: skip

    def __init__(self, node: str, addr: str) -> None:
        self.node = node
        self.addr = addr
        self.epoch = -1
        self.gen = -1
        self.ver = -1
        self.tab: HolderTable | None = None  # the table holding our entries (None: no summary)
        self.hid = 0
        self.stash: list[DirDelta] = []
        self.fetch_until = -_INF
        self.count = 0
        # the newest (epoch, gen, ver) the holder told us about: behind it -> fetch until caught up
        self.want_epoch = -1
        self.want_gen = -1
        self.want_ver = -1
        self.migrate = False  # our entries must move to the new table: fetch a summary
        self.resent = False  # a resend was asked for since the view was last caught up
        # deltas applied since a summary was first asked for (None: not fetching), so that a
        # summary older than ``ver`` (built before them) can still be installed, with them on top
        self.kept: list[DirDelta] | None = None
        self.kept_from = -1  # ``ver`` when the fetch was asked for: no summary can be older
        self.inst: _Install | None = None  # a summary being placed a step at a time

    @property
    def behind(self) -> bool:
        return self.tab is None or self.migrate or self.inst is not None or (
            (self.epoch, self.ver) < (self.want_epoch, self.want_ver)
        ) or (self.epoch == self.want_epoch and self.gen < self.want_gen)  # fmt: skip


class _Install:
    """A summary being placed ``install_step`` entries per call into ``tab`` under ``hid``
    (the view's own id in another table, or a second id in its own table)."""

    __slots__ = ("s", "n", "pos", "tab", "hid", "walk", "walk_b")

    def __init__(self, s: DirSummary, n: int, tab: HolderTable, hid: int) -> None:
        self.s = s
        self.n = n
        self.pos = 0  # entries through the vectorised pass so far (summary order)
        self.tab = tab
        self.hid = hid
        self.walk: list[int] = []  # tags left by that pass, to place by eviction walks
        self.walk_b: list[int] = []  # ... and their first buckets


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
        self._gen = 0  # never raised by this version (receivers still refetch on a higher one)
        self._flush_at = _INF
        self._marker_at = _INF
        self._refresh_at = _INF
        self._rr = 0
        self._summary: DirSummary | None = None
        self._log: deque[DirDelta] = deque(maxlen=max(1, config.resend_log))  # for resends
        # receiver state
        self._views: dict[str, _View] = {}
        self._behind: set[str] = set()  # views waiting for a summary (retried on a timer)
        self._tab: HolderTable | None = None  # the lookup table
        self._next: HolderTable | None = None  # the table being refilled (a resize), if any
        # same-size tables, one per view whose summary is placed beside its old entries when the
        # table has no room for both copies (see ``_begin``); dropped once no view uses them
        self._sides: list[HolderTable] = []
        self._wide = False
        self._by_hid: dict[int, str] = {}
        self._free_hids: list[int] = []
        self._hid_top = 0
        self._npeers = 0
        self._resizes = 0
        self._shrink_due = False
        self._installing: dict[str, None] = {}  # views with a summary being placed, in order
        self._now = 0.0  # the latest time we were given (a due shrink check runs then)
        # key -> its lookup record in _rc_for (12 bytes: two buckets and a tag), bounded
        self._rc: dict[bytes, bytes] = {}
        self._rc_for: HolderTable | None = None
        self._rc_shift = 0
        self._outbox: list[tuple[str, DirDelta]] = []
        self._streams: list[tuple[str, DirSummaryReq]] = []
        # (holder, version, now) whenever a view (or our own publication) reaches a version
        self.observer: Callable[[str, int, float], None] | None = None
        self._c = dict.fromkeys(
            (
                "deltas_sent", "deltas_applied", "gaps", "summaries_sent",
                "summaries_installed", "summaries_rejected", "stale_ignored", "resends_asked",
                "resends_sent",
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
            self._log.append(d)
            self._c["deltas_sent"] += 1
        if self.observer is not None:
            self.observer(self.id, self._ver, now)
        self._marker_at = now + cfg.marker_s
        if self._refresh_at == _INF:  # a random phase, so holders' refreshes do not line up
            self._refresh_at = now + (0.5 + self.rng.random()) * cfg.refresh_s

    def _marker(self) -> DirDelta:
        return DirDelta(self.id, self.epoch, self._gen, self._ver, self._ver)

    def summary(self) -> DirSummary:
        """Our fingerprints as of our last published version (what a fetching receiver gets).

        Built once per published version: the fetches that follow share one build. One call,
        O(blocks) (~0.1 s per 1 M): the reply is a single frame (16 MiB: <= ~2.8 M blocks), so
        bounding it further needs chunked summaries (see docs/directory.md)."""
        c = self._summary
        if c is not None and c.ver == self._ver and c.epoch == self.epoch and c.gen == self._gen:
            return c
        fps = (self._mine | self._pend_rm) - self._pend_add if self._pend_add or self._pend_rm else (
            self._mine
        )
        arr = np.fromiter(fps, dtype=np.uint64, count=len(fps))
        c = DirSummary(
            self.id, self.epoch, self._gen, self._ver, SUMMARY_FORMAT, pack48(arr), arr.size
        )
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
        if self._shrink_due or self._installing:
            return self._now
        if self._behind:
            views = self._views
            for node in self._behind:
                v = views.get(node)
                if v is not None and v.fetch_until < t:
                    t = v.fetch_until
        return t

    def handle_timer(self, now: float, peers: Sequence[tuple[str, str]]) -> None:
        """``peers``: (node id, address) of the live members other than us."""
        self._npeers = len(peers)
        self._now = now
        if self._shrink_due:
            self._shrink_due = False
            self._check_size(now, shrink=True)
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
        if self._installing:
            self._install_step(now)

    def peer_joined(self, addr: str) -> None:
        """A member became alive: tell it our version so it fetches our summary."""
        if self._ver > 0:
            self._outbox.append((addr, self._marker()))

    def forget(self, node: str) -> None:
        """Drop the view of a member that died or left."""
        v = self._views.pop(node, None)
        self._behind.discard(node)
        if v is not None:
            self._abort(v)
            self._unplace(v)
            if v.hid:
                del self._by_hid[v.hid]
                heapq.heappush(self._free_hids, v.hid)
            self._settle()
            self._shrink_due = True  # checked at the next timer (it has the time)

    # ---------------------------------------------------------------- receiver side

    def handle_delta(self, d: DirDelta, src: str, now: float) -> None:
        self._now = now
        if d.node == self.id:
            self._resend(d, src)
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
        if d.epoch > v.epoch and v.tab is not None:
            self._reset(v)  # the holder restarted: what we knew is void
        elif v.inst is not None and d.epoch > v.inst.s.epoch:
            self._abort(v)  # a summary of the holder's previous run
        if v.tab is None or d.epoch > v.epoch:
            self._stash(v, d)
            self._fetch(v, now)
            return
        if d.ver <= v.ver and d.prev != d.ver:
            self._c["stale_ignored"] += 1
        elif d.prev == v.ver:
            if d.ver != d.prev and not _may_apply(v):
                self._stash(v, d)  # ``kept`` is full: wait for the summary, replay it on top
            elif d.ver != d.prev:
                self._apply(v, d)
                if v.stash:
                    self._drain(v)
                self._reached(v, now)
                self._check_size(now)
        elif d.prev > v.ver or d.ver > v.ver:
            self._c["gaps"] += 1
            self._stash(v, d)
            self._repair(v, now)
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
        self._now = now
        self._install(msg, src, now)
        return None

    def _stash(self, v: _View, d: DirDelta) -> None:
        if d.prev != d.ver and len(v.stash) < _STASH:
            v.stash.append(d)

    def _resend(self, d: DirDelta, src: str) -> None:
        """A receiver that has our version ``d.ver`` (a marker addressed to ourselves) asks for
        the deltas after it; if we no longer have them all, it fetches a summary instead."""
        log = self._log
        if d.epoch != self.epoch or d.prev != d.ver or not 0 <= d.ver < self._ver:
            return
        if not self.config.resend_log or not log or log[0].prev > d.ver:
            return
        for x in log:
            if x.ver > d.ver:
                self._outbox.append((src, x))
        self._c["resends_sent"] += 1

    def _repair(self, v: _View, now: float) -> None:
        """Behind by a few deltas: ask the holder to resend them (once per gap), and fetch a
        summary if they have not arrived ``resend_wait_s`` later (``handle_timer``)."""
        self._behind.add(v.node)
        if v.fetch_until > now:
            return
        cfg = self.config
        if not v.resent and not v.migrate and 0 < v.want_ver - v.ver <= cfg.resend_log:
            v.resent = True
            v.fetch_until = now + cfg.resend_wait_s
            self._outbox.append((v.addr, DirDelta(v.node, v.epoch, v.gen, v.ver, v.ver)))
            self._c["resends_asked"] += 1
            return
        self._fetch(v, now)

    def _drain(self, v: _View) -> None:
        """Apply stashed deltas that now follow on (after a resend filled a gap)."""
        moved = True
        while moved:
            moved = False
            for d in v.stash:
                if d.epoch == v.epoch and d.prev == v.ver and d.ver > d.prev and _may_apply(v):
                    self._apply(v, d)
                    moved = True
        v.stash = [d for d in v.stash if d.epoch == v.epoch and d.ver > v.ver]

    def _fetch(self, v: _View, now: float) -> None:
        self._behind.add(v.node)
        if v.fetch_until > now or v.inst is not None:
            return  # in flight, or a summary is being placed (the view fetches after it if behind)
        v.fetch_until = now + self.config.fetch_timeout_s
        if v.kept is None and v.tab is not None:  # the deltas we apply until it is installed
            v.kept, v.kept_from = [], v.ver
        self._streams.append((v.addr, DirSummaryReq(v.node)))

    def _reset(self, v: _View) -> None:
        self._abort(v)
        self._unplace(v)
        v.stash = []
        v.kept = None
        v.fetch_until = -_INF
        self._settle()

    def _unplace(self, v: _View) -> None:
        """Take the view's entries out of the table that holds them."""
        if v.tab is not None:
            v.tab.remove_holder(v.hid)
            v.tab = None
        v.migrate = False

    def _install(self, s: DirSummary, src: str, now: float) -> None:
        n = len(s.words) // 6
        if s.node == self.id or s.k != SUMMARY_FORMAT or len(s.words) % 6 or s.count != n:
            self._c["summaries_rejected"] += 1
            return
        v = self._views.get(s.node)
        if v is None:
            v = self._views[s.node] = _View(s.node, src)
        p = v.inst
        if p is not None and (s.epoch, s.ver, s.gen) <= (p.s.epoch, p.s.ver, p.s.gen):
            self._c["stale_ignored"] += 1  # the one being placed is as new
            return
        if self._replay(v, s) is None:
            self._c["stale_ignored"] += 1
            return
        if p is not None:
            self._abort(v)
        if self._begin(v, s, n, now):
            left = self._advance(v, self.config.install_step)  # a small one is placed at once
            p = v.inst
            assert p is not None
            if p.pos >= n and not p.walk and left >= _scan_units(v):
                self._finish(v, now)
            return
        # no second id for the view in its own table (or no room for both copies) and small
        # enough for one call: the view's entries are replaced at once
        kept = self._replay(v, s)
        assert kept is not None
        v.fetch_until = -_INF
        v.kept = None
        self._unplace(v)
        if not v.hid:
            v.hid = self._alloc_hid(v.node)
        tab = self._room_for(v, n, now)
        tab.insert(unpack48(s.words), v.hid)
        v.tab = tab
        self._installed(v, s, n, kept, now)

    def _replay(self, v: _View, s: DirSummary) -> list[DirDelta] | None:
        """The deltas to replay on top of ``s`` (None: ``s`` is older than the view and not
        covered by what it kept, so it is stale).

        Deltas applied since we asked (to the old table in a resize, while a new generation is
        fetched, or while a summary is placed step by step) make v.ver overtake a summary built
        before they arrived: they are replayed on top of it. Ignoring it and asking again would
        loop as long as a summary takes longer than the holder's next delta. What is not
        covered was asked for earlier (a fetch of an episode since caught up, or a retry's first
        answer): the newer answer is coming."""
        kept = v.kept if v.kept is not None and s.epoch == v.epoch else []
        if (s.epoch, s.ver) < (v.epoch, v.ver):
            kept = [d for d in kept if d.ver > s.ver]
            if s.ver < v.kept_from or not kept or kept[0].prev != s.ver:
                return None
            return kept
        return []

    def _begin(self, v: _View, s: DirSummary, n: int, now: float) -> bool:
        """Start placing a summary, ``install_step`` work units per call. Meanwhile the view's
        current entries stay where they are, go on taking deltas (kept for the replay) and
        answer lookups: no false negatives. False (a small summary only): the view's own table
        has no second 16-bit holder id or no room for both copies; install it at once."""
        target = self._next if self._next is not None else self._tab
        if v.tab is not None and v.tab is target and n <= self.config.install_step:
            nxt = self._free_hids[0] if self._free_hids else self._hid_top + 1
            room = target.size + target.n_overflow + self._reserved(target) + n
            if (nxt > _NARROW_HIDS and not self._wide) or (
                self._next is None and room > self.config.max_load * target.capacity
            ):
                return False
        side = self._side_for(v, n)
        v.fetch_until = _INF  # the answer is here: no fetch (a resize below starts one)
        if v.kept is None and v.tab is not None:
            v.kept, v.kept_from = [], v.ver
        if not v.hid:
            v.hid = self._alloc_hid(v.node)
        if side is not None:  # no room (or no id) for both copies: a same-size table of its own
            tab, hid = side, v.hid
            self._sides.append(side)
        elif (tab := self._room_for(v, n, now)) is v.tab:  # old and new side by side: two ids
            nxt = self._free_hids[0] if self._free_hids else self._hid_top + 1
            if nxt > _NARROW_HIDS and not self._wide and self._next is None:
                # a big one and no narrow id left: grow the table rather than widen its entries
                grown = max(self._expected(None, 0),
                            math.ceil(1.25 * self.config.target_load * tab.capacity))  # fmt: skip
                tab = self._new_table(grown)
                self._start_resize(tab, now)
                hid = v.hid
            else:
                hid = self._alloc_hid(v.node)
        else:
            hid = v.hid
        v.inst = _Install(s, n, tab, hid)
        # no summary retry while it is placed (``_fetch`` checks ``inst``), but a gap meanwhile
        # may still ask for a resend (``_repair``): the resent deltas are kept for the replay
        v.fetch_until = -_INF
        self._installing[v.node] = None
        self._behind.add(v.node)
        return True

    def _side_for(self, v: _View, n: int) -> HolderTable | None:
        """A fresh table of the main table's size for a big summary of ``v`` (None: not needed).

        Used when the view lives in the main table (no resize under way) and both copies do not
        fit (or no second 16-bit id is free) but the new one alone does: growing the table would
        refetch every holder's summary. The summary is placed there under the view's own id,
        then (``_finish``) the old entries are cleared and it is placed again into the main
        table, the side copy answering meanwhile; then the side table is dropped."""
        tab = self._tab
        if self._next is not None or tab is None or v.tab is not tab or n <= 0:
            return None
        cap = self.config.max_load * tab.capacity
        used = tab.size + tab.n_overflow + self._reserved(tab)
        nxt = self._free_hids[0] if self._free_hids else self._hid_top + 1
        no_id = nxt > _NARROW_HIDS and not self._wide
        if (used + n <= cap and not no_id) or used - v.count + n > cap:
            return None  # both fit (two ids), or not even one does (a real resize)
        return HolderTable(tab.m, self.rng, max_kicks=self.config.max_kicks, wide=self._wide)

    def _install_step(self, now: float) -> None:
        """One timer call's share of placement: ``install_step`` work units, oldest install
        first; the installs that are complete are swapped in."""
        budget = self.config.install_step
        while self._installing and budget > 0:
            v = self._views[next(iter(self._installing))]
            budget = self._advance(v, budget)
            p = v.inst
            assert p is not None
            if p.pos >= p.n and not p.walk:
                budget -= self._finish(v, now)

    def _advance(self, v: _View, budget: int) -> int:
        """Place entries of ``v.inst`` for up to ``budget`` work units; returns what is left.

        A unit is one entry of the vectorised pass (~0.3 us); one step of an eviction walk
        (~3 us, Python) costs ``_WALK_COST``. So a call costs ~0.3 us x ``install_step``
        whatever the load (near a full table most of a chunk needs a walk), plus at most one
        walk's overrun (``max_kicks`` steps)."""
        p = v.inst
        assert p is not None
        tab, hid = p.tab, p.hid
        while budget > 0:
            if p.walk:
                budget -= _WALK_COST * tab.walk(p.walk.pop(), hid, p.walk_b.pop())
            elif p.pos < p.n:
                k = min(budget, p.n - p.pos)
                p.walk, p.walk_b = tab.insert_free(
                    unpack48(p.s.words[6 * p.pos : 6 * (p.pos + k)]), hid
                )
                p.pos += k
                budget -= k
            else:
                break
        return budget

    def _finish(self, v: _View, now: float) -> int:
        """Every entry of ``v.inst`` is placed: swap them in for the view's old ones. Returns
        the work units it took: clearing a holder's entries scans its table (~1 ns per slot,
        ``_SCAN_SLOTS`` slots per unit)."""
        p = v.inst
        assert p is not None
        scan = _scan_units(v)
        v.inst = None
        del self._installing[v.node]
        v.fetch_until = -_INF
        kept = self._replay(v, p.s)
        if kept is None:  # the view went its own way meanwhile (it caught up without it)
            p.tab.remove_holder(p.hid)
            if p.hid != v.hid:
                self._free_hid(p.hid)
            self._c["stale_ignored"] += 1
            if v.tab is not None and self._next is not None and v.tab is not self._next:
                v.migrate = True
                self._fetch(v, now)
            self._reached(v, now)
            self._settle()
            return scan
        v.kept = None
        if v.tab is not None and (v.tab is not p.tab or v.hid != p.hid):
            v.tab.remove_holder(v.hid)
        if v.hid != p.hid:
            self._free_hid(v.hid)
        v.tab, v.hid, v.migrate = p.tab, p.hid, False
        if any(p.tab is t for t in self._sides):
            # placed in a side table (``_side_for``): the main table now has room for it; place
            # it there too, the side copy (kept current by deltas) answering meanwhile
            main = self._next if self._next is not None else self._tab
            assert main is not None
            v.kept, v.kept_from = [], p.s.ver  # the deltas replayed below, to replay again
            v.inst = _Install(p.s, p.n, main, v.hid)
            self._installing[v.node] = None
            self._behind.add(v.node)
        self._installed(v, p.s, p.n, kept, now)
        return scan

    def _abort(self, v: _View) -> None:
        """Drop the summary being placed for ``v`` (and what of it is placed)."""
        p = v.inst
        if p is None:
            return
        v.inst = None
        del self._installing[v.node]
        if p.pos:
            p.tab.remove_holder(p.hid)
        if p.hid != v.hid:
            self._free_hid(p.hid)
        v.fetch_until = -_INF

    def _installed(self, v: _View, s: DirSummary, n: int, kept: list[DirDelta],
                   now: float) -> None:  # fmt: skip
        v.epoch, v.gen, v.ver, v.count = s.epoch, s.gen, s.ver, n
        if v.inst is None:  # (a side table's copy counts once, when it reaches the main table)
            self._c["summaries_installed"] += 1
        stash = kept + sorted(
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
        self._settle()
        self._check_size(now, shrink=True)

    def _apply(self, v: _View, d: DirDelta) -> None:
        tab = v.tab
        assert tab is not None
        if d.added:
            tab.insert(np.array(d.added, dtype=np.uint64), v.hid)
        hid = v.hid
        for fp in d.removed:
            tab.remove(fp, hid)
        v.count += len(d.added) - len(d.removed)
        v.ver = d.ver
        if v.kept is not None:
            v.kept.append(d)
        self._c["deltas_applied"] += 1

    def _reached(self, v: _View, now: float) -> None:
        if not v.behind:
            self._behind.discard(v.node)
            v.stash = []
            v.kept = None
            v.resent = False
            v.fetch_until = -_INF
        if self.observer is not None:
            self.observer(v.node, v.ver, now)

    # ---------------------------------------------------------------- table size

    def _alloc_hid(self, node: str) -> int:
        if self._free_hids:
            hid = heapq.heappop(self._free_hids)
        else:
            self._hid_top += 1
            hid = self._hid_top
        if hid > MAX_HID:
            raise RuntimeError(f"more than {MAX_HID} holders")
        if hid > _NARROW_HIDS and not self._wide:
            self._wide = True
            for t in (self._tab, self._next, *self._sides):
                if t is not None:
                    t.widen()
        self._by_hid[hid] = node
        return hid

    def _free_hid(self, hid: int) -> None:
        del self._by_hid[hid]
        heapq.heappush(self._free_hids, hid)

    def _new_table(self, entries: int) -> HolderTable:
        buckets = max(_MIN_BUCKETS, math.ceil(entries / (SLOTS * self.config.target_load)))
        return HolderTable(buckets, self.rng, max_kicks=self.config.max_kicks, wide=self._wide)

    def _expected(self, v: _View | None, n: int) -> int:
        """Entries to size a table for: the placed views, ``n`` more for ``v``, and as many as
        the average holder for each member we know of that has not sent a summary yet."""
        placed = [x for x in self._views.values()
                  if (x.tab is not None or x.inst is not None) and x is not v]  # fmt: skip
        counted = len(placed) + (v is not None)
        total = sum(x.inst.n if x.inst is not None else x.count for x in placed) + n
        unknown = max(len(self._views), self._npeers) - counted
        return total + max(0, unknown) * (total // max(1, counted))

    def _room_for(self, v: _View, n: int, now: float) -> HolderTable:
        """The table a summary of ``n`` entries for ``v`` goes into (built or resized here)."""
        if self._next is not None:
            return self._next  # a resize is under way: every summary goes to the new table
        tab = self._tab
        room = self.config.max_load * tab.capacity if tab is not None else 0.0
        if tab is not None and tab.size + tab.n_overflow + self._reserved(tab) + n <= room:
            return tab
        new = self._new_table(self._expected(v, n))
        if any(x.tab is not None or x.inst is not None for x in self._views.values()):
            self._start_resize(new, now)
        else:
            self._tab = new
        return new

    def _reserved(self, tab: HolderTable | None = None) -> int:
        """Entries of summaries still to be placed (into ``tab``, or anywhere)."""
        views = self._views
        left = 0
        for node in self._installing:
            p = views[node].inst
            if p is not None and (tab is None or p.tab is tab):
                left += p.n - p.pos + len(p.walk)
        return left

    def _second_copies(self, tab: HolderTable) -> int:
        """Entries in ``tab`` of summaries being placed there under a second holder id."""
        views = self._views
        n = 0
        for node in self._installing:
            v = views[node]
            p = v.inst
            if p is not None and p.tab is tab and p.hid != v.hid:
                n += p.pos - len(p.walk)
        return n

    def _check_size(self, now: float, *, shrink: bool = False) -> None:
        """Start a resize if the table is too full, or (``shrink``) too big for what we expect
        to hold (members that have not sent a summary yet count as average holders)."""
        tab = self._tab
        if tab is None or self._next is not None:
            return
        cfg = self.config
        # a view's second copy (placed under a second id beside its old entries) is temporary:
        # the old one is cleared when it is complete, so it does not count towards growing
        total = tab.size + tab.n_overflow - self._second_copies(tab)
        if total > cfg.max_load * tab.capacity or tab.n_overflow > max(16, tab.capacity >> 10):
            # at least 1.25x: holdings that grow steadily do not refetch at every 8%
            grown = max(self._expected(None, 0), math.ceil(1.25 * cfg.target_load * tab.capacity))
            self._start_resize(self._new_table(grown), now)
        elif shrink and tab.m > _MIN_BUCKETS:
            want = self._expected(None, 0)
            if want < cfg.min_load * tab.capacity:
                self._start_resize(self._new_table(want), now)

    def _start_resize(self, new: HolderTable, now: float) -> None:
        """Refill ``new`` from every holder's summary; lookups read both tables meanwhile."""
        self._next = new
        self._resizes += 1
        for v in self._views.values():
            p = v.inst
            if p is not None:  # being placed: start again in the new table (no refetch)
                if p.pos:
                    p.tab.remove_holder(p.hid)
                if p.hid != v.hid:
                    self._free_hid(p.hid)
                p.tab, p.hid, p.pos, p.walk, p.walk_b = new, v.hid, 0, [], []
            elif v.tab is not None:
                v.migrate = True
                self._fetch(v, now)
        self._settle()

    def _settle(self) -> None:
        """Finish a resize once no view is left in the old table; drop an empty table (and
        side tables no view uses any more)."""
        if self._sides:
            used = [t for v in self._views.values()
                    for t in (v.tab, v.inst.tab if v.inst is not None else None)]  # fmt: skip
            self._sides = [t for t in self._sides if any(t is u for u in used)]
        nxt = self._next
        if nxt is not None and not any(
            v.tab is not None and v.tab is not nxt for v in self._views.values()
        ):
            self._tab, self._next = nxt, None
        if self._next is None and not self._installing and all(
            v.tab is None for v in self._views.values()
        ):
            self._tab = None

    # ---------------------------------------------------------------- lookup

    def _fps(self, keys: Sequence[bytes]) -> list[int]:
        return [fingerprint(_key(k)) for k in keys]

    def _records(self, keys: Sequence[bytes], tab: HolderTable) -> npt.NDArray[np.uint32]:
        """The keys' lookup records in ``tab`` (``HolderTable.records``), from the key cache:
        a prefix seen before costs one dictionary probe per key, no hashing."""
        cache = self._rc
        if self._rc_for is not tab or self._rc_shift != tab.shift:
            cache.clear()  # another table (a resize) or wider entries: other records
            self._rc_for, self._rc_shift = tab, tab.shift
        try:
            recs = [cache.get(k) for k in keys]
        except TypeError:  # an unhashable key type (bytearray): normalise, then look up
            keys = [_key(k) for k in keys]
            recs = [cache.get(k) for k in keys]
        if None in recs:
            miss = [i for i, r in enumerate(recs) if r is None]
            fresh = tab.records(np.array([_xxh(_key(keys[i])) for i in miss],
                                         dtype=np.uint64)).tobytes()  # fmt: skip
            cap = self.config.hash_cache
            if len(cache) + len(miss) > cap:
                cache.clear()
            for j, i in enumerate(miss):
                r = fresh[12 * j : 12 * j + 12]
                recs[i] = r
                if cap:
                    cache[_key(keys[i])] = r
        return np.frombuffer(b"".join(recs), dtype=np.uint32).reshape(-1, 3)  # type: ignore[arg-type]

    def clear_hash_cache(self) -> None:
        """Forget the remembered key records (to time a first-sight lookup)."""
        self._rc.clear()

    def _tables(self) -> list[HolderTable]:
        return [t for t in (self._tab, self._next, *self._sides)
                if t is not None and (t.size or t.n_overflow)]  # fmt: skip

    def lookup_holders(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Per key, the other nodes that may hold it (stale or false positives possible)."""
        tables = self._tables()
        if not keys or not tables:
            return [[] for _ in keys]
        if len(tables) == 1:
            found = tables[0].holders_records(self._records(keys, tables[0]))
        else:  # a resize (or a side table) is under way: a view lives in one of the tables
            a = np.array(self._fps(keys), dtype=np.uint64)
            found = tables[0].hit_holders(a)
            for t in tables[1:]:
                found = [x + y for x, y in zip(found, t.hit_holders(a), strict=True)]
        names = self._by_hid
        if self._installing or self._sides:  # old and new entries may both match: name it once
            return [list(dict.fromkeys(names[h] for h in hids)) for hids in found]
        return [[names[h] for h in hids] for hids in found]

    def prefix_in_mesh(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held here or may be held by another node."""
        n = len(keys)
        if not n:
            return 0
        tables = self._tables()
        if len(tables) == 1:  # the usual case: one table, records from the key cache
            hit = tables[0].hit_records(self._records(keys, tables[0]))
            if hit.all():
                return n
            missing: Iterable[int] = np.flatnonzero(~hit).tolist()
        elif tables:  # a resize (or a side table) is under way: every table, no cache
            a = np.array(self._fps(keys), dtype=np.uint64)
            hit = tables[0].hit_any(a)
            for t in tables[1:]:
                hit |= t.hit_any(a)
            missing = np.flatnonzero(~hit).tolist()
        else:
            missing = range(n)
        mine = self._mine
        if not mine:
            return next(iter(missing), n)
        for i in missing:
            if fingerprint(_key(keys[i])) not in mine:
                return i
        return n

    # ---------------------------------------------------------------- inspection

    def view_version(self, node: str) -> int | None:
        v = self._views.get(node)
        return v.ver if v is not None and v.tab is not None else None

    def _all_tables(self) -> list[HolderTable]:
        return [t for t in (self._tab, self._next, *self._sides) if t is not None]

    def memory_bytes(self) -> int:
        """Bytes of remote-holder state: the table(s) + 8 per overflow entry."""
        return sum(t.nbytes + 8 * t.n_overflow for t in self._all_tables())

    def statistics(self) -> DirectoryStats:
        tabs = self._all_tables()
        placed = [v for v in self._views.values() if v.tab is not None]
        tb = sum(t.nbytes for t in tabs)
        ov = sum(t.n_overflow for t in tabs)
        return DirectoryStats(
            local_blocks=len(self._mine),
            version=self._ver,
            generation=self._gen,
            views=len(placed),
            view_blocks=sum(v.count for v in placed),
            table_bytes=tb,
            table_load=self._tab.load if self._tab is not None else 0.0,
            overflow_entries=ov,
            memory_bytes=tb + 8 * ov,
            resizes=self._resizes,
            installing=self._reserved(),
            **self._c,
        )


def _scan_units(v: _View) -> int:
    """Install work units of clearing the old entries of ``v`` (a scan of their table)."""
    return v.tab.capacity // _SCAN_SLOTS if v.tab is not None else 0


def _may_apply(v: _View) -> bool:
    """Whether ``v`` may apply a delta now: not while fetching with ``kept`` full (its version
    then stays put, so the summary on its way is not older than what it would have to replay)."""
    return v.kept is None or len(v.kept) < _STASH


def _key(key: bytes) -> bytes:
    if type(key) is bytes:
        return key
    if not isinstance(key, (bytearray, memoryview)):
        raise TypeError(f"block key must be bytes, got {type(key).__name__}")
    return bytes(key)
