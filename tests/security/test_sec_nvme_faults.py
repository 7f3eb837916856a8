"""A full or failing disk never wedges the NVMe tier (issue 11, "faults").

ENOSPC and EIO are injected three ways: through the tier's I/O object (payload writes, reads,
syncs), through the ``os`` functions the journal code calls (appends, ftruncate, compaction), and
on a real 2 MiB tmpfs that fills up (skipped with the reason where mounting is not permitted).
Every test checks the same promises: the error never escapes as a bare OSError, the tier goes
degraded and comes back by itself once a probe write succeeds, no extent leaks (used bytes match
the index), and a reopen (recovery) finds exactly what the tier held.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import memkv_mesh.nvme as nvme_mod
from memkv_mesh.nvme import NvmeDegradedError, NvmeFullError, NvmeIOError, NvmeTier
from memkv_mesh.nvme_format import JOURNAL_HEADER_SIZE, RECORD_SIZE
from memkv_mesh.nvme_io import PosixBlockIO

A = 4096
REGION = A  # the header region at align 4096


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def payload(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size


def put(t: NvmeTier, i: int, size: int = A) -> list[bytes]:
    data = payload(i, size)
    return t.put(key(i), memoryview(data), xxhash.xxh3_64_intdigest(data))


def item(i: int, size: int = A) -> tuple[bytes, memoryview, int]:
    data = payload(i, size)
    return key(i), memoryview(data), xxhash.xxh3_64_intdigest(data)


def get(t: NvmeTier, i: int) -> bytes | None:
    n = t.length(key(i))
    if n is None:
        return None
    buf = bytearray(n)
    got = t.read_into(key(i), buf)
    return None if got is None else bytes(buf[:got])


def extent(length: int) -> int:
    return -(-(REGION + length) // A) * A


def assert_no_leak(t: NvmeTier) -> None:
    """Used bytes are exactly the extents of the indexed blocks (nothing in flight)."""
    s = t.statistics()
    assert s.pinned == 0
    lengths = [t.length(k) for k in t.keys()]
    assert s.used_bytes == sum(extent(n) for n in lengths if n is not None)
    assert s.blocks == len(lengths)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FaultyIO(PosixBlockIO):
    """Payload I/O that fails on demand with a chosen errno."""

    def __init__(self, paths: list[Path], sizes: list[int]) -> None:
        super().__init__(paths, sizes)
        self.write_errno: int | None = None
        self.write_fail_at: set[int] = set()  # fail only these write calls (0-based), if set
        self.writes = 0
        self.read_errno: int | None = None
        self.sync_errno: int | None = None

    def write(self, file: int, offset: int, header: bytes, payload: memoryview) -> None:
        n = self.writes
        self.writes += 1
        if self.write_errno is not None and (not self.write_fail_at or n in self.write_fail_at):
            raise OSError(self.write_errno, "injected " + os.strerror(self.write_errno))
        super().write(file, offset, header, payload)

    def read(self, file: int, offset: int, header: bytearray, payload: memoryview) -> None:
        if self.read_errno is not None:
            raise OSError(self.read_errno, "injected " + os.strerror(self.read_errno))
        super().read(file, offset, header, payload)

    def sync(self, file: int) -> None:
        if self.sync_errno is not None:
            raise OSError(self.sync_errno, "injected " + os.strerror(self.sync_errno))
        super().sync(file)


class FaultyOs:
    """Stands in for ``os`` inside memkv_mesh.nvme: journal appends (``write``), ``ftruncate``
    and ``open`` of the compaction file can fail; everything else is the real ``os``."""

    def __init__(self) -> None:
        self.write_errno: int | None = None
        self.partial = 0  # bytes the failing write still writes first (a short write)
        self.ftruncate_errno: int | None = None
        self.open_tmp_errno: int | None = None
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        self.writes += 1
        if self.write_errno is not None:
            if self.partial:
                n = os.write(fd, bytes(data)[: self.partial])
                self.partial = 0
                return n
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        return os.write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        if self.ftruncate_errno is not None:
            raise OSError(self.ftruncate_errno, os.strerror(self.ftruncate_errno))
        os.ftruncate(fd, size)

    def open(self, path: Any, flags: int, *args: Any) -> int:
        if self.open_tmp_errno is not None and str(path).endswith("journal.tmp"):
            raise OSError(self.open_tmp_errno, os.strerror(self.open_tmp_errno))
        return os.open(path, flags, *args)


@pytest.fixture
def fos(monkeypatch: pytest.MonkeyPatch) -> FaultyOs:
    f = FaultyOs()
    monkeypatch.setattr(nvme_mod, "os", f)
    return f


def make(
    path: Path, capacity: int = 16 * A, probe_interval: float = 5.0, **kw: Any
) -> tuple[NvmeTier, list[FaultyIO], Clock]:
    made: list[FaultyIO] = []
    clock = Clock()

    def factory(paths: list[Path], sizes: list[int]) -> FaultyIO:
        made.append(FaultyIO(paths, sizes))
        return made[-1]

    t = NvmeTier(path, capacity, io_factory=factory, clock=clock, probe_interval=probe_interval, **kw)
    t.open()
    return t, made, clock


def reopen(t: NvmeTier, capacity: int = 16 * A) -> tuple[NvmeTier, nvme_mod.RecoveryReport]:
    t.close()
    t2 = NvmeTier(t.directory, capacity)
    return t2, t2.open()


def journal_size(t: NvmeTier) -> int:
    return (t.directory / "journal").stat().st_size


# ---- journal append failures ---------------------------------------------------------------------


def test_journal_enospc_on_put_keeps_nothing_and_the_tier_resumes_by_itself(
    tmp_path: Path, fos: FaultyOs, caplog: pytest.LogCaptureFixture
) -> None:
    t, _, clock = make(tmp_path)
    put(t, 1)
    before = journal_size(t)
    fos.write_errno, fos.partial = errno.ENOSPC, 30  # a short write, then ENOSPC
    with caplog.at_level(logging.WARNING, logger="memkv_mesh.nvme"):
        with pytest.raises(NvmeIOError) as ei:
            put(t, 2)
        assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, NvmeFullError)
        assert key(2) not in t and journal_size(t) == before  # the short append was cut back
        assert_no_leak(t)
        s = t.statistics()
        assert s.degraded and t.degraded and "No space left" in s.degraded_reason
        assert s.degraded_since > 0 and s.write_errors == 1 and s.degraded_episodes == 1

        # degraded: refused without touching the disk until the probe is due
        writes = fos.writes
        for i in range(3, 6):
            with pytest.raises(NvmeDegradedError, match="degraded"):
                put(t, i)
        assert fos.writes == writes and not t.accepts_writes
        assert t.statistics().refused_writes == 3
        assert get(t, 1) == payload(1, A)  # reads go on

        clock.now += 5.0  # the probe fails: still degraded, next probe 5 s later
        assert t.accepts_writes
        with pytest.raises(NvmeIOError):
            put(t, 6)
        with pytest.raises(NvmeDegradedError):
            put(t, 7)

        fos.write_errno = None  # space is back
        clock.now += 5.0
        put(t, 8)
        s = t.statistics()
        assert not s.degraded and s.degraded_reason == "" and s.probes == 2 and s.write_errors == 2
        put(t, 9)  # healthy: no probe needed
    msgs = [r.getMessage() for r in caplog.records if r.name == "memkv_mesh.nvme"]
    assert sum("degraded:" in m for m in msgs) == 1  # once per transition, with the error
    assert sum("resumed" in m for m in msgs) == 1
    assert any("No space left" in m for m in msgs)
    assert_no_leak(t)
    t2, rep = reopen(t)
    assert sorted(t2.keys()) == sorted(key(i) for i in (1, 8, 9)) and rep.dropped_torn == 0
    assert rep.journal_torn_bytes == 0
    assert [get(t2, i) for i in (1, 8, 9)] == [payload(i, A) for i in (1, 8, 9)]
    t2.close()


def test_eviction_whose_del_cannot_be_journaled_is_not_resurrected(tmp_path: Path, fos: FaultyOs) -> None:
    t, _, clock = make(tmp_path, capacity=8 * A)  # room for 4 blocks of one page
    for i in range(4):
        put(t, i)
    fos.write_errno = errno.ENOSPC
    with pytest.raises(NvmeIOError) as ei:
        put(t, 10)  # evicts block 0 (its DEL fails), then its own PUT fails
    assert ei.value.dropped == [key(0)]
    assert key(0) not in t and key(10) not in t
    assert t.statistics().unjournaled_dels == 1
    assert_no_leak(t)
    assert t.delete(key(1)) is True  # a delete whose DEL fails: still gone, no exception
    assert key(1) not in t
    assert_no_leak(t)
    fos.write_errno = None
    t2, rep = reopen(t, capacity=8 * A)  # the stale PUTs of 0 and 1 fail their zeroed headers
    assert sorted(t2.keys()) == [key(2), key(3)]
    assert rep.dropped_torn == 2
    t2.close()


def test_failed_ftruncate_never_lets_records_follow_garbage(tmp_path: Path, fos: FaultyOs) -> None:
    t, _, clock = make(tmp_path)
    put(t, 1)
    good = journal_size(t)
    fos.write_errno, fos.partial = errno.ENOSPC, 50
    fos.ftruncate_errno = errno.EIO
    with pytest.raises(NvmeIOError):
        put(t, 2)
    assert journal_size(t) == good + 50  # the garbage could not be cut yet
    fos.write_errno = None
    clock.now += 5.0
    with pytest.raises(NvmeIOError):  # the probe: the cut still fails, so nothing is appended
        put(t, 3)
    assert journal_size(t) == good + 50
    fos.ftruncate_errno = None
    clock.now += 5.0
    put(t, 4)  # cut first, then appended
    assert journal_size(t) == good + RECORD_SIZE and not t.degraded
    assert_no_leak(t)
    t2, rep = reopen(t)
    assert rep.journal_torn_bytes == 0 and sorted(t2.keys()) == [key(1), key(4)]
    t2.close()


def test_put_many_journal_failure_publishes_nothing(tmp_path: Path, fos: FaultyOs) -> None:
    t, _, clock = make(tmp_path)
    before = journal_size(t)
    fos.write_errno = errno.ENOSPC
    ok, dropped = t.put_many([item(i) for i in range(3)])  # never raises on I/O errors
    assert ok == [False] * 3 and dropped == [] and len(t) == 0
    assert journal_size(t) == before and t.degraded
    assert_no_leak(t)
    ok, _ = t.put_many([item(5)])  # degraded, no probe due: refused, nothing written
    assert ok == [False] and t.statistics().refused_writes == 1
    fos.write_errno = None
    clock.now += 5.0
    ok, _ = t.put_many([item(i) for i in range(3)])
    assert ok == [True] * 3 and not t.degraded
    t2, rep = reopen(t)
    assert sorted(t2.keys()) == [key(i) for i in range(3)] and rep.dropped_torn == 0
    t2.close()


def test_delete_and_read_drop_never_raise_while_the_journal_fails(tmp_path: Path, fos: FaultyOs) -> None:
    t, io, _ = make(tmp_path)
    put(t, 1)
    put(t, 2)
    fos.write_errno = errno.EIO
    io[0].read_errno = errno.EIO
    assert t.read_into(key(1), bytearray(A)) is None  # a miss; the DEL fails quietly
    assert key(1) not in t
    s = t.statistics()
    assert s.read_errors == 1 and s.dropped_corrupt == 1 and s.unjournaled_dels == 1 and s.degraded
    assert_no_leak(t)
    fos.write_errno = None
    io[0].read_errno = None
    t2, rep = reopen(t)
    assert t2.keys() == [key(2)] and rep.dropped_torn == 1
    t2.close()


# ---- payload I/O failures ------------------------------------------------------------------------


def test_payload_write_errors_free_the_extent(tmp_path: Path) -> None:
    t, io, clock = make(tmp_path)
    io[0].write_errno = errno.EIO
    with pytest.raises(NvmeIOError) as ei:
        put(t, 1)
    assert ei.value.errno == errno.EIO and key(1) not in t
    assert "data file write" in t.statistics().degraded_reason
    assert_no_leak(t)
    io[0].write_errno, io[0].write_fail_at = errno.ENOSPC, {io[0].writes + 1}
    clock.now += 5.0
    ok, _ = t.put_many([item(i) for i in range(2, 5)])  # the probe: item 3's payload fails
    assert ok == [True, False, True] and sorted(t.keys()) == [key(2), key(4)]
    assert t.degraded  # a batch with an error does not end the degraded state
    assert_no_leak(t)
    io[0].write_errno = None
    clock.now += 5.0
    put(t, 6)
    assert not t.degraded
    t2, rep = reopen(t)
    assert sorted(t2.keys()) == [key(2), key(4), key(6)] and rep.dropped_torn == 0
    t2.close()


def test_sync_errors_keep_nothing_that_is_not_known_durable(tmp_path: Path) -> None:
    t, io, clock = make(tmp_path, sync=True)
    io[0].sync_errno = errno.EIO
    with pytest.raises(NvmeIOError, match="sync"):
        put(t, 1)
    clock.now += 5.0
    ok, _ = t.put_many([item(2), item(3)])
    assert ok == [False, False] and len(t) == 0
    assert_no_leak(t)
    t.close()
    t, io, clock = make(tmp_path / "b")
    put(t, 1)
    io[0].sync_errno = errno.EIO
    with pytest.raises(OSError):  # the "batch" policy's sync: the caller learns it failed
        t.sync()
    assert t.degraded and t.statistics().write_errors == 1
    t.close()


def test_read_eio_is_a_counted_miss_never_served(tmp_path: Path) -> None:
    t, io, _ = make(tmp_path)
    put(t, 1)
    io[0].read_errno = errno.EIO
    assert get(t, 1) is None
    s = t.statistics()
    assert key(1) not in t and s.read_errors == 1 and s.io_errors == 1 and s.reads == 0
    assert s.dropped_corrupt == 1 and s.degraded and s.degraded_reason.startswith("read:")
    assert_no_leak(t)
    t2, rep = reopen(t)  # its DEL was journaled: gone after a restart too
    assert len(t2) == 0 and rep.dropped_torn == 0
    t2.close()


# ---- compaction and open on a full disk ----------------------------------------------------------


def test_failed_compaction_leaves_no_partial_file(tmp_path: Path, fos: FaultyOs) -> None:
    t, _, _ = make(tmp_path, capacity=8 * A, compact_min_records=4, compact_ratio=2)
    put(t, 1)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "injected")

    fos.fsync = fsync  # type: ignore[attr-defined]
    for _ in range(10):  # replaces of one key: the journal outgrows the live blocks
        t.delete(key(1))
        put(t, 1)
    assert t.statistics().compaction_failures > 0
    assert not (tmp_path / "journal.tmp").exists()
    fos.fsync = real_fsync  # type: ignore[attr-defined]
    t2, rep = reopen(t, capacity=8 * A)
    assert t2.keys() == [key(1)] and rep.dropped_torn == 0
    t2.close()


def test_open_on_a_full_disk_keeps_the_old_journal(tmp_path: Path, fos: FaultyOs) -> None:
    t, _, _ = make(tmp_path)
    for i in range(3):
        put(t, i)
    t.delete(key(0))
    t.close()
    with open(tmp_path / "journal", "ab") as f:
        f.write(b"\x01torn tail")
    fos.open_tmp_errno = errno.ENOSPC
    t2, _, clock = make(tmp_path)  # the compaction at open fails: the old journal is kept
    s = t2.statistics()
    assert s.degraded and "compaction at open" in s.degraded_reason
    assert sorted(t2.keys()) == [key(1), key(2)]
    assert not (tmp_path / "journal.tmp").exists()
    assert journal_size(t2) == JOURNAL_HEADER_SIZE + 4 * RECORD_SIZE  # the torn tail was cut
    clock.now += 5.0
    put(t2, 3)
    assert not t2.degraded
    fos.open_tmp_errno = None
    t3, rep = reopen(t2)
    assert sorted(t3.keys()) == [key(1), key(2), key(3)] and rep.journal_torn_bytes == 0
    t3.close()


def test_open_of_a_fresh_tier_on_a_full_disk_is_a_clear_error(tmp_path: Path, fos: FaultyOs) -> None:
    fos.open_tmp_errno = errno.ENOSPC
    with pytest.raises(OSError, match="No space"):
        make(tmp_path)


# ---- random faults against a model ---------------------------------------------------------------


class FaultMachine(RuleBasedStateMachine):
    """Random puts, batches, deletes, reads and restarts while journal appends, payload writes
    and reads fail at random; the tier must hold a subset of what was put (never wrong bytes),
    leak no extent, and come back from a restart with exactly what it held."""

    CAP = 12 * A

    def __init__(self) -> None:
        super().__init__()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="nvme-fault-", dir=shm))
        self.fos = FaultyOs()
        self.saved_os = nvme_mod.os
        nvme_mod.os = self.fos  # type: ignore[assignment]
        self.version = 0
        self.model: dict[int, int] = {}  # i -> version the tier holds
        # Removed while neither the DEL nor the header zeroing could be written: a restart may
        # bring these versions back (intact and checked), until a compaction forgets them.
        self.ghosts: dict[int, int] = {}
        self.open()

    def open(self) -> None:
        # probe_interval 0: every write is a probe, so the faults decide, not time
        self.t, self.io, self.clock = make(self.dir, self.CAP, probe_interval=0.0, compact_min_records=6)
        self.compactions = self.t.statistics().compactions

    def remove(self, i: int) -> None:
        v = self.model.pop(i, None)
        if v is not None and self.fos.write_errno is not None and self.io[0].write_errno is not None:
            self.ghosts[i] = v

    def stored(self, i: int) -> None:
        self.model[i] = self.version
        self.ghosts.pop(i, None)

    def data(self, i: int, version: int) -> bytes:
        return bytes([i, version % 256]) * (A // 2 * (1 + i % 2))

    @rule(journal=st.sampled_from([None, errno.ENOSPC, errno.EIO]), payload=st.booleans(), reads=st.booleans())
    def set_faults(self, journal: int | None, payload: bool, reads: bool) -> None:
        self.fos.write_errno = journal
        self.fos.partial = 20 if journal else 0
        self.io[0].write_errno = errno.EIO if payload else None
        self.io[0].read_errno = errno.EIO if reads else None

    @rule(i=st.integers(0, 5))
    def put_block(self, i: int) -> None:
        self.version += 1
        d = self.data(i, self.version)
        try:
            dropped = self.t.put(key(i), memoryview(d), xxhash.xxh3_64_intdigest(d))
        except NvmeFullError as e:
            dropped = e.dropped
            self.remove(i)  # a replace drops the old block first
        else:
            self.stored(i)
        for k in dropped:
            self.remove(int.from_bytes(k[:4], "big"))

    @rule(ids=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
    def put_batch(self, ids: list[int]) -> None:
        self.version += 1
        ds = [self.data(i, self.version) for i in ids]
        ok, dropped = self.t.put_many([(key(i), memoryview(d), xxhash.xxh3_64_intdigest(d)) for i, d in zip(ids, ds, strict=True)])
        for k in dropped:
            self.remove(int.from_bytes(k[:4], "big"))
        for i, good in zip(ids, ok, strict=True):
            if good:
                self.stored(i)
            else:
                self.remove(i)

    @rule(i=st.integers(0, 5))
    def delete_block(self, i: int) -> None:
        self.t.delete(key(i))
        self.remove(i)

    @rule(i=st.integers(0, 5))
    def read_block(self, i: int) -> None:
        got = get(self.t, i)
        if got is not None:
            assert got == self.data(i, self.model[i])
        else:
            self.remove(i)

    @rule()
    def restart(self) -> None:
        self.t.close()
        self.fos.write_errno = self.fos.ftruncate_errno = None
        self.open()
        held = {int.from_bytes(k[:4], "big") for k in self.t.keys()}
        assert set(self.model) <= held <= set(self.model) | set(self.ghosts)
        for i in held - set(self.model):  # a ghost: its own bytes, or dropped at its first read
            got = get(self.t, i)
            if got is not None:
                assert got == self.data(i, self.ghosts[i])
                self.model[i] = self.ghosts[i]
        self.ghosts.clear()  # open compacted the journal (no faults are armed at open)

    @invariant()
    def consistent(self) -> None:
        c = self.t.statistics().compactions
        if c != self.compactions:  # the journal was rewritten from the index: no ghosts left
            self.compactions = c
            self.ghosts.clear()
        assert sorted(self.t.keys()) == sorted(key(i) for i in self.model)
        assert_no_leak(self.t)

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.t.close()
        nvme_mod.os = self.saved_os
        shutil.rmtree(self.dir, ignore_errors=True)


TestFaultMachine = FaultMachine.TestCase
TestFaultMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=True)


# ---- a real file system that fills up ------------------------------------------------------------


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="nvme-fullfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=False)  # a failed test left files open
        shutil.rmtree(d, ignore_errors=True)


def fill(path: Path) -> int:
    """Write a file until the file system is full; returns its size."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(bytes(A))
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return n


