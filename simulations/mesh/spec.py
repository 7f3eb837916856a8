"""Cluster, model, cost and failure specs for the mesh simulator, and their TOML file.

Every spec is a frozen msgspec Struct with ``forbid_unknown_fields``: a misspelt or wrongly typed
field in a cluster file is an error that names the field and the file. Each default says why it
is what it is. Units: bytes are decimal (GB = 1e9) except KV bytes per token, which the model
presets give in KiB as published; bandwidths are GB/s (decimal) of payload.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

__all__ = [
    "ModelSpec",
    "ClusterSpec",
    "CostSpec",
    "FailureSpec",
    "SimSpec",
    "MODEL_PRESETS",
    "SpecError",
    "load_spec",
    "model_preset",
]

Eviction = Literal["lru", "fifo"]
Routing = Literal["round-robin", "least-loaded", "prefix-aware"]
PutPolicy = Literal["all", "on-reuse"]
WritePath = Literal["instant", "async"]


class SpecError(ValueError):
    """A bad cluster/model/cost/failure spec; the message names the field (and file)."""


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one model costs to serve. Defaults are Llama-3-70B on H100 (see MODEL_PRESETS)."""

    name: str = "llama-3-70b"
    # 80 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 320 KiB per token.
    kv_bytes_per_token: int = 320 * 1024
    # Prefill is compute bound: ~2 x 70e9 FLOP per token at ~50% of an H100's 989 TFLOP/s BF16.
    prefill_tokens_per_s_per_gpu: float = 3500.0
    # Per-request streaming decode speed of a TP-8 70B engine under continuous batching.
    decode_tokens_per_s: float = 35.0


MODEL_PRESETS: dict[str, ModelSpec] = {
    # 32 layers x 8 KV heads x 128 x 2 x 2 B = 128 KiB; 2 x 8e9 FLOP/token at ~50% MFU.
    "llama-3-8b": ModelSpec("llama-3-8b", 128 * 1024, 30000.0, 110.0),
    # 80 layers x 8 x 128 x 2 x 2 B = 320 KiB; 2 x 70e9 FLOP/token at ~50% MFU.
    "llama-3-70b": ModelSpec("llama-3-70b", 320 * 1024, 3500.0, 35.0),
    # 64 layers x 8 x 128 x 2 x 2 B = 256 KiB; 2 x 32e9 FLOP/token at ~50% MFU.
    "qwen3-32b": ModelSpec("qwen3-32b", 256 * 1024, 7700.0, 55.0),
}


def model_preset(name: str) -> ModelSpec:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise SpecError(
            f"unknown model preset {name!r}; choose one of {', '.join(sorted(MODEL_PRESETS))}"
        ) from None


class ClusterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The machines. A GPU node runs one engine over its GPUs; a flash node holds replicas."""

    # The speed target of the issue: a 64-GPU-node pod with 16 flash peers.
    gpu_nodes: int = 64
    # One tensor-parallel engine per 8-GPU HGX node: prefill runs on all 8 at once.
    gpus_per_node: int = 8
    # Host DRAM set aside for KV per GPU node (of ~2 TB on an HGX H100 node).
    dram_gb_per_node: float = 512.0
    # Overrides dram_gb_per_node with a block count; the exactness tests use it. None = from GB.
    dram_blocks: int | None = None
    # DRAM capacity unlimited (the "ideal" cache); wins over dram_blocks and dram_gb_per_node.
    dram_unbounded: bool = False
    flash_nodes: int = 16
    # Two 3.84/7.68 TB Gen4 drives per flash peer: 8 TB usable.
    nvme_tb_per_flash_node: float = 8.0
    # Two Gen4 drives: 2 x 7 GB/s sequential read, 2 x 4 GB/s sustained write.
    nvme_read_gbps: float = 14.0
    nvme_write_gbps: float = 8.0
    # NDR 400 Gb/s = 50 GB/s per node, each direction (full duplex), non-blocking fabric.
    nic_gbps: float = 50.0
    # Host DRAM -> GPU over PCIe Gen5 x16 (~63 GB/s raw); ~25 GB/s sustained for scattered pages.
    pcie_gbps: float = 25.0
    # R: replicas per block on flash peers (DESIGN.md default).
    replicas: int = 2
    eviction: Eviction = "lru"
    routing: Routing = "prefix-aware"
    # Mooncake's trace uses 512-token blocks.
    block_tokens: int = 512
    # Infinite bandwidth everywhere (transfers take no time); prefill still does.
    ideal_network: bool = False
    # A put to a flash node whose NVMe/NIC queue is more than this far behind is dropped: the
    # mesh is a cache, and an unbounded write backlog would stall every read behind it.
    write_backlog_s: float = 1.0
    # The scheduler fetches a mesh prefix only when that ends prefill sooner than recomputing it
    # (on the queues as they stand); off = always fetch what the mesh holds.
    fetch_if_faster: bool = True
    # Which blocks a GPU node puts to the mesh: "all" it computes (the DESIGN.md put path: every
    # block is replicated to its owners), or "on-reuse": a block once the node re-uses it from
    # DRAM, so one-off prompts never cost flash writes (NVMe write bandwidth is usually the limit).
    put_policy: PutPolicy = "all"
    # How a put reaches the flash owners. "instant": at prefill end the blocks are written to their
    # owners (bandwidth permitting), the capacity planner's view of a mesh whose write path keeps
    # up. "async": the daemon's write path (DESIGN.md "Data paths" 1): the block is acknowledged
    # in the GPU node's DRAM and stays *dirty* there, pinned against eviction, until all its owners
    # hold it; replication runs in put order and lands ``replication_lag_s`` later (or later still
    # when NICs/NVMe are busy); another node's lookup sees the block once the gossiped directory
    # says someone holds it (``directory_delay_s`` after the put) and may fetch it from the GPU
    # node that put it; past ``dirty_blocks`` dirty blocks a put waits (back-pressure). Blocks still
    # being computed are not hits. "instant" is the default so capacity figures stay comparable.
    write_path: WritePath = "instant"
    # "async": seconds from a put's acknowledgement to its owners holding it, on top of transfer
    # times. 0 = bandwidth only; `memkv-mesh bench replay` passes the daemons' measured p50.
    replication_lag_s: float = 0.0
    # "async": seconds until a new holder is in every node's directory. The directory's deltas
    # ride gossip batches of 0.25 s; docs/directory.md measures add staleness p50 0.14 s.
    directory_delay_s: float = 0.14
    # "async": dirty blocks a GPU node may hold before puts wait (the daemon's [mesh] dirty_bytes
    # divided by the block size). None = no bound.
    dirty_blocks: int | None = None


class CostSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prices for cost per million tokens."""

    # Typical 2025 cloud on-demand H100 price per GPU-hour.
    usd_per_gpu_hour: float = 2.5
    # Enterprise NVMe amortised over 3 years plus power: ~$15 per TB-month.
    usd_per_tb_month: float = 15.0
    # A storage server (CPU, NIC, chassis) without its drives.
    usd_per_flash_node_hour: float = 0.8


class FailureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Kill flash nodes at given times and watch the dip and the re-replication."""

    # "flash-3@600" kills flash node 3 at t = 600 s. Empty: no failures.
    kill: list[str] = msgspec.field(default_factory=list)
    # Time from death to every peer knowing: memberlist LAN defaults at N = 100 (probe 1 s,
    # suspicion 4 x log10(N) x probe = 8 s, plus the probe that notices) measure p50 9.9 s.
    detect_delay_s: float = 10.0
    # Re-replication rate cap for the whole mesh, so repair never starves reads.
    rereplication_gbps: float = 5.0
    # What a fetch from a dead node costs before falling back (connect timeout).
    failed_fetch_s: float = 0.05
    # "flash-3@900" restarts killed flash node 3 at t = 900 s on its old disk: it rejoins the view
    # with the blocks it held when it died. Each entry needs an earlier kill of the same node.
    restart: list[str] = msgspec.field(default_factory=list)


class SimSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One simulation's whole input besides the trace: the root of a cluster TOML file."""

    cluster: ClusterSpec = ClusterSpec()
    model: ModelSpec = ModelSpec()
    cost: CostSpec = CostSpec()
    failure: FailureSpec = FailureSpec()

    def validate(self) -> SimSpec:
        """Check ranges; raise SpecError naming the field. Returns self for chaining."""
        c, m = self.cluster, self.model
        positive = {
            "cluster.gpus_per_node": c.gpus_per_node,
            "cluster.nvme_read_gbps": c.nvme_read_gbps,
            "cluster.nvme_write_gbps": c.nvme_write_gbps,
            "cluster.nic_gbps": c.nic_gbps,
            "cluster.pcie_gbps": c.pcie_gbps,
            "cluster.replicas": c.replicas,
            "cluster.block_tokens": c.block_tokens,
            "model.kv_bytes_per_token": m.kv_bytes_per_token,
            "model.prefill_tokens_per_s_per_gpu": m.prefill_tokens_per_s_per_gpu,
            "model.decode_tokens_per_s": m.decode_tokens_per_s,
            "failure.rereplication_gbps": self.failure.rereplication_gbps,
        }
        for name, v in positive.items():
            if not (v > 0 and math.isfinite(v)):
                raise SpecError(f"{name} must be > 0, got {v!r}")
        nonneg = {
            "cluster.dram_gb_per_node": c.dram_gb_per_node,
            "cluster.nvme_tb_per_flash_node": c.nvme_tb_per_flash_node,
            "cluster.flash_nodes": c.flash_nodes,
            "cluster.write_backlog_s": c.write_backlog_s,
            "cluster.replication_lag_s": c.replication_lag_s,
            "cluster.directory_delay_s": c.directory_delay_s,
            "failure.detect_delay_s": self.failure.detect_delay_s,
            "failure.failed_fetch_s": self.failure.failed_fetch_s,
            "cost.usd_per_gpu_hour": self.cost.usd_per_gpu_hour,
            "cost.usd_per_tb_month": self.cost.usd_per_tb_month,
            "cost.usd_per_flash_node_hour": self.cost.usd_per_flash_node_hour,
        }
        for name, v in nonneg.items():
            if not (v >= 0 and math.isfinite(v)):
                raise SpecError(f"{name} must be >= 0, got {v!r}")
        if c.gpu_nodes < 1:
            raise SpecError(f"cluster.gpu_nodes must be >= 1, got {c.gpu_nodes}")
        if c.dram_blocks is not None and c.dram_blocks < 0:
            raise SpecError(f"cluster.dram_blocks must be >= 0, got {c.dram_blocks}")
        if c.dirty_blocks is not None and c.dirty_blocks < 1:
            raise SpecError(f"cluster.dirty_blocks must be >= 1 (or absent: no bound), got {c.dirty_blocks}")
        kills = [parse_kill(k, c.flash_nodes) for k in self.failure.kill]
        for r in self.failure.restart:
            idx, t = parse_kill(r, c.flash_nodes, field="failure.restart")
            if not any(k_idx == idx and k_t < t for k_idx, k_t in kills):
                raise SpecError(f"failure.restart entry {r!r}: flash-{idx} is not killed before {t:g} s")
        return self

    @property
    def block_bytes(self) -> int:
        return self.model.kv_bytes_per_token * self.cluster.block_tokens

    @property
    def dram_capacity_blocks(self) -> int | None:
        """Blocks of DRAM per GPU node; None = unbounded."""
        c = self.cluster
        if c.dram_unbounded:
            return None
        if c.dram_blocks is not None:
            return c.dram_blocks
        return int(c.dram_gb_per_node * 1e9 // self.block_bytes)

    @property
    def nvme_capacity_blocks(self) -> int:
        return int(self.cluster.nvme_tb_per_flash_node * 1e12 // self.block_bytes)


def parse_kill(text: str, flash_nodes: int, *, field: str = "failure.kill") -> tuple[int, float]:
    """Parse ``"flash-<i>@<seconds>"`` (or ``"<i>@<seconds>"``) into (flash index, time)."""
    node, sep, when = text.partition("@")
    if not sep:
        raise SpecError(f"{field} entry {text!r} must look like 'flash-3@600'")
    node = node.strip().removeprefix("flash-")
    try:
        idx, t = int(node), float(when)
    except ValueError:
        raise SpecError(f"{field} entry {text!r} must look like 'flash-3@600'") from None
    if not 0 <= idx < flash_nodes:
        raise SpecError(f"{field} entry {text!r}: no flash node {idx} (have {flash_nodes})")
    if not (t >= 0 and math.isfinite(t)):
        raise SpecError(f"{field} entry {text!r}: time must be >= 0")
    return idx, t


def load_spec(path: str | Path) -> SimSpec:
    """Load a cluster TOML file. ``[model] preset = "qwen3-32b"`` starts from a preset and
    lets the other ``[model]`` keys override it."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"cannot read cluster spec {str(p)!r}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML: {e}") from e
    model = raw.get("model")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        base = model_preset(str(model.pop("preset")))
        raw["model"] = {**msgspec.structs.asdict(base), **model}
    try:
        spec = msgspec.convert(raw, SimSpec)
    except msgspec.ValidationError as e:
        raise SpecError(f"{p}: {e}") from None
    try:
        return spec.validate()
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None
