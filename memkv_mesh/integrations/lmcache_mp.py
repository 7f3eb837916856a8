"""LMCache multi-process (MP) mode L2 adapter: an LMCache cache server keeps its L2 in memkv-mesh.

LMCache's MP mode (the standalone cache server that vLLM's ``--kv-offloading-backend lmcache`` and
LMCache's Kubernetes operator run) has no ``RemoteConnector``: its storage plug point is
``lmcache.v1.distributed.l2_adapters.base.L2AdapterInterface``, loaded through LMCache's ``plugin``
L2 adapter type. One ``--l2-adapter`` JSON entry, no LMCache patch::

    --l2-adapter '{"type": "plugin",
                   "module_path": "memkv_mesh.integrations.lmcache_mp",
                   "class_name": "MemkvL2Adapter",
                   "adapter_params": {"socket": "/run/memkv/memkv.sock", "tenant": ""}}'

LMCache finds ``MemkvL2AdapterConfig`` by name (``class_name`` + ``Config``) and builds it from
``adapter_params``: ``socket`` (default ``$MEMKV_SOCKET``, else ``.memkv/memkv.sock``), ``tenant``
(default ``""``, part of the key namespace) and ``num_workers`` (default 2).

Theory of operation
-------------------
* The adapter talks only to the daemon on its own node, through the shared-memory ``Client``; the
  mesh does the rest (replication, remote fetches). Keys: an LMCache ``ObjectKey`` is named
  ``model@kv_rank(8 hex)@object_group_id(hex)@chunk_hash(hex)[@cache_salt]`` (the layout of
  LMCache's own native connector) and ``ChunkStore.key`` turns that name into the 32-byte mesh key,
  exactly as the in-process plugin does (same keyed BLAKE2b, same ``lmcache`` namespace, so the
  tenant separates deployments). A block is the object's bytes (``MemoryObj.byte_array``), no
  header: in MP mode the caller hands over load buffers already shaped for the object.
* LMCache's interface is non-blocking: each ``submit_*`` call returns a task id at once and the
  work runs on a small thread pool; on completion the result is recorded and the operation's own
  event fd (three distinct fds) is signalled, and LMCache's controllers pop or query the result.
* Store: one ``contains`` round trip, then one ``put_many`` for the keys the daemon lacks (chunks
  already in the mesh are not copied again). A failed store (daemon full, connection lost) fails
  the whole task, as the interface asks. Load: one ``get_many`` round trip; each block is copied
  straight into LMCache's buffer; a block whose size is not the buffer's size is a miss, never
  wrong bytes.
* Lookup and lock: one ``get_many`` round trip whose read lease pins the hits in the daemon (a
  pinned block is neither evicted nor reused) until LMCache unlocks them; ``submit_unlock`` drops
  one hold per key and releases a lease when its last key is unlocked. Unlocking a key that holds
  no lock does nothing. ``close`` releases every lease still held (so does the daemon when the
  client goes away).
* Capacity: the daemon evicts by itself, so the adapter declares no capacity
  (``supports_global_eviction`` is False) and LMCache never evicts from it by usage. The byte
  counts behind ``get_usage`` are what this adapter stored and deleted, not what is resident.
  ``delete`` removes the chunks mesh-wide.

Public API: ``MemkvL2Adapter``, ``MemkvL2AdapterConfig``, ``object_key_name``.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from lmcache.lmcache_native import Bitmap
    from lmcache.logging import init_logger
    from lmcache.v1.distributed.internal_api import L2StoreResult
    from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface
    from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
    from lmcache.v1.platform import create_event_notifier
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memkv_mesh.integrations.lmcache_mp needs LMCache: pip install 'memkv-mesh[lmcache]'"
    ) from e

from memkv_mesh.client import Client, default_socket_path
from memkv_mesh.integrations.chunk_store import ChunkStore

__all__ = ["MemkvL2Adapter", "MemkvL2AdapterConfig", "object_key_name"]

logger = init_logger(__name__)

# Sizes of chunks this adapter stored, for the byte accounting of ``delete``; bounded (oldest
# forgotten first), since the daemon evicts without telling us.
_SIZE_MEMORY = 1 << 20


def object_key_name(key: Any) -> str:
    """The chunk name of an LMCache ``ObjectKey`` (``model@rank@group@hash[@salt]``)."""
    name = f"{key.model_name}@{key.kv_rank:08x}@{key.object_group_id:x}@{key.chunk_hash.hex()}"
    return f"{name}@{key.cache_salt}" if key.cache_salt else name


class MemkvL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params`` of the plugin entry: ``socket``, ``tenant``, ``num_workers``."""

    def __init__(self, socket: str | None = None, tenant: str = "", num_workers: int = 2) -> None:
        self.socket = socket
        self.tenant = tenant
        self.num_workers = num_workers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemkvL2AdapterConfig:
        unknown = set(d) - {"type", "socket", "tenant", "num_workers"}
        if unknown:
            raise ValueError(f"unknown memkv L2 adapter field(s): {', '.join(sorted(unknown))}")
        socket = d.get("socket")
        if socket is not None and (not isinstance(socket, str) or not socket):
            raise ValueError(f"socket must be a non-empty string, got {socket!r}")
        tenant = d.get("tenant", "")
        if not isinstance(tenant, str):
            raise ValueError(f"tenant must be a string, got {tenant!r}")
        workers = d.get("num_workers", 2)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
            raise ValueError(f"num_workers must be a positive integer, got {workers!r}")
        return cls(socket=socket, tenant=tenant, num_workers=workers)

    @classmethod
    def help(cls) -> str:
        return (
            "memkv-mesh L2 adapter (adapter_params of a 'plugin' entry):\n"
            "- socket (str): the node daemon's Unix socket (default $MEMKV_SOCKET, else .memkv/memkv.sock)\n"
            "- tenant (str): key namespace, keeps deployments apart (default '')\n"
            "- num_workers (int): threads running store/lookup/load tasks (default 2)"
        )


