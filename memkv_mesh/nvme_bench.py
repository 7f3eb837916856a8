"""Measure the NVMe tier's put and read_into throughput on a directory's file system.

``python -m memkv_mesh.nvme_bench --dir /var/tmp/nvbench --block 2MiB --total 1GiB``

Three passes over ``total`` bytes of ``block``-sized blocks (payload and checksums are made
before the clock starts, as the store has them when it demotes a block):

* put: ``NvmeTier.put`` of every block, then the time to fdatasync the data files (the page
  cache absorbs writes, so "put+sync" is the figure the device sustains);
* read warm: ``read_into`` of every block with the data in the page cache (header check and
  xxh3 verification included);
* read cold: the same after fdatasync + ``posix_fadvise(DONTNEED)`` on the data files, so the
  bytes come from the device (on tmpfs there is no device: warm and cold are the same);
* raw pread: plain ``os.preadv`` of ``block`` bytes from the first data file (warm), the
  baseline that shows what the tier's header check, checksum and locking add.

``--threads N`` runs each pass on N threads, as the store does with ``trio.to_thread``.
The directory is removed afterwards unless ``--keep``.

``--fsync`` instead measures what each ``[store] fsync`` policy costs a flash node's write-through:
``total`` bytes of ``block``-sized blocks written as replicas arrive, in batches of ``--batch``
blocks (one pushed batch), with "off" (page cache only), "batch" (one ``NvmeTier.sync`` per batch)
and "always" (the tier's ``sync=True``: fdatasync of payload and journal record per block).

``--recovery N`` instead times ``open()`` (and ``open(verify_all=True)``) of a tier holding N
blocks of ``--block`` bytes. ``python -m memkv_mesh.nvme_bench --allocator`` instead times ``ExtentAllocator``: 100k extents
of mixed sizes, half freed at random, then alloc+free pairs against that fragmented state.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from memkv_mesh.alloc import ExtentAllocator
from memkv_mesh.nvme import NvmeTier

_UNITS = {
    "": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}


def _size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :].strip()
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 2MiB, 512KiB, 1GiB")
    return int(float(num) * _UNITS[unit])


def _run(threads: int, n: int, fn: Callable[[int], object]) -> float:
    t0 = time.perf_counter()
    if threads <= 1:
        for i in range(n):
            fn(i)
    else:
        with ThreadPoolExecutor(threads) as ex:
            for _ in ex.map(fn, range(n)):
                pass
    return time.perf_counter() - t0


def _drop_cache(directory: Path) -> None:
    for path in sorted(directory.glob("blocks-*.dat")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench(directory: Path, block: int, total: int, threads: int) -> dict[str, float]:
    """Return GB/s (1e9 bytes per second) for each pass."""
    n = max(1, total // block)
    distinct = min(n, 16)
    payloads = [os.urandom(block) for _ in range(distinct)]
    sums = [xxhash.xxh3_64_intdigest(p) for p in payloads]
    keys = [i.to_bytes(32, "big") for i in range(n)]
    capacity = -(-(n * (block + 8192)) // 4096) * 4096
    tier = NvmeTier(directory, capacity)
    tier.open()
    out: dict[str, float] = {}
    try:
        moved = n * block

        def put(i: int) -> object:
            return tier.put(keys[i], memoryview(payloads[i % distinct]), sums[i % distinct])

        t_put = _run(threads, n, put)
        t0 = time.perf_counter()
        _drop_cache(directory)
        t_sync = time.perf_counter() - t0
        out["put"] = moved / t_put / 1e9
        out["put+sync"] = moved / (t_put + t_sync) / 1e9

        local = threading.local()  # one destination buffer per thread, reused

        def read(i: int) -> object:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(block)
            got = tier.read_into(keys[i], buf)
            if got != block:
                raise RuntimeError(f"block {i} read back {got}")
            return got

        out["read cold"] = moved / _run(threads, n, read) / 1e9
        out["read warm"] = moved / _run(threads, n, read) / 1e9
        raw_fd = os.open(directory / "blocks-0000.dat", os.O_RDONLY)
        span = os.fstat(raw_fd).st_size // block

        def raw_read(i: int) -> object:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(block)
            return os.preadv(raw_fd, [buf], (i % span) * block)

        try:
            out["raw pread"] = moved / _run(threads, n, raw_read) / 1e9
        finally:
            os.close(raw_fd)
        s = tier.statistics()
        if s.dropped_corrupt or s.reads != 2 * n:
            raise RuntimeError(f"unexpected statistics: {s}")
    finally:
        tier.close()
    return out


def bench_fsync(directory: Path, block: int, total: int, batch: int, repeat: int = 3) -> dict[str, float]:
    """Median microseconds per block written through under each fsync policy (a fresh tier per
    run; the policies' order rotates between repeats, and every run starts after an fdatasync of
    the previous one's files, so one policy's dirty page cache is not charged to the next)."""
    n = max(1, total // block)
    payload = os.urandom(block)
    checksum = xxhash.xxh3_64_intdigest(payload)
    capacity = -(-(n * (block + 8192)) // 4096) * 4096
    policies = ["off", "batch", "always"]
    runs: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(repeat):
        for policy in policies[r % 3 :] + policies[: r % 3]:
            d = directory / policy
            tier = NvmeTier(d, capacity, sync=policy == "always")
            tier.open()
            try:
                os.sync()
                t0 = time.perf_counter()
                for lo in range(0, n, batch):
                    for i in range(lo, min(n, lo + batch)):
                        tier.put(i.to_bytes(32, "big"), payload, checksum)
                    if policy == "batch":
                        tier.sync()
                runs[policy].append((time.perf_counter() - t0) / n * 1e6)
            finally:
                tier.close()
                shutil.rmtree(d, ignore_errors=True)
    return {p: sorted(v)[len(v) // 2] for p, v in runs.items()}


def bench_allocator(pairs: int = 200_000, seed: int = 0) -> tuple[float, int]:
    """Microseconds per alloc+free pair on a fragmented allocator, and its free-extent count."""
    rng = random.Random(seed)
    pages = (1, 2, 8, 64, 512)
    a = ExtentAllocator(1 << 40)
    live = [a.alloc(rng.choice(pages) * 4096) for _ in range(100_000)]
    rng.shuffle(live)
    for off in live[:50_000]:
        a.free(off)  # type: ignore[arg-type]
    live = live[50_000:]
    sizes = [rng.choice(pages) * 4096 for _ in range(pairs)]
    slots = [rng.randrange(len(live)) for _ in range(pairs)]
    t0 = time.perf_counter()
    for size, slot in zip(sizes, slots, strict=True):
        off = a.alloc(size)
        a.free(live[slot])  # type: ignore[arg-type]
        live[slot] = off
    dt = time.perf_counter() - t0
    return dt / pairs * 1e6, a.statistics().free_extents


def bench_recovery(directory: Path, blocks: int, block: int) -> dict[str, float]:
    """Seconds to open a tier holding ``blocks`` blocks, with and without verify_all."""
    capacity = blocks * (-(-block // 4096) * 4096 + 4096)
    data = os.urandom(block)
    checksum = xxhash.xxh3_64_intdigest(data)
    tier = NvmeTier(directory, capacity)
    tier.open()
    try:
        for i in range(blocks):
            tier.put(i.to_bytes(32, "big"), data, checksum)
    finally:
        tier.close()
    out: dict[str, float] = {}
    for name, verify in (("open", False), ("open verify_all", True)):
        tier = NvmeTier(directory, capacity)
        t0 = time.perf_counter()
        report = tier.open(verify_all=verify)
        out[name] = time.perf_counter() - t0
        tier.close()
        if report.recovered != blocks:
            raise RuntimeError(f"recovered {report.recovered} of {blocks}: {report}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m memkv_mesh.nvme_bench",
        description="Measure NvmeTier put/read_into throughput on a directory's file system.",
    )
    p.add_argument("--dir", type=Path, help="scratch directory (must not exist)")
    p.add_argument("--block", type=_size, default=2 << 20, help="block size (default 2MiB)")
    p.add_argument("--total", type=_size, default=1 << 30, help="bytes per pass (default 1GiB)")
    p.add_argument("--threads", type=int, default=1, help="threads per pass (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    p.add_argument("--allocator", action="store_true", help="time ExtentAllocator instead")
    p.add_argument(
        "--recovery", type=int, metavar="N", help="time open() of a tier of N --block blocks"
    )
    p.add_argument("--fsync", action="store_true", help="time write-through under each [store] fsync policy")
    p.add_argument("--batch", type=int, default=64, help="blocks per pushed batch for --fsync (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs per policy for --fsync; the median is shown (default 3)")
    args = p.parse_args(argv)
    if args.allocator:
        us, nfree = bench_allocator()
        print(f"ExtentAllocator: {us:.2f} us per alloc+free pair ({nfree} free extents)")
        return 0
    if args.dir is None:
        p.error("--dir is required (a scratch directory that does not exist yet)")
    if args.dir.exists():
        p.error(f"--dir {args.dir} exists; give a fresh path (it is deleted afterwards)")
    if args.block <= 0 or args.total < args.block or args.threads < 1:
        p.error("need --block > 0, --total >= --block and --threads >= 1")
    if args.fsync:
        if args.batch < 1:
            p.error("--batch must be >= 1")
        try:
            per_block = bench_fsync(args.dir, args.block, args.total, args.batch, max(1, args.repeat))
        finally:
            if not args.keep:
                shutil.rmtree(args.dir, ignore_errors=True)
        print(
            f"dir={args.dir} block={args.block} total={args.total // args.block * args.block} "
            f"batch={args.batch} median of {max(1, args.repeat)}"
        )
        for name, per in per_block.items():
            print(f"  fsync={name:<7} {per:9.1f} us per block  {args.block / per / 1e3:7.3f} GB/s  ({per / per_block['off']:.1f}x off)")
        return 0
    if args.recovery is not None:
        if args.recovery < 1:
            p.error("--recovery needs a positive block count")
        try:
            times = bench_recovery(args.dir, args.recovery, args.block)
        finally:
            if not args.keep:
                shutil.rmtree(args.dir, ignore_errors=True)
        for name, sec in times.items():
            print(
                f"{name:<16} {sec:7.3f} s for {args.recovery} blocks of {args.block} bytes "
                f"({sec / args.recovery * 1e6:.1f} us per block)"
            )
        return 0
    try:
        res = bench(args.dir, args.block, args.total, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(
        f"dir={args.dir} block={args.block} total={args.total // args.block * args.block} "
        f"threads={args.threads}"
    )
    for name, gbps in res.items():
        print(f"  {name:<10} {gbps:7.2f} GB/s  ({args.block / gbps / 1e3:8.1f} us per block)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
