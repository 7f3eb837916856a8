"""Property tests (Hypothesis) of every gossip decoder and of the driver's datagram and stream
handlers, with plaintexts SEALED WITH THE RIGHT KEY (issue 11).

The generated plaintexts are msgpack shaped like gossip messages (the right tags, arrays of the
right lengths) whose fields are hostile: extreme integers (2**64-1, -2**63, 2**62+1), wrong types,
NaN, huge lists, unknown tags, our own node id with absurd incarnations; then possibly truncated,
bit-flipped or extended. Properties:

- a decoder either raises ``MessageError`` or returns a message that re-encodes and decodes to
  itself (what the core accepts, it can say again);
- the core handles every decoded message without raising, stays alive itself with an
  incarnation in range, and everything it says decodes;
- the driver never lets an exception out: each datagram is counted, one that does not decode is
  counted as ``dropped_malformed``; each stream ends (its connection slot freed); the core stays
  consistent.

Sized so the file runs in well under 60 s on a busy 2-core machine.
"""

from __future__ import annotations

import base64
import random
import time
from typing import Any

import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.directory import Directory, DirectoryConfig
from gossip.messages import (
    MAX_INCARNATION,
    STREAM_HELLO,
    Ack,
    Alive,
    Dead,
    DirDelta,
    DirSummary,
    DirSummaryReq,
    Entry,
    Gossip,
    MessageError,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPullFinal,
    PushPullReply,
    PushPullReq,
    Suspect,
    WireMeta,
    decode_packet,
    decode_stream,
    encode,
)
from gossip.profile import SwimConfig
from gossip.swim import Swim
from transport.gossip_config import GossipConfig
from transport.gossip_crypto import CHANNEL_TCP, CHANNEL_UDP, Keyring, Sealer
from transport.gossip_driver import GossipService, frame

RAW_KEY = bytes(range(32))
KEY = base64.b64encode(RAW_KEY).decode()
ME = "a"
_ENC = msgspec.msgpack.Encoder()

# ---- hostile msgpack ----------------------------------------------------------------------------

EXTREME = st.sampled_from(
    [0, 1, -1, 48, 65535, 65536, 2**32 - 1, 2**32, MAX_INCARNATION - 1, MAX_INCARNATION,
     MAX_INCARNATION + 1, 2**63 - 1, -(2**63), 2**64 - 1]
)  # fmt: skip
INTS = EXTREME | st.integers(-(2**63), 2**64 - 1)
NODES = st.sampled_from([ME, "b", "c", "", "x" * 300])
ADDRS = st.sampled_from(["127.0.0.1:9", "[::1]:9", "h:0", "h:70000", "", "nohost", "a b:1"])
LEAF = (
    st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=12) | st.binary(max_size=24)
    | NODES | ADDRS
)  # fmt: skip
VALUE = st.recursive(
    LEAF, lambda ch: st.lists(ch, max_size=5) | st.dictionaries(st.text(max_size=4), ch, max_size=3),
    max_leaves=12,
)  # fmt: skip
FIELD = VALUE | INTS | NODES | ADDRS
META = st.one_of(
    st.tuples(st.sampled_from(["both", "gpu", "??"]), st.floats() | INTS, ADDRS, INTS, INTS),
    FIELD,
)
UPDATE = st.one_of(
    st.tuples(st.just(16), NODES, INTS, ADDRS, META),  # Alive
    st.tuples(st.sampled_from([17, 18]), NODES, INTS, NODES),  # Suspect, Dead
    st.lists(FIELD, max_size=5),
).map(list)
UPDATES = st.lists(UPDATE, max_size=6) | FIELD | st.just([[17, ME, 2**64 - 1, "b"]] * 600)
FPS = st.lists(INTS, max_size=8) | st.just(list(range(9000))) | FIELD
ENTRY = st.tuples(NODES, INTS, INTS, ADDRS, META).map(list) | FIELD
PACKET = st.one_of(
    st.tuples(st.just(0), INTS, NODES, UPDATES),  # Ping
    st.tuples(st.sampled_from([1, 3]), INTS, UPDATES),  # Ack, Nack
    st.tuples(st.just(2), INTS, NODES, st.booleans() | FIELD, UPDATES),  # PingReq
    st.tuples(st.just(4), UPDATES),  # Gossip
    st.tuples(st.just(5), NODES, INTS, INTS, INTS, INTS, FPS, FPS),  # DirDelta
    st.lists(FIELD, max_size=8),  # anything, unknown tags included
).map(list)
STREAM = st.one_of(
    st.tuples(st.just(32), st.booleans() | FIELD,
              st.lists(st.tuples(NODES, INTS, INTS).map(list), max_size=5) | FIELD,
              st.lists(ENTRY, max_size=3)),  # fmt: skip
    st.tuples(st.just(33), st.lists(ENTRY, max_size=3), st.lists(NODES, max_size=3) | FIELD),
    st.tuples(st.just(34), st.lists(ENTRY, max_size=3) | FIELD),
    st.tuples(st.just(35), NODES),
    st.tuples(st.just(36), NODES, INTS, INTS, INTS, INTS, st.binary(max_size=48) | FIELD, INTS),
    st.tuples(st.just(0), INTS, NODES),  # a TCP fallback ping (or a hello)
    st.lists(FIELD, max_size=8),
).map(list)


