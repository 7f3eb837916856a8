"""The mesh data plane: moving block bytes between the stores of two daemons.

Theory of operation
-------------------
* One ``DataPlane`` per daemon. ``run`` picks the transport (``choose_transport``: "tcp", "ucx", or
  "auto", which takes UCX only where it offers RDMA or CUDA transports and says why), listens, and
  serves peers; ``fetch`` pulls blocks from a peer into our store, ``push`` replicates ours to a
  peer. The protocol below is written once, against a ``Channel``; ``tcp_dataplane`` and
  ``ucx_dataplane`` only provide channels (framed control messages + bulk byte runs).
* Every connection is authenticated in both directions before any block moves: HMAC-SHA256
  challenge-response over fresh 32-byte nonces from both sides (``client_handshake`` /
  ``server_handshake``), with distinct labels per direction, so a recorded proof cannot be
  replayed or reflected. A peer without a key from our keyring can neither fetch nor store.
* After the handshake every control frame is sealed with AES-GCM under a per-connection session
  (``Session``): HKDF-SHA256 over the mesh key, both nonces and both node ids gives one key per
  direction, and the nonce is a per-direction frame counter, so an injected, altered, replayed,
  reordered or dropped frame fails to open and closes the connection (``frame_auth_failures``).
  Bulk bytes are integrity-checked by the xxh3-64 checksum that their (sealed) control frame
  carries; with ``encrypt_bulk`` they are sealed too, under their own per-direction keys.
* Identity: the node id a peer claims in ``Hello`` is bound into both proofs and into the session
  keys, so it cannot change for the life of the connection; a request that names a node
  (``node_id`` of a request) must name that one, and no peer may claim this node's own id.
* Bounded before authentication: frames of at most ``PREAUTH_FRAME_BYTES`` and at most 64 KiB
  buffered per connection, the handshake within ``connect_timeout_s``, at most
  ``max_handshakes`` handshakes at once (the oldest is dropped to make room) and
  ``max_connections`` connections per listener. After it: a frame once started must complete
  within ``io_timeout_s``, an idle connection is closed after ``idle_timeout_s``, every decoded
  message is range checked, and an exception while serving a request drops that connection
  (counted in ``handler_errors``, logged with the peer), never the listener.
* Bytes land straight in the arena: the receiver allocates a slot (``store.alloc``), receives into
  ``store.arena.slice``, verifies the sender's checksum (which is the checksum the store recorded
  at put time), and only then commits. A corrupt block is aborted (slot freed) and reported
  False; a peer that dies mid-block raises ``DataPlaneError`` and every slot of that transfer is
  freed (``store.drop_owner``), so a half-written block is never committed.
* A connection carries one transfer at a time, strictly request/reply; connections are kept in a
  small per-peer pool and reused. A pooled connection found broken before its first reply is
  replaced once by a fresh one (the peer may simply have restarted).
* Wire format: control frames are a 4-byte little-endian length then one msgpack message (tagged,
  array_like msgspec Structs; ONLY APPEND), sealed by the ``Session`` after the handshake. Block
  bytes follow their control frame, in the order of the frame's lists, each exactly ``size``
  bytes (``size + TAG_BYTES`` when the session seals bulk bytes too).

  fetch:  C->S FetchRequest(keys)            S->C FetchReply(sizes, checksums) + bytes of each size >= 0
  push:   C->S PushRequest(keys, sizes, cks) S->C PushReady(status)  C->S bytes of each status SEND
          S->C PushDone(stored)
  delete: C->S DeleteRequest(keys)           S->C DeleteDone(deleted)
  errors: S->C Error(code, message) instead of a reply; the connection stays usable.

* A node that writes through (``store.write_through``: a flash node) confirms a pushed block in
  ``PushDone`` only once it is on its NVMe tier (``store.persist``, durable per ``[store] fsync``),
  so a kill -9 of a flash node loses only the transfers in flight. A block it already held counts
  once it is on NVMe too.
* Mesh-wide deletes: ``DeleteRequest`` deletes the keys here and records them in the node's
  ``Tombstones``; a push of a tombstoned key is answered ``DELETED`` (nothing sent), and the pusher
  then deletes its own copy and records the tombstone too, so a replica never brings a deleted
  block back. A *fresh* push (``PushRequest.fresh``: a client put the block again after the
  delete) lifts the tombstone instead.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

import msgspec
import trio
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.protocol import LEN, encode_frame  # the same length-prefixed msgpack framing
from memkv_mesh.store import BlockStore, StoreError
from memkv_mesh.tombstones import Tombstones
from transport.dataplane_config import DataPlaneConfig

log = logging.getLogger("memkv_mesh.dataplane")

# Awaited with keys just verified and committed by a fetch, while the rest of its batch arrives.
OnStored = Callable[[list[bytes]], Awaitable[None]]
# Fetches smaller than this do not call on_stored: they land in about the time a hand-off takes.
_STREAM_MIN_BYTES = 1 << 20

__all__ = [
    "Channel",
    "DataPlane",
    "DataPlaneError",
    "DataPlaneStats",
    "FrameAuthError",
    "Session",
    "choose_transport",
    "encode_frame",
    "client_handshake",
    "server_handshake",
]

# 2: control frames sealed after the handshake (a version-1 peer is refused with a clear error).
DATAPLANE_VERSION = 2
MAX_BATCH = 65536
NONCE_BYTES = 32
# Before authentication a connection may make us hold at most this much: the handshake's
# messages are a few hundred bytes, so 64 KiB is ample and an unauthenticated peer costs little.
PREAUTH_BUFFER_BYTES = 64 * 1024
PREAUTH_FRAME_BYTES = PREAUTH_BUFFER_BYTES - 4
# Node ids are names (host names, "gpu-17"): longer ones, or control characters, are refused.
MAX_NODE_ID = 255
# AES-GCM's tag, added to every sealed frame and (with encrypt_bulk) to every block on the wire.
TAG_BYTES = 16
# No block on the wire is larger (the store's own limit is 128 MiB by default); a bigger announced
# size is a broken peer, not something to drain.
_MAX_WIRE_BLOCK = 1 << 30

# PushReady status per block. ONLY APPEND.
SEND = 0  # send the bytes
ALREADY = 1  # already stored here: nothing to send, counts as stored
REFUSED = 2  # cannot store it (full, too large): nothing to send
DELETED = 3  # deleted mesh-wide (tombstoned here): nothing to send, and the pusher drops its copy


class DataPlaneError(Exception):
    """A peer is down, unauthenticated, or broke the protocol; or a transport cannot start."""


class PeerClosed(DataPlaneError):
    """The peer closed the connection (EOF) where a frame or bytes were expected."""


class AuthError(DataPlaneError):
    """The handshake failed: wrong key, unknown key, or a bad proof."""


class IdentityError(AuthError):
    """A peer claimed a node id that is not its own (this node's, or another than it proved)."""


class FrameAuthError(DataPlaneError):
    """A frame after the handshake failed to open: injected, altered, replayed, reordered or lost."""


class IdleTimeout(DataPlaneError):
    """No frame started within the wait for one (an idle connection, not a broken one)."""


# ---- wire messages. ONLY APPEND: never renumber a tag or reorder fields. ---------------------------
class Msg(msgspec.Struct, tag=True, array_like=True):
    pass


# Range checks done by the decoder itself (a frame that breaks them is malformed and closes the
# connection); what needs a clear reply (key lengths, duplicates, list lengths) is checked by the
# handlers.
_Keys = Annotated[list[bytes], msgspec.Meta(max_length=MAX_BATCH)]
_Sizes = Annotated[list[Annotated[int, msgspec.Meta(ge=-1, le=_MAX_WIRE_BLOCK)]], msgspec.Meta(max_length=MAX_BATCH)]
_Checksums = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_BATCH)]
_Flags = Annotated[list[bool], msgspec.Meta(max_length=MAX_BATCH)]
_Status = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=255)]], msgspec.Meta(max_length=MAX_BATCH)]
_NodeId = Annotated[str, msgspec.Meta(max_length=MAX_NODE_ID)]
_Nonce = Annotated[bytes, msgspec.Meta(max_length=64)]
_Short = Annotated[str, msgspec.Meta(max_length=4096)]


