"""``memkv-mesh demo ttft``: time to first token, recomputed vs. restored from memkv-mesh.

A Llama-architecture model is built from a config with random weights and a fixed seed (no
download): 12 layers, hidden 1024, 16 query heads and 4 KV heads (grouped-query attention), MLP
4096, vocabulary 32000 with tied embeddings, fp32 on the CPU: about 215M parameters and 24 KiB of
KV cache per token. It answers one prompt of ``--tokens`` random token ids three ways and reports
the seconds from prompt to next-token logits:

* ``recompute_s``: prefill of the whole prompt into an empty cache;
* ``local_hit_s``: the prompt's blocks were stored in the local daemon by an earlier request
  (untimed); restore the longest cached prefix (leaving at least the last token) into a fresh
  ``DynamicCache`` and run only the rest;
* ``remote_hit_s``: the same through the second daemon of a 2-node mesh, which must fetch the
  blocks from the first. ``_remote_hit`` starts that mesh; when this build's daemons cannot serve
  a remote hit (no mesh data plane yet), it prints ``"remote_hit_s": null`` and
  ``"remote_hit": "skipped: <reason>"`` -- never a made-up number.

``max_logit_diff`` is the largest absolute difference between the restored runs' next-token
logits and the recompute's; the command fails (exit 1) when it is above ``--tolerance`` (1e-4).
With ``--repeat R`` each way runs on R different prompts (so no restore reads blocks it already
read) and the medians are printed. Daemons are started in a temporary directory and stopped at
the end (also on SIGTERM); ``--socket`` uses a running daemon for the local hit instead.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memkv_mesh.client import Client
from memkv_mesh.spawn import wait_serving

# name -> LlamaConfig fields. "demo" is the headline model; "tiny" keeps tests to seconds.
MODELS: dict[str, dict[str, Any]] = {
    "demo": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
MODEL_ID = "memkv-demo/llama-{name}-seed{seed}"
DAEMON_START_S = 30.0
MESH_WAIT_S = 20.0


class Skipped(Exception):
    """A measurement that cannot be made in this build; the message says why."""


def build_model(name: str, seed: int, max_tokens: int, init_range: float | None = None) -> Any:
    """The random-weight Llama ``name`` (``MODELS``); ``init_range``: the weights' standard
    deviation instead of transformers' 0.02 (at which its greedy output hardly depends on the
    prompt: ``demo vllm`` uses 0.2, so that identical tokens show the restored KV is right)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    fields: dict[str, Any] = {
        **MODELS[name],
        "max_position_embeddings": max(4096, max_tokens + 1),
        "tie_word_embeddings": True,
    }
    if init_range is not None:
        fields["initializer_range"] = init_range
    cfg = LlamaConfig(**fields)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    if next(model.parameters()).dtype != torch.float32:
        raise RuntimeError(f"the demo model should be fp32, got {next(model.parameters()).dtype}")
    return model