@st.composite
def mutated(draw: st.DrawFn, shape: st.SearchStrategy[Any]) -> bytes:
    """msgpack of a message-shaped value, then maybe truncated, bit-flipped or extended."""
    data = _ENC.encode(draw(shape))
    how = draw(st.sampled_from(["as is", "as is", "truncate", "flip", "append"]))
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    return data


# ---- in-range messages at the edges (what decodes and reaches the core) -------------------------

OK_INC = st.sampled_from([0, 1, 2, MAX_INCARNATION - 1, MAX_INCARNATION]) | st.integers(
    0, MAX_INCARNATION
)
OK_NODE = st.sampled_from([ME, "b", "c", "d"])
OK_ADDR = st.sampled_from(["127.0.0.1:9", "127.0.0.1:2", "[::1]:9"])
OK_META = st.builds(
    WireMeta, st.sampled_from(["both", "gpu", "flash", "?"]), st.floats(0, 1e300),
    st.text(max_size=5), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
)  # fmt: skip
OK_UPDATES = st.lists(
    st.builds(Alive, OK_NODE, OK_INC, OK_ADDR, OK_META)
    | st.builds(Suspect, OK_NODE, OK_INC, OK_NODE)
    | st.builds(Dead, OK_NODE, OK_INC, OK_NODE),
    max_size=5,
).map(tuple)
OK_SEQ = st.integers(0, 2**32 - 1)
OK_VER = st.integers(0, 5) | OK_INC
OK_FPS = st.lists(st.integers(0, 2**64 - 1), max_size=6).map(tuple)
OK_STATE = st.integers(0, 3)
OK_ENTRIES = st.lists(st.builds(Entry, OK_NODE, OK_INC, OK_STATE, OK_ADDR, OK_META),
                      max_size=4).map(tuple)  # fmt: skip
OK_PACKET = st.one_of(
    st.builds(Ping, OK_SEQ, OK_NODE, OK_UPDATES),
    st.builds(Ack, OK_SEQ, OK_UPDATES),
    st.builds(PingReq, OK_SEQ, OK_NODE, st.booleans(), OK_UPDATES),
    st.builds(Nack, OK_SEQ, OK_UPDATES),
    st.builds(Gossip, OK_UPDATES),
    st.builds(DirDelta, OK_NODE, OK_VER, OK_VER, OK_VER, OK_VER, OK_FPS, OK_FPS),
)
OK_STREAM = st.one_of(
    st.builds(PushPullReq, st.booleans(),
              st.lists(st.tuples(OK_NODE, OK_INC, OK_STATE), max_size=4).map(tuple), OK_ENTRIES),
    st.builds(PushPullReply, OK_ENTRIES, st.lists(OK_NODE, max_size=3).map(tuple)),
    st.builds(PushPullFinal, OK_ENTRIES),
    st.builds(DirSummaryReq, OK_NODE),
    st.builds(DirSummary, OK_NODE, OK_VER, OK_VER, OK_VER, st.sampled_from([48, 1, 0]),
              st.binary(max_size=60), st.integers(0, 12)),
    st.builds(Ping, OK_SEQ, OK_NODE),
    st.builds(Ack, OK_SEQ),
)  # fmt: skip
PACKET_BYTES = mutated(PACKET) | OK_PACKET.map(encode)
STREAM_BYTES = mutated(STREAM) | OK_STREAM.map(encode)


# ---- properties ---------------------------------------------------------------------------------

W = WireMeta("both", 1.0, "", 1)