class Hello(Msg, tag=0):
    """``bulk``: the client wants block bytes sealed too (``encrypt_bulk``)."""

    version: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    node_id: _NodeId
    key_id: _Nonce
    nonce: _Nonce
    bulk: bool = False


class Challenge(Msg, tag=1):
    """``bulk``: block bytes are sealed on this connection (either side asked); bound into both proofs."""

    version: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    node_id: _NodeId
    nonce: _Nonce
    proof: _Nonce
    bulk: bool = False


class Proof(Msg, tag=2):
    proof: _Nonce


class Welcome(Msg, tag=3):
    pass


class FetchRequest(Msg, tag=4):
    """``node_id``: the requesting node, when it says; must be the one it authenticated as."""

    keys: _Keys
    node_id: _NodeId = ""


class FetchReply(Msg, tag=5):
    """Per key: size (-1: not held) and xxh3-64 checksum (0 when not held)."""

    sizes: _Sizes
    checksums: _Checksums


class PushRequest(Msg, tag=6):
    """``fresh``: blocks a client just put on the pushing node (its replication, not a repair or
    a hand-off); they are accepted over a tombstone, since the put is newer than the delete.
    ``node_id``: the pushing node, when it says; must be the one it authenticated as."""

    keys: _Keys
    sizes: _Sizes
    checksums: _Checksums
    fresh: bool = False
    node_id: _NodeId = ""


class PushReady(Msg, tag=7):
    status: _Status


class PushDone(Msg, tag=8):
    stored: _Flags


class DeleteRequest(Msg, tag=9):
    """Delete these blocks here and remember them as deleted (a mesh-wide delete). ``node_id``:
    the deleting node, when it says; must be the one it authenticated as."""

    keys: _Keys
    node_id: _NodeId = ""


class DeleteDone(Msg, tag=10):
    """Per key: whether this node held a copy that it deleted."""

    deleted: _Flags


class Error(Msg, tag=63):
    code: _Short
    message: _Short


AnyMsg = (
    Hello | Challenge | Proof | Welcome | FetchRequest | FetchReply | PushRequest | PushReady | PushDone
    | DeleteRequest | DeleteDone | Error
)
_decoder: msgspec.msgpack.Decoder[AnyMsg] = msgspec.msgpack.Decoder(AnyMsg)
_encoder = msgspec.msgpack.Encoder()


def decode_body(body: bytes | bytearray | memoryview) -> Msg:
    """One frame body -> a message; ``DataPlaneError`` for anything that is not a valid one
    (msgspec raises only its own errors for any input; the rest is belt and braces)."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DataPlaneError(f"malformed data-plane frame: {e}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # pragma: no cover
        raise DataPlaneError(f"malformed data-plane frame: {type(e).__name__}: {e}") from None


# ---- the session: sealed frames after the handshake ---------------------------------------------
_SESSION_INFO = b"memkv-dataplane session v2\0"


def _lp(text: str) -> bytes:
    raw = text.encode()
    return LEN.pack(len(raw)) + raw


class Session:
    """The per-connection keys the handshake leaves behind, and the frame counters.

    HKDF-SHA256 (salt: both nonces; info: a label and both node ids) over the mesh key gives four
    keys: control frames client->server and server->client, block bytes client->server and
    server->client. Each direction's AES-GCM nonce is its own counter (frame n of a direction is
    sealed with nonce n), so the receiver opens frame n only with nonce n: a frame injected,
    altered, replayed, reordered or dropped fails its tag, and the connection is closed.
    Pure (no I/O): a channel calls ``seal``/``open`` in the order frames go out and come in.
    """

    __slots__ = (
        "local_nonce", "remote_nonce", "encrypt_bulk", "_tx", "_rx", "_btx", "_brx", "_ntx", "_nrx",
        "_nbtx", "_nbrx",
    )  # fmt: skip

    def __init__(
        self, key: bytes, nonce_c: bytes, nonce_s: bytes, client_id: str, server_id: str, *,
        is_client: bool, encrypt_bulk: bool = False,
    ) -> None:  # fmt: skip
        okm = HKDF(
            algorithm=SHA256(), length=128, salt=nonce_c + nonce_s,
            info=_SESSION_INFO + _lp(client_id) + _lp(server_id),
        ).derive(key)  # fmt: skip
        c2s, s2c, bc2s, bs2c = (okm[i : i + 32] for i in range(0, 128, 32))
        self.local_nonce, self.remote_nonce = (nonce_c, nonce_s) if is_client else (nonce_s, nonce_c)
        self.encrypt_bulk = encrypt_bulk
        self._tx = AESGCM(c2s if is_client else s2c)
        self._rx = AESGCM(s2c if is_client else c2s)
        self._btx = AESGCM(bc2s if is_client else bs2c)
        self._brx = AESGCM(bs2c if is_client else bc2s)
        self._ntx = self._nrx = self._nbtx = self._nbrx = 0

    def seal(self, body: bytes | bytearray | memoryview) -> bytes:
        n, self._ntx = self._ntx, self._ntx + 1
        return self._tx.encrypt(n.to_bytes(12, "little"), bytes(body), None)

    def open(self, data: bytes | bytearray | memoryview) -> bytes:
        n, self._nrx = self._nrx, self._nrx + 1
        try:
            return self._rx.decrypt(n.to_bytes(12, "little"), bytes(data), None)
        except InvalidTag:
            raise FrameAuthError(
                f"frame {n} failed authentication (injected, altered, replayed, reordered or lost)"
            ) from None

    def seal_block(self, view: memoryview) -> bytearray:
        """Block bytes -> ciphertext + tag (``len(view) + TAG_BYTES``), with the next bulk nonce."""
        n, self._nbtx = self._nbtx, self._nbtx + 1
        out = bytearray(len(view) + TAG_BYTES)
        self._btx.encrypt_into(n.to_bytes(12, "little"), view, None, out)
        return out

    def open_block_into(self, sealed: memoryview | None, into: memoryview | None) -> None:
        """Open the next sealed block into ``into``; ``None`` skips one (a block read and
        discarded still uses its nonce). ``FrameAuthError`` when it fails its tag."""
        n, self._nbrx = self._nbrx, self._nbrx + 1
        if sealed is None or into is None:
            return
        try:
            self._brx.decrypt_into(n.to_bytes(12, "little"), sealed, None, into)
        except InvalidTag:
            raise FrameAuthError(f"block {n} failed authentication (altered, reordered or lost)") from None


def seal_frame(session: Session | None, msg: Msg) -> bytes:
    """A whole frame (length + body) for ``msg``: plain before the handshake, sealed after."""
    return frame_body(session, _encoder.encode(msg))


def frame_body(session: Session | None, body: bytes | bytearray | memoryview) -> bytes:
    """Frame a raw body as is (sealed when there is a session). The fuzz benchmark's hook."""
    if session is not None:
        body = session.seal(body)
    return LEN.pack(len(body)) + bytes(body)


