"""The LMCache remote storage plugin, against a real daemon.

``ChunkStore`` (the connector's logic) runs everywhere. The connector itself runs against the real
``lmcache`` package when it is installed: LMCache's own ``CreateStorageBackends`` builds the remote
backend from the plugin config entry, and its ``RemoteBackend`` drives put / contains / prefix
lookup / get / remove / close exactly as LMCache's storage manager does, with LMCache's CPU
buffer (``LocalCPUBackend``) allocating the chunks. Without lmcache those tests skip, saying so,
unless ``MEMKV_REQUIRE_LMCACHE=1`` (set by ``scripts/test`` for its LMCache stage), which makes a
missing or broken lmcache a failure.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from memkv_mesh.integrations.chunk_store import ChunkStore

pytestmark = [
    pytest.mark.slow,  # real daemon subprocesses
    # LMCache's OpenTelemetry logging set-up warns on every backend it builds; not ours to fix.
    pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated"),
]


@pytest.fixture
def node(daemon_process: Any) -> Any:
    return daemon_process("lm", store={"dram_bytes": 32 << 20, "max_block_bytes": 4 << 20})


# ---- ChunkStore: no LMCache needed ------------------------------------------------------------
def test_chunk_store_round_trip_prefix_and_names(node: Any) -> None:
    with node.client() as c:
        st = ChunkStore(c, header_bytes=8)
        rng = np.random.default_rng(3)
        names = [f"m@1@0@{i:04x}@float32" for i in range(5)]
        payloads = [rng.integers(0, 255, 1000 + i, dtype=np.uint8) for i in range(5)]
        headers = [i.to_bytes(8, "little") for i in range(5)]
        assert st.put_many(names[:3], payloads[:3], headers[:3]) == 3
        assert st.put_many(names[:3], payloads[:3], headers[:3]) == 0  # already stored
        assert st.prefix_hits(names) == 3
        assert st.exists(names[2]) and not st.exists(names[3])

        seen: list[tuple[int, bytes, int]] = []

        def make(i: int, header: memoryview, plen: int) -> tuple[Any, Any]:
            seen.append((i, bytes(header), plen))
            buf = np.zeros(plen + 5, dtype=np.uint8)
            return buf, buf

        got = st.get_into(names, make)
        assert [g is None for g in got] == [False, False, False, True, True]
        for i in range(3):
            assert np.array_equal(got[i][: payloads[i].size], payloads[i])
            assert seen[i] == (i, headers[i], payloads[i].size)
        assert sorted(st.names()) == sorted(names[:3])
        assert st.delete([names[1]]) == 1
        assert st.prefix_hits(names) == 1
        assert sorted(st.names()) == sorted([names[0], names[2]])


def test_chunk_store_keys_are_deterministic_and_tenant_scoped(node: Any) -> None:
    with node.client() as c:
        a, b, t = ChunkStore(c), ChunkStore(c), ChunkStore(c, tenant="other")
        assert a.key("x@1@0@ab@float16") == b.key("x@1@0@ab@float16")
        assert a.key("x@1@0@ab@float16") != t.key("x@1@0@ab@float16")
        assert a.key("x@1@0@ab@float16") != a.key("x@1@0@ac@float16")
        a.put("k", b"hello")
        assert t.prefix_hits(["k"]) == 0 and a.prefix_hits(["k"]) == 1


def test_chunk_store_refusals_are_misses_or_clear_errors(node: Any) -> None:
    with node.client() as c:
        st = ChunkStore(c, header_bytes=4)
        with pytest.raises(ValueError, match="header 0 is 3 bytes; this store's headers are 4"):
            st.put("a", b"xyz", b"abc")
        with pytest.raises(ValueError, match="2 names but 1 payloads"):
            st.put_many(["a", "b"], [b"x"])
        with pytest.raises(ValueError, match="non-empty string"):
            st.key("")
        st.put("a", b"payload", b"HDR!")
        # The caller may refuse a chunk (e.g. its header does not match): a miss.
        assert st.get_into(["a"], lambda i, h, n: None) == [None]
        with pytest.raises(ValueError, match="buffer 0 holds 2 bytes"):
            st.get_into(["a"], lambda i, h, n: (bytearray(2), 1))


# ---- the connector, against the real lmcache package ------------------------------------------
CHUNK = 16
KV_SHAPE = (2, 2, CHUNK, 2, 8)  # layers, K/V, chunk tokens, kv heads, head dim


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """LMCache runs its connectors on an asyncio loop in its own thread; so do we."""
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(10)
    lp.close()


def _backends(lmc: Any, sock: str, loop: asyncio.AbstractEventLoop, **extra: Any) -> tuple[Any, Any, Any]:
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend import CreateStorageBackends

    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.05,
        remote_serde="naive",
        remote_storage_plugins=["memkv"],
        extra_config={
            "remote_storage_plugin.memkv.module_path": "memkv_mesh.integrations.lmcache",
            "remote_storage_plugin.memkv.class_name": "MemkvConnectorAdapter",
            "remote_storage_plugin.memkv.socket": sock,
            **extra,
        },
    )
    md = LMCacheMetadata(
        model_name="tiny-llama", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.float32, kv_shape=KV_SHAPE, chunk_size=CHUNK,
    )  # fmt: skip
    backends = CreateStorageBackends(cfg, md, loop)
    return backends["RemoteBackend-memkv"], backends["LocalCPUBackend"], md


def _key(i: int) -> Any:
    import torch
    from lmcache.utils import CacheEngineKey

    return CacheEngineKey("tiny-llama", 1, 0, 0x1234_0000 + i, torch.float32)


def _chunk(local_cpu: Any, md: Any, seed: int, tokens: int = CHUNK) -> Any:
    import torch

    shape = md.get_shapes()[0]
    if tokens != CHUNK:
        shape = torch.Size([shape[0], shape[1], tokens, shape[3]])
    obj = local_cpu.allocate([shape], md.get_dtypes())
    assert obj is not None
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g))
    return obj


def _batched_put(remote: Any, keys: list[Any], objs: list[Any]) -> None:
    """``batched_submit_put_task`` and wait until LMCache reports every key written.

    It returns no future and (in 0.5.6) does not list batched keys in ``put_tasks``, so its
    per-key completion callback is the only reliable signal.
    """
    done: set[Any] = set()
    finished = threading.Event()

    def on_complete(key: Any) -> None:  # runs on the LMCache loop's thread
        done.add(key)
        if len(done) == len(keys):
            finished.set()

    remote.batched_submit_put_task(keys, objs, on_complete_callback=on_complete)
    assert finished.wait(20), f"batched put finished {len(done)} of {len(keys)} keys"


def test_lmcache_remote_backend_round_trip(lmc: Any, node: Any, loop: asyncio.AbstractEventLoop) -> None:
    import torch

    from memkv_mesh.integrations.lmcache import MemkvConnector

    remote, local_cpu, md = _backends(lmc, str(node.sock), loop)
    try:
        assert isinstance(remote.connection.getWrappedConnector(), MemkvConnector)
        keys = [_key(i) for i in range(4)]
        objs = [_chunk(local_cpu, md, i) for i in range(4)]
        want = [o.tensor.clone() for o in objs]
        _batched_put(remote, keys[:3], objs[:3])
        remote.submit_put_task(keys[3], objs[3]).result(20)  # single put
        for o in objs:
            o.ref_count_down()

        assert all(remote.contains(k) for k in keys)
        assert not remote.contains(_key(99))
        # The scheduler's prefix question: how many leading chunks are cached.
        probe = keys[:2] + [_key(99)] + keys[2:]
        hits = asyncio.run_coroutine_threadsafe(remote.batched_async_contains("req-1", probe), loop).result(20)
        assert hits == 2
        assert remote.connection.batched_contains(keys + [_key(99)]) == 4

        got = remote.batched_get_blocking(keys)
        assert all(g is not None for g in got)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.tensor, w)
            g.ref_count_down()
        one = remote.get_blocking(keys[1])
        assert one is not None and torch.equal(one.tensor, want[1])
        one.ref_count_down()
        assert remote.get_blocking(_key(99)) is None

        # Non-blocking batched get returns the leading run of hits only.
        part = asyncio.run_coroutine_threadsafe(
            remote.batched_get_non_blocking("req-2", [keys[0], keys[1], _key(99), keys[2]]), loop
        ).result(20)
        assert len(part) == 2 and torch.equal(part[1].tensor, want[1])
        for p in part:
            p.ref_count_down()

        listed = asyncio.run_coroutine_threadsafe(remote.connection.list(), loop).result(20)
        assert sorted(listed) == sorted(k.to_string() for k in keys)
        assert asyncio.run_coroutine_threadsafe(remote.connection.ping(), loop).result(20) == 0

        assert remote.remove(keys[0]) is True
        assert not remote.contains(keys[0])
        assert asyncio.run_coroutine_threadsafe(remote.batched_async_contains("req-3", keys), loop).result(20) == 0
    finally:
        remote.close()


def test_lmcache_partial_chunk_and_foreign_block(lmc: Any, node: Any, loop: asyncio.AbstractEventLoop) -> None:
    import torch

    remote, local_cpu, md = _backends(lmc, str(node.sock), loop)
    try:
        obj = _chunk(local_cpu, md, 7, tokens=5)  # the prompt's last, unfull chunk
        want = obj.tensor.clone()
        remote.submit_put_task(_key(0), obj).result(20)
        obj.ref_count_down()
        got = remote.get_blocking(_key(0))
        assert got is not None and got.tensor.shape == want.shape and torch.equal(got.tensor, want)
        got.ref_count_down()

        # A block under an LMCache key whose header does not describe it is a miss, not garbage.
        conn = remote.connection.getWrappedConnector()
        conn.store.put(_key(1).to_string(), b"\x00" * 64, b"\x01" * conn.store.header_bytes)
        assert remote.contains(_key(1))
        assert remote.get_blocking(_key(1)) is None
    finally:
        remote.close()


def test_lmcache_without_chunk_meta(lmc: Any, node: Any, loop: asyncio.AbstractEventLoop) -> None:
    import torch

    remote, local_cpu, md = _backends(lmc, str(node.sock), loop, save_chunk_meta=False)
    try:
        conn = remote.connection.getWrappedConnector()
        assert conn.store.header_bytes == 0
        obj = _chunk(local_cpu, md, 11)
        want = obj.tensor.clone()
        remote.submit_put_task(_key(5), obj).result(20)
        obj.ref_count_down()
        got = remote.get_blocking(_key(5))
        assert got is not None and torch.equal(got.tensor, want)
        got.ref_count_down()
    finally:
        remote.close()


def test_lmcache_connector_reports_a_missing_daemon(lmc: Any, tmp_path: Any, loop: asyncio.AbstractEventLoop) -> None:
    from lmcache.v1.storage_backend.connector import ConnectorContext

    from memkv_mesh.integrations.lmcache import MemkvConnectorAdapter

    ad = MemkvConnectorAdapter()
    assert ad.can_parse("plugin://memkv") and ad.can_parse("plugin://memkv.second")
    assert ad.can_parse("memkv:///run/memkv.sock") and not ad.can_parse("plugin://fs")
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.01)
    md = LMCacheMetadata("m", 1, 1, 0, 0, torch.float32, KV_SHAPE, chunk_size=CHUNK)
    ctx = ConnectorContext(f"memkv://{tmp_path}/nothing.sock", loop, LocalCPUBackend(cfg, md), cfg, md)
    with pytest.raises(ConnectionError, match="cannot connect to the memkv-mesh daemon"):
        ad.create_connector(ctx)
