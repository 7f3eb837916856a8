"""The GPU data path of the local client: CUDA buffers in and out of the arena, pinned.

Theory of operation
-------------------
* **Classification is duck typing, with no CUDA import.** An object is a CUDA buffer if it exports
  ``__cuda_array_interface__`` (cupy, numba, torch CUDA tensors) or its ``__dlpack_device__()``
  names a CUDA device (DLPack device types 2 ``kDLCUDA`` and 13 ``kDLCUDAManaged``). The client
  only asks once the buffer protocol has refused an object, so host buffers never pay for it.
* **cupy is imported only when a CUDA buffer shows up** (or ``enable_gpu`` is called). A CUDA
  buffer without cupy installed is a clear error: install ``memkv-mesh[gpu]``.
* **One pinned arena per client.** The first time a client sees a CUDA buffer it registers its
  whole arena mapping with ``cudaHostRegister`` (portable), so every device<->arena copy is a
  DMA from page-locked memory at full PCIe speed; it unregisters it when the client closes. If
  the driver refuses (memlock limit, a file system it cannot pin), copies still work through the
  driver's staging buffers; the reason is kept in ``statistics().pin_error``, and
  ``GpuConfig(require_pinned=True)`` turns it into an error instead.
* **Checksums stay what they are**: xxh3-64 of the bytes in the arena slot, computed on the host
  after the device-to-host copy has completed.
* **Stream order.** A producer's pending work is honoured before its bytes are read: the CUDA
  array interface's ``stream`` (v3) is synchronised, and DLPack exports are requested for the
  stream the copies use. Copies run on the legacy default stream, which also orders them after
  work on every blocking stream (torch's default stream is one), with ``cudaMemcpyDefault`` so
  unified addressing picks the direction and device. One ``cudaStreamSynchronize`` per batch ends
  a put (before checksumming) or a get (before the caller may use its buffers).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import xxhash

__all__ = [
    "DLPACK_CUDA",
    "DLPACK_CUDA_MANAGED",
    "DeviceSpan",
    "GpuConfig",
    "GpuStats",
    "GpuUnavailableError",
    "GpuPath",
    "enable_gpu",
    "is_cuda",
    "span_from_interface",
]

# DLPack device types (dlpack.h DLDeviceType). Host types (1 CPU, 3 CUDAHost) take the host path.
DLPACK_CPU = 1
DLPACK_CUDA = 2
DLPACK_CUDA_HOST = 3
DLPACK_CUDA_MANAGED = 13
_CUDA_DEVICE_TYPES = frozenset({DLPACK_CUDA, DLPACK_CUDA_MANAGED})

# cudaMemcpyKind and cudaHostRegister flags (cuda_runtime_api.h); fixed by the CUDA ABI.
MEMCPY_DEFAULT = 4
HOST_REGISTER_PORTABLE = 1
LEGACY_DEFAULT_STREAM = 0

INSTALL_HINT = "install memkv-mesh[gpu] (pip install 'memkv-mesh[gpu]', which brings cupy-cuda12x and kvikio-cu12)"


class GpuUnavailableError(RuntimeError):
    """A CUDA buffer was passed but the GPU path cannot run (cupy missing, no device)."""


class GpuConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of a client's GPU path."""

    # Page-locked arena: DMA at PCIe speed instead of going through the driver's small staging
    # buffers (about half the bandwidth). Pinning a whole arena costs only a page-table walk once.
    pin_arena: bool = True
    # Off by default: an unpinned arena is slower, never wrong; a node with a low memlock limit
    # should still serve. Turn on where a silent slow path would be worse than a refusal.
    require_pinned: bool = False

    def __post_init__(self) -> None:
        for name in ("pin_arena", "require_pinned"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"gpu.{name} must be true or false, got {getattr(self, name)!r}")
        if self.require_pinned and not self.pin_arena:
            raise ValueError("gpu.require_pinned needs gpu.pin_arena = true")


class GpuStats(msgspec.Struct, frozen=True):
    pinned: bool
    pinned_bytes: int
    pin_error: str
    d2h_copies: int
    d2h_bytes: int
    h2d_copies: int
    h2d_bytes: int
    closed: bool


# ---- classification (pure; no CUDA import) -----------------------------------------------------


def _dlpack_device_type(obj: Any) -> int | None:
    fn = getattr(type(obj), "__dlpack_device__", None)
    if fn is None:
        return None
    try:
        dev = fn(obj)
        return int(dev[0])
    except Exception:
        return None


def _cuda_interface(obj: Any) -> Mapping[str, Any] | None:
    if not hasattr(type(obj), "__cuda_array_interface__"):
        return None
    try:
        # torch raises (AttributeError, RuntimeError) for CPU tensors and tensors needing grad.
        cai = obj.__cuda_array_interface__
    except Exception:
        return None
    return cai if isinstance(cai, Mapping) else None


