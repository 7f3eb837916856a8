"""NvmeTier: recovery, corruption, crash cases, eviction, concurrency and bad input."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memkv_mesh.nvme import NvmeFullError, NvmeIOError, NvmeTier, RecoveryReport
from memkv_mesh.nvme_format import (
    HEADER_SIZE,
    JOURNAL_HEADER_SIZE,
    REC_DEL,
    REC_PUT,
    RECORD_SIZE,
    BlockHeader,
    Record,
    decode_record,
    encode_block_header,
    encode_record,
)
from memkv_mesh.nvme_io import PosixBlockIO

A = 4096
MiB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def payload(i: int, size: int, version: int = 0) -> bytes:
    return random.Random(i * 1_000_003 + version).randbytes(size)


def put(t: NvmeTier, i: int, size: int, version: int = 0) -> list[bytes]:
    data = payload(i, size, version)
    return t.put(key(i), memoryview(data), xxhash.xxh3_64_intdigest(data))


def get(t: NvmeTier, i: int) -> bytes | None:
    n = t.length(key(i))
    if n is None:
        return None
    buf = bytearray(n)
    got = t.read_into(key(i), memoryview(buf))
    return None if got is None else bytes(buf[:got])


def make(path: Path, capacity: int = MiB, **kw: object) -> NvmeTier:
    t = NvmeTier(path, capacity, **kw)  # type: ignore[arg-type]
    t.open()
    return t


def reopen(t: NvmeTier, **kw: object) -> tuple[NvmeTier, RecoveryReport]:
    t.close()
    t2 = NvmeTier(t.directory, t.capacity, **kw)  # type: ignore[arg-type]
    return t2, t2.open()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def records(path: Path) -> list[Record]:
    raw = (path / "journal").read_bytes()
    out = []
    pos = JOURNAL_HEADER_SIZE
    while (r := decode_record(raw, pos)) is not None:
        out.append(r)
        pos += RECORD_SIZE
    return out


def where(t: NvmeTier, i: int) -> tuple[int, int]:
    """(file, extent offset) of block i, from the journal's last PUT of its key."""
    puts = [r for r in records(t.directory) if r.key == key(i) and r.type == REC_PUT]
    return puts[-1].file, puts[-1].offset


# ---- basics -----------------------------------------------------------------------------------


def test_fresh_directory_roundtrip_and_stats(tmp_path: Path) -> None:
    t = NvmeTier(tmp_path / "nv", MiB, file_size=256 * 1024)
    rep = t.open()
    assert rep == RecoveryReport(recovered=0, dropped_torn=0, dropped_corrupt=0, bytes=0)
    assert sorted(os.listdir(tmp_path / "nv")) == [
        "blocks-0000.dat", "blocks-0001.dat", "blocks-0002.dat", "blocks-0003.dat",
        "journal", "lock",
    ]  # fmt: skip
    for i in range(4):
        assert (tmp_path / "nv" / f"blocks-000{i}.dat").stat().st_size == 256 * 1024
    assert put(t, 1, 10_000) == []
    assert key(1) in t and len(t) == 1 and t.keys() == [key(1)]
    assert t.length(key(1)) == 10_000
    assert t.checksum(key(1)) == xxhash.xxh3_64_intdigest(payload(1, 10_000))
    assert get(t, 1) == payload(1, 10_000)
    assert t.read_into(key(2), bytearray(10)) is None
    s = t.statistics()
    assert (s.blocks, s.writes, s.reads, s.misses) == (1, 1, 1, 1)
    assert s.bytes_written == s.bytes_read == s.payload_bytes == 10_000
    assert s.used_bytes == A + 12_288  # header page + payload rounded up
    assert s.capacity == MiB
    t.close()
    t.close()  # idempotent


def test_read_into_larger_dest_and_numpy_like_buffers(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 3, 5000)
    dest = bytearray(9000)
    assert t.read_into(key(3), dest) == 5000
    assert bytes(dest[:5000]) == payload(3, 5000)
    wide = memoryview(bytearray(8192)).cast("Q")  # a non-byte format is viewed as bytes
    assert t.read_into(key(3), wide) == 5000
    put(t, 4, 0)  # an empty block is legal: a header and nothing else
    assert get(t, 4) == b""
    assert t.statistics().used_bytes == A + (A + 8192)
    t.close()


