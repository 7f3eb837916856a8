"""LMCache remote storage plugin: LMCache (and through it vLLM and SGLang) keeps chunks in memkv-mesh.

Configuration (LMCache's remote storage plugin framework; one entry, no LMCache patch)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5          # LMCache stages remote reads in its CPU buffer
    remote_storage_plugins: ["memkv"]
    extra_config:
      remote_storage_plugin.memkv.module_path: memkv_mesh.integrations.lmcache
      remote_storage_plugin.memkv.class_name: MemkvConnectorAdapter
      # optional: the node daemon's socket (default: $MEMKV_SOCKET, else .memkv/memkv.sock)
      remote_storage_plugin.memkv.socket: /run/memkv/memkv.sock
      # optional: keep tenants apart (part of the namespace)
      remote_storage_plugin.memkv.tenant: ""

``class_name: MemkvConnector`` works as well (LMCache then wraps the connector class itself), and
the legacy ``remote_url: memkv:///run/memkv/memkv.sock`` is understood by the adapter.

Theory of operation
-------------------
* The connector talks only to the daemon on its own node, through the shared-memory client; the
  mesh does the rest (replication, remote fetches). The logic lives in ``chunk_store.ChunkStore``:
  LMCache key string -> keyed BLAKE2b 32-byte key; block = LMCache's remote metadata header (when
  ``save_chunk_meta``, LMCache's default) + the chunk's bytes.
* ``put``/``batched_put`` and ``get``/``batched_get`` copy in a worker thread (the LMCache event
  loop stays free); ``batched_get`` and ``batched_async_contains``/``batched_contains`` are one
  daemon round trip for the whole batch, and the contains calls return the prefix hit count
  LMCache asks for. A block whose header or size does not match what LMCache expects is a miss.
* ``list`` returns the keys this process stored or found that the daemon still holds (the daemon
  indexes hashes, so it cannot list LMCache's key strings).
"""

from __future__ import annotations

import asyncio
import builtins
import os
from pathlib import Path
from typing import Any

try:
    from lmcache.logging import init_logger
    from lmcache.v1.memory_management import MemoryObj
    from lmcache.v1.protocol import RemoteMetadata
    from lmcache.v1.storage_backend.connector import (
        ConnectorAdapter,
        ConnectorContext,
        extract_plugin_type,
    )
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memkv_mesh.integrations.lmcache needs LMCache: pip install 'memkv-mesh[lmcache]'"
    ) from e

from memkv_mesh.client import Client, default_socket_path
from memkv_mesh.integrations.chunk_store import ChunkStore

__all__ = ["PLUGIN_TYPE", "MemkvConnector", "MemkvConnectorAdapter"]

logger = init_logger(__name__)

PLUGIN_TYPE = "memkv"
_SCHEME = "memkv://"


def _setting(config: Any, plugin_name: str | None, field: str) -> Any:
    extra = getattr(config, "extra_config", None) or {}
    return extra.get(f"remote_storage_plugin.{plugin_name or PLUGIN_TYPE}.{field}")


