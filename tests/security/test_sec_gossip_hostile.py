"""Hostile gossip input: out-of-range fields, handler exceptions, clock skew (issue 11).

Every attack here is sent by a holder of the mesh key (sealed with the right key), the strongest
network attacker the gossip layer admits. The driver tests run a real service on loopback
(port 0) in real time, bounded by ``trio.fail_after``; the core and decoder tests are pure.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable

import msgspec
import pytest
import trio

from gossip.messages import (
    MAX_INCARNATION,
    STATE_ALIVE,
    Alive,
    Dead,
    DirDelta,
    DirSummary,
    Entry,
    Gossip,
    MessageError,
    NodeMeta,
    Ping,
    PushPullReply,
    PushPullReq,
    Suspect,
    WireMeta,
    decode_packet,
    decode_stream,
    encode,
    wire_meta,
)
from gossip.profile import SwimConfig
from gossip.swim import Swim
from transport.gossip_config import GossipConfig, parse_hostport
from transport.gossip_crypto import CHANNEL_TCP, CHANNEL_UDP, Keyring, Sealer
from transport.gossip_driver import GossipService, frame

RAW_KEY = bytes(range(32))
KEY = base64.b64encode(RAW_KEY).decode()
W = WireMeta("both", 1.0, "", 1)
_ENC = msgspec.msgpack.Encoder()  # encodes anything msgpack can (the attacker's encoder)


def cfg(**kw: object) -> GossipConfig:
    base: dict[str, object] = {"enabled": True, "port": 0, "keys": [KEY]}
    base.update(kw)
    return GossipConfig(**base)  # type: ignore[arg-type]


def svc(name: str, config: GossipConfig, **kw: object) -> GossipService:
    return GossipService(config, node_id=name, meta=NodeMeta(), **kw)  # type: ignore[arg-type]


def seal_udp(plain: bytes, skew_ms: int = 0) -> bytes:
    return Sealer(Keyring([RAW_KEY])).seal(plain, CHANNEL_UDP, int(time.time() * 1000) + skew_ms)


async def wait_for(pred: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll the service's counters (a test on real sockets has no event to wait on)."""
    with trio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.01)


# ---- 1. incarnation overflow and range checks ---------------------------------------------------


async def test_suspect_at_max_uint64_is_dropped_and_the_node_keeps_running() -> None:
    """The reported attack: before, the refutation overflowed msgpack and the daemon exited."""
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg())
        await nursery.start(a.run)
        dest = parse_hostport(a.local_addr, "a")
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as s:
            await s.bind(("127.0.0.1", 0))
            await s.sendto(seal_udp(_ENC.encode(Gossip((Suspect("a", 2**64 - 1, "x"),)))), dest)
            await wait_for(lambda: a.statistics().dropped_malformed == 1)
            assert a.statistics().incarnation == 1
            # just under the ceiling: refuted, and what we say still decodes everywhere
            await s.sendto(seal_udp(encode(Gossip((Suspect("a", MAX_INCARNATION - 1, "x"),)))), dest)
            await wait_for(lambda: a.statistics().incarnation == MAX_INCARNATION)
            # at the ceiling: nothing can be newer; counted, not refuted, nothing raised
            await s.sendto(seal_udp(encode(Gossip((Suspect("a", MAX_INCARNATION, "x"),)))), dest)
            await wait_for(lambda: a.statistics().refutations_impossible == 1)
        st = a.statistics()
        assert st.incarnation == MAX_INCARNATION and st.dropped_errors == 0
        assert {m.node_id: m.state for m in a.members()} == {"a": "alive"}
        nursery.cancel_scope.cancel()


def test_core_never_produces_an_incarnation_past_the_ceiling() -> None:
    core = Swim("a", "127.0.0.1:1", NodeMeta(), SwimConfig(), random.Random(1), 0.0)
    core.handle_message(Gossip((Dead("a", MAX_INCARNATION - 1, "b"),)), "127.0.0.1:2", 1.0)
    assert core.incarnation == MAX_INCARNATION
    core.handle_message(Gossip((Suspect("a", MAX_INCARNATION, "b"),)), "127.0.0.1:2", 2.0)
    core.update_meta(NodeMeta(role="gpu"), 3.0)
    assert core.incarnation == MAX_INCARNATION and core.counters().refutations_impossible == 1
    for _, pkt in core.take_outbox():
        assert decode_packet(encode(pkt)) == pkt  # all it says still decodes
    with pytest.raises(ValueError, match="incarnation must be in"):
        Swim("b", "127.0.0.1:1", NodeMeta(), SwimConfig(), random.Random(1), 0.0,
             incarnation=MAX_INCARNATION + 1)  # fmt: skip