# ---- restart recovery -------------------------------------------------------------------------


def test_restart_recovers_every_block(tmp_path: Path) -> None:
    t = make(tmp_path, 4 * MiB, file_size=MiB)
    sizes = {i: random.Random(i).choice((A, 3 * A + 17, 100_000, 300_000)) for i in range(20)}
    for i, n in sizes.items():
        assert put(t, i, n) == []
    t2, rep = reopen(t, file_size=MiB)
    assert rep.recovered == 20
    assert rep.bytes == sum(sizes.values())
    assert (rep.dropped_torn, rep.dropped_corrupt, rep.dropped_outside) == (0, 0, 0)
    assert rep.journal_records == 20 and rep.journal_torn_bytes == 0
    assert sorted(t2.keys()) == sorted(key(i) for i in sizes)
    for i, n in sizes.items():
        assert get(t2, i) == payload(i, n)
    # the allocators were rebuilt: new blocks never land on recovered ones
    for i in range(100, 105):
        put(t2, i, 50_000)
    for i, n in sizes.items():
        assert get(t2, i) == payload(i, n)
    t3, rep3 = reopen(t2, file_size=MiB)
    assert rep3.recovered == 25
    t3.close()


def test_replace_and_delete_survive_restart(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, 20_000, version=1)
    put(t, 2, 20_000)
    put(t, 1, 30_000, version=2)  # replace, different size
    assert t.delete(key(2)) is True
    assert t.delete(key(2)) is False
    t2, rep = reopen(t)
    assert rep.recovered == 1
    assert t2.keys() == [key(1)]
    assert get(t2, 1) == payload(1, 30_000, version=2)
    assert get(t2, 2) is None
    s = t2.statistics()
    assert s.used_bytes == A + 32_768
    t2.close()


def test_restart_preserves_seq_so_stale_headers_never_match(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, A)
    seq1 = records(tmp_path)[-1].seq
    t.delete(key(1))
    t2, _ = reopen(t)  # compaction leaves no records; the header carries next_seq
    put(t2, 1, A)
    assert records(tmp_path)[-1].seq > seq1
    t2.close()


# ---- corruption and crash cases ----------------------------------------------------------------


def test_flipped_payload_byte_is_a_miss_dropped_and_counted(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, 50_000)
    put(t, 2, 50_000)
    f, off = where(t, 1)
    flip_byte(tmp_path / f"blocks-{f:04d}.dat", off + A + 12_345)
    buf = bytearray(50_000)
    assert t.read_into(key(1), buf) is None
    assert key(1) not in t
    assert t.read_into(key(1), buf) is None  # gone, not re-served
    s = t.statistics()
    assert s.dropped_corrupt == 1 and s.reads == 0 and s.blocks == 1
    assert s.used_bytes == A + 53_248  # the corrupt block's extent was freed
    assert get(t, 2) == payload(2, 50_000)
    t2, rep = reopen(t)
    assert rep.recovered == 1 and key(1) not in t2  # the drop was journaled
    t2.close()


def test_flipped_header_byte_is_a_miss(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, 8000)
    f, off = where(t, 1)
    flip_byte(tmp_path / f"blocks-{f:04d}.dat", off + 40)  # inside the key field
    assert t.read_into(key(1), bytearray(8000)) is None
    assert t.statistics().dropped_corrupt == 1
    t.close()


