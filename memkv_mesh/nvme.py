"""The NVMe tier of a node's block store: blocks in preallocated files, an append-only journal.

Theory of operation
-------------------
Layout of the tier's directory::

    lock                 flock'ed while a tier is open: two daemons never share a directory
    journal              the index: a header, then fixed 80-byte PUT/DEL records, in order
    blocks-0000.dat ...  data files of ``file_size`` bytes (the last one holds the remainder of
                         ``capacity``), reserved up front with posix_fallocate

A block lives in one extent of one data file, from that file's :class:`ExtentAllocator`: a
72-byte header (magic, version, seq, length, payload checksum, key, header checksum) padded to
``align``, then the payload. ``nvme_format.py`` has the exact bytes.

Rules kept:

* **Checksum on write, verify on read.** The payload checksum (xxh3-64, computed by the caller
  when the block entered DRAM) is stored in the header and the journal. Every ``read_into``
  checks the header against the index (key, seq, length, checksum) and the payload against the
  checksum. A mismatch drops the block (DEL record, extent freed) and returns None: a corrupt or
  torn block is a miss, never served.
* **Write, then journal, then publish.** ``put`` allocates an extent, writes header + payload
  outside the lock, then appends PUT and makes the block visible (``put_many`` does the same for
  a batch, with one journal append for all its PUT records: ~24 instead of ~45 us of CPU per
  16 KiB block, measured). A crash before the PUT record
  leaves an extent that nothing names, free again after restart. Removals (delete, replace,
  eviction, corruption) append DEL *before* the extent can be reused, so in the journal a DEL of
  an extent always precedes the PUT of the next block placed there.
* **Last record wins.** Replay applies records in journal order; a later PUT of a key replaces
  the earlier one. ``seq`` is unique per tier (the journal header carries the next one across
  compactions), so a header left over from an older block never matches a newer record.
* **Pinned extents are never reused.** A reader pins the block under the lock and reads outside
  it; a block removed meanwhile is marked dead and its extent is freed when the last reader
  unpins. Blocks being written are not in the eviction policy, so they are never victims.
* **Compaction.** When the journal holds more than ``compact_ratio`` times as many records as
  there are live blocks (and at least ``compact_min_records``), it is rewritten: a new file with
  one PUT per live block, fsync, rename over ``journal``, fsync the directory. Open always
  compacts, which also cuts off a torn tail.

Crash cases (process crash or power loss; ``sync=True`` adds fdatasync of the payload before its
PUT record and of each record, which turns "lost" into "kept" for acknowledged puts on power
loss, but is never needed for "never served wrong"):

1. crash during the payload write, before PUT: no record names the extent; it is free on replay.
2. PUT persisted, payload not (power loss without sync): the header at the extent is stale or
   zero; the open-time header check (key, seq, length, checksum) fails -> dropped_torn. A header
   that persisted without its payload passes that check but fails the payload checksum on the
   first read (or on open with ``verify_all``) -> dropped_corrupt.
3. torn journal tail (a partial or garbage record): replay stops at the first record whose
   checksum fails; everything after it is ignored and cut off by the compaction on open.
4. DEL lost but the extent was already reused by a later, persisted PUT: the two records
   overlap; the newer seq keeps the extent, the older is dropped_torn.
5. crash during compaction: ``journal`` is either the old file or the complete new one (rename is
   atomic); a stale ``journal.tmp`` is overwritten next time.
6. corrupt journal header (checksum fails): nothing in the journal can be trusted; every block
   is dropped (``journal_reset``) and the tier starts empty. A foreign magic or a newer format
   version is refused with ValueError instead, so a wrong directory is never overwritten.
7. a record pointing outside the current layout (capacity shrunk since): dropped_outside.

Faults (ENOSPC, EIO): the data files are reserved at open, so a full file system shows up as a
failed journal append (or, on a file system without fallocate, a failed payload write); a dying
device as EIO anywhere. No such error escapes as a bare OSError from ``put``/``put_many``/
``read_into``/``delete``, and none leaves a half-recorded block:

* a failed payload write or PUT append frees the block's extent and indexes nothing (a short or
  failed append is cut back with ftruncate; if even that fails, no record is appended again until
  a later ftruncate succeeds, so valid records never follow garbage);
* a DEL that cannot be appended still takes the block out of the index, and its header is zeroed
  in place (the data files need no new space), so a restart drops the stale PUT as torn; if that
  write fails too, a restart may bring back the block's old, intact bytes (checked as always);
* a read error is a miss: the block is dropped as corrupt and never served;
* the first error makes the tier *degraded* (``degraded``, ``statistics()``; logged once per
  transition with the error). A degraded tier refuses writes with ``NvmeDegradedError`` without
  touching the disk, except one write every ``probe_interval`` seconds, which is let through as a
  probe; the first write that succeeds ends the degraded state (logged). ``put`` raises
  ``NvmeIOError`` when its own write failed; both subclass ``NvmeFullError`` ("the tier did not
  store this block"), so a caller that drops a clean block on NvmeFullError keeps working;
* open on a full disk keeps the old journal (its torn tail cut with ftruncate) when it cannot
  write the compacted one, and starts degraded.

Threads: every method may be called from several worker threads at once (the store calls them
via ``trio.to_thread.run_sync``). One ``threading.Lock`` guards the index, allocators, policy,
journal and counters; payload I/O runs outside it. ``close`` waits for reads and writes in
flight. Eviction order is not persisted: after a restart blocks re-enter the policy oldest
write first.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import xxhash

from memkv_mesh.alloc import ExtentAllocator
from memkv_mesh.nvme_format import (
    HEADER_SIZE,
    KEY_SIZE,
    REC_DEL,
    REC_PUT,
    RECORD_SIZE,
    BlockHeader,
    JournalHeader,
    Record,
    decode_block_header,
    decode_journal_header,
    decode_record,
    encode_block_header,
    encode_journal_header,
    encode_record,
)
from memkv_mesh.nvme_io import BlockIO, PosixBlockIO

if TYPE_CHECKING:
    from collections.abc import Callable

    from memkv_mesh.eviction import EvictionPolicy

__all__ = [
    "DEFAULT_FILE_SIZE",
    "DEFAULT_PROBE_INTERVAL",
    "NvmeDegradedError",
    "NvmeFullError",
    "NvmeIOError",
    "NvmeStats",
    "NvmeTier",
    "RecoveryReport",
]

# 64 GiB: big enough that a multi-TB flash node has tens of files, not thousands (placement
# scans the files), small enough that one file never approaches a file system's size limit.
DEFAULT_FILE_SIZE = 64 << 30

# A degraded tier lets one write through per this many seconds: often enough that it resumes within
# seconds of space returning, rare enough that a dead disk costs one failed write per interval.
DEFAULT_PROBE_INTERVAL = 5.0

_log = logging.getLogger(__name__)

_JOURNAL = "journal"
_JOURNAL_TMP = "journal.tmp"
_LOCK = "lock"
_U64 = 1 << 64


def _data_name(i: int) -> str:
    return f"blocks-{i:04d}.dat"


class RecoveryReport(msgspec.Struct, frozen=True):
    """What ``NvmeTier.open`` found on disk."""

    recovered: int  # blocks indexed and served from now on
    dropped_torn: int  # header missing or not matching its record (or overlapping a newer one)
    dropped_corrupt: int  # payload checksum mismatch (only checked with verify_all)
    bytes: int  # payload bytes of the recovered blocks
    dropped_outside: int = 0  # records pointing outside the current layout (capacity shrunk)
    journal_records: int = 0  # valid records replayed
    journal_torn_bytes: int = 0  # bytes after the last valid record, cut off
    journal_reset: bool = False  # the journal header was corrupt: everything was dropped


class NvmeStats(msgspec.Struct, frozen=True):
    """A snapshot of an :class:`NvmeTier`'s contents and counters."""

    blocks: int
    used_bytes: int  # extent bytes in use: headers, payloads and alignment
    capacity: int
    reads: int  # verified hits served by read_into
    writes: int  # puts
    bytes_read: int
    bytes_written: int
    dropped_corrupt: int  # blocks dropped at read (or open) because a check failed
    dropped_torn: int  # blocks dropped at open: header missing or mismatched
    evictions: int
    misses: int = 0  # read_into of an absent key
    payload_bytes: int = 0  # sum of the live blocks' lengths
    largest_free: int = 0  # largest contiguous free extent over all files
    pinned: int = 0  # reads in flight
    io_errors: int = 0  # OSErrors on reads and writes (read_errors + write_errors)
    journal_bytes: int = 0
    compactions: int = 0
    compaction_failures: int = 0
    syncs: int = 0  # sync() calls (the "batch" fsync policy)
    degraded: bool = False  # an I/O error (ENOSPC, EIO) happened and no write has succeeded since
    degraded_reason: str = ""  # the error that started it: "journal append: [Errno 28] ..."
    degraded_since: float = 0.0  # Unix time it started (0.0: not degraded)
    write_errors: int = 0  # payload writes, journal appends and syncs that failed
    read_errors: int = 0  # payload reads that failed (each block dropped, a miss)
    refused_writes: int = 0  # puts refused while degraded without touching the disk
    probes: int = 0  # writes let through while degraded to see whether the disk is back
    degraded_episodes: int = 0  # times the tier became degraded
    unjournaled_dels: int = 0  # removals whose DEL could not be appended (header zeroed instead)


