"""Issue 11: the cost of sealing block bytes (``[dataplane] encrypt_bulk``), measured side by side.

Two data planes in this process talk over loopback TCP; fetch and push of 2 MiB blocks (batches
of 8) run with plain and with sealed bulk bytes, interleaved trial by trial, and the medians are
compared. Control frames are sealed in both (that is not optional). The test runs a small
version and checks that both modes move the bytes; the figures in docs/dataplane.md come from

    .venv/bin/python tests/security/test_sec_dataplane_bench_crypto.py --trials 5 --rounds 12

which prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_dataplane_helpers import config, key, make_store, payload, put  # noqa: E402

from transport.dataplane import DataPlane  # noqa: E402

MiB = 1 << 20
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


async def _pair(tmp: Path, nursery: trio.Nursery, tag: str, encrypt: bool) -> tuple[DataPlane, DataPlane, str]:
    stores = [make_store(tmp / f"{tag}{i}-{os.getpid()}.arena", size=160 * MiB, max_block=8 * MiB) for i in range(2)]
    a = DataPlane(config(encrypt_bulk=encrypt), stores[0], node_id=f"{tag}-a")
    b = DataPlane(config(encrypt_bulk=encrypt), stores[1], node_id=f"{tag}-b")
    await nursery.start(a.run)
    addr = await nursery.start(b.run)
    return a, b, addr


async def _trial(
    a: DataPlane, b: DataPlane, addr: str, keys: list[bytes], rounds: int, op: str, size: int
) -> float:
    """GB/s of ``rounds`` fetches (b -> a) or pushes (a -> b) of ``keys`` (the copy made is
    deleted after each round, so every round moves every block)."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        if op == "fetch":
            assert all(await a.fetch(addr, keys))
            await a.store.delete(keys)
        else:
            assert all(await a.push(addr, keys))
            await b.store.delete(keys)
    return rounds * len(keys) * size / (time.perf_counter() - t0) / 1e9


async def measure(trials: int = 5, rounds: int = 12, batch: int = 8, size: int = 2 * MiB) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=_SHM) as d:
        tmp = Path(d)
        out: dict[str, Any] = {"block_bytes": size, "batch": batch, "rounds": rounds, "trials": trials}
        async with trio.open_nursery() as nursery:
            modes = {m: await _pair(tmp, nursery, m, m == "sealed") for m in ("plain", "sealed")}
            fetch_keys = [key(i, 900) for i in range(batch)]  # held by b, fetched by a
            push_keys = [key(i, 901) for i in range(batch)]  # held by a, pushed to b
            for a, b, _ in modes.values():
                for i in range(batch):
                    await put(b.store, fetch_keys[i], payload(size, i))
                    await put(a.store, push_keys[i], payload(size, 100 + i))
            got: dict[str, list[float]] = {f"{op}_{m}": [] for op in ("fetch", "push") for m in modes}
            for _ in range(trials):
                for op, keys in (("fetch", fetch_keys), ("push", push_keys)):
                    for m, (a, b, addr) in modes.items():
                        got[f"{op}_{m}"].append(await _trial(a, b, addr, keys, rounds, op, size))
            for name, xs in got.items():
                out[f"{name}_GBps"] = round(statistics.median(xs), 3)
                out.setdefault("runs", {})[name] = [round(x, 3) for x in xs]
            for op in ("fetch", "push"):
                out[f"{op}_sealed_vs_plain"] = round(out[f"{op}_sealed_GBps"] / out[f"{op}_plain_GBps"], 3)
            for m, (a, b, _) in modes.items():
                assert a.statistics().corrupt_blocks == b.statistics().corrupt_blocks == 0
                assert a.statistics().encrypt_bulk == (m == "sealed")
            nursery.cancel_scope.cancel()
        return out


async def test_sealed_and_plain_bulk_both_move_blocks() -> None:
    """Small run: both modes move 2 MiB blocks both ways (the figures need the script)."""
    out = await measure(trials=1, rounds=2, batch=2)
    for name in ("fetch_plain", "fetch_sealed", "push_plain", "push_sealed"):
        assert out[f"{name}_GBps"] > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    print(json.dumps(trio.run(lambda: measure(args.trials, args.rounds, args.batch))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
