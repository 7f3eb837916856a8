"""A native vLLM v1 KV connector: vLLM keeps and finds whole KV blocks in memkv-mesh.

Configuration (no vLLM patch)::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model, kv_transfer_config=KVTransferConfig(
        kv_connector="MemkvConnector",                       # the short name (entry point), or:
        kv_connector_module_path="memkv_mesh.integrations.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"socket": "/run/memkv/memkv.sock", "tenant": "", "timeout_s": 5.0},
    ))

or on the command line ``vllm serve MODEL --kv-transfer-config
'{"kv_connector":"MemkvConnector","kv_role":"kv_both"}'``. The short name comes from the
``vllm.general_plugins`` entry point ``memkv`` (``register()`` below), which vLLM calls in every
process; ``kv_connector_module_path`` works without it. The socket defaults to ``$MEMKV_SOCKET``,
else ``.memkv/memkv.sock``.

Theory of operation
-------------------
* One mesh block per vLLM block: the block's K/V of every layer of this worker, concatenated in
  layer order. Its 32-byte key is a keyed BLAKE2b of vLLM's own ``request.block_hashes[i]`` (which
  already chains the prefix, LoRA, multimodal inputs and cache salt), keyed by a namespace
  (``keys.namespace``: model, KV dtype, tensor-parallel rank and size, block size and layer count,
  device type). vLLM's block hashes must therefore agree across processes: with
  ``prefix_caching_hash_algo`` xxhash / xxhash_cbor they do only when PYTHONHASHSEED is set, and
  the connector refuses to start otherwise, saying so.
* Scheduler side: ``get_num_new_matched_tokens`` is one ``lookup`` through the node daemon (on a
  mesh node that asks the whole mesh) for the request's full blocks beyond what vLLM has locally,
  one token short when it reaches the prompt's end (vLLM must compute at least one prompt token:
  that one is recomputed over its loaded block). ``update_state_after_alloc`` records which
  block ids receive them, ``build_connector_meta`` hands the loads and the blocks that become full
  in this step (to be saved) to the workers.
* Worker side: ``start_load_kv`` reads the blocks with one ``get_many_into`` before the forward
  pass (a synchronous load; ``wait_for_layer_load`` has nothing left to wait for), each block
  scattered by the client straight into its slot of every layer when those are host memory in one
  piece (the CPU backend), else into a staging buffer and copied per layer (GPU caches).
  ``wait_for_save`` stores the blocks that became full with one ``put_many``, the client
  gathering each from its layers' slots the same way.
* It never raises into vLLM: a block that is missing, of the wrong size or not read in time is
  reported by ``get_block_ids_with_load_errors`` and vLLM recomputes it (the connector sets
  vLLM's ``kv_load_failure_policy`` to "recompute": vLLM's default, "fail", would fail the
  request instead); a daemon that is down or
  goes away is a miss for lookups, a load error for loads and a skipped save, with one warning,
  and the connector reconnects on a later step. A hung daemon (SIGSTOP, a stuck host) costs one
  wait of ``timeout_s`` (``kv_connector_extra_config``, default 5 s), after which the daemon is
  left alone for 5 s, doubling per failure in a row up to 60 s, so a stuck daemon stalls vLLM
  for at most one timeout per retry period. Both halves connect when vLLM creates them (the
  scheduler) or registers its KV caches (the workers), so no request pays for the connection.
* Per request, vLLM's ``kv_transfer_params`` (``SamplingParams(extra_args={"kv_transfer_params":
  {...}})`` offline, the request's ``kv_transfer_params`` field on the OpenAI-compatible server)
  may hold ``memkv_skip_load`` (no lookup, no load) and ``memkv_skip_save`` (nothing saved).
* Counters (``STAT_FIELDS``) go to vLLM as connector stats: its "KV Transfer metrics" log line
  and, through ``build_prom_metrics``, the Prometheus series ``vllm:memkv_<field>_total`` on the
  server's ``/metrics`` (``daemon_errors``, ``failed_blocks`` and ``skipped_save_blocks`` count the
  recompute fallbacks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("memkv_mesh.integrations.vllm needs vLLM: pip install 'memkv-mesh[vllm]'") from e

from memkv_mesh import keys as mkeys
from memkv_mesh.client import Client, default_socket_path

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = [
    "CONNECTOR_NAME", "SKIP_LOAD", "SKIP_SAVE", "MemkvConnector", "MemkvConnectorMetadata", "MemkvConnectorStats",
    "MemkvPromMetrics", "register",
]  # fmt: skip

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "MemkvConnector"
_PERSON = b"memkv-vllm-v1"
_RETRY_S = 5.0  # how long a down daemon is left alone before the next connection attempt, doubling
_RETRY_MAX_S = 60.0  # per failure in a row up to this
_TIMEOUT_S = 5.0  # the longest the connector waits on its daemon for one reply (a hung daemon)
_NONDETERMINISTIC_ALGOS = frozenset({"xxhash", "xxhash_cbor"})
# Counters the workers report to vLLM (KVConnectorStats, summed over workers and log intervals).
STAT_FIELDS = ("lookups", "hit_blocks", "loaded_blocks", "failed_blocks", "saved_blocks", "skipped_save_blocks",
               "daemon_errors", "load_seconds", "save_seconds")
# What each counter counts: the Prometheus help text of ``vllm:memkv_<field>_total``.
STAT_HELP = {
    "lookups": "Prefix lookups the memkv-mesh connector sent to its daemon.",
    "hit_blocks": "KV blocks the memkv-mesh lookups found beyond vLLM's own prefix cache.",
    "loaded_blocks": "KV blocks loaded from memkv-mesh into vLLM's KV cache.",
    "failed_blocks": "KV blocks whose load from memkv-mesh failed; vLLM recomputed them.",
    "saved_blocks": "KV blocks saved to memkv-mesh.",
    "skipped_save_blocks": "KV blocks not saved to memkv-mesh because its daemon was unavailable or failed.",
    "daemon_errors": "Failed connections to or requests of the memkv-mesh daemon (each degrades to recompute).",
    "load_seconds": "Seconds the memkv-mesh connector's workers spent loading KV blocks (before forward passes).",
    "save_seconds": "Seconds the memkv-mesh connector's workers spent saving KV blocks (after forward passes).",
}
# Per-request options in vLLM's ``kv_transfer_params`` (SamplingParams.extra_args, or the
# OpenAI-compatible server's request field): True leaves that request's blocks out of the mesh.
SKIP_LOAD = "memkv_skip_load"  # no lookup, no load: the request computes its whole prompt
SKIP_SAVE = "memkv_skip_save"  # none of its blocks is saved


def register() -> None:
    """The ``vllm.general_plugins`` entry point: makes ``kv_connector="MemkvConnector"`` work."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, __name__, "MemkvConnector")
    except ValueError:
        pass  # already registered in this process


