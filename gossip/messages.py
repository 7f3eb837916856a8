"""Wire messages of the SWIM membership protocol, and their codec.

Theory of operation
-------------------
Every UDP datagram carries exactly one *packet* (``Ping``, ``Ack``, ``PingReq``, ``Nack`` or
``Gossip``), and every packet ends with ``updates``: membership updates (``Alive``, ``Suspect``,
``Dead``) piggybacked from the transmit-limited broadcast queue. Batching the dissemination into the
probe traffic we send anyway is what keeps idle gossip cheap: a ping is 8-10 bytes of msgpack
(``[0, seq, "n12", []]``) before the AEAD envelope is added by the transport.

The TCP fallback probe sends a ``Ping`` over a stream and reads the ``Ack`` from it.

The TCP push-pull exchange (anti-entropy and join) uses three stream messages: the initiator sends
``PushPullReq`` with a *digest* (node, incarnation, state) of everything it knows, the peer answers
``PushPullReply`` with the full entries the initiator lacks or has stale plus the ids it wants, and
the initiator closes with ``PushPullFinal`` carrying the wanted entries. In steady state a digest
entry is ~8 bytes instead of ~45 for a full entry.

The block directory (``gossip/directory.py``) adds one packet, ``DirDelta`` (a holder's added and
removed key fingerprints between two versions, sent straight to each member), and one stream
exchange, ``DirSummaryReq`` -> ``DirSummary`` (a holder's whole filter, fetched on a gap).

Rules:

- Messages are msgspec Structs, ``array_like`` and tagged. Tags are never renumbered and new
  fields are only ever appended at the end, with defaults (ONLY APPEND).
- Node ids travel as strings; choose short ones (the byte budget counts them on every ping).
- ``Dead`` with ``src == node`` is a graceful leave ("left"), as in memberlist.
- Hostile input: every decoded field is range checked by the decoder itself (msgspec ``Meta``
  constraints on the field types below), so a message that decodes is one the core can handle
  and re-encode: incarnations and directory versions in ``0..MAX_INCARNATION`` (2**62; a peer
  claiming more is malformed, and the core never raises its own past it), states ``0..3``,
  sequence numbers ``0..2**32-1``, fingerprints ``0..2**64-1``, node ids 1-255 characters,
  member addresses ``host:port`` with a port in 1..65535 (<= 300 characters), per-packet update
  lists <= ``MAX_UPDATES``, fingerprint lists <= ``MAX_FPS``, member lists <= ``MAX_MEMBERS``,
  capacity weights finite and >= 0. A message outside these bounds raises ``MessageError``: the
  driver drops and counts it (``dropped_malformed``), the core never sees it. The constraints
  only apply when decoding; building a message in code is unchanged.
- ``STREAM_HELLO`` (a ``Ping`` to the empty node id, which every node answers with nothing) is
  sent first on a stream whose first real frame is larger than a listener buffers before a
  stream has authenticated (64 KiB, ``transport/gossip_driver.py``).

Public API: ``NodeMeta`` (named fields, public), ``WireMeta`` (its positional wire form),
``wire_meta``, ``node_meta``, ``Alive``, ``Suspect``, ``Dead``, ``Update``, ``Ping``, ``Ack``,
``PingReq``, ``Nack``, ``Gossip``, ``Packet``, ``Entry``, ``PushPullReq``, ``PushPullReply``,
``PushPullFinal``, ``DirDelta``, ``DirSummaryReq``, ``DirSummary``, ``StreamMsg``, ``encode``,
``decode_packet``, ``decode_stream``,
``encoded_size``, ``STATE_*`` state codes, ``MAX_INCARNATION``, ``STREAM_HELLO``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# Member states, as carried in digests and entries. Order is severity at equal incarnation:
# alive < suspect < dead < left.
STATE_ALIVE = 0
STATE_SUSPECT = 1
STATE_DEAD = 2
STATE_LEFT = 3
STATE_NAMES = ("alive", "suspect", "dead", "left")

# ---- decode-time bounds (see "Hostile input" above) ----------------------------------------------
# Incarnations are raised by one per refutation or metadata change: a node that refuted once a
# millisecond would need 146 million years to reach 2**62. Keeping a factor of 4 below msgpack's
# 2**64 means ``inc + 1`` of anything accepted always encodes, and a peer claiming an absurd
# incarnation (the 2**64-1 of an attack) is malformed.
MAX_INCARNATION = 1 << 62
# msgpack on a <= 1400-byte datagram holds at most ~230 updates (6 bytes each at the least).
MAX_UPDATES = 512
# A directory delta holds <= 146 fingerprints (UDP limit); a stream frame never carries a list.
MAX_FPS = 8192
# Push-pull digests and entry lists: a mesh of 1M members is far past what SWIM is used for.
MAX_MEMBERS = 1 << 20
MAX_NODE_ID = 255  # the daemon's node ids are 1-64 characters
MAX_ADDR = 300  # a 253-character DNS name, brackets, ':' and a port
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"

Inc = Annotated[int, msgspec.Meta(ge=0, le=MAX_INCARNATION)]
Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_INCARNATION)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
State = Annotated[int, msgspec.Meta(ge=STATE_ALIVE, le=STATE_LEFT)]
Fp = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints end at 2**64-1 already
Small = Annotated[int, msgspec.Meta(ge=0, le=0x7FFFFFFF)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NODE_ID)]
Target = Annotated[str, msgspec.Meta(max_length=MAX_NODE_ID)]  # "" is STREAM_HELLO's
# A DNS name or IPv4 address, or an IPv6 address (zone included) in brackets: only the characters
# those can hold, so no NUL, control or non-ASCII character reaches a resolver or a socket call.
_HOST = r"(\[[0-9A-Za-z:.%_-]+\]|[A-Za-z0-9._-]+)"
Addr = Annotated[str, msgspec.Meta(max_length=MAX_ADDR, pattern=r"^" + _HOST + ":" + _PORT + "$")]
DataAddr = Annotated[str, msgspec.Meta(max_length=MAX_ADDR, pattern=r"^(" + _HOST + ":" + _PORT + ")?$")]
Weight = Annotated[float, msgspec.Meta(ge=0.0, le=1e300)]  # NaN and inf fail too
Role = Annotated[str, msgspec.Meta(max_length=16)]


class NodeMeta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a node tells the mesh about itself (the public, named-field form)."""

    role: str = "both"  # "gpu" | "flash" | "both"
    capacity_weight: float = 1.0  # rendezvous-hashing weight of a flash peer
    data_addr: str = ""  # "host:port" of the data plane
    protocol_version: int = 1
    # The placement hash this node computes owners with (memkv_mesh.placement.PLACEMENT_VERSION);
    # nodes that predate the field are version 1. Nodes of another version are left out of
    # placement: every node must compute the same owners.
    placement: int = 1

    def __post_init__(self) -> None:
        if self.role not in ("gpu", "flash", "both"):
            raise ValueError(f"NodeMeta.role must be 'gpu', 'flash' or 'both', got {self.role!r}")
        if not (self.capacity_weight >= 0.0) or self.capacity_weight == float("inf"):
            raise ValueError(
                f"NodeMeta.capacity_weight must be a finite number >= 0, got {self.capacity_weight}"
            )
        if self.protocol_version < 0:
            raise ValueError(f"NodeMeta.protocol_version must be >= 0, got {self.protocol_version}")


