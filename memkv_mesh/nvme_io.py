"""Payload I/O for the NVMe tier: one small class over the tier's preallocated data files.

``PosixBlockIO`` does positional vectored I/O (``os.preadv`` / ``os.pwritev``) on file
descriptors opened once; every call is thread-safe because positional I/O shares no file offset.
It is the only place the tier touches payload bytes, so a kvikio / GPUDirect Storage backend can
replace it later by providing the same five methods (see ``BlockIO``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["BlockIO", "PosixBlockIO"]


class BlockIO(Protocol):
    """What the tier needs from an I/O backend. Offsets are file offsets of a block's extent."""

    def write(self, file: int, offset: int, header: bytes, payload: memoryview) -> None:
        """Write ``header`` at ``offset`` and ``payload`` right after it (``len(header)`` is the
        tier's header region, so the payload offset stays aligned). ``payload`` may be empty: the
        tier zeroes a removed block's header that way when it cannot journal the removal. Raise
        OSError on failure (ENOSPC, EIO); the tier frees the extent and counts it."""

    def read(self, file: int, offset: int, header: bytearray, payload: memoryview) -> None:
        """Fill ``header`` from ``offset`` and ``payload`` from ``offset + len(header)``."""

    def read_header(self, file: int, offset: int, size: int) -> bytes:
        """Return ``size`` bytes at ``offset`` (fewer only past the end of the file)."""

    def sync(self, file: int) -> None:
        """Make the data written to one file durable (fdatasync)."""

    def close(self) -> None:
        """Sync and close every file."""


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    """Drop the first ``done`` bytes from a list of buffers (after a short read or write)."""
    out: list[memoryview] = []
    for b in bufs:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:])
        done = 0
    return out


class PosixBlockIO:
    """Preallocated data files accessed with ``preadv``/``pwritev``."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int]) -> None:
        """Open (creating if needed) each file and make it exactly ``sizes[i]`` bytes, reserving
        the blocks with ``posix_fallocate`` so a full disk fails here, not on a later write."""
        if len(paths) != len(sizes):
            raise ValueError(f"{len(paths)} paths but {len(sizes)} sizes")
        self._fds: list[int] = []
        try:
            for path, size in zip(paths, sizes, strict=True):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._fds.append(fd)
                st = os.fstat(fd)
                if st.st_size > size:
                    os.ftruncate(fd, size)
                # Check first: on a disk too small, posix_fallocate would fill it before failing
                # (and leave the file behind, full of nothing).
                vfs = os.fstatvfs(fd)
                have = min(st.st_blocks * 512, size)
                if size - have > vfs.f_bavail * vfs.f_frsize:
                    raise OSError(
                        errno.ENOSPC,
                        f"cannot preallocate {size} bytes for {path}: {vfs.f_bavail * vfs.f_frsize} bytes free "
                        "there (lower store.nvme_bytes or free space)",
                    )
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise OSError(
                            e.errno, f"cannot preallocate {size} bytes for {path}: {e.strerror}"
                        ) from e
                    os.ftruncate(fd, size)  # a file system without fallocate: sparse file
        except BaseException:
            self.close()
            raise

    def write(self, file: int, offset: int, header: bytes, payload: memoryview) -> None:
        fd = self._fds[file]
        bufs = [memoryview(header), payload]
        total = len(header) + payload.nbytes
        done = 0
        while done < total:
            n = os.pwritev(fd, _advance(bufs, done), offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to data file {file} at {offset + done}")
            done += n

    def read(self, file: int, offset: int, header: bytearray, payload: memoryview) -> None:
        fd = self._fds[file]
        bufs = [memoryview(header), payload]
        total = len(header) + payload.nbytes
        done = 0
        while done < total:
            n = os.preadv(fd, _advance(bufs, done), offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short read from data file {file} at {offset + done}")
            done += n

    def read_header(self, file: int, offset: int, size: int) -> bytes:
        return os.pread(self._fds[file], size, offset)

    def sync(self, file: int) -> None:
        os.fdatasync(self._fds[file])

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
