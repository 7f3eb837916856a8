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

Public API: ``NodeMeta`` (named fields, public), ``WireMeta`` (its positional wire form),
``wire_meta``, ``node_meta``, ``Alive``, ``Suspect``, ``Dead``, ``Update``, ``Ping``, ``Ack``,
``PingReq``, ``Nack``, ``Gossip``, ``Packet``, ``Entry``, ``PushPullReq``, ``PushPullReply``,
``PushPullFinal``, ``DirDelta``, ``DirSummaryReq``, ``DirSummary``, ``StreamMsg``, ``encode``,
``decode_packet``, ``decode_stream``,
``encoded_size``, ``STATE_*`` state codes.
"""

from __future__ import annotations

import msgspec

# Member states, as carried in digests and entries. Order is severity at equal incarnation:
# alive < suspect < dead < left.
STATE_ALIVE = 0
STATE_SUSPECT = 1
STATE_DEAD = 2
STATE_LEFT = 3
STATE_NAMES = ("alive", "suspect", "dead", "left")


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

    role: str
    capacity_weight: float
    data_addr: str
    protocol_version: int
    placement: int = 1  # appended: an older node's 4-field meta decodes as placement 1


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
    node: str
    inc: int
    addr: str
    meta: WireMeta


class Suspect(msgspec.Struct, tag=17, frozen=True, array_like=True):
    node: str
    inc: int
    src: str  # who suspects


class Dead(msgspec.Struct, tag=18, frozen=True, array_like=True):
    node: str
    inc: int
    src: str  # who declared it; == node for a graceful leave


Update = Alive | Suspect | Dead


# ---- UDP packets -------------------------------------------------------------------------------


class Ping(msgspec.Struct, tag=0, frozen=True, array_like=True):
    seq: int
    target: str  # the receiver checks it is the node meant (addresses get reused)
    updates: tuple[Update, ...] = ()


class Ack(msgspec.Struct, tag=1, frozen=True, array_like=True):
    seq: int
    updates: tuple[Update, ...] = ()


class PingReq(msgspec.Struct, tag=2, frozen=True, array_like=True):
    seq: int  # the requester's probe seq, echoed in the relayed Ack / Nack
    target: str
    nack: bool = True
    updates: tuple[Update, ...] = ()


class Nack(msgspec.Struct, tag=3, frozen=True, array_like=True):
    seq: int
    updates: tuple[Update, ...] = ()


class Gossip(msgspec.Struct, tag=4, frozen=True, array_like=True):
    updates: tuple[Update, ...] = ()


# ---- block directory (gossip/directory.py) ------------------------------------------------------
# Appended after the membership messages: DirDelta is packet tag 5, the summary exchange stream
# tags 35 and 36. Fingerprints are 64-bit xxh3 of the 32-byte block keys (9 bytes of msgpack each).


class DirDelta(msgspec.Struct, tag=5, frozen=True, array_like=True):
    """A holder's changes from version ``prev`` to ``ver`` (``prev == ver``: a version marker)."""

    node: str
    epoch: int  # the holder's process epoch (its incarnation at start): a restart starts over
    gen: int  # the holder's filter generation: a higher one asks receivers to refetch a summary
    prev: int
    ver: int
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


class DirSummaryReq(msgspec.Struct, tag=35, frozen=True, array_like=True):
    """Ask a holder (over a stream) for its current directory summary."""

    node: str


class DirSummary(msgspec.Struct, tag=36, frozen=True, array_like=True):
    """A holder's filter, built from its true holdings at version ``ver``."""

    node: str
    epoch: int
    gen: int
    ver: int
    k: int  # the summary format: 48 = top 48 bits of each fingerprint (1 was a Bloom filter, retired)
    words: bytes  # format 48: 6 bytes per held block, the top 48 bits of its fingerprint
    count: int = 0  # keys the holder held when it built the summary


Packet = Ping | Ack | PingReq | Nack | Gossip | DirDelta

# ---- TCP push-pull -------------------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One member's full state in a push-pull exchange."""

    node: str
    inc: int
    state: int
    addr: str
    meta: WireMeta


class PushPullReq(msgspec.Struct, tag=32, frozen=True, array_like=True):
    join: bool
    digest: tuple[tuple[str, int, int], ...]  # (node, incarnation, state)
    entries: tuple[Entry, ...] = ()  # full entries pushed unasked (the sender's own, on join)


class PushPullReply(msgspec.Struct, tag=33, frozen=True, array_like=True):
    entries: tuple[Entry, ...]
    want: tuple[str, ...]


class PushPullFinal(msgspec.Struct, tag=34, frozen=True, array_like=True):
    entries: tuple[Entry, ...]


# A stream may also carry a Ping answered by an Ack: the TCP fallback probe, sent alongside the
# indirect probes so that plain UDP loss does not make a healthy node suspect.
StreamMsg = (
    PushPullReq | PushPullReply | PushPullFinal | Ping | Ack | DirSummaryReq | DirSummary
)

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
