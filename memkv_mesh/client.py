"""Local clients of the node daemon: ``Client`` (sync, thread-safe) and ``AsyncClient`` (Trio).

Both speak ``protocol.py`` over the daemon's Unix socket and map the daemon's shared-memory arena,
so block bytes never cross the socket:

* ``put_many``: ``Alloc`` (one round trip) -> copy each value into its arena slot and checksum it
  (xxh3-64, while the bytes are hot) -> ``Commit`` (one round trip). Values already stored are
  skipped without a copy. If the copy fails, the slots are aborted; if the process dies instead,
  the daemon frees them when the socket closes.
* ``get_many_into``: ``Get`` (one round trip; the blocks are pinned under a lease) -> copy from the
  arena into the caller's buffers -> ``Release`` (no round trip). When the daemon fetches some of
  the blocks from the mesh, the get is streamed: each block (local hits first) comes in a
  ``LocatedPart`` as soon as it is on this node and is copied out at once, while the rest are still
  on the wire (``_Sink``).
* ``get``/``get_many``: zero copy. The returned ``Lease`` holds read-only memoryviews into the
  arena; the blocks stay pinned until ``lease.release()`` (or the ``with`` block ends, or the
  client closes). Views are released with the lease: do not keep slices of them past it.
* ``lookup``: how many leading keys of a prompt are present; answered from the daemon's index.

Errors from the daemon raise ``MemkvError`` (``.code`` is the protocol's error code); a bad
argument raises ``ValueError``/``TypeError`` before anything is sent.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import trio
import xxhash

from memkv_mesh import protocol
from memkv_mesh.keys import KEY_BYTES

__all__ = ["AsyncClient", "Client", "Lease", "MemkvError", "default_socket_path"]

T = TypeVar("T", bound=protocol.Msg)
# Copies larger than this in AsyncClient run in a worker thread so the caller's loop stays live.
_ASYNC_THREAD_COPY_BYTES = 4 * 1024 * 1024


class MemkvError(Exception):
    """The daemon refused a request; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def default_socket_path() -> Path:
    """$MEMKV_SOCKET, else the socket of a daemon started on the checked-in mesh.toml here."""
    env = os.environ.get("MEMKV_SOCKET")
    return Path(env) if env else Path(".memkv") / "memkv.sock"


def _as_view(value: Any, i: int) -> memoryview:
    try:
        v = memoryview(value)
    except TypeError:
        raise TypeError(f"value {i} ({type(value).__name__}) does not support the buffer protocol") from None
    if not v.c_contiguous:
        raise ValueError(f"value {i} is not C-contiguous; pass a contiguous buffer")
    return v.cast("B") if v.format != "B" or v.ndim != 1 else v


def _writable(buffer: Any, i: int) -> memoryview:
    v = _as_view(buffer, i)
    if v.readonly:
        raise ValueError(f"buffer {i} is read-only")
    return v