def open_frame(session: Session | None, body: bytes | bytearray | memoryview) -> Msg:
    """A received frame body -> a message (opened first when there is a session)."""
    if session is not None:
        body = session.open(body)
    return decode_body(body)


# ---- channels -----------------------------------------------------------------------------------
class Channel(Protocol):
    """One authenticated-or-not connection to a peer, as the protocol sees it."""

    peer: str
    # Set by ``start_session`` once authenticated; None before.
    session: Session | None

    async def send_msg(self, msg: Msg) -> None: ...

    async def recv_msg(self, limit_s: float | None) -> Msg:
        """Next control message: its first byte within ``limit_s`` (None: no limit; else
        ``IdleTimeout``), the rest within the channel's io timeout (a partial frame is a stalled
        peer). ``PeerClosed`` on EOF, ``DataPlaneError`` on timeout or garbage, ``FrameAuthError``
        for a sealed frame that does not open. Before the session, frames are limited to
        ``PREAUTH_FRAME_BYTES``."""
        ...

    async def send_blocks(self, views: list[memoryview]) -> None:
        """Send the views back to back (one batch: one thread hop or one set of posted sends)."""
        ...

    async def recv_blocks(
        self, targets: list[memoryview | int], on_block: Callable[[int, int], None] | None = None
    ) -> list[int]:
        """Receive one run per target, in order: a view is filled exactly, an int is that many
        bytes read and discarded. Returns the xxh3-64 of each filled view (0 for discards),
        computed where it is cheapest (TCP: in the thread that received it, while it is hot).

        ``on_block(i, digest)``, when given, is called on the Trio thread once target ``i`` has
        fully landed (in order, each target once, before this returns), so a caller can publish
        a block while the rest of the batch is still on the wire. It must not block."""
        ...

    def start_session(self, session: Session) -> None:
        """Called once authenticated: frames are sealed from now on, and a transport may derive
        per-connection state (UCX tags from ``session.local_nonce``/``remote_nonce``)."""
        ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    name: str
    ucx_transports: list[str]

    async def serve(
        self, handler: Callable[[Channel], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def connect(self, peer: str) -> Channel: ...


def split_peer(peer: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets) -> (host, port); ``DataPlaneError`` naming the bad address."""
    host, sep, port = peer.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DataPlaneError(f"peer address {peer!r} is not 'host:port'")
    return host, int(port)


# ---- authentication -------------------------------------------------------------------------------
def key_id(key: bytes) -> bytes:
    """Names a key without revealing it, so the server knows which key of its ring to use."""
    return hashlib.sha256(b"memkv-dataplane key-id\0" + key).digest()[:8]


def _proof(
    key: bytes, label: bytes, nonce_c: bytes, nonce_s: bytes, client: str, server: str, bulk: bool = False
) -> bytes:
    msg = b"".join(
        (label, b"\0", nonce_c, nonce_s, _lp(client), _lp(server), b"\1" if bulk else b"\0")
    )  # fmt: skip
    return hmac.new(key, msg, hashlib.sha256).digest()


_CLIENT = b"memkv-dataplane client proof v2"
_SERVER = b"memkv-dataplane server proof v2"


def node_id_problem(node_id: str) -> str:
    """Why ``node_id`` is not acceptable as a peer's name ("" when it is)."""
    if not node_id:
        return "an empty node id"
    if len(node_id.encode()) > MAX_NODE_ID:
        return f"a node id over {MAX_NODE_ID} bytes"
    if not node_id.isprintable():
        return "a node id with control characters"
    return ""


async def client_handshake(
    chan: Channel, keys: list[bytes], node_id: str, limit_s: float, *, encrypt_bulk: bool = False
) -> str:
    """Prove our key and check the server's proof; returns the server's node id. On return the
    channel has its ``Session`` (every later frame is sealed)."""
    if not keys:
        raise AuthError("no mesh key configured ([dataplane] keys is empty): cannot talk to peers")
    key = keys[0]
    nonce_c = os.urandom(NONCE_BYTES)
    await chan.send_msg(Hello(DATAPLANE_VERSION, node_id, key_id(key), nonce_c, encrypt_bulk))
    msg = await chan.recv_msg(limit_s)
    if isinstance(msg, Error):
        raise AuthError(f"peer {chan.peer} refused the connection: {msg.code}: {msg.message}")
    if not isinstance(msg, Challenge) or len(msg.nonce) != NONCE_BYTES:
        raise AuthError(f"peer {chan.peer} answered Hello with {type(msg).__name__}, not a Challenge")
    want = _proof(key, _SERVER, nonce_c, msg.nonce, node_id, msg.node_id, msg.bulk)
    if not hmac.compare_digest(want, msg.proof):
        raise AuthError(f"peer {chan.peer} ({msg.node_id!r}) could not prove it holds the mesh key")
    if encrypt_bulk and not msg.bulk:  # cannot happen with a genuine server: the proof covers it
        raise AuthError(f"peer {chan.peer} ({msg.node_id!r}) would not seal block bytes")
    await chan.send_msg(Proof(_proof(key, _CLIENT, nonce_c, msg.nonce, node_id, msg.node_id, msg.bulk)))
    msg2 = await chan.recv_msg(limit_s)
    if isinstance(msg2, Error):
        raise AuthError(f"peer {chan.peer} refused our proof: {msg2.code}: {msg2.message}")
    if not isinstance(msg2, Welcome):
        raise AuthError(f"peer {chan.peer} answered our proof with {type(msg2).__name__}")
    chan.start_session(
        Session(key, nonce_c, msg.nonce, node_id, msg.node_id, is_client=True, encrypt_bulk=msg.bulk)
    )
    return msg.node_id


async def server_handshake(
    chan: Channel, keys: list[bytes], node_id: str, limit_s: float, *, encrypt_bulk: bool = False
) -> str:
    """Check the client's key and proof (proving ours); returns the client's node id. On return
    the channel has its ``Session``. A client that claims this node's own id is refused."""
    msg = await chan.recv_msg(limit_s)
    if not isinstance(msg, Hello):
        await _refuse(chan, "bad_request", f"expected Hello, got {type(msg).__name__}")
        raise AuthError(f"peer {chan.peer} did not start with Hello")
    if msg.version != DATAPLANE_VERSION:
        await _refuse(chan, "version", f"data-plane version {msg.version} is not {DATAPLANE_VERSION}")
        raise AuthError(f"peer {chan.peer} speaks data-plane version {msg.version}")
    if len(msg.nonce) != NONCE_BYTES:
        await _refuse(chan, "bad_request", f"nonce must be {NONCE_BYTES} bytes")
        raise AuthError(f"peer {chan.peer} sent a {len(msg.nonce)}-byte nonce")
    bad = node_id_problem(msg.node_id)
    if bad:
        await _refuse(chan, "bad_request", f"Hello carries {bad}")
        raise AuthError(f"peer {chan.peer} sent {bad}")
    if msg.node_id == node_id:
        await _refuse(chan, "identity", f"node id {node_id!r} is this node's own")
        raise IdentityError(f"peer {chan.peer} claims to be this node ({node_id!r})")
    key = next((k for k in keys if hmac.compare_digest(key_id(k), msg.key_id)), None)
    if key is None:
        await _refuse(chan, "auth", "unknown mesh key")
        raise AuthError(f"peer {chan.peer} ({msg.node_id!r}) uses a key not in our keyring")
    bulk = msg.bulk or encrypt_bulk
    nonce_s = os.urandom(NONCE_BYTES)
    proof_s = _proof(key, _SERVER, msg.nonce, nonce_s, msg.node_id, node_id, bulk)
    await chan.send_msg(Challenge(DATAPLANE_VERSION, node_id, nonce_s, proof_s, bulk))
    reply = await chan.recv_msg(limit_s)
    want = _proof(key, _CLIENT, msg.nonce, nonce_s, msg.node_id, node_id, bulk)
    if not isinstance(reply, Proof) or not hmac.compare_digest(want, reply.proof):
        await _refuse(chan, "auth", "bad proof")
        raise AuthError(f"peer {chan.peer} ({msg.node_id!r}) failed to prove the mesh key")
    await chan.send_msg(Welcome())
    chan.start_session(Session(key, msg.nonce, nonce_s, msg.node_id, node_id, is_client=False, encrypt_bulk=bulk))
    return msg.node_id


async def _refuse(chan: Channel, code: str, message: str) -> None:
    with trio.move_on_after(1):
        try:
            await chan.send_msg(Error(code, message))
        except DataPlaneError:
            pass


# ---- transport choice -----------------------------------------------------------------------------
def choose_transport(config: DataPlaneConfig) -> tuple[str, str]:
    """(transport, reason). ``ucx`` that cannot start raises ``DataPlaneError``; never falls back."""
    if config.transport == "tcp":
        return "tcp", "configured: transport = \"tcp\""
    from transport import ucx_dataplane

    if config.transport == "ucx":
        probe = ucx_dataplane.probe()
        if probe.error:
            raise DataPlaneError(f"transport = \"ucx\" but UCX cannot start: {probe.error}")
        return "ucx", f"configured: transport = \"ucx\" (UCX transports: {', '.join(probe.transports)})"
    probe = ucx_dataplane.probe()
    if probe.error:
        return "tcp", f"auto: UCX unavailable ({probe.error}); using the Trio TCP data plane"
    fast = probe.fast_transports()
    if fast:
        return "ucx", f"auto: UCX offers {', '.join(fast)} (RDMA/CUDA), which TCP sockets cannot"
    return "tcp", (
        f"auto: UCX offers only {', '.join(probe.transports) or 'nothing'} (no RDMA or CUDA transport); "
        "plain TCP sockets are faster there (measured 2.8-3.5 GB/s vs 0.75 GB/s for ucxx over tcp)"
    )


def make_backend(name: str, config: DataPlaneConfig) -> Backend:
    if name == "tcp":
        from transport.tcp_dataplane import TcpBackend

        return TcpBackend(config)
    from transport.ucx_dataplane import UcxBackend

    return UcxBackend(config)


# ---- the service --------------------------------------------------------------------------------
class DataPlaneStats(msgspec.Struct, frozen=True):
    transport: str
    reason: str
    ucx_transports: list[str]
    address: str
    connections_open: int
    connections_accepted: int
    connections_opened: int
    active_transfers: int
    fetches: int
    pushes: int
    blocks_in: int
    bytes_in: int
    blocks_out: int
    bytes_out: int
    corrupt_blocks: int
    auth_failures: int
    protocol_errors: int
    peer_errors: int
    requests_served: int
    # UCX: transport/device of the lanes this node's authenticated endpoints use (ucp_ep_query),
    # e.g. ["tcp/lo", "cma/memory"]; ucx_transports is what the context may use. Empty for TCP.
    ucx_lanes_in_use: list[str] = []
    # Issue 11 (appended): sealed frames or blocks that failed to open (connection closed).
    frame_auth_failures: int = 0
    # Peers that claimed a node id not their own (this node's, or in a request another than the
    # one they authenticated as): refused with Error("identity").
    identity_refusals: int = 0
    # Connections refused at the listener's cap (max_connections).
    connections_refused: int = 0
    # Handshakes dropped to make room for a new one (max_handshakes), or that timed out.
    handshakes_evicted: int = 0
    handshake_timeouts: int = 0
    # Authenticated connections closed after idle_timeout_s without a request.
    idle_closed: int = 0
    # Requests whose handling raised an unexpected exception (the connection was dropped).
    handler_errors: int = 0
    connections_handshaking: int = 0
    encrypt_bulk: bool = False


class _Owner:
    """Identity under which one transfer holds store slots and leases."""

    __slots__ = ("id",)
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)

    def __repr__(self) -> str:
        return f"<dataplane transfer {self.id}>"


_COUNTERS = (
    "connections_accepted", "connections_opened", "fetches", "pushes", "blocks_in", "bytes_in",
    "blocks_out", "bytes_out", "corrupt_blocks", "auth_failures", "protocol_errors", "peer_errors",
    "requests_served", "frame_auth_failures", "identity_refusals", "connections_refused",
    "handshakes_evicted", "handshake_timeouts", "idle_closed", "handler_errors",
)  # fmt: skip


class DataPlane:
    def __init__(
        self, config: DataPlaneConfig, store: BlockStore, *, node_id: str, tombstones: Tombstones | None = None
    ) -> None:
        try:
            config.validate()
        except ValueError as e:
            raise DataPlaneError(str(e)) from None
        self.config = config
        self.store = store
        self.node_id = node_id
        # Keys deleted mesh-wide lately (pushes of them are refused DELETED); 10 min by default
        # when the daemon does not share the mesh's.
        self.tombstones = tombstones if tombstones is not None else Tombstones(600.0, 65536)
        # Told (on the Trio thread) which keys a mesh-wide delete removed here, by a peer's
        # DeleteRequest or a push answered DELETED, so the mesh stops replicating them.
        self.on_deleted: Callable[[list[bytes]], None] | None = None
        self._keys = config.keyring()
        self._transport: str = config.transport
        self._reason = "not started"
        self._backend: Backend | None = None
        self._ucx_transports: list[str] = []
        self._address = ""
        self._idle: dict[str, list[Channel]] = {}
        # The authenticated node id of each of our client connections (pooled or in use).
        self._names: dict[Channel, str] = {}
        # Server side: connections being served, and the cancel scopes of those still in their
        # handshake, oldest first (the oldest is dropped when max_handshakes is reached).
        self._serving = 0
        self._handshaking: dict[int, trio.CancelScope] = {}
        self._conn_ids = itertools.count(1)
        self._open = 0
        self._active = 0
        self._limiter = trio.CapacityLimiter(config.max_concurrent_transfers)
        self._c = dict.fromkeys(_COUNTERS, 0)
        # Test hook: called with (key, view) on every block we send; may alter the bytes on the wire.
        self._send_hook: Callable[[bytes, memoryview], memoryview] | None = None

    @property
    def transport(self) -> str:
        return self._transport

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def address(self) -> str:
        return self._address

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        name, reason = await trio.to_thread.run_sync(choose_transport, self.config)
        self._transport, self._reason = name, reason
        backend = self._backend = make_backend(name, self.config)
        self._ucx_transports = list(backend.ucx_transports)
        try:
            async with trio.open_nursery() as nursery:
                self._address = await nursery.start(backend.serve, self._serve_channel)
                log.info(
                    "data plane started",
                    extra={"fields": {
                        "node": self.node_id, "transport": name, "ucx_transports": backend.ucx_transports,
                        "reason": reason, "address": self._address,
                    }},
                )  # fmt: skip
                task_status.started(self._address)
        finally:
            with trio.CancelScope(shield=True):
                for chans in self._idle.values():
                    for ch in chans:
                        await self._close(ch)
                self._idle.clear()
            self._backend = None

    def statistics(self) -> DataPlaneStats:
        c = self._c
        return DataPlaneStats(
            transport=self._transport,
            reason=self._reason,
            ucx_transports=list(self._ucx_transports),
            address=self._address,
            connections_open=self._open,
            active_transfers=self._active,
            ucx_lanes_in_use=list(getattr(self._backend, "lanes_in_use", [])),
            connections_handshaking=len(self._handshaking),
            encrypt_bulk=self.config.encrypt_bulk,
            **c,
        )

    # ---- client side ------------------------------------------------------------------------------
    async def fetch(
        self, peer: str, keys: list[bytes], on_stored: OnStored | None = None, *, expect_node: str | None = None
    ) -> list[bool]:
        """Pull ``keys`` from ``peer`` into our store. True per block now held here.

        ``on_stored(keys)``, when given, is awaited with each group of blocks as soon as they are
        verified and committed, while the rest of the batch is still arriving (a local get can
        hand them to its client early). It must not raise. ``expect_node`` (fetch, push,
        delete): the node id the peer must authenticate as (``IdentityError`` otherwise)."""
        _check_batch(keys)
        result = self.store.contains(keys)
        todo = [i for i, have in enumerate(result) if not have]
        if not todo:
            return result
        want = [keys[i] for i in todo]
        got = await self._transfer(peer, lambda ch, fresh: self._fetch_on(ch, want, on_stored), expect_node)
        for i, ok in zip(todo, got, strict=True):
            result[i] = ok
        self._c["fetches"] += 1
        return result

    async def push(
        self, peer: str, keys: list[bytes], *, fresh: bool = False, expect_node: str | None = None
    ) -> list[bool]:
        """Replicate ``keys`` from our store to ``peer``. True per block the peer now holds.
        ``fresh``: just put by a local client (accepted over the peer's tombstones)."""
        _check_batch(keys)
        if not keys:
            return []
        out = await self._transfer(peer, lambda ch, _: self._push_on(ch, keys, fresh), expect_node)
        self._c["pushes"] += 1
        return out

    async def delete(self, peer: str, keys: list[bytes], *, expect_node: str | None = None) -> list[bool]:
        """Delete ``keys`` on ``peer`` (which tombstones them). True per key it held."""
        _check_batch(keys)
        if not keys:
            return []
        return await self._transfer(peer, lambda ch, fresh: self._delete_on(ch, keys), expect_node)

    async def _delete_on(self, chan: Channel, keys: list[bytes]) -> list[bool]:
        try:
            await chan.send_msg(DeleteRequest(keys, self.node_id))
            reply = await chan.recv_msg(self.config.io_timeout_s)
        except PeerClosed:
            raise _StaleConnection() from None
        if isinstance(reply, Error):
            raise DataPlaneError(f"peer {chan.peer} refused the delete: {reply.code}: {reply.message}")
        if not isinstance(reply, DeleteDone) or len(reply.deleted) != len(keys):
            self._c["protocol_errors"] += 1
            raise DataPlaneError(f"peer {chan.peer} answered a delete of {len(keys)} keys with a bad reply")
        return [bool(d) for d in reply.deleted]

    async def forget(self, keys: list[bytes]) -> list[bool]:
        """A mesh-wide delete reached this node: tombstone the keys, delete local copies, tell
        the mesh. True per key held here."""
        self.tombstones.add(keys, trio.current_time())
        held = self.store.contains(keys)
        if any(held):
            await self.store.delete([k for k, h in zip(keys, held, strict=True) if h])
        if self.on_deleted is not None:
            self.on_deleted(keys)
        return held

    async def _transfer(
        self, peer: str, op: Callable[[Channel, bool], Awaitable[list[bool]]], expect_node: str | None = None
    ) -> list[bool]:
        split_peer(peer)
        async with self._limiter:
            self._active += 1
            try:
                for attempt in (0, 1):
                    chan, fresh = await self._checkout(peer)
                    name = self._names.get(chan, "")
                    if expect_node is not None and name != expect_node:
                        await self._close(chan)
                        self._c["identity_refusals"] += 1
                        raise IdentityError(
                            f"peer {peer} authenticated as {name!r}, not as the expected {expect_node!r}"
                        )
                    try:
                        out = await op(chan, fresh)
                    except _StaleConnection:
                        await self._close(chan)
                        if fresh or attempt:
                            self._c["peer_errors"] += 1
                            raise DataPlaneError(f"peer {peer} closed the connection") from None
                        continue
                    except BaseException as e:
                        await self._close(chan)
                        if isinstance(e, FrameAuthError):
                            self._c["frame_auth_failures"] += 1
                            log.warning("data-plane frame refused: %s", e, extra={"fields": {"peer": peer}})
                        if isinstance(e, DataPlaneError):
                            self._c["peer_errors"] += 1
                            if isinstance(e, PeerClosed):
                                raise DataPlaneError(f"peer {peer} went away mid-transfer: {e}") from None
                        raise
                    await self._checkin(peer, chan)
                    return out
                raise AssertionError("unreachable")  # pragma: no cover
            finally:
                self._active -= 1

    async def _checkout(self, peer: str) -> tuple[Channel, bool]:
        idle = self._idle.get(peer)
        if idle:
            return idle.pop(), False
        if self._backend is None:
            raise DataPlaneError("the data plane is not running (start DataPlane.run first)")
        cfg = self.config
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                chan = await self._backend.connect(peer)
                self._open += 1
                self._c["connections_opened"] += 1
                try:
                    name = await client_handshake(
                        chan, self._keys, self.node_id, cfg.connect_timeout_s, encrypt_bulk=cfg.encrypt_bulk
                    )
                except BaseException:
                    await self._close(chan)
                    raise
                self._names[chan] = name
        except trio.TooSlowError:
            self._c["peer_errors"] += 1
            raise DataPlaneError(
                f"peer {peer} did not connect and authenticate within {cfg.connect_timeout_s} s"
            ) from None
        except AuthError:
            self._c["auth_failures"] += 1
            raise
        except DataPlaneError as e:
            self._c["peer_errors"] += 1
            raise DataPlaneError(f"cannot reach peer {peer}: {e}") from None
        return chan, True

    async def _checkin(self, peer: str, chan: Channel) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) < self.config.max_connections_per_peer:
            idle.append(chan)
        else:
            await self._close(chan)

    async def _close(self, chan: Channel) -> None:
        self._open -= 1
        self._names.pop(chan, None)
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await chan.aclose()
            except (DataPlaneError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _fetch_on(self, chan: Channel, keys: list[bytes], on_stored: OnStored | None = None) -> list[bool]:
        store, to = self.store, self.config.io_timeout_s
        try:
            await chan.send_msg(FetchRequest(keys, self.node_id))
            reply = await chan.recv_msg(to)
        except PeerClosed:
            raise _StaleConnection() from None
        if isinstance(reply, Error):
            raise DataPlaneError(f"peer {chan.peer} refused the fetch: {reply.code}: {reply.message}")
        if not isinstance(reply, FetchReply) or len(reply.sizes) != len(keys) or len(reply.checksums) != len(keys):
            self._c["protocol_errors"] += 1
            raise DataPlaneError(f"peer {chan.peer} answered a fetch of {len(keys)} keys with a bad reply")
        if any(s > self.store.max_block_bytes for s in reply.sizes):
            self._c["protocol_errors"] += 1
            raise DataPlaneError(
                f"peer {chan.peer} announced a block over store.max_block_bytes ({self.store.max_block_bytes})"
            )
        owner = _Owner()
        try:
            return await self._receive(chan, owner, keys, reply.sizes, reply.checksums, on_stored=on_stored)
        finally:
            store.drop_owner(owner)

    async def _receive(
        self, chan: Channel, owner: _Owner, keys: list[bytes], sizes: list[int], cks: list[int],
        offsets: list[int] | None = None, on_stored: OnStored | None = None,
    ) -> list[bool]:
        """Receive the announced blocks (size >= 0) straight into fresh arena slots, verify, commit.

        ``offsets`` are slots already reserved (push: reserved before PushReady), else each block
        is allocated here; a block that cannot or need not be stored (already held, full) is read
        and discarded. With ``on_stored`` (a streamed get) each block is verified and committed as
        soon as it has landed, so a batch cut short keeps the blocks that arrived whole; without,
        the batch is verified and committed at once when it has all landed (one commit and one
        directory update per batch). True per block stored here now. Slots not committed are
        freed by the caller's ``drop_owner`` whatever happens.
        """
        store = self.store
        if offsets is None:
            offsets = []
            for k, size in zip(keys, sizes, strict=True):
                if size < 0:
                    offsets.append(-2)
                    continue
                try:
                    offsets.append((await store.alloc(owner, [k], [size]))[0])
                except StoreError:
                    offsets.append(-2)
        out = [off == -1 for off in offsets]  # -1: stored already (by a put or another transfer)
        targets: list[memoryview | int] = []
        which: list[int] = []  # the key index of each target
        views: list[memoryview] = []
        publish: trio.MemorySendChannel[bytes] | None = None

        def landed(t: int, digest: int) -> None:
            # Runs as a run_sync_soon callback while the receive thread goes on (TCP): anything
            # raised here would end the whole Trio run, so nothing may escape.
            try:
                good = self._commit_batch(chan, owner, keys, sizes, cks, offsets, which, out, [(t, digest)])
            except Exception:  # a store bug: the block is not stored (drop_owner frees it)
                log.exception("commit of a fetched block failed", extra={"fields": {"key": keys[which[t]].hex()}})
                return
            if good and publish is not None:
                try:
                    publish.send_nowait(keys[good[0]])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the hand-on task has stopped (cancelled): the block stays stored

        try:
            for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
                if size < 0:
                    continue
                which.append(i)
                if off < 0:
                    targets.append(size)
                else:
                    v = store.arena.slice(off, size)
                    views.append(v)
                    targets.append(v)
            if not targets:
                pass
            elif on_stored is None:
                # Nobody waits for single blocks (a push, a plain fetch): verify and commit the
                # batch at once (one commit, one directory update), not a callback per block.
                digests = await self._recv_blocks(chan, targets)
                self._commit_batch(chan, owner, keys, sizes, cks, offsets, which, out, list(enumerate(digests)))
            elif sum(sizes[i] for i in which) < _STREAM_MIN_BYTES:
                # Small batches arrive in one go: handing them on early would only add messages.
                await self._recv_blocks(chan, targets, landed)
            else:
                publish, stored = trio.open_memory_channel[bytes](float("inf"))
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_hand_on, stored, on_stored)
                        with publish:
                            await self._recv_blocks(chan, targets, landed)
                except BaseExceptionGroup as eg:  # the receive's own error, not wrapped
                    if len(eg.exceptions) == 1:
                        raise eg.exceptions[0] from None
                    raise
        finally:
            for v in views:
                v.release()
        return out

    def _commit_batch(
        self, chan: Channel, owner: _Owner, keys: list[bytes], sizes: list[int], cks: list[int],
        offsets: list[int], which: list[int], out: list[bool], landed: list[tuple[int, int]],
    ) -> list[int]:
        """Verify landed targets ``(target, xxh3 digest)`` against the sender's checksums; commit
        the good blocks in one call, abort the corrupt ones (counted and logged). Marks ``out``
        and returns the key indexes stored."""
        store = self.store
        good: list[int] = []
        for t, digest in landed:
            i = which[t]
            if offsets[i] < 0:
                continue  # read and discarded
            if digest == cks[i]:
                good.append(i)
                continue
            store.abort(owner, [keys[i]])
            self._c["corrupt_blocks"] += 1
            log.warning(
                "corrupt block from peer dropped",
                extra={"fields": {"peer": chan.peer, "key": keys[i].hex(), "size": sizes[i]}},
            )
        if good:
            store.commit(owner, [keys[i] for i in good], [cks[i] for i in good])
            for i in good:
                out[i] = True
            self._c["blocks_in"] += len(good)
            self._c["bytes_in"] += sum(sizes[i] for i in good)
        return good

    async def _push_on(self, chan: Channel, keys: list[bytes], fresh: bool = False) -> list[bool]:
        store, to = self.store, self.config.io_timeout_s
        owner = _Owner()
        try:
            lease, locs = await store.get(owner, keys)
            held = [i for i, loc in enumerate(locs) if loc is not None]
            out = [False] * len(keys)
            if not held:
                return out
            sizes = [locs[i][1] for i in held]  # type: ignore[index]
            cks = [_stored_checksum(store, keys[i], locs[i]) for i in held]  # type: ignore[arg-type]
            try:
                await chan.send_msg(PushRequest([keys[i] for i in held], sizes, cks, fresh, self.node_id))
                ready = await chan.recv_msg(to)
            except PeerClosed:
                raise _StaleConnection() from None
            if isinstance(ready, Error):
                raise DataPlaneError(f"peer {chan.peer} refused the push: {ready.code}: {ready.message}")
            if not isinstance(ready, PushReady) or len(ready.status) != len(held):
                self._c["protocol_errors"] += 1
                raise DataPlaneError(f"peer {chan.peer} answered a push with a bad reply")
            wanted = [(keys[i], locs[i]) for i, st in zip(held, ready.status, strict=True) if st == SEND]
            await self._send(chan, wanted)  # type: ignore[arg-type]
            done = await chan.recv_msg(to)
            if not isinstance(done, PushDone) or len(done.stored) != len(held):
                self._c["protocol_errors"] += 1
                raise DataPlaneError(f"peer {chan.peer} did not confirm the push")
            for i, ok in zip(held, done.stored, strict=True):
                out[i] = bool(ok)
            deleted = [keys[i] for i, st in zip(held, ready.status, strict=True) if st == DELETED]
        finally:
            store.drop_owner(owner)
        if deleted:  # the peer knows these were deleted mesh-wide: so do we now
            await self.forget(deleted)
        return out

    async def _send(self, chan: Channel, blocks: list[tuple[bytes, tuple[int, int]]]) -> None:
        """Send pinned blocks (key, (offset, length)) straight from the arena, as one batch."""
        if not blocks:
            return
        store = self.store
        views = [store.arena.slice(off, n) for _, (off, n) in blocks]
        try:
            hook = self._send_hook
            wire = [hook(k, v) for (k, _), v in zip(blocks, views, strict=True)] if hook else views
            session = chan.session
            if session is not None and session.encrypt_bulk:
                await _send_sealed(chan, session, wire)
            else:
                await chan.send_blocks(wire)
        finally:
            for v in views:
                v.release()
        self._c["blocks_out"] += len(blocks)
        self._c["bytes_out"] += sum(n for _, (_, n) in blocks)

    # ---- server side ------------------------------------------------------------------------------
    async def _serve_channel(self, chan: Channel) -> None:
        """Serve one accepted connection. Nothing raised here reaches the listener: every
        exception ends this connection only (counted, logged with the peer)."""
        self._open += 1
        self._c["connections_accepted"] += 1
        cfg = self.config
        try:
            if self._serving >= cfg.max_connections:
                self._c["connections_refused"] += 1
                log.warning(
                    "data-plane connection refused: at max_connections",
                    extra={"fields": {"peer": chan.peer, "max_connections": cfg.max_connections}},
                )
                return
            self._serving += 1
            try:
                name = await self._handshake(chan)
                if name is not None:
                    await self._serve_requests(chan, name)
            finally:
                self._serving -= 1
        except Exception as e:  # a bug or an unforeseen input: this connection only
            self._c["handler_errors"] += 1
            log.error(
                "data-plane request failed; connection dropped",
                exc_info=e, extra={"fields": {"peer": chan.peer, "error": f"{type(e).__name__}: {e}"}},
            )  # fmt: skip
        finally:
            self._open -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await chan.aclose()
                except (DataPlaneError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _handshake(self, chan: Channel) -> str | None:
        """The server handshake within ``connect_timeout_s``, among at most ``max_handshakes``
        (the oldest is dropped to make room). The client's node id, or None (counted)."""
        cfg = self.config
        while len(self._handshaking) >= cfg.max_handshakes:
            oldest = next(iter(self._handshaking))
            self._handshaking.pop(oldest).cancel()
            self._c["handshakes_evicted"] += 1
        conn = next(self._conn_ids)
        scope = self._handshaking[conn] = trio.CancelScope(deadline=trio.current_time() + cfg.connect_timeout_s)
        name = None
        try:
            with scope:
                name = await server_handshake(
                    chan, self._keys, self.node_id, cfg.connect_timeout_s, encrypt_bulk=cfg.encrypt_bulk
                )
        except IdentityError as e:
            self._c["identity_refusals"] += 1
            log.warning("data-plane peer refused: %s", e, extra={"fields": {"peer": chan.peer}})
        except AuthError as e:
            self._c["auth_failures"] += 1
            log.warning("data-plane peer refused: %s", e, extra={"fields": {"peer": chan.peer}})
        except DataPlaneError as e:
            self._c["peer_errors"] += 1
            log.debug("data-plane handshake failed: %s", e, extra={"fields": {"peer": chan.peer}})
        finally:
            evicted = self._handshaking.pop(conn, None) is None
        if scope.cancelled_caught:
            if not evicted:
                self._c["handshake_timeouts"] += 1
            log.info(
                "data-plane handshake %s", "dropped for a newer one" if evicted else "timed out",
                extra={"fields": {"peer": chan.peer, "limit_s": cfg.connect_timeout_s}},
            )  # fmt: skip
            return None
        return name

    async def _serve_requests(self, chan: Channel, peer_node: str) -> None:
        cfg = self.config
        handlers: dict[type, Callable[[Channel, _Owner, Any], Awaitable[None]]] = {
            FetchRequest: self._serve_fetch,
            PushRequest: self._serve_push,
            DeleteRequest: self._serve_delete,
        }
        try:
            while True:
                try:
                    msg = await chan.recv_msg(cfg.idle_timeout_s)
                except PeerClosed:
                    return
                except IdleTimeout:
                    self._c["idle_closed"] += 1
                    return
                handler = handlers.get(type(msg))
                if handler is None:
                    self._c["protocol_errors"] += 1
                    await chan.send_msg(Error("bad_request", f"unexpected {type(msg).__name__}"))
                    return
                claimed = msg.node_id  # type: ignore[attr-defined]
                if claimed and claimed != peer_node:
                    self._c["identity_refusals"] += 1
                    log.warning(
                        "data-plane request under another node's name refused",
                        extra={"fields": {"peer": chan.peer, "node": peer_node, "claimed": claimed[:MAX_NODE_ID]}},
                    )  # fmt: skip
                    await chan.send_msg(
                        Error("identity", f"this connection is node {peer_node!r}, not {claimed!r}")
                    )
                    return
                owner = _Owner()
                try:
                    await handler(chan, owner, msg)
                    self._c["requests_served"] += 1
                finally:
                    self.store.drop_owner(owner)
        except FrameAuthError as e:
            self._c["frame_auth_failures"] += 1
            log.warning("data-plane frame refused: %s", e, extra={"fields": {"peer": chan.peer, "node": peer_node}})
        except DataPlaneError as e:
            self._c["peer_errors"] += 1
            log.debug("data-plane peer connection ended: %s", e, extra={"fields": {"peer": chan.peer}})

    async def _serve_delete(self, chan: Channel, owner: _Owner, req: DeleteRequest) -> None:
        bad = _batch_problem(req.keys)
        if bad:
            self._c["protocol_errors"] += 1
            await chan.send_msg(Error("bad_request", bad))
        else:
            await chan.send_msg(DeleteDone(await self.forget(req.keys)))

    async def _recv_blocks(
        self, chan: Channel, targets: list[memoryview | int], on_block: Callable[[int, int], None] | None = None
    ) -> list[int]:
        """``chan.recv_blocks``, opening sealed blocks when the session seals them."""
        session = chan.session
        if session is None or not session.encrypt_bulk:
            return await chan.recv_blocks(targets, on_block)
        return await _recv_sealed(chan, session, targets, on_block)

    async def _serve_fetch(self, chan: Channel, owner: _Owner, req: FetchRequest) -> None:
        store = self.store
        bad = _batch_problem(req.keys)
        if bad:
            self._c["protocol_errors"] += 1
            await chan.send_msg(Error("bad_request", bad))
            return
        lease, locs = await store.get(owner, req.keys)
        sizes = [loc[1] if loc else -1 for loc in locs]
        cks = [_stored_checksum(store, k, loc) if loc else 0 for k, loc in zip(req.keys, locs, strict=True)]
        await chan.send_msg(FetchReply(sizes, cks))
        await self._send(chan, [(k, loc) for k, loc in zip(req.keys, locs, strict=True) if loc is not None])
        if lease:
            store.release(owner, lease)

    async def _serve_push(self, chan: Channel, owner: _Owner, req: PushRequest) -> None:
        store = self.store
        n = len(req.keys)
        bad = _batch_problem(req.keys)
        if not bad and (len(req.sizes) != n or len(req.checksums) != n):
            bad = f"{n} keys but {len(req.sizes)} sizes and {len(req.checksums)} checksums"
        if not bad and any(s <= 0 for s in req.sizes):
            bad = "block sizes must be > 0"
        if not bad and any(s > store.max_block_bytes for s in req.sizes):
            bad = f"a block size is over store.max_block_bytes ({store.max_block_bytes})"
        if bad:
            self._c["protocol_errors"] += 1
            await chan.send_msg(Error("bad_request", bad))
            return
        status: list[int] = []
        offsets: list[int] = []
        dead = self.tombstones
        if dead and req.fresh:
            dead.discard(req.keys)  # put again after the delete: the put is newer
        for k, size in zip(req.keys, req.sizes, strict=True):
            if dead and k in dead:
                status.append(DELETED)
                offsets.append(-2)
                continue
            try:
                off = (await store.alloc(owner, [k], [size]))[0]
            except StoreError:
                status.append(REFUSED)
                offsets.append(-2)
                continue
            status.append(ALREADY if off == -1 else SEND)
            offsets.append(off)
        await chan.send_msg(PushReady(status))
        sizes = [size if st == SEND else -1 for st, size in zip(status, req.sizes, strict=True)]
        got = await self._receive(chan, owner, req.keys, sizes, req.checksums, offsets)
        stored = [g or st == ALREADY for g, st in zip(got, status, strict=True)]
        late = [k for k, ok in zip(req.keys, stored, strict=True) if ok and k in dead] if dead else []
        if late:  # deleted mesh-wide while the bytes were on the wire
            await store.delete(late)
            stored = [ok and k not in dead for k, ok in zip(req.keys, stored, strict=True)]
        if store.write_through and any(stored):
            # A replica counts once it is on NVMe: a kill -9 of this node must not lose it.
            keep = [k for k, ok in zip(req.keys, stored, strict=True) if ok]
            durable = dict(zip(keep, await store.persist(keep), strict=True))
            stored = [ok and durable[k] for k, ok in zip(req.keys, stored, strict=True)]
        await chan.send_msg(PushDone(stored))


async def _hand_on(stored: trio.MemoryReceiveChannel[bytes], on_stored: OnStored) -> None:
    """Pass committed keys to ``on_stored`` in groups: whatever landed while the last call ran.
    A failing ``on_stored`` is logged and the transfer goes on (the blocks are stored anyway)."""
    async with stored:
        async for k in stored:
            group = [k]
            while True:
                try:
                    group.append(stored.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await on_stored(group)
            except Exception:
                log.exception("on_stored failed; the fetch goes on", extra={"fields": {"keys": len(group)}})


# Sealed block bytes move in groups of about this many bytes (at least one block each): one
# group is sealed (or opened) in a worker thread while the one before it (or after it) is on
# the wire, so the cipher and the socket overlap, and a big batch never needs a second copy of
# itself in memory (two groups at most).
_SEAL_GROUP_BYTES = 2 << 20
_SEAL_THREAD_BYTES = 256 << 10


def _groups(lengths: list[int]) -> list[range]:
    out: list[range] = []
    start, acc = 0, 0
    for i, n in enumerate(lengths):
        if acc and acc + n > _SEAL_GROUP_BYTES:
            out.append(range(start, i))
            start, acc = i, 0
        acc += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


async def _maybe_thread(fn: Callable[[], Any], nbytes: int) -> Any:
    if nbytes >= _SEAL_THREAD_BYTES:
        return await trio.to_thread.run_sync(fn)
    return fn()


async def _both(first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None]]) -> None:
    """Run two steps at once; the first error of either is raised as is (not in a group)."""
    try:
        async with trio.open_nursery() as n:
            n.start_soon(first)
            await second()
    except BaseExceptionGroup as eg:
        plain = [e for e in eg.exceptions if not isinstance(e, trio.Cancelled)]
        if len(plain) == 1 and not isinstance(plain[0], BaseExceptionGroup):
            raise plain[0] from None
        raise


