"""A kvikio-backed ``BlockIO`` for the NVMe tier, and NVMe-to-GPU block reads.

Theory of operation
-------------------
* ``KvikioBlockIO`` implements ``nvme_io.BlockIO``. The data files are created and preallocated
  exactly as ``PosixBlockIO`` does (it owns one for that, and for headers, fdatasync and close);
  payloads go through ``kvikio.CuFile.pread``/``pwrite``, which split big transfers over kvikio's
  thread pool and use GPUDirect Storage where cuFile is set up, its POSIX compat mode elsewhere.
  Payload offsets are header-region aligned (4 KiB), as O_DIRECT and GDS need.
* It is chosen only when configured (``KvikioConfig`` / ``kvikio_io_factory``); kvikio is imported
  when the first tier opens with it, never by ``import memkv_mesh``. A configured backend whose
  kvikio is missing is an error naming the fix, never a silent fall back to POSIX.
* ``read_block_to_device`` reads one block of an open tier straight into device memory (GDS: NVMe
  DMA into the GPU; compat mode: through kvikio's bounce buffers). The rule "verified whenever read
  from NVMe" holds: the header is checked against the index, and the payload's xxh3 is checked
  on a host copy of the device bytes (``verify=False`` skips only that copy, for callers that
  verify on the device themselves). A block that fails a check is dropped, as ``read_into`` does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import xxhash

from memkv_mesh.gpu import (
    INSTALL_HINT,
    CudaRuntime,
    DeviceSpan,
    GpuUnavailableError,
    is_cuda,
    span_from_interface,
)
from memkv_mesh.nvme_format import decode_block_header
from memkv_mesh.nvme_io import BlockIO, PosixBlockIO

__all__ = ["KvikioBlockIO", "KvikioConfig", "kvikio_io_factory", "read_block_to_device"]

CompatMode = Literal["auto", "on", "off"]


class KvikioConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of the kvikio backend."""

    # "auto": GPUDirect Storage where cuFile works, POSIX compat mode elsewhere (kvikio's own
    # default). "on" forces compat mode (no cuFile at all; for hosts whose cuFile misbehaves).
    # "off" requires GDS: opening fails where it is not available, never a silent slow path.
    compat_mode: CompatMode = "auto"
    # Bytes per kvikio task; kvikio's default (4 MiB) keeps its thread pool busy on blocks of
    # tens of MiB without splitting the common 1-16 MiB block into slivers.
    task_size: int = 4 << 20

    def __post_init__(self) -> None:
        if self.compat_mode not in ("auto", "on", "off"):
            raise ValueError(f"kvikio.compat_mode must be auto, on or off, got {self.compat_mode!r}")
        if isinstance(self.task_size, bool) or not isinstance(self.task_size, int) or self.task_size < 4096:
            raise ValueError(f"kvikio.task_size must be an integer of at least 4096 bytes, got {self.task_size!r}")


_import_lock = threading.Lock()


def _import_kvikio(compat_mode: CompatMode) -> Any:
    """Import kvikio with the compat mode asked for (the env var is read when kvikio starts;
    ``defaults.set`` changes it afterwards on kvikio >= 25.02)."""
    with _import_lock:
        os.environ.setdefault("KVIKIO_COMPAT_MODE", compat_mode.upper())
        try:
            import kvikio
            import kvikio.defaults
        except ImportError as e:
            raise GpuUnavailableError(f"the kvikio NVMe backend needs kvikio, which is not installed ({e}): {INSTALL_HINT}") from None
        setter = getattr(kvikio.defaults, "set", None)
        enum = getattr(kvikio, "CompatMode", None)
        if setter is not None and enum is not None:
            value = getattr(enum, compat_mode.upper())
            try:
                setter("compat_mode", value)
            except TypeError:
                setter({"compat_mode": value})
        elif compat_mode != "auto" and hasattr(kvikio.defaults, "compat_mode_reset"):
            kvikio.defaults.compat_mode_reset(compat_mode == "on")
        return kvikio


def _host_array(view: memoryview) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.frombuffer(view, dtype=np.uint8)


