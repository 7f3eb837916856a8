"""The simulator's prediction for a replay through real daemons (``memkv-mesh bench replay``).

A replay drives real daemons with an engine-like client that computes nothing: per request it
looks the prefix up, gets the hits and puts the rest, as fast as it can. The prediction runs the
same request sequence through the engine with a cluster that matches the replay (its GPU and flash
nodes, DRAM and NVMe in blocks, R, round-robin routing, the eviction policy, an ideal network and
a prefill that takes no time) at the times the replay actually issued each request and put its
blocks, so a real lag (the directory's, replication's) maps onto the same simulated seconds.

``write_path="async"`` (the default) models the daemon's write path: dirty blocks pinned in DRAM
until their owners hold them, replication lag, the directory's delay and back-pressure (see
``engine``). ``"instant"`` is the older model in which every put is on its owners at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from .engine import FailureEvent, simulate
from .spec import ClusterSpec, ModelSpec, SimSpec
from .trace import Request

__all__ = ["ReplayPrediction", "replay_spec", "predict_replay"]

# Mooncake traces and the synthetic generator use 512-token blocks; the token count only matters
# for prefill time, which the replay's client does not spend.
_BLOCK_TOKENS = 512
# A prefill rate that makes computing anything take no simulated time (the client computes nothing).
_INSTANT_TOKENS_PER_S = 1e15


class ReplayPrediction(msgspec.Struct, frozen=True):
    """What the simulator predicts for one replay."""

    write_path: str
    hit_ratio: float
    local_hit_ratio: float
    mesh_hit_ratio: float
    block_refs: int
    hits: int
    blocks_put: int  # distinct blocks put (async write path; 0 with "instant")
    blocks_held_nowhere: int  # of those, on no live node at the end (async; 0 with "instant")
    backpressure_waits: int
    backpressure_wait_s: float
    dirty_peak_blocks: list[int]
    lost_blocks: int  # blocks whose every copy died with a killed node
    spec: dict[str, Any]


def replay_spec(
    *,
    gpu_nodes: int,
    flash_nodes: int,
    dram_blocks: int,
    nvme_blocks: int,
    replicas: int,
    block_bytes: int,
    eviction: Literal["lru", "fifo"] = "lru",
    write_path: Literal["instant", "async"] = "async",
    replication_lag_s: float = 0.0,
    directory_delay_s: float = 0.14,
    dirty_blocks: int | None = None,
) -> SimSpec:
    """The ``SimSpec`` of a replay's cluster: capacities in blocks, everything else instant."""
    if block_bytes <= 0 or nvme_blocks < 0 or dram_blocks < 0:
        raise ValueError("block_bytes must be > 0, dram_blocks and nvme_blocks >= 0")
    kv_per_token = max(1, math.ceil(block_bytes / _BLOCK_TOKENS))
    sim_block = kv_per_token * _BLOCK_TOKENS
    # NVMe is given in TB; half a block of slack so the floor in SimSpec gives exactly nvme_blocks.
    nvme_tb = (nvme_blocks * sim_block + sim_block // 2) / 1e12
    return SimSpec(
        cluster=ClusterSpec(
            gpu_nodes=gpu_nodes,
            gpus_per_node=1,
            dram_blocks=dram_blocks,
            flash_nodes=flash_nodes,
            nvme_tb_per_flash_node=nvme_tb,
            replicas=replicas,
            eviction=eviction,
            routing="round-robin",
            block_tokens=_BLOCK_TOKENS,
            ideal_network=True,
            # The client fetches whatever its lookup found: no scheduler weighs recomputing.
            fetch_if_faster=False,
            put_policy="all",
            write_path=write_path,
            replication_lag_s=replication_lag_s,
            directory_delay_s=directory_delay_s,
            dirty_blocks=dirty_blocks,
        ),
        model=ModelSpec(
            name="replay",
            kv_bytes_per_token=kv_per_token,
            prefill_tokens_per_s_per_gpu=_INSTANT_TOKENS_PER_S,
            decode_tokens_per_s=_INSTANT_TOKENS_PER_S,
        ),
    ).validate()


def predict_replay(
    spec: SimSpec,
    requests: Sequence[Request],
    issued_s: Sequence[float],
    *,
    put_s: Sequence[float] | None = None,
    failures: Sequence[FailureEvent] = (),
) -> ReplayPrediction:
    """Simulate ``requests`` issued at ``issued_s`` (seconds from the replay's start, one per
    request, in request order) with their blocks put at ``put_s`` (default: when issued).

    Requests are admitted in the replay's order; an issue time earlier than the previous one (the
    client's threads race for the next request) is raised to it, as the engine needs arrival order.
    """
    if len(issued_s) != len(requests):
        raise ValueError(f"{len(issued_s)} issue times for {len(requests)} requests")
    if put_s is not None and len(put_s) != len(requests):
        raise ValueError(f"{len(put_s)} put times for {len(requests)} requests")
    timed: list[Request] = []
    last = 0.0
    for r, t in zip(requests, issued_s, strict=True):
        last = max(last, float(t))
        timed.append(msgspec.structs.replace(r, arrival_s=last))
    run = simulate(spec, timed, failures=list(failures), put_at=put_s)
    c = spec.cluster
    return ReplayPrediction(
        write_path=run.write_path,
        hit_ratio=run.hit_ratio,
        local_hit_ratio=run.local_hits / run.refs if run.refs else 0.0,
        mesh_hit_ratio=run.mesh_hits / run.refs if run.refs else 0.0,
        block_refs=run.refs,
        hits=run.hits,
        blocks_put=run.blocks_put,
        blocks_held_nowhere=run.blocks_held_nowhere,
        backpressure_waits=run.backpressure_waits,
        backpressure_wait_s=run.backpressure_wait_s,
        dirty_peak_blocks=run.dirty_peak_blocks,
        lost_blocks=run.lost_blocks,
        spec={
            "gpu_nodes": c.gpu_nodes,
            "flash_nodes": c.flash_nodes,
            "dram_blocks": c.dram_blocks,
            "nvme_blocks": spec.nvme_capacity_blocks,
            "replicas": c.replicas,
            "eviction": c.eviction,
            "routing": c.routing,
            "ideal_network": c.ideal_network,
            "write_path": c.write_path,
            "replication_lag_s": c.replication_lag_s,
            "directory_delay_s": c.directory_delay_s,
            "dirty_blocks": c.dirty_blocks,
            "failures": [
                {"node": f"flash-{f.flash}", "t_kill_s": f.t_kill,
                 "t_detect_s": f.t_detect if math.isfinite(f.t_detect) else None,
                 "t_restart_s": f.t_restart if math.isfinite(f.t_restart) else None}
                for f in failures
            ],  # fmt: skip
        },
    )
