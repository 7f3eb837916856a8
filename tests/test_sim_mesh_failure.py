"""Mesh simulator failure scenarios: detection delay, lost writes, re-replication back to R."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from simulations.mesh import ClusterSpec, FailureEvent, FailureSpec, Request, SimSpec, read_mooncake
from simulations.mesh.engine import Engine, fixed_delay_failures

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    return read_mooncake(TRACE, max_requests=4000)


def _spec(r: int = 2, flash: int = 8, **failure: object) -> SimSpec:
    return SimSpec(
        cluster=ClusterSpec(
            gpu_nodes=8, flash_nodes=flash, replicas=r, routing="round-robin",
            nvme_tb_per_flash_node=100.0, write_backlog_s=1e9,  # no put is shed: exact placement
        ),
        failure=FailureSpec(**failure),  # type: ignore[arg-type]
    ).validate()  # fmt: skip


def test_every_block_returns_to_r_replicas_after_a_death(trace: list[Request]) -> None:
    spec = _spec(r=2)
    eng = Engine(spec, failures=[FailureEvent(3, 600.0, 610.0)])
    r = eng.run(trace)
    assert not eng.alive[3] and not eng.in_view[3]
    assert len(eng.nvme[3].d) == 0
    assert r.rerep_blocks > 0 and r.rerep_bytes == r.rerep_blocks * spec.block_bytes
    assert r.lost_blocks == 0  # R = 2 and one death: nothing is lost
    for b, holders in eng.directory.items():
        assert 3 not in holders
        # Placement recomputed without node 3: every block sits exactly on its new owners.
        assert sorted(holders) == sorted(eng.owners(b)), b
    assert r.rerep_done_s and r.rerep_done_s[-1] >= 610.0


def test_rereplication_is_rate_limited(trace: list[Request]) -> None:
    fast = Engine(_spec(rereplication_gbps=50.0), failures=[FailureEvent(1, 600.0, 610.0)])
    slow = Engine(_spec(rereplication_gbps=1.0), failures=[FailureEvent(1, 600.0, 610.0)])
    rf, rs = fast.run(trace), slow.run(trace)
    assert rf.rerep_bytes > 0 and rs.rerep_bytes > 0
    # While a slow repair runs, fresh writes of a block to its new owner make some copies moot.
    assert rs.rerep_bytes <= rf.rerep_bytes
    took_fast = rf.rerep_done_s[-1] - 610.0
    took_slow = rs.rerep_done_s[-1] - 610.0
    # 1 GB/s in 1 s ticks: the copy takes at least bytes / rate, rounded down to whole ticks.
    assert took_slow >= int(rs.rerep_bytes / 1e9 / 1.0) - 1
    assert took_slow > 10 * took_fast
    per_window = max(w.rerep_bytes for w in rs.timeline)
    assert per_window <= 1e9 * rs.window_s


def test_r1_death_loses_what_only_it_held(trace: list[Request]) -> None:
    spec = _spec(r=1)
    eng = Engine(spec, failures=[FailureEvent(2, 600.0, 615.0)])
    seen: dict[str, int] = {}
    orig = eng._detect

    def spy(now: float, f: int) -> None:
        seen["held"] = len(eng.nvme[f].d) + len(eng._pending_lost.get(f, ()))
        orig(now, f)

    eng._detect = spy  # type: ignore[method-assign]
    r = eng.run(trace)
    assert r.lost_blocks > 0
    assert r.rerep_blocks == 0  # no surviving copy to copy from
    assert r.lost_blocks <= seen["held"]


def test_detection_window_costs_failed_fetches_and_lost_writes(trace: list[Request]) -> None:
    spec = _spec(r=2)
    short = Engine(spec, failures=[FailureEvent(0, 600.0, 600.5)]).run(trace)
    long = Engine(spec, failures=[FailureEvent(0, 600.0, 700.0)]).run(trace)
    assert long.failed_fetches > short.failed_fetches
    assert long.lost_write_bytes > short.lost_write_bytes
    assert long.lost_write_bytes % spec.block_bytes == 0


def test_failure_lowers_hits_against_the_same_run_without_it(trace: list[Request]) -> None:
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=8, flash_nodes=6, replicas=1, routing="round-robin",
                            nvme_tb_per_flash_node=100.0)
    )  # fmt: skip
    ok = Engine(spec).run(trace)
    assert ok.lost_blocks == 0
    bad = Engine(spec, failures=[FailureEvent(0, 300.0, 310.0), FailureEvent(4, 300.0, 310.0)]).run(trace)
    assert bad.hits < ok.hits
    assert bad.lost_blocks > 0


def test_fixed_delay_failures_from_spec() -> None:
    spec = _spec(kill=["flash-3@100", "5@200.5"], detect_delay_s=7.0)
    assert fixed_delay_failures(spec) == [FailureEvent(3, 100.0, 107.0), FailureEvent(5, 200.5, 207.5)]


def test_bad_failures_are_named() -> None:
    from simulations.mesh import SpecError

    with pytest.raises(SpecError, match="no flash node 9"):
        _spec(kill=["flash-9@10"])
    with pytest.raises(SpecError, match="must look like"):
        _spec(kill=["flash-1"])
    with pytest.raises(ValueError, match="detection before death"):
        Engine(_spec(), failures=[FailureEvent(1, 10.0, 5.0)])


def test_puts_are_shed_when_nvme_falls_behind(trace: list[Request]) -> None:
    # 2 flash nodes writing at 1 GB/s cannot absorb a 70B model's KV at this trace's rate.
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=8, flash_nodes=2, nvme_write_gbps=1.0, write_backlog_s=0.5)
    )
    eng = Engine(spec)
    r = eng.run(trace[:1500])
    assert r.dropped_write_bytes > 0 and r.dropped_write_bytes % spec.block_bytes == 0
    # Shed puts never break the capacity bound.
    assert all(n <= spec.nvme_capacity_blocks for n in r.flash_blocks)
    roomy = Engine(msgspec.structs.replace(spec, cluster=msgspec.structs.replace(
        spec.cluster, nvme_write_gbps=100.0))).run(trace[:1500])  # fmt: skip
    assert roomy.dropped_write_bytes < r.dropped_write_bytes
    assert roomy.mesh_hits > r.mesh_hits


def test_a_never_detected_death_keeps_the_dead_node_in_view(trace: list[Request]) -> None:
    import json

    from simulations.mesh.summary import summarize

    spec = _spec(r=2)
    eng = Engine(spec, failures=[FailureEvent(1, 300.0, float("inf"))])
    r = eng.run(trace[:2000])
    assert eng.in_view[1] and not eng.alive[1]
    assert r.rerep_blocks == 0 and r.lost_write_bytes > 0 and r.failed_fetches > 0
    s = summarize(spec, r, None)
    assert s["failure"]["kills"][0]["t_detect_s"] is None
    json.dumps(s, allow_nan=False)  # valid JSON: no Infinity