def is_cuda(obj: Any) -> bool:
    """True if ``obj`` is device memory: it exports the CUDA array interface or a CUDA DLPack device."""
    return _cuda_interface(obj) is not None or _dlpack_device_type(obj) in _CUDA_DEVICE_TYPES


class DeviceSpan:
    """A contiguous range of device memory; ``owner`` keeps the exporting object alive."""

    __slots__ = ("ptr", "nbytes", "readonly", "owner")

    def __init__(self, ptr: int, nbytes: int, readonly: bool, owner: Any) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.readonly = readonly
        self.owner = owner

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, s: slice) -> DeviceSpan:
        if not isinstance(s, slice):
            raise TypeError("a DeviceSpan is sliced, not indexed")
        start, stop, step = s.indices(self.nbytes)
        if step != 1:
            raise ValueError("a DeviceSpan slice must be contiguous")
        return DeviceSpan(self.ptr + start, max(0, stop - start), self.readonly, self.owner)

    def __repr__(self) -> str:
        return f"DeviceSpan(ptr={self.ptr:#x}, nbytes={self.nbytes}, readonly={self.readonly})"


def span_from_interface(cai: Mapping[str, Any], what: str, owner: Any = None) -> DeviceSpan:
    """Validate a ``__cuda_array_interface__`` dict (v0-v3) and return the bytes it covers.

    Raises ValueError naming ``what`` for a strided (non C-contiguous) or masked array and for a
    malformed interface.
    """
    try:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = str(cai["typestr"])
        ptr, readonly = cai["data"]
        ptr = int(ptr)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what} has a malformed __cuda_array_interface__ ({e!r})") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"{what} has a negative dimension in its shape {shape}")
    try:
        itemsize = int(typestr[2:])
    except ValueError:
        raise ValueError(f"{what} has an unknown typestr {typestr!r}") from None
    if len(typestr) < 3 or itemsize <= 0:
        raise ValueError(f"{what} has an unknown typestr {typestr!r}")
    if cai.get("mask") is not None:
        raise ValueError(f"{what} is a masked array; pass a plain contiguous array")
    nbytes = math.prod(shape) * itemsize
    strides = cai.get("strides")
    if strides is not None and nbytes:
        expect = itemsize
        for n, st in zip(reversed(shape), reversed(tuple(strides)), strict=True):
            if n != 1 and int(st) != expect:
                raise ValueError(f"{what} is not C-contiguous; pass a contiguous buffer (e.g. .contiguous())")
            expect *= n
    if ptr == 0 and nbytes:
        raise ValueError(f"{what} has a null device pointer")
    return DeviceSpan(ptr, nbytes, bool(readonly), owner)


# ---- the CUDA runtime seam -----------------------------------------------------------------------


class CudaRuntime:
    """The few runtime calls the GPU path makes, through cupy. Tests substitute a fake."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as e:
            raise GpuUnavailableError(f"a CUDA buffer needs cupy, which is not installed ({e}): {INSTALL_HINT}") from None
        self._cupy = cupy
        self._rt = cupy.cuda.runtime
        try:
            self._rt.getDeviceCount()
        except Exception as e:
            raise GpuUnavailableError(f"cupy cannot reach a CUDA device: {e}") from None

    def host_register(self, ptr: int, size: int) -> None:
        self._rt.hostRegister(ptr, size, HOST_REGISTER_PORTABLE)

    def host_unregister(self, ptr: int) -> None:
        self._rt.hostUnregister(ptr)

    def memcpy_async(self, dst: int, src: int, size: int) -> None:
        self._rt.memcpyAsync(dst, src, size, MEMCPY_DEFAULT, LEGACY_DEFAULT_STREAM)

    def synchronize(self) -> None:
        self._rt.streamSynchronize(LEGACY_DEFAULT_STREAM)

    def stream_synchronize(self, stream: int) -> None:
        self._rt.streamSynchronize(stream)

    def from_dlpack(self, obj: Any) -> Any:
        """A cupy array over a DLPack export; cupy asks the producer to order its work before
        cupy's current stream, the legacy default stream here."""
        with self._cupy.cuda.Stream.null:
            return self._cupy.from_dlpack(obj)