class _Parts:
    """One block's bytes in several host buffers, in order: a list (or tuple) of buffers given as
    one value of ``put_many`` (gathered into the block) or one buffer of ``get_many_into``
    (the block scattered across them), e.g. a paged KV block's slices in each layer."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.nbytes = sum(p.nbytes for p in parts)

    def cut(self, length: int) -> _Parts:
        """The first ``length`` bytes (a block shorter than the parts fills only those)."""
        out: list[memoryview] = []
        for p in self.parts:
            if length <= 0:
                break
            out.append(p[:length] if p.nbytes > length else p)
            length -= p.nbytes
        return _Parts(out)

    def pieces(self, whole: memoryview) -> list[tuple[memoryview, memoryview]]:
        """(part, the slice of ``whole`` at its place) for each part; ``whole`` is as long as all."""
        out, off = [], 0
        for p in self.parts:
            out.append((p, whole[off : off + p.nbytes]))
            off += p.nbytes
        return out

    def digest(self) -> int:
        h = xxhash.xxh3_64()
        for p in self.parts:
            h.update(p)
        return h.intdigest()


def _parted(view: Any) -> Any:
    """``_as_view``/``_writable`` that also takes a list or tuple of buffers, as ``_Parts``."""

    def of(value: Any, i: int) -> memoryview | _Parts:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError(f"value {i} is an empty list of buffers")
            return _Parts([view(part, i) for part in value])
        return view(value, i)

    return of


def _check_keys(keys: Sequence[bytes]) -> list[bytes]:
    ks = keys if isinstance(keys, list) else list(keys)
    # Fast path in C loops: every key is bytes of the right length (lookups are latency-bound).
    if set(map(type, ks)) <= {bytes} and set(map(len, ks)) <= {KEY_BYTES}:
        return ks
    out = []
    for i, k in enumerate(ks):
        if not isinstance(k, bytes | bytearray | memoryview):
            raise TypeError(f"key {i} is {type(k).__name__}; keys are {KEY_BYTES} bytes")
        kb = bytes(k)
        if len(kb) != KEY_BYTES:
            raise ValueError(f"key {i} is {len(kb)} bytes; keys are {KEY_BYTES} bytes (see memkv_mesh.keys)")
        out.append(kb)
    return out


def _any_device(values: list[Any]) -> bool:
    return any(type(v) is not memoryview and type(v) is not _Parts for v in values)


# Room for a few descriptors in recvmsg's ancillary data (the daemon sends one, with its Welcome).
_ANC_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _copy(dst: memoryview, src: memoryview) -> None:
    # numpy copies with the GIL released, so other engine threads keep running.
    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def _copy_sum(dst: memoryview, src: memoryview) -> int:
    """Copy into an arena slot and checksum what landed there (xxh3 releases the GIL too)."""
    _copy(dst, src)
    return xxhash.xxh3_64_intdigest(dst)


# Batches of at least this many bytes are copied by a small thread pool: on a multi-core host two
# copies in flight move more bytes per second than one (memory bandwidth outruns one core's copy
# loop), and both numpy's copy and xxh3 release the GIL.
_PARALLEL_COPY_BYTES = 8 * 1024 * 1024
_POOL_WORKERS = max(1, min(4, os.cpu_count() or 1))
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _run_jobs(fn: Any, jobs: list[tuple[memoryview, memoryview]]) -> list[Any]:
    total = sum(src.nbytes for _, src in jobs)
    if _POOL_WORKERS < 2 or len(jobs) < 2 or total < _PARALLEL_COPY_BYTES:
        return [fn(dst, src) for dst, src in jobs]
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="memkv-copy")
    return list(_pool.map(lambda job: fn(*job), jobs))


class Lease:
    """Pinned blocks read in place. Release it (or use ``with``) when done with the views."""

    __slots__ = ("_client", "_id", "_views", "__weakref__")

    def __init__(self, client: _Core, lease_id: int, views: list[memoryview | None]) -> None:
        self._client = client
        self._id = lease_id
        self._views = views

    @property
    def views(self) -> list[memoryview | None]:
        """One read-only view per key asked for, None for a miss."""
        return self._views

    @property
    def view(self) -> memoryview:
        """The first block's view (for ``Client.get``)."""
        v = self._views[0] if self._views else None
        if v is None:
            raise KeyError("block not found")
        return v

    @property
    def released(self) -> bool:
        return self._id == 0

    def release(self) -> None:
        if self._id:
            for v in self._views:
                if v is not None:
                    try:
                        v.release()
                    except BufferError:
                        pass  # a numpy array still looks at it; the lease ends anyway
            self._client._release(self._id)
            self._id = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._id:
            self._client._release_later(self._id)
            self._id = 0


