"""Blocked Bloom filter over 64-bit key fingerprints: the per-node summary of the block directory.

Theory of operation
-------------------
A block key (32 bytes) is reduced to a 64-bit *fingerprint* ``fp = xxh3_64(key)``. A filter of
``W`` 64-bit words stores a fingerprint by setting ``k`` bits of *one* word:

- word index ``((fp >> 32) * W) >> 32`` (Lemire's fast range: no power-of-two rounding, so no
  memory is wasted whatever the holder's block count);
- bit positions: the top ``6 * k`` bits of ``fp * 0x9E3779B97F4A7C15 (mod 2**64)``, 6 bits each.

One word per key makes a lookup one memory load per (key, node) pair, which is what lets the
directory test a 64-key prefix against every node's filter with a handful of numpy operations
(``gossip/directory.py``). The price is a slightly higher false-positive rate than a classic Bloom
filter at the same size: at 12 bits per key and ``k = 6`` it is ~0.6% (classic: 0.3%), measured
by ``tests/test_directory_filter.py`` and ``simulations/directory_sim.py``.

A filter is sized by its builder (the holder) for ``n`` keys: ``W = ceil(bits_per_key * n / 64)``.
Keys added later are inserted in place (the false-positive rate grows with the load); keys
cannot be removed, which is why the directory keeps a removed set on top and the holder rebuilds.

Public API: ``fingerprint(key)``, ``fingerprints(keys)``, ``masks(fps, k)``, ``n_words(n, bpk)``,
``BloomWords`` (``build``, ``add``, ``contains``, ``to_bytes``, ``from_bytes``), ``MIX``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import xxhash

MIX = 0x9E3779B97F4A7C15
MAX_K = 10  # 6 bits per position, 64 bits of mixed hash
_U64 = (1 << 64) - 1
_xxh = xxhash.xxh3_64_intdigest

U64Array = npt.NDArray[np.uint64]


def fingerprint(key: bytes) -> int:
    """The 64-bit fingerprint of a block key (deterministic across processes)."""
    return _xxh(key)


def fingerprints(keys: Iterable[bytes]) -> list[int]:
    return [_xxh(k) for k in keys]


def n_words(n: int, bits_per_key: float) -> int:
    """Words of a filter sized for ``n`` keys at ``bits_per_key``."""
    if n < 0:
        raise ValueError(f"key count must be >= 0, got {n}")
    return max(1, math.ceil(bits_per_key * n / 64))


_SHIFTS = [np.array([58 - 6 * j for j in range(k)], dtype=np.uint64) for k in range(MAX_K + 1)]
_ONE = np.uint64(1)
_SIX = np.uint64(63)
_MIXU = np.uint64(MIX)


def masks(fps: U64Array, k: int) -> U64Array:
    """The k-bit word mask of each fingerprint (vectorised)."""
    mixed = fps * _MIXU
    bits = _ONE << ((mixed[:, None] >> _SHIFTS[k][None, :]) & _SIX)
    out: U64Array = np.bitwise_or.reduce(bits, axis=1)
    return out


def mask_of(fp: int, k: int) -> int:
    mixed = (fp * MIX) & _U64
    m = 0
    for j in range(k):
        m |= 1 << ((mixed >> (58 - 6 * j)) & 63)
    return m


def index_of(fp: int, w: int) -> int:
    return ((fp >> 32) * w) >> 32


class BloomWords:
    """A blocked Bloom filter: ``words`` (uint64 numpy array) and ``k`` bits per key."""

    __slots__ = ("words", "k")

    def __init__(self, words: U64Array, k: int) -> None:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"filter k must be in [1, {MAX_K}], got {k}")
        if words.ndim != 1 or words.size == 0 or words.dtype != np.uint64:
            raise ValueError("filter words must be a non-empty 1-d uint64 array")
        self.words = words
        self.k = k

    @classmethod
    def build(cls, fps: Iterable[int], n: int, bits_per_key: float, k: int) -> BloomWords:
        """A filter sized for ``n`` keys holding ``fps``."""
        w = n_words(n, bits_per_key)
        words = np.zeros(w, dtype=np.uint64)
        arr = np.fromiter(fps, dtype=np.uint64)
        f = cls(words, k)
        if arr.size:
            idx = ((arr >> np.uint64(32)) * np.uint64(w)) >> np.uint64(32)
            np.bitwise_or.at(words, idx.astype(np.intp), masks(arr, k))
        return f

    def add(self, fp: int) -> None:
        w = self.words
        i = index_of(fp, w.size)
        w[i] = int(w[i]) | mask_of(fp, self.k)

    def contains(self, fp: int) -> bool:
        m = mask_of(fp, self.k)
        return (int(self.words[index_of(fp, self.words.size)]) & m) == m

    def to_bytes(self) -> bytes:
        return self.words.astype("<u8", copy=False).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, k: int) -> BloomWords:
        if not data or len(data) % 8:
            raise ValueError(f"filter bytes must be a non-empty multiple of 8, got {len(data)}")
        return cls(np.frombuffer(data, dtype="<u8").astype(np.uint64), k)

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)
