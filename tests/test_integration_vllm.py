"""The native vLLM v1 connector (``memkv_mesh.integrations.vllm``), end to end on vLLM's CPU build.

A memkv daemon runs in a subprocess; a random-weight Llama is saved offline; engine process 1
computes a prompt and saves its full blocks to the mesh; engine process 2 (a new process, so
nothing in vLLM's own prefix cache) gets the same prompt: its ``num_cached_tokens`` covers the
prompt's full blocks (bar the one vLLM must compute) and its output tokens are identical. A third
engine whose daemon is down still answers, identically, by recomputing.

Without vLLM these tests skip, saying so, unless ``MEMKV_REQUIRE_VLLM=1`` (set by ``scripts/test``
for its vLLM stage in ``.venv-vllm``), which makes a missing or broken vLLM a failure.

This file is also the engine process: ``python tests/test_integration_vllm.py MODEL SOCKET OUT
path|name``.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = 128  # the CPU attention backend's block size
PROMPT_LEN = 600  # 4 full blocks usable from the mesh (the 5th is partial)
MAX_TOKENS = 8
ENGINE_TIMEOUT_S = 240


def _require_vllm() -> Any:
    try:
        return importlib.import_module("memkv_mesh.integrations.vllm")
    except ImportError as e:
        if os.environ.get("MEMKV_REQUIRE_VLLM") == "1":
            pytest.fail(f"MEMKV_REQUIRE_VLLM=1 but vLLM is not importable: {e}")
        pytest.skip(f"vLLM is not installed ({e}); scripts/test runs these in .venv-vllm")


def _engine_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def _run_engine(model: Path, sock: Path, tmp: Path, tag: str, load: str = "path", **env: str) -> dict[str, Any]:
    """One engine process; ``load``: "path" (kv_connector_module_path) or "name" (the short name
    the ``vllm.general_plugins`` entry point registers), or "lossy": by path, with the engine in
    this one process, and the worker's daemon client made to lose the 2nd block of every load
    (as if it were evicted between the lookup and the load)."""
    out = tmp / f"{tag}.json"
    log = tmp / f"{tag}.log"
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, __file__, str(model), str(sock), str(out), load],
            stdout=f, stderr=subprocess.STDOUT, env=_engine_env(**env), cwd=REPO, timeout=ENGINE_TIMEOUT_S,
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"engine {tag} exited {proc.returncode}:\n{text[-6000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    result["log"] = text
    return result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_vllm()
    path = tmp_path_factory.mktemp("model") / "llama-tiny"
    # demo_ttft's "tiny" Llama, with weights 10x larger than transformers' default init: at the
    # default its random outputs hardly depend on the context (the same token every step), so
    # identical tokens would not show that the loaded KV is the right one; at 0.2 changing two
    # blocks of the prompt changes every output token.
    code = (
        "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
        "from memkv_mesh.demo_ttft import MODELS; torch.manual_seed(0); "
        "cfg = LlamaConfig(**MODELS['tiny'], max_position_embeddings=4096, tie_word_embeddings=True, "
        "initializer_range=0.2); LlamaForCausalLM(cfg).eval().save_pretrained(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO, timeout=300)
    return path


# ---- no engine ----------------------------------------------------------------------------------
def test_refuses_nondeterministic_block_hashes() -> None:
    vllm_mod = _require_vllm()
    with pytest.raises(ValueError, match="set PYTHONHASHSEED"):
        vllm_mod.check_deterministic_hashing("xxhash", {})
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        vllm_mod.check_deterministic_hashing("xxhash_cbor", {})
    vllm_mod.check_deterministic_hashing("xxhash", {"PYTHONHASHSEED": "0"})
    vllm_mod.check_deterministic_hashing("sha256", {})  # vLLM seeds it with a fixed value


def test_block_keys_are_namespaced() -> None:
    vllm_mod = _require_vllm()
    from memkv_mesh import keys

    a, b = keys.namespace("m", tp_rank=0, tp_size=2), keys.namespace("m", tp_rank=1, tp_size=2)
    h = bytes(range(32))
    assert vllm_mod.block_key(a, h) == vllm_mod.block_key(a, h)
    assert len(vllm_mod.block_key(a, h)) == 32
    assert vllm_mod.block_key(a, h) != vllm_mod.block_key(b, h)
    assert vllm_mod.block_key(a, h) != vllm_mod.block_key(a, h[:-1] + b"\x00")


def test_plugin_registers_the_short_name() -> None:
    vllm_mod = _require_vllm()
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    vllm_mod.register()
    vllm_mod.register()  # idempotent
    assert KVConnectorFactory.get_connector_class_by_name("MemkvConnector") is vllm_mod.MemkvConnector


def _worker(vllm_mod: Any, sock: Path, kv: dict[str, Any], ns: bytes) -> Any:
    """The connector's worker half over fake KV tensors, without an engine (vLLM's constructor
    needs a whole VllmConfig)."""
    conn = vllm_mod.MemkvConnector.bare(sock, ns, BLOCK, name="test")
    conn.register_kv_caches(kv)
    return conn


def _request(req_id: str, hashes: list[bytes], tokens: int, params: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(request_id=req_id, block_hashes=hashes, num_prompt_tokens=tokens,
                           kv_transfer_params=params)  # fmt: skip


def _step(new: list[tuple[str, list[int], int, int]]) -> Any:
    """A stand-in SchedulerOutput: new requests as (id, block ids, computed tokens, scheduled)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c, _ in new],
        num_scheduled_tokens={r: n for r, _, _, n in new},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[]),
    )  # fmt: skip