def test_full_file_system_degrades_and_resumes_by_itself(small_fs: Path) -> None:
    tier_dir = small_fs / "tier"
    clock = Clock()
    t = NvmeTier(tier_dir, 64 * A, clock=clock, file_size=32 * A)  # 256 KiB of data files
    t.open()
    put(t, 0)
    fill(small_fs / "filler")
    stored = [0]
    with pytest.raises(NvmeIOError) as ei:
        for i in range(1, 200):  # the journal needs a new page within 52 records
            put(t, i)
            stored.append(i)
    assert ei.value.errno == errno.ENOSPC
    s = t.statistics()
    assert s.degraded and "No space left" in s.degraded_reason and s.write_errors >= 1
    assert_no_leak(t)
    stored = [i for i in stored if key(i) in t]  # some were evicted (their DELs failed too)
    assert all(get(t, i) == payload(i, A) for i in stored)  # still served
    with pytest.raises(NvmeDegradedError):
        put(t, 500)
    clock.now += 5.0
    with pytest.raises(NvmeIOError):  # the probe: still full
        put(t, 501)
    assert t.degraded
    (small_fs / "filler").unlink()  # space returns
    clock.now += 5.0
    put(t, 502)
    assert not t.degraded
    put(t, 503)
    assert_no_leak(t)
    held = sorted(t.keys())
    unjournaled = t.statistics().unjournaled_dels
    t.close()
    t2 = NvmeTier(tier_dir, 64 * A, file_size=32 * A)
    rep = t2.open()
    # every eviction whose DEL failed had its header zeroed: dropped, never brought back
    assert sorted(t2.keys()) == held and rep.dropped_torn == unjournaled and rep.journal_torn_bytes == 0
    assert get(t2, 503) == payload(503, A)
    t2.close()


