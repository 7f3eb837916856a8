"""``memkv-mesh bench local``: put/get throughput and lookup latency through the local client.

It starts its own daemon in a temporary directory (or uses ``--socket PATH``), and for each block
size puts batches of 16 fresh blocks with ``put_many``, reads them back with ``get_many_into`` a
caller's buffer, and deletes them (untimed). The ceiling (``memcpy_GBps``) is the same 16 numpy
copies of the same blocks into the same buffer, timed in the same rounds, so it sees the same
machine. Lookup latency is 64 keys, all present, answered by the daemon.
Throughputs are aggregate bytes / seconds over the timed rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memkv_mesh.client import Client
from memkv_mesh.spawn import spawn_daemon

SIZES = (262144, 2097152, 16777216)
BATCH = 16


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _start_daemon(tmp: Path, dram: int, max_block: int) -> tuple[subprocess.Popen[bytes], Path]:
    cfg = tmp / "mesh.toml"
    cfg.write_text(
        f'[node]\nid = "bench"\ndata_dir = "{tmp}"\n'
        f"[store]\ndram_bytes = {dram}\nnvme_bytes = 0\nmax_block_bytes = {max_block}\n"
        '[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
    )
    sock = tmp / "memkv.sock"
    return spawn_daemon(cfg, sock, timeout=30), sock


def _rounds(size: int, budget_bytes: int) -> int:
    return max(3, min(200, budget_bytes // (BATCH * size)))


def run_bench(client: Client, *, sizes: Sequence[int] = SIZES, budget_bytes: int = 1 << 30, lookups: int = 3000) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    out: dict[str, Any] = {"sizes": []}
    for size in sizes:
        rounds = _rounds(size, budget_bytes)
        values = [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(BATCH)]
        dest = np.empty(BATCH * size, dtype=np.uint8)
        put_s = get_s = copy_s = 0.0
        for r in range(rounds + 1):
            keys = [os.urandom(32) for _ in range(BATCH)]
            t0 = time.perf_counter()
            stored = client.put_many(keys, values)
            t1 = time.perf_counter()
            got = client.get_many_into(keys, dest)
            t2 = time.perf_counter()
            # The ceiling, interleaved so it sees the same machine: the same 16 copies, no daemon.
            for i, v in enumerate(values):
                np.copyto(dest[i * size : (i + 1) * size], v)
            t3 = time.perf_counter()
            if stored != BATCH or any(g != size for g in got):
                raise RuntimeError(f"bench round at size {size}: stored {stored}, got {got}")
            if r == 0:
                if not np.array_equal(dest[:size], values[0]):
                    raise RuntimeError("bench read back wrong bytes")
            else:
                put_s += t1 - t0
                get_s += t2 - t1
                copy_s += t3 - t2
            client.delete(keys)
        moved = BATCH * size * rounds
        out["sizes"].append(
            {
                "size": size,
                "put_GBps": round(moved / put_s / 1e9, 3),
                "get_GBps": round(moved / get_s / 1e9, 3),
                "memcpy_GBps": round(moved / copy_s / 1e9, 3),
                "rounds": rounds,
            }
        )
    keys = [os.urandom(32) for _ in range(64)]
    client.put_many(keys, [b"x" * 4096] * 64)
    lat = []
    for _ in range(lookups):
        t0 = time.perf_counter()
        n = client.lookup(keys)
        lat.append(time.perf_counter() - t0)
        if n != 64:
            raise RuntimeError(f"lookup returned {n}, expected 64")
    client.delete(keys)
    lat.sort()
    out["lookup64_p50_us"] = round(lat[len(lat) // 2] * 1e6, 1)
    out["lookup64_p99_us"] = round(lat[int(len(lat) * 0.99)] * 1e6, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memkv-mesh bench local", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--socket", default=None, help="use the daemon at this socket instead of starting one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="block sizes in bytes, comma-separated")
    p.add_argument("--budget", type=int, default=1 << 30, help="bytes moved per size and direction (default 1 GiB)")
    ns = p.parse_args(argv)
    sizes = [int(s) for s in ns.sizes.split(",") if s]
    proc = None
    tmpdir = None
    try:
        if ns.socket:
            sock = Path(ns.socket)
        else:
            tmpdir = tempfile.TemporaryDirectory(prefix="memkv-bench-")
            need = BATCH * max(sizes) * 2 + (64 << 20)
            proc, sock = _start_daemon(Path(tmpdir.name), need, max(sizes))
        rss_empty = _rss_mib(proc.pid) if proc else None
        with Client(sock, name="bench") as client:
            result = run_bench(client, sizes=sizes, budget_bytes=ns.budget)
        if proc is not None:
            result["daemon_rss_empty_MiB"] = round(rss_empty, 1) if rss_empty else None
            result["daemon_rss_after_MiB"] = round(_rss_mib(proc.pid) or 0, 1)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmpdir is not None:
            tmpdir.cleanup()
    if ns.json:
        print(json.dumps(result))
        return 0
    print(f"{'size':>10} {'put GB/s':>9} {'get GB/s':>9} {'memcpy GB/s':>12} {'put/memcpy':>11} {'get/memcpy':>11}")
    for s in result["sizes"]:
        print(
            f"{s['size']:>10} {s['put_GBps']:>9.2f} {s['get_GBps']:>9.2f} {s['memcpy_GBps']:>12.2f} "
            f"{s['put_GBps'] / s['memcpy_GBps']:>11.2f} {s['get_GBps'] / s['memcpy_GBps']:>11.2f}"
        )
    print(f"lookup of 64 keys: p50 {result['lookup64_p50_us']} us, p99 {result['lookup64_p99_us']} us")
    if "daemon_rss_empty_MiB" in result:
        print(f"daemon RSS: {result['daemon_rss_empty_MiB']} MiB empty, {result['daemon_rss_after_MiB']} MiB after")
    return 0