BAD_PACKETS = {
    "incarnation 2**64-1": Gossip((Suspect("a", 2**64 - 1, "b"),)),
    "incarnation past 2**62": Gossip((Alive("a", MAX_INCARNATION + 1, "h:1", W),)),
    "negative incarnation": Gossip((Dead("a", -1, "b"),)),
    "empty node id": Gossip((Suspect("", 1, "b"),)),
    "node id of 256 characters": Ping(1, "x" * 256),
    "address with port 0": Gossip((Alive("a", 1, "h:0", W),)),
    "address with port 65536": Gossip((Alive("a", 1, "h:65536", W),)),
    "address without a port": Gossip((Alive("a", 1, "h", W),)),
    "address of 400 characters": Gossip((Alive("a", 1, "h" * 400 + ":1", W),)),
    # Found by `memkv-mesh bench fuzz`: the send loop's sendto raised ValueError and the daemon exited.
    "address with a NUL byte": Gossip((Alive("a", 1, "h\x00x:1", W),)),
    "address with a non-ASCII host": Gossip((Alive("a", 1, "h\u00e9:1", W),)),
    "data address with a NUL byte": Gossip((Alive("a", 1, "h:1", WireMeta("both", 1.0, "d\x00:1", 1)),)),
    "NaN capacity weight": Gossip((Alive("a", 1, "h:1", WireMeta("both", float("nan"), "", 1)),)),
    "infinite capacity weight": Gossip((Alive("a", 1, "h:1", WireMeta("both", 1e309, "", 1)),)),
    "negative protocol version": Gossip((Alive("a", 1, "h:1", WireMeta("both", 1.0, "", -5)),)),
    "600 updates": Gossip(tuple(Suspect("a", 1, "b") for _ in range(600))),
    "negative seq": Ping(-1, "a"),
    "seq past 32 bits": Ping(2**40, "a"),
    "negative fingerprint": DirDelta("a", 1, 0, 0, 1, (-1,)),
    "directory version 2**63": DirDelta("a", 1, 0, 0, 2**63),
    "negative directory epoch": DirDelta("a", -1, 0, 0, 1),
    "9000 fingerprints": DirDelta("a", 1, 0, 0, 1, tuple(range(9000))),
}

BAD_FRAMES = {
    "digest incarnation 2**64-1": PushPullReq(False, (("a", 2**64 - 1, 0),)),
    "digest state 7": PushPullReq(False, (("a", 1, 7),)),
    "entry state -1": PushPullReply((Entry("a", 1, -1, "h:1", W),), ()),
    "entry address with a space": PushPullReply((Entry("a", 1, 0, "h x:1", W),), ()),
    "entry address with a NUL byte": PushPullReply((Entry("a", 1, 0, "h\x00:1", W),), ()),
    "want of an empty id": PushPullReply((), ("",)),
    "summary count -1": DirSummary("a", 1, 0, 1, 48, b"", -1),
    "summary format 2**40": DirSummary("a", 1, 0, 1, 2**40, b""),
}


@pytest.mark.parametrize("name", sorted(BAD_PACKETS))
def test_out_of_range_packets_do_not_decode(name: str) -> None:
    with pytest.raises(MessageError, match="bad gossip packet"):
        decode_packet(_ENC.encode(BAD_PACKETS[name]))


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_out_of_range_stream_frames_do_not_decode(name: str) -> None:
    with pytest.raises(MessageError, match="bad push-pull frame"):
        decode_stream(_ENC.encode(BAD_FRAMES[name]))


def test_in_range_messages_still_round_trip() -> None:
    meta = wire_meta(NodeMeta(role="flash", capacity_weight=3.5, data_addr="10.0.0.1:9000"))
    for pkt in (
        Gossip((Alive("n1", MAX_INCARNATION, "[::1]:7946", meta), Dead("n2", 0, "n2"))),
        Ping(0xFFFFFFFF, "n1"),
        DirDelta("n1", 1_700_000_000_000, 0, 0, 1, (0, 2**64 - 1), (5,)),
    ):
        assert decode_packet(encode(pkt)) == pkt
    req = PushPullReq(True, (("n1", MAX_INCARNATION, STATE_ALIVE),),
                      (Entry("n1", 3, 3, "host.example:7946", meta),))  # fmt: skip
    assert decode_stream(encode(req)) == req


# ---- 2. containment -----------------------------------------------------------------------------


