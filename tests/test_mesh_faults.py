"""Faults with real processes on loopback: a 5-node mesh (1 GPU node, 4 flash nodes), R=2.

Write 1,000 blocks through the GPU node; kill -9 a flash node: every acknowledged block is still
readable with the right bytes and every block is back to R flash replicas; restart it: it rejoins;
corrupt a replica on disk: it is detected, served from the other replica, and repaired.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import members_in_state, wait_until

pytestmark = pytest.mark.slow

KEY = base64.b64encode(os.urandom(32)).decode()
KiB = 1024
N_BLOCKS = 1000
SIZE = 16 * KiB


def _sections(name: str, role: str, seeds: list[str], transport: str) -> dict[str, Any]:
    return {
        "node": {"id": name, "role": role},
        "store": {"dram_bytes": 4 << 20, "nvme_bytes": 64 << 20, "max_block_bytes": 1 << 20},
        "gossip": {"enabled": True, "port": 0, "seeds": seeds, "keys": [KEY]},
        "dataplane": {"transport": transport},
        "mesh": {"replicas": 2, "repair_interval_s": 2.0},
    }


def _alive(dp: Any) -> set[str]:
    return members_in_state(dp, "alive")


def _corrupt_on_disk(data_dir: Path, payload: bytes) -> bool:
    for f in sorted((data_dir / "nvme").glob("blocks-*.dat")):
        data = f.read_bytes()
        i = data.find(payload[:64])
        if i >= 0:
            with open(f, "r+b") as fh:
                fh.seek(i + 1000)
                b = fh.read(1)
                fh.seek(i + 1000)
                fh.write(bytes([b[0] ^ 0x55]))
            return True
    return False


def _has_ucxx() -> bool:
    try:
        import ucxx  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.parametrize(
    "transport",
    ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(not _has_ucxx(), reason="ucxx is not installed"))],
)
def test_kill9_restart_corrupt(daemon_process: Any, transport: str) -> None:
    gpu = daemon_process("g", **_sections("g", "gpu", [], transport))
    with gpu.client() as c:
        seed = [c.stats()["gossip_addr"]]
    flash = {n: daemon_process(n, **_sections(n, "flash", seed, transport)) for n in ("f1", "f2", "f3", "f4")}
    everyone = {"g", *flash}
    wait_until(lambda: all(_alive(d) == everyone for d in [gpu, *flash.values()]), 30, "five alive members")

    rng = os.urandom
    keys = [rng(32) for _ in range(N_BLOCKS)]
    vals = [rng(SIZE) for _ in range(N_BLOCKS)]
    with gpu.client() as c:
        for i in range(0, N_BLOCKS, 50):
            assert c.put_many(keys[i : i + 50], vals[i : i + 50]) == 50

    def replicas(nodes: dict[str, Any]) -> list[int]:
        counts = [0] * N_BLOCKS
        for d in nodes.values():
            with d.client() as c:
                for i, have in enumerate(c.contains(keys)):
                    counts[i] += have
        return counts

    wait_until(lambda: min(replicas(flash)) >= 2, 60, "two flash replicas of every block")

    # kill -9 one flash node.
    victim = flash.pop("f1")
    t_kill = time.monotonic()
    victim.kill()
    wait_until(lambda: all("f1" not in _alive(d) for d in [gpu, *flash.values()]), 60, "f1 no longer alive")
    # Every acknowledged block is readable with the right bytes from a node that never held it
    # in DRAM... the GPU node drops its DRAM copies first so every read goes through the mesh.
    with gpu.client() as c:
        c.delete(keys, local=True)
        for i in range(0, N_BLOCKS, 100):
            bufs = [bytearray(SIZE) for _ in range(100)]
            got = c.get_many_into(keys[i : i + 100], bufs)
            assert got == [SIZE] * 100, f"blocks {i}..{i + 99}: {got.count(None)} missing"
            assert [bytes(b) for b in bufs] == vals[i : i + 100]
    # R replicas come back on the three surviving flash nodes.
    wait_until(lambda: min(replicas(flash)) >= 2, 90, "R replicas restored after kill -9")
    restored_s = time.monotonic() - t_kill
    wait_until(lambda: all("f1" in members_in_state(d, "dead") for d in [gpu, *flash.values()]), 60, "f1 marked dead")
    dead_s = time.monotonic() - t_kill
    print(f"\nkill -9 of 1 flash node in 5, {N_BLOCKS} blocks of {SIZE} B: R replicas back after "
          f"{restored_s:.2f} s, marked dead everywhere after {dead_s:.2f} s")
    # Restart it: it rejoins (with a higher incarnation).
    victim.start()
    flash["f1"] = victim
    wait_until(lambda: all(_alive(d) == everyone for d in [gpu, *flash.values()]), 60, "f1 rejoined")

    # Corrupt one replica on disk: detected, served from the other, repaired.
    target = 0
    holders = []
    for n, d in flash.items():
        with d.client() as c:
            if c.contains([keys[target]])[0]:
                holders.append(n)
    assert len(holders) >= 2
    bad = flash[holders[0]]
    bad.stop()
    assert _corrupt_on_disk(Path(bad.config_path).parent / "data", vals[target])
    bad.start()
    with bad.client() as c:
        buf = bytearray(SIZE)
        assert c.get_into(keys[target], buf) == SIZE  # the corrupt copy is a miss; the mesh serves it
        assert bytes(buf) == vals[target]
        st = c.stats()
        assert st["store"]["corrupt_dropped"] == 1
        assert c.contains([keys[target]]) == [True]  # repaired: a good copy is held again