class NvmeFullError(RuntimeError):
    """The tier did not store the block. Raised as such when no room could be made (every
    resident block that could free space is pinned); the base of every refusal of a write.

    ``dropped`` lists the keys evicted before giving up (they are gone from the tier)."""

    def __init__(self, message: str, dropped: list[bytes]) -> None:
        super().__init__(message)
        self.dropped = dropped


class NvmeDegradedError(NvmeFullError):
    """Refused without touching the disk: the tier is degraded and no probe is due."""


class NvmeIOError(NvmeFullError):
    """The block's payload write, sync or journal append failed (``errno``: ENOSPC, EIO, ...).
    Nothing of the block was kept; the tier is now degraded."""

    def __init__(self, message: str, dropped: list[bytes], errno_: int | None) -> None:
        super().__init__(message, dropped)
        self.errno = errno_


class _Block:
    __slots__ = ("key", "file", "offset", "length", "checksum", "seq", "extent", "pins", "dead")

    def __init__(
        self, key: bytes, file: int, offset: int, length: int, checksum: int, seq: int, extent: int
    ) -> None:
        self.key = key
        self.file = file
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.seq = seq
        self.extent = extent
        self.pins = 0
        self.dead = False

    def header(self) -> BlockHeader:
        return BlockHeader(self.seq, self.length, self.checksum, self.key)

    def record(self, rtype: int) -> bytes:
        return encode_record(
            Record(rtype, self.file, self.seq, self.key, self.offset, self.length, self.checksum)
        )