class MemkvConnector(RemoteConnector):
    """An LMCache ``RemoteConnector`` backed by the local memkv-mesh daemon."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: Any,
        config: Any,
        plugin_name: str | None = None,
        socket_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        path = socket_path or _setting(config, plugin_name, "socket")
        self.socket_path = Path(path) if path else default_socket_path()
        tenant = _setting(config, plugin_name, "tenant") or ""
        if not isinstance(tenant, str):
            raise ValueError(f"remote_storage_plugin.{plugin_name or PLUGIN_TYPE}.tenant must be a string, got {tenant!r}")
        self.client = Client(self.socket_path, name="lmcache")
        header = self.remote_metadata_bytes if self.save_chunk_meta else 0
        self.store = ChunkStore(self.client, tenant=tenant, header_bytes=header)
        logger.info(
            "memkv-mesh connector on %s (node %s, chunk %d bytes, header %d bytes)",
            self.socket_path, self.client.node_id, self.full_chunk_size_bytes, header,
        )  # fmt: skip

    # ---- sync helpers (run in a worker thread for anything that copies) ------------------------
    def _header_of(self, memory_obj: MemoryObj) -> bytes:
        if not self.save_chunk_meta:
            return b""
        meta = RemoteMetadata(
            len(memory_obj.byte_array),
            memory_obj.get_shapes(),
            memory_obj.get_dtypes(),
            memory_obj.get_memory_format(),
        )
        return bytes(meta.serialize())

    def _put_sync(self, keys: builtins.list[Any], memory_objs: builtins.list[MemoryObj]) -> int:
        # The caller (LMCache's InstrumentedRemoteConnector) drops its reference when we return.
        return self.store.put_many(
            [k.to_string() for k in keys],
            [m.byte_array for m in memory_objs],
            [self._header_of(m) for m in memory_objs],
        )

    def _allocate(self, i: int, header: memoryview, payload_len: int) -> tuple[Any, MemoryObj] | None:
        if self.save_chunk_meta:
            try:
                meta = RemoteMetadata.deserialize(bytes(header))
            except Exception as e:  # a foreign or torn header: a miss, never wrong bytes
                logger.warning("memkv-mesh: chunk %d has an unreadable header (%s); treating it as a miss", i, e)
                return None
            if meta.length != payload_len:
                logger.warning("memkv-mesh: chunk %d header says %d bytes, block holds %d; miss", i, meta.length, payload_len)
                return None
            obj = self.local_cpu_backend.allocate(meta.shapes, meta.dtypes, meta.fmt)
        else:
            if payload_len > self.full_chunk_size_bytes or payload_len % self.single_token_size:
                logger.warning("memkv-mesh: chunk %d is %d bytes, not a whole number of tokens; miss", i, payload_len)
                return None
            obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        if obj is None:
            logger.warning("memkv-mesh: LMCache's CPU buffer is full; chunk %d not read", i)
            return None
        if len(obj.byte_array) < payload_len:
            obj.ref_count_down()
            logger.warning("memkv-mesh: chunk %d is %d bytes, larger than its LMCache buffer; miss", i, payload_len)
            return None
        return obj.byte_array, obj

    def _get_sync(self, keys: builtins.list[Any]) -> builtins.list[MemoryObj | None]:
        names = [k.to_string() for k in keys]
        sizes: dict[int, int] = {}
        made: builtins.list[MemoryObj] = []

        def make(i: int, header: memoryview, plen: int) -> tuple[Any, MemoryObj] | None:
            sizes[i] = plen
            got = self._allocate(i, header, plen)
            if got is not None:
                made.append(got[1])
            return got

        try:
            objs: builtins.list[MemoryObj | None] = self.store.get_into(names, make)
        except BaseException:
            for m in made:  # give LMCache its buffers back; the error reaches LMCache as a miss
                m.ref_count_down()
            raise
        if not self.save_chunk_meta:
            objs = [None if o is None else self.reshape_partial_chunk(o, sizes[i]) for i, o in enumerate(objs)]
        return objs

    # ---- RemoteConnector -----------------------------------------------------------------------
    async def exists(self, key: Any) -> bool:
        return self.store.exists(key.to_string())

    def exists_sync(self, key: Any) -> bool:
        return self.store.exists(key.to_string())

    async def get(self, key: Any) -> MemoryObj | None:
        return (await self.loop.run_in_executor(None, self._get_sync, [key]))[0]

    async def put(self, key: Any, memory_obj: MemoryObj) -> None:
        await self.loop.run_in_executor(None, self._put_sync, [key], [memory_obj])

    async def list(self) -> builtins.list[str]:
        return await self.loop.run_in_executor(None, self.store.names)

    async def close(self) -> None:
        self.client.close()

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        try:
            self.client.stats()
        except (ConnectionError, OSError) as e:
            logger.warning("memkv-mesh: ping failed: %s", e)
            return 1
        return 0

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: builtins.list[Any]) -> builtins.list[MemoryObj | None]:
        return await self.loop.run_in_executor(None, self._get_sync, list(keys))

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: builtins.list[Any], memory_objs: builtins.list[MemoryObj]) -> None:
        await self.loop.run_in_executor(None, self._put_sync, list(keys), list(memory_objs))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: builtins.list[Any], pin: bool = False) -> int:
        return self.store.prefix_hits([k.to_string() for k in keys])

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: builtins.list[Any]) -> int:
        return self.store.prefix_hits([k.to_string() for k in keys])

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: builtins.list[Any]) -> builtins.list[MemoryObj]:
        objs = await self.loop.run_in_executor(None, self._get_sync, list(keys))
        out: builtins.list[MemoryObj] = []
        missed = False
        for o in objs:  # only the leading run of hits; release what follows a miss
            if o is None:
                missed = True
            elif missed:
                o.ref_count_down()
            else:
                out.append(o)
        return out

    def remove_sync(self, key: Any) -> bool:
        return self.store.delete([key.to_string()]) == 1

    def __repr__(self) -> str:
        return f"<MemkvConnector socket={self.socket_path}>"


class MemkvConnectorAdapter(ConnectorAdapter):
    """Makes ``MemkvConnector`` for ``plugin://memkv[.name]`` and ``memkv:///path/to.sock`` URLs."""

    def __init__(self) -> None:
        super().__init__(_SCHEME)

    def can_parse(self, url: str) -> bool:
        if url.startswith(_SCHEME):
            return True
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://") :]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        socket_path = None
        if context.url.startswith(_SCHEME):
            socket_path = context.url[len(_SCHEME) :] or None
        return MemkvConnector(
            context.loop,
            context.local_cpu_backend,
            context.config,
            plugin_name=context.plugin_name,
            socket_path=socket_path,
        )
