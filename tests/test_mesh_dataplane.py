"""Daemons in a mesh: replication to rendezvous owners on put, fetch on a local miss, over real
gossip (UDP/TCP on loopback) and the Trio TCP data plane."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import write_config

from memkv_mesh.client import AsyncClient
from memkv_mesh.config import load_config
from memkv_mesh.daemon import Daemon
from memkv_mesh.tenants import scope_keys

MiB = 1 << 20
KEY = base64.b64encode(os.urandom(32)).decode()


def _cfg(tmp: Path, sock_dir: Path, name: str, role: str, seeds: list[str], key: str = KEY) -> Any:
    d = tmp / name
    d.mkdir()
    path = write_config(
        d / "mesh.toml", d / "data", sock_dir / f"{name}.sock",
        node={"id": name, "role": role},
        store={"dram_bytes": 32 * MiB, "nvme_bytes": 0, "max_block_bytes": 2 * MiB},
        gossip={"enabled": True, "port": 0, "seeds": seeds, "keys": [key]},
        dataplane={"transport": "tcp"},
        mesh={"replicas": 2},
    )  # fmt: skip
    return load_config(path)


async def _until(pred: Any, limit_s: float) -> None:
    """Poll state that other tasks and processes change (there is no event to wait on)."""
    with trio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def _wait_alive(daemons: list[Daemon], n: int) -> None:
    with trio.fail_after(15):
        while True:
            if all(sum(m.state == "alive" for m in d.gossip.members()) >= n for d in daemons):
                return
            await trio.sleep(0.05)


async def test_put_replicates_to_owners_and_a_miss_fetches(tmp_path: Path, short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        a = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "a", "gpu", [])).run)
        seed = [a.gossip.local_addr]
        b = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "b", "flash", seed)).run)
        c = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "c", "flash", seed)).run)
        g = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "g", "gpu", seed)).run)
        nodes = [a, b, c, g]
        await _wait_alive(nodes, 4)
        keys = [os.urandom(32) for _ in range(20)]
        vals = [os.urandom(100_000 + i) for i in range(20)]
        async with await AsyncClient.connect(a.socket_path) as ca:
            assert await ca.put_many(keys, vals) == 20
        ik = scope_keys(keys)  # what the daemons store them under
        # R=2 with two flash peers: both hold every block once replication has run.
        await _until(lambda: all(b.store.contains(ik)) and all(c.store.contains(ik)), 15)
        assert a.mesh.statistics().replicated == 40
        # A gpu node that never saw the blocks gets them from an owner through its own client.
        async with await AsyncClient.connect(g.socket_path) as cg:
            assert not any(g.store.contains(ik))
            bufs = [bytearray(200_000) for _ in keys]
            got = await cg.get_many_into(keys, bufs)
            assert got == [len(v) for v in vals]
            assert all(bytes(buf[: len(v)]) == v for buf, v in zip(bufs, vals, strict=True))
            assert g.mesh.statistics().fetched == 20
            # An owner going away: the other replica serves the next miss.
            await cg.delete(keys, local=True)
            nursery_b_gone = b.store
            await nursery_b_gone.delete(ik)  # b loses its copies (as if its disk was wiped)
            assert await cg.get_many_into(keys[:5], bufs[:5]) == [len(v) for v in vals[:5]]
            # A key nobody holds is a plain miss.
            assert await cg.get_many_into([os.urandom(32)], [bytearray(10)]) == [None]
        nursery.cancel_scope.cancel()


async def test_wrong_key_peer_can_neither_fetch_nor_store(tmp_path: Path, short_dir: Path) -> None:
    other = base64.b64encode(os.urandom(32)).decode()
    async with trio.open_nursery() as nursery:
        b = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "b", "flash", [])).run)
        x = await nursery.start(Daemon(_cfg(tmp_path, short_dir, "x", "both", [b.gossip.local_addr], key=other)).run)
        keys = [os.urandom(32) for _ in range(3)]
        async with await AsyncClient.connect(b.socket_path) as cb:
            await cb.put_many(keys, [b"v" * 5000] * 3)
        keys = scope_keys(keys)  # what b stores them under
        # x cannot join b's gossip and its data plane is refused by b's.
        with pytest.raises(Exception, match="auth|key|refused|closed"):
            await x.dataplane.fetch(b.dataplane.address, keys)
        with pytest.raises(Exception, match="auth|key|refused|closed"):
            await x.dataplane.push(b.dataplane.address, keys)
        assert x.store.contains(keys) == [False] * 3
        nursery.cancel_scope.cancel()


async def _start_cancellable(nursery: trio.Nursery, cfg: Any) -> tuple[Daemon, trio.CancelScope]:
    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            d = Daemon(cfg)
            task_status.started((d, scope))
            await d.run()

    # started() hands back the daemon before it runs; wait until it serves.
    d, scope = await nursery.start(run)
    await _until(lambda: d.started_at, 10)
    return d, scope


async def test_replicas_come_back_after_a_flash_node_goes(tmp_path: Path, short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        a, _ = await _start_cancellable(nursery, _cfg(tmp_path, short_dir, "a", "gpu", []))
        seed = [a.gossip.local_addr]
        flash = {}
        for name in ("b", "c", "d"):
            flash[name] = await _start_cancellable(nursery, _cfg(tmp_path, short_dir, name, "flash", seed))
        await _wait_alive([a] + [d for d, _ in flash.values()], 4)
        keys = [os.urandom(32) for _ in range(60)]
        vals = [os.urandom(20_000) for _ in keys]
        async with await AsyncClient.connect(a.socket_path) as ca:
            await ca.put_many(keys, vals)
        ik = dict(zip(keys, scope_keys(keys), strict=True))  # what the daemons store them under

        def copies(k: bytes) -> int:
            return sum(d.store.contains([ik[k]])[0] for d, _ in flash.values())

        await _until(lambda: all(copies(k) >= 2 for k in keys), 15)
        # b goes away (its scope is cancelled: it says goodbye but hands nothing off).
        b, b_scope = flash.pop("b")
        lost = [k for k in keys if b.store.contains([ik[k]])[0]]
        assert lost
        b_scope.cancel()
        # c and d are now the owners of everything: every block is back to two flash copies.
        await _until(lambda: all(copies(k) >= 2 for k in keys), 20)
        repaired = sum(d.mesh.statistics().repaired for d, _ in flash.values())
        assert repaired >= len(lost)
        # And the bytes are right on both.
        for d, _ in flash.values():
            async with await AsyncClient.connect(d.socket_path) as c:
                bufs = [bytearray(20_000) for _ in keys]
                assert await c.get_many_into(keys, bufs) == [20_000] * len(keys)
                assert [bytes(x) for x in bufs] == vals
        nursery.cancel_scope.cancel()
