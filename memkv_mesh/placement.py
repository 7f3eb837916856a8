"""Weighted rendezvous placement: which flash peers own a block.

Theory of operation
-------------------
Every node that may hold replicas (a *candidate*: node id + weight) is scored against every block
key with ``score = -weight / ln(u)``, where ``u`` is a deterministic keyed hash of (node, key)
mapped into the open interval (0, 1). The *owners* of a key are the ``r`` candidates with the
highest scores, best first. The rules this keeps:

- **No coordinator.** Every node computes the same owners from the same member list and key; the
  hashes are xxh3-64 and a fixed integer mixer (never Python's ``hash()``, which differs per
  process under PYTHONHASHSEED).
- **Weight proportionality.** ``-w/ln(u)`` for uniform ``u`` is an exponential race, so the
  chance that a candidate ranks first is exactly ``w_i / sum(w)``: a node with twice the flash
  gets twice the primary replicas.
- **Minimal movement.** A key's scores do not depend on the other members, so when a node joins
  only the keys it now ranks into the top ``r`` change owners, and when a node leaves only the keys
  it owned change (each gains the next-best candidate). Nothing else moves.
- **Ties** (equal scores, which need equal hashes) break by node id so the order is total.

The keyed hash of (node, key) is ``fmix64(xxh3_64(key) ^ seed(node))``: the key is hashed once
(``xxh3_64``), each candidate has a cached 64-bit seed (``xxh3_64(b"memkv-placement/" +
node_id)``), and ``fmix64`` is MurmurHash3's 64-bit finalizer (a bijection with full avalanche),
so different seeds give independent-looking hashes. That shape is what lets
:meth:`Rendezvous.owner_matrix` place a whole batch of keys at once in numpy (a repair pass over
a million held blocks: one key hash each, then a K x N array of integer mixes and a sort per
row), while :meth:`Rendezvous.owners` places one key in plain Python with the same integers.
When every weight is equal the score is a monotone function of the hash, so ranking is done on
the raw 64-bit hashes (exact, identical in both paths); with unequal weights both paths take the
logarithm in float64 (``math.log`` one key at a time, ``numpy.log`` for a batch), which can
differ in the last bit, so two scores within one ulp of each other (a chance of about 2**-52
per comparison) might rank differently in the two paths. A block placed by such a near-tie is
still found through the directory.

Use :class:`Rendezvous` when placing many keys against the same membership (the daemon's data
plane and the simulator do); :func:`owners` is the one-shot convenience form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from heapq import nlargest

import msgspec
import numpy as np
import xxhash

__all__ = ["PLACEMENT_VERSION", "Candidate", "Rendezvous", "key_hashes", "node_seed", "owners"]

# Bumped whenever owners() would answer differently for the same members and key. 1: seeded
# xxh3_64(key, seed) per candidate; 2: fmix64(xxh3_64(key) ^ seed). Gossiped in NodeMeta.placement.
PLACEMENT_VERSION = 2

_SEED_DOMAIN = b"memkv-placement/"
_TWO_64 = float(2**64)
_IDX_BITS = 24  # members per ring: up to 16 M
_IDX_MASK = (1 << _IDX_BITS) - 1
_hash = xxhash.xxh3_64_intdigest
_M64 = (1 << 64) - 1
_C1, _C2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53  # MurmurHash3 fmix64


def _fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * _C1) & _M64
    h ^= h >> 33
    h = (h * _C2) & _M64
    return h ^ (h >> 33)


def _fmix_array(h: np.ndarray) -> np.ndarray:
    """``_fmix`` on a uint64 array (numpy's uint64 multiply wraps modulo 2**64, as ``& _M64``)."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(_C1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_C2)
    return h ^ (h >> np.uint64(33))


def key_hashes(keys: Sequence[bytes]) -> np.ndarray:
    """``xxh3_64`` of each key, as a uint64 array: the key half of the placement hash."""
    return np.fromiter((_hash(k) for k in keys), dtype=np.uint64, count=len(keys))


class Candidate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node that may own replicas.

    ``weight`` is relative placement share, conventionally the node's usable flash capacity in
    TB (so a 30 TB peer gets twice the blocks of a 15 TB one). It must be positive and finite.
    """

    node_id: str
    weight: float = 1.0


def node_seed(node_id: str) -> int:
    """The cached per-node half of the keyed hash: a 64-bit xxh3 seed derived from the node id."""
    return _hash(_SEED_DOMAIN + node_id.encode("utf-8"))


def _unit(h: int) -> float:
    """Map a 64-bit hash to u in the open interval (0, 1); never 0 or 1, so ln(u) < 0."""
    return (h + 0.5) / _TWO_64


class Rendezvous:
    """Owners of keys for one fixed membership. Build once per membership change; immutable.

    >>> ring = Rendezvous([Candidate("a"), Candidate("b"), Candidate("c")])
    >>> len(ring.owners(b"some block key", 2))
    2
    """

    __slots__ = ("_ids", "_seeds", "_weights", "_uniform", "_pairs", "_members")

    def __init__(self, members: Iterable[Candidate]) -> None:
        ms = list(members)
        if len(ms) > _IDX_MASK:
            raise ValueError(f"placement supports at most {_IDX_MASK} members, got {len(ms)}")
        seen: set[str] = set()
        for m in ms:
            if not isinstance(m, Candidate):
                raise TypeError(f"placement member must be a Candidate, got {type(m).__name__}")
            if not m.node_id:
                raise ValueError("placement member has an empty node_id")
            if m.node_id in seen:
                raise ValueError(f"placement member {m.node_id!r} is listed twice")
            if not (m.weight > 0.0 and math.isfinite(m.weight)):
                raise ValueError(
                    f"placement member {m.node_id!r} has weight {m.weight!r}; "
                    "weights must be positive and finite"
                )
            seen.add(m.node_id)
        # Sorted by node id: the tie-break order, and independent of the caller's list order.
        ms.sort(key=lambda m: m.node_id)
        self._members: tuple[Candidate, ...] = tuple(ms)
        self._ids: tuple[str, ...] = tuple(m.node_id for m in ms)
        self._seeds: tuple[int, ...] = tuple(node_seed(m.node_id) for m in ms)
        self._weights: tuple[float, ...] = tuple(float(m.weight) for m in ms)
        self._uniform = len(set(self._weights)) <= 1
        self._pairs: tuple[tuple[int, float], ...] = tuple(zip(self._seeds, self._weights, strict=True))

    @property
    def members(self) -> tuple[Candidate, ...]:
        """The candidates, sorted by node id."""
        return self._members

    def __len__(self) -> int:
        return len(self._ids)

    def members_ids(self) -> tuple[str, ...]:
        """The candidates' node ids, sorted (the order of every index this class returns)."""
        return self._ids

    def scores(self, key: bytes) -> list[float]:
        """The rendezvous score of every member for ``key``, in :attr:`members` order."""
        kh = _hash(key)
        return [-w / math.log(_unit(_fmix(kh ^ s))) for s, w in self._pairs]

    def owner_matrix(self, keys: Sequence[bytes] | np.ndarray, r: int) -> np.ndarray:
        """Owners of many keys at once: a (len(keys), min(r, members)) int array of indexes into
        :attr:`members`, best first per row; the same answers as :meth:`owner_indexes`.

        ``keys`` may also be the uint64 array of :func:`key_hashes` (hash once, place against
        several memberships). Rows are placed in chunks so memory stays ~ chunk x members.
        """
        if r < 1:
            raise ValueError(f"replica count r must be >= 1, got {r}")
        kh = keys if isinstance(keys, np.ndarray) else key_hashes(keys)
        n = len(self._seeds)
        r = min(r, n)
        out = np.empty((len(kh), r), dtype=np.int32)
        if n == 0 or len(kh) == 0:
            return out
        seeds = np.array(self._seeds, dtype=np.uint64)
        weights = np.array(self._weights, dtype=np.float64)
        step = max(1, (1 << 20) // n)
        for lo in range(0, len(kh), step):
            h = _fmix_array(kh[lo : lo + step, None] ^ seeds[None, :])
            if self._uniform:
                # Larger hash first; a stable sort keeps the smaller index (node id) first on ties.
                order = np.argsort(~h, axis=1, kind="stable")
            else:
                u = (h.astype(np.float64) + 0.5) / _TWO_64
                order = np.argsort(weights / np.log(u), axis=1, kind="stable")  # = -score ascending
            out[lo : lo + step] = order[:, :r]
        return out

    def owners_many(self, keys: Sequence[bytes], r: int) -> list[list[str]]:
        """:meth:`owners` of each key, computed as one batch (one key at a time for a handful of
        keys, where numpy's per-call overhead costs more than it saves)."""
        ids = self._ids
        if len(keys) * len(ids) < 256:
            return [self.owners(k, r) for k in keys]
        return [[ids[i] for i in row] for row in self.owner_matrix(keys, r).tolist()]

    def owner_indexes(self, key: bytes, r: int) -> list[int]:
        """Indexes into :attr:`members` of the ``r`` owners of ``key``, best first.

        Returns every member (ranked) when fewer than ``r`` exist.
        """
        if r < 1:
            raise ValueError(f"replica count r must be >= 1, got {r}")
        n = len(self._seeds)
        if n == 0:
            return []
        if self._uniform:
            # Equal weights: -w/ln(u) is increasing in u, u increasing in the hash. Rank on hashes,
            # packed with the index into one int so the sort runs in C: larger hash first, then
            # (ties) smaller index, i.e. smaller node id.
            kh = _hash(key)
            packed = [(_fmix(kh ^ s) << _IDX_BITS) | (_IDX_MASK - i) for i, s in enumerate(self._seeds)]
            top = sorted(packed, reverse=True)[:r] if n <= 256 else nlargest(r, packed)
            return [_IDX_MASK - (p & _IDX_MASK) for p in top]
        sc = self.scores(key)
        ranked = sorted(zip(sc, range(0, -n, -1), strict=True), reverse=True)[:r]
        return [-i for _, i in ranked]

    def owners(self, key: bytes, r: int) -> list[str]:
        """Node ids of the ``r`` owners of ``key``, best first (all members if fewer than ``r``)."""
        ids = self._ids
        return [ids[i] for i in self.owner_indexes(key, r)]


def owners(key: bytes, members: Sequence[Candidate], r: int) -> list[str]:
    """The ``r`` owners of ``key`` among ``members``, best first.

    One-shot form; build a :class:`Rendezvous` to place many keys against one membership.
    """
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"block key must be bytes, got {type(key).__name__}")
    return Rendezvous(members).owners(bytes(key), r)
