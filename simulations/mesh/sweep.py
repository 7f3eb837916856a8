"""Capacity planning: sweep flash capacity x flash node count, name the smallest that suffices.

Each point is a full simulation (with the mesh, no baseline). A point *qualifies* when its hit
ratio reaches ``target_share`` of the trace's ideal hit ratio (one unbounded shared cache) and its
TTFT p99 is within ``slo_p99_s``. The chosen configuration is the qualifying one with the least
total flash (TB), ties broken by fewer nodes, then lower cost per million tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .engine import simulate
from .ideal import prefix_hit_ratio
from .spec import SimSpec
from .summary import cost_per_mtok, ttft_percentiles
from .trace import Request

__all__ = ["sweep"]


def sweep(
    spec: SimSpec,
    requests: Sequence[Request],
    *,
    nvme_tb: Sequence[float],
    flash_nodes: Sequence[int],
    target_share: float = 0.95,
    slo_p99_s: float = 5.0,
    progress: bool = False,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    if not nvme_tb or not flash_nodes:
        raise ValueError("a sweep needs at least one --sweep-nvme-tb and one --sweep-flash-nodes value")
    if not 0 < target_share <= 1:
        raise ValueError(f"target share must be in (0, 1], got {target_share}")
    if any(n < 1 for n in flash_nodes):
        raise ValueError("sweep flash node counts must be >= 1")
    if any(t <= 0 for t in nvme_tb):
        raise ValueError("sweep NVMe capacities must be > 0 TB")
    ideal = prefix_hit_ratio(requests, None, spec.cluster.eviction)
    points: list[dict[str, Any]] = []
    for n in flash_nodes:
        for tb in nvme_tb:
            c = msgspec.structs.replace(spec.cluster, flash_nodes=n, nvme_tb_per_flash_node=tb)
            s = msgspec.structs.replace(spec, cluster=c).validate()
            r = simulate(
                s, requests, failures=(), progress=progress, progress_desc=f"sweep {n}x{tb}TB"
            )
            t = ttft_percentiles(r)
            share = r.hit_ratio / ideal if ideal else 0.0
            p = {
                "flash_nodes": n,
                "nvme_tb_per_flash_node": tb,
                "total_flash_tb": n * tb,
                "hit_ratio": r.hit_ratio,
                "share_of_ideal": share,
                "ttft_p50_s": t["p50"],
                "ttft_p99_s": t["p99"],
                "peak_nvme_utilisation": max(x.peak_utilisation() for x in r.flash_nvme),
                "cost_per_mtok_usd": cost_per_mtok(s, r, busy=False),
                "cost_per_mtok_busy_usd": cost_per_mtok(s, r, busy=True),
                "qualifies": share >= target_share and t["p99"] <= slo_p99_s,
            }
            points.append(p)
            if on_point is not None:
                on_point(p)
    ok = [p for p in points if p["qualifies"]]
    chosen = min(
        ok,
        key=lambda p: (p["total_flash_tb"], p["flash_nodes"], p["cost_per_mtok_usd"]),
        default=None,
    )
    return {
        "ideal_hit_ratio": ideal,
        "target_share": target_share,
        "slo_p99_s": slo_p99_s,
        "points": points,
        "chosen": chosen,
    }
