"""Mesh simulator: the exactness cases, and the engine's timing, routing and mesh behaviour."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest

from simulations.mesh import (
    ClusterSpec,
    ModelSpec,
    Request,
    SimSpec,
    prefix_hit_ratio,
    read_mooncake,
    simulate,
)
from simulations.mesh.engine import Engine
from simulations.mesh_cli import main

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"

# The exactness table: LRU prefix-hit ratio of the conversation trace by capacity.
EXACT = [(2000, 0.0537), (6000, 0.1386), (20000, 0.2875), (None, 0.3664)]


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    return read_mooncake(TRACE)


def _one_node(cap: int | None, policy: str = "lru") -> SimSpec:
    return SimSpec(
        cluster=ClusterSpec(
            gpu_nodes=1,
            flash_nodes=0,
            dram_blocks=cap,
            dram_unbounded=cap is None,
            eviction=policy,  # type: ignore[arg-type]
            ideal_network=True,
        )
    )


@pytest.mark.parametrize(("cap", "expect"), EXACT)
def test_exactness_via_cli(cap: int | None, expect: float, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--trace", str(TRACE), "--gpu-nodes", "1", "--flash-nodes", "0",
        "--dram-blocks", "unbounded" if cap is None else str(cap),
        "--policy", "lru", "--ideal-network", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert round(s["hit_ratio"], 4) == expect
    assert s["requests"] == 12031
    assert err == ""  # --json: no progress bar


@pytest.mark.parametrize(("cap", "expect"), EXACT)
def test_exactness_via_engine_and_reference(
    trace: list[Request], cap: int | None, expect: float
) -> None:
    r = simulate(_one_node(cap), trace)
    assert round(r.hit_ratio, 4) == expect
    ref = prefix_hit_ratio(trace, cap, "lru")
    assert r.hits == round(ref * r.refs)
    assert r.refs == 288_500


def _random_trace(seed: int, n: int = 400) -> list[Request]:
    """Requests sharing prefixes from a small tree of block ids, some arriving together."""
    rng = random.Random(seed)
    prefixes: list[tuple[int, ...]] = [()]
    nxt = 0
    out = []
    t = 0.0
    for _ in range(n):
        base = rng.choice(prefixes)
        extra = []
        for _ in range(rng.randint(1, 6)):
            extra.append(nxt)
            nxt += 1
        blocks = base + tuple(extra)
        if rng.random() < 0.5:
            prefixes.append(blocks)
        t += rng.choice([0.0, 0.01, 0.5, 3.0])
        out.append(Request(t, len(blocks) * 512 - rng.randint(0, 511), rng.randint(1, 300), blocks))
    return out


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("seed", range(4))
def test_engine_matches_reference_on_random_traces(policy: str, seed: int) -> None:
    reqs = _random_trace(seed)
    for cap in (0, 1, 7, 30, 200, None):
        r = simulate(_one_node(cap, policy), reqs)
        assert r.hit_ratio == pytest.approx(prefix_hit_ratio(reqs, cap, policy), abs=1e-12), cap


def test_fifo_and_lru_differ_where_they_should() -> None:
    # A hot block refreshed by every request survives LRU; FIFO evicts it every other request
    # (it is the oldest entry once a new block arrives), so only requests 1, 3, 5, 7, 9 hit.
    reqs = [Request(float(i), 1024, 1, (0, 100 + i)) for i in range(10)]
    assert prefix_hit_ratio(reqs, 2, "lru") == pytest.approx(9 / 20)
    assert prefix_hit_ratio(reqs, 2, "fifo") == pytest.approx(5 / 20)


def test_ttft_of_a_cold_request_is_prefill_plus_one_decode_step() -> None:
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=1, gpus_per_node=2, flash_nodes=0),
        model=ModelSpec("m", 1024, 1000.0, 50.0),
    )
    r = simulate(spec, [Request(0.0, 4000, 10, (1, 2, 3, 4, 5, 6, 7, 8))])
    assert r.ttft_s[0] == pytest.approx(4000 / 2000 + 1 / 50)


def test_prefill_queue_is_fifo_per_node() -> None:
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=1, gpus_per_node=1, flash_nodes=0),
        model=ModelSpec("m", 1024, 1000.0, 100.0),
    )
    reqs = [Request(0.0, 1000, 1, (1, 2)), Request(0.5, 2000, 1, (3, 4, 5, 6))]
    r = simulate(spec, reqs)
    assert r.ttft_s[0] == pytest.approx(1.0 + 0.01)
    # Waits 0.5 s for the first, then 2 s of its own prefill.
    assert r.ttft_s[1] == pytest.approx(0.5 + 2.0 + 0.01)
    assert r.gpu_busy_s == [pytest.approx(3.0)]


def _mesh_spec(**cluster: object) -> SimSpec:
    base = dict(
        gpu_nodes=2, gpus_per_node=1, flash_nodes=1, dram_blocks=0, nvme_tb_per_flash_node=1.0,
        nvme_read_gbps=1.0, nvme_write_gbps=1.0, nic_gbps=100.0, pcie_gbps=1000.0, replicas=1,
        routing="round-robin",
    )  # fmt: skip
    base.update(cluster)
    # 1e6-byte blocks: 1000 tokens x 1000 bytes.
    return SimSpec(
        cluster=msgspec.convert(base, ClusterSpec),
        model=ModelSpec("m", 1000, 1000.0, 1e9),
    ).validate()


def test_mesh_fetch_time_and_contention_on_one_nvme() -> None:
    spec = _mesh_spec(block_tokens=1000)
    assert spec.block_bytes == 1_000_000
    blocks = tuple(range(10))
    # t=0: node 0 computes 10 blocks (10 s of prefill) and writes them to the flash node.
    # t=100: two requests for the same prefix, one per GPU node, fetch 10 MB each from one NVMe
    # at 1 GB/s: 10 ms, then 10 ms more for the second (it queues behind the first).
    reqs = [
        Request(0.0, 10_000, 1, blocks),
        Request(100.0, 10_000, 1, blocks),
        Request(100.0, 10_000, 1, blocks),
    ]
    r = simulate(spec, reqs)
    assert r.mesh_hits == 20 and r.local_hits == 0
    assert r.ttft_s[0] == pytest.approx(10.0, abs=1e-6)
    assert r.ttft_s[1] == pytest.approx(0.010, rel=1e-3)
    assert r.ttft_s[2] == pytest.approx(0.020, rel=1e-3)
    assert r.flash_read_bytes == [20_000_000]
    assert r.flash_write_bytes == [10_000_000]
    # Ideal network: transfers are free, so both are immediate.
    r2 = simulate(_mesh_spec(block_tokens=1000, ideal_network=True), reqs)
    assert r2.ttft_s[1] == pytest.approx(0.0, abs=1e-6)
    assert r2.ttft_s[2] == pytest.approx(0.0, abs=1e-6)


def test_request_waits_for_blocks_still_being_computed() -> None:
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=1, gpus_per_node=1, flash_nodes=0, dram_blocks=100),
        model=ModelSpec("m", 1024, 1000.0, 1e9),
    )
    # The second request hits all 4 blocks of the first, ready only when its 2,048-token prefill
    # ends at t = 2.048 s; it has nothing left to compute itself.
    reqs = [Request(0.0, 2048, 1, (1, 2, 3, 4)), Request(0.1, 2048, 1, (1, 2, 3, 4))]
    r = simulate(spec, reqs)
    assert r.local_hits == 4
    assert r.ttft_s[1] == pytest.approx(2.048 - 0.1, abs=1e-3)


def test_mesh_reaches_the_ideal_ratio_when_big_and_unhurried(trace: list[Request]) -> None:
    # Requests spread far apart (no prefill overlaps), no DRAM, unbounded-ish flash, and no write
    # ever shed for backlog (a long prompt's burst of puts can put one owner's NVMe more than the
    # default 1 s behind): every block ever written is in the mesh, so the hit ratio is the
    # unbounded prefix ratio exactly.
    reqs = [msgspec.structs.replace(r, arrival_s=i * 1000.0) for i, r in enumerate(trace[:1500])]
    spec = SimSpec(
        cluster=ClusterSpec(
            gpu_nodes=4, flash_nodes=5, dram_blocks=0, nvme_tb_per_flash_node=1e4, write_backlog_s=1e6
        )
    )
    r = simulate(spec, reqs)
    assert r.local_hits == 0 and r.dropped_write_bytes == 0
    assert r.hit_ratio == pytest.approx(prefix_hit_ratio(reqs, None), abs=1e-12)


def test_replicas_land_on_rendezvous_owners(trace: list[Request]) -> None:
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=4, flash_nodes=6, replicas=2, nvme_tb_per_flash_node=100.0,
                            write_backlog_s=1e9)
    )  # fmt: skip
    eng = Engine(spec)
    eng.run(trace[:300])
    assert eng.directory
    for b, holders in eng.directory.items():
        assert sorted(holders) == sorted(eng.owners(b))
    per_node = [len(c.d) for c in eng.nvme]
    # Equal weights: each of the 6 holds about 2/6 of the blocks.
    mean = sum(per_node) / len(per_node)
    assert max(per_node) < 1.2 * mean and min(per_node) > 0.8 * mean


def test_nvme_eviction_bounds_each_flash_node(trace: list[Request]) -> None:
    spec = SimSpec(cluster=ClusterSpec(gpu_nodes=2, flash_nodes=3, nvme_tb_per_flash_node=0.1))
    eng = Engine(spec)
    r = eng.run(trace[:2000])
    cap = spec.nvme_capacity_blocks
    assert cap == 596
    assert all(n <= cap for n in r.flash_blocks)
    assert max(r.flash_blocks) == cap
    # The directory agrees with the caches.
    held = sum(len(h) for h in eng.directory.values())
    assert held == sum(r.flash_blocks)


@pytest.mark.parametrize("routing", ["round-robin", "least-loaded", "prefix-aware"])
def test_routing_policies(routing: str, trace: list[Request]) -> None:
    spec = SimSpec(cluster=ClusterSpec(gpu_nodes=8, flash_nodes=0, routing=routing))  # type: ignore[arg-type]
    r = simulate(spec, trace[:2000])
    assert sum(r.gpu_requests) == 2000
    if routing == "round-robin":
        assert r.gpu_requests == [250] * 8
    else:
        assert min(r.gpu_requests) > 0  # ties rotate: no node is starved


def test_prefix_aware_routing_keeps_sessions_together() -> None:
    # Two conversations, alternating; each extends its own prefix. Prefix-aware routing sends a
    # conversation back to the node holding its prefix; round-robin with 3 nodes scatters them.
    reqs = []
    for turn in range(12):
        for conv in range(2):
            blocks = tuple(conv * 1000 + i for i in range(turn + 2))
            reqs.append(Request(turn * 10.0 + conv, len(blocks) * 512, 10, blocks))
    aware = simulate(SimSpec(cluster=ClusterSpec(gpu_nodes=3, flash_nodes=0)), reqs)
    rr = simulate(
        SimSpec(cluster=ClusterSpec(gpu_nodes=3, flash_nodes=0, routing="round-robin")), reqs
    )
    assert aware.hit_ratio == pytest.approx(prefix_hit_ratio(reqs, None))
    assert aware.hit_ratio > rr.hit_ratio


def test_mesh_beats_no_mesh_on_round_robin(trace: list[Request]) -> None:
    spec = SimSpec(cluster=ClusterSpec(gpu_nodes=16, flash_nodes=4, routing="round-robin"))
    reqs = trace[:3000]
    with_mesh = simulate(spec, reqs)
    without = simulate(spec, reqs, mesh=False)
    assert with_mesh.hit_ratio > without.hit_ratio + 0.1
    assert with_mesh.hit_tokens > without.hit_tokens
    assert sum(with_mesh.gpu_busy_s) < sum(without.gpu_busy_s)
    assert without.flash_read_bytes == [] and not without.mesh


def test_deterministic(trace: list[Request]) -> None:
    spec = SimSpec(cluster=ClusterSpec(gpu_nodes=8, flash_nodes=4))
    a = simulate(spec, trace[:1500])
    b = simulate(spec, trace[:1500])
    assert a.hits == b.hits and list(a.ttft_s) == list(b.ttft_s)
    assert a.flash_read_bytes == b.flash_read_bytes


def test_scheduler_recomputes_when_the_mesh_is_slower() -> None:
    blocks = tuple(range(10))
    reqs = [Request(0.0, 10_000, 1, blocks), Request(100.0, 10_000, 1, blocks)]
    # 10 MB at 0.0001 GB/s is 100 s of NVMe; recomputing the 10,000 tokens takes 10 s.
    slow = _mesh_spec(block_tokens=1000, nvme_read_gbps=0.0001, nvme_write_gbps=100.0)
    r = simulate(slow, reqs)
    assert r.mesh_hits == 0 and r.skipped_fetches == 1
    assert r.ttft_s[1] == pytest.approx(10.0, rel=1e-6)
    forced = msgspec.structs.replace(
        slow, cluster=msgspec.structs.replace(slow.cluster, fetch_if_faster=False)
    )
    r2 = simulate(forced, reqs)
    assert r2.mesh_hits == 10 and r2.skipped_fetches == 0
    assert r2.ttft_s[1] == pytest.approx(100.0, rel=1e-3)


def test_statistics_snapshot_and_single_run(trace: list[Request]) -> None:
    eng = Engine(SimSpec(cluster=ClusterSpec(gpu_nodes=4, flash_nodes=2)))
    before = eng.statistics()
    assert before.admitted == 0 and before.refs == 0
    r = eng.run(trace[:200])
    after = eng.statistics()
    assert after.admitted == 200 and after.refs == r.refs
    assert after.local_hits + after.mesh_hits == r.hits
    assert after.mesh_blocks == len(eng.directory) > 0
    assert before.admitted == 0  # frozen snapshot
    with pytest.raises(RuntimeError, match="runs once"):
        eng.run(trace[:10])


def test_on_reuse_put_policy_writes_only_reused_blocks(trace: list[Request]) -> None:
    base = ClusterSpec(gpu_nodes=8, flash_nodes=4, write_backlog_s=1e9)
    reqs = trace[:2000]
    all_ = simulate(SimSpec(cluster=base), reqs)
    reuse = simulate(SimSpec(cluster=msgspec.structs.replace(base, put_policy="on-reuse")), reqs)
    assert 0 < sum(reuse.flash_write_bytes) < 0.5 * sum(all_.flash_write_bytes)
    # Every block on flash under on-reuse was a local DRAM hit first: referenced at least twice.
    eng = Engine(SimSpec(cluster=msgspec.structs.replace(base, put_policy="on-reuse")))
    eng.run(reqs)
    refs: dict[int, int] = {}
    for r in reqs:
        for b in r.blocks:
            refs[b] = refs.get(b, 0) + 1
    assert eng.directory and all(refs[b] >= 2 for b in eng.directory)
    assert any(n == 1 for n in refs.values())  # one-off blocks existed and were not written
