"""The DRAM arena: one shared-memory file that the daemon and every local client map.

Theory of operation
-------------------
* The daemon creates ``<arena_dir>/memkv-<node_id>-<hash of data_dir>.arena`` (tmpfs under /dev/shm by default),
  sizes it, optionally reserves its pages (``posix_fallocate``) so a full tmpfs fails at start-up
  instead of killing the daemon with SIGBUS later, and maps it read-write. Mode 0660, like the
  socket: whoever may talk to the daemon may map its arena.
* Clients learn the path from the ``Welcome`` reply and map the same file, so a block's bytes are
  copied once from the engine's buffer into the arena on put, and read in place (zero copy) or
  copied once into the engine's buffer on get. The socket carries only offsets.
* Which byte ranges hold what is the daemon's business (``alloc.ExtentAllocator`` + the store's
  index); the arena itself is just memory. The file is unlinked when the daemon stops; a daemon
  that died leaves it behind and the next daemon for the same node id truncates and reuses it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

__all__ = ["Arena", "arena_path"]


def arena_path(arena_dir: Path, node_id: str, data_dir: Path) -> Path:
    """One arena per daemon: the node id for humans, a hash of the data dir (which the daemon
    holds an exclusive lock on) so two daemons on one host never share a file."""
    tag = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=4).hexdigest()
    return arena_dir / f"memkv-{node_id}-{tag}.arena"


class Arena:
    def __init__(self, path: Path, size: int, *, preallocate: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"arena size must be positive, got {size}")
        self.path = path
        self.size = size
        self._preallocate = preallocate
        self._mmap: mmap.mmap | None = None
        self._view: memoryview | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o660)
        try:
            os.fchmod(fd, 0o660)
            os.ftruncate(fd, self.size)
            if self._preallocate:
                try:
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as e:
                    os.unlink(self.path)
                    raise OSError(
                        e.errno,
                        f"cannot reserve {self.size} bytes for the arena at {self.path}: "
                        f"{os.strerror(e.errno or 0)} (lower store.dram_bytes or free space there)",
                    ) from None
            self._mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise RuntimeError("arena is not open")
        return self._view

    def slice(self, offset: int, length: int) -> memoryview:
        return self.view[offset : offset + length]

    def close(self, *, unlink: bool = True) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A slice is still exported somewhere (a thread finishing a write); the mapping
                # goes away with the process.
                pass
            self._mmap = None
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
