"""Mesh simulator with failure detection timed by the real SWIM cores (gossip/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.mesh import ClusterSpec, FailureSpec, SimSpec, read_mooncake, simulate
from simulations.mesh.gossip_detect import gossip_failures
from simulations.mesh_cli import main

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"


def _spec() -> SimSpec:
    return SimSpec(
        cluster=ClusterSpec(gpu_nodes=6, flash_nodes=4, routing="round-robin", write_backlog_s=1e9),
        failure=FailureSpec(kill=["flash-1@60"]),
    ).validate()


def test_swim_cores_time_the_detection() -> None:
    g = gossip_failures(_spec(), until_s=150.0, seed=3)
    assert len(g.failures) == 1
    f = g.failures[0]
    assert f.flash == 1 and f.t_kill == 60.0
    # SWIM (default profile): a probe round, the suspicion timeout, dissemination: seconds, not
    # milliseconds and not minutes.
    assert 0.5 < f.t_detect - f.t_kill < 30.0
    d = g.info["detections"][0]
    assert d["first_mark_s"] <= d["median_mark_s"] <= d["all_marked_s"]
    assert g.info["nodes"] == 10 and g.info["false_deaths"] == 0
    assert g.info["gossip_bytes_per_node_per_s"] > 0
    # Deterministic for a seed.
    assert gossip_failures(_spec(), until_s=150.0, seed=3).failures == g.failures


def test_engine_runs_on_gossip_detection_times() -> None:
    reqs = read_mooncake(TRACE, max_requests=600)
    spec = _spec()
    g = gossip_failures(spec, until_s=reqs[-1].arrival_s, seed=1)
    r = simulate(spec, reqs, failures=g.failures)
    assert r.failures == g.failures
    assert r.rerep_blocks > 0 and r.lost_blocks == 0
    assert r.rerep_done_s[0] >= g.failures[0].t_detect


def test_cli_gossip_option(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--trace", str(TRACE), "--max-requests", "600", "--gpu-nodes", "6", "--flash-nodes",
            "4", "--kill", "flash-2@60", "--gossip", "--no-baseline", "--json"]  # fmt: skip
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["gossip"]["nodes"] == 10
    kill = s["failure"]["kills"][0]
    det = s["gossip"]["detections"][0]
    assert kill["t_detect_s"] - kill["t_kill_s"] == pytest.approx(det["all_marked_s"])
