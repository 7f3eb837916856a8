"""The SGLang HiCache storage backend, against real SGLang classes and a real daemon.

SGLang builds the backend exactly as ``--hicache-storage-backend dynamic`` does: its own
``StorageBackendFactory.create_backend("dynamic", HiCacheStorageConfig(extra_config=...), pool)``
imports ``memkv_mesh.integrations.sglang`` and checks the class is a ``HiCacheStorage``. The host
pool is a small stand-in with the page accessors of SGLang's MHA host pool (layer-first layout):
SGLang's real host pools need device KV buffers to be built. Without sglang these tests skip,
saying so, unless ``MEMKV_REQUIRE_SGLANG=1``, which makes a missing or broken sglang a failure.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,  # real daemon subprocesses
    # The backend reads leased (read-only) blocks through torch.frombuffer and filters this warning
    # for its module; pytest resets filters per test, so the tests repeat that filter.
    pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning"),
]

if os.environ.get("MEMKV_REQUIRE_SGLANG") == "1":
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str
else:
    torch = pytest.importorskip("torch", reason="torch is not installed (docs/integrations.md, SGLang HiCache)")
    _hs = pytest.importorskip(
        "sglang.srt.mem_cache.hicache_storage", reason="sglang is not installed (docs/integrations.md, SGLang HiCache)"
    )
    HiCacheStorage, HiCacheStorageConfig = _hs.HiCacheStorage, _hs.HiCacheStorageConfig
    StorageBackendFactory = pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory").StorageBackendFactory
    get_hash_str = pytest.importorskip("sglang.srt.mem_cache.utils").get_hash_str

from memkv_mesh.integrations.sglang import MemkvHiCacheStorage  # noqa: E402

PAGE = 4  # tokens per page
LAYERS, HEADS, DIM = 2, 2, 8


class HostPool:
    """SGLang's MHA host pool page accessors over a layer-first ``kv_buffer``, on the CPU."""

    def __init__(self, pages: int, dtype: Any = None) -> None:
        self.page_size = PAGE
        self.size = pages * PAGE
        self.dtype = dtype or torch.bfloat16
        self.layout = "layer_first"
        self.kv_buffer = torch.zeros((2, LAYERS, self.size, HEADS, DIM), dtype=self.dtype)

    def get_data_page(self, index: int, flat: bool = True) -> Any:
        page = self.kv_buffer[:, :, index : index + PAGE, :, :]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> Any:
        return torch.zeros((2, LAYERS, PAGE, HEADS, DIM), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: Any) -> None:
        self.kv_buffer[:, :, index : index + PAGE, :, :] = data_page.reshape(2, LAYERS, PAGE, HEADS, DIM)

    def fill(self, page: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer[:, :, page * PAGE : (page + 1) * PAGE] = torch.randn(
            (2, LAYERS, PAGE, HEADS, DIM), generator=g
        ).to(self.dtype)

    def page(self, page: int) -> Any:
        return self.kv_buffer[:, :, page * PAGE : (page + 1) * PAGE].clone()


def page_hashes(tokens: list[int]) -> list[str]:
    """SGLang's own chained page hashes of a token sequence, as its controller names pages."""
    out: list[str] = []
    for i in range(0, len(tokens), PAGE):
        out.append(get_hash_str(tokens[i : i + PAGE], out[-1] if out else None))
    return out


def indices(pages: list[int]) -> Any:
    """Host token indices of whole pages, as SGLang's controller passes them."""
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE, dtype=torch.int64) for p in pages])


def config(socket: Any, *, tenant: str = "", model: str = "org/model", tp_rank: int = 0, mla: bool = False) -> Any:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=False, model_name=model,
        extra_config={
            "backend_name": "memkv", "module_path": "memkv_mesh.integrations.sglang",
            "class_name": "MemkvHiCacheStorage", "interface_v1": 1, "socket": str(socket), "tenant": tenant,
        },
    )  # fmt: skip


def make_backend(pool: HostPool, socket: Any, **kw: Any) -> Any:
    """As SGLang's cache controller attaches a storage backend."""
    backend = StorageBackendFactory.create_backend("dynamic", config(socket, **kw), pool)
    backend.register_mem_pool_host(pool)
    return backend


@pytest.fixture
def node(daemon_process: Any) -> Any:
    return daemon_process("sg", store={"dram_bytes": 16 << 20, "max_block_bytes": 1 << 20})


def test_factory_builds_the_backend_from_the_dynamic_config(node: Any) -> None:
    backend = make_backend(HostPool(2), node.sock)
    try:
        assert isinstance(backend, MemkvHiCacheStorage) and isinstance(backend, HiCacheStorage)
        assert backend.mem_pool_host is not None
    finally:
        backend.close()


