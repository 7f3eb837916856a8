"""The GPU data path: classification, config, routing through the client, the kvikio backend.

Without a GPU everything CUDA-shaped here is a fake: "device memory" is host memory behind
``__cuda_array_interface__`` / ``__dlpack_device__``, and ``FakeRuntime`` stands in for cupy's
runtime. It queues copies and performs them only at ``synchronize()``, so code that reads the
arena (checksums) or hands buffers back before syncing fails these tests. Tests marked ``gpu``
run the real thing with cupy/torch and skip without /dev/nvidia0.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import xxhash

from memkv_mesh import gpu
from memkv_mesh.client import AsyncClient
from memkv_mesh.gpu import (
    DeviceSpan,
    GpuConfig,
    GpuPath,
    GpuUnavailableError,
    is_cuda,
    span_from_interface,
)
from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.nvme import NvmeTier
from memkv_mesh.nvme_kvikio import (
    KvikioBlockIO,
    KvikioConfig,
    kvikio_io_factory,
    read_block_to_device,
)


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * (KEY_BYTES // 4)


class FakeCudaArray:
    """Looks like a cupy array to duck typing: CUDA array interface, no buffer protocol."""

    def __init__(self, data: np.ndarray[Any, Any], *, readonly: bool = False, stream: int | None = None, strides: Any = None) -> None:
        self.host = data
        self._readonly = readonly
        self._stream = stream
        self._strides = strides

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.host.shape, "typestr": self.host.dtype.str, "data": (self.host.ctypes.data, self._readonly),
            "version": 3, "strides": self._strides, "stream": self._stream,
        }  # fmt: skip

    def __dlpack_device__(self) -> tuple[int, int]:
        return (gpu.DLPACK_CUDA, 0)


class FakeDLPackTensor:
    """Only DLPack (like a JAX array): the runtime's from_dlpack makes a FakeCudaArray."""

    def __init__(self, data: np.ndarray[Any, Any], device_type: int = gpu.DLPACK_CUDA) -> None:
        self.host = data
        self.device_type = device_type

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, 0)

    def __dlpack__(self, stream: Any = None) -> Any:
        raise AssertionError("the fake runtime converts directly")