def check_deterministic_hashing(hash_algo: str, env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Refuse block hashes that differ between processes (they would never hit, or worse, collide
    with another process's seed): xxhash algorithms seed vLLM's first block hash from random bytes
    unless PYTHONHASHSEED is set."""
    if hash_algo in _NONDETERMINISTIC_ALGOS and env.get("PYTHONHASHSEED") is None:
        raise ValueError(
            f"memkv-mesh's vLLM connector needs block hashes that agree across processes, but "
            f"prefix_caching_hash_algo={hash_algo!r} without PYTHONHASHSEED makes them random per "
            "process: set PYTHONHASHSEED to the same value for every vLLM process that shares the "
            "mesh (e.g. PYTHONHASHSEED=0), or use prefix_caching_hash_algo='sha256'"
        )


def block_key(ns: bytes, block_hash: Any) -> bytes:
    """The mesh key of one vLLM block hash (bytes in vLLM 0.32; ints from older versions)."""
    if isinstance(block_hash, int):
        data = block_hash.to_bytes((block_hash.bit_length() + 8) // 8 or 1, "little", signed=True)
    else:
        data = bytes(block_hash)
    return hashlib.blake2b(data, digest_size=mkeys.KEY_BYTES, key=ns, person=_PERSON).digest()


@dataclass
class MemkvConnectorStats(KVConnectorStats):
    """The connector's counters as vLLM's connector stats: recompute fallbacks (``failed_blocks``,
    ``skipped_save_blocks``, ``daemon_errors``) show up in vLLM's KV transfer metrics log."""

    def __post_init__(self) -> None:
        for name in STAT_FIELDS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(STAT_FIELDS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


@dataclass
class _Transfer:
    req_id: str
    block_ids: list[int]
    hashes: list[Any]


@dataclass
class MemkvConnectorMetadata(KVConnectorMetadata):
    """What the workers do this step: blocks to load before the forward pass, blocks to save after."""

    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # full blocks saved (or known to be in the mesh) so far
    local: int = 0  # the (block-aligned) local prefix-cache hit the last lookup started from
    skip_load: bool = False
    skip_save: bool = False

    @classmethod
    def of(cls, request: Any) -> _ReqState:
        params = getattr(request, "kv_transfer_params", None)
        params = params if isinstance(params, dict) else {}
        return cls(request, skip_load=bool(params.get(SKIP_LOAD)), skip_save=bool(params.get(SKIP_SAVE)))


class _Daemon:
    """A lazily (re)connected client that turns daemon failures into warnings."""

    def __init__(
        self, socket: Path, name: str, stats: dict[str, int | float] | None = None, timeout: float = _TIMEOUT_S
    ) -> None:
        self.socket = socket
        self.stats = stats if stats is not None else {}
        self.name = name
        self.timeout = timeout
        self.retry_s = _RETRY_S
        self._failures = 0  # in a row, without a request that worked in between
        self._client: Client | None = None
        self._retry_at = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def get(self) -> Client | None:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._client = Client(self.socket, timeout=self.timeout, name=self.name)
            except Exception as e:  # noqa: BLE001 - any failure means "no cache now"
                self.failed(e)
                return None
            if self._warned:
                logger.warning("memkv-mesh: reconnected to the daemon at %s", self.socket)
                self._warned = False
            return self._client

    def failed(self, e: BaseException) -> None:
        """Drop the connection after an error; warn once until it works again."""
        client, self._client = self._client, None
        self.stats["daemon_errors"] = self.stats.get("daemon_errors", 0) + 1
        # A daemon that is down or hung is left alone longer each time (a hung one costs a
        # timeout per attempt), up to _RETRY_MAX_S.
        self._retry_at = time.monotonic() + min(_RETRY_MAX_S, self.retry_s * 2 ** min(self._failures, 16))
        self._failures += 1
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        if not self._warned:
            logger.warning(
                "memkv-mesh: daemon at %s unavailable (%s); KV blocks are recomputed until it is back",
                self.socket, e,
            )
            self._warned = True

    def ok(self) -> None:
        """A request worked: the next failure waits ``retry_s`` again."""
        self._failures = 0

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class MemkvConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector backed by the node's memkv-mesh daemon (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cache = vllm_config.cache_config
        check_deterministic_hashing(str(getattr(cache, "prefix_caching_hash_algo", "sha256")))
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ValueError(
                f"memkv-mesh's vLLM connector handles one KV cache group, this model has {len(groups)} "
                "(a hybrid model): run it without the connector, or with "
                "--disable-hybrid-kv-cache-manager"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = int(cache.block_size)
        sock = extra.get("socket") or os.environ.get("MEMKV_SOCKET")
        self.stats: dict[str, int | float] = dict.fromkeys(STAT_FIELDS, 0)
        self._reported = dict(self.stats)
        self._daemon = _Daemon(
            Path(sock) if sock else default_socket_path(), f"vllm-{role.name.lower()}", self.stats,
            timeout=float(extra.get("timeout_s", _TIMEOUT_S)),
        )
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            tp_rank = _tp_rank()
        model = vllm_config.model_config
        try:
            from vllm.platforms import current_platform

            device = str(current_platform.device_type)
        except Exception:  # noqa: BLE001
            device = "unknown"
        n_layers = model.get_num_layers(vllm_config.parallel_config)
        self.namespace = mkeys.namespace(
            str(model.model),
            dtype=f"{model.dtype}/{cache.cache_dtype}",
            tp_rank=tp_rank,
            tp_size=tp_size,
            layers=f"vllm-v1 block={self.block_size} layers={n_layers} device={device}",
            tenant=str(extra.get("tenant", "")),
        )
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: dict[str, _Transfer] = {}
        # worker side
        self._kv: dict[str, torch.Tensor] = {}
        self._block_dim: dict[str, int] = {}
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._recompute_on_load_failure(extra)
            self._daemon.get()  # connect now, not in the first request (a failure only warns)

    def _recompute_on_load_failure(self, extra: dict[str, Any]) -> None:
        """vLLM 0.32 fails a request whose KV load reports errors unless ``kv_load_failure_policy``
        is "recompute"; its default is "fail". For a cache a failed load is a miss (a block
        evicted since the lookup, a directory false positive), so the connector switches the
        policy before vLLM's scheduler reads it, unless ``kv_connector_extra_config`` says
        ``"load_failure_policy": "fail"``."""
        cfg = self._kv_transfer_config
        policy = getattr(cfg, "kv_load_failure_policy", "recompute")
        if policy == "recompute":
            return
        if extra.get("load_failure_policy") == policy:
            logger.warning("memkv-mesh: kv_load_failure_policy=%r kept: a block the mesh loses between "
                           "lookup and load fails its request", policy)  # fmt: skip
            return
        cfg.kv_load_failure_policy = "recompute"
        logger.warning("memkv-mesh: kv_load_failure_policy set to 'recompute' (was %r): a block that cannot be "
                    "loaded is recomputed; kv_connector_extra_config {'load_failure_policy': 'fail'} keeps "
                    "failing the request", policy)  # fmt: skip

    @classmethod
    def bare(
        cls, socket: Path, namespace: bytes, block_size: int, name: str = "vllm-bare", timeout: float = _TIMEOUT_S
    ) -> MemkvConnector:
        """Both halves' state without a vLLM config or engine: for tests and benchmarks that drive
        the scheduler methods with stand-in requests, or the worker methods with plain tensors."""
        conn = object.__new__(cls)
        conn.namespace = namespace
        conn.block_size = block_size
        conn.stats = dict.fromkeys(STAT_FIELDS, 0)
        conn._reported = dict(conn.stats)
        conn._daemon = _Daemon(socket, name, conn.stats, timeout=timeout)
        conn._reqs, conn._pending_loads = {}, {}
        conn._kv, conn._block_dim, conn._load_errors = {}, {}, set()
        conn._kv_cache_config = None
        conn._connector_metadata = None
        return conn

    # ---- keys ---------------------------------------------------------------------------------
    def _keys(self, hashes: list[Any]) -> list[bytes]:
        return [block_key(self.namespace, h) for h in hashes]

    # ---- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._reqs.get(request.request_id) or self._reqs.setdefault(
            request.request_id, _ReqState.of(request)
        )
        if state.skip_load:
            return 0, False
        # request.num_computed_tokens is set only after update_state_after_alloc: keep the start.
        state.local = num_computed_tokens
        hashes = list(request.block_hashes)
        # Every full block of the prompt may be loaded; but at least one prompt token must be
        # computed (its logits start the output), so a hit to the prompt's very end is reported
        # one token short and that token is recomputed over its loaded KV (as vLLM's own
        # prefix cache would have to recompute a whole block).
        usable = min(len(hashes), request.num_prompt_tokens // self.block_size)
        first = num_computed_tokens // self.block_size
        if usable <= first:
            return 0, False
        client = self._daemon.get()
        if client is None:
            return 0, False
        try:
            hits = client.lookup(self._keys(hashes[:usable]))
        except Exception as e:  # noqa: BLE001 - never raise into vLLM
            self._daemon.failed(e)
            return 0, False
        self._daemon.ok()
        self.stats["lookups"] += 1
        if hits <= first:
            return 0, False
        self.stats["hit_blocks"] += hits - first
        return min(hits * self.block_size, request.num_prompt_tokens - 1) - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._reqs.get(request.request_id) or self._reqs.setdefault(
            request.request_id, _ReqState.of(request)
        )
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        first = state.local // self.block_size
        last = -(-(state.local + num_external_tokens) // self.block_size)  # a last block short of its last token
        self._pending_loads[request.request_id] = _Transfer(
            request.request_id, list(block_ids[first:last]), list(request.block_hashes[first:last])
        )
        state.saved = max(state.saved, last)  # loaded blocks are in the mesh already

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = MemkvConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            # Blocks vLLM had locally were saved by whoever computed them.
            state.saved = max(state.saved, new.num_computed_tokens // self.block_size)
            self._add_save(meta, new.req_id, state, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            self._add_save(meta, req_id, state, cached.num_computed_tokens[i] + sched.get(req_id, 0))
        return meta

    def _add_save(self, meta: MemkvConnectorMetadata, req_id: str, state: _ReqState, done_tokens: int) -> None:
        if state.skip_save:
            return
        hashes = state.request.block_hashes
        full = min(done_tokens // self.block_size, len(hashes), len(state.block_ids))
        if full > state.saved:
            meta.saves.append(
                _Transfer(req_id, state.block_ids[state.saved : full], list(hashes[state.saved : full]))
            )
            state.saved = full

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ---- worker side --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for name, kv in kv_caches.items():
            self._remember(name, kv)
        self._daemon.get()  # connect now, not in the first load (a failure only warns)

    def _remember(self, name: str, kv: torch.Tensor) -> None:
        if name in self._kv:
            return
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        dim = 0
        if num_blocks is not None and kv.shape[0] != num_blocks:
            dims = [d for d, n in enumerate(kv.shape) if n == num_blocks]
            dim = dims[0] if dims else 0
        self._kv[name] = kv
        self._block_dim[name] = dim

    def _layers(self, forward_context: Any = None) -> list[str]:
        if not self._kv and forward_context is not None:
            for name, layer in getattr(forward_context, "no_compile_layers", {}).items():
                kv = getattr(layer, "kv_cache", None)
                if isinstance(kv, list | tuple) and kv:
                    kv = kv[0]
                if isinstance(kv, torch.Tensor) and kv.numel():
                    self._remember(name, kv)
        return list(self._kv)

    def _slice(self, name: str, block_id: int) -> torch.Tensor:
        return self._kv[name].select(self._block_dim[name], block_id)

    def _block_nbytes(self, layers: list[str]) -> int:
        return sum(self._slice(n, 0).numel() * self._kv[n].element_size() for n in layers)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, MemkvConnectorMetadata) or not meta.loads:
            return
        block_ids = [b for t in meta.loads for b in t.block_ids]
        t0 = time.perf_counter()
        try:
            self._load(meta.loads, self._layers(forward_context))
        except Exception as e:  # noqa: BLE001 - never raise into vLLM: recompute instead
            logger.warning("memkv-mesh: loading %d blocks failed (%s); vLLM recomputes them", len(block_ids), e)
            self._load_errors.update(block_ids)
            self.stats["failed_blocks"] += len(block_ids)
        self.stats["load_seconds"] += time.perf_counter() - t0

    def _load(self, loads: list[_Transfer], layers: list[str]) -> None:
        block_ids = [b for t in loads for b in t.block_ids]
        if not layers:
            raise RuntimeError("no KV cache tensors registered")
        client = self._daemon.get()
        if client is None:
            raise ConnectionError("the daemon is unavailable")
        nbytes = self._block_nbytes(layers)
        # Straight into each layer's block slot where those are host memory (the CPU backend);
        # else (GPU caches) through a host staging buffer and a copy per layer.
        direct = self._host_slices(layers, block_ids)
        staging = None if direct is not None else torch.empty((len(block_ids), nbytes), dtype=torch.uint8)
        try:
            got = client.get_many_into(
                self._keys([h for t in loads for h in t.hashes]),
                direct if direct is not None else list(staging.numpy()),  # type: ignore[union-attr]
            )
        except Exception as e:
            self._daemon.failed(e)
            raise
        self._daemon.ok()
        failed: set[int] = set()
        i = 0
        for t in loads:
            broken = False
            for b in t.block_ids:
                # A block after a missing one is useless too: its attention needs the whole prefix.
                broken = broken or got[i] != nbytes
                if broken:
                    failed.add(b)  # a slot written anyway is recomputed by vLLM
                elif staging is not None:
                    self._scatter(layers, b, staging[i])
                i += 1
        self.stats["loaded_blocks"] += len(block_ids) - len(failed)
        if failed:
            self.stats["failed_blocks"] += len(failed)
            self._load_errors.update(failed)
            logger.warning("memkv-mesh: %d of %d blocks were not in the mesh any more; vLLM recomputes them",
                           len(failed), len(block_ids))

    def _host_slices(self, layers: list[str], block_ids: list[int]) -> list[list[Any]] | None:
        """Per block, its slot in each layer as a writable host buffer (numpy, sharing the
        tensor's memory), or None when some slot is on a device or not contiguous."""
        out: list[list[Any]] = []
        for b in block_ids:
            row = []
            for name in layers:
                sl = self._slice(name, b)
                if sl.device.type != "cpu" or not sl.is_contiguous():
                    return None
                row.append(sl.view(-1).view(torch.uint8).numpy())
            out.append(row)
        return out

    def _scatter(self, layers: list[str], block_id: int, data: torch.Tensor) -> None:
        off = 0
        for name in layers:
            dst = self._slice(name, block_id)
            n = dst.numel() * dst.element_size()
            dst.copy_(data[off : off + n].view(dst.dtype).view(dst.shape))
            off += n

    def _gather(self, layers: list[str], block_id: int) -> torch.Tensor:
        parts = [self._slice(n, block_id).contiguous().view(-1).view(torch.uint8) for n in layers]
        return torch.cat(parts).cpu()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads synchronously, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        # The blocks are read in wait_for_save, once every layer has written them; remember the
        # tensor in case register_kv_caches was not called.
        if isinstance(kv_layer, torch.Tensor):
            self._remember(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, MemkvConnectorMetadata) or not meta.saves:
            return
        saves = meta.saves
        n = sum(len(t.block_ids) for t in saves)
        t0 = time.perf_counter()
        try:
            layers = self._layers()
            if not layers:
                raise RuntimeError("no KV cache tensors registered")
            client = self._daemon.get()
            if client is None:
                self.stats["skipped_save_blocks"] += n
                return
            block_ids = [b for t in saves for b in t.block_ids]
            # Gathered by the client straight from each layer's slot where those are host memory.
            slices = self._host_slices(layers, block_ids)
            values: list[Any] = (
                list(slices) if slices is not None else [self._gather(layers, b).numpy() for b in block_ids]
            )
            try:
                client.put_many(self._keys([h for t in saves for h in t.hashes]), values)
            except Exception as e:
                self._daemon.failed(e)
                raise
            self._daemon.ok()
            self.stats["saved_blocks"] += n
        except Exception as e:  # noqa: BLE001 - a lost save is only a future miss
            self.stats["skipped_save_blocks"] += n
            logger.warning("memkv-mesh: saving %d blocks failed (%s)", n, e)
        finally:
            self.stats["save_seconds"] += time.perf_counter() - t0

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """What changed since the last call (vLLM sums it over workers and log intervals)."""
        delta = {k: v - self._reported.get(k, 0) for k, v in self.stats.items()}
        if not any(delta.values()):
            return None
        self._reported = dict(self.stats)
        return MemkvConnectorStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return MemkvConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """The connector's counters as Prometheus series on vLLM's ``/metrics``:
        ``vllm:memkv_<field>_total`` for each of ``STAT_FIELDS`` (``STAT_HELP``)."""
        return MemkvPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        self._daemon.close()


class MemkvPromMetrics(KVConnectorPromMetrics):
    """One counter per connector statistic, with vLLM's labels (model name, engine index)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for name in STAT_FIELDS:
            counter = self._counter_cls(name=f"vllm:memkv_{name}", documentation=STAT_HELP[name],
                                        labelnames=labelnames)  # fmt: skip
            self._counters[name] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            per_engine = self._counters.get(name)
            if per_engine is not None and engine_idx in per_engine and value > 0:
                per_engine[engine_idx].inc(value)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialised: a single worker
        return 0