def test_scheduler_finds_the_mesh_prefix_and_honours_skip_flags(daemon_process: Any, short_dir: Path) -> None:
    vllm_mod = _require_vllm()
    from memkv_mesh import keys

    node = daemon_process("vs", store={"dram_bytes": 16 << 20})
    ns = keys.namespace("fake-sched")
    hashes = [bytes([i + 1]) * 32 for i in range(5)]
    with node.client() as c:  # the first 3 blocks are in the mesh
        c.put_many([vllm_mod.block_key(ns, h) for h in hashes[:3]], [b"x" * 64] * 3)
    conn = vllm_mod.MemkvConnector.bare(node.sock, ns, BLOCK)

    # 5 full blocks, 3 in the mesh: 3 blocks' tokens, counted from what vLLM has locally.
    assert conn.get_num_new_matched_tokens(_request("a", hashes, 5 * BLOCK + 7), 0) == (3 * BLOCK, False)
    assert conn.get_num_new_matched_tokens(_request("b", hashes, 5 * BLOCK + 7), BLOCK) == (2 * BLOCK, False)
    # A hit to the prompt's very end is one token short (vLLM computes at least one prompt token),
    # and all 3 blocks are loaded, the last with the token vLLM recomputes.
    whole = _request("c", hashes[:3], 3 * BLOCK)
    assert conn.get_num_new_matched_tokens(whole, 0) == (3 * BLOCK - 1, False)
    assert conn.stats["lookups"] == 3 and conn.stats["hit_blocks"] == 3 + 2 + 3
    conn.update_state_after_alloc(whole, SimpleNamespace(get_block_ids=lambda: ([7, 8, 9],)), 3 * BLOCK - 1)
    [load] = conn.build_connector_meta(_step([])).loads
    assert (load.req_id, load.block_ids, load.hashes) == ("c", [7, 8, 9], hashes[:3])
    conn.request_finished(whole, [7, 8, 9])
    # memkv_skip_load: no lookup at all.
    skip = _request("d", hashes, 5 * BLOCK + 7, {vllm_mod.SKIP_LOAD: True})
    assert conn.get_num_new_matched_tokens(skip, 0) == (0, False)
    assert conn.stats["lookups"] == 3

    # Saves: the blocks a step completes, except for requests with memkv_skip_save.
    nosave = _request("e", hashes, 5 * BLOCK + 7, {vllm_mod.SKIP_SAVE: True})
    save = _request("f", hashes, 5 * BLOCK + 7)
    for r in (nosave, save):
        conn.get_num_new_matched_tokens(r, 0)
        conn.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([],)), 0)
    meta = conn.build_connector_meta(_step([("e", [10, 11, 12], 0, 2 * BLOCK + 1), ("f", [20, 21, 22], 0, 2 * BLOCK + 1)]))
    assert [(t.req_id, t.block_ids, t.hashes) for t in meta.saves] == [("f", [20, 21], hashes[:2])]
    assert meta.loads == []
    conn.shutdown()