def test_torn_header_is_dropped_on_restart(tmp_path: Path) -> None:
    t = make(tmp_path)
    for i in range(3):
        put(t, i, 20_000)
    f, off = where(t, 1)
    t.close()
    with open(tmp_path / f"blocks-{f:04d}.dat", "r+b") as fh:  # header half written
        fh.seek(off + HEADER_SIZE // 2)
        fh.write(bytes(HEADER_SIZE // 2))
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 2 and rep.dropped_torn == 1
    assert key(1) not in t2
    assert get(t2, 0) == payload(0, 20_000) and get(t2, 2) == payload(2, 20_000)
    assert t2.statistics().dropped_torn == 1
    t2.close()


def test_verify_all_on_open_finds_corrupt_payloads(tmp_path: Path) -> None:
    t = make(tmp_path)
    for i in range(4):
        put(t, i, 30_000)
    f, off = where(t, 2)
    t.close()
    flip_byte(tmp_path / f"blocks-{f:04d}.dat", off + A + 29_999)  # last payload byte
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open(verify_all=True)
    assert rep.recovered == 3 and rep.dropped_corrupt == 1 and rep.dropped_torn == 0
    assert key(2) not in t2
    t2.close()
    # without verify_all the header passes and the read catches it
    t3 = NvmeTier(tmp_path, MiB)
    assert t3.open().recovered == 3  # the drop was journaled by the previous open
    t3.close()


def test_torn_journal_tail_is_ignored_and_cut(tmp_path: Path) -> None:
    t = make(tmp_path)
    for i in range(5):
        put(t, i, 10_000)
    t.close()
    jpath = tmp_path / "journal"
    good_size = jpath.stat().st_size
    rec = encode_record(Record(REC_PUT, 0, 999, key(9), 0, 10, 0))
    with open(jpath, "ab") as fh:
        fh.write(rec[:37])  # a record torn mid-write
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 5 and rep.journal_torn_bytes == 37
    assert jpath.stat().st_size == good_size  # compaction cut the tail
    put(t2, 7, 10_000)
    t3, rep3 = reopen(t2)
    assert rep3.recovered == 6 and rep3.journal_torn_bytes == 0
    assert get(t3, 7) == payload(7, 10_000)
    t3.close()


def test_garbage_record_stops_replay(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, A)
    put(t, 2, A)
    t.close()
    jpath = tmp_path / "journal"
    raw = bytearray(jpath.read_bytes())
    raw[JOURNAL_HEADER_SIZE + RECORD_SIZE + 50] ^= 1  # corrupt the second record
    jpath.write_bytes(bytes(raw))
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 1 and rep.journal_records == 1
    assert rep.journal_torn_bytes == RECORD_SIZE
    assert t2.keys() == [key(1)]
    t2.close()


def test_journal_record_whose_data_never_made_it(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, 20_000)
    t.close()
    # a PUT for a block whose write never reached the disk: its extent holds zeros
    ghost = Record(REC_PUT, 0, 50, key(2), 512 * 1024, 20_000, 12345)
    # and a PUT pointing at block 1's extent with another seq: the header there is block 1's
    stale = Record(REC_PUT, 0, 51, key(3), 0, 20_000, 777)
    with open(tmp_path / "journal", "ab") as fh:
        fh.write(encode_record(ghost) + encode_record(stale))
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    # key 3 (seq 51) takes the extent first (newest first) and fails its header check; key 1
    # overlaps it and is dropped as well: both records claim the same bytes
    assert rep.recovered == 0
    assert rep.dropped_torn == 3
    assert len(t2) == 0
    assert t2.statistics().used_bytes == 0
    put(t2, 4, 10_000)  # the tier is usable, seq continues after 51
    assert records(tmp_path)[-1].seq > 51
    t2.close()


def test_lost_del_record_newer_put_wins_the_extent(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, 20_000)
    t.delete(key(1))
    put(t, 2, 20_000)  # best fit reuses the extent block 1 had
    recs = records(tmp_path)
    assert [r.type for r in recs] == [REC_PUT, REC_DEL, REC_PUT]
    assert recs[0].offset == recs[2].offset
    t.close()
    jpath = tmp_path / "journal"
    raw = jpath.read_bytes()
    hdr = raw[:JOURNAL_HEADER_SIZE]
    jpath.write_bytes(hdr + encode_record(recs[0]) + encode_record(recs[2]))  # the DEL is lost
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 1 and rep.dropped_torn == 1
    assert t2.keys() == [key(2)]
    assert get(t2, 2) == payload(2, 20_000)
    t2.close()


def test_crash_before_put_record_leaves_the_extent_free(tmp_path: Path) -> None:
    """A complete block written to a free extent whose PUT never reached the journal."""
    t = make(tmp_path)
    put(t, 1, 10_000)
    t.close()
    orphan = payload(2, 10_000)
    header = encode_block_header(BlockHeader(99, 10_000, xxhash.xxh3_64_intdigest(orphan), key(2)))
    with open(tmp_path / "blocks-0000.dat", "r+b") as fh:
        fh.seek(64 * A)
        fh.write(header.ljust(A, b"\0") + orphan)
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 1 and rep.dropped_torn == 0
    assert key(2) not in t2
    assert t2.statistics().used_bytes == A + 12_288  # only block 1's extent is taken
    t2.close()


def test_crash_during_compaction_keeps_the_old_journal(tmp_path: Path) -> None:
    t = make(tmp_path)
    for i in range(3):
        put(t, i, A)
    t.close()
    (tmp_path / "journal.tmp").write_bytes(b"half of a new journal")  # rename never happened
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.recovered == 3
    assert not (tmp_path / "journal.tmp").exists()  # the open's own compaction replaced it
    t2.close()


def test_corrupt_journal_header_resets_the_tier(tmp_path: Path) -> None:
    t = make(tmp_path)
    put(t, 1, A)
    t.close()
    flip_byte(tmp_path / "journal", 20)  # inside file_size, covered by the header checksum
    t2 = NvmeTier(tmp_path, MiB)
    rep = t2.open()
    assert rep.journal_reset and rep.recovered == 0 and len(t2) == 0
    put(t2, 2, A)
    t3, rep3 = reopen(t2)
    assert rep3.recovered == 1 and not rep3.journal_reset
    t3.close()


def test_foreign_journal_and_layout_mismatch_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "journal").write_bytes(b"this is somebody else's file")
    with pytest.raises(ValueError, match="not a memkv-mesh NVMe journal"):
        NvmeTier(tmp_path / "a", MiB).open()
    assert (tmp_path / "a" / "journal").read_bytes() == b"this is somebody else's file"
    t = make(tmp_path / "b", file_size=512 * 1024)
    put(t, 1, A)
    t.close()
    with pytest.raises(ValueError, match="created with align=4096, file_size=524288"):
        NvmeTier(tmp_path / "b", MiB, file_size=256 * 1024).open()


def test_shrunk_capacity_drops_blocks_outside(tmp_path: Path) -> None:
    t = make(tmp_path, 2 * MiB, file_size=MiB)
    for i in range(6):
        put(t, i, 300_000)  # 3 per file
    files = {where(t, i)[0] for i in range(6)}
    assert files == {0, 1}
    t.close()
    t2 = NvmeTier(tmp_path, MiB, file_size=MiB)
    rep = t2.open()
    assert rep.recovered == 3 and rep.dropped_outside == 3
    assert not (tmp_path / "blocks-0001.dat").exists()
    t2.close()


# ---- eviction and capacity --------------------------------------------------------------------


def test_lru_eviction_order(tmp_path: Path) -> None:
    t = make(tmp_path, 64 * A)  # 16 blocks of 3 pages + 1 header page
    for i in range(16):
        assert put(t, i, 3 * A) == []
    assert t.statistics().used_bytes == 64 * A
    assert get(t, 0) == payload(0, 3 * A)  # touch 0: now most recent
    assert get(t, 1) == payload(1, 3 * A)
    assert put(t, 100, 3 * A) == [key(2)]
    assert put(t, 101, 7 * A) == [key(3), key(4)]
    assert t.statistics().evictions == 3
    for i in (0, 1, 5, 100, 101):
        assert key(i) in t
    t.close()


def test_block_larger_than_the_tier(tmp_path: Path) -> None:
    t = make(tmp_path, 16 * A, file_size=8 * A)
    assert t.max_block_bytes == 7 * A
    with pytest.raises(ValueError, match="larger than the NVMe tier allows"):
        put(t, 1, 7 * A + 1)
    with pytest.raises(ValueError, match="larger than the NVMe tier allows"):
        put(t, 1, 100 * A)
    assert put(t, 2, 7 * A) == []
    assert put(t, 3, 7 * A) == []
    assert put(t, 4, 7 * A) == [key(2)]
    t.close()


def test_capacity_never_exceeded_under_random_load(tmp_path: Path) -> None:
    rng = random.Random(42)
    cap = 2 * MiB
    t = make(tmp_path, cap, file_size=MiB)
    live: dict[int, int] = {}
    for step in range(400):
        i = rng.randrange(60)
        op = rng.random()
        if op < 0.6:
            n = rng.choice((A, 5000, 64 * 1024, 200_000, 500_000))
            for k in put(t, i, n, version=step):
                live.pop(int.from_bytes(k[:4], "big"), None)
            live[i] = step * 1_000_000 + n
        elif op < 0.8:
            assert t.delete(key(i)) == (i in live)
            live.pop(i, None)
        elif i in live:
            step0, n = divmod(live[i], 1_000_000)
            assert get(t, i) == payload(i, n, version=step0)
        s = t.statistics()
        assert s.used_bytes <= cap
        assert s.blocks == len(live) == len(t)
    for f in ("blocks-0000.dat", "blocks-0001.dat"):
        assert (tmp_path / f).stat().st_size == MiB
    t2, rep = reopen(t, file_size=MiB)
    assert rep.recovered == len(live)
    for i, v in live.items():
        step0, n = divmod(v, 1_000_000)
        assert get(t2, i) == payload(i, n, version=step0)
    t2.close()


def test_journal_compaction_bounds_its_size(tmp_path: Path) -> None:
    t = make(tmp_path, MiB, compact_min_records=32, compact_ratio=4)
    for r in range(200):
        put(t, r % 5, A, version=r)
    s = t.statistics()
    assert s.compactions >= 2  # one at open, more while running
    assert s.journal_bytes <= JOURNAL_HEADER_SIZE + (32 + 2) * RECORD_SIZE
    t2, rep = reopen(t, compact_min_records=32)
    assert rep.recovered == 5
    for i in range(5):
        assert get(t2, i) == payload(i, A, version=195 + i)
    t2.close()


# ---- pins, concurrency ------------------------------------------------------------------------


class GatedIO(PosixBlockIO):
    """Reads wait on a gate once armed: lets a test hold a read in flight deterministically."""

    def __init__(self, paths: list[Path], sizes: list[int]) -> None:
        super().__init__(paths, sizes)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_writes = 0
        self.fail_reads = 0

    def read(self, file: int, offset: int, header: bytearray, payload: memoryview) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.gate.wait(10)
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError(5, "injected read error")
        super().read(file, offset, header, payload)

    def write(self, file: int, offset: int, header: bytes, payload: memoryview) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError(28, "injected write error")
        super().write(file, offset, header, payload)


def gated(tmp_path: Path, capacity: int, **kw: object) -> tuple[NvmeTier, Callable[[], GatedIO]]:
    made: list[GatedIO] = []

    def factory(paths: list[Path], sizes: list[int]) -> GatedIO:
        made.append(GatedIO(paths, sizes))
        return made[-1]

    t = make(tmp_path, capacity, io_factory=factory, **kw)
    return t, lambda: made[0]


def test_pinned_extent_is_not_reused_until_the_read_finishes(tmp_path: Path) -> None:
    t, io = gated(tmp_path, 16 * A)
    put(t, 1, 3 * A)  # extent [0, 4 pages)
    io().armed = True
    result: list[bytes | None] = []
    reader = threading.Thread(target=lambda: result.append(get(t, 1)))
    reader.start()
    assert io().entered.wait(10)
    assert t.statistics().pinned == 1
    assert t.delete(key(1))  # removed while being read: its extent is kept
    assert put(t, 2, 11 * A) == []  # the rest of the tier; would fit at 0 if the extent were free
    with pytest.raises(NvmeFullError, match="no room") as exc:
        put(t, 3, 15 * A)  # block 2 is evicted, but the 4 pinned pages stay taken
    assert exc.value.dropped == [key(2)]
    assert t.statistics().used_bytes == 4 * A
    io().gate.set()
    reader.join(10)
    assert result == [payload(1, 3 * A)]  # the reader got the old bytes intact
    s = t.statistics()
    assert s.used_bytes == 0 and s.pinned == 0  # freed on unpin
    assert put(t, 3, 15 * A) == []
    t.close()


def test_everything_pinned_raises_nvme_full(tmp_path: Path) -> None:
    t, io = gated(tmp_path, 8 * A)
    put(t, 1, 7 * A)
    io().armed = True
    reader = threading.Thread(target=lambda: get(t, 1))
    reader.start()
    assert io().entered.wait(10)
    with pytest.raises(NvmeFullError) as exc:
        put(t, 2, A)
    assert exc.value.dropped == []
    assert key(1) in t
    io().gate.set()
    reader.join(10)
    assert put(t, 2, A) == [key(1)]
    t.close()


def test_close_waits_for_reads_in_flight(tmp_path: Path) -> None:
    t, io = gated(tmp_path, 16 * A)
    put(t, 1, 2 * A)
    io().armed = True
    result: list[bytes | None] = []
    reader = threading.Thread(target=lambda: result.append(get(t, 1)))
    reader.start()
    assert io().entered.wait(10)
    closer = threading.Thread(target=t.close)
    closer.start()
    closer.join(0.05)
    assert closer.is_alive()  # blocked on the read in flight
    with pytest.raises(RuntimeError, match="not open"):
        put(t, 2, A)
    io().gate.set()
    reader.join(10)
    closer.join(10)
    assert not closer.is_alive()
    assert result == [payload(1, 2 * A)]


def test_write_and_read_errors(tmp_path: Path) -> None:
    """A failed write is an NvmeIOError (an NvmeFullError: "not stored") that keeps nothing; a
    failed read is a miss. tests/security/test_sec_nvme_faults.py covers the degraded state."""
    t, io = gated(tmp_path, 16 * A, probe_interval=0)
    io().fail_writes = 1
    with pytest.raises(NvmeIOError, match="injected write error") as ei:
        put(t, 1, A)
    assert isinstance(ei.value, NvmeFullError) and ei.value.errno == 28
    assert t.statistics().used_bytes == 0 and key(1) not in t and t.degraded
    put(t, 1, A)  # probe_interval 0: the next write is a probe, and it succeeds
    assert not t.degraded
    io().fail_reads = 1
    assert t.read_into(key(1), bytearray(A)) is None
    s = t.statistics()
    assert s.io_errors == 2 and s.read_errors == 1 and s.write_errors == 1
    assert s.dropped_corrupt == 1 and key(1) not in t
    assert s.used_bytes == 0
    t.close()


def test_concurrent_readers_and_writers_never_see_wrong_bytes(tmp_path: Path) -> None:
    """Blocks carry their key and version; readers check every byte of what they get."""
    t = make(tmp_path, 48 * A, compact_min_records=64)
    errors: list[str] = []
    hits = [0]

    def block(i: int, version: int) -> bytes:
        n = A * (1 + (i + version) % 3) - 100
        return key(i) + version.to_bytes(8, "big") + payload(i, n - 40, version)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for v in range(150):
            i = rng.randrange(12)
            data = block(i, seed * 1000 + v)
            try:
                t.put(key(i), data, xxhash.xxh3_64_intdigest(data))
            except NvmeFullError:
                pass
            if rng.random() < 0.1:
                t.delete(key(rng.randrange(12)))

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        buf = bytearray(3 * A)
        for _ in range(400):
            i = rng.randrange(12)
            n = t.read_into(key(i), buf)
            if n is None:
                continue
            version = int.from_bytes(buf[32:40], "big")
            if bytes(buf[:n]) != block(i, version):
                errors.append(f"key {i} version {version}: wrong bytes")
            hits[0] += 1

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2, 3)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in (11, 12, 13)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert hits[0] > 0
    s = t.statistics()
    assert s.dropped_corrupt == 0 and s.pinned == 0
    assert s.used_bytes <= 48 * A
    survivors = {k: t.length(k) for k in t.keys()}
    t2, rep = reopen(t)
    assert rep.recovered == len(survivors) and rep.dropped_torn == 0
    buf = bytearray(3 * A)
    for k, n in survivors.items():
        assert t2.read_into(k, buf) == n
    t2.close()


# ---- bad input and lifecycle -------------------------------------------------------------------


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of align"):
        NvmeTier(tmp_path, MiB + 1)
    with pytest.raises(ValueError, match="file_size"):
        NvmeTier(tmp_path, MiB, file_size=1000)
    with pytest.raises(ValueError, match="power of two"):
        NvmeTier(tmp_path, MiB, align=3)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        NvmeTier(tmp_path, MiB, policy="nope")
    t = NvmeTier(tmp_path, MiB, verify_writes=True)
    with pytest.raises(RuntimeError, match="not open"):
        put(t, 1, A)
    t.open()
    with pytest.raises(RuntimeError, match="already opened"):
        t.open()
    with pytest.raises(ValueError, match="32 bytes, got 5 bytes"):
        t.put(b"short", b"x", 0)
    with pytest.raises(ValueError, match="32 bytes, got str"):
        t.read_into("k" * 32, bytearray(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        t.put(key(1), b"x", -1)
    with pytest.raises(ValueError, match="does not match the data"):
        t.put(key(1), b"abc", 1234)
    with pytest.raises(ValueError, match="bytes-like"):
        t.put(key(1), 12345, 0)
    put(t, 1, 5000)
    with pytest.raises(ValueError, match="dest holds 100 bytes but block"):
        t.read_into(key(1), bytearray(100))
    with pytest.raises(ValueError, match="writable"):
        t.read_into(key(1), bytes(5000))
    assert get(t, 1) == payload(1, 5000)  # nothing above disturbed it
    t.close()
    with pytest.raises(RuntimeError, match="not open"):
        t.read_into(key(1), bytearray(5000))


def test_directory_in_use_is_refused(tmp_path: Path) -> None:
    t = make(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        NvmeTier(tmp_path, MiB).open()
    t.close()
    t2 = NvmeTier(tmp_path, MiB)
    t2.open()  # the lock was released by close
    t2.close()


def test_sync_mode_and_context_manager(tmp_path: Path) -> None:
    with NvmeTier(tmp_path, MiB, sync=True) as t:
        t.open()
        put(t, 1, 10_000)
        assert get(t, 1) == payload(1, 10_000)
    with NvmeTier(tmp_path, MiB) as t2:
        assert t2.open().recovered == 1


def test_bench_script_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from memkv_mesh import nvme_bench

    rc = nvme_bench.main(
        ["--dir", str(tmp_path / "b"), "--block", "64KiB", "--total", "1MiB", "--threads", "2"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("put ", "put+sync", "read cold", "read warm", "raw pread"):
        assert name in out
    assert "block=65536 total=1048576 threads=2" in out
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        nvme_bench.main(["--dir", str(tmp_path), "--block", "2XB"])
    rc = nvme_bench.main(["--dir", str(tmp_path / "r"), "--block", "4KiB", "--recovery", "10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "open " in out and "open verify_all" in out and "for 10 blocks of 4096 bytes" in out


# ---- a state machine with restarts and bit flips against a dict model ----------------------------


class NvmeMachine(RuleBasedStateMachine):
    """Random puts, deletes, reads, restarts and payload bit flips; the tier must agree with a
    dict of what it should hold, and never return bytes other than the last ones put."""

    CAP = 40 * A

    def __init__(self) -> None:
        super().__init__()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsync is free on tmpfs
        self.dir = Path(tempfile.mkdtemp(prefix="nvme-sm-", dir=shm))
        self.t = make(self.dir, self.CAP, file_size=20 * A, compact_min_records=8)
        self.model: dict[int, tuple[int, int]] = {}  # i -> (version, size)
        self.version = 0

    @rule(i=st.integers(0, 7), pages=st.sampled_from([0, 1, 3, 8, 19]), extra=st.integers(0, 99))
    def put_block(self, i: int, pages: int, extra: int) -> None:
        self.version += 1
        size = max(0, pages * A - extra)
        for k in put(self.t, i, size, self.version):
            del self.model[int.from_bytes(k[:4], "big")]
        self.model[i] = (self.version, size)

    @rule(i=st.integers(0, 7))
    def delete_block(self, i: int) -> None:
        assert self.t.delete(key(i)) == (i in self.model)
        self.model.pop(i, None)

    @rule(i=st.integers(0, 7))
    def read_block(self, i: int) -> None:
        got = get(self.t, i)
        if i in self.model:
            version, size = self.model[i]
            assert got == payload(i, size, version)
        else:
            assert got is None

    @rule()
    def restart(self) -> None:
        self.t, rep = reopen(self.t, file_size=20 * A, compact_min_records=8)
        assert rep.recovered == len(self.model)
        assert rep.dropped_torn == rep.dropped_corrupt == rep.journal_torn_bytes == 0

    @precondition(lambda self: any(size for _, size in self.model.values()))
    @rule(data=st.data())
    def flip_payload_bit(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(i for i, (_, n) in self.model.items() if n)))
        size = self.model[i][1]
        f, off = where(self.t, i)
        flip_byte(self.dir / f"blocks-{f:04d}.dat", off + A + data.draw(st.integers(0, size - 1)))
        before = self.t.statistics().dropped_corrupt
        assert get(self.t, i) is None
        assert self.t.statistics().dropped_corrupt == before + 1
        del self.model[i]

    @invariant()
    def agrees_with_model(self) -> None:
        assert sorted(self.t.keys()) == sorted(key(i) for i in self.model)
        s = self.t.statistics()
        assert s.used_bytes <= self.CAP
        assert s.payload_bytes == sum(n for _, n in self.model.values())

    def teardown(self) -> None:
        self.t.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestNvmeMachine = NvmeMachine.TestCase
TestNvmeMachine.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, derandomize=True
)


def test_put_many_is_one_journal_append_and_survives_a_reopen(tmp_path: Path) -> None:
    t = make(tmp_path / "t", capacity=64 * A, file_size=16 * A)
    size = 3 * A
    items = [(key(i), memoryview(payload(i, size)), xxhash.xxh3_64_intdigest(payload(i, size))) for i in range(6)]
    too_big = (key(99), memoryview(bytes(20 * A)), 0)  # larger than a data file: refused, not raised
    before = (tmp_path / "t" / "journal").stat().st_size
    ok, dropped = t.put_many([*items[:3], too_big, *items[3:]])
    assert ok == [True, True, True, False, True, True, True] and dropped == []
    assert (tmp_path / "t" / "journal").stat().st_size == before + 6 * RECORD_SIZE
    assert [get(t, i) for i in range(6)] == [payload(i, size) for i in range(6)]
    ok, dropped = t.put_many([(key(10 + i), memoryview(payload(10 + i, size)), xxhash.xxh3_64_intdigest(payload(10 + i, size))) for i in range(12)])
    assert all(ok) and len(dropped) >= 2  # the tier is 64 pages: older blocks made room
    live = [i for i in (*range(6), *range(10, 22)) if t.length(key(i)) is not None]
    t.close()
    again = make(tmp_path / "t", capacity=64 * A, file_size=16 * A)
    assert sorted(k for k in again.keys()) == sorted(key(i) for i in live)
    assert all(get(again, i) == payload(i, size) for i in live)
    with pytest.raises(ValueError, match="checksum"):
        again.put_many([(key(1), memoryview(b"x"), -1)])
    again.close()


def test_data_files_larger_than_the_free_space_are_refused_before_filling_the_disk(tmp_path) -> None:
    """posix_fallocate of more than the disk holds filled the disk (62 GB once) before failing."""
    import errno as _errno

    from memkv_mesh.nvme_io import PosixBlockIO

    vfs = os.statvfs(tmp_path)
    too_big = vfs.f_bavail * vfs.f_frsize + (1 << 40)
    with pytest.raises(OSError) as ei:
        PosixBlockIO([tmp_path / "blocks-0000.dat"], [too_big])
    assert ei.value.errno == _errno.ENOSPC and "lower store.nvme_bytes" in str(ei.value)
    assert os.stat(tmp_path / "blocks-0000.dat").st_blocks == 0
