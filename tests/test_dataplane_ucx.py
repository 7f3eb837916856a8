"""The data plane over UCX (ucxx core API driven by Trio); skipped where ucxx cannot start."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_dataplane_helpers import KEY_B, config, eventually, key, payload, planes, put, read

from transport import ucx_dataplane
from transport.dataplane import DataPlaneError

_probe = ucx_dataplane.probe()
pytestmark = pytest.mark.skipif(bool(_probe.error), reason=f"UCX unavailable: {_probe.error}")


async def test_ucx_fetch_hands_on_each_block_as_it_is_verified(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="ucx"), config(transport="ucx")) as ((a, _), (b, addr_b)):
        sizes = (5000, (2 << 20) + 3, 70_000)  # the 2 MiB one is hashed in a worker thread
        keys = [key(i, 25) for i in range(len(sizes))]
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            await put(b.store, k, payload(n, i))
        handed: list[bytes] = []

        async def on_stored(ks: list[bytes]) -> None:
            assert all(a.store.contains(ks))
            handed.extend(ks)

        with trio.fail_after(30):
            assert await a.fetch(addr_b, [*keys, key(9, 25)], on_stored) == [True, True, True, False]
        assert handed == keys
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            assert await read(a.store, k) == payload(n, i)


async def test_ucx_fetch_and_push_land_in_the_arena(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="ucx"), config(transport="ucx")) as ((a, _), (b, addr_b)):
        assert a.transport == "ucx" and "configured" in a.reason
        st = a.statistics()
        assert st.ucx_transports and st.ucx_transports == _probe.transports
        sizes = (1, 70_000, (3 << 20) + 5)
        keys = [key(i, 20) for i in range(len(sizes))]
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            await put(b.store, k, payload(n, i))
        with trio.fail_after(30):
            assert await a.fetch(addr_b, [*keys, key(9, 20)]) == [True, True, True, False]
        # The lanes the endpoints really use (ucp_ep_query), a subset of what the context offers.
        for plane in (a, b):
            lanes = plane.statistics().ucx_lanes_in_use
            assert lanes and {lane.split("/")[0] for lane in lanes} <= set(st.ucx_transports) | {"self"}, lanes
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
            assert await read(a.store, k) == payload(n, i)
        pk = key(1, 21)
        await put(a.store, pk, payload(1 << 20, 7))
        with trio.fail_after(30):
            assert await a.push(addr_b, [pk]) == [True]
            assert await a.push(addr_b, [pk]) == [True]
        assert await read(b.store, pk) == payload(1 << 20, 7)
        assert a.statistics().connections_opened == 1
        assert a.store.statistics().pending_slots == 0
        # the server releases its lease once its send returns
        await eventually(lambda: b.store.statistics().active_leases == 0)


async def test_ucx_corrupt_block_is_dropped(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="ucx"), config(transport="ucx")) as ((a, _), (b, addr_b)):
        k = key(1, 22)
        await put(b.store, k, payload(1 << 20, 1))

        def flip(_k: bytes, view: memoryview) -> memoryview:
            c = bytearray(view)
            c[-1] ^= 0x80
            return memoryview(c)

        b._send_hook = flip
        with trio.fail_after(30):
            assert await a.fetch(addr_b, [k]) == [False]
        assert await read(a.store, k) is None
        assert a.store.statistics().pending_slots == 0 and a.statistics().corrupt_blocks == 1


async def test_ucx_wrong_key_is_refused(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="ucx", keys=[KEY_B]), config(transport="ucx")) as (
        (evil, _),
        (b, addr_b),
    ):
        await put(b.store, key(1, 23), payload(1000, 1))
        with trio.fail_after(30), pytest.raises(DataPlaneError):
            await evil.fetch(addr_b, [key(1, 23)])
        assert await read(evil.store, key(1, 23)) is None
        await eventually(lambda: b.statistics().auth_failures == 1)


async def test_ucx_peer_down_is_an_error(tmp_path: Path) -> None:
    async with planes(tmp_path, config(transport="ucx", connect_timeout_s=2.0)) as ((a, _),):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with trio.fail_after(30), pytest.raises(DataPlaneError):
            await a.fetch(f"127.0.0.1:{port}", [key(1, 24)])
        assert a.store.statistics().pending_slots == 0


async def test_ucx_peer_dying_mid_block_commits_nothing(tmp_path: Path) -> None:
    from test_dataplane_helpers import peer_dies_mid_block

    await peer_dies_mid_block(tmp_path, "ucx")
