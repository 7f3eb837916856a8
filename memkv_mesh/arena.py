"""The DRAM arena: shared-memory files that the daemon maps and hands to local clients.

Theory of operation
-------------------
* The daemon owns a directory ``<arena_dir>/memkv-<node_id>-<hash of data_dir>/`` (tmpfs under
  /dev/shm by default), mode 0700. A path there that is a symlink, not a directory, or owned by
  someone else is refused (``ArenaError``): nothing is followed, truncated or re-moded. Inside,
  one file per *segment*, ``<name>.arena``, created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a stale
  file of a dead daemon is unlinked first: the directory is ours), mode 0600, sized, optionally
  reserved (``posix_fallocate``, so a full tmpfs fails at start-up instead of SIGBUS later) and
  mapped read-write.
* Segments: one (``default``) for a single-tenant node; with tenants, ``_mesh`` (blocks received
  from the mesh, mapped by no client) and one per tenant, sized by its DRAM quota. The store sees
  one address space: segment ``i`` covers ``[base_i, base_i + size_i)`` and a block never spans
  two. ``slice(offset, length)`` finds the segment.
* Clients never open these files by path: after the handshake the daemon passes the client's own
  segment as a file descriptor over the Unix socket (``SCM_RIGHTS``), and offsets in replies are
  relative to that segment. A client maps no byte of another tenant's segment.
* ``check()`` compares each path with the file the daemon holds open (device, inode, still
  linked): a deleted or replaced arena file is reported (the daemon logs it loudly and shows it in
  ``status``); the daemon keeps serving from the file it holds.
* The files are unlinked when the daemon stops; a daemon that died leaves them behind and the
  next daemon for the same node id and data dir removes them.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import stat
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Arena", "ArenaError", "Segment", "arena_dir_path"]


class ArenaError(OSError):
    """The arena cannot be created safely (the message says what is wrong and what to do)."""


def arena_dir_path(arena_dir: Path, node_id: str, data_dir: Path) -> Path:
    """One arena directory per daemon: the node id for humans, a hash of the data dir (which the
    daemon holds an exclusive lock on) so two daemons on one host never share it."""
    tag = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=4).hexdigest()
    return arena_dir / f"memkv-{node_id}-{tag}"


class Segment:
    __slots__ = ("base", "fd", "ident", "mmap", "name", "path", "size", "view")

    def __init__(self, name: str, base: int, size: int, path: Path) -> None:
        self.name = name
        self.base = base
        self.size = size
        self.path = path
        self.fd = -1
        self.ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file we created
        self.mmap: mmap.mmap | None = None
        self.view: memoryview | None = None


class Arena:
    def __init__(self, directory: Path, segments: Sequence[tuple[str, int]] | int, *, preallocate: bool = True) -> None:
        """``segments``: (name, bytes) each, or one size for a single ``default`` segment."""
        if isinstance(segments, int):
            segments = [("default", segments)]
        if not segments:
            raise ValueError("an arena needs at least one segment")
        self.directory = directory
        self._preallocate = preallocate
        self.segments: list[Segment] = []
        base = 0
        for name, size in segments:
            if size <= 0 or size % mmap.PAGESIZE:
                raise ValueError(f"arena segment {name!r} size must be a positive multiple of {mmap.PAGESIZE}, got {size}")
            self.segments.append(Segment(name, base, size, directory / f"{name}.arena"))
            base += size
        self.size = base
        self._bases = [s.base for s in self.segments]
        self._dir_fd = -1

    @property
    def path(self) -> Path:
        """The first segment's file (a single-tenant node's only one)."""
        return self.segments[0].path

    # ---- life cycle -------------------------------------------------------------------------------
    def open(self) -> None:
        self._dir_fd = self._open_dir()
        try:
            for seg in self.segments:
                self._open_segment(seg)
        except BaseException:
            self.close()
            raise

    def _open_dir(self) -> int:
        d = self.directory
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ArenaError(
                e.errno, f"cannot create the arena directory {d}: {os.strerror(e.errno or 0)} (check [node] arena_dir)"
            ) from None
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise ArenaError(f"the arena directory {d} exists and is not a directory (a symlink?): remove it or set [node] arena_dir")
        if st.st_uid != os.geteuid():
            raise ArenaError(
                f"the arena directory {d} belongs to uid {st.st_uid}, not to this daemon (uid {os.geteuid()}): "
                "remove it or set [node] arena_dir"
            )
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st2 = os.fstat(fd)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
                raise ArenaError(f"the arena directory {d} was replaced while it was opened; try again")
            if stat.S_IMODE(st2.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_segment(self, seg: Segment) -> None:
        name = seg.path.name
        try:
            os.unlink(name, dir_fd=self._dir_fd)  # a dead daemon's file: the directory is ours
        except FileNotFoundError:
            pass
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        try:
            os.fchmod(fd, 0o600)
            free = os.fstatvfs(fd)
            if self._preallocate and free.f_bavail * free.f_frsize < seg.size:
                raise ArenaError(
                    f"the arena segment {seg.path} needs {seg.size} bytes and {self.directory.parent} has "
                    f"{free.f_bavail * free.f_frsize} free (lower store.dram_bytes or set [node] arena_dir)"
                )
            try:
                os.ftruncate(fd, seg.size)
            except OSError as e:
                raise ArenaError(
                    e.errno, f"cannot size the arena file {seg.path} to {seg.size} bytes: {os.strerror(e.errno or 0)} "
                    "(lower store.dram_bytes or set [node] arena_dir)",
                ) from None
            if self._preallocate:
                try:
                    os.posix_fallocate(fd, 0, seg.size)
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"cannot reserve {seg.size} bytes for the arena at {seg.path}: "
                        f"{os.strerror(e.errno or 0)} (lower store.dram_bytes or free space there)",
                    ) from None
            seg.mmap = mmap.mmap(fd, seg.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            raise
        seg.fd = fd
        seg.ident = (st.st_dev, st.st_ino)
        seg.view = memoryview(seg.mmap)

    def close(self, *, unlink: bool = True) -> None:
        for seg in self.segments:
            if seg.view is not None:
                seg.view.release()
                seg.view = None
            if seg.mmap is not None:
                try:
                    seg.mmap.close()
                except BufferError:
                    # A slice is still exported somewhere (a thread finishing a write); the
                    # mapping goes away with the process.
                    pass
                seg.mmap = None
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1
            if unlink and self._dir_fd >= 0 and self._same_file(seg):
                os.unlink(seg.path.name, dir_fd=self._dir_fd)
        if self._dir_fd >= 0:
            if unlink:
                try:
                    os.rmdir(self.directory)
                except OSError:
                    pass  # not empty (someone else's file) or gone: leave it
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _same_file(self, seg: Segment) -> bool:
        try:
            st = os.stat(seg.path.name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == seg.ident

    # ---- access -----------------------------------------------------------------------------------
    @property
    def view(self) -> memoryview:
        """The first segment's memory (a single-tenant node's whole arena)."""
        v = self.segments[0].view
        if v is None:
            raise RuntimeError("arena is not open")
        return v

    def segment_of(self, offset: int) -> Segment:
        return self.segments[bisect.bisect_right(self._bases, offset) - 1]

    def slice(self, offset: int, length: int) -> memoryview:
        seg = self.segments[bisect.bisect_right(self._bases, offset) - 1] if len(self.segments) > 1 else self.segments[0]
        if seg.view is None:
            raise RuntimeError("arena is not open")
        local = offset - seg.base
        return seg.view[local : local + length]

    # ---- integrity --------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """What is wrong with the arena files on disk (empty when all is well)."""
        out: list[str] = []
        if self._dir_fd < 0:
            return out
        for seg in self.segments:
            try:
                st = os.stat(seg.path.name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                out.append(f"arena file {seg.path} was deleted (the daemon keeps serving from the file it holds open)")
                continue
            if (st.st_dev, st.st_ino) != seg.ident:
                out.append(f"arena file {seg.path} was replaced by another file (inode {st.st_ino}, expected {seg.ident[1]})")
        try:
            st = os.stat(self.directory, follow_symlinks=False)
            held = os.fstat(self._dir_fd)
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
                out.append(f"arena directory {self.directory} was replaced")
        except FileNotFoundError:
            out.append(f"arena directory {self.directory} was deleted")
        return out