async def _send_sealed(chan: Channel, session: Session, views: list[memoryview]) -> None:
    """Seal each block (AES-GCM, its own nonce) and send the ciphertexts: group i+1 is sealed
    while group i is sent."""
    groups = _groups([len(v) for v in views])

    def sealer(g: range) -> Callable[[], list[memoryview]]:
        return lambda: [memoryview(session.seal_block(views[i])) for i in g]

    def size(g: range) -> int:
        return sum(len(views[i]) for i in g)

    sealed: list[memoryview] = await _maybe_thread(sealer(groups[0]), size(groups[0])) if groups else []
    for gi in range(len(groups)):
        now, nxt = sealed, gi + 1
        if nxt == len(groups):
            await chan.send_blocks(now)
            break

        async def send(now: list[memoryview] = now) -> None:
            await chan.send_blocks(now)

        async def seal_next(g: range = groups[nxt]) -> None:
            nonlocal sealed
            sealed = await _maybe_thread(sealer(g), size(g))

        await _both(send, seal_next)


async def _recv_sealed(
    chan: Channel, session: Session, targets: list[memoryview | int], on_block: Callable[[int, int], None] | None
) -> list[int]:
    """Receive sealed blocks group by group, open each into its target (the arena slice) and
    hash it, group i being opened while group i+1 arrives; same contract as
    ``Channel.recv_blocks``. ``FrameAuthError`` when one fails to open."""
    lengths = [t if isinstance(t, int) else len(t) for t in targets]
    digests: list[int] = []

    def buffers(g: range) -> list[memoryview | int]:
        return [
            memoryview(bytearray(lengths[i] + TAG_BYTES)) if not isinstance(targets[i], int)
            else lengths[i] + TAG_BYTES
            for i in g
        ]  # fmt: skip

    async def open_group(g: range, wire: list[memoryview | int]) -> None:
        def open_all() -> list[int]:
            out = []
            for i, w in zip(g, wire, strict=True):
                t = targets[i]
                if isinstance(t, int) or isinstance(w, int):
                    session.open_block_into(None, None)
                    out.append(0)
                else:
                    session.open_block_into(w, t)
                    out.append(xxhash.xxh3_64_intdigest(t))
            return out

        for i, d in zip(g, await _maybe_thread(open_all, sum(lengths[i] for i in g)), strict=True):
            digests.append(d)
            if on_block is not None:
                on_block(i, d)

    prev: tuple[range, list[memoryview | int]] | None = None
    for g in _groups(lengths):
        wire = buffers(g)

        async def receive(wire: list[memoryview | int] = wire) -> None:
            await chan.recv_blocks(wire)

        if prev is None:
            await receive()
        else:

            async def open_prev(prev: tuple[range, list[memoryview | int]] = prev) -> None:
                await open_group(*prev)

            await _both(open_prev, receive)
        prev = (g, wire)
    if prev is not None:
        await open_group(*prev)
    return digests


class _StaleConnection(Exception):
    """The peer closed before answering: a pooled connection may simply have gone stale."""


def _batch_problem(keys: list[bytes]) -> str:
    if len(keys) > MAX_BATCH:
        return f"{len(keys)} keys in one request; the limit is {MAX_BATCH}"
    for i, k in enumerate(keys):
        if len(k) != KEY_BYTES:
            return f"key {i} is {len(k)} bytes; keys are {KEY_BYTES} bytes"
    if len(set(keys)) != len(keys):
        return "the same key appears twice in one request"
    return ""


def _check_batch(keys: list[bytes]) -> None:
    bad = _batch_problem(keys)
    if bad:
        raise ValueError(bad)


def _stored_checksum(store: BlockStore, key: bytes, loc: tuple[int, int]) -> int:
    """The checksum recorded when the block was put (so corruption at rest is caught too)."""
    recorded = store.dram_checksum(key, loc[0])
    if recorded is not None:
        return recorded
    with store.arena.slice(loc[0], loc[1]) as view:
        return xxhash.xxh3_64_intdigest(view)