async def test_an_exception_in_any_handler_drops_the_message_not_the_daemon() -> None:
    async with trio.open_nursery() as nursery:
        seen: list[str] = []

        def bad_callback(ev: object) -> None:
            seen.append("called")
            raise RuntimeError("daemon bug")

        a = svc("a", cfg(), on_event=bad_callback)
        await nursery.start(a.run)
        core = a._core
        assert core is not None
        dest = parse_hostport(a.local_addr, "a")
        def boom(*args: object) -> None:
            raise KeyError("core bug")

        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as s:
            await s.bind(("127.0.0.1", 0))
            me = f"127.0.0.1:{s.getsockname()[1]}"
            # the core raises on a datagram (before: the error ended the service)
            core.handle_message = boom  # type: ignore[method-assign, assignment]
            await s.sendto(seal_udp(encode(Ping(1, "a"))), dest)
            await wait_for(lambda: a.statistics().dropped_errors == 1)
            del core.handle_message
            # the event callback raises: counted, membership goes on
            await s.sendto(seal_udp(encode(Gossip((Alive("b", 1, me, W),)))), dest)
            await wait_for(lambda: a.statistics().dropped_errors == 2)
            assert seen == ["called"] and a.statistics().members_alive == 2
        # the core raises on a stream frame: the stream is closed, the service goes on
        core.handle_stream = boom  # type: ignore[method-assign, assignment]
        stream = await trio.open_tcp_stream(*dest)
        async with stream:
            sealed = Sealer(Keyring([RAW_KEY])).seal(
                encode(PushPullReq(False, ())), CHANNEL_TCP, int(time.time() * 1000)
            )
            await stream.send_all(frame(sealed))
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""
        await wait_for(lambda: a.statistics().dropped_errors == 3)
        st = a.statistics()
        assert st.stream_errors == 1 and st.dropped_malformed == 0
        nursery.cancel_scope.cancel()


# ---- 4. clock skew ------------------------------------------------------------------------------


async def test_a_packet_outside_the_replay_window_shows_the_peer_and_its_skew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gossip")
    async with trio.open_nursery() as nursery:
        a = svc("a", cfg(replay_window_s=30.0))
        await nursery.start(a.run)
        dest = parse_hostport(a.local_addr, "a")
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as s:
            await s.bind(("127.0.0.1", 0))
            peer = f"127.0.0.1:{s.getsockname()[1]}"
            for _ in range(3):  # three stale packets: one log line (rate-limited), one entry
                await s.sendto(seal_udp(encode(Gossip(())), skew_ms=45_000), dest)
            await wait_for(lambda: a.statistics().dropped_replay == 3)
        skew = a.statistics().clock_skew
        assert len(skew) == 1 and skew[0].peer == peer and skew[0].node == ""
        assert 44_000 <= skew[0].skew_ms <= 46_000 and skew[0].at_ms > 0
        lines = [r.getMessage() for r in caplog.records if "from our clock" in r.getMessage()]
        assert len(lines) == 1 and peer in lines[0] and "+4" in lines[0]
        # what `memkv-mesh status` prints (msgspec.to_builtins of the statistics)
        assert msgspec.to_builtins(a.statistics())["clock_skew"][0]["peer"] == peer
        nursery.cancel_scope.cancel()


# ---- mDNS: unauthenticated announcements --------------------------------------------------------


def test_an_mdns_flood_costs_a_bounded_number_of_threads() -> None:
    """Before: one resolver thread per announcement, however many arrive."""
    from zeroconf import ServiceStateChange

    from transport.discovery import MAX_RESOLVING, _Mdns

    release = threading.Event()
    calls: list[str] = []

    class SlowZeroconf:
        def get_service_info(self, service_type: str, name: str, timeout: int) -> None:
            calls.append(name)
            release.wait(10)

    mdns = _Mdns(svc("a", cfg()), None)  # type: ignore[arg-type]
    mdns.zc = SlowZeroconf()
    for i in range(200):
        mdns._on_change(None, "_memkv._udp.local.", f"x{i}._memkv._udp.local.",
                        ServiceStateChange.Added)  # fmt: skip
    resolving = [t for t in threading.enumerate() if t.name == "mdns-resolve"]
    assert len(resolving) <= MAX_RESOLVING and mdns.ignored == 200 - MAX_RESOLVING
    release.set()
    for t in resolving:
        t.join(5)
    # the slots are free again
    release.clear()
    mdns._on_change(None, "_memkv._udp.local.", "y._memkv._udp.local.", ServiceStateChange.Added)
    release.set()
    assert mdns.ignored == 200 - MAX_RESOLVING


async def test_discovered_seeds_are_bounded() -> None:
    from transport.gossip_driver import EXTRA_SEEDS_MAX

    async with trio.open_nursery() as nursery:
        a = svc("a", cfg(join_retry_s=60.0))
        await nursery.start(a.run)
        a.add_seeds([f"127.0.0.1:{p}" for p in range(10_000, 20_000)])
        assert len(a._extra_seeds) == EXTRA_SEEDS_MAX
        nursery.cancel_scope.cancel()
