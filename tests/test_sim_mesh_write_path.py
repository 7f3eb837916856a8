"""Mesh simulator: the daemon's write path (``write_path = "async"``), restarts, and the replay
prediction (``simulations.mesh.replay``)."""

from __future__ import annotations

import msgspec
import pytest
from conftest import TRACE

from simulations.mesh import (
    ClusterSpec,
    ModelSpec,
    Request,
    SimSpec,
    prefix_hit_ratio,
    read_mooncake,
    simulate,
)
from simulations.mesh.engine import Engine, FailureEvent, RunResult, fixed_delay_failures
from simulations.mesh.replay import predict_replay, replay_spec
from simulations.mesh.spec import FailureSpec, SpecError
from simulations.mesh_cli import main

# A prefill so fast that computing takes no simulated time (the replay's client computes nothing).
INSTANT = ModelSpec("instant", 1024, 1e15, 1e15)


def _spec(**cluster: object) -> SimSpec:
    base = {
        "gpu_nodes": 2, "gpus_per_node": 1, "flash_nodes": 3, "dram_blocks": 100, "nvme_tb_per_flash_node": 1.0,
        "replicas": 2, "routing": "round-robin", "ideal_network": True, "fetch_if_faster": False,
        "write_path": "async", "replication_lag_s": 0.0, "directory_delay_s": 0.0,
    }  # fmt: skip
    base.update(cluster)
    return SimSpec(cluster=msgspec.convert(base, ClusterSpec), model=INSTANT).validate()


def _req(t: float, blocks: list[int]) -> Request:
    return Request(t, 512 * len(blocks), 1, tuple(blocks))


def _run(spec: SimSpec, reqs: list[Request], failures: list[FailureEvent] | None = None) -> tuple[Engine, RunResult]:
    eng = Engine(spec, failures=failures or [])
    return eng, eng.run(reqs)


def test_async_with_one_node_keeps_the_exact_prefix_lru_ratio() -> None:
    # (Distinct arrival times: the trace has requests in the same millisecond, and in the async
    # model a block computed by one of them is no hit for the other.)
    reqs = [msgspec.structs.replace(r, arrival_s=i * 1e-3) for i, r in enumerate(read_mooncake(TRACE, max_requests=2000))]
    for cap in (500, 3000):
        run = simulate(_spec(gpu_nodes=1, flash_nodes=0, dram_blocks=cap), reqs)
        assert run.hit_ratio == pytest.approx(prefix_hit_ratio(reqs, cap, "lru"), abs=1e-12)
        assert run.blocks_put == len({b for r in reqs for b in r.blocks})


def test_another_node_sees_a_put_only_after_the_directory_delay() -> None:
    # gpu-0 puts blocks 1-3 at t=0; gpu-1 (round robin) asks for them 0.1 s later.
    reqs = [_req(0.0, [1, 2, 3]), _req(0.1, [1, 2, 3])]
    assert simulate(_spec(directory_delay_s=0.2), reqs).hits == 0
    assert simulate(_spec(directory_delay_s=0.05), reqs).mesh_hits == 3


def test_before_replication_lands_the_putting_gpu_node_serves_the_block() -> None:
    reqs = [_req(0.0, [1, 2]), _req(0.5, [1, 2])]
    eng, res = _run(_spec(replication_lag_s=10.0), reqs)
    assert res.mesh_hits == 2
    assert any(c.d for c in eng.nvme)  # the replicas landed by the end of the run
    # At 0.5 s no flash node held them: the hits came from gpu-0's DRAM (no flash read).
    assert sum(eng.flash_read) == 0


def test_dirty_blocks_are_never_evicted() -> None:
    # DRAM of 2 blocks on each node, a lag of 10 s: gpu-0 puts 1, 2 then 3, 4 (at 0.0 and 0.2);
    # with the async write path 1 and 2 are still dirty and stay; "instant" evicts them.
    reqs = [_req(0.0, [1, 2]), _req(0.1, [7]), _req(0.2, [3, 4]), _req(0.3, [8])]
    eng, res = _run(_spec(dram_blocks=2, replication_lag_s=10.0), reqs)
    assert {1, 2, 3, 4} <= set(eng.dram[0].d)
    assert res.dram_pinned_overflow > 0
    inst, _ = _run(_spec(dram_blocks=2, write_path="instant"), reqs)
    assert set(inst.dram[0].d) == {3, 4}


def test_once_replicated_dirty_blocks_become_evictable() -> None:
    reqs = [_req(0.0, [1, 2]), _req(0.1, [7]), _req(1.0, [3, 4]), _req(1.1, [8])]
    eng, res = _run(_spec(dram_blocks=2, replication_lag_s=0.5), reqs)
    assert set(eng.dram[0].d) == {3, 4}
    assert res.dram_pinned_overflow == 0
    assert res.blocks_held_nowhere == 0


def test_backpressure_delays_a_put_past_the_dirty_bound() -> None:
    # Bound 2 dirty blocks, lag 1 s: the first put (3 blocks) goes ahead (the bound is soft by one
    # batch, like the daemon's); the next put on the same node waits until they are clean at 1.0 s.
    reqs = [_req(0.0, [1, 2, 3]), _req(0.05, [9]), _req(0.1, [4, 5])]
    run = simulate(_spec(dirty_blocks=2, replication_lag_s=1.0), reqs)
    assert run.backpressure_waits == 1
    assert run.backpressure_wait_s == pytest.approx(0.9)
    assert run.dirty_peak_blocks[0] == 3
    free = simulate(_spec(replication_lag_s=1.0), reqs)
    assert free.backpressure_waits == 0 and free.dirty_peak_blocks[0] == 5