def test_a_hung_daemon_costs_one_timeout_per_retry_period(daemon_process: Any, short_dir: Path) -> None:
    """SIGSTOP the daemon: a lookup gives up after the connector's timeout (a miss, not a hang),
    the next ones do not wait on it again until the retry period has passed (doubling per failure
    in a row), and once the daemon runs again the connector reconnects and finds the blocks."""
    vllm_mod = _require_vllm()
    from memkv_mesh import keys

    node = daemon_process("vh", store={"dram_bytes": 16 << 20})
    ns = keys.namespace("fake-hung")
    hashes = [bytes([i + 1]) * 32 for i in range(3)]
    with node.client() as c:
        c.put_many([vllm_mod.block_key(ns, h) for h in hashes], [b"x" * 64] * 3)
    conn = vllm_mod.MemkvConnector.bare(node.sock, ns, BLOCK, timeout=0.5)
    conn._daemon.retry_s = 1.0
    req = _request("a", hashes, 3 * BLOCK + 5)
    assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, False)
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)  # timed out: a miss
        assert time.monotonic() - t < 10
        assert conn.stats["daemon_errors"] == 1
        t = time.monotonic()
        for _ in range(20):  # within the retry period: no wait on the stuck daemon at all
            assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
        assert time.monotonic() - t < 0.4 and conn.stats["daemon_errors"] == 1
        time.sleep(1.1)  # the period has passed: one more attempt, one more timeout
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
        assert conn.stats["daemon_errors"] == 2
        time.sleep(1.1)  # 2 failures in a row: the period doubled to 2 s
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
        assert conn.stats["daemon_errors"] == 2
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    time.sleep(1.0)  # now past the doubled period
    assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, False)
    conn.shutdown()


def test_load_failures_are_recomputed_unless_the_user_says_fail() -> None:
    vllm_mod = _require_vllm()
    conn = vllm_mod.MemkvConnector.bare(Path("/nonexistent.sock"), b"n" * 16, BLOCK)
    for policy, extra, after in (("fail", {}, "recompute"), ("recompute", {}, "recompute"),
                                 ("fail", {"load_failure_policy": "fail"}, "fail")):  # fmt: skip
        conn._kv_transfer_config = SimpleNamespace(kv_load_failure_policy=policy)
        conn._recompute_on_load_failure(extra)
        assert conn._kv_transfer_config.kv_load_failure_policy == after, (policy, extra)


def test_connector_counters_become_prometheus_series() -> None:
    vllm_mod = _require_vllm()
    import prometheus_client as prom

    reg = prom.CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (prom.Gauge, prom.Counter, prom.Histogram)}
    metrics = vllm_mod.MemkvConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]}  # type: ignore[arg-type]
    )
    metrics.observe({"daemon_errors": 2, "saved_blocks": 5, "lookups": 0}, engine_idx=1)
    metrics.observe({"daemon_errors": 1}, engine_idx=1)
    metrics.observe({"hit_blocks": 4}, engine_idx=0)
    def value(name: str, engine: str) -> float | None:
        return reg.get_sample_value(f"vllm:memkv_{name}_total", {"model_name": "m", "engine": engine})

    assert value("daemon_errors", "1") == 3 and value("saved_blocks", "1") == 5
    assert value("hit_blocks", "0") == 4 and value("hit_blocks", "1") == 0
    for name in vllm_mod.STAT_FIELDS:  # every counter the connector reports has a series
        assert value(name, "0") is not None