def _host_ptr(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class GpuPath:
    """One client's GPU path: the arena registration and device<->arena copies."""

    def __init__(self, arena: memoryview, config: GpuConfig | None = None, runtime: Any = None) -> None:
        self.config = config if config is not None else GpuConfig()
        self._rt = runtime if runtime is not None else CudaRuntime()
        self._lock = threading.Lock()
        self._c = {"d2h_copies": 0, "d2h_bytes": 0, "h2d_copies": 0, "h2d_bytes": 0}
        self._pinned_ptr = 0
        self._pinned_bytes = 0
        self._pin_error = ""
        self._closed = False
        if self.config.pin_arena and arena.nbytes:
            ptr = _host_ptr(arena)
            try:
                self._rt.host_register(ptr, arena.nbytes)
            except Exception as e:
                self._pin_error = f"cudaHostRegister of the {arena.nbytes}-byte arena failed: {e}"
                if self.config.require_pinned:
                    raise GpuUnavailableError(self._pin_error + " (gpu.require_pinned is set)") from None
            else:
                self._pinned_ptr, self._pinned_bytes = ptr, arena.nbytes

    # ---- classification with the runtime at hand ---------------------------------------------------
    def span(self, obj: Any, what: str, *, writable: bool) -> DeviceSpan:
        """The device bytes of a CUDA object, after the producer's pending work on its stream."""
        cai = _cuda_interface(obj)
        owner = obj
        if cai is None:
            if _dlpack_device_type(obj) not in _CUDA_DEVICE_TYPES:
                raise TypeError(f"{what} ({type(obj).__name__}) is neither a host buffer nor a CUDA buffer")
            try:
                owner = self._rt.from_dlpack(obj)
            except Exception as e:
                raise TypeError(f"{what} ({type(obj).__name__}): its DLPack export failed: {e}") from None
            cai = _cuda_interface(owner)
            if cai is None:
                raise TypeError(f"{what} ({type(obj).__name__}): its DLPack import has no CUDA array interface")
        span = span_from_interface(cai, what, owner)
        if writable and span.readonly:
            raise ValueError(f"{what} is read-only")
        stream = cai.get("stream")
        if stream is not None and span.nbytes:
            self._rt.stream_synchronize(int(stream))
        return span

    def views(self, objs: Sequence[Any], what: str, host: Callable[[Any, int], memoryview], *, writable: bool) -> list[Any]:
        """Host objects through ``host`` (the client's own check), CUDA objects as DeviceSpans."""
        out: list[Any] = []
        for i, o in enumerate(objs):
            if is_cuda(o):
                out.append(self.span(o, f"{what} {i}", writable=writable))
            else:
                out.append(host(o, i))
        return out

    # ---- copies --------------------------------------------------------------------------------------
    def fill(self, jobs: Sequence[tuple[memoryview, Any]]) -> list[int]:
        """Copy each source (host view or DeviceSpan) into its arena slot; xxh3 of each slot."""
        self._check_open()
        n = nbytes = 0
        for slot, src in jobs:
            if isinstance(src, DeviceSpan):
                if src.nbytes:
                    self._rt.memcpy_async(_host_ptr(slot), src.ptr, src.nbytes)
                n += 1
                nbytes += src.nbytes
            else:
                np.copyto(np.frombuffer(slot, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))
        if n:
            self._rt.synchronize()
            with self._lock:
                self._c["d2h_copies"] += n
                self._c["d2h_bytes"] += nbytes
        return [xxhash.xxh3_64_intdigest(slot) for slot, _ in jobs]

    def copy_out(self, jobs: Sequence[tuple[Any, memoryview]]) -> None:
        """Copy arena slots into targets (host views or DeviceSpans); device copies are complete
        when this returns."""
        self._check_open()
        n = nbytes = 0
        for dst, slot in jobs:
            if isinstance(dst, DeviceSpan):
                if dst.nbytes:
                    self._rt.memcpy_async(dst.ptr, _host_ptr(slot), dst.nbytes)
                n += 1
                nbytes += dst.nbytes
            else:
                np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(slot, dtype=np.uint8))
        if n:
            self._rt.synchronize()
            with self._lock:
                self._c["h2d_copies"] += n
                self._c["h2d_bytes"] += nbytes

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionError("client is closed")

    def close(self) -> None:
        """Unregister the arena (after outstanding copies); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ptr, self._pinned_ptr = self._pinned_ptr, 0
        if ptr:
            self._rt.synchronize()
            self._rt.host_unregister(ptr)

    def statistics(self) -> GpuStats:
        with self._lock:
            return GpuStats(
                pinned=self._pinned_ptr != 0, pinned_bytes=self._pinned_bytes if self._pinned_ptr else 0,
                pin_error=self._pin_error, closed=self._closed, **self._c,
            )  # fmt: skip


_enable_lock = threading.Lock()


def path_for(client: Any, runtime: Any = None) -> GpuPath:
    """The client's GPU path, made (and the arena pinned) on first use."""
    with _enable_lock:
        path: GpuPath | None = client._gpu
        if path is None:
            if client._arena is None:
                raise ConnectionError("client is closed")
            path = GpuPath(client._arena, runtime=runtime)
            client._gpu = path
        return path


def enable_gpu(client: Any, config: GpuConfig | None = None, *, runtime: Any = None) -> GpuPath:
    """Set up a client's GPU path now, with options (pins the arena). Without this call the
    path is made with default options when the first CUDA buffer is passed."""
    with _enable_lock:
        if client._arena is None:
            raise ConnectionError("client is closed")
        if client._gpu is not None:
            raise RuntimeError("the GPU path of this client is already set up")
        path = GpuPath(client._arena, config, runtime)
        client._gpu = path
        return path