class _Staged(NamedTuple):
    """A block of a ``put_many`` between its placement and its PUT record."""

    item: int  # its position in put_many's items
    key: bytes
    view: memoryview
    checksum: int
    file: int
    offset: int
    seq: int


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"a block key must be {KEY_SIZE} bytes, got {got}")
    return key


def _byte_view(buf: object, what: str, *, writable: bool) -> memoryview:
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a bytes-like object, got {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{what} must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class NvmeTier:
    """Blocks on NVMe in preallocated files; see the module docstring for format and rules."""

    def __init__(
        self,
        directory: Path | str,
        capacity: int,
        *,
        policy: str | EvictionPolicy = "lru",
        file_size: int = DEFAULT_FILE_SIZE,
        align: int = 4096,
        sync: bool = False,
        verify_writes: bool = False,
        compact_ratio: int = 4,
        compact_min_records: int = 4096,
        io_factory: Callable[[list[Path], list[int]], BlockIO] = PosixBlockIO,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``capacity`` bytes of data files in ``directory`` (created if missing).

        ``policy``: an eviction policy name for ``memkv_mesh.eviction.make_policy`` or a policy
        object. ``file_size``: bytes per data file (the last file is smaller when ``capacity`` is
        not a multiple); the largest block is ``file_size`` minus one header region. ``sync``:
        fdatasync the payload before its PUT record and every record after it is appended.
        ``verify_writes``: check the caller's checksum on put (one extra pass over the bytes).
        ``io_factory``: builds the payload I/O backend from the data files' paths and sizes.
        ``probe_interval``: seconds between the writes a degraded tier lets through as probes;
        ``clock``: the monotonic clock that times them (tests pass a fake).
        """
        if (
            isinstance(align, bool)
            or not isinstance(align, int)
            or align <= 0
            or align & (align - 1)
        ):
            raise ValueError(f"align must be a positive power of two, got {align!r}")
        for name, value in (("capacity", capacity), ("file_size", file_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value % align:
                raise ValueError(f"{name} ({value}) must be a multiple of align ({align})")
        if isinstance(probe_interval, bool) or not isinstance(probe_interval, (int, float)) or not probe_interval >= 0:
            raise ValueError(f"probe_interval must be a number of seconds >= 0, got {probe_interval!r}")
        if compact_ratio < 2:
            raise ValueError(f"compact_ratio must be at least 2, got {compact_ratio}")
        self._dir = Path(directory)
        self._capacity = capacity
        self._align = align
        self._file_size = min(file_size, capacity)
        nfiles = -(-capacity // self._file_size)
        self._sizes = [self._file_size] * (nfiles - 1)
        self._sizes.append(capacity - self._file_size * (nfiles - 1))
        self._region = -(-HEADER_SIZE // align) * align
        self._pad = bytes(self._region - HEADER_SIZE)
        self._sync = sync
        self._verify_writes = verify_writes
        self._compact_ratio = compact_ratio
        self._compact_min = compact_min_records
        self._io_factory = io_factory
        self._probe_interval = float(probe_interval)
        self._clock = clock
        if isinstance(policy, str):
            from memkv_mesh.eviction import make_policy

            self._policy: EvictionPolicy = make_policy(policy, capacity)
        else:
            self._policy = policy

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._state = "new"  # new -> open -> closing -> closed
        self._allocs = [ExtentAllocator(size, align=align) for size in self._sizes]
        self._index: dict[bytes, _Block] = {}
        self._io: BlockIO | None = None
        self._jfd = -1
        self._lockfd = -1
        self._journal_size = 0
        self._journal_records = 0
        self._next_seq = 1
        self._active = 0  # pinned reads + writes in flight
        self._pinned = 0
        self._payload_bytes = 0
        self._journal_ok = True  # False: the journal's tail is unknown; ftruncate before appending
        self._degraded = ""  # the reason; "" while healthy
        self._degraded_since = 0.0
        self._next_probe = 0.0
        self._c = dict.fromkeys(
            (
                "reads", "writes", "bytes_read", "bytes_written", "dropped_corrupt",
                "dropped_torn", "evictions", "misses", "compactions", "compaction_failures",
                "syncs", "write_errors", "read_errors", "refused_writes", "probes",
                "degraded_episodes", "unjournaled_dels",
            ),
            0,
        )  # fmt: skip

    # ---- properties ------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_block_bytes(self) -> int:
        """The largest payload that fits (one data file minus the header region)."""
        return max(self._sizes) - self._region

    # ---- open / close ----------------------------------------------------------------------

    def open(self, *, verify_all: bool = False) -> RecoveryReport:
        """Create or reopen the tier; replay the journal and check every block's header.

        ``verify_all`` also reads every payload and checks its checksum (reads the whole tier).
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(
                    f"NvmeTier at {self._dir} was already opened (state {self._state})"
                )
            self._state = "opening"
        try:
            report = self._open(verify_all)
        except BaseException:
            self._release_files()
            with self._lock:
                self._state = "closed"
            raise
        with self._lock:
            self._state = "open"
        return report

    def _open(self, verify_all: bool) -> RecoveryReport:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lockfd = os.open(self._dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"NVMe tier directory {self._dir} is in use by another process or NvmeTier"
            ) from None

        jpath = self._dir / _JOURNAL
        raw = jpath.read_bytes() if jpath.exists() else b""
        live: dict[bytes, Record] = {}
        nrec = 0
        torn = 0
        reset = False
        max_seq = 0
        valid_end = 0  # bytes of the journal up to its last valid record
        if raw:
            try:
                jh = decode_journal_header(raw)
            except ValueError as e:
                raise ValueError(f"{jpath}: {e}") from None
            if jh is None:
                reset = True
            else:
                if (jh.align, jh.file_size) != (self._align, self._file_size):
                    raise ValueError(
                        f"{self._dir}: the tier was created with align={jh.align}, "
                        f"file_size={jh.file_size}; this NvmeTier has align={self._align}, "
                        f"file_size={self._file_size}. Use the same values or empty the directory."
                    )
                max_seq = jh.next_seq - 1
                pos = len(encode_journal_header(jh))
                view = memoryview(raw)
                while pos < len(raw):
                    rec = decode_record(view, pos)
                    if rec is None:
                        break
                    if rec.type == REC_PUT:
                        live.pop(rec.key, None)
                        live[rec.key] = rec
                    else:
                        live.pop(rec.key, None)
                    max_seq = max(max_seq, rec.seq)
                    nrec += 1
                    pos += RECORD_SIZE
                torn = len(raw) - pos
                valid_end = pos
        self._next_seq = max_seq + 1

        # place the survivors: newest first, so of two overlapping records the newer one wins
        outside = 0
        dropped_torn = 0
        placed: list[_Block] = []
        for rec in sorted(live.values(), key=lambda r: r.seq, reverse=True):
            need = self._region + rec.length
            if (
                rec.file >= len(self._sizes)
                or rec.offset % self._align
                or rec.offset + need > self._sizes[rec.file]
            ):
                outside += 1
                continue
            try:
                self._allocs[rec.file].reserve(rec.offset, need)
            except ValueError:
                dropped_torn += 1
                continue
            extent = self._allocs[rec.file].extent_size(rec.offset)
            placed.append(
                _Block(rec.key, rec.file, rec.offset, rec.length, rec.checksum, rec.seq, extent)
            )

        for stale in self._dir.glob("blocks-*.dat"):
            try:
                n = int(stale.name[len("blocks-") : -len(".dat")])
            except ValueError:
                continue
            if n >= len(self._sizes):
                stale.unlink()
        paths = [self._dir / _data_name(i) for i in range(len(self._sizes))]
        self._io = io = self._io_factory(paths, list(self._sizes))

        # check every header; optionally every payload
        dropped_corrupt = 0
        scratch = bytearray(max((b.length for b in placed), default=0)) if verify_all else None
        hdr = bytearray(self._region)
        good: list[_Block] = []
        for b in placed:
            ok = decode_block_header(io.read_header(b.file, b.offset, HEADER_SIZE)) == b.header()
            if not ok:
                dropped_torn += 1
            elif scratch is not None:
                payload = memoryview(scratch)[: b.length]
                io.read(b.file, b.offset, hdr, payload)
                ok = xxhash.xxh3_64_intdigest(payload) == b.checksum
                if not ok:
                    dropped_corrupt += 1
            if ok:
                good.append(b)
            else:
                self._allocs[b.file].free(b.offset)
        good.sort(key=lambda b: b.seq)
        for b in good:
            self._index[b.key] = b
            self._policy.insert(b.key, b.extent)
            self._payload_bytes += b.length
        self._c["dropped_torn"] += dropped_torn
        self._c["dropped_corrupt"] += dropped_corrupt
        with self._lock:
            try:
                self._compact_locked()
            except OSError as e:
                if not valid_end:  # no journal worth keeping (fresh, empty or reset): refuse
                    raise
                # A full disk at restart: keep appending to the old journal, its torn tail cut
                # (ftruncate needs no space). Its records for blocks dropped above still fail
                # their header check on the next open.
                self._keep_journal_locked(jpath, valid_end, nrec)
                self._fail_locked("journal compaction at open", e)
        return RecoveryReport(
            recovered=len(good),
            dropped_torn=dropped_torn,
            dropped_corrupt=dropped_corrupt,
            bytes=self._payload_bytes,
            dropped_outside=outside,
            journal_records=nrec,
            journal_torn_bytes=torn,
            journal_reset=reset,
        )

    def close(self) -> None:
        """Wait for reads and writes in flight, then sync and close every file. Idempotent."""
        with self._lock:
            if self._state in ("closing", "closed"):
                while self._state != "closed":
                    self._idle.wait()
                return
            if self._state == "new":
                self._state = "closed"
                return
            self._state = "closing"
            while self._active:
                self._idle.wait()
        try:
            self._release_files()
        finally:
            with self._lock:
                self._state = "closed"
                self._idle.notify_all()

    def _release_files(self) -> None:
        io, self._io = self._io, None
        jfd, self._jfd = self._jfd, -1
        lockfd, self._lockfd = self._lockfd, -1
        try:
            if io is not None:
                io.close()
            if jfd >= 0:
                try:
                    os.fdatasync(jfd)
                finally:
                    os.close(jfd)
        finally:
            if lockfd >= 0:
                os.close(lockfd)  # releases the flock

    def __enter__(self) -> NvmeTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- journal (lock held) ---------------------------------------------------------------

    def _append_locked(self, record: bytes, records: int = 1) -> None:
        """Append ``records`` journal records (``record`` holds them back to back) in one write.

        All or nothing: on any error (ENOSPC, EIO, a failed fdatasync with ``sync``) the journal
        is cut back to its previous size before the OSError propagates. If even that fails, the
        tail is unknown and no record is appended until a later ftruncate succeeds, so a valid
        record never follows garbage that replay would stop at (or a half batch it would trust).
        """
        if not self._journal_ok:
            self._repair_journal_locked()
        try:
            view = memoryview(record)
            while view:  # a short write is retried once more: the retry reports the real errno
                n = os.write(self._jfd, view)
                if n <= 0:
                    raise OSError(errno.EIO, f"append to {self._dir / _JOURNAL} wrote nothing")
                view = view[n:]
            if self._sync:
                os.fdatasync(self._jfd)
        except BaseException:
            try:
                os.ftruncate(self._jfd, self._journal_size)
            except OSError:
                self._journal_ok = False
            raise
        self._journal_size += len(record)
        self._journal_records += records

    def _repair_journal_locked(self) -> None:
        """Make the journal file end at ``_journal_size`` again (reopening it if compaction lost
        its descriptor); raises OSError if it still cannot."""
        if self._jfd < 0:
            self._jfd = os.open(self._dir / _JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.ftruncate(self._jfd, self._journal_size)
        self._journal_ok = True

    def _keep_journal_locked(self, jpath: Path, valid_end: int, nrec: int) -> None:
        """Open's fallback when it cannot write a compacted journal: append to the old one."""
        fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, valid_end)
        except BaseException:
            os.close(fd)
            raise
        if self._jfd >= 0:
            os.close(self._jfd)
        self._jfd = fd
        self._journal_size = valid_end
        self._journal_records = nrec
        self._journal_ok = True

    def _maybe_compact_locked(self) -> None:
        recs = self._journal_records
        if recs > self._compact_min and recs > self._compact_ratio * len(self._index):
            try:
                self._compact_locked()
            except OSError:
                self._c["compaction_failures"] += 1  # keep appending to the old journal

    def _compact_locked(self) -> None:
        """Write a journal holding one PUT per live block; fsync; rename; fsync the directory."""
        buf = bytearray(
            encode_journal_header(JournalHeader(self._align, self._file_size, self._next_seq))
        )
        for b in sorted(self._index.values(), key=lambda b: b.seq):
            buf += b.record(REC_PUT)
        tmp = self._dir / _JOURNAL_TMP
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(buf)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._dir / _JOURNAL)
        except BaseException:
            # e.g. ENOSPC: the old journal is untouched; give the partial copy's space back
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        # From here on ``journal`` is the new file: point the state at it before anything else
        # can fail (a failed reopen leaves _jfd -1 and the next append reopens it).
        old, self._jfd = self._jfd, -1
        self._journal_size = len(buf)
        self._journal_records = len(self._index)
        self._journal_ok = False
        self._c["compactions"] += 1
        if old >= 0:
            os.close(old)
        self._repair_journal_locked()
        dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ---- index helpers (lock held) ---------------------------------------------------------

    def _check_open_locked(self) -> BlockIO:
        if self._state != "open" or self._io is None:
            raise RuntimeError(f"NvmeTier at {self._dir} is not open (state {self._state})")
        return self._io

    def _retire_locked(self, b: _Block) -> None:
        """``b`` has left the index: free its extent now, or when its last reader unpins."""
        b.dead = True
        self._payload_bytes -= b.length
        if b.pins == 0:
            self._allocs[b.file].free(b.offset)

    def _remove_locked(self, b: _Block) -> None:
        """Take a published block out of the index, policy and (by a DEL record) the journal."""
        del self._index[b.key]
        self._policy.remove(b.key)
        self._retire_locked(b)
        self._append_del_locked(b)

    def _append_del_locked(self, b: _Block) -> None:
        """Journal the removal of ``b`` (already out of the index). Never raises OSError: if the
        DEL cannot be appended, the block's header is zeroed in place instead (under the lock, so
        before its extent can be reused), which makes a restart drop its PUT as torn."""
        try:
            self._append_locked(b.record(REC_DEL))
            return
        except OSError as e:
            self._fail_locked("journal append (DEL)", e)
        self._c["unjournaled_dels"] += 1
        if self._io is None:
            return
        try:
            self._io.write(b.file, b.offset, bytes(self._region), memoryview(b""))
        except OSError as e:  # a restart may bring back the old (intact, checked) bytes
            self._fail_locked("zeroing a removed block's header", e)

    # ---- degraded state (lock held) ------------------------------------------------------------

    def _fail_locked(self, what: str, err: OSError) -> None:
        """Count an I/O error; the first one since the tier was healthy makes it degraded."""
        self._c["read_errors" if what == "read" else "write_errors"] += 1
        self._next_probe = self._clock() + self._probe_interval
        if self._degraded:
            return
        self._degraded = f"{what}: {err}"
        self._degraded_since = time.time()
        self._c["degraded_episodes"] += 1
        _log.warning(
            "NVMe tier %s degraded: %s; writes are refused except one probe every %g s until "
            "one succeeds; reads go on (a failed read is a miss)",
            self._dir, self._degraded, self._probe_interval,
        )  # fmt: skip

    def _healthy_locked(self) -> None:
        """A write reached the disk: end a degraded state."""
        if not self._degraded:
            return
        _log.warning(
            "NVMe tier %s resumed after %.1f s degraded (%s)",
            self._dir, time.time() - self._degraded_since, self._degraded,
        )  # fmt: skip
        self._degraded = ""
        self._degraded_since = 0.0

    def _admit_write_locked(self) -> bool:
        """True if a write may go to the disk now: always while healthy; while degraded, one
        write (the probe) per ``probe_interval``."""
        if not self._degraded:
            return True
        now = self._clock()
        if now >= self._next_probe:
            self._next_probe = now + self._probe_interval
            self._c["probes"] += 1
            return True
        self._c["refused_writes"] += 1
        return False

    def _refusal(self, what: str) -> NvmeDegradedError:
        return NvmeDegradedError(
            f"{what} refused: the NVMe tier at {self._dir} is degraded ({self._degraded}); "
            f"next probe in {max(0.0, self._next_probe - self._clock()):.1f} s",
            [],
        )

    def _can_evict(self, key: Hashable) -> bool:
        b = self._index.get(key)  # type: ignore[call-overload]
        return b is not None and b.pins == 0

    def _place_locked(self, need: int) -> tuple[int, int] | None:
        """Best fit over files: the file whose largest free extent is the smallest that fits."""
        best = -1
        best_free = 0
        for i, a in enumerate(self._allocs):
            lf = a.largest_free
            if lf >= need and (best < 0 or lf < best_free):
                best, best_free = i, lf
        if best < 0:
            return None
        off = self._allocs[best].alloc(need)
        assert off is not None
        return best, off

    # ---- block API -------------------------------------------------------------------------

    def put(self, key: bytes, data: object, checksum: int) -> list[bytes]:
        """Store a block (replacing any block with that key) and return the keys evicted to make
        room. ValueError for a bad key, buffer or checksum or a block larger than a data file;
        NvmeFullError if every block that could make room is pinned; its subclasses
        NvmeDegradedError if the tier is degraded and this put is not its probe, NvmeIOError if
        the payload write, sync or PUT append failed (nothing of the block is kept). Never a
        bare OSError."""
        _check_key(key)
        view = _byte_view(data, "data", writable=False)
        if isinstance(checksum, bool) or not isinstance(checksum, int) or not 0 <= checksum < _U64:
            raise ValueError(f"checksum must be an unsigned 64-bit int, got {checksum!r}")
        length = view.nbytes
        need = self._region + length
        if need > max(self._sizes):
            raise ValueError(
                f"block of {length} bytes (+{self._region} header) is larger than the NVMe tier "
                f"allows ({self.max_block_bytes} bytes: capacity {self._capacity}, "
                f"file_size {self._file_size})"
            )
        if self._verify_writes and xxhash.xxh3_64_intdigest(view) != checksum:
            raise ValueError(f"checksum {checksum:#x} does not match the data of block {key.hex()}")
        dropped: list[bytes] = []
        with self._lock:
            io = self._check_open_locked()
            if not self._admit_write_locked():
                raise self._refusal(f"put of block {key.hex()}")
            old = self._index.get(key)
            if old is not None:
                self._remove_locked(old)
            where = self._make_room_locked(need, dropped)
            if where is None:
                pinned = sum(1 for b in self._index.values() if b.pins)
                raise NvmeFullError(
                    f"no room for a {length}-byte block on the NVMe tier: "
                    f"{len(self._index)} blocks resident, {pinned} pinned, largest free "
                    f"extent {max(a.largest_free for a in self._allocs)} bytes",
                    dropped,
                )
            file, offset = where
            seq = self._next_seq
            self._next_seq += 1
            self._active += 1
        ok = False
        err: OSError | None = None
        what = "data file write"
        try:
            header = encode_block_header(BlockHeader(seq, length, checksum, key)) + self._pad
            io.write(file, offset, header, view)
            if self._sync:
                what = "data file sync"
                io.sync(file)
            ok = True
        except OSError as e:
            err = e
        finally:
            with self._lock:
                try:
                    if ok:
                        try:
                            self._publish_locked(key, file, offset, length, checksum, seq)
                        except OSError as e:  # the extent is free again, nothing indexed
                            err, what = e, "journal append (PUT)"
                        else:
                            self._healthy_locked()
                    else:
                        self._allocs[file].free(offset)
                    if err is not None:
                        self._fail_locked(what, err)
                finally:
                    self._active -= 1
                    if not self._active:
                        self._idle.notify_all()
        if err is not None:
            raise NvmeIOError(
                f"block {key.hex()} was not stored on the NVMe tier at {self._dir}: {what} "
                f"failed: {err}",
                dropped,
                err.errno,
            ) from err
        return dropped

    def put_many(self, items: list[tuple[bytes, memoryview, int]]) -> tuple[list[bool], list[bytes]]:
        """``put`` of several blocks with one journal append for all their PUT records (a flash
        node's write-through of a pushed batch). Per item True if stored; False where it could
        not be (too big, everything pinned, an I/O error on its payload, its sync or the batch's
        journal append, or the tier degraded and this batch not its probe); and the keys evicted
        to make room. Bad keys or checksums raise ValueError before anything is written; I/O
        errors never raise. A False item left nothing behind: no index entry, no extent."""
        for key, _, checksum in items:
            _check_key(key)
            if isinstance(checksum, bool) or not isinstance(checksum, int) or not 0 <= checksum < _U64:
                raise ValueError(f"checksum must be an unsigned 64-bit int, got {checksum!r}")
        ok = [False] * len(items)
        dropped: list[bytes] = []
        staged: list[_Staged] = []
        with self._lock:
            io = self._check_open_locked()
            if items and not self._admit_write_locked():
                return ok, dropped
            for i, (key, view, checksum) in enumerate(items):
                need = self._region + view.nbytes
                if need > max(self._sizes):
                    continue
                old = self._index.get(key)
                if old is not None:
                    self._remove_locked(old)
                where = self._make_room_locked(need, dropped)
                if where is not None:
                    staged.append(_Staged(i, key, view, checksum, where[0], where[1], self._next_seq))
                    self._next_seq += 1
            self._active += len(staged)
        written: list[_Staged] = []
        errors: list[tuple[str, OSError]] = []
        try:
            for st in staged:
                header = encode_block_header(BlockHeader(st.seq, st.view.nbytes, st.checksum, st.key))
                try:
                    io.write(st.file, st.offset, header + self._pad, st.view)
                except OSError as e:
                    errors.append(("data file write", e))
                    continue
                written.append(st)
            if self._sync:
                for file in sorted({st.file for st in written}):
                    try:
                        io.sync(file)
                    except OSError as e:  # nothing written to that file is known durable
                        errors.append(("data file sync", e))
                        written = [st for st in written if st.file != file]
        finally:
            with self._lock:
                try:
                    done = {st.item for st in written}
                    for st in staged:
                        if st.item not in done:
                            self._allocs[st.file].free(st.offset)
                    if written:
                        try:
                            self._publish_many_locked(written)
                        except OSError as e:  # every extent of the batch is free again
                            errors.append(("journal append (PUT)", e))
                        else:
                            for st in written:
                                ok[st.item] = True
                    for what, failure in errors:
                        self._fail_locked(what, failure)
                    if any(ok) and not errors:
                        self._healthy_locked()
                finally:
                    self._active -= len(staged)
                    if not self._active:
                        self._idle.notify_all()
        return ok, dropped

    def _make_room_locked(self, need: int, dropped: list[bytes]) -> tuple[int, int] | None:
        """An extent of ``need`` bytes, evicting unpinned blocks (their keys go to ``dropped``);
        None if everything that could make room is pinned."""
        while True:
            where = self._place_locked(need)
            if where is not None:
                return where
            victim = self._policy.pop_victim(self._can_evict)
            if victim is None:
                return None
            vb = self._index.get(victim)  # type: ignore[call-overload]
            if vb is None:
                continue
            del self._index[vb.key]
            self._retire_locked(vb)
            self._append_del_locked(vb)
            dropped.append(vb.key)
            self._c["evictions"] += 1

    def _publish_many_locked(self, written: list[_Staged]) -> None:
        blocks = [
            _Block(st.key, st.file, st.offset, st.view.nbytes, st.checksum, st.seq,
                   self._allocs[st.file].extent_size(st.offset))
            for st in written
        ]  # fmt: skip
        try:
            self._append_locked(b"".join(b.record(REC_PUT) for b in blocks), records=len(blocks))
        except BaseException:
            for b in blocks:
                self._allocs[b.file].free(b.offset)
            raise
        for b in blocks:
            self._index_locked(b)
        self._maybe_compact_locked()

    def _index_locked(self, b: _Block) -> None:
        prev = self._index.pop(b.key, None)
        if prev is not None:  # a concurrent put of the same key: ours is later in the journal
            self._policy.remove(b.key)
            self._retire_locked(prev)
        self._index[b.key] = b
        self._policy.insert(b.key, b.extent)
        self._payload_bytes += b.length
        self._c["writes"] += 1
        self._c["bytes_written"] += b.length

    def _publish_locked(
        self, key: bytes, file: int, offset: int, length: int, checksum: int, seq: int
    ) -> None:
        b = _Block(key, file, offset, length, checksum, seq, self._allocs[file].extent_size(offset))
        try:
            self._append_locked(b.record(REC_PUT))
        except BaseException:
            self._allocs[file].free(offset)
            raise
        self._index_locked(b)
        self._maybe_compact_locked()

    def read_into(self, key: bytes, dest: object) -> int | None:
        """Copy the block into ``dest`` and return its length; None if absent or if a check fails
        (the block is then dropped and counted). ``dest`` may hold garbage after a None."""
        out = _byte_view(dest, "dest", writable=True)

        def read(io: BlockIO, b: _Block) -> bool:
            payload = out[: b.length]
            hdr = bytearray(self._region)
            io.read(b.file, b.offset, hdr, payload)
            return decode_block_header(hdr) == b.header() and xxhash.xxh3_64_intdigest(payload) == b.checksum

        return self.read_with(key, out.nbytes, read)

    @property
    def backend(self) -> BlockIO:
        """The payload I/O backend of the open tier (for backend-specific reads)."""
        with self._lock:
            return self._check_open_locked()

    @property
    def header_region(self) -> int:
        """Bytes in front of each payload: the block header padded to ``align``."""
        return self._region

    def read_with(self, key: bytes, capacity: int, read: Callable[[BlockIO, _Block], bool]) -> int | None:
        """The one read path: pin the block under the lock, run ``read(io, block)`` outside it, then
        count the read or, if ``read`` returned False or raised OSError, drop the block as corrupt.

        ``read`` must check the header against ``block.header()`` and the payload against
        ``block.checksum``; ``capacity`` is the destination's size. Returns the block's length, or
        None (absent, or dropped). Used by ``read_into`` (host memory) and the kvikio backend.
        """
        _check_key(key)
        with self._lock:
            io = self._check_open_locked()
            b = self._index.get(key)
            if b is None:
                self._c["misses"] += 1
                return None
            if capacity < b.length:
                raise ValueError(
                    f"dest holds {capacity} bytes but block {key.hex()} is {b.length} bytes"
                )
            b.pins += 1
            self._pinned += 1
            self._active += 1
        ok = False
        io_error: OSError | None = None
        try:
            try:
                ok = read(io, b)
            except OSError as e:
                io_error = e
        finally:
            with self._lock:
                try:
                    if ok:
                        self._c["reads"] += 1
                        self._c["bytes_read"] += b.length
                        if self._index.get(key) is b:
                            self._policy.touch(key)
                    else:
                        self._c["dropped_corrupt"] += 1
                        if io_error is not None:
                            self._fail_locked("read", io_error)
                        if self._index.get(key) is b:
                            self._remove_locked(b)
                finally:
                    b.pins -= 1
                    self._pinned -= 1
                    self._unpin_locked(b)
        return b.length if ok else None

    def _unpin_locked(self, b: _Block) -> None:
        self._active -= 1
        if not self._active:
            self._idle.notify_all()
        if b.dead and b.pins == 0:
            self._allocs[b.file].free(b.offset)

    def delete(self, key: bytes) -> bool:
        """Remove a block; False if it was not there."""
        _check_key(key)
        with self._lock:
            self._check_open_locked()
            b = self._index.get(key)
            if b is None:
                return False
            self._remove_locked(b)
            return True

    def sync(self) -> None:
        """Make every write so far durable: fdatasync the data files, then the journal (the
        ``"batch"`` fsync policy: one call per batch instead of two per block)."""
        with self._lock:
            io = self._check_open_locked()
            nfiles = len(self._sizes)
        try:
            for i in range(nfiles):
                io.sync(i)
            with self._lock:
                self._check_open_locked()
                if self._jfd < 0:  # compaction could not reopen it: nothing of it to sync yet
                    self._repair_journal_locked()
                os.fdatasync(self._jfd)
        except OSError as e:
            with self._lock:
                self._fail_locked("sync", e)
            raise
        with self._lock:
            self._c["syncs"] += 1

    def length(self, key: bytes) -> int | None:
        with self._lock:
            b = self._index.get(key)
            return None if b is None else b.length

    def checksum(self, key: bytes) -> int | None:
        with self._lock:
            b = self._index.get(key)
            return None if b is None else b.checksum

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    @property
    def degraded(self) -> bool:
        """True from an I/O error (ENOSPC, EIO) until a write succeeds again."""
        with self._lock:
            return bool(self._degraded)

    @property
    def accepts_writes(self) -> bool:
        """False while degraded with no probe due: a put now would raise NvmeDegradedError
        without touching the disk (a caller may skip the worker-thread hop)."""
        with self._lock:
            return not self._degraded or self._clock() >= self._next_probe

    def probe_now(self) -> None:
        """Let the next write through as a probe instead of waiting for ``probe_interval`` (for
        an operator or a caller that knows space was just freed). No effect while healthy."""
        with self._lock:
            self._next_probe = self._clock()

    def statistics(self) -> NvmeStats:
        with self._lock:
            c = self._c
            return NvmeStats(
                blocks=len(self._index),
                used_bytes=sum(a.used_bytes for a in self._allocs),
                capacity=self._capacity,
                reads=c["reads"],
                writes=c["writes"],
                bytes_read=c["bytes_read"],
                bytes_written=c["bytes_written"],
                dropped_corrupt=c["dropped_corrupt"],
                dropped_torn=c["dropped_torn"],
                evictions=c["evictions"],
                misses=c["misses"],
                payload_bytes=self._payload_bytes,
                largest_free=max(a.largest_free for a in self._allocs),
                pinned=self._pinned,
                io_errors=c["read_errors"] + c["write_errors"],
                journal_bytes=self._journal_size,
                compactions=c["compactions"],
                compaction_failures=c["compaction_failures"],
                syncs=c["syncs"],
                degraded=bool(self._degraded),
                degraded_reason=self._degraded,
                degraded_since=self._degraded_since,
                write_errors=c["write_errors"],
                read_errors=c["read_errors"],
                refused_writes=c["refused_writes"],
                probes=c["probes"],
                degraded_episodes=c["degraded_episodes"],
                unjournaled_dels=c["unjournaled_dels"],
            )
