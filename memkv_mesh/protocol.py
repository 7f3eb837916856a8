"""The local wire protocol between engines (clients) and the daemon on their node.

Theory of operation
-------------------
* Frames: a 4-byte little-endian length, then one msgpack-encoded message. A frame longer than
  ``MAX_FRAME_BYTES`` is a protocol error and the connection is closed (the stream cannot be
  trusted after that); a frame that does not decode gets an ``Error`` reply and the connection goes
  on, because the length prefix still marks where the next frame starts.
* Messages are msgspec Structs, tagged and array_like. ONLY APPEND: never renumber a tag, never
  reorder fields, add new fields at the end with defaults.
* Every request gets exactly one reply, in order, except ``Release``, which has none (a get's
  lease is released without a round trip), and a ``Get`` with ``stream`` set, whose one final
  ``Located`` may be preceded by ``LocatedPart`` messages: blocks handed over early (local hits at
  once, blocks fetched from the mesh as each lands) so the client copies them out while the rest
  are still on the wire. Each part has its own lease; the final ``Located`` lists only the blocks
  no part delivered (None for those and for misses).
* Who a client is comes from the socket (``SO_PEERCRED``), never from ``Hello``: the daemon maps
  the peer's uid/gid to a tenant (``memkv_mesh/tenants.py``), scopes every key it sends to that
  tenant, and passes the tenant's arena segment as a file descriptor (``SCM_RIGHTS``) with the
  ``Welcome`` (``Welcome.arena_fd``); offsets in replies are relative to that segment.
* The bytes of blocks never cross the socket. ``Alloc`` reserves arena slots, the client copies
  into them, ``Commit`` publishes them; ``Get`` pins blocks under a lease and returns their arena
  offsets; the client reads them straight from the shared-memory arena and then ``Release``\\ s.
"""

from __future__ import annotations

import struct

import msgspec

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024 * 1024
# A batch is at most this many keys; 65,536 keys is a 16M-token prompt of 256-token blocks.
MAX_BATCH = 65536
LEN = struct.Struct("<I")


class Msg(msgspec.Struct, tag=True, array_like=True):
    pass


# ---- requests (client -> daemon). ONLY APPEND. --------------------------------------------------
class Hello(Msg, tag=0):
    version: int
    client: str = ""
    pid: int = 0


class Alloc(Msg, tag=1):
    """Reserve arena slots for blocks about to be put (all or nothing)."""

    keys: list[bytes]
    sizes: list[int]


class Commit(Msg, tag=2):
    """Publish allocated slots. The daemon hashes (xxh3-64) the bytes in each slot and records
    that; ``checksums`` is empty, or the client's xxh3-64 of each block, and then a commit whose
    bytes do not match is refused whole (``bad_checksum``)."""

    keys: list[bytes]
    checksums: list[int]


class Abort(Msg, tag=3):
    """Give back allocated slots that will not be committed."""

    keys: list[bytes]


class Get(Msg, tag=4):
    """Pin the blocks found and return where they lie in the arena, under one lease.

    ``stream``: the client accepts ``LocatedPart`` messages before the final ``Located`` (a
    daemon that predates the field ignores it and sends the ``Located`` alone)."""

    keys: list[bytes]
    stream: bool = False
    checksums: bool = False  # send each block's recorded xxh3-64 (for a verifying read)


class Release(Msg, tag=5):
    """End a lease (no reply)."""

    lease: int


class Lookup(Msg, tag=6):
    """How many leading keys are present."""

    keys: list[bytes]


class Delete(Msg, tag=7):
    """Delete blocks: on a mesh node, mesh-wide (its owners and holders too, tombstoned so no
    replica brings them back). ``local``: only this node's copies (the mesh keeps its replicas;
    a copy not yet on its owners is kept until it is)."""

    keys: list[bytes]
    local: bool = False


class StatsRequest(Msg, tag=8):
    pass


class MembersRequest(Msg, tag=9):
    pass