def test_worker_saves_loads_and_reports_missing_blocks(daemon_process: Any, short_dir: Path) -> None:
    vllm_mod = _require_vllm()
    import torch

    from memkv_mesh import keys

    node = daemon_process("vw", store={"dram_bytes": 32 << 20, "max_block_bytes": 1 << 20})
    ns = keys.namespace("fake", dtype="float32")
    g = torch.Generator().manual_seed(1)
    src = {f"l{i}": torch.randn(6, 2, 4, 8, generator=g) for i in range(3)}  # blocks on dim 0
    hashes = [bytes([i]) * 32 for i in range(4)]
    Meta, T = vllm_mod.MemkvConnectorMetadata, vllm_mod._Transfer

    saver = _worker(vllm_mod, node.sock, src, ns)
    saver.bind_connector_metadata(Meta(saves=[T("a", [4, 1], hashes[:2]), T("b", [3], hashes[3:4])]))
    saver.wait_for_save()
    assert saver.stats["saved_blocks"] == 3
    reported = saver.get_kv_connector_stats()
    assert reported is not None and reported.data["saved_blocks"] == 3
    assert saver.get_kv_connector_stats() is None  # nothing new since

    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    loader = _worker(vllm_mod, node.sock, dst, ns)
    # hashes[2] was never saved: its block and the ones after it in that request fail.
    loader.bind_connector_metadata(Meta(loads=[T("a", [0, 2, 5], [hashes[0], hashes[2], hashes[1]]),
                                               T("b", [1], hashes[3:4])]))
    loader.start_load_kv(None)
    loader.wait_for_layer_load("l0")
    assert loader.get_block_ids_with_load_errors() == {2, 5}
    assert loader.get_block_ids_with_load_errors() == set()  # reported once
    for n in src:
        assert torch.equal(dst[n][0], src[n][4]) and torch.equal(dst[n][1], src[n][3])
        # Block 5's bytes were read straight into its slots; it is reported all the same (its
        # prefix is missing), so vLLM overwrites it. The missing block's slots are untouched.
        assert not dst[n][2].any()
    assert loader.stats["loaded_blocks"] == 2 and loader.stats["failed_blocks"] == 2

    # Slots that are not host memory in one piece go through a staging buffer: same outcome.
    strided = {n: torch.zeros(2, 6, 4, 8).transpose(0, 1) for n in src}  # blocks on dim 0, not contiguous
    staged = _worker(vllm_mod, node.sock, strided, ns)
    assert staged._host_slices(list(strided), [0]) is None
    staged.bind_connector_metadata(Meta(loads=[T("a", [0, 2], hashes[:2])]))
    staged.start_load_kv(None)
    assert staged.get_block_ids_with_load_errors() == set()
    for n in src:
        assert torch.equal(strided[n][0], src[n][4]) and torch.equal(strided[n][2], src[n][1])

    # The daemon is gone: loads fail (for recompute), saves are skipped, nothing raises.
    node.stop()
    down = _worker(vllm_mod, node.sock, dst, ns)
    down.bind_connector_metadata(Meta(loads=[T("a", [0, 1], hashes[:2])], saves=[T("a", [2], hashes[2:3])]))
    down.start_load_kv(None)
    down.wait_for_save()
    assert down.get_block_ids_with_load_errors() == {0, 1}
    stats = down.get_kv_connector_stats()
    assert stats is not None
    assert stats.data["saved_blocks"] == 0 and stats.data["skipped_save_blocks"] == 1
    assert stats.data["failed_blocks"] == 2 and stats.data["daemon_errors"] == 1
    # vLLM sums the workers' stats with the class the connector names.
    total = vllm_mod.MemkvConnector.build_kv_connector_stats(reported.data).aggregate(stats)
    assert total.reduce()["saved_blocks"] == 3 and total.reduce()["failed_blocks"] == 2
    assert not total.is_empty() and vllm_mod.MemkvConnector.build_kv_connector_stats().is_empty()


