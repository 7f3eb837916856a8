"""``memkv-mesh bench replay``: keys and block patterns, the kill/restart schedule, the daemons'
config, and (slow) a small replay through real daemons against the simulator's prediction."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memkv_mesh import bench_replay as br
from memkv_mesh.config import load_config

NS = bytes(range(16))


def test_block_keys_are_32_bytes_deterministic_and_namespaced() -> None:
    k = br.block_key(NS, 12345)
    assert len(k) == 32
    assert k == br.block_key(NS, 12345)
    assert k != br.block_key(NS, 12346)
    assert k != br.block_key(b"another-namespace", 12345)
    assert len({br.block_key(NS, i) for i in range(-50, 1000)}) == 1050


def test_block_patterns_depend_on_key_and_position() -> None:
    keys = [br.block_key(NS, i) for i in range(8)]
    p = br.block_patterns(keys, 4096)
    assert p.shape == (8, 4096) and p.dtype == np.uint8
    assert np.array_equal(p, br.block_patterns(keys, 4096))
    assert np.array_equal(p[3], br.block_patterns([keys[3]], 4096)[0])
    assert all(not np.array_equal(p[0], p[i]) for i in range(1, 8))
    # Roughly uniform bytes, so a wrong block differs almost everywhere.
    assert 100 < p.mean() < 155


def test_wrong_bytes_counts_every_wrong_byte() -> None:
    keys = [br.block_key(NS, i) for i in range(4)]
    blocks = br.block_patterns(keys, 1024).copy()
    assert br.wrong_bytes(keys, blocks).tolist() == [0, 0, 0, 0]
    blocks[1, 10] ^= 1
    blocks[1, 1000] ^= 0xFF
    blocks[2] = np.roll(blocks[2], 8)  # a block shifted by one word
    blocks[3] = br.block_patterns([keys[0]], 1024)[0]  # another key's block
    wrong = br.wrong_bytes(keys, blocks).tolist()
    assert wrong[0] == 0 and wrong[1] == 2
    assert wrong[2] > 900 and wrong[3] > 900


def test_patterns_of_sizes_that_are_not_whole_words() -> None:
    keys = [br.block_key(NS, 7)]
    assert np.array_equal(br.block_patterns(keys, 13)[0], br.block_patterns(keys, 16)[0][:13])


@pytest.mark.parametrize(
    ("text", "share"), [("flash-1@40%", 0.4), ("flash-0@0.25", 0.25), ("flash-2@100%", 1.0), (" flash-1 @ 0% ", 0.0)]
)
def test_parse_action(text: str, share: float) -> None:
    a = br.parse_action("kill", text, 3)
    assert a.what == "kill" and a.share == share and a.node.startswith("flash-")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("flash-1", "must look like"),
        ("gpu-0@10%", "must look like"),
        ("flash-3@10%", "no flash-3"),
        ("flash-1@140%", "within 0%..100%"),
        ("flash-1@soon", "percentage"),
    ],
)
def test_parse_action_errors_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        br.parse_action("kill", text, 3)


def test_schedule_orders_and_checks_kills_and_restarts() -> None:
    acts = br.schedule(["flash-1@40%", "flash-2@50%"], ["flash-1@70%"], 3)
    assert [(a.what, a.node, a.share) for a in acts] == [
        ("kill", "flash-1", 0.4), ("kill", "flash-2", 0.5), ("restart", "flash-1", 0.7),
    ]  # fmt: skip
    assert [a.at_request(3993) for a in acts] == [1598, 1997, 2796]
    assert br.schedule(["flash-0@10%", "flash-0@60%"], ["flash-0@50%"], 1)[1].what == "restart"
    with pytest.raises(ValueError, match="not killed before"):
        br.schedule([], ["flash-1@70%"], 3)
    with pytest.raises(ValueError, match="not killed before"):
        br.schedule(["flash-1@70%"], ["flash-1@40%"], 3)
    with pytest.raises(ValueError, match="already down"):
        br.schedule(["flash-1@10%", "flash-1@20%"], [], 3)


def _tables(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    args = br.build_parser().parse_args(argv)
    cl = br._Cluster(args, tmp_path, tmp_path, "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U=")
    cl.seed_addr = "127.0.0.1:7946"
    dm = cl.add("flash-0", "flash", 8 << 20, 16 << 20)
    return {"path": dm.config, **tomllib.loads(dm.config.read_text())}


def test_daemon_config_is_valid_and_leaves_write_path_fields_out_unless_asked(tmp_path: Path) -> None:
    t = _tables([], tmp_path)
    cfg = load_config(t["path"])
    assert cfg.node.role == "flash" and cfg.gossip.enabled and cfg.gossip.seeds == ["127.0.0.1:7946"]
    assert cfg.store.eviction == "lru" and cfg.store.nvme_bytes == 16 << 20 and cfg.mesh.replicas == 2
    assert set(t["mesh"]) == {"replicas"} and "fsync" not in t["store"]
    t = _tables(["--ack", "replicated", "--fsync", "batch", "--dirty-bytes", "4MiB", "--put-wait-s", "2"], tmp_path)
    assert t["mesh"] == {"replicas": 2, "ack": "replicated", "dirty_bytes": 4 << 20, "put_wait_s": 2.0}
    assert t["store"]["fsync"] == "batch"


def test_flags_an_older_daemon_does_not_know_are_refused_with_daemon_src(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        br.main(["--daemon-src", "/tmp", "--ack", "replicated"])
    assert e.value.code == 2
    assert "older daemon" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        br.main(["--restart", "flash-0@50%"])
    assert "not killed before" in capsys.readouterr().err


def test_the_command_is_registered() -> None:
    from memkv_mesh.cli import _DELEGATES

    assert _DELEGATES[("bench", "replay")] == "memkv_mesh.bench_replay:main"


# ---- through real daemons -------------------------------------------------------------------------
FIELDS = (
    "requests_per_s", "request_p50_ms", "request_p99_ms", "hit_ratio", "sim_hit_ratio", "sim_instant_hit_ratio",
    "unreadable_blocks", "wrong_blocks", "wrong_bytes", "errors", "errors_total", "busy_waits",
    "dirty_peak_bytes", "backpressure_waits", "nodes", "machine", "config", "sim", "blocks_put", "events",
    "replication_lag_p50_s", "client_replication_lag", "directory_delay_s",
)  # fmt: skip


def _replay(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    argv = [
        "--requests", "300", "--gpu-nodes", "2", "--flash-nodes", "3", "--block-bytes", "16KiB",
        "--dram-share", "0.15", "--json", *extra,
    ]  # fmt: skip
    assert br.main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.slow
def test_replay_through_real_daemons_agrees_with_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    r = _replay(capsys)
    for f in FIELDS:
        assert f in r, f
    assert r["machine"]["cores"] >= 1 and r["config"]["gpu_nodes"] == 2 and r["config"]["flash_nodes"] == 3
    assert {n["node"] for n in r["nodes"]} == {"gpu-0", "gpu-1", "flash-0", "flash-1", "flash-2"}
    assert r["block_refs"] == r["trace"]["block_refs"] and r["blocks_put"] > 0
    assert r["wrong_bytes"] == 0 and r["wrong_blocks"] == 0
    assert r["errors_total"] == 0, r["errors"]
    assert r["unreadable_blocks"] == 0, r["unreadable_per_node"]
    assert r["hit_ratio"] > 0
    assert r["hit_ratio"] == pytest.approx(r["sim_hit_ratio"], abs=0.015)


@pytest.mark.slow
def test_replay_with_a_flash_node_killed_and_restarted(capsys: pytest.CaptureFixture[str]) -> None:
    r = _replay(capsys, "--kill", "flash-1@30%", "--restart", "flash-1@60%")
    kill, restart = r["events"]
    assert (kill["action"], kill["request"], restart["action"], restart["request"]) == ("kill", 90, "restart", 180)
    assert "t_dead_s" in kill and "t_alive_s" in restart, r["events"]
    assert r["sim"]["spec"]["failures"][0]["t_restart_s"] == restart["t_alive_s"]
    assert r["wrong_bytes"] == 0 and r["errors_total"] == 0, r["errors"]
    assert r["unreadable_blocks"] == 0, r["unreadable_per_node"]
    assert r["hit_ratio"] == pytest.approx(r["sim_hit_ratio"], abs=0.02)