class _Sink:
    """Where a get's blocks go: one buffer per key, or one buffer with the blocks found packed
    back to back in key order. Blocks may come in parts (a streamed get) and are copied as soon
    as their place is known: at once for a list of buffers, once every earlier key is settled for
    a packed buffer. ``add``/``finish`` return the leases whose blocks are all copied out; they do
    not raise: a bad buffer is kept in ``error`` (raised by the caller once the reply stream has
    been read to its end) and from then on blocks are released without a copy."""

    def __init__(self, core: _Core, buffers: Any, n: int, verify: bool = False) -> None:
        self.core = core
        self.n = n
        self.verify = verify
        self.device = False
        self.targets: list[Any] | None = None
        self.packed: Any = None
        if isinstance(buffers, list | tuple):
            if len(buffers) != n:
                raise ValueError(f"{n} keys but {len(buffers)} buffers")
            writable = _parted(_writable)
            try:
                self.targets = [writable(b, i) for i, b in enumerate(buffers)]
            except TypeError:
                self.targets = core._gpu_views(buffers, "buffer", writable, writable=True)
                self.device = True
                if any(type(t) is _Parts for t in self.targets):
                    raise TypeError("lists of buffers are for host memory; pass one GPU buffer per key") from None
        else:
            try:
                self.packed = _writable(buffers, 0)
            except TypeError:
                self.packed = core._gpu_views([buffers], "buffer", _writable, writable=True)[0]
                self.device = True
        self.got: list[int | None] = [None] * n
        self.known = [False] * n
        self.waiting: dict[int, tuple[int, int, int]] = {}  # key index -> (offset, length, lease)
        self.refs: collections.Counter[int] = collections.Counter()  # lease -> blocks not copied
        self.sums: dict[int, int | None] = {}  # verify into a list of host buffers: checked after the copy
        self.settled = 0  # packed: keys [0, settled) are copied or missing
        self.pos = 0  # packed: bytes used by them
        self.error: Exception | None = None

    def add(self, part: protocol.LocatedPart) -> list[int]:
        if len(part.index) != len(part.blocks) or any(not 0 <= i < self.n or self.known[i] for i in part.index):
            self.error = self.error or MemkvError(protocol.BAD_REQUEST, "the daemon sent a malformed LocatedPart")
            self.known = [True] * self.n
            return [part.lease, *self._drain()] if part.lease else self._drain()
        sums = part.checksums if len(part.checksums) == len(part.blocks) else [None] * len(part.blocks)
        kept = 0
        for i, b, c in zip(part.index, part.blocks, sums, strict=True):
            kept += self._note(i, b, part.lease, c)
        free = self._drain()
        if part.lease and not kept:
            free.append(part.lease)  # every block of the part failed verification
        return free

    def finish(self, loc: protocol.Located) -> list[int]:
        """The final reply; returns the leases of parts still to release (not ``loc.lease``)."""
        if len(loc.blocks) != self.n and self.error is None:
            self.error = MemkvError(protocol.BAD_REQUEST, f"{self.n} keys but {len(loc.blocks)} blocks in the reply")
        sums = loc.checksums if len(loc.checksums) == len(loc.blocks) else [None] * len(loc.blocks)
        for i, b in enumerate(loc.blocks[: self.n]):
            if not self.known[i]:
                self._note(i, b, 0, sums[i])  # lease 0: the caller releases the final lease itself
        self.known = [True] * self.n
        return self._drain()

    def pending_bytes(self) -> int:
        """Bytes of blocks handed over but not copied yet (waiting for an earlier key)."""
        return sum(v[1] for v in self.waiting.values())

    def abandon(self) -> list[int]:
        """The get failed: the leases of parts not yet released, nothing copied."""
        self.waiting.clear()
        free = [lease for lease in self.refs if lease]
        self.refs.clear()
        return free

    def _note(self, i: int, b: tuple[int, int] | None, lease: int, checksum: int | None = None) -> bool:
        """Record key ``i``'s block; False if there is none to copy (a miss, or changed since
        its commit when verifying: never served)."""
        self.known[i] = True
        if b is not None and self.verify and self.error is None:
            if self.targets is not None and not self.device:
                # Checked in the caller's buffer after the copy: no window for a change in between.
                self.sums[i] = checksum
            elif not self.core._intact(b, checksum):
                # A packed buffer (a hole would move every later block) or a GPU buffer: checked
                # in the arena just before the copy.
                b = None
        if b is None:
            return False
        self.got[i] = b[1]
        self.waiting[i] = (b[0], b[1], lease)
        self.refs[lease] += 1
        return True

    def _drain(self) -> list[int]:
        ready: list[int] = []
        dests: list[Any] = []
        if self.error is None and self.targets is not None:
            ready = list(self.waiting)
            for i in ready:
                t, length = self.targets[i], self.waiting[i][1]
                if t.nbytes < length:
                    self.error = ValueError(f"buffer {i} holds {t.nbytes} bytes; block {i} is {length}")
                    break
                dests.append(t.cut(length) if type(t) is _Parts else t[:length])
        elif self.error is None:
            while self.settled < self.n and self.known[self.settled]:
                if self.settled in self.waiting:
                    ready.append(self.settled)
                self.settled += 1
            need = self.pos + sum(self.waiting[i][1] for i in ready)
            if self.packed.nbytes < need:
                total = self.pos + sum(v[1] for v in self.waiting.values())
                least = "" if all(self.known) else "at least "
                self.error = ValueError(f"buffer holds {self.packed.nbytes} bytes; the blocks found need {least}{total}")
            else:
                for i in ready:
                    length = self.waiting[i][1]
                    dests.append(self.packed[self.pos : self.pos + length])
                    self.pos += length
        if self.error is not None:
            ready = list(self.waiting)  # release everything, copy nothing
        else:
            try:
                self._copy([(d, self.waiting[i]) for d, i in zip(dests, ready, strict=True)])
            except Exception as e:  # e.g. a CUDA copy failed: keep the reply stream in step
                self.error = e
                ready = list(self.waiting)
            else:
                if self.sums:
                    for d, i in zip(dests, ready, strict=True):
                        got = d.digest() if type(d) is _Parts else xxhash.xxh3_64_intdigest(d)
                        if i in self.sums and got != self.sums.pop(i):
                            self.got[i] = None  # changed since its commit: a miss, never served
                            self.core.corrupt_reads += 1
        free = []
        for i in ready:
            lease = self.waiting.pop(i)[2]
            self.refs[lease] -= 1
            if self.refs[lease] == 0:
                del self.refs[lease]
                if lease:
                    free.append(lease)
        return free

    def _copy(self, blocks: list[tuple[Any, tuple[int, int, int]]]) -> None:
        if not blocks:
            return
        jobs = [(dst, self.core._slot(off, length)) for dst, (off, length, _) in blocks]
        pieces = [pc for dst, src in jobs if type(dst) is _Parts for pc in dst.pieces(src)]
        try:
            if self.device:
                self.core._gpu.copy_out(jobs)
            elif pieces:
                _run_jobs(_copy, [j for j in jobs if type(j[0]) is not _Parts] + pieces)
            else:
                _run_jobs(_copy, jobs)
        finally:
            for _, src in pieces + jobs:
                src.release()


