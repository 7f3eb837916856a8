"""Configuration of the mesh data plane (the ``[dataplane]`` table of ``mesh.toml``).

Every field says why its default is what it is. The Struct is frozen and refuses unknown fields,
so a typo in ``mesh.toml`` is an error naming the field, never a silently ignored setting.
``validate()`` checks what the types cannot (ranges, base64 keys) and raises ``ValueError``
naming the field; ``keyring()`` decodes the keys once.

Keys: the gossip keyring's format, a list of base64 strings of 16, 24 or 32 random bytes (the same
list can serve both layers; the data plane derives its own HMAC keys from them). The first key is
the one this node uses when it connects; every key in the list is accepted from peers, so a key
is rotated by adding the new key second everywhere, then moving it first everywhere, then
removing the old one.
Generate one with ``python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Literal

import msgspec

from transport.gossip_crypto import parse_keys

__all__ = ["DataPlaneConfig", "decode_keys"]

_DERIVE_LABEL = b"memkv-mesh dataplane hmac key v1"


class DataPlaneConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # "auto" takes UCX only where it brings what plain sockets cannot (RDMA verbs or CUDA
    # transports) and the pure-Trio TCP path otherwise: on a TCP-only host ucxx over TCP measured
    # 0.75 GB/s against 2.8-3.5 GB/s for a plain socket. "ucx" insists on UCX and fails to start if
    # it cannot (never a silent fall back); "tcp" never loads UCX.
    transport: Literal["auto", "ucx", "tcp"] = "auto"
    # Address peers reach this node's data plane on. Loopback by default so a laptop run never
    # listens on the open network; a mesh node sets its fabric/cluster address.
    host: str = "127.0.0.1"
    # TCP port (or UCX listener port). 0 picks a free port, which is what tests and single-host
    # meshes want; the chosen "host:port" is what ``run`` reports and gossip advertises.
    port: int = 0
    # Mesh keys, base64 (see the module docstring). Empty is allowed only for a single node that
    # never talks to a peer: every connection attempt is then refused with a clear error.
    keys: list[str] = []
    # Transfers (fetch/push calls) in flight at once, across all peers. 8 keeps two cores busy
    # without letting a burst of re-replication pin the whole arena in pending slots.
    max_concurrent_transfers: int = 8
    # Idle connections kept per peer for reuse. Each transfer uses one connection at a time; 4
    # covers the usual parallelism towards one owner without holding many sockets per peer.
    max_connections_per_peer: int = 4
    # Seconds to open a connection and finish the authentication handshake. A LAN peer answers in
    # milliseconds; 5 s rides out a busy peer's GC pause but fails a dead one quickly. It also
    # bounds a handshake on our listener: a connection that has not authenticated by then is closed.
    connect_timeout_s: float = 5.0
    # Seconds a transfer may make no progress (no frame, no bytes) before the peer is declared
    # broken. 10 s: a 100 MiB block at 1 GB/s takes 0.1 s, so only a stalled peer hits this.
    # Also: a control frame, once its first byte has arrived, must be complete within it (slowloris).
    io_timeout_s: float = 10.0
    # Largest control frame accepted (key lists, sizes). 4 MiB holds a 65,536-key batch with room
    # to spare; anything larger is a broken or hostile peer and closes the connection.
    max_frame_bytes: int = 4 * 1024 * 1024
    # UCX: blocks at least this large are checksummed in a worker thread instead of on the Trio
    # loop. xxh3 measured 29 GB/s here, so 1 MiB is ~36 us, about what the thread hop costs (~43 us).
    # (TCP hashes big blocks in the thread that received them, so it needs no setting.)
    thread_checksum_bytes: int = 1024 * 1024
    # Seal block bytes too (AES-GCM, per-connection keys), not only the control frames. Off by
    # default: control frames are always authenticated and carry each block's checksum, so a
    # block cannot be swapped unnoticed without the mesh key, and KV blocks normally stay inside a
    # cluster fabric; sealing costs CPU at line rate (measured on this 2-core VM, 2 MiB blocks
    # over loopback TCP: see docs/dataplane.md, "Encryption") and RDMA would lose its zero copy.
    # Turn it on where the data-plane network is shared with parties that must not read prompts.
    # Either side asking for it is enough for a connection.
    encrypt_bulk: bool = False
    # Connections one listener serves at once (authenticated or not); more are closed at once.
    # Each peer keeps up to max_connections_per_peer (4) pooled connections to us plus its
    # transfers in flight, so 1024 serves a mesh of ~200 nodes; a flood cannot take more.
    max_connections: int = 1024
    # Handshakes in progress at once; at the cap the oldest is dropped to make room. A genuine
    # handshake takes a round trip (milliseconds), so 64 slots are plenty for a mesh reconnecting
    # at once, while connections that never authenticate (slowloris) can hold little and are
    # pushed out by new ones instead of locking the listener.
    max_handshakes: int = 64
    # Seconds an authenticated connection may sit without a request before the server closes
    # it. Clients pool idle connections; one closed under them is replaced transparently, so
    # 300 s only bounds what idle peers hold, it costs a reconnect every 5 minutes at most.
    idle_timeout_s: float = 300.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if not (0 <= self.port <= 65535):
            raise ValueError(f"dataplane.port must be 0-65535, got {self.port}")
        if not self.host or not re.fullmatch(r"[A-Za-z0-9_.:\-\[\]]+", self.host):
            raise ValueError(f"dataplane.host must be a host name or address, got {self.host!r}")
        for name in ("max_concurrent_transfers", "max_connections_per_peer", "max_connections", "max_handshakes"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"dataplane.{name} must be at least 1, got {v}")
        for name in ("connect_timeout_s", "io_timeout_s", "idle_timeout_s"):
            v = getattr(self, name)
            if not 0 < v < float("inf"):
                raise ValueError(f"dataplane.{name} must be > 0 seconds, got {v}")
        if not 4096 <= self.max_frame_bytes <= 64 << 20:
            # The upper bound: a peer may make a connection buffer this much after authenticating.
            raise ValueError(f"dataplane.max_frame_bytes must be 4096..64 MiB, got {self.max_frame_bytes}")
        if self.thread_checksum_bytes < 0:
            raise ValueError(
                f"dataplane.thread_checksum_bytes must be >= 0, got {self.thread_checksum_bytes}"
            )
        decode_keys(self.keys)

    def keyring(self) -> list[bytes]:
        return decode_keys(self.keys)


def decode_keys(keys: list[str]) -> list[bytes]:
    """Base64 keys -> the data plane's HMAC keys; ``ValueError`` naming the bad entry.

    The format is the gossip keyring's (``transport.gossip_crypto.parse_keys``: base64 of 16, 24
    or 32 random bytes), so one mesh key list can serve both. The data plane never uses a key
    as is: it derives its own (HMAC-SHA256 of a fixed label under the key), so the same secret
    is never used by two different algorithms (AES-GCM for gossip, HMAC here).
    """
    raw = parse_keys(keys, field="dataplane.keys")
    for i, k in enumerate(raw):
        if k in raw[:i]:
            raise ValueError(f"dataplane.keys[{i}] repeats an earlier key")
    return [hmac.new(k, _DERIVE_LABEL, hashlib.sha256).digest() for k in raw]