def test_v1_round_trip_and_leading_hits(node: Any) -> None:
    src = HostPool(8)
    for p in range(8):
        src.fill(p, seed=100 + p)
    writer = make_backend(src, node.sock)
    keys = page_hashes(list(range(1000, 1000 + 4 * PAGE)))
    assert len(set(keys)) == 4
    # pages of a request sit anywhere in the host pool
    assert writer.batch_set_v1(keys, indices([5, 2, 7, 0])) == [True] * 4
    assert writer.batch_exists(keys) == 4
    assert writer.batch_exists([keys[0], keys[1], "absent", keys[3]]) == 2  # leading hits only
    assert writer.batch_exists(["absent", *keys]) == 0
    assert writer.batch_exists([]) == 0

    # another process's backend (same model and rank) finds them, into other host slots
    dst = HostPool(8)
    reader = make_backend(dst, node.sock)
    try:
        got = reader.batch_get_v1([*keys, "absent"], indices([1, 3, 4, 6, 0]))
        assert got == [True, True, True, True, False]
        for src_page, dst_page in zip([5, 2, 7, 0], [1, 3, 4, 6], strict=True):
            assert torch.equal(dst.page(dst_page), src.page(src_page))
        assert torch.count_nonzero(dst.page(0)) == 0  # the miss wrote nothing
        # legacy interface: flat pages in and out
        flat = dst.get_dummy_flat_data_page()
        assert reader.get(keys[2], flat) is flat and torch.equal(flat, src.get_data_page(7 * PAGE))
        assert reader.exists(keys[3]) and not reader.exists("absent")
    finally:
        reader.close()
        writer.close()


def test_namespace_keeps_models_ranks_and_tenants_apart(node: Any) -> None:
    pool = HostPool(2)
    pool.fill(0, seed=1)
    base = make_backend(pool, node.sock)
    others = [
        make_backend(pool, node.sock, tenant="b"),
        make_backend(pool, node.sock, model="org/other"),
        make_backend(pool, node.sock, tp_rank=1),
    ]
    mla0 = make_backend(pool, node.sock, mla=True)
    mla1 = make_backend(pool, node.sock, mla=True, tp_rank=1)
    try:
        assert base.batch_set_v1(["p0"], indices([0])) == [True]
        assert base.batch_exists(["p0"]) == 1
        assert [o.batch_exists(["p0"]) for o in others] == [0, 0, 0]
        # MLA KV is the same on every TP rank: one shared copy
        assert mla0.batch_set_v1(["m0"], indices([0])) == [True]
        assert mla1.batch_exists(["m0"]) == 1 and base.batch_exists(["m0"]) == 0
    finally:
        for b in [base, *others, mla0, mla1]:
            b.close()


def test_a_page_of_another_size_is_a_miss(node: Any) -> None:
    pool = HostPool(2)
    pool.fill(0, seed=2)
    writer = make_backend(pool, node.sock)
    reader = make_backend(HostPool(2, dtype=torch.float32), node.sock)  # twice the bytes per page
    try:
        assert writer.batch_set_v1(["p"], indices([0])) == [True]
        assert reader.batch_exists(["p"]) == 1
        assert reader.batch_get_v1(["p"], indices([1])) == [False]
    finally:
        writer.close()
        reader.close()


def test_clear_deletes_what_it_stored(node: Any) -> None:
    pool = HostPool(2)
    pool.fill(0, seed=3)
    backend = make_backend(pool, node.sock)
    try:
        backend.batch_set_v1(["a", "b"], indices([0, 1]))
        assert backend.batch_exists(["a", "b"]) == 2
        backend.clear()
        assert backend.batch_exists(["a", "b"]) == 0
    finally:
        backend.close()


def test_a_daemon_that_is_down_is_a_miss_not_an_error(node: Any, short_dir: Any, caplog: Any) -> None:
    pool = HostPool(4)
    pool.fill(0, seed=4)
    nowhere = make_backend(pool, short_dir / "none.sock")  # never started
    assert nowhere.batch_exists(["a"]) == 0
    assert nowhere.batch_set_v1(["a"], indices([0])) == [False]
    assert nowhere.batch_get_v1(["a"], indices([1])) == [False]
    assert nowhere.get("a", pool.get_dummy_flat_data_page()) is None and not nowhere.exists("a")
    assert "cannot reach the memkv-mesh daemon" in caplog.text

    backend = make_backend(pool, node.sock)
    assert backend.batch_set_v1(["a"], indices([0])) == [True]
    node.kill()  # the daemon dies under a connected backend
    assert backend.batch_exists(["a"]) == 0
    assert backend.batch_get_v1(["a"], indices([1])) == [False]
    assert backend.batch_set_v1(["b"], indices([0])) == [False]
    assert torch.count_nonzero(pool.page(1)) == 0
    backend.close()
