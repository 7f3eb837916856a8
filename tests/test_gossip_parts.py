"""Unit tests of the small gossip/ pieces: suspicion, awareness, broadcast queue, messages."""

from __future__ import annotations

import math
import pathlib

import pytest

from gossip.awareness import Awareness
from gossip.broadcast_queue import BroadcastQueue
from gossip.members import Member
from gossip.messages import (
    STATE_ALIVE,
    STATE_DEAD,
    STATE_SUSPECT,
    Ack,
    Alive,
    Dead,
    Gossip,
    MessageError,
    NodeMeta,
    Ping,
    PingReq,
    PushPullReq,
    Suspect,
    decode_packet,
    decode_stream,
    encode,
    wire_meta,
)
from gossip.profile import SwimConfig, memberlist_profile, profile
from gossip.pushpull import diff, digest, pushpull_scale
from gossip.suspicion import Suspicion, suspicion_timeouts

META = NodeMeta(role="flash", capacity_weight=2.0, data_addr="10.0.0.1:7000")
W = wire_meta(META)


def test_suspicion_timeouts_match_memberlist_formula() -> None:
    lo, hi = suspicion_timeouts(4, 6, 100, 1.0)
    assert lo == pytest.approx(8.0)
    assert hi == pytest.approx(48.0)
    lo, hi = suspicion_timeouts(4, 6, 5, 1.0)  # log10(5) < 1 -> scale 1
    assert lo == pytest.approx(4.0)


def test_suspicion_shrinks_with_independent_confirmations() -> None:
    s = Suspicion(10.0, k=2, min_timeout=4.0, max_timeout=24.0, first_from="a")
    assert s.deadline == pytest.approx(34.0)
    assert not s.confirm("a")  # the original suspecter does not count
    assert s.confirm("b")
    one = s.deadline
    assert 14.0 < one < 34.0
    assert one == pytest.approx(10 + 24 - 20 * math.log(2) / math.log(3))
    assert not s.confirm("b")  # duplicates do not count
    assert s.confirm("c")
    assert s.deadline == pytest.approx(14.0)
    assert not s.confirm("d")  # k reached: nothing more to gain, no re-broadcast


def test_a_live_members_verdict_concludes_a_suspicion_at_its_own_minimum() -> None:
    s = Suspicion(10.0, k=2, min_timeout=4.0, max_timeout=24.0, first_from="a")
    assert s.conclude("v")
    assert s.deadline == pytest.approx(14.0)  # from our own start, not from the verdict
    assert not s.conclude("v") and not s.conclude("w") and not s.confirm("x")  # nothing to gain
    k0 = Suspicion(10.0, k=0, min_timeout=4.0, max_timeout=24.0, first_from="a")
    assert not k0.conclude("v") and k0.deadline == pytest.approx(14.0)


def test_suspicion_with_k_zero_uses_min_and_rejects_bad_timeouts() -> None:
    s = Suspicion(0.0, k=0, min_timeout=3.0, max_timeout=18.0, first_from="a")
    assert s.deadline == 3.0
    with pytest.raises(ValueError, match="suspicion timeouts"):
        Suspicion(0.0, k=1, min_timeout=5.0, max_timeout=1.0, first_from="a")


def test_awareness_bounds_and_scale() -> None:
    a = Awareness(8)
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(3)
    assert a.scale(0.5) == pytest.approx(2.0)
    a.apply_delta(100)
    assert a.score == 7
    assert a.scale(1.0) == 8.0
    with pytest.raises(ValueError, match="max_score"):
        Awareness(0)


def test_broadcast_queue_invalidates_limits_and_prefers_destination() -> None:
    q = BroadcastQueue(retransmit_mult=2)
    assert q.limit(9) == 2 and q.limit(10) == 4  # mult x ceil(log10(N + 1))
    q.queue(Suspect("x", 1, "a"))
    q.queue(Alive("x", 2, "h:1", W))  # newer news about x replaces the suspect
    assert len(q) == 1 and isinstance(q.pending("x"), Alive)
    q.queue(Suspect("y", 1, "a"))
    q.queue(Dead("z", 1, "a"))
    first = q.take(1000, 5, dest="y")
    assert first[0] == Suspect("y", 1, "a")  # about the destination: first
    assert len(first) == 3
    assert q.transmits("x") == 1
    q.take(1000, 5)
    assert len(q) == 0  # limit 2 at N=5 reached for every item
    assert q.take(1000, 5) == ()


