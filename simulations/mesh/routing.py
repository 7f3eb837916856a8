"""Routing policies: which GPU node serves a request.

- ``round-robin``: node i mod N, blind to load and cache.
- ``least-loaded``: the node whose prefill queue drains first.
- ``prefix-aware``: the node with the lowest *estimated* TTFT, counting both its queue and the
  prefill it would skip thanks to the prefix already in its DRAM (Mooncake's Conductor idea:
  cache affinity, but never at any queueing cost). Mesh hits are not counted: every node reaches
  the mesh equally.

Ties go to the first node in a scan that starts one node further on for every request, so an
idle cluster spreads requests instead of piling them on node 0.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING

from .trace import Request

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["make_router", "ROUTERS"]

Router = Callable[[Request, float], int]
ROUTERS = ("round-robin", "least-loaded", "prefix-aware")


def make_router(name: str, eng: Engine) -> Router:
    n = eng.G
    if name == "round-robin":
        counter = [0]

        def round_robin(req: Request, now: float) -> int:
            g = counter[0] % n
            counter[0] += 1
            return g

        return round_robin
    rot = [0]

    def scan() -> chain[int]:
        s = rot[0]
        rot[0] = s + 1 if s + 1 < n else 0
        return chain(range(s, n), range(s))

    if name == "least-loaded":
        free = eng.gpu_free

        def least_loaded(req: Request, now: float) -> int:
            best = -1
            bf = 0.0
            for g in scan():
                f = free[g]
                if f < now:
                    f = now  # every idle node is equally free
                if best < 0 or f < bf:
                    best, bf = g, f
            return best

        return least_loaded
    if name == "prefix-aware":
        free = eng.gpu_free
        dram = [c.d for c in eng.dram]
        tps = eng.node_tps
        bt = eng.bt

        def prefix_aware(req: Request, now: float) -> int:
            blocks = req.blocks
            tokens = req.input_tokens
            best = 0
            best_est = float("inf")
            first = blocks[0] if blocks else None
            for g in scan():
                q = free[g] - now
                if q < 0.0:
                    q = 0.0
                if q >= best_est:
                    continue  # its queue alone is already worse
                d = dram[g]
                hit = 0
                if first is not None and first in d:
                    for b in blocks:
                        if b not in d:
                            break
                        hit += 1
                miss = tokens - hit * bt
                est = q + (miss if miss > 0 else 0) / tps
                if est < best_est:
                    best, best_est = g, est
            return best

        return prefix_aware
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(ROUTERS)}")