class _Core:
    """What both clients share: the arena mapping and reply checking."""

    def __init__(self, checksum: bool = False) -> None:
        self.node_id = ""
        self.tenant = ""
        self.max_block_bytes = 0
        # Send our own xxh3-64 of each put block; the daemon then refuses a commit whose bytes
        # differ (an end-to-end check of the copy, at the cost of one more pass over the bytes).
        self.checksum = checksum
        self.corrupt_reads = 0  # blocks a verifying get found changed since their commit (misses)
        self._frames = protocol.FrameBuffer()
        self._mmap: mmap.mmap | None = None
        self._arena: memoryview | None = None
        self._deferred: collections.deque[int] = collections.deque()
        self._gpu: Any = None  # memkv_mesh.gpu.GpuPath, made when the first CUDA buffer shows up

    def _feed_welcome(self, data: bytes, ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
        """Bytes (and descriptors) read while waiting for the Welcome."""
        fds += _received_fds(ancdata)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the daemon closed the connection before its Welcome")
        self._frames.feed(data)

    def _welcome(self, reply: protocol.Msg, fds: list[int]) -> None:
        """Map the arena segment the daemon passed with its Welcome (``fds``; closed here)."""
        try:
            w = self._expect(reply, protocol.Welcome)
            self.node_id = w.node_id
            self.tenant = w.tenant
            self.max_block_bytes = w.max_block_bytes
            self.checksum = self.checksum or w.send_checksums  # the daemon records ours as given
            if w.arena_bytes == 0:
                return  # an operator connection: no arena, no blocks
            if w.arena_fd:
                if not fds:
                    raise MemkvError(protocol.BAD_REQUEST, "the daemon's Welcome came without its arena descriptor")
                fd = fds[0]
            else:  # a daemon from before descriptor passing
                fd = os.open(w.arena_path, os.O_RDWR)
                fds.append(fd)
            self._mmap = mmap.mmap(fd, w.arena_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._arena = memoryview(self._mmap)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _expect(reply: protocol.Msg, typ: type[T]) -> T:
        if isinstance(reply, typ):
            return reply
        if isinstance(reply, protocol.Error):
            raise MemkvError(reply.code, reply.message)
        raise MemkvError(protocol.BAD_REQUEST, f"unexpected reply {type(reply).__name__}")

    def _slot(self, offset: int, length: int) -> memoryview:
        assert self._arena is not None, "client is closed"
        return self._arena[offset : offset + length]

    def _prepare_put(self, keys: Sequence[bytes], values: Sequence[Any]) -> tuple[list[bytes], list[Any]]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        ks = _check_keys(keys)
        as_view = _parted(_as_view)
        try:
            vs = [as_view(v, i) for i, v in enumerate(values)]
        except TypeError:
            vs = self._gpu_views(values, "value", as_view, writable=False)
        for i, v in enumerate(vs):
            if v.nbytes == 0:
                raise ValueError(f"value {i} is empty")
            if v.nbytes > self.max_block_bytes:
                raise ValueError(
                    f"value {i} is {v.nbytes} bytes; the daemon's limit is {self.max_block_bytes} (store.max_block_bytes)"
                )
        return ks, vs

    def _fill(self, offsets: list[int], keys: list[bytes], values: list[Any]) -> tuple[list[bytes], list[int]]:
        """Copy values (views, ``_Parts`` or GPU views) into their slots; their checksums if
        ``self.checksum`` (else [])."""
        done_keys: list[bytes] = []
        jobs: list[tuple[memoryview, Any]] = []
        for k, off, v in zip(keys, offsets, values, strict=True):
            if off >= 0:
                jobs.append((self._slot(off, v.nbytes), v))
                done_keys.append(k)
        pieces = [(dst, part) for slot, v in jobs if isinstance(v, _Parts) for part, dst in v.pieces(slot)]
        try:
            if self._gpu is not None and _any_device(values):
                sums = self._gpu.fill(jobs)
            elif pieces:  # gathered values: copy the parts, then checksum each whole slot
                _run_jobs(_copy, [j for j in jobs if type(j[1]) is not _Parts] + pieces)
                sums = [xxhash.xxh3_64_intdigest(slot) for slot, _ in jobs] if self.checksum else []
            elif self.checksum:
                sums = _run_jobs(_copy_sum, jobs)
            else:
                _run_jobs(_copy, jobs)
                sums = []
        finally:
            for slot, _ in pieces + jobs:
                slot.release()
        return done_keys, sums if self.checksum else []

    def _intact(self, block: tuple[int, int], checksum: int | None) -> bool:
        """Do the arena bytes of ``block`` still hash to the checksum recorded at commit?"""
        if checksum is None:
            return False
        with self._slot(block[0], block[1]) as v:
            ok = xxhash.xxh3_64_intdigest(v) == checksum
        self.corrupt_reads += not ok
        return ok

    def _located_views(self, loc: protocol.Located, verify: bool = False) -> list[memoryview | None]:
        blocks = loc.blocks
        if verify:
            sums = loc.checksums or [None] * len(blocks)
            blocks = [b if b is not None and self._intact(b, c) else None for b, c in zip(blocks, sums, strict=False)]
        return [None if b is None else self._slot(b[0], b[1]).toreadonly() for b in blocks]

    def _gpu_views(self, objs: Sequence[Any], what: str, host: Any, *, writable: bool) -> list[Any]:
        """Some object refused the buffer protocol: CUDA buffers go to memkv_mesh.gpu (imported
        only now); anything else raises the host path's error."""
        from memkv_mesh import gpu

        if not any(gpu.is_cuda(o) for o in objs):
            return [host(o, i) for i, o in enumerate(objs)]
        return gpu.path_for(self).views(objs, what, host, writable=writable)

    def _release(self, lease_id: int) -> None:
        raise NotImplementedError

    def _release_later(self, lease_id: int) -> None:
        self._deferred.append(lease_id)

    def _unmap(self) -> None:
        try:
            if self._gpu is not None:
                self._gpu.close()  # unregister the pinned arena before it is unmapped
        finally:
            if self._arena is not None:
                self._arena.release()
                self._arena = None
            if self._mmap is not None:
                try:
                    self._mmap.close()
                except BufferError:
                    pass  # views still exported; the mapping goes with them
                self._mmap = None


class Client(_Core):
    """Synchronous client; one instance may be shared by many threads."""

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float | None = 60.0, name: str = "",
        checksum: bool = False,
    ) -> None:
        super().__init__(checksum)
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.socket_path))
        except OSError as e:
            self._sock.close()
            raise ConnectionError(
                f"cannot connect to the memkv-mesh daemon at {self.socket_path}: {e.strerror or e} "
                "(is `memkv-mesh daemon` running? set MEMKV_SOCKET or pass the socket path)"
            ) from None
        self._frames = protocol.FrameBuffer()
        self._out = bytearray()
        try:
            self._hello(name)
        except BaseException:
            self._sock.close()
            raise

    def _hello(self, name: str) -> None:
        """Hello, and the Welcome with the arena descriptor riding on its first byte."""
        try:
            self._send(protocol.Hello(protocol.PROTOCOL_VERSION, name, os.getpid()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once (no tenant, too many clients): its Error is still readable
        fds: list[int] = []
        while (body := self._frames.next_frame()) is None:
            self._feed_welcome(*self._sock.recvmsg(65536, _ANC_SPACE)[:2], fds)
        self._welcome(protocol.reply_decoder.decode(body), fds)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _send(self, msg: protocol.Msg) -> None:
        self._out.clear()
        self._sock.sendall(protocol.encode_frame(msg, self._out))

    def _flush_deferred(self) -> None:
        while self._deferred:
            self._send(protocol.Release(self._deferred.popleft()))

    def _call(self, msg: protocol.Msg, sink: _Sink | None = None, done: list[int] | None = None) -> protocol.Reply:
        """Send ``msg`` and return its reply; a streamed get's parts go to ``sink`` meanwhile, and
        the leases of parts copied out are appended to ``done``. They are released only after the
        final reply: the daemon reads nothing while it streams, so a ``Release`` per part would fill
        the socket after a few hundred parts and both sides would wait on each other."""
        with self._lock:
            if self._sock.fileno() < 0:
                raise ConnectionError("client is closed")
            try:
                self._flush_deferred()
                self._send(msg)
                while True:
                    body = self._frames.next_frame()
                    if body is not None:
                        reply = protocol.reply_decoder.decode(body)
                        if not isinstance(reply, protocol.LocatedPart):
                            return reply
                        if sink is None or done is None:
                            raise MemkvError(protocol.BAD_REQUEST, "the daemon sent a LocatedPart unasked")
                        done += sink.add(reply)
                        continue
                    data = self._sock.recv(65536)
                    if not data:
                        raise ConnectionError("the daemon closed the connection")
                    self._frames.feed(data)
            except BaseException as e:
                # A request half sent or a reply half read leaves the stream out of step: the next
                # reply would answer the wrong request. Close; the daemon frees what we held.
                self._sock.close()
                if isinstance(e, OSError) and not isinstance(e, ConnectionError):
                    raise ConnectionError(f"connection to the daemon lost: {e}") from e
                raise

    def _release(self, lease_id: int) -> None:
        with self._lock:
            if self._sock.fileno() >= 0:
                self._send(protocol.Release(lease_id))

    # ---- API ----------------------------------------------------------------------------------------
    def put(self, key: bytes, value: Any) -> bool:
        """Store one block; False if it was already stored."""
        return self.put_many([key], [value]) == 1

    def put_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> int:
        """Store blocks; returns how many were new. All or nothing if the store is full.

        A value is a buffer, or a list of buffers gathered into one block in order (e.g. a paged
        KV block's slice of each layer: no concatenated copy needed)."""
        ks, vs = self._prepare_put(keys, values)
        if not ks:
            return 0
        offsets = self._expect(self._call(protocol.Alloc(ks, [v.nbytes for v in vs])), protocol.Allocated).offsets
        try:
            done, sums = self._fill(offsets, ks, vs)
        except BaseException:
            self._call(protocol.Abort([k for k, o in zip(ks, offsets, strict=True) if o >= 0]))
            raise
        if not done:
            return 0
        return self._expect(self._call(protocol.Commit(done, sums)), protocol.Count).n

    def get_many(self, keys: Sequence[bytes], *, verify: bool = False) -> Lease:
        """Zero-copy views of the blocks (None for misses), pinned until the lease is released.

        ``verify``: hash each block before handing it over and treat one that no longer matches
        the checksum recorded at its commit as a miss (one pass over the bytes, ~0.1 ms per MiB)."""
        loc = self._expect(self._call(protocol.Get(_check_keys(keys), checksums=verify)), protocol.Located)
        return Lease(self, loc.lease, self._located_views(loc, verify))

    def get(self, key: bytes) -> Lease | None:
        """A zero-copy view of one block (``lease.view``), or None on a miss."""
        lease = self.get_many([key])
        if lease.views[0] is None:
            lease.release()
            return None
        return lease

    def get_many_into(self, keys: Sequence[bytes], buffers: Any, *, verify: bool = False) -> list[int | None]:
        """Copy blocks into ``buffers`` (a list, one per key, or one buffer packed in key order).
        A list's entry may itself be a list of host buffers: the block is scattered across them in
        order (e.g. straight into a paged KV block's slice of each layer).

        Returns each block's length, None for a miss. Blocks this node fetches from the mesh
        are streamed: each is copied out as soon as it lands, while the rest are on the wire.
        ``verify``: see ``get_many`` (a block changed since its commit is a miss, not copied).
        """
        ks = _check_keys(keys)
        sink = _Sink(self, buffers, len(ks), verify)
        free: list[int] = []
        try:
            loc = self._expect(self._call(protocol.Get(ks, stream=True, checksums=verify), sink, free), protocol.Located)
            if loc.lease:
                free.append(loc.lease)
            free += sink.finish(loc)
        finally:
            for lease in free + sink.abandon():
                self._release(lease)
        if sink.error is not None:
            raise sink.error
        return sink.got

    def get_into(self, key: bytes, buffer: Any, *, verify: bool = False) -> int | None:
        """Copy one block into ``buffer``; its length, or None on a miss."""
        return self.get_many_into([key], [buffer], verify=verify)[0]

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are present on this node."""
        return self._expect(self._call(protocol.Lookup(_check_keys(keys))), protocol.Count).n

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self._expect(self._call(protocol.Contains(_check_keys(keys))), protocol.Present).present

    def delete(self, keys: Sequence[bytes] | bytes, *, local: bool = False) -> int:
        """Delete blocks; returns how many had a copy deleted. On a mesh node the delete is
        mesh-wide (owners and holders too, and no replica brings them back); ``local=True`` drops
        only this node's copies (the mesh keeps its replicas)."""
        ks = [keys] if isinstance(keys, bytes) else list(keys)
        return self._expect(self._call(protocol.Delete(_check_keys(ks), local)), protocol.Count).n

    def stats(self) -> dict[str, Any]:
        return self._expect(self._call(protocol.StatsRequest()), protocol.StatsReply).stats

    def members(self) -> list[dict[str, Any]]:
        return self._expect(self._call(protocol.MembersRequest()), protocol.MembersReply).members

    def close(self) -> None:
        with self._lock:
            if self._sock.fileno() >= 0:
                self._sock.close()
        self._unmap()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Core):
    """Trio client: ``async with await AsyncClient.connect(path) as c: ...``."""

    def __init__(self, stream: trio.SocketStream, socket_path: Path, checksum: bool = False) -> None:
        super().__init__(checksum)
        self.socket_path = socket_path
        self._stream = stream
        self._lock = trio.Lock()
        self._frames = protocol.FrameBuffer()
        self._out = bytearray()
        self._closed = False

    @classmethod
    async def connect(
        cls, socket_path: str | os.PathLike[str] | None = None, *, name: str = "", checksum: bool = False
    ) -> AsyncClient:
        path = Path(socket_path) if socket_path is not None else default_socket_path()
        try:
            stream = await trio.open_unix_socket(str(path))
        except OSError as e:
            raise ConnectionError(
                f"cannot connect to the memkv-mesh daemon at {path}: {e.strerror or e} (is `memkv-mesh daemon` running?)"
            ) from None
        self = cls(stream, path, checksum)
        try:
            try:
                await self._send(protocol.Hello(protocol.PROTOCOL_VERSION, name, os.getpid()))
            except trio.BrokenResourceError:
                pass  # refused at once (no tenant, too many clients): its Error is still readable
            fds: list[int] = []
            while (body := self._frames.next_frame()) is None:
                self._feed_welcome(*(await stream.socket.recvmsg(65536, _ANC_SPACE))[:2], fds)
            self._welcome(protocol.reply_decoder.decode(body), fds)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return self

    async def _send(self, msg: protocol.Msg) -> None:
        self._out.clear()
        await self._stream.send_all(protocol.encode_frame(msg, self._out))

    async def _call(
        self, msg: protocol.Msg, sink: _Sink | None = None, done: list[int] | None = None
    ) -> protocol.Reply:
        """Send ``msg`` and return its reply; a streamed get's parts go to ``sink`` meanwhile and
        the leases of parts copied out go to ``done``, released after the reply (see Client._call)."""
        async with self._lock:
            if self._closed:
                raise ConnectionError("client is closed")
            try:
                while self._deferred:
                    await self._send(protocol.Release(self._deferred.popleft()))
                await self._send(msg)
                while True:
                    body = self._frames.next_frame()
                    if body is not None:
                        reply = protocol.reply_decoder.decode(body)
                        if not isinstance(reply, protocol.LocatedPart):
                            return reply
                        if sink is None or done is None:
                            raise MemkvError(protocol.BAD_REQUEST, "the daemon sent a LocatedPart unasked")
                        if sink.pending_bytes() + sum(b[1] for b in reply.blocks) > _ASYNC_THREAD_COPY_BYTES:
                            done += await trio.to_thread.run_sync(sink.add, reply)
                        else:
                            done += sink.add(reply)
                        continue
                    data = await self._stream.receive_some(65536)
                    if not data:
                        raise ConnectionError("the daemon closed the connection")
                    self._frames.feed(data)
            except BaseException as e:
                # Cancelled or broken mid-request: the stream is out of step with the replies.
                # Close it; the daemon frees whatever this connection held.
                self._closed = True
                with trio.CancelScope(shield=True):
                    await self._stream.aclose()
                if isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError):
                    raise ConnectionError(f"connection to the daemon lost: {e}") from e
                raise

    def _release(self, lease_id: int) -> None:
        # Called from sync code (Lease.release): queue it; the next request sends it first.
        self._deferred.append(lease_id)

    async def release(self, lease: Lease) -> None:
        """Release a lease and tell the daemon now (``lease.release()`` defers the message)."""
        lease.release()
        async with self._lock:
            while self._deferred and not self._closed:
                await self._send(protocol.Release(self._deferred.popleft()))

    async def put(self, key: bytes, value: Any) -> bool:
        return await self.put_many([key], [value]) == 1

    async def put_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> int:
        ks, vs = self._prepare_put(keys, values)
        if not ks:
            return 0
        offsets = self._expect(await self._call(protocol.Alloc(ks, [v.nbytes for v in vs])), protocol.Allocated).offsets
        try:
            if sum(v.nbytes for v in vs) > _ASYNC_THREAD_COPY_BYTES:
                done, sums = await trio.to_thread.run_sync(self._fill, offsets, ks, vs)
            else:
                done, sums = self._fill(offsets, ks, vs)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._call(protocol.Abort([k for k, o in zip(ks, offsets, strict=True) if o >= 0]))
            raise
        if not done:
            return 0
        return self._expect(await self._call(protocol.Commit(done, sums)), protocol.Count).n

    async def get_many(self, keys: Sequence[bytes], *, verify: bool = False) -> Lease:
        """See ``Client.get_many``."""
        loc = self._expect(await self._call(protocol.Get(_check_keys(keys), checksums=verify)), protocol.Located)
        return Lease(self, loc.lease, self._located_views(loc, verify))

    async def get(self, key: bytes) -> Lease | None:
        lease = await self.get_many([key])
        if lease.views[0] is None:
            lease.release()
            return None
        return lease

    async def get_many_into(self, keys: Sequence[bytes], buffers: Any, *, verify: bool = False) -> list[int | None]:
        """See ``Client.get_many_into``."""
        ks = _check_keys(keys)
        sink = _Sink(self, buffers, len(ks), verify)
        free: list[int] = []
        try:
            loc = self._expect(
                await self._call(protocol.Get(ks, stream=True, checksums=verify), sink, free), protocol.Located
            )
            if loc.lease:
                free.append(loc.lease)
            if sink.pending_bytes() + sum(b[1] for b in loc.blocks if b is not None) > _ASYNC_THREAD_COPY_BYTES:
                free += await trio.to_thread.run_sync(sink.finish, loc)
            else:
                free += sink.finish(loc)
        finally:
            free += sink.abandon()
            if free:
                with trio.CancelScope(shield=True):
                    async with self._lock:
                        if not self._closed:
                            for lease in free:
                                await self._send(protocol.Release(lease))
        if sink.error is not None:
            raise sink.error
        return sink.got

    async def get_into(self, key: bytes, buffer: Any, *, verify: bool = False) -> int | None:
        return (await self.get_many_into([key], [buffer], verify=verify))[0]

    async def lookup(self, keys: Sequence[bytes]) -> int:
        return self._expect(await self._call(protocol.Lookup(_check_keys(keys))), protocol.Count).n

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self._expect(await self._call(protocol.Contains(_check_keys(keys))), protocol.Present).present

    async def delete(self, keys: Sequence[bytes] | bytes, *, local: bool = False) -> int:
        """See ``Client.delete``."""
        ks = [keys] if isinstance(keys, bytes) else list(keys)
        return self._expect(await self._call(protocol.Delete(_check_keys(ks), local)), protocol.Count).n

    async def stats(self) -> dict[str, Any]:
        return self._expect(await self._call(protocol.StatsRequest()), protocol.StatsReply).stats

    async def members(self) -> list[dict[str, Any]]:
        return self._expect(await self._call(protocol.MembersRequest()), protocol.MembersReply).members

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.aclose()
        self._unmap()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
