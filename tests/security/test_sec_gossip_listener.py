"""Bounded resources on the gossip TCP listener (issue 11): bytes before authentication,
connections, partial frames, big frames off the event loop.

A real service on loopback (port 0), in real time, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import base64
import struct
import threading
import time
from collections.abc import Callable

import trio

from gossip.messages import STATE_LEFT, STREAM_HELLO, NodeMeta, PushPullReq, encode
from transport.gossip_config import GossipConfig, parse_hostport
from transport.gossip_crypto import CHANNEL_TCP, Keyring, Sealer
from transport.gossip_driver import PREAUTH_LIMIT, GossipService, frame

RAW_KEY = bytes(range(32))
KEY = base64.b64encode(RAW_KEY).decode()


def cfg(**kw: object) -> GossipConfig:
    base: dict[str, object] = {"enabled": True, "port": 0, "keys": [KEY]}
    base.update(kw)
    return GossipConfig(**base)  # type: ignore[arg-type]


def svc(name: str, config: GossipConfig) -> GossipService:
    return GossipService(config, node_id=name, meta=NodeMeta())


def sealed_frame(msg: object) -> bytes:
    sealer = Sealer(Keyring([RAW_KEY]))
    return frame(sealer.seal(encode(msg), CHANNEL_TCP, int(time.time() * 1000)))  # type: ignore[arg-type]


def big_req(n: int = 8000) -> PushPullReq:
    """A digest of ``n`` left members: > 64 KiB sealed, and nothing the receiver wants."""
    return PushPullReq(False, tuple((f"gone{i:05d}", 1, STATE_LEFT) for i in range(n)))


async def wait_for(pred: Callable[[], bool], limit_s: float = 5.0) -> None:
    with trio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def closed_by_peer(stream: trio.SocketStream, limit_s: float = 3.0) -> bool:
    """True once the service closed the stream (EOF or reset) within ``limit_s``."""
    with trio.move_on_after(limit_s):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_frame_header_past_64_kib_before_authentication_closes_the_stream() -> None:
    """Before: the listener waited for (and buffered) up to 16 MiB of an unauthenticated frame."""
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg(stream_timeout_s=30.0))
        await nursery.start(a.run)
        dest = parse_hostport(a.local_addr, "a")
        stream = await trio.open_tcp_stream(*dest)
        async with stream:
            await stream.send_all(struct.pack(">I", 1 << 20) + b"\x01" * 1000)
            assert await closed_by_peer(stream)
        # an unauthenticated frame under the limit is read, fails to open, and closes too
        stream = await trio.open_tcp_stream(*dest)
        async with stream:
            await stream.send_all(struct.pack(">I", 60_000) + b"\x01" * 60_000)
            assert await closed_by_peer(stream)
        st = a.statistics()
        assert st.stream_errors == 2 and st.dropped_bad_key == 1
        # a big authenticated frame without STREAM_HELLO first is refused the same way
        stream = await trio.open_tcp_stream(*dest)
        async with stream:
            data = sealed_frame(big_req())
            assert len(data) > PREAUTH_LIMIT
            await stream.send_all(data[:PREAUTH_LIMIT])
            assert await closed_by_peer(stream)
        nursery.cancel_scope.cancel()


async def test_a_big_push_pull_authenticates_first_and_is_decrypted_off_the_event_loop() -> None:
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg())
        await nursery.start(a.run)
        b = svc("b", cfg())
        await nursery.start(b.run)
        opened_in: list[str] = []
        real_open = a._sealer.open

        def spy(data: bytes, channel: bytes) -> tuple[bytes, int | None, bytes | None]:
            if len(data) > PREAUTH_LIMIT:
                opened_in.append(threading.current_thread().name)
            return real_open(data, channel)

        a._sealer.open = spy  # type: ignore[method-assign]
        # b's own stream client: it sends STREAM_HELLO before the > 64 KiB request
        await b._stream_client(a.local_addr, big_req())
        sa, sb = a.statistics(), b.statistics()
        assert sb.streams_out == 1 and sb.stream_errors == 0
        assert sa.streams_in == 1 and sa.stream_errors == 0 and sa.dropped_errors == 0
        assert opened_in and threading.main_thread().name not in opened_in
        nursery.cancel_scope.cancel()


async def test_connections_past_the_cap_evict_unauthenticated_ones_then_are_refused() -> None:
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg(max_stream_conns=2, stream_timeout_s=30.0))
        await nursery.start(a.run)
        dest = parse_hostport(a.local_addr, "a")
        c1 = await trio.open_tcp_stream(*dest)
        c2 = await trio.open_tcp_stream(*dest)
        await wait_for(lambda: a.statistics().streams_in == 2)
        c3 = await trio.open_tcp_stream(*dest)  # evicts c1, the oldest unauthenticated one
        assert await closed_by_peer(c1)
        await wait_for(lambda: a.statistics().streams_in == 3)
        assert a.statistics().streams_evicted == 1
        for c in (c2, c3):  # both authenticate (a hello is answered with nothing)
            await c.send_all(sealed_frame(STREAM_HELLO))
        await wait_for(lambda: all(conn.authed for conn in a._conns) and len(a._conns) == 2)
        c4 = await trio.open_tcp_stream(*dest)  # nothing to evict: closed at once
        assert await closed_by_peer(c4)
        await wait_for(lambda: a.statistics().streams_refused == 1)
        assert len(a._conns) == 2
        for c in (c1, c2, c3, c4):
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_a_slowloris_stream_is_closed_after_stream_timeout() -> None:
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg(stream_timeout_s=0.3))
        await nursery.start(a.run)
        stream = await trio.open_tcp_stream(*parse_hostport(a.local_addr, "a"))
        async with stream:
            t0 = trio.current_time()
            await stream.send_all(b"\x00\x00")  # half a frame header, then nothing
            assert await closed_by_peer(stream, limit_s=3.0)
            assert trio.current_time() - t0 >= 0.25
        await wait_for(lambda: a.statistics().stream_errors == 1)
        assert len(a._conns) == 0
        nursery.cancel_scope.cancel()
