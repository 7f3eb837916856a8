"""The JSON summary of a run (with the mesh) against its baseline (same cluster, no flash peers).

Keys are stable and documented in docs/simulator.md. Times in seconds, bytes in bytes, shares in
0..1, money in USD.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .engine import RunResult
from .spec import SimSpec

__all__ = ["summarize", "ttft_percentiles", "cost_per_mtok"]

_HOURS_PER_MONTH = 730.0


def ttft_percentiles(r: RunResult) -> dict[str, float]:
    p50, p90, p99 = np.percentile(r.ttft_s, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(r.ttft_s.mean())}


def cost_per_mtok(spec: SimSpec, r: RunResult, *, busy: bool) -> float:
    """USD per million tokens (input + output) served.

    ``busy=False``: the whole cluster is paid for the run's duration (provisioned cost).
    ``busy=True``: GPUs are paid only for their prefill-busy hours (what the load needs, the
    figure that shows how much GPU the cache saves), flash for the whole run.
    """
    c, cost = spec.cluster, spec.cost
    hours = r.duration_s / 3600.0
    if busy:
        gpu_hours = sum(r.gpu_busy_s) / 3600.0 * c.gpus_per_node
    else:
        gpu_hours = c.gpu_nodes * c.gpus_per_node * hours
    usd = gpu_hours * cost.usd_per_gpu_hour
    if r.mesh:
        per_node = cost.usd_per_flash_node_hour + (
            c.nvme_tb_per_flash_node * cost.usd_per_tb_month / _HOURS_PER_MONTH
        )
        usd += c.flash_nodes * per_node * hours
    tokens = r.input_tokens + r.output_tokens
    return usd / tokens * 1e6 if tokens else 0.0


def _peak(rs: list[Any]) -> float:
    return max((x.peak_utilisation() for x in rs), default=0.0)


def summarize(
    spec: SimSpec,
    run: RunResult,
    baseline: RunResult | None,
    *,
    ideal_hit_ratio: float | None = None,
    reference: RunResult | None = None,
    trace: str = "",
    wall_s: float | None = None,
) -> dict[str, Any]:
    c = spec.cluster
    dur = run.duration_s
    t = ttft_percentiles(run)
    out: dict[str, Any] = {
        "trace": trace,
        "requests": run.n_requests,
        "duration_s": dur,
        "model": spec.model.name,
        "block_bytes": spec.block_bytes,
        "gpu_nodes": c.gpu_nodes,
        "gpus_per_node": c.gpus_per_node,
        "flash_nodes": c.flash_nodes,
        "replicas": c.replicas,
        "routing": c.routing,
        "eviction": c.eviction,
        "put_policy": c.put_policy,
        "dram_blocks_per_node": spec.dram_capacity_blocks,
        "nvme_blocks_per_flash_node": spec.nvme_capacity_blocks if c.flash_nodes else 0,
        "hit_ratio": run.hit_ratio,
        "local_hit_ratio": run.local_hits / run.refs if run.refs else 0.0,
        "mesh_hit_ratio": run.mesh_hits / run.refs if run.refs else 0.0,
        "block_refs": run.refs,
        "ttft_p50_s": t["p50"],
        "ttft_p90_s": t["p90"],
        "ttft_p99_s": t["p99"],
        "ttft_mean_s": t["mean"],
        "gpu_busy_share": sum(run.gpu_busy_s) / (c.gpu_nodes * dur),
        "prefill_tokens": run.input_tokens - run.hit_tokens,
        "prefill_tokens_saved": run.hit_tokens,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "peak_link_utilisation": _peak(
            [*run.gpu_nic_in, *run.gpu_nic_out, *run.flash_nic_in, *run.flash_nic_out]
        ),
        "peak_nvme_utilisation": _peak(run.flash_nvme),
        "peak_pcie_utilisation": _peak(run.gpu_pcie),
        "bytes_per_node": {
            "gpu": [
                {"node": f"gpu-{i}", "read": run.gpu_nic_in[i].bytes, "written": run.gpu_nic_out[i].bytes,
                 "requests": run.gpu_requests[i], "busy_share": run.gpu_busy_s[i] / dur}
                for i in range(c.gpu_nodes)
            ],
            "flash": [
                {"node": f"flash-{i}", "read": run.flash_read_bytes[i],
                 "written": run.flash_write_bytes[i], "blocks_held": run.flash_blocks[i]}
                for i in range(len(run.flash_read_bytes))
            ],
        },
        "mesh_bytes_read": sum(run.flash_read_bytes),
        "mesh_bytes_written": sum(run.flash_write_bytes),
        "mesh_puts_dropped_bytes": run.dropped_write_bytes,
        "mesh_fetches_skipped": run.skipped_fetches,
        "cost_per_mtok_usd": cost_per_mtok(spec, run, busy=False),
        "cost_per_mtok_busy_usd": cost_per_mtok(spec, run, busy=True),
    }
    out["write_path"] = run.write_path
    if run.write_path == "async":
        out.update({
            "replication_lag_s": c.replication_lag_s,
            "directory_delay_s": c.directory_delay_s,
            "dirty_blocks_bound": c.dirty_blocks,
            "blocks_put": run.blocks_put,
            "blocks_held_nowhere": run.blocks_held_nowhere,
            "backpressure_waits": run.backpressure_waits,
            "backpressure_wait_s": run.backpressure_wait_s,
            "dirty_peak_blocks": run.dirty_peak_blocks,
            "dram_pinned_overflow": run.dram_pinned_overflow,
        })  # fmt: skip
    if ideal_hit_ratio is not None:
        out["ideal_hit_ratio"] = ideal_hit_ratio
        out["share_of_ideal"] = run.hit_ratio / ideal_hit_ratio if ideal_hit_ratio else 0.0
    if baseline is not None:
        b = ttft_percentiles(baseline)
        out["without_mesh"] = {
            "hit_ratio": baseline.hit_ratio,
            "ttft_p50_s": b["p50"],
            "ttft_p90_s": b["p90"],
            "ttft_p99_s": b["p99"],
            "ttft_mean_s": b["mean"],
            "gpu_busy_share": sum(baseline.gpu_busy_s) / (c.gpu_nodes * baseline.duration_s),
            "prefill_tokens": baseline.input_tokens - baseline.hit_tokens,
            "cost_per_mtok_usd": cost_per_mtok(spec, baseline, busy=False),
            "cost_per_mtok_busy_usd": cost_per_mtok(spec, baseline, busy=True),
        }
    if run.failures:
        t_det = max(f.t_detect for f in run.failures)
        out["failure"] = {
            "kills": [
                {
                    "node": f"flash-{f.flash}",
                    "t_kill_s": f.t_kill,
                    "t_detect_s": f.t_detect if math.isfinite(f.t_detect) else None,
                    "t_restart_s": f.t_restart if math.isfinite(f.t_restart) else None,
                }
                for f in run.failures
            ],
            "failed_fetches": run.failed_fetches,
            "lost_write_bytes": run.lost_write_bytes,
            "lost_blocks": run.lost_blocks,
            "rereplication_bytes": run.rerep_bytes,
            "rereplication_blocks": run.rerep_blocks,
            "rereplication_done_s": run.rerep_done_s,
            "hit_ratio_before": _window_hit_ratio(run, None, run.failures[0].t_kill),
            "hit_ratio_detect_window": _window_hit_ratio(run, run.failures[0].t_kill, t_det),
            "hit_ratio_after": _window_hit_ratio(run, t_det, None) if math.isfinite(t_det) else None,
        }
        if reference is not None:
            # The same run without the kills: the difference is what the failure cost.
            t0 = run.failures[0].t_kill
            fo = out["failure"]
            fo["hit_ratio_no_failure"] = reference.hit_ratio
            fo["hits_lost"] = reference.hits - run.hits
            for span in (60.0, 300.0):
                fo[f"hit_ratio_{span:.0f}s_after_kill"] = _window_hit_ratio(run, t0, t0 + span)
                fo[f"hit_ratio_{span:.0f}s_after_kill_no_failure"] = _window_hit_ratio(
                    reference, t0, t0 + span
                )
    if wall_s is not None:
        out["wall_s"] = wall_s
    return out


def _window_hit_ratio(r: RunResult, t0: float | None, t1: float | None) -> float | None:
    refs = hits = 0
    for i, w in enumerate(r.timeline):
        ts = i * r.window_s
        if t0 is not None and ts < t0 - 1e-9:
            continue
        if t1 is not None and ts >= t1:
            continue
        refs += w.refs
        hits += w.hits
    return hits / refs if refs else None
