#!/usr/bin/env python3
"""Check the GPU data path on a machine with a CUDA GPU; prints one JSON object.

Starts a daemon in a temporary directory, puts from cupy arrays and torch CUDA tensors, gets
into them and compares bytes; measures host<->device GB/s through the pinned arena against a
plain cupy copy of the same size from pinned host memory (the PCIe ceiling) and from pageable
memory; if kvikio imports, puts a block on an NVMe tier opened with the kvikio backend and reads
it straight into device memory. Exit code 0 if every check passed, 1 if one failed, 2 if there
is no usable GPU (the JSON says why).

    .venv/bin/python scripts/gpu_check.py [--block-mib 8] [--blocks 8] [--rounds 10] [--nvme-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start_daemon(tmp: Path, dram: int, max_block: int) -> tuple[subprocess.Popen[bytes], Path]:
    from memkv_mesh.spawn import spawn_daemon

    cfg = tmp / "mesh.toml"
    sock = tmp / "memkv.sock"
    cfg.write_text(
        f'[node]\nid = "gpucheck"\ndata_dir = "{tmp / "data"}"\nsocket = "{sock}"\n'
        f"[store]\ndram_bytes = {dram}\nnvme_bytes = 0\nmax_block_bytes = {max_block}\n"
        '[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
    )
    return spawn_daemon(cfg, sock, cwd=REPO), sock


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0


def timed(fn: Any, rounds: int, sync: Any) -> float:
    fn()  # warm up
    sync()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync()
    return (time.perf_counter() - t0) / rounds


def check_cupy(client: Any, cupy: Any, out: dict[str, Any], block: int, nblocks: int) -> bool:
    rng = cupy.random.default_rng(1)
    srcs = [rng.integers(0, 256, block, dtype=cupy.uint8) for _ in range(nblocks)]
    srcs.append(rng.random(block // 4, dtype=cupy.float32))  # a non-uint8 dtype
    keys = [os.urandom(32) for _ in srcs]
    stored = client.put_many(keys, srcs)
    dsts = [cupy.empty_like(s) for s in srcs]
    lens = client.get_many_into(keys, dsts)
    same = all(bool((d == s).all()) for d, s in zip(dsts, srcs, strict=True))
    # The arena holds the same bytes (zero-copy view), so the stored xxh3 is of the right bytes.
    with client.get_many(keys[:1]) as lease:
        host_same = bytes(lease.views[0]) == cupy.asnumpy(srcs[0]).tobytes()
    packed = cupy.empty(sum(s.nbytes for s in srcs), dtype=cupy.uint8)
    client.get_many_into(keys, packed)
    packed_same = bool((packed == cupy.concatenate([s.view(cupy.uint8).ravel() for s in srcs])).all())
    client.delete(keys)
    ok = stored == len(srcs) and lens == [s.nbytes for s in srcs] and same and host_same and packed_same
    out["cupy_round_trip"] = {"ok": ok, "stored": stored, "bytes_equal": same, "arena_equal": host_same, "packed_equal": packed_same}
    return ok


def check_torch(client: Any, out: dict[str, Any], block: int) -> bool:
    try:
        import torch
    except ImportError:
        out["torch_round_trip"] = {"skipped": "torch is not installed"}
        return True
    if not torch.cuda.is_available():
        out["torch_round_trip"] = {"skipped": "torch has no CUDA"}
        return True
    g = torch.Generator(device="cuda").manual_seed(2)
    src = torch.rand((block // 2 // 128, 128), generator=g, device="cuda").to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # produced on a side stream, ordered back the torch way
        src2 = (src * 3).contiguous()
    torch.cuda.current_stream().wait_stream(side)
    key, key2 = os.urandom(32), os.urandom(32)
    stored = client.put_many([key, key2], [src, src2])
    dst, dst2 = torch.empty_like(src), torch.empty_like(src2)
    lens = client.get_many_into([key, key2], [dst, dst2])
    ok = stored == 2 and lens == [src.numel() * 2] * 2 and torch.equal(src, dst) and torch.equal(src2, dst2)
    client.delete([key, key2])
    out["torch_round_trip"] = {"ok": ok, "dtype": "bfloat16", "side_stream": True}
    return ok


def bandwidth(client: Any, cupy: Any, out: dict[str, Any], block: int, nblocks: int, rounds: int) -> None:
    total = block * nblocks
    srcs = [cupy.random.default_rng(3).integers(0, 256, block, dtype=cupy.uint8) for _ in range(nblocks)]
    dsts = [cupy.empty_like(s) for s in srcs]
    sync = cupy.cuda.runtime.deviceSynchronize
    keys: list[list[bytes]] = []

    def put() -> None:
        ks = [os.urandom(32) for _ in range(nblocks)]
        client.put_many(ks, srcs)
        keys.append(ks)
        if len(keys) > 2:
            client.delete(keys.pop(0))

    put_s = timed(put, rounds, sync)
    get_keys = keys[-1]
    get_s = timed(lambda: client.get_many_into(get_keys, dsts), rounds, sync)
    for ks in keys:
        client.delete(ks)
    dev = cupy.empty(total, dtype=cupy.uint8)
    pinned = cupy.cuda.alloc_pinned_memory(total)
    import numpy as np

    host_pinned = np.frombuffer(pinned, dtype=np.uint8, count=total)
    host_pageable = np.empty(total, dtype=np.uint8)
    h2d_pinned = timed(lambda: dev.set(host_pinned), rounds, sync)
    d2h_pinned = timed(lambda: dev.get(out=host_pinned), rounds, sync)
    h2d_pageable = timed(lambda: dev.set(host_pageable), rounds, sync)
    d2h_pageable = timed(lambda: dev.get(out=host_pageable), rounds, sync)
    stats = client._gpu.statistics() if client._gpu is not None else None
    out["bandwidth"] = {
        "batch_bytes": total, "block_bytes": block, "rounds": rounds,
        "put_d2h_through_arena_GBps": gbps(total, put_s), "get_h2d_through_arena_GBps": gbps(total, get_s),
        "ceiling_d2h_pinned_GBps": gbps(total, d2h_pinned), "ceiling_h2d_pinned_GBps": gbps(total, h2d_pinned),
        "d2h_pageable_GBps": gbps(total, d2h_pageable), "h2d_pageable_GBps": gbps(total, h2d_pageable),
        "put_over_ceiling": round(d2h_pinned / put_s, 3), "get_over_ceiling": round(h2d_pinned / get_s, 3),
        "arena_pinned": bool(stats and stats.pinned), "pin_error": stats.pin_error if stats else "",
        "note": "put/get include the daemon round trips and, for put, xxh3 of every block",
    }  # fmt: skip


def _bandwidth_ok(*args: Any) -> bool:
    bandwidth(*args)
    return True


def check_kvikio(cupy: Any, out: dict[str, Any], nvme_dir: Path, block: int, rounds: int) -> bool:
    try:
        import kvikio
    except ImportError as e:
        out["kvikio"] = {"skipped": f"kvikio does not import: {e}"}
        return True
    import numpy as np
    import xxhash

    from memkv_mesh.nvme import NvmeTier
    from memkv_mesh.nvme_kvikio import KvikioBlockIO, kvikio_io_factory, read_block_to_device

    data = np.random.default_rng(4).integers(0, 256, block, dtype=np.uint8)
    key = os.urandom(32)
    res: dict[str, Any] = {"version": getattr(kvikio, "__version__", "?"), "dir": str(nvme_dir)}
    with NvmeTier(nvme_dir, max(64 << 20, 4 * block), io_factory=kvikio_io_factory()) as tier:
        tier.open()
        io = tier._io
        res["compat_mode"] = io.compat_mode_active() if isinstance(io, KvikioBlockIO) else None
        tier.put(key, data, xxhash.xxh3_64_intdigest(data.tobytes()))
        host = bytearray(block)
        res["host_read_ok"] = tier.read_into(key, host) == block and bytes(host) == data.tobytes()
        dev = cupy.zeros(block, dtype=cupy.uint8)
        n = read_block_to_device(tier, key, dev)
        res["device_read_ok"] = n == block and cupy.asnumpy(dev).tobytes() == data.tobytes()
        sync = cupy.cuda.runtime.deviceSynchronize
        res["device_read_verified_GBps"] = gbps(block, timed(lambda: read_block_to_device(tier, key, dev), rounds, sync))
        res["device_read_unverified_GBps"] = gbps(block, timed(lambda: read_block_to_device(tier, key, dev, verify=False), rounds, sync))
        res["note"] = "reads may come from the page cache; not a drive benchmark"
    ok = bool(res["host_read_ok"] and res["device_read_ok"])
    res["ok"] = ok
    out["kvikio"] = res
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--block-mib", type=int, default=8, help="block size in MiB (default 8)")
    p.add_argument("--blocks", type=int, default=8, help="blocks per batch (default 8)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per measurement (default 10)")
    p.add_argument("--nvme-dir", type=Path, default=None, help="directory for the kvikio NVMe tier (default: a temporary one under the repository, on disk rather than tmpfs)")
    ns = p.parse_args(argv)
    if ns.block_mib <= 0 or ns.blocks <= 0 or ns.rounds <= 0:
        p.error("--block-mib, --blocks and --rounds must be positive")
    block = ns.block_mib << 20
    out: dict[str, Any] = {"ok": False}
    try:
        import cupy

        ndev = cupy.cuda.runtime.getDeviceCount()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        out["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        out["devices"] = ndev
        out["cupy"] = cupy.__version__
    except Exception as e:
        out["error"] = f"no usable GPU: {type(e).__name__}: {e}"
        print(json.dumps(out))
        return 2
    checks: list[bool] = []
    proc = None
    try:
        with tempfile.TemporaryDirectory(prefix="memkv-gpu-") as tmp:
            from memkv_mesh.client import Client

            dram = 4 * block * (ns.blocks + 1) + (256 << 20)
            proc, sock = start_daemon(Path(tmp), dram, block)
            with Client(sock, name="gpu_check") as client:
                for name, fn in (
                    ("cupy", lambda: check_cupy(client, cupy, out, block, ns.blocks)),
                    ("torch", lambda: check_torch(client, out, block)),
                    ("bandwidth", lambda: _bandwidth_ok(client, cupy, out, block, ns.blocks, ns.rounds)),
                ):
                    try:
                        checks.append(bool(fn()))
                    except Exception:
                        checks.append(False)
                        out.setdefault("errors", {})[name] = traceback.format_exc(limit=6)
                stats = client._gpu.statistics() if client._gpu is not None else None
                out["gpu_path"] = None if stats is None else {f: getattr(stats, f) for f in stats.__struct_fields__}
            out["arena_unregistered_on_close"] = bool(stats is None or client._gpu.statistics().closed)
        nvme_parent = ns.nvme_dir if ns.nvme_dir is not None else REPO
        with tempfile.TemporaryDirectory(prefix=".memkv-gpu-nvme-", dir=nvme_parent) as nd:
            try:
                checks.append(check_kvikio(cupy, out, Path(nd) / "tier", block, ns.rounds))
            except Exception:
                checks.append(False)
                out.setdefault("errors", {})["kvikio"] = traceback.format_exc(limit=6)
    except Exception:
        checks.append(False)
        out.setdefault("errors", {})["setup"] = traceback.format_exc(limit=6)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    out["ok"] = bool(checks) and all(checks)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