class WireMeta(msgspec.Struct, frozen=True, array_like=True):
    """``NodeMeta`` as it travels: positional, ~25 bytes instead of ~70."""

    role: Role
    capacity_weight: Weight
    data_addr: DataAddr
    protocol_version: Small
    placement: Small = 1  # appended: an older node's 4-field meta decodes as placement 1


def wire_meta(m: NodeMeta) -> WireMeta:
    return WireMeta(m.role, m.capacity_weight, m.data_addr, m.protocol_version, m.placement)


def node_meta(w: WireMeta) -> NodeMeta:
    role = w.role if w.role in ("gpu", "flash", "both") else "both"
    weight = w.capacity_weight if 0.0 <= w.capacity_weight < float("inf") else 0.0
    return NodeMeta(
        role=role,
        capacity_weight=weight,
        data_addr=w.data_addr,
        protocol_version=max(0, w.protocol_version),
        placement=max(0, w.placement),
    )


# ---- membership updates (piggybacked) -------------------------------------------------------
# ONLY APPEND: tags 16.. are updates, 0.. packets, 32.. stream messages.


class Alive(msgspec.Struct, tag=16, frozen=True, array_like=True):
    node: NodeId
    inc: Inc
    addr: Addr
    meta: WireMeta


class Suspect(msgspec.Struct, tag=17, frozen=True, array_like=True):
    node: NodeId
    inc: Inc
    src: NodeId  # who suspects


class Dead(msgspec.Struct, tag=18, frozen=True, array_like=True):
    node: NodeId
    inc: Inc
    src: NodeId  # who declared it; == node for a graceful leave


Update = Alive | Suspect | Dead
Updates = Annotated[tuple[Update, ...], msgspec.Meta(max_length=MAX_UPDATES)]


# ---- UDP packets -------------------------------------------------------------------------------


class Ping(msgspec.Struct, tag=0, frozen=True, array_like=True):
    seq: Seq
    target: Target  # the receiver checks it is the node meant (addresses get reused)
    updates: Updates = ()