class RaisingInterface:
    """Like a torch CPU tensor: the attribute exists on the type but raises."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor")


class FakeRuntime:
    def __init__(self, *, fail_register: bool = False) -> None:
        self.fail_register = fail_register
        self.registered: dict[int, int] = {}
        self.register_calls = 0
        self.unregister_calls = 0
        self.pending: list[tuple[int, int, int]] = []
        self.syncs = 0
        self.stream_syncs: list[int] = []

    def host_register(self, ptr: int, size: int) -> None:
        self.register_calls += 1
        if self.fail_register:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered-like refusal")
        self.registered[ptr] = size

    def host_unregister(self, ptr: int) -> None:
        self.unregister_calls += 1
        del self.registered[ptr]

    def memcpy_async(self, dst: int, src: int, size: int) -> None:
        self.pending.append((dst, src, size))

    def synchronize(self) -> None:
        self.syncs += 1
        for dst, src, size in self.pending:
            ctypes.memmove(dst, src, size)
        self.pending.clear()

    def stream_synchronize(self, stream: int) -> None:
        self.stream_syncs.append(stream)

    def from_dlpack(self, obj: Any) -> FakeCudaArray:
        return FakeCudaArray(obj.host)


def blob(n: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# ---- classification ---------------------------------------------------------------------------------


def test_classification_is_duck_typed() -> None:
    assert is_cuda(FakeCudaArray(np.zeros(4, np.uint8)))
    assert is_cuda(FakeDLPackTensor(np.zeros(4, np.uint8)))
    assert is_cuda(FakeDLPackTensor(np.zeros(4, np.uint8), gpu.DLPACK_CUDA_MANAGED))
    assert not is_cuda(FakeDLPackTensor(np.zeros(4, np.uint8), gpu.DLPACK_CUDA_HOST))
    assert not is_cuda(FakeDLPackTensor(np.zeros(4, np.uint8), gpu.DLPACK_CPU))
    assert not is_cuda(np.zeros(4, np.uint8))  # numpy has __dlpack_device__ == (1, 0)
    assert not is_cuda(b"abc")
    assert not is_cuda(RaisingInterface())
    assert not is_cuda(object())


def test_span_from_interface_checks_layout() -> None:
    a = np.zeros((4, 8), np.float16)
    cai = FakeCudaArray(a).__cuda_array_interface__
    s = span_from_interface(cai, "value 0")
    assert (s.ptr, s.nbytes, s.readonly) == (a.ctypes.data, 64, False)
    # Explicit C strides, and any stride on a dimension of size 1, are contiguous.
    assert span_from_interface({**cai, "strides": (16, 2)}, "v").nbytes == 64
    assert span_from_interface({**cai, "shape": (1, 8), "strides": (999, 2)}, "v").nbytes == 16
    with pytest.raises(ValueError, match="value 3 is not C-contiguous"):
        span_from_interface({**cai, "strides": (2, 8)}, "value 3")
    with pytest.raises(ValueError, match="masked"):
        span_from_interface({**cai, "mask": object()}, "v")
    with pytest.raises(ValueError, match="malformed"):
        span_from_interface({"shape": (4,), "typestr": "|u1"}, "v")
    with pytest.raises(ValueError, match="typestr"):
        span_from_interface({**cai, "typestr": "<fx"}, "v")
    with pytest.raises(ValueError, match="null device pointer"):
        span_from_interface({**cai, "data": (0, False)}, "v")
    assert span_from_interface({**cai, "shape": (0, 8), "data": (0, False)}, "v").nbytes == 0


def test_device_span_slices() -> None:
    s = DeviceSpan(0x1000, 100, False, None)
    t = s[10:30]
    assert (t.ptr, t.nbytes) == (0x1000 + 10, 20)
    assert s[:500].nbytes == 100
    with pytest.raises(ValueError, match="contiguous"):
        s[::2]
    with pytest.raises(TypeError):
        s[3]  # type: ignore[index]


# ---- config -------------------------------------------------------------------------------------------


def test_gpu_config_validation() -> None:
    assert GpuConfig() == GpuConfig(pin_arena=True, require_pinned=False)
    with pytest.raises(ValueError, match="require_pinned needs gpu.pin_arena"):
        GpuConfig(pin_arena=False, require_pinned=True)
    with pytest.raises(msgspec.ValidationError, match="pin_arna"):
        msgspec.convert({"pin_arna": True}, GpuConfig)
    with pytest.raises(msgspec.ValidationError, match="pin_arena"):
        msgspec.convert({"pin_arena": "yes"}, GpuConfig)


def test_kvikio_config_validation() -> None:
    assert KvikioConfig().compat_mode == "auto"
    with pytest.raises(msgspec.ValidationError, match="compat_mode"):
        msgspec.convert({"compat_mode": "maybe"}, KvikioConfig)
    with pytest.raises(ValueError, match="task_size"):
        KvikioConfig(task_size=100)
    with pytest.raises(msgspec.ValidationError, match="gds"):
        msgspec.convert({"gds": True}, KvikioConfig)


# ---- GpuPath on a plain arena -------------------------------------------------------------------------


def test_fill_checksums_after_the_copy_lands() -> None:
    arena = bytearray(1 << 16)
    rt = FakeRuntime()
    path = GpuPath(memoryview(arena), runtime=rt)
    assert rt.registered == {np.frombuffer(arena, np.uint8).ctypes.data: 1 << 16}
    dev = blob(3000, 1)
    host = blob(500, 2)
    slot_a, slot_b = memoryview(arena)[:3000], memoryview(arena)[4096 : 4096 + 500]
    sums = path.fill([(slot_a, DeviceSpan(dev.ctypes.data, 3000, True, dev)), (slot_b, host.data)])
    assert sums == [xxhash.xxh3_64_intdigest(dev.tobytes()), xxhash.xxh3_64_intdigest(host.tobytes())]
    assert bytes(arena[:3000]) == dev.tobytes()
    assert rt.syncs == 1  # one sync per batch
    st = path.statistics()
    assert (st.pinned, st.d2h_copies, st.d2h_bytes, st.h2d_copies) == (True, 1, 3000, 0)
    path.close()
    path.close()
    assert rt.registered == {} and rt.unregister_calls == 1
    assert path.statistics().closed and not path.statistics().pinned
    with pytest.raises(ConnectionError, match="closed"):
        path.fill([])


def test_pin_failure_is_kept_or_raised() -> None:
    arena = memoryview(bytearray(4096))
    path = GpuPath(arena, runtime=FakeRuntime(fail_register=True))
    st = path.statistics()
    assert not st.pinned and "cudaHostRegister of the 4096-byte arena failed" in st.pin_error
    with pytest.raises(GpuUnavailableError, match="require_pinned"):
        GpuPath(arena, GpuConfig(require_pinned=True), runtime=FakeRuntime(fail_register=True))
    rt = FakeRuntime()
    GpuPath(arena, GpuConfig(pin_arena=False), runtime=rt)
    assert rt.register_calls == 0


def test_span_syncs_the_producer_stream_and_checks_writability() -> None:
    rt = FakeRuntime()
    path = GpuPath(memoryview(bytearray(16)), runtime=rt)
    a = np.zeros(8, np.uint8)
    path.span(FakeCudaArray(a, stream=7), "value 0", writable=False)
    path.span(FakeCudaArray(a), "value 1", writable=False)
    assert rt.stream_syncs == [7]
    with pytest.raises(ValueError, match="buffer 2 is read-only"):
        path.span(FakeCudaArray(a, readonly=True), "buffer 2", writable=True)
    s = path.span(FakeDLPackTensor(a), "value 3", writable=True)
    assert (s.ptr, s.nbytes) == (a.ctypes.data, 8)


def test_missing_cupy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(GpuUnavailableError, match=r"install memkv-mesh\[gpu\]"):
        GpuPath(memoryview(bytearray(16)))


# ---- through a daemon ---------------------------------------------------------------------------------


async def test_put_and_get_cuda_buffers_through_the_arena(daemon) -> None:
    rt = FakeRuntime()
    async with await AsyncClient.connect(daemon.socket_path) as c:
        path = gpu.enable_gpu(c, runtime=rt)
        assert rt.register_calls == 1 and path.statistics().pinned_bytes == len(c._mmap or b"")
        vals = [blob(100_000, 1).view(np.float16), blob(7, 2)]
        host_val = blob(3000, 3)
        # Device and host values in one batch; float16 device array counts its bytes.
        n = await c.put_many([key(1), key(2), key(3)], [FakeCudaArray(vals[0]), FakeCudaArray(vals[1]), host_val])
        assert n == 3
        # The daemon's stored checksum is xxh3 of the arena bytes: a zero-copy get matches.
        lease = await c.get(key(1))
        assert lease is not None and bytes(lease.view) == vals[0].tobytes()
        lease.release()
        # Get into device buffers, one per key, with a miss.
        outs = [np.zeros(100_000, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8)]
        got = await c.get_many_into([key(1), key(9), key(2)], [FakeCudaArray(o) for o in outs])
        assert got == [100_000, None, 7]
        assert outs[0].tobytes() == vals[0].tobytes() and outs[2][:7].tobytes() == vals[1].tobytes()
        assert not outs[1].any()
        # One packed device buffer.
        packed = np.zeros(100_007 + 3000, np.uint8)
        assert await c.get_many_into([key(1), key(2), key(3)], FakeCudaArray(packed)) == [100_000, 7, 3000]
        assert packed.tobytes() == vals[0].tobytes() + vals[1].tobytes() + host_val.tobytes()
        # get_into a DLPack-only tensor.
        d = np.zeros(7, np.uint8)
        assert await c.get_into(key(2), FakeDLPackTensor(d)) == 7 and d.tobytes() == vals[1].tobytes()
        # Big batches run in a worker thread (AsyncClient) and still land.
        big = blob(6 << 20, 4)
        assert await c.put(key(4), FakeCudaArray(big))
        big_out = np.zeros_like(big)
        assert await c.get_into(key(4), FakeCudaArray(big_out)) == big.nbytes
        assert np.array_equal(big, big_out)
        st = path.statistics()
        assert (st.d2h_copies, st.d2h_bytes) == (3, 100_000 + 7 + big.nbytes)
        assert st.h2d_copies == 2 + 3 + 1 + 1  # per block copied, packed blocks included
        assert not rt.pending
    assert rt.unregister_calls == 1 and rt.registered == {}
    assert path.statistics().closed


async def test_cuda_buffer_errors_are_clear(daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        # Not a buffer and not CUDA: the host path's error, and no GPU path is made.
        with pytest.raises(TypeError, match="value 1 .* does not support the buffer protocol"):
            await c.put_many([key(1), key(2)], [b"x", object()])
        with pytest.raises(TypeError, match=r"0 \(RaisingInterface\) does not support the buffer protocol"):
            await c.get_into(key(1), RaisingInterface())
        assert c._gpu is None
        # A CUDA buffer with no cupy: the install hint, nothing stored, nothing pinned.
        monkeypatch.setitem(sys.modules, "cupy", None)
        with pytest.raises(GpuUnavailableError, match=r"install memkv-mesh\[gpu\]"):
            await c.put(key(5), FakeCudaArray(blob(10, 1)))
        assert c._gpu is None
        assert await c.lookup([key(5)]) == 0
        monkeypatch.undo()
        gpu.enable_gpu(c, runtime=FakeRuntime())
        with pytest.raises(RuntimeError, match="already set up"):
            gpu.enable_gpu(c, runtime=FakeRuntime())
        with pytest.raises(ValueError, match="value 0 is not C-contiguous"):
            await c.put(key(6), FakeCudaArray(np.zeros(8, np.uint8), strides=(2,)))
        with pytest.raises(ValueError, match="value 0 is empty"):
            await c.put(key(6), FakeCudaArray(np.zeros(0, np.uint8)))
        with pytest.raises(ValueError, match="daemon's limit"):
            await c.put(key(6), FakeCudaArray(np.zeros(c.max_block_bytes + 1, np.uint8)))
        assert await c.put(key(7), FakeCudaArray(blob(64, 7)))
        with pytest.raises(ValueError, match="buffer 0 is read-only"):
            await c.get_into(key(7), FakeCudaArray(np.zeros(64, np.uint8), readonly=True))
        with pytest.raises(ValueError, match="buffer 0 holds 10 bytes; block 0 is 64"):
            await c.get_into(key(7), FakeCudaArray(np.zeros(10, np.uint8)))
        with pytest.raises(ValueError, match="the blocks found need 64"):
            await c.get_many_into([key(7)], FakeCudaArray(np.zeros(10, np.uint8)))


async def test_host_buffers_keep_the_host_path(daemon) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as c:
        v = blob(5000, 9)
        assert await c.put(key(1), v)
        out = bytearray(5000)
        assert await c.get_into(key(1), out) == 5000 and bytes(out) == v.tobytes()
        assert c._gpu is None  # no CUDA import, no pinning for host-only clients


def test_importing_the_client_loads_no_gpu_code() -> None:
    import subprocess

    code = "import sys, memkv_mesh, memkv_mesh.client, memkv_mesh.nvme; print(sorted(m for m in sys.modules if m.startswith(('memkv_mesh.gpu', 'memkv_mesh.nvme_kvikio', 'cupy', 'kvikio', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


async def test_enable_gpu_on_a_closed_client_is_an_error(daemon) -> None:
    c = await AsyncClient.connect(daemon.socket_path)
    await c.aclose()
    with pytest.raises(ConnectionError, match="closed"):
        gpu.enable_gpu(c, runtime=FakeRuntime())


# ---- the kvikio backend with a fake kvikio --------------------------------------------------------------


class _Future:
    def __init__(self, n: int) -> None:
        self.n = n

    def get(self) -> int:
        return self.n


class FakeCuFile:
    """kvikio.CuFile over a host file; "device" buffers are FakeCudaArrays over host memory."""

    def __init__(self, path: str, flags: str) -> None:
        assert flags == "r+"
        self.fd = os.open(path, os.O_RDWR)

    @staticmethod
    def _view(buf: Any) -> memoryview:
        if isinstance(buf, FakeCudaArray):
            return buf.host.data.cast("B")
        return memoryview(buf).cast("B")

    def pread(self, buf: Any, size: int, file_offset: int, task_size: int | None = None) -> _Future:
        return _Future(os.preadv(self.fd, [self._view(buf)[:size]], file_offset))

    def pwrite(self, buf: Any, size: int, file_offset: int, task_size: int | None = None) -> _Future:
        return _Future(os.pwrite(self.fd, self._view(buf)[:size], file_offset))

    def close(self) -> None:
        os.close(self.fd)


class FakeKvikio:
    CuFile = FakeCuFile

    class defaults:  # noqa: N801 - mirrors kvikio.defaults
        @staticmethod
        def is_compat_mode_preferred() -> bool:
            return True


def test_kvikio_block_io_serves_the_nvme_tier(tmp_path: Path) -> None:
    def factory(paths: list[Path], sizes: list[int]) -> KvikioBlockIO:
        return KvikioBlockIO(paths, sizes, kvikio=FakeKvikio())

    data = blob(10_000, 5)
    with NvmeTier(tmp_path / "nvme", 1 << 20, io_factory=factory) as tier:
        tier.open()
        tier.put(key(1), data, xxhash.xxh3_64_intdigest(data.tobytes()))
        out = bytearray(10_000)
        assert tier.read_into(key(1), out) == 10_000 and bytes(out) == data.tobytes()
        # Straight into "device" memory, verified through the runtime seam.
        rt = FakeRuntime()
        dev = np.zeros(12_000, np.uint8)
        assert read_block_to_device(tier, key(1), FakeCudaArray(dev), runtime=rt) == 10_000
        assert dev[:10_000].tobytes() == data.tobytes()
        assert read_block_to_device(tier, key(2), FakeCudaArray(dev), runtime=rt) is None
        with pytest.raises(ValueError, match="dest holds 100 bytes"):
            read_block_to_device(tier, key(1), FakeCudaArray(np.zeros(100, np.uint8)), runtime=rt)
        with pytest.raises(TypeError, match="not a CUDA array"):
            read_block_to_device(tier, key(1), np.zeros(100, np.uint8), runtime=rt)
    # Blocks survive a reopen through the same backend.
    with NvmeTier(tmp_path / "nvme", 1 << 20, io_factory=factory) as tier:
        tier.open()
        out = bytearray(10_000)
        assert tier.read_into(key(1), out) == 10_000 and bytes(out) == data.tobytes()


def test_read_to_device_drops_a_corrupt_block(tmp_path: Path) -> None:
    data = blob(8192, 6)
    with NvmeTier(tmp_path / "nvme", 1 << 20, io_factory=lambda p, s: KvikioBlockIO(p, s, kvikio=FakeKvikio())) as tier:
        tier.open()
        tier.put(key(1), data, xxhash.xxh3_64_intdigest(data.tobytes()))
        # Flip one payload byte on disk, behind the tier's back.
        b = tier._index[key(1)]
        path = sorted((tmp_path / "nvme").glob("blocks-*.dat"))[b.file]
        with open(path, "r+b") as f:
            f.seek(b.offset + tier._region + 100)
            f.write(bytes([data[100] ^ 0xFF]))
        dev = np.zeros(8192, np.uint8)
        assert read_block_to_device(tier, key(1), FakeCudaArray(dev), runtime=FakeRuntime()) is None
        assert key(1) not in tier
        assert tier.statistics().dropped_corrupt == 1


def test_read_to_device_needs_the_kvikio_backend(tmp_path: Path) -> None:
    with NvmeTier(tmp_path / "nvme", 1 << 20) as tier:
        tier.open()
        with pytest.raises(TypeError, match="kvikio_io_factory"):
            read_block_to_device(tier, key(1), FakeCudaArray(np.zeros(10, np.uint8)), runtime=FakeRuntime())


def test_missing_kvikio_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kvikio", None)
    tier = NvmeTier(tmp_path / "nvme", 1 << 20, io_factory=kvikio_io_factory(KvikioConfig(compat_mode="on")))
    with pytest.raises(GpuUnavailableError, match=r"install memkv-mesh\[gpu\]"):
        tier.open()


def test_compat_off_without_gds_is_an_error(tmp_path: Path) -> None:
    paths = [tmp_path / "a.dat"]
    with pytest.raises(GpuUnavailableError, match="compat_mode is off"):
        KvikioBlockIO(paths, [1 << 16], KvikioConfig(compat_mode="off"), kvikio=FakeKvikio())


# ---- the real thing, on a GPU machine ---------------------------------------------------------------------


@pytest.mark.gpu
async def test_gpu_cupy_round_trip(daemon) -> None:
    cupy = pytest.importorskip("cupy")
    async with await AsyncClient.connect(daemon.socket_path) as c:
        src = cupy.random.default_rng(1).integers(0, 256, 1 << 20, dtype=cupy.uint8)
        assert await c.put(key(1), src)
        path = c._gpu
        assert path is not None
        lease = await c.get(key(1))
        assert lease is not None and bytes(lease.view) == cupy.asnumpy(src).tobytes()
        lease.release()
        dst = cupy.zeros_like(src)
        assert await c.get_into(key(1), dst) == 1 << 20
        assert bool((dst == src).all())
        assert path.statistics().pinned, path.statistics().pin_error
    assert path.statistics().closed


@pytest.mark.gpu
async def test_gpu_torch_round_trip(daemon) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy")
    async with await AsyncClient.connect(daemon.socket_path) as c:
        src = torch.randint(0, 256, (4096, 64), dtype=torch.uint8, device="cuda").to(torch.float16)
        assert await c.put(key(2), src)
        dst = torch.empty_like(src)
        assert await c.get_into(key(2), dst) == src.numel() * 2
        assert torch.equal(src, dst)
        # requires_grad tensors export neither interface: a clear error, not wrong bytes.
        with pytest.raises(TypeError):
            await c.put(key(3), src.clone().requires_grad_(True))


@pytest.mark.gpu
def test_gpu_kvikio_reads_an_nvme_block_into_device_memory(tmp_path: Path) -> None:
    cupy = pytest.importorskip("cupy")
    pytest.importorskip("kvikio")
    data = blob(1 << 20, 8)
    with NvmeTier(tmp_path / "nvme", 8 << 20, io_factory=kvikio_io_factory()) as tier:
        tier.open()
        tier.put(key(1), data, xxhash.xxh3_64_intdigest(data.tobytes()))
        dev = cupy.zeros(1 << 20, dtype=cupy.uint8)
        assert read_block_to_device(tier, key(1), dev) == 1 << 20
        assert cupy.asnumpy(dev).tobytes() == data.tobytes()