def test_broadcast_queue_respects_budget_and_fewest_transmits_first() -> None:
    q = BroadcastQueue(retransmit_mult=10)
    q.queue(Alive("a", 1, "h:1", W))
    q.take(1000, 3)
    q.queue(Alive("b", 1, "h:2", W))
    size = len(encode(Alive("b", 1, "h:2", W)))
    got = q.take(size, 3)
    assert [u.node for u in got] == ["b"]  # b has 0 transmits, a has 1
    assert q.take(3, 3) == ()  # nothing fits


def test_packets_round_trip_and_are_small() -> None:
    pkts: list[Ping | Ack | PingReq | Gossip] = [
        Ping(7, "n12"),
        Ack(7, (Suspect("n3", 4, "n9"),)),
        PingReq(65535, "n1", True, (Alive("n2", 1, "10.0.0.2:7946", W),)),
        Gossip((Dead("n4", 2, "n4"),)),
    ]
    for p in pkts:
        assert decode_packet(encode(p)) == p
    assert len(encode(Ping(40000, "n12"))) <= 10
    assert len(encode(Ack(40000))) <= 6
    req = PushPullReq(False, (("n1", 3, STATE_ALIVE),))
    assert decode_stream(encode(req)) == req


def test_bad_packets_raise_message_error() -> None:
    with pytest.raises(MessageError, match="bad gossip packet"):
        decode_packet(b"\x93\x63\x01\x02")  # unknown tag 99
    with pytest.raises(MessageError, match="bad gossip packet"):
        decode_packet(b"not msgpack")
    with pytest.raises(MessageError, match="bad push-pull frame"):
        decode_stream(encode(Ping(1, "x")) + b"junk")


def test_pushpull_diff_sends_newer_and_wants_older() -> None:
    mine = {
        "a": Member("a", "h:1", W, 3, STATE_ALIVE, 0.0),
        "b": Member("b", "h:2", W, 1, STATE_ALIVE, 0.0),
        "c": Member("c", "h:3", W, 2, STATE_DEAD, 0.0),
        "d": Member("d", "h:4", W, 1, STATE_ALIVE, 0.0),
    }
    remote = (
        ("a", 2, STATE_ALIVE),  # stale there -> send a
        ("b", 1, STATE_SUSPECT),  # more severe there at equal inc -> want b
        ("c", 2, STATE_DEAD),  # same -> nothing
        ("e", 1, STATE_ALIVE),  # unknown here -> want e
        ("f", 1, STATE_DEAD),  # unknown dead -> not worth asking
    )
    send, want = diff(mine, remote)
    assert sorted(e.node for e in send) == ["a", "d"]
    assert sorted(want) == ["b", "e"]
    assert digest(mine.values())[0] == ("a", 3, STATE_ALIVE)


def test_pushpull_interval_scales_like_memberlist() -> None:
    assert pushpull_scale(30.0, 32) == 30.0
    assert pushpull_scale(30.0, 64) == 60.0
    assert pushpull_scale(30.0, 256) == 120.0


def test_profiles_and_config_validation() -> None:
    ml = memberlist_profile()
    assert (ml.probe_interval, ml.probe_timeout, ml.indirect_checks) == (1.0, 0.5, 3)
    assert (ml.gossip_interval, ml.gossip_nodes, ml.retransmit_mult) == (0.2, 3, 4)
    assert profile("default").probe_interval < ml.probe_interval
    with pytest.raises(ValueError, match="unknown gossip profile 'fast'"):
        profile("fast")
    with pytest.raises(ValueError, match="probe_timeout"):
        SwimConfig(probe_interval=1.0, probe_timeout=2.0)


def test_gossip_package_does_no_io() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent / "gossip"
    banned = ("import trio", "import socket", "import time", "import asyncio", "from trio",
              "from time", "from socket", "import threading")
    for path in root.glob("*.py"):
        text = path.read_text()
        for b in banned:
            assert b not in text, f"{path.name} must not {b!r}"


def test_node_meta_carries_the_placement_version_and_old_metas_decode_as_1() -> None:
    import msgspec

    from gossip.messages import NodeMeta, WireMeta, node_meta, wire_meta

    m = NodeMeta(role="flash", data_addr="h:1", placement=2)
    back = node_meta(msgspec.msgpack.decode(msgspec.msgpack.encode(wire_meta(m)), type=WireMeta))
    assert back == m
    old = msgspec.msgpack.encode(["flash", 1.0, "h:1", 1])  # a 4-field meta from an older build
    assert node_meta(msgspec.msgpack.decode(old, type=WireMeta)).placement == 1
