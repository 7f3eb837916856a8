"""Reference prefix-hit ratios of a trace under one shared cache, without any timing.

The definition the exactness tests hold: requests in file order; a request's hits are the
leading run of its block ids already cached; then each of its blocks is inserted or refreshed in
order (refresh moves it to the MRU end under LRU, and does nothing under FIFO); the cache evicts
from the LRU/FIFO end beyond ``capacity`` blocks; ratio = hits / all block references.
``capacity=None`` is unbounded: the *ideal* hit ratio, the ceiling any cache can reach.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .trace import Request

__all__ = ["prefix_hit_ratio", "hit_ratio_curve"]


def prefix_hit_ratio(
    requests: Iterable[Request], capacity: int | None = None, policy: str = "lru"
) -> float:
    if policy not in ("lru", "fifo"):
        raise ValueError(f"unknown eviction policy {policy!r}; choose lru or fifo")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
    cache: OrderedDict[int, None] = OrderedDict()
    lru = policy == "lru"
    hits = refs = 0
    for r in requests:
        blocks = r.blocks
        refs += len(blocks)
        for b in blocks:
            if b not in cache:
                break
            hits += 1
        if capacity == 0:
            continue
        for b in blocks:
            if b in cache:
                if lru:
                    cache.move_to_end(b)
            else:
                cache[b] = None
                if capacity is not None and len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / refs if refs else 0.0


def hit_ratio_curve(
    requests: Sequence[Request], capacities: Sequence[int], policy: str = "lru"
) -> list[tuple[int, float]]:
    """(capacity, prefix-hit ratio) for each capacity in blocks."""
    return [(c, prefix_hit_ratio(requests, c, policy)) for c in capacities]