def crash(t: NvmeTier) -> None:
    """Drop a tier's descriptors without a word to its journal, as a crash of its process would
    (the flock is per open file, so it goes with them)."""
    io = t._io
    assert io is not None
    for fd in io._fds:  # type: ignore[attr-defined]
        os.close(fd)
    os.close(t._jfd)
    os.close(t._lockfd)


def test_restart_on_a_full_file_system(small_fs: Path) -> None:
    """A crash while the disk is full, then a restart that cannot write a compacted journal."""
    tier_dir = small_fs / "tier"
    t = NvmeTier(tier_dir, 64 * A, file_size=32 * A)
    t.open()
    for i in range(10):
        put(t, i)
    fill(small_fs / "filler")
    with pytest.raises(NvmeIOError):
        for i in range(10, 200):
            put(t, i)
    held = sorted(t.keys())
    unjournaled = t.statistics().unjournaled_dels
    crash(t)
    clock = Clock()
    t2 = NvmeTier(tier_dir, 64 * A, clock=clock, file_size=32 * A)
    rep = t2.open()  # the compacted journal does not fit: the old one is kept
    assert sorted(t2.keys()) == held and rep.dropped_torn == unjournaled
    assert t2.degraded and "compaction at open" in t2.statistics().degraded_reason
    assert not (tier_dir / "journal.tmp").exists()
    (small_fs / "filler").unlink()
    clock.now += 5.0
    put(t2, 900)
    assert not t2.degraded
    t2.close()
    t3 = NvmeTier(tier_dir, 64 * A, file_size=32 * A)
    t3.open()
    assert sorted(t3.keys()) == sorted([*held, key(900)])
    t3.close()
