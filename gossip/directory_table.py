"""One cuckoo table of (tag, holder) entries for all remote holders: the directory's lookup index.

Theory of operation
-------------------
A receiver keeps *one* table for every remote holder instead of one filter per holder, so a
lookup costs the same whatever the mesh size, and its false-positive rate does not grow with N.

- A (holder, block) pair is one entry ``tag << shift | hid``: ``hid`` (>= 1) names the holder's
  view, ``tag`` in [1, 511] is 9 bits of the block's 64-bit fingerprint; 0 is an empty slot.
  Entries are 16 bits (``shift`` 7, up to 127 holders) and widen to 32 bits (``shift`` 23) the
  first time a 128th holder needs an id.
- ``M`` buckets of 8 entries (16 bytes). A fingerprint ``fp`` may sit in bucket
  ``b1 = ((fp >> 32) * M) >> 32`` or ``b2 = (ALT[tag] - b1) mod M``: partial-key cuckoo hashing,
  where an entry moves between its two buckets knowing only its tag (``alt`` is an involution, so
  ``M`` need not be a power of two and the table is sized to its load).
- Why 8 slots and 9-bit tags rather than 4 slots and 8 bits (same false-positive rate, same 16
  bits per entry): the R copies of a replicated block (one per holder) share one bucket pair, so
  with 4-slot buckets a table of blocks held twice behaves like one of 2-slot buckets and fills
  at ~0.90 (held three times: ~0.71, measured). With 8 slots: ~0.97 / ~0.94.
- Lookup: gather the 16 entries of a key's two buckets and compare their tags: an absent key
  matches with probability ~ 16 x load / 511 (2.8% at load 0.9), whatever the number of holders.
  Holder names come with the hit: no per-holder pass.
- Insert (a batch of one holder's fingerprints): a vectorised pass fills free slots of ``b1``,
  then of ``b2``; what is left is placed by a random-walk eviction of up to ``max_kicks`` steps.
  ``insert_free`` and ``walk`` are the two halves, so a caller can spread a big batch over
  calls of bounded work (the directory does). An entry that still has no room is kept in an
  exact *overflow* map ``(min(b1, b2), tag) -> hids``
  (never dropped: no false negatives); the directory grows the table when the overflow is not tiny.
- Remove (fp, hid): clears one entry ``(tag, hid)`` from ``b1``, ``b2`` or the overflow. Two
  fingerprints with the same tag and the same bucket pair are interchangeable here, so removing
  one copy of a pair that was inserted never hides another block: the directory only removes what
  it inserted (deltas are applied in version order).
- The table cannot be resized in place (entries keep 9 bits of the fingerprint, not the key):
  ``gossip/directory.py`` builds a new one and refills it from holders' summaries. Placement reads
  only the top 48 bits of a fingerprint (``b1``: bits 32-63, tag: bits 23-31), so summaries carry
  6 bytes per block (``pack48`` / ``unpack48``).

Public API: ``HolderTable`` (``insert``, ``insert_free``, ``walk``, ``remove``, ``remove_holder``, ``widen``, ``geometry``,
``records``, ``hit_records``, ``holders_records``, ``hit_any``, ``hit_holders``, ``size``, ``capacity``, ``load``,
``nbytes``, ``overflow_entries``), ``pack48``, ``unpack48``, ``SLOTS``, ``TAG_BITS``, ``MAX_HID``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

SLOTS = 8
TAG_BITS = 9
MAX_TAG = (1 << TAG_BITS) - 1
NARROW_SHIFT = 16 - TAG_BITS  # 16-bit entries: hids 1..127
WIDE_SHIFT = 32 - TAG_BITS  # 32-bit entries: hids up to 2**23 - 1
MAX_HID = (1 << WIDE_SHIFT) - 1
_WALK_LOAD = 0.97  # above this load a random walk rarely finds room: straight to the overflow
_SMALL = 24  # inserts of up to this many entries go one by one
_S32 = np.uint64(32)
_TAG_IN = np.uint64(32 - TAG_BITS)  # the tag comes from the top TAG_BITS of the low word
_TAG_MASK = np.uint64((1 << TAG_BITS) - 1)
_U_MAX_TAG = np.uint64(MAX_TAG)
_U_TAG_BITS = np.uint64(TAG_BITS)
_ONE = np.uint64(1)
# ALT[tag]: a fixed 32-bit hash of the tag; bucket offsets are (ALT * M) >> 32 (deterministic)
_ALT = np.array(
    [xxhash.xxh3_64_intdigest(t.to_bytes(2, "little"), seed=0x51) >> 32 for t in range(MAX_TAG + 1)],
    dtype=np.uint64,
)

I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]


def pack48(fps: U64) -> bytes:
    """The top 48 bits of each fingerprint, 6 little-endian bytes each (all placement reads)."""
    return fps.astype("<u8").view(np.uint8).reshape(-1, 8)[:, 2:].tobytes()


def unpack48(data: bytes) -> U64:
    """``pack48`` undone: fingerprints with their low 16 bits zero."""
    if len(data) % 6:
        raise ValueError(f"packed fingerprints must be a multiple of 6 bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 6)
    full = np.zeros((raw.shape[0], 8), dtype=np.uint8)
    full[:, 2:] = raw
    out: U64 = full.view("<u8").reshape(-1).astype(np.uint64)
    return out


class HolderTable:
    """``M`` buckets of ``SLOTS`` entries ``tag << shift | hid`` (see the module docstring)."""

    __slots__ = ("m", "t", "shift", "hmask", "size", "overflow", "n_overflow", "max_kicks",
                 "rng", "_altm", "_altl", "_mu")  # fmt: skip

    def __init__(self, buckets: int, rng: random.Random, *, max_kicks: int = 500,
                 wide: bool = False) -> None:  # fmt: skip
        if buckets < 1:
            raise ValueError(f"table needs at least one bucket, got {buckets}")
        self.m = buckets
        self.t: npt.NDArray[Any] = np.zeros(
            (buckets, SLOTS), dtype=np.uint32 if wide else np.uint16
        )
        self.shift = WIDE_SHIFT if wide else NARROW_SHIFT
        self.hmask = (1 << self.shift) - 1
        self.size = 0  # entries in the table proper
        self.overflow: dict[tuple[int, int], list[int]] = {}  # (min bucket, tag) -> hids
        self.n_overflow = 0
        self.max_kicks = max_kicks
        self.rng = rng
        self._mu = np.uint64(buckets)
        self._altm: I64 = ((_ALT * self._mu) >> _S32).astype(np.int64)
        self._altl: list[int] = self._altm.tolist()

    # ------------------------------------------------------------------ geometry

    @property
    def capacity(self) -> int:
        return self.m * SLOTS

    @property
    def load(self) -> float:
        return (self.size + self.n_overflow) / self.capacity

    @property
    def nbytes(self) -> int:
        return int(self.t.nbytes)

    @property
    def overflow_entries(self) -> int:
        return self.n_overflow

    def geometry(self, fps: U64) -> tuple[I64, I64, I64]:
        """Per fingerprint: first bucket, second bucket and tag (vectorised)."""
        b1 = ((fps >> _S32) * self._mu >> _S32).astype(np.int64)
        top = (fps >> _TAG_IN) & _TAG_MASK  # 0..511 -> 1..511: a tag is never 0 (empty)
        tag = (((top * _U_MAX_TAG) >> _U_TAG_BITS) + _ONE).astype(np.int64)
        b2 = self._altm[tag] - b1
        b2 %= self.m
        return b1, b2, tag

    def _geometry1(self, fp: int) -> tuple[int, int, int]:
        b1 = ((fp >> 32) * self.m) >> 32
        tag = (((fp >> (32 - TAG_BITS) & MAX_TAG) * MAX_TAG) >> TAG_BITS) + 1
        return b1, (self._altl[tag] - b1) % self.m, tag

    def widen(self) -> None:
        """16-bit entries -> 32-bit entries (room for 2**23 - 1 holders)."""
        if self.shift == WIDE_SHIFT:
            return
        t = self.t.astype(np.uint32)
        lo = np.uint32((1 << NARROW_SHIFT) - 1)
        self.t = ((t >> np.uint32(NARROW_SHIFT)) << np.uint32(WIDE_SHIFT)) | (t & lo)
        self.shift = WIDE_SHIFT
        self.hmask = MAX_HID

    # ------------------------------------------------------------------ changes

    def insert(self, fps: U64, hid: int) -> None:
        """Add the entries of ``hid`` for ``fps`` (fingerprints it did not hold before)."""
        if not 1 <= hid <= self.hmask:
            raise ValueError(f"holder id {hid} does not fit the table")
        if fps.size <= _SMALL:  # a delta's few keys: plain Python beats numpy's call overhead
            for fp in fps.tolist():
                x, y, g = self._geometry1(fp)
                self._place((g << self.shift) | hid, x, y)
            return
        tags, bs = self.insert_free(fps, hid)
        for g, a in zip(tags, bs, strict=True):
            self._kick((g << self.shift) | hid, a)

    def insert_free(self, fps: U64, hid: int) -> tuple[list[int], list[int]]:
        """The vectorised part of ``insert``: place ``fps`` into free slots of their buckets;
        returns the tags and first buckets of those that found none, for ``walk`` (until then
        they are not in the table). Lets a caller bound the work of one call."""
        if not 1 <= hid <= self.hmask:
            raise ValueError(f"holder id {hid} does not fit the table")
        t = self.t
        b1, b2, tag = self.geometry(fps)
        ent = (tag << self.shift) | hid
        pend: I64 = np.arange(fps.size, dtype=np.int64)
        for bs in (b1, b2):
            if pend.size == 0:
                break
            b = bs[pend]
            order = np.argsort(b, kind="stable")
            bo = b[order]
            first = np.ones(bo.size, dtype=bool)
            first[1:] = bo[1:] != bo[:-1]
            starts = np.flatnonzero(first)
            rank = np.arange(bo.size) - np.repeat(starts, np.diff(np.append(starts, bo.size)))
            free = t[bo] == 0
            ok = rank < free.sum(axis=1)
            if ok.any():
                cs = np.cumsum(free[ok], axis=1, dtype=np.int8)
                slot = np.argmax((cs == (rank[ok] + 1)[:, None]) & free[ok], axis=1)
                t[bo[ok], slot] = ent[pend[order[ok]]]
                self.size += int(ok.sum())
            pend = pend[order[~ok]]
        out: tuple[list[int], list[int]] = (tag[pend].tolist(), b1[pend].tolist())
        return out

    def walk(self, tag: int, hid: int, b1: int) -> int:
        """Place the entry of ``hid`` with ``tag`` and first bucket ``b1`` (left over by
        ``insert_free``) by an eviction walk, or in the overflow; returns the steps it took."""
        return self._kick((tag << self.shift) | hid, b1)

    def _place(self, e: int, b1: int, b2: int) -> None:
        t = self.t
        for b in (b1, b2):
            row = t[b].tolist()
            if 0 in row:
                t[b, row.index(0)] = e
                self.size += 1
                return
        self._kick(e, b1)

    def _kick(self, e: int, b: int) -> int:
        """Place entry ``e`` (of bucket ``b``) by random-walk eviction, or in the overflow.

        Each step first looks whether one of the bucket's entries can move to a free slot of its
        other bucket (one level of breadth-first search), then evicts a random one."""
        t, m, altl, sh = self.t, self.m, self._altl, self.shift
        bits = self.rng.getrandbits
        kicks = self.max_kicks if self.size < _WALK_LOAD * self.capacity else 0  # too full: none
        for step in range(kicks):
            row = t[b].tolist()
            if 0 in row:
                t[b, row.index(0)] = e
                self.size += 1
                return step + 1
            for j, x in enumerate(row):
                a = (altl[x >> sh] - b) % m
                arow = t[a].tolist()
                if 0 in arow:
                    t[a, arow.index(0)] = x
                    t[b, j] = e
                    self.size += 1
                    return step + 1
            j = bits(3)  # SLOTS = 8
            t[b, j] = e
            e = row[j]
            b = (altl[e >> sh] - b) % m
        # the entry in hand (maybe not the one we started with) lives in bucket b or alt(b)
        tag = e >> sh
        b_alt = (altl[tag] - b) % m
        self.overflow.setdefault((min(b, b_alt), tag), []).append(e & self.hmask)
        self.n_overflow += 1  # the table kept its size: ours came in, the one in hand went out
        return kicks + 1

    def remove(self, fp: int, hid: int) -> bool:
        """Clear one entry of ``hid`` for ``fp``; False if there was none."""
        b1, b2, tag = self._geometry1(fp)
        e = (tag << self.shift) | hid
        t = self.t
        for b in (b1, b2):
            row = t[b]
            for s in range(SLOTS):
                if row[s] == e:
                    row[s] = 0
                    self.size -= 1
                    return True
        key = (min(b1, b2), tag)
        hids = self.overflow.get(key)
        if hids is not None and hid in hids:
            hids.remove(hid)
            if not hids:
                del self.overflow[key]
            self.n_overflow -= 1
            return True
        return False

    def remove_holder(self, hid: int) -> int:
        """Clear every entry of ``hid``; returns how many there were."""
        t = self.t
        mask = (t & t.dtype.type(self.hmask)) == hid
        n = int(np.count_nonzero(mask))
        if n:
            t[mask] = 0
            self.size -= n
        if self.overflow:
            for key in list(self.overflow):
                hids = self.overflow[key]
                k = hids.count(hid)
                if k:
                    kept = [h for h in hids if h != hid]
                    self.n_overflow -= k
                    n += k
                    if kept:
                        self.overflow[key] = kept
                    else:
                        del self.overflow[key]
        return n

    # ------------------------------------------------------------------ lookup

    def records(self, fps: U64) -> U32:
        """Per fingerprint, ``(b1, b2, tag << shift)`` as uint32: what ``hit_records`` reads.

        Valid for this table while its size and entry width stay the same (the directory keeps
        them per key, so a repeated prefix is neither hashed nor placed again)."""
        b1, b2, tag = self.geometry(fps)
        out: U32 = np.empty((fps.size, 3), dtype=np.uint32)
        out[:, 0] = b1
        out[:, 1] = b2
        out[:, 2] = tag << self.shift
        return out

    def hit_records(self, rec: U32) -> npt.NDArray[np.bool_]:
        """Per record (see ``records``): does any holder (maybe) hold the key."""
        t = self.t
        rows = t[rec[:, :2]]  # (n, 2, SLOTS): one gather for both buckets
        rows &= t.dtype.type(self._tagmask)
        hit: npt.NDArray[np.bool_] = (rows == rec[:, 2, None, None]).any(axis=(1, 2))
        if self.overflow:
            ov, sh = self.overflow, self.shift
            for i, (x, y, g) in enumerate(rec.tolist()):
                if (min(x, y), g >> sh) in ov:
                    hit[i] = True
        return hit

    def hit_any(self, fps: U64) -> npt.NDArray[np.bool_]:
        """Per fingerprint: does any holder (maybe) hold it."""
        return self.hit_records(self.records(fps))

    @property
    def _tagmask(self) -> int:
        return (0xFFFF if self.shift == NARROW_SHIFT else 0xFFFFFFFF) & ~self.hmask

    def hit_holders(self, fps: U64) -> list[list[int]]:
        """Per fingerprint: the ids of the holders that (maybe) hold it, each once."""
        return self.holders_records(self.records(fps))

    def holders_records(self, rec: U32) -> list[list[int]]:
        """Per record (see ``records``): the ids of the holders that (maybe) hold the key."""
        t = self.t
        rows = t[rec[:, :2]].reshape(rec.shape[0], 2 * SLOTS)
        match = (rows & t.dtype.type(self._tagmask)) == rec[:, 2, None]
        out: list[list[int]] = [[] for _ in range(rec.shape[0])]
        ri, ci = np.nonzero(match)
        if ri.size:
            hids = (rows[ri, ci] & t.dtype.type(self.hmask)).tolist()
            for r, h in zip(ri.tolist(), hids, strict=True):
                lst = out[r]
                if h not in lst:
                    lst.append(h)
        if self.overflow:
            ov, sh = self.overflow, self.shift
            for i, (x, y, g) in enumerate(rec.tolist()):
                extra = ov.get((min(x, y), g >> sh))
                if extra:
                    lst = out[i]
                    for h in extra:
                        if h not in lst:
                            lst.append(h)
        return out