def test_blocks_still_being_computed_are_hits_only_in_the_instant_model() -> None:
    slow = ModelSpec("slow", 1024, 512.0, 1e15)  # one block takes 1 s to compute
    reqs = [_req(0.0, [1]), _req(0.1, [5]), _req(0.5, [1])]
    for path, hits in (("instant", 1), ("async", 0)):
        spec = msgspec.structs.replace(_spec(write_path=path), model=slow)
        assert simulate(spec, reqs).hits == hits


def test_put_at_stores_blocks_when_the_replay_acknowledged_them() -> None:
    reqs = [_req(0.0, [1, 2]), _req(0.1, [9]), _req(0.2, [1, 2]), _req(0.3, [9])]
    assert simulate(_spec(gpu_nodes=1), reqs).local_hits == 3
    # The first put was acknowledged only at 0.25 s: the request at 0.2 s found nothing.
    late = simulate(_spec(gpu_nodes=1), reqs, put_at=[0.25, 0.15, 0.3, 0.35])
    assert late.local_hits == 1
    with pytest.raises(ValueError, match="put_at"):
        simulate(_spec(), reqs, put_at=[0.0])


def test_a_dead_owner_keeps_blocks_dirty_until_detection_and_nothing_is_lost() -> None:
    reqs = [_req(0.1 * i, [i]) for i in range(1, 60)]
    fails = [FailureEvent(0, 0.5, 2.0)]
    eng, res = _run(_spec(replication_lag_s=0.01, dram_blocks=1000), reqs, fails)
    assert res.lost_blocks == 0 and res.blocks_held_nowhere == 0
    # Every block is back on R live flash nodes.
    for b in range(1, 60):
        assert sum(b in eng.nvme[f].d for f in (1, 2)) == 2


def test_restart_brings_a_flash_node_back_with_its_blocks() -> None:
    reqs = [_req(0.1 * i, [i]) for i in range(1, 40)] + [_req(20.0, [999])]
    held = set(_run(_spec(), reqs[:-1])[0].nvme[0].d)
    assert held
    down, _ = _run(_spec(), reqs, [FailureEvent(0, 5.0, 6.0)])
    assert not down.nvme[0].d
    back, _ = _run(_spec(), reqs, [FailureEvent(0, 5.0, 6.0, t_restart=10.0)])
    assert held <= set(back.nvme[0].d)
    assert back.alive[0] and back.in_view[0]


def test_restart_specs_are_checked_and_paired_with_kills() -> None:
    spec = msgspec.structs.replace(_spec(), failure=FailureSpec(kill=["flash-1@5"], restart=["flash-1@9"]))
    assert fixed_delay_failures(spec.validate()) == [FailureEvent(1, 5.0, 15.0, 9.0)]
    with pytest.raises(SpecError, match="not killed before"):
        msgspec.structs.replace(_spec(), failure=FailureSpec(restart=["flash-1@9"])).validate()
    with pytest.raises(SpecError, match="dirty_blocks"):
        _spec(dirty_blocks=0)


def test_cli_async_flags(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    argv = [
        "--trace", str(TRACE), "--max-requests", "300", "--gpu-nodes", "2", "--flash-nodes", "3",
        "--routing", "round-robin", "--ideal-network", "--write-path", "async", "--replication-lag-s", "0.5",
        "--directory-delay-s", "0.2", "--dirty-blocks", "500", "--kill", "flash-1@30", "--restart", "flash-1@60",
        "--json", "--no-baseline",
    ]  # fmt: skip
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["write_path"] == "async" and s["replication_lag_s"] == 0.5 and s["dirty_blocks_bound"] == 500
    assert s["failure"]["kills"][0]["t_restart_s"] == 60.0
    assert s["blocks_held_nowhere"] == 0


def test_predict_replay_matches_the_instant_model_when_nothing_lags() -> None:
    reqs = read_mooncake(TRACE, max_requests=1500)
    unique = len({b for r in reqs for b in r.blocks})
    issued = [i * 0.005 for i in range(len(reqs))]
    kw = {"gpu_nodes": 2, "flash_nodes": 3, "dram_blocks": unique // 7, "nvme_blocks": unique * 2, "replicas": 2,
          "block_bytes": 16384}  # fmt: skip
    fast = predict_replay(replay_spec(**kw, directory_delay_s=0.0), reqs, issued)  # type: ignore[arg-type]
    inst = predict_replay(replay_spec(**kw, write_path="instant"), reqs, issued)  # type: ignore[arg-type]
    assert fast.hit_ratio == pytest.approx(inst.hit_ratio, abs=0.002)
    assert fast.blocks_held_nowhere == 0 and fast.blocks_put == unique
    assert fast.spec["dram_blocks"] == unique // 7 and fast.spec["nvme_blocks"] == unique * 2
    # A lag far beyond the request spacing, with a dirty bound, costs hits: blocks reach the
    # other node later and pinned dirty blocks push clean ones out of DRAM.
    slow = predict_replay(
        replay_spec(**kw, replication_lag_s=5.0, directory_delay_s=1.0, dirty_blocks=unique // 14),  # type: ignore[arg-type]
        reqs, issued,
    )  # fmt: skip
    assert slow.hit_ratio < fast.hit_ratio - 0.005
    assert slow.backpressure_waits > 0
    with pytest.raises(ValueError, match="issue times"):
        predict_replay(replay_spec(**kw), reqs, issued[:-1])  # type: ignore[arg-type]
