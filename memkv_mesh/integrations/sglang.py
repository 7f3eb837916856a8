"""SGLang HiCache storage backend: SGLang's L3 KV-cache tier kept in memkv-mesh.

Command line (SGLang's dynamic backend loader; no SGLang patch)::

    python -m sglang.launch_server --model-path <model> --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "memkv",
          "module_path": "memkv_mesh.integrations.sglang", "class_name": "MemkvHiCacheStorage",
          "interface_v1": 1, "socket": "/run/memkv/memkv.sock", "tenant": ""}'

``interface_v1: 1`` makes SGLang call ``batch_get_v1``/``batch_set_v1`` with host-pool indices
(the other keys are optional: ``socket`` defaults to $MEMKV_SOCKET, else .memkv/memkv.sock;
``tenant`` keeps tenants apart; ``timeout`` is the client's socket timeout in seconds).

Theory of operation
-------------------
* One SGLang page is one mesh block. SGLang names a page with a hash string that already chains
  the whole prefix; the block key is ``BLAKE2b-256(key=namespace, person="memkv-sglang-v1", hash)``
  where the namespace (``keys.namespace``) covers the model, the TP rank and size (one shared rank
  for MLA models, whose KV is the same on every TP rank), the PP and attention-CP shard, and the
  tenant. Keyed and deterministic: every process on every node maps a page to the same key.
* ``batch_exists`` is one ``lookup`` round trip and returns how many leading pages the daemon
  holds, which is what SGLang's prefetch asks.
* ``batch_set_v1`` reads each page out of the host pool (``get_data_page(index, flat=True)``,
  index = ``host_indices[i * page_size]``) and stores the batch with one ``put_many``.
  ``batch_get_v1`` leases the blocks in place (one round trip) and copies each into the host pool
  with ``set_from_flat_data_page``; a block whose size is not one page of this pool is a miss.
  These accessors exist on every SGLang host pool and layout, so no layout is special-cased.
* The daemon is a cache, never a dependency: if it is down or the connection breaks, every lookup
  is a miss and every write fails softly (``False``), with a warning at most every 30 s; the
  backend reconnects on a later call (at most every 5 s). No memkv error reaches SGLang.

Public API: ``MemkvHiCacheStorage``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from typing import Any

try:
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memkv_mesh.integrations.sglang needs SGLang's HiCache classes and torch "
        "(docs/integrations.md, 'SGLang HiCache', lists a CPU-only install)"
    ) from e

from memkv_mesh.client import Client, MemkvError
from memkv_mesh.keys import KEY_BYTES, namespace

__all__ = ["MemkvHiCacheStorage"]

logger = logging.getLogger(__name__)

_PERSON = b"memkv-sglang-v1"
_RECONNECT_S = 5.0
_WARN_EVERY_S = 30.0
# What a failing daemon or connection raises out of the client.
_SOFT_ERRORS = (ConnectionError, OSError, MemkvError, TimeoutError)
# A leased block is a read-only view: torch warns on wrapping it, though it is only read here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


def _namespace(config: HiCacheStorageConfig | None, tenant: str) -> bytes:
    if config is None:
        return namespace("sglang", tenant=tenant)
    model = (config.model_name or "unnamed").replace("\x00", "")
    tp_rank, tp_size = (0, 1) if config.is_mla_model else (config.tp_rank, config.tp_size)
    shard = f"sglang-hicache/pp{config.pp_rank}of{config.pp_size}/cp{config.attn_cp_rank}of{config.attn_cp_size}"
    if getattr(config, "dcp_size", 1) > 1:
        shard += f"/dcp{config.dcp_rank}of{config.dcp_size}"
    return namespace(model, tp_rank=tp_rank, tp_size=tp_size, layers=shard, tenant=tenant)


class MemkvHiCacheStorage(HiCacheStorage):
    """A HiCache L3 backend over the node's memkv-mesh daemon (SGLang's v1 interface)."""

    def __init__(self, storage_config: HiCacheStorageConfig | None = None, kwargs: Any = None) -> None:
        extra = dict((storage_config.extra_config if storage_config is not None else None) or {})
        self.socket_path: str | None = extra.get("socket") or None
        self.timeout = float(extra.get("timeout", 30.0))
        self.ns = _namespace(storage_config, str(extra.get("tenant", "")))
        self.mem_pool_host: Any = None
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._next_connect = 0.0
        self._last_warning = -_WARN_EVERY_S
        self._stored: set[bytes] = set()
        self._page_shape: tuple[torch.dtype, int] | None = None
        self._connect()

    # ---- connection ----------------------------------------------------------------------------
    def _warn(self, what: str, err: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            logger.warning("memkv HiCache backend: %s (%s); treating it as a miss", what, err)

    def _connect(self) -> Client | None:
        with self._lock:
            if self._client is not None:
                return self._client
            now = time.monotonic()
            if now < self._next_connect:
                return None
            self._next_connect = now + _RECONNECT_S
            try:
                self._client = Client(self.socket_path, timeout=self.timeout, name="sglang-hicache")
            except (*_SOFT_ERRORS, ValueError) as e:
                self._warn("cannot reach the memkv-mesh daemon", e)
                return None
            return self._client

    def _drop(self, client: Client, what: str, err: BaseException) -> None:
        self._warn(what, err)
        with self._lock:
            if self._client is client:
                self._client = None
                self._next_connect = time.monotonic() + _RECONNECT_S
        try:
            client.close()
        except Exception:  # noqa: BLE001 - already broken; closing is best effort
            pass

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # ---- keys and pages ------------------------------------------------------------------------
    def key(self, page_hash: str) -> bytes:
        return hashlib.blake2b(str(page_hash).encode(), digest_size=KEY_BYTES, key=self.ns, person=_PERSON).digest()

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._page_shape = None

    def _page_layout(self) -> tuple[torch.dtype, int]:
        """The host pool's flat page: its dtype and size in bytes."""
        if self._page_shape is None:
            dummy = self.mem_pool_host.get_dummy_flat_data_page()
            self._page_shape = (dummy.dtype, dummy.numel() * dummy.element_size())
        return self._page_shape

    def _page_indices(self, n: int, host_indices: Any) -> list[int]:
        page = int(self.mem_pool_host.page_size)
        if len(host_indices) < n * page:
            raise ValueError(f"{n} pages need {n * page} host indices, got {len(host_indices)}")
        firsts = host_indices[: n * page : page]  # each page's first token slot
        return [int(i) for i in (firsts.tolist() if hasattr(firsts, "tolist") else firsts)]

    @staticmethod
    def _as_bytes(page: torch.Tensor) -> Any:
        return page.detach().contiguous().view(-1).view(torch.uint8).numpy()

    # ---- v1 interface --------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages of ``keys`` the daemon holds (0 if it is unreachable)."""
        if not keys:
            return 0
        client = self._connect()
        if client is None:
            return 0
        try:
            return client.lookup([self.key(k) for k in keys])
        except _SOFT_ERRORS as e:
            self._drop(client, "lookup failed", e)
            return 0

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        if not keys:
            return []
        client = self._connect()
        if client is None:
            return [False] * len(keys)
        pages = [self._as_bytes(self.mem_pool_host.get_data_page(i, flat=True)) for i in self._page_indices(len(keys), host_indices)]
        ks = [self.key(k) for k in keys]
        try:
            client.put_many(ks, pages)
        except _SOFT_ERRORS as e:
            if isinstance(e, MemkvError):
                self._warn("store refused the pages", e)  # e.g. full: the connection is still good
            else:
                self._drop(client, "put failed", e)
            return [False] * len(keys)
        with self._lock:
            self._stored.update(ks)
        return [True] * len(keys)

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        if not keys:
            return []
        client = self._connect()
        if client is None:
            return [False] * len(keys)
        dtype, nbytes = self._page_layout()
        indices = self._page_indices(len(keys), host_indices)
        ok = [False] * len(keys)
        try:
            with client.get_many([self.key(k) for k in keys]) as lease:
                for i, view in enumerate(lease.views):
                    if view is None or view.nbytes != nbytes:
                        continue
                    page = torch.frombuffer(view, dtype=torch.uint8).view(dtype)
                    self.mem_pool_host.set_from_flat_data_page(indices[i], page)
                    ok[i] = True
        except _SOFT_ERRORS as e:
            self._drop(client, "get failed", e)
            return [False] * len(keys)
        return ok

    # ---- the older per-tensor interface (abstract in HiCacheStorage) ----------------------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Copy each page into its target tensor (SGLang passes flat dummy pages); None for a miss."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        client = self._connect() if keys else None
        if client is None:
            return out
        try:
            with client.get_many([self.key(k) for k in keys]) as lease:
                for i, view in enumerate(lease.views):
                    if view is None:
                        continue
                    target = target_locations[i] if target_locations is not None else None
                    if target is None:
                        out[i] = torch.frombuffer(bytearray(view), dtype=torch.uint8)
                        continue
                    flat = target.view(-1)
                    if flat.numel() * flat.element_size() != view.nbytes:
                        continue
                    flat.copy_(torch.frombuffer(view, dtype=torch.uint8).view(flat.dtype))
                    out[i] = target
        except _SOFT_ERRORS as e:
            self._drop(client, "get failed", e)
            return [None] * len(keys)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            return False
        client = self._connect()
        if client is None:
            return False
        ks = [self.key(k) for k in keys]
        try:
            client.put_many(ks, [self._as_bytes(v) for v in values])
        except _SOFT_ERRORS as e:
            if isinstance(e, MemkvError):
                self._warn("store refused the pages", e)
            else:
                self._drop(client, "put failed", e)
            return False
        with self._lock:
            self._stored.update(ks)
        return True

    def clear(self) -> None:
        """Delete the pages this backend stored (the daemon cannot list SGLang's page names)."""
        with self._lock:
            ks, self._stored = list(self._stored), set()
        client = self._connect() if ks else None
        if client is None:
            return
        try:
            client.delete(ks)
        except _SOFT_ERRORS as e:
            self._drop(client, "clear failed", e)
