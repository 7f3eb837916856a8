"""Integrations with inference engines and their caches.

Each lives in its own module and imports its framework only when imported itself, so
``import memkv_mesh`` never pulls in torch or LMCache:

* ``memkv_mesh.integrations.transformers``: ``CacheStore`` keeps a Hugging Face model's
  ``DynamicCache`` in memkv-mesh block by block, restores the longest cached prefix into a fresh
  cache and runs only the suffix (needs ``memkv-mesh[transformers]``).
* ``memkv_mesh.integrations.lmcache``: ``MemkvConnectorAdapter``/``MemkvConnector``, an LMCache remote
  storage plugin, so LMCache (and vLLM/SGLang through it) uses memkv-mesh as its remote backend
  (needs ``memkv-mesh[lmcache]``).
* ``memkv_mesh.integrations.lmcache_mp``: ``MemkvL2Adapter``, an L2 adapter plugin for LMCache's
  multi-process cache server (``--l2-adapter``), the plug point of vLLM's
  ``--kv-offloading-backend lmcache`` (needs ``memkv-mesh[lmcache]``).
* ``memkv_mesh.integrations.vllm``: ``MemkvConnector``, a native vLLM v1 KV connector (needs
  ``memkv-mesh[vllm]``).
* ``memkv_mesh.integrations.sglang``: ``MemkvHiCacheStorage``, an SGLang HiCache storage backend (``dynamic``,
  ``interface_v1``).
* ``memkv_mesh.integrations.chunk_store``: ``ChunkStore``, the connector's logic without LMCache
  (named chunks with a fixed-size header; no extra dependency).

See docs/integrations.md.
"""

__all__: list[str] = []