class Contains(Msg, tag=10):
    """Which of the keys are present (one bool each)."""

    keys: list[bytes]


# ---- replies (daemon -> client). ONLY APPEND. ---------------------------------------------------
class Error(Msg, tag=64):
    code: str
    message: str


class Welcome(Msg, tag=65):
    version: int
    node_id: str
    arena_path: str
    arena_bytes: int
    max_block_bytes: int
    key_bytes: int
    # The arena segment (arena_path, arena_bytes) comes with this frame as a file descriptor
    # (SCM_RIGHTS); arena_bytes 0: no arena (an operator connection, which names no blocks).
    arena_fd: bool = False
    tenant: str = ""
    # The daemon does not hash puts itself ([store] verify_puts = false): send checksums.
    send_checksums: bool = False


class Allocated(Msg, tag=66):
    """One offset per key; -1 means the key is already stored and needs no copy."""

    offsets: list[int]


class Count(Msg, tag=67):
    n: int


class Located(Msg, tag=68):
    """Per key ``[offset, length]`` or None for a miss; ``lease`` 0 when nothing was pinned."""

    lease: int
    blocks: list[tuple[int, int] | None]
    checksums: list[int | None] = []  # with Get.checksums: per key, the recorded xxh3-64


class StatsReply(Msg, tag=69):
    stats: dict[str, object]


class MembersReply(Msg, tag=70):
    members: list[dict[str, object]]


class Present(Msg, tag=71):
    present: list[bool]


class LocatedPart(Msg, tag=72):
    """Part of a streamed ``Get``'s answer: ``blocks[j]`` (``[offset, length]``) is the block of
    key ``index[j]`` of the request, pinned under ``lease`` until the client releases it."""

    lease: int
    index: list[int]
    blocks: list[tuple[int, int]]
    checksums: list[int] = []  # with Get.checksums: per block, the recorded xxh3-64


Request = Hello | Alloc | Commit | Abort | Get | Release | Lookup | Delete | StatsRequest | MembersRequest | Contains
Reply = Error | Welcome | Allocated | Count | Located | StatsReply | MembersReply | Present | LocatedPart

# Error codes, stable strings that clients switch on.
BAD_REQUEST = "bad_request"  # malformed frame or message
BAD_KEY = "bad_key"  # a key of the wrong length
TOO_LARGE = "too_large"  # a block larger than store.max_block_bytes
FULL = "full"  # no room even after eviction (everything pinned)
NOT_ALLOCATED = "not_allocated"  # commit/abort of a key this connection did not allocate
INTERNAL = "internal"
UNAVAILABLE = "unavailable"  # a feature not running on this daemon (e.g. gossip)
BUSY = "busy"  # back-pressure: too many blocks not yet on their owners; retry later
NOT_REPLICATED = "not_replicated"  # ack = "replicated": stored here, owners not confirmed in time
FORBIDDEN = "forbidden"  # the peer is no tenant of this daemon, or an operator naming blocks
BAD_CHECKSUM = "bad_checksum"  # a commit whose bytes do not match the checksums sent with it
LIMIT = "limit"  # a per-client or per-tenant cap ([limits]) is reached; release leases or commit


class ProtocolError(Exception):
    """The peer broke framing (oversize frame); the connection must be closed."""


request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def encode_frame(msg: msgspec.Struct, buf: bytearray | None = None) -> bytearray:
    """Length-prefixed frame of ``msg`` (reuses ``buf`` when given)."""
    out = buf if buf is not None else bytearray()
    _encoder.encode_into(msg, out, 4)
    LEN.pack_into(out, 0, len(out) - 4)
    return out


class FrameBuffer:
    """Accumulates received bytes and yields complete frame bodies."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (n,) = LEN.unpack_from(buf, 0)
        if n > self._max:
            raise ProtocolError(f"frame of {n} bytes exceeds the limit of {self._max} bytes")
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        return body

    def __len__(self) -> int:
        return len(self._buf)