# ---- real engines ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_engine_reuses_the_first_engines_blocks(
    daemon_process: Any, tiny_model: Path, tmp_path: Path, short_dir: Path
) -> None:
    node = daemon_process("vl", store={"dram_bytes": 64 << 20, "max_block_bytes": 4 << 20})
    first = _run_engine(tiny_model, node.sock, tmp_path, "first")
    full_blocks = (PROMPT_LEN - 1) // BLOCK
    assert first["num_cached_tokens"] == 0, first
    assert len(first["tokens"]) == MAX_TOKENS
    assert len(set(first["tokens"])) > 1, f"a degenerate model proves little: {first['tokens']}"
    with node.client() as c:
        stored = c.stats()["store"]["dram_blocks"]
    assert stored == full_blocks, f"the first engine stored {stored} blocks, not {full_blocks}"

    # Loaded by its short name this time (needs the package's entry point, i.e. `pip install`).
    # It first serves a prompt sharing the first 2 blocks (2 blocks from the mesh, then the rest
    # computed), so the prompt itself is 2 blocks from vLLM's own cache + 2 from the mesh.
    second = _run_engine(tiny_model, node.sock, tmp_path, "second", load="name")
    assert second["warm_cached_tokens"] == 2 * BLOCK, second["log"][-4000:]
    assert second["num_cached_tokens"] == full_blocks * BLOCK, second["log"][-4000:]
    assert second["tokens"] == first["tokens"]
    # Its connector counters reached vLLM's Prometheus registry (what `vllm serve` exports):
    # 2 lookups, and 2 + 2 blocks found in the mesh and loaded.
    prom = second["prometheus"]
    assert prom["vllm:memkv_lookups_total"] >= 2 and prom["vllm:memkv_loaded_blocks_total"] == 4, prom
    assert prom["vllm:memkv_hit_blocks_total"] == 4 and prom["vllm:memkv_failed_blocks_total"] == 0, prom
    assert prom["vllm:memkv_load_seconds_total"] > 0, prom

    # A block lost between the lookup and the load: it and the blocks after it are recomputed
    # (vLLM's default load-failure policy would fail the request; the connector switched it).
    lossy = _run_engine(tiny_model, node.sock, tmp_path, "lossy", load="lossy", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert lossy["finish_reason"] == "length", lossy["log"][-4000:]
    assert lossy["tokens"] == first["tokens"]
    assert lossy["stats"]["loaded_blocks"] == 1 and lossy["stats"]["failed_blocks"] == full_blocks - 1, lossy["stats"]
    assert "kv_load_failure_policy set to 'recompute'" in lossy["log"]

    # The daemon is gone: the engine warns, recomputes and gives the same answer.
    node.stop()
    third = _run_engine(tiny_model, node.sock, tmp_path, "down")
    assert third["num_cached_tokens"] == 0
    assert third["tokens"] == first["tokens"]
    assert "unavailable" in third["log"]


@pytest.mark.slow
def test_demo_vllm_serves_a_prompt_from_another_node(short_dir: Path) -> None:
    """``memkv-mesh demo vllm`` end to end, small: two engines, a 2-node mesh, one prompt of
    exactly 5 blocks (the engine test above covers a prompt ending in a partial block)."""
    _require_vllm()
    proc = subprocess.run(
        [sys.executable, "-m", "memkv_mesh", "demo", "vllm", "--model", "tiny", "--tokens", "640", "--json"],
        capture_output=True, text=True, env=_engine_env(TMPDIR=str(short_dir)), cwd=REPO,
        timeout=3 * ENGINE_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # 640 tokens are 5 whole blocks: all 5 are loaded, and vLLM computes the last token again.
    full = 640 - 1
    assert res["block_tokens"] == BLOCK and res["expected_cached_tokens"] == full
    assert res["cached_tokens"] == full, res  # local and remote hits alike
    assert res["miss_cached_tokens"] == 0, res  # the first request computed everything
    assert res["same_tokens"] is True and len(res["output_tokens"]) == 8
    assert len(set(res["output_tokens"])) > 1, res  # the tokens depend on the prompt
    for k in ("recompute_s", "miss_s", "hit_s", "remote_hit_s", "miss_overhead_ms"):
        assert res[k] > 0, (k, res)
    assert not list(short_dir.glob("memkv-demo-vllm-*")), "the demo left its directory behind"


# ---- the engine process ---------------------------------------------------------------------------
def _engine_main(model: str, sock: str, out: str, load: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        seed=0,
        disable_log_stats=load != "name",  # engine 2: the connector's counters as Prometheus series
        kv_transfer_config=KVTransferConfig(
            kv_connector="MemkvConnector",
            kv_connector_module_path=None if load == "name" else "memkv_mesh.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"socket": sock},
        ),
    )
    prompt = [(i * 7919 + 13) % 1000 + 3 for i in range(PROMPT_LEN)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    conn = None
    if load == "lossy":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn = get_kv_transfer_group()  # the worker's connector (the engine runs in this process)
        client = conn._daemon.get()
        real = client.get_many_into

        def lose_second(keys: Any, bufs: Any, **kw: Any) -> list[Any]:
            got = list(real(keys, bufs, **kw))
            if len(got) > 1:
                got[1] = None
            return got

        client.get_many_into = lose_second
    warm = None
    if load == "name":
        warm_prompt = prompt[:300] + [5] * 100
        [warm] = llm.generate([{"prompt_token_ids": warm_prompt}], params)  # type: ignore[list-item]
    [res] = llm.generate([{"prompt_token_ids": prompt}], params)  # type: ignore[list-item]
    Path(out).write_text(json.dumps({
        "num_cached_tokens": res.num_cached_tokens,
        "warm_cached_tokens": None if warm is None else warm.num_cached_tokens,
        "tokens": list(res.outputs[0].token_ids),
        "finish_reason": res.outputs[0].finish_reason,
        "stats": None if conn is None else conn.stats,
        "prometheus": _memkv_series(),
    }))


def _memkv_series() -> dict[str, float]:
    """The connector's Prometheus counters in this (engine front-end) process, by name."""
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.startswith("vllm:memkv_") and sample.name.endswith("_total"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


if __name__ == "__main__":
    _engine_main(*sys.argv[1:5])