class KvikioBlockIO:
    """``BlockIO`` over the tier's data files with payloads through ``kvikio.CuFile``."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int], config: KvikioConfig | None = None, *, kvikio: Any = None) -> None:
        self.config = config if config is not None else KvikioConfig()
        self._kvikio = kvikio if kvikio is not None else _import_kvikio(self.config.compat_mode)
        self._posix = PosixBlockIO(paths, sizes)  # creates and preallocates the files
        self._files: list[Any] = []
        try:
            for path in paths:
                # "r+": read/write without truncating ("w" would truncate the preallocated file).
                self._files.append(self._kvikio.CuFile(str(path), "r+"))
        except BaseException:
            self.close()
            raise
        if self.config.compat_mode == "off" and self.compat_mode_active():
            self.close()
            raise GpuUnavailableError("kvikio.compat_mode is off but GPUDirect Storage (cuFile) is not available here")

    def compat_mode_active(self) -> bool:
        """True if kvikio runs in POSIX compat mode rather than through cuFile/GDS."""
        defaults = self._kvikio.defaults
        fn = getattr(defaults, "is_compat_mode_preferred", None) or getattr(defaults, "compat_mode", None)
        if fn is None:
            return True
        mode = fn()
        return bool(mode) if isinstance(mode, bool) else str(getattr(mode, "name", mode)).upper() == "ON"

    def _pread(self, file: int, buf: Any, size: int, offset: int) -> None:
        n = self._files[file].pread(buf, size, offset, task_size=self.config.task_size).get()
        if n != size:
            raise OSError(f"short read from data file {file} at {offset}: {n} of {size} bytes")

    def write(self, file: int, offset: int, header: bytes, payload: memoryview) -> None:
        self._posix.write(file, offset, header, payload[:0])  # the header region alone
        size = payload.nbytes
        if not size:  # a header alone (the tier zeroes a removed block's header this way)
            return
        n = self._files[file].pwrite(_host_array(payload), size, offset + len(header), task_size=self.config.task_size).get()
        if n != size:
            raise OSError(f"short write to data file {file} at {offset + len(header)}: {n} of {size} bytes")

    def read(self, file: int, offset: int, header: bytearray, payload: memoryview) -> None:
        header[:] = self.read_header(file, offset, len(header)).ljust(len(header), b"\0")
        self._pread(file, _host_array(payload), payload.nbytes, offset + len(header))

    def read_device(self, file: int, offset: int, header_size: int, dest: Any, size: int) -> bytes:
        """Read a header (returned) and ``size`` payload bytes into device array ``dest``."""
        hdr = self.read_header(file, offset, header_size)
        self._pread(file, dest, size, offset + header_size)
        return hdr

    def read_header(self, file: int, offset: int, size: int) -> bytes:
        return self._posix.read_header(file, offset, size)

    def sync(self, file: int) -> None:
        self._posix.sync(file)

    def close(self) -> None:
        files, self._files = self._files, []
        try:
            for f in files:
                f.close()
        finally:
            self._posix.close()


def kvikio_io_factory(config: KvikioConfig | None = None) -> Callable[[list[Path], list[int]], BlockIO]:
    """An ``io_factory`` for ``NvmeTier``: ``NvmeTier(dir, cap, io_factory=kvikio_io_factory())``."""
    cfg = config if config is not None else KvikioConfig()

    def make(paths: list[Path], sizes: list[int]) -> BlockIO:
        return KvikioBlockIO(paths, sizes, cfg)

    return make


def read_block_to_device(tier: Any, key: bytes, dest: Any, *, verify: bool = True, runtime: Any = None) -> int | None:
    """Read one block of an open ``NvmeTier`` into the CUDA array ``dest``; its length, or None
    if absent or if a check failed (the block is then dropped and counted, like ``read_into``).

    The tier must have been opened with a ``KvikioBlockIO``; pinning, counting and dropping are the
    tier's own (``NvmeTier.read_with``), shared with ``NvmeTier.read_into``.
    ``runtime``: the CUDA runtime seam of ``memkv_mesh.gpu`` (cupy's unless given).
    """
    if not is_cuda(dest):
        raise TypeError(f"dest ({type(dest).__name__}) is not a CUDA array; use NvmeTier.read_into for host memory")
    span: DeviceSpan = span_from_interface(dest.__cuda_array_interface__, "dest")
    if span.readonly:
        raise ValueError("dest is read-only")
    io = tier.backend
    if not isinstance(io, KvikioBlockIO):
        raise TypeError(f"the tier's I/O backend is {type(io).__name__}; open it with io_factory=kvikio_io_factory()")

    def read(backend: Any, b: Any) -> bool:
        hdr = backend.read_device(b.file, b.offset, tier.header_region, dest, b.length)
        if decode_block_header(hdr) != b.header():
            return False
        if not verify:
            return True
        rt = runtime if runtime is not None else CudaRuntime()
        host = np.empty(b.length, dtype=np.uint8)
        rt.memcpy_async(int(host.ctypes.data), span.ptr, b.length)
        rt.synchronize()
        return bool(xxhash.xxh3_64_intdigest(host.data) == b.checksum)

    got: int | None = tier.read_with(key, span.nbytes, read)
    return got