class _Pin:
    """One lookup's read lease, held until each of its hits is unlocked."""

    __slots__ = ("holds", "lease")

    def __init__(self, lease: Any, holds: int) -> None:
        self.lease = lease
        self.holds = holds


class MemkvL2Adapter(L2AdapterInterface):
    """An LMCache MP-mode L2 adapter backed by the local memkv-mesh daemon."""

    def __init__(self, config: MemkvL2AdapterConfig | dict[str, Any] | None = None, l1_memory_desc: Any = None) -> None:
        super().__init__(max_capacity_bytes=0)  # the daemon manages its own capacity
        if not isinstance(config, MemkvL2AdapterConfig):
            config = MemkvL2AdapterConfig.from_dict(dict(config or {}))
        self.config = config
        self.socket_path = Path(config.socket) if config.socket else default_socket_path()
        self.client = Client(self.socket_path, name="lmcache-mp")
        self.store = ChunkStore(self.client, tenant=config.tenant)
        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._pool = concurrent.futures.ThreadPoolExecutor(config.num_workers, thread_name_prefix="memkv-l2")
        self._lock = threading.Lock()
        self._next_id = 0
        self._stores: dict[int, Any] = {}
        self._lookups: dict[int, Any] = {}
        self._loads: dict[int, Any] = {}
        self._sizes: OrderedDict[Any, int] = OrderedDict()
        self._pins: dict[Any, list[_Pin]] = {}
        self._closed = False
        logger.info("memkv-mesh L2 adapter on %s (node %s, tenant %r)", self.socket_path, self.client.node_id, config.tenant)

    # ---- event fds ---------------------------------------------------------------------------------
    def get_store_event_fd(self) -> int:
        return int(self._store_efd.fileno())

    def get_lookup_and_lock_event_fd(self) -> int:
        return int(self._lookup_efd.fileno())

    def get_load_event_fd(self) -> int:
        return int(self._load_efd.fileno())

    # ---- task plumbing -----------------------------------------------------------------------------
    def _submit(self, run: Callable[[], Any], results: dict[int, Any], efd: Any, failed: Callable[[], Any]) -> int:
        with self._lock:
            if self._closed:
                raise RuntimeError("the memkv L2 adapter is closed")
            task_id = self._next_id
            self._next_id += 1

        def task() -> None:
            try:
                result = run()
            except Exception as e:  # the task fails; LMCache sees a failed store or all-miss bitmap
                logger.warning("memkv-mesh L2 task %d failed: %s", task_id, e)
                result = failed()
            with self._lock:
                results[task_id] = result
            efd.notify()

        self._pool.submit(task)
        return task_id

    # ---- store -------------------------------------------------------------------------------------
    def submit_store_task(self, keys: list[Any], objects: list[Any]) -> int:
        if len(keys) != len(objects):
            raise ValueError(f"{len(keys)} keys but {len(objects)} objects")
        keys, objects = list(keys), list(objects)
        return self._submit(lambda: self._store_sync(keys, objects), self._stores, self._store_efd,
                            lambda: L2StoreResult(False, 0))  # fmt: skip

    def _store_sync(self, keys: list[Any], objects: list[Any]) -> Any:
        if not keys:
            return L2StoreResult(True, 0)
        names = [object_key_name(k) for k in keys]
        present = self.client.contains([self.store.key(n) for n in names])
        todo = [i for i, p in enumerate(present) if not p]
        if not todo:
            return L2StoreResult(True, 0)
        payloads = [objects[i].byte_array for i in todo]
        sizes = [memoryview(p).nbytes for p in payloads]
        self.store.put_many([names[i] for i in todo], payloads)
        stored = [keys[i] for i in todo]
        with self._lock:
            for k, s in zip(stored, sizes, strict=True):
                self._sizes[k] = s
                self._sizes.move_to_end(k)
            while len(self._sizes) > _SIZE_MEMORY:
                self._sizes.popitem(last=False)
        self._notify_keys_stored(stored, sizes)
        return L2StoreResult(True, sum(sizes))

    def pop_completed_store_tasks(self) -> dict[int, Any]:
        with self._lock:
            done, self._stores = self._stores, {}
        return done

    # ---- lookup ------------------------------------------------------------------------------------
    def submit_lookup_and_lock_task(self, keys: list[Any], group_layout_descs: dict[int, Any] | None = None) -> int:
        keys = list(keys)
        return self._submit(lambda: self._lookup_sync(keys), self._lookups, self._lookup_efd, lambda: Bitmap(len(keys)))

    def _lookup_sync(self, keys: list[Any]) -> Any:
        bitmap = Bitmap(len(keys))
        if not keys:
            return bitmap
        lease = self.client.get_many([self.store.key(object_key_name(k)) for k in keys])
        hits = [i for i, v in enumerate(lease.views) if v is not None]
        if not hits:
            lease.release()
            return bitmap
        pin = _Pin(lease, len(hits))
        with self._lock:
            for i in hits:
                self._pins.setdefault(keys[i], []).append(pin)
        for i in hits:
            bitmap.set(i)
        return bitmap

    def query_lookup_and_lock_result(self, task_id: int) -> Any:
        with self._lock:
            return self._lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[Any]) -> None:
        """Drop one lock per key; a lookup's lease is released when its last hit is unlocked."""
        done: list[Any] = []
        with self._lock:
            for k in keys:
                pins = self._pins.get(k)
                if not pins:
                    continue
                pin = pins.pop()
                if not pins:
                    del self._pins[k]
                pin.holds -= 1
                if pin.holds == 0:
                    done.append(pin.lease)
        for lease in done:
            self._release(lease)

    @staticmethod
    def _release(lease: Any) -> None:
        try:
            lease.release()
        except (ConnectionError, OSError) as e:  # the daemon frees a lost client's leases itself
            logger.warning("memkv-mesh: releasing a lease failed: %s", e)

    def locked_keys(self) -> int:
        """How many keys hold at least one lock (for tests and status)."""
        with self._lock:
            return len(self._pins)

    # ---- load --------------------------------------------------------------------------------------
    def submit_load_task(self, keys: list[Any], objects: list[Any]) -> int:
        if len(keys) != len(objects):
            raise ValueError(f"{len(keys)} keys but {len(objects)} objects")
        keys, objects = list(keys), list(objects)
        return self._submit(lambda: self._load_sync(keys, objects), self._loads, self._load_efd, lambda: Bitmap(len(keys)))

    def _load_sync(self, keys: list[Any], objects: list[Any]) -> Any:
        bitmap = Bitmap(len(keys))
        if not keys:
            return bitmap

        def into(i: int, header: memoryview, plen: int) -> tuple[Any, bool] | None:
            dst = objects[i].byte_array
            if memoryview(dst).nbytes != plen:
                logger.warning("memkv-mesh: chunk %s is %d bytes, its buffer %d; miss",
                               object_key_name(keys[i]), plen, memoryview(dst).nbytes)  # fmt: skip
                return None
            return dst, True

        got = self.store.get_into([object_key_name(k) for k in keys], into)
        hits = [k for k, g in zip(keys, got, strict=True) if g]
        for i, g in enumerate(got):
            if g:
                bitmap.set(i)
        if hits:
            self._notify_keys_accessed(hits)
        return bitmap

    def query_load_result(self, task_id: int) -> Any:
        with self._lock:
            return self._loads.pop(task_id, None)

    # ---- eviction, status, close -------------------------------------------------------------------
    def delete(self, keys: list[Any]) -> None:
        """Delete the chunks mesh-wide (LMCache calls this from its eviction policies)."""
        keys = list(keys)
        if not keys:
            return
        self.store.delete([object_key_name(k) for k in keys])
        with self._lock:
            sizes = [self._sizes.pop(k, 0) for k in keys]
        known = [(k, s) for k, s in zip(keys, sizes, strict=True) if s]
        if known:
            self._notify_keys_deleted([k for k, _ in known], [s for _, s in known])

    def report_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"type": "MemkvL2Adapter", "socket": str(self.socket_path),
                                  "node_id": self.client.node_id, "tenant": self.config.tenant,
                                  "locked_keys": self.locked_keys()}  # fmt: skip
        try:
            stats = self.client.stats()
        except (ConnectionError, OSError) as e:
            return {**status, "is_healthy": False, "error": str(e)}
        return {**status, "is_healthy": True, "daemon": stats}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            pins = {id(p): p for ps in self._pins.values() for p in ps}
            self._pins.clear()
        for p in pins.values():
            self._release(p.lease)
        self.client.close()
        for efd in (self._store_efd, self._lookup_efd, self._load_efd):
            efd.close()

    def __repr__(self) -> str:
        return f"<MemkvL2Adapter socket={self.socket_path} pid={os.getpid()}>"