# ---- daemons ----------------------------------------------------------------------------------
class _Daemon:
    """A daemon subprocess in its own directory; ``node`` adds [node] lines, ``tables`` more tables."""

    def __init__(self, root: Path, name: str, dram: int, max_block: int, *, node: str = "", tables: str = "") -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = f"demo-{name}-{os.getpid()}"
        self.sock = self.dir / "memkv.sock"
        self.log = self.dir / "daemon.log"
        cfg = self.dir / "mesh.toml"
        cfg.write_text(
            f'[node]\nid = "{self.node_id}"\ndata_dir = "{self.dir}"\n{node}'
            f"[store]\ndram_bytes = {dram}\nnvme_bytes = 0\nmax_block_bytes = {max_block}\n"
            '[metrics]\nenabled = false\n[log]\nlevel = "warning"\n' + tables
        )
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(cfg)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self) -> None:
        wait_serving(self.proc, self.sock, timeout=DAEMON_START_S, log=self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- the three ways ------------------------------------------------------------------------------
def _recompute(model: Any, tokens: np.ndarray) -> tuple[float, Any, Any]:
    import torch
    from transformers import DynamicCache

    from memkv_mesh.integrations.transformers import _forward_kwarg

    ids = torch.from_numpy(tokens.astype(np.int64)).unsqueeze(0)
    kw = _forward_kwarg(model)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        logits = out.logits[0, -1].float()
        dt = time.perf_counter() - t0
    return dt, logits, cache


def _restored(store: Any, model: Any, tokens: np.ndarray) -> tuple[float, Any, int]:
    t0 = time.perf_counter()
    res = store.prefill(model, tokens, store=False)
    dt = time.perf_counter() - t0
    return dt, res.logits, res.restored_tokens


def _remote_hit(
    model: Any,
    prompts: list[np.ndarray],
    caches: list[Any],
    *,
    model_id: str,
    root: Path,
    dram: int,
    max_block: int,
    block_tokens: int,
    expect_tokens: int,
) -> tuple[list[float], list[Any]]:
    """Time a remote hit per prompt on a 2-node mesh; raise ``Skipped`` when this build cannot.

    Node A (role "both": engine host and flash owner) receives every prompt's blocks; node B
    (role "gpu", so it owns no replicas and must fetch) serves the restores. Before timing, a probe
    block put on A must become readable on B and B's lookup must see every prompt's whole prefix;
    otherwise the mesh data plane is missing and the measurement is skipped with the reason. Each
    prompt is restored once, so every timed restore is a fetch B has not done before.
    """
    from memkv_mesh.integrations.transformers import CacheStore

    with mesh_pair(root, dram, max_block) as (a, b):
        with Client(a.sock) as ca, Client(b.sock) as cb:
            store_a = CacheStore.for_model(ca, model, model_id, block_tokens=block_tokens)
            for toks, cache in zip(prompts, caches, strict=True):
                store_a.store(toks, cache)
            probe = os.urandom(32)
            ca.put(probe, b"memkv-demo-probe")
            _wait(lambda: cb.get_many_into([probe], [bytearray(64)])[0] is not None,
                  "node B does not fetch blocks that node A holds: this build has no mesh data plane")  # fmt: skip
            store_b = CacheStore.for_model(cb, model, model_id, block_tokens=block_tokens)
            keys = [k for toks in prompts for k in store_b.keys(toks)]
            _wait(lambda: cb.lookup(keys) == len(keys), "node B's lookup never saw node A's blocks")
            times: list[float] = []
            logits: list[Any] = []
            for toks in prompts:
                dt, lg, restored = _restored(store_b, model, toks)
                if restored != expect_tokens:
                    raise Skipped(f"node B restored {restored} of {expect_tokens} prefix tokens")
                times.append(dt)
                logits.append(lg)
            return times, logits


@contextlib.contextmanager
def mesh_pair(root: Path, dram: int, max_block: int) -> Iterator[tuple[_Daemon, _Daemon]]:
    """A 2-node mesh in ``root`` (one fresh gossip and data-plane key): node A, role "both"
    (engine host and flash owner), and node B, role "gpu" (owns no replicas, so it must fetch
    what A holds). Yields once B sees A alive; stops both on the way out. Raises ``Skipped``
    (saying why) when this build cannot start it."""
    key = base64.b64encode(os.urandom(32)).decode()
    gossip = f'[gossip]\nenabled = true\nport = 0\nkeys = ["{key}"]\n'
    dataplane = f'[dataplane]\ntransport = "tcp"\nkeys = ["{key}"]\n'
    a = b = None
    try:
        a = _Daemon(root, "mesh-a", dram, max_block, node='role = "both"\n', tables=gossip + dataplane)
        try:
            a.wait_ready()
        except RuntimeError as e:
            raise Skipped(f"cannot start a mesh node with [gossip] and [dataplane] ({e})") from None
        with Client(a.sock) as ca:
            addr = ca.stats().get("gossip_addr")
        if not addr:
            raise Skipped("the daemon does not report a gossip address (gossip not running)")
        seeds = f'seeds = ["{addr}"]\n'  # the "host:port" gossip peers use to reach A
        b = _Daemon(root, "mesh-b", dram, max_block, node='role = "gpu"\n', tables=gossip + seeds + dataplane)
        try:
            b.wait_ready()
        except RuntimeError as e:
            raise Skipped(f"cannot start the second mesh node ({e})") from None
        with Client(b.sock) as cb:
            a_id = a.node_id
            _wait(lambda: any(m.get("node_id") == a_id and m.get("state") == "alive" for m in cb.members()),
                  "node B never saw node A as an alive member")  # fmt: skip
        yield a, b
    finally:
        for d in (b, a):
            if d is not None:
                d.stop()


def _wait(cond: Callable[[], bool], reason: str) -> None:
    deadline = time.monotonic() + MESH_WAIT_S
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (ConnectionError, OSError):
            pass
        except Exception as e:  # the daemon refused (e.g. members without gossip)
            raise Skipped(f"{reason} ({e})") from None
        time.sleep(0.1)
    raise Skipped(f"{reason} (waited {MESH_WAIT_S:.0f} s)")


# ---- main --------------------------------------------------------------------------------------
def run_demo(
    tokens_n: int,
    *,
    model_name: str = "demo",
    seed: int = 0,
    block_tokens: int = 256,
    repeat: int = 1,
    socket: str | None = None,
    remote: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    import torch

    from memkv_mesh.integrations.transformers import CacheStore, layout_of_config

    model = build_model(model_name, seed, tokens_n)
    layout = layout_of_config(model.config, torch.float32)
    # One prompt per repeat, so that no restore (local or remote) is of blocks it already read.
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, model.config.vocab_size, tokens_n) for _ in range(repeat)]
    expect = min(tokens_n // block_tokens * block_tokens, tokens_n - 1)
    kv_bytes = layout.token_bytes() * tokens_n
    block_bytes = layout.block_bytes(block_tokens)
    dram = max(16 << 20, repeat * kv_bytes + 2 * block_bytes + (8 << 20))
    result: dict[str, Any] = {"tokens": tokens_n}
    model_id = MODEL_ID.format(name=model_name, seed=seed)

    # Warm up the kernels on a short prompt so that no way pays first-call costs.
    _recompute(model, prompts[0][: min(32, tokens_n)])

    rec_s: list[float] = []
    refs: list[Any] = []
    caches: list[Any] = []
    for r, toks in enumerate(prompts):
        dt, ref, cache = _recompute(model, toks)
        rec_s.append(dt)
        refs.append(ref)
        caches.append(cache)
        log(f"recompute {r + 1}/{repeat}: {dt:.3f} s")
    result["recompute_s"] = round(statistics.median(rec_s), 4)

    daemons: list[_Daemon] = []
    diffs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="memkv-demo-") as tmp:
        try:
            if socket:
                sock = Path(socket)
            else:
                d = _Daemon(Path(tmp), "local", dram, block_bytes)
                daemons.append(d)
                d.wait_ready()
                sock = d.sock
            loc_s: list[float] = []
            with Client(sock, name="demo-ttft") as client:
                store = CacheStore(client, model_id, layout, block_tokens=block_tokens)
                all_keys = [k for toks in prompts for k in store.keys(toks)]
                client.delete(all_keys)  # a clean start, in case --socket holds old blocks
                for toks, cache in zip(prompts, caches, strict=True):
                    store.store(toks, cache)  # what the earlier request did (untimed)
                log(f"stored {repeat} x {kv_bytes / 1e6:.1f} MB of KV in the local daemon")
                for r, toks in enumerate(prompts):
                    dt, logits, restored = _restored(store, model, toks)
                    if restored != expect:
                        raise RuntimeError(f"local restore gave {restored} tokens, expected {expect}")
                    loc_s.append(dt)
                    diffs.append(float((logits - refs[r]).abs().max()))
                    log(f"local hit {r + 1}/{repeat}: {dt:.3f} s ({restored} tokens restored)")
                client.delete(all_keys)
            result["local_hit_s"] = round(statistics.median(loc_s), 4)
            result["remote_hit_s"] = None
            if not remote:
                result["remote_hit"] = "skipped: --no-remote"
            else:
                try:
                    rem_s, rlogits = _remote_hit(
                        model, prompts, caches, model_id=model_id, root=Path(tmp), dram=dram,
                        max_block=block_bytes, block_tokens=block_tokens, expect_tokens=expect,
                    )  # fmt: skip
                    result["remote_hit_s"] = round(statistics.median(rem_s), 4)
                    diffs.extend(float((lg - ref).abs().max()) for lg, ref in zip(rlogits, refs, strict=True))
                    for r, dt in enumerate(rem_s):
                        log(f"remote hit {r + 1}/{repeat}: {dt:.3f} s")
                except Skipped as e:
                    result["remote_hit"] = f"skipped: {e}"
                    log(f"remote hit skipped: {e}")
        finally:
            for d in daemons:
                d.stop()
    result["max_logit_diff"] = max(diffs)
    result["restored_tokens"] = expect
    result["kv_bytes"] = kv_bytes
    result["repeats"] = repeat
    result["torch_threads"] = torch.get_num_threads()
    return result


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_guarded(prog: str, demo: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run a demo so that SIGTERM still stops its daemons (the finally blocks run on SystemExit);
    a RuntimeError or ConnectionError is printed as ``prog: message`` and gives None."""
    old_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return demo()
    except (RuntimeError, ConnectionError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGTERM, old_term)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="memkv-mesh demo ttft",
        description="Time to first token: recompute vs. prefix restored from memkv-mesh (local and remote hit).",
    )
    p.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=1, help="run each way this many times, print the medians")
    p.add_argument("--block-tokens", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--model", choices=sorted(MODELS), default="demo", help="model size (tiny: for tests)")
    p.add_argument("--socket", default=None, help="use the daemon at this socket for the local hit")
    p.add_argument("--no-remote", action="store_true", help="skip the 2-node mesh (remote hit)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference accepted")
    ns = p.parse_args(argv)
    if ns.tokens < 2:
        p.error(f"--tokens must be at least 2 (one restored, one computed), got {ns.tokens}")
    if ns.block_tokens < 1 or ns.block_tokens >= ns.tokens:
        p.error(f"--block-tokens must be in [1, --tokens), got {ns.block_tokens} with --tokens {ns.tokens}")
    if ns.repeat < 1:
        p.error(f"--repeat must be at least 1, got {ns.repeat}")
    if ns.threads < 0:
        p.error(f"--threads must be 0 (torch's choice) or more, got {ns.threads}")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"memkv-mesh demo ttft needs torch and transformers ({e}): pip install 'memkv-mesh[transformers]'",
              file=sys.stderr)  # fmt: skip
        return 2
    if ns.threads:
        torch.set_num_threads(ns.threads)
    say = (lambda s: print(s, file=sys.stderr)) if not ns.json else (lambda s: None)
    res = run_guarded("memkv-mesh demo ttft", lambda: run_demo(
        ns.tokens, model_name=ns.model, seed=ns.seed, block_tokens=ns.block_tokens, repeat=ns.repeat,
        socket=ns.socket, remote=not ns.no_remote, log=say,
    ))  # fmt: skip
    if res is None:
        return 1
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"prompt of {res['tokens']} tokens ({res['kv_bytes'] / 1e6:.1f} MB of KV cache)")
        print(f"  recompute   {res['recompute_s']:.3f} s")
        print(f"  local hit   {res['local_hit_s']:.3f} s  ({res['recompute_s'] / res['local_hit_s']:.0f}x faster)")
        if res["remote_hit_s"] is None:
            print(f"  remote hit  {res['remote_hit']}")
        else:
            print(f"  remote hit  {res['remote_hit_s']:.3f} s  ({res['recompute_s'] / res['remote_hit_s']:.0f}x faster)")
        print(f"  max |logit difference| {res['max_logit_diff']:.2e}")
    if res["max_logit_diff"] > ns.tolerance:
        print(f"memkv-mesh demo ttft: restored logits differ by {res['max_logit_diff']:.3g} > {ns.tolerance}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