class Ack(msgspec.Struct, tag=1, frozen=True, array_like=True):
    seq: Seq
    updates: Updates = ()


class PingReq(msgspec.Struct, tag=2, frozen=True, array_like=True):
    seq: Seq  # the requester's probe seq, echoed in the relayed Ack / Nack
    target: Target
    nack: bool = True
    updates: Updates = ()


class Nack(msgspec.Struct, tag=3, frozen=True, array_like=True):
    seq: Seq
    updates: Updates = ()


class Gossip(msgspec.Struct, tag=4, frozen=True, array_like=True):
    updates: Updates = ()


# ---- block directory (gossip/directory.py) ------------------------------------------------------
# Appended after the membership messages: DirDelta is packet tag 5, the summary exchange stream
# tags 35 and 36. Fingerprints are 64-bit xxh3 of the 32-byte block keys (9 bytes of msgpack each).


Fps = Annotated[tuple[Fp, ...], msgspec.Meta(max_length=MAX_FPS)]
Words = Annotated[bytes, msgspec.Meta(max_length=6 * MAX_MEMBERS * 4)]  # 4M blocks per holder


class DirDelta(msgspec.Struct, tag=5, frozen=True, array_like=True):
    """A holder's changes from version ``prev`` to ``ver`` (``prev == ver``: a version marker)."""

    node: NodeId
    epoch: Version  # the holder's process epoch (its incarnation at start): a restart starts over
    gen: Version  # the holder's filter generation: a higher one asks receivers to refetch a summary
    prev: Version
    ver: Version
    added: Fps = ()
    removed: Fps = ()


class DirSummaryReq(msgspec.Struct, tag=35, frozen=True, array_like=True):
    """Ask a holder (over a stream) for its current directory summary."""

    node: NodeId


class DirSummary(msgspec.Struct, tag=36, frozen=True, array_like=True):
    """A holder's filter, built from its true holdings at version ``ver``."""

    node: NodeId
    epoch: Version
    gen: Version
    ver: Version
    k: Small  # the summary format: 48 = top 48 bits of each fingerprint (1 was a Bloom filter, retired)
    words: Words  # format 48: 6 bytes per held block, the top 48 bits of its fingerprint
    count: Small = 0  # keys the holder held when it built the summary


Packet = Ping | Ack | PingReq | Nack | Gossip | DirDelta

# ---- TCP push-pull -------------------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One member's full state in a push-pull exchange."""

    node: NodeId
    inc: Inc
    state: State
    addr: Addr
    meta: WireMeta


Entries = Annotated[tuple[Entry, ...], msgspec.Meta(max_length=MAX_MEMBERS)]
Digest = Annotated[tuple[tuple[NodeId, Inc, State], ...], msgspec.Meta(max_length=MAX_MEMBERS)]
Want = Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_MEMBERS)]


class PushPullReq(msgspec.Struct, tag=32, frozen=True, array_like=True):
    join: bool
    digest: Digest  # (node, incarnation, state)
    entries: Entries = ()  # full entries pushed unasked (the sender's own, on join)


class PushPullReply(msgspec.Struct, tag=33, frozen=True, array_like=True):
    entries: Entries
    want: Want


class PushPullFinal(msgspec.Struct, tag=34, frozen=True, array_like=True):
    entries: Entries


# A stream may also carry a Ping answered by an Ack: the TCP fallback probe, sent alongside the
# indirect probes so that plain UDP loss does not make a healthy node suspect.
StreamMsg = (
    PushPullReq | PushPullReply | PushPullFinal | Ping | Ack | DirSummaryReq | DirSummary
)

# Sent first on a stream whose first real frame is too big for a listener to buffer before the
# stream authenticated: every node (this version and older ones) answers it with nothing.
STREAM_HELLO = Ping(0, "")

_ENCODER = msgspec.msgpack.Encoder()
_PACKET_DECODER = msgspec.msgpack.Decoder(Packet)
_STREAM_DECODER = msgspec.msgpack.Decoder(StreamMsg)


class MessageError(ValueError):
    """A datagram or stream frame that does not decode as a gossip message."""


def encode(msg: Packet | StreamMsg | Update) -> bytes:
    """msgpack bytes of one message (what the transport seals with the mesh key)."""
    return _ENCODER.encode(msg)


def encoded_size(msg: Packet | StreamMsg | Update) -> int:
    return len(_ENCODER.encode(msg))


def decode_packet(data: bytes) -> Packet:
    try:
        return _PACKET_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"bad gossip packet: {exc}") from None


def decode_stream(data: bytes) -> StreamMsg:
    try:
        return _STREAM_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"bad push-pull frame: {exc}") from None
