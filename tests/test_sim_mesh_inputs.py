"""Mesh simulator inputs: Mooncake trace reader, synthetic generators, cluster/model specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.mesh import (
    AGENTIC,
    CHAT,
    MODEL_PRESETS,
    Request,
    SimSpec,
    SpecError,
    TraceError,
    generate,
    load_spec,
    prefix_hit_ratio,
    read_mooncake,
    write_mooncake,
)

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"


def test_reads_the_conversation_trace() -> None:
    reqs = read_mooncake(TRACE)
    assert len(reqs) == 12031
    assert reqs[0] == Request(0.0, 6758, 500, tuple(range(14)))
    assert reqs[-1].arrival_s == pytest.approx(3536.999)
    # hash_ids cover the prompt in 512-token blocks, the last one partial.
    assert all(len(r.blocks) == -(-r.input_tokens // 512) for r in reqs[:500])


def test_round_trip(tmp_path: Path) -> None:
    reqs = read_mooncake(TRACE, max_requests=50)
    p = tmp_path / "t.jsonl"
    assert write_mooncake(reqs, p) == 50
    assert read_mooncake(p) == reqs


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", r"t.jsonl:2: not a JSON object"),
        ('{"timestamp": 5, "input_length": 1, "output_length": 1}', r":2: .*hash_ids"),
        ('{"timestamp": 5, "input_length": "x", "output_length": 1, "hash_ids": []}', r":2: .*input_length"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}', r":2: timestamp 0.* earlier"),
        ('{"timestamp": 9, "input_length": -1, "output_length": 1, "hash_ids": [1]}', r":2: input_length"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(TraceError, match=match):
        read_mooncake(p)


def test_missing_and_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        read_mooncake(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_mooncake(tmp_path / "e.jsonl")


@pytest.mark.parametrize("shape", [CHAT, AGENTIC])
def test_synthetic_sessions_extend_their_prefix(shape: object) -> None:
    reqs = generate(shape, sessions_per_s=0.5, duration_s=200.0, seed=3)  # type: ignore[arg-type]
    assert reqs == generate(shape, sessions_per_s=0.5, duration_s=200.0, seed=3)  # type: ignore[arg-type]
    assert reqs != generate(shape, sessions_per_s=0.5, duration_s=200.0, seed=4)  # type: ignore[arg-type]
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    for r in reqs:
        assert len(r.blocks) == -(-r.input_tokens // 512)
    # Reuse exists: shared system prompts and growing conversations.
    assert prefix_hit_ratio(reqs) > 0.3
    # A later turn of a session starts with all full blocks of an earlier turn, and its
    # earlier partial tail block id never reappears (its content changed).
    extended = 0
    for i, r in enumerate(reqs):
        n_full = r.input_tokens // 512
        full = r.blocks[:n_full]
        for later in reqs[i + 1 :]:
            if n_full and later.blocks[:n_full] == full and later.input_tokens > r.input_tokens:
                extended += 1
                if len(r.blocks) > n_full:
                    assert r.blocks[-1] not in later.blocks
                break
    assert extended > len(reqs) // 3


def test_agentic_has_longer_shared_prompts_than_chat() -> None:
    chat = generate(CHAT, sessions_per_s=1.0, duration_s=120.0, seed=1)
    agent = generate(AGENTIC, sessions_per_s=0.2, duration_s=120.0, seed=1)
    mean = lambda rs: sum(r.input_tokens for r in rs) / len(rs)  # noqa: E731
    assert mean(agent) > 2 * mean(chat)
    assert prefix_hit_ratio(agent) > prefix_hit_ratio(chat)


def test_synthetic_bad_args() -> None:
    with pytest.raises(ValueError, match="sessions_per_s"):
        generate(CHAT, sessions_per_s=0.0, duration_s=10.0)


def test_model_presets() -> None:
    assert MODEL_PRESETS["llama-3-8b"].kv_bytes_per_token == 128 * 1024
    assert MODEL_PRESETS["llama-3-70b"].kv_bytes_per_token == 320 * 1024
    assert MODEL_PRESETS["qwen3-32b"].kv_bytes_per_token == 256 * 1024


def test_example_cluster_files_load() -> None:
    s = load_spec(REPO / "simulations" / "examples" / "cluster.toml")
    assert s.cluster.gpu_nodes == 16 and s.cluster.flash_nodes == 4
    assert s.model == MODEL_PRESETS["llama-3-70b"]
    assert s.block_bytes == 512 * 320 * 1024
    f = load_spec(REPO / "simulations" / "examples" / "failure.toml")
    assert f.failure.kill == ["flash-3@1200", "flash-7@1200"]


def test_preset_with_override(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[model]\npreset = "qwen3-32b"\nprefill_tokens_per_s_per_gpu = 1234.0\n')
    s = load_spec(p)
    assert s.model.name == "qwen3-32b" and s.model.prefill_tokens_per_s_per_gpu == 1234.0
    assert s.model.kv_bytes_per_token == 256 * 1024


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[cluster]\ngpu_node = 3\n", r"c.toml: .*unknown field `gpu_node`"),
        ("[cluster]\nrouting = 'random'\n", r"c.toml: .*cluster.routing"),
        ("[cluster]\nnic_gbps = 0\n", r"c.toml: cluster.nic_gbps must be > 0"),
        ("[cluster]\ngpu_nodes = 0\n", r"cluster.gpu_nodes must be >= 1"),
        ("[model]\npreset = 'gpt-9'\n", r"unknown model preset 'gpt-9'"),
        ("[clusterr]\n", r"unknown field `clusterr`"),
        ("[cluster\n", r"not valid TOML"),
        ("[failure]\nkill = ['flash-99@5']\n", r"no flash node 99"),
    ],
)
def test_bad_specs_are_named(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(SpecError, match=match):
        load_spec(p)


def test_capacity_from_gb() -> None:
    s = SimSpec()
    assert s.dram_capacity_blocks == int(512e9 // (512 * 320 * 1024))
    assert s.nvme_capacity_blocks == int(8e12 // (512 * 320 * 1024))