def new_core() -> Swim:
    rng = random.Random(7)
    d = Directory(ME, DirectoryConfig(), rng, epoch=1)
    core = Swim(ME, "127.0.0.1:1", NodeMeta(), SwimConfig(), rng, 0.0, directory=d)
    core.handle_message(Gossip((Alive("b", 1, "127.0.0.1:2", W), Alive("c", 1, "127.0.0.1:3", W))),
                        "127.0.0.1:2", 0.0)  # fmt: skip
    return core


def check_core(core: Swim) -> None:
    assert core.state_of(ME) == "alive"
    assert 0 <= core.incarnation <= MAX_INCARNATION
    for m in core.members():
        assert m.state in ("alive", "suspect", "dead", "left")
        assert 0 <= m.incarnation <= MAX_INCARNATION
    for _, pkt in core.take_outbox():  # everything it says decodes again
        assert decode_packet(encode(pkt)) == pkt
    for _, msg in core.take_streams():
        assert decode_stream(encode(msg)) == msg
    core.take_events()
    msgspec.to_builtins(core.counters())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PACKET_BYTES, min_size=1, max_size=8), st.lists(STREAM_BYTES, max_size=4))
def test_decoders_and_the_core_take_any_plaintext(packets: list[bytes], frames: list[bytes]) -> None:
    core = new_core()
    now = 1.0
    for data in packets:
        try:
            pkt = decode_packet(data)
        except MessageError:
            continue
        assert decode_packet(encode(pkt)) == pkt
        core.handle_message(pkt, "127.0.0.1:2", now)
        core.handle_timer(now)
        now += 0.3
    for data in frames:
        try:
            msg = decode_stream(data)
        except MessageError:
            continue
        assert decode_stream(encode(msg)) == msg
        reply = core.handle_stream(msg, "127.0.0.1:2", now)
        if reply is not None:
            assert decode_stream(encode(reply)) == reply
    core.handle_timer(now + 60.0)  # suspicions expire, tombstones are reaped
    check_core(core)


def svc() -> GossipService:
    config = GossipConfig(enabled=True, port=0, keys=[KEY], stream_timeout_s=5.0)
    return GossipService(config, node_id=ME, meta=NodeMeta())


def seal(plain: bytes, channel: bytes) -> bytes:
    return Sealer(Keyring([RAW_KEY])).seal(plain, channel, int(time.time() * 1000))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PACKET_BYTES, min_size=1, max_size=8))
def test_the_driver_survives_any_sealed_datagram(packets: list[bytes]) -> None:
    async def main() -> None:
        a = svc()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            core = a._core
            assert core is not None
            a._on_datagram(seal(encode(Gossip((Alive("b", 1, "127.0.0.1:9", W),))), CHANNEL_UDP),
                           "127.0.0.1:9")  # fmt: skip
            undecodable = 0
            for data in packets:
                before = a.statistics().dropped_malformed
                a._on_datagram(seal(data, CHANNEL_UDP), "127.0.0.1:9")
                try:
                    decode_packet(data)
                except MessageError:
                    undecodable += 1
                    assert a.statistics().dropped_malformed == before + 1
            st_ = a.statistics()
            assert st_.packets_in == len(packets) + 1 and st_.dropped_bad_key == 0
            assert st_.dropped_malformed == undecodable and st_.dropped_errors == 0
            check_core(core)
            msgspec.to_builtins(a.statistics())
            nursery.cancel_scope.cancel()

    trio.run(main)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STREAM_BYTES, min_size=1, max_size=3), st.booleans())
def test_the_driver_survives_any_sealed_stream_frame(frames: list[bytes], hello: bool) -> None:
    async def main() -> None:
        a = svc()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            core = a._core
            assert core is not None
            host, port = a.local_addr.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                data = b"".join(frame(seal(f, CHANNEL_TCP)) for f in frames)
                if hello:
                    data = frame(seal(encode(STREAM_HELLO), CHANNEL_TCP)) + data
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                    with trio.fail_after(5):
                        while await stream.receive_some(65536):
                            pass
                except trio.BrokenResourceError:
                    pass  # the service closed it first (a frame it could not take)
            with trio.fail_after(5):
                while a._conns:  # noqa: ASYNC110 (the service frees the slot as it ends)
                    await trio.sleep(0.005)
            st_ = a.statistics()
            assert st_.streams_in == 1 and st_.dropped_errors == 0
            check_core(core)
            nursery.cancel_scope.cancel()

    trio.run(main)
