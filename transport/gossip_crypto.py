"""Mesh-key encryption of gossip packets and streams (AES-GCM), with a keyring and replay guard.

Theory of operation
-------------------
Every datagram and every stream frame is sealed with AES-GCM under the mesh key::

    version (1 byte) | nonce (12 bytes) | ciphertext | tag (16 bytes)

so a sealed message costs exactly ``OVERHEAD`` = 29 bytes more than its msgpack plaintext (the
simulator counts the same figure). The version byte and a channel label ("udp" / "tcp", not sent)
are authenticated as associated data, so a datagram cannot be replayed into a stream or the
other way round.

Keyring: the first key encrypts, every key decrypts (trial decryption, newest first). To rotate:
add the new key second on every node, then move it first everywhere, then drop the old one.

The nonce is ``ms timestamp (6 bytes) | counter (2 bytes) | random boot id (4 bytes)``: unique per
sender (monotonic time + counter) and across senders (random boot id), and it tells the receiver
when the message was sealed, authenticated by the tag at no extra byte. ``ReplayGuard`` drops a
message sealed more than ``window_s`` away from the receiver's clock, and any nonce already seen
within the window. With the core keeping dead/left members as tombstones for longer than the
window, a replayed old ``Alive`` can never resurrect a dead node or undo a leave (and the
incarnation rules of ``gossip/swim.py`` already refuse it inside the window). Clocks of mesh
nodes must agree within ``window_s`` (NTP does far better); the driver logs each peer whose
messages arrive outside the window with the skew in ms and shows it in its statistics
(``clock_skew``), so a node cut off by its clock says why.

Unkeyed ("insecure") mode uses version byte 0 and no encryption; keyed and unkeyed nodes drop
each other's traffic.

Public API: ``Keyring``, ``Sealer``, ``ReplayGuard``, ``OVERHEAD``, ``CryptoError``,
``parse_keys``, ``CHANNEL_UDP``, ``CHANNEL_TCP``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections import deque

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION_AESGCM = 1
VERSION_PLAIN = 0
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
CHANNEL_UDP = b"memkv-gossip/udp"
CHANNEL_TCP = b"memkv-gossip/tcp"


class CryptoError(ValueError):
    """A message that cannot be opened (no key fits, malformed, stale or replayed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "bad_key" | "malformed" | "replay" | "stale" | "plain"


def parse_keys(keys: list[str], field: str = "gossip.keys") -> list[bytes]:
    """Decode base64 AES keys (16, 24 or 32 bytes), naming the bad one."""
    out: list[bytes] = []
    for i, k in enumerate(keys):
        try:
            raw = base64.b64decode(k, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{field}[{i}]: not valid base64") from None
        if len(raw) not in (16, 24, 32):
            raise ValueError(
                f"{field}[{i}]: an AES key must be 16, 24 or 32 bytes, got {len(raw)} "
                "(make one with: python -c \"import os,base64;"
                "print(base64.b64encode(os.urandom(32)).decode())\")"
            )
        out.append(raw)
    return out


class Keyring:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        for k in keys:
            if len(k) not in (16, 24, 32):
                raise ValueError(f"an AES key must be 16, 24 or 32 bytes, got {len(k)}")
        self._aeads = [AESGCM(k) for k in keys]

    @property
    def primary(self) -> AESGCM:
        return self._aeads[0]

    @property
    def all(self) -> list[AESGCM]:
        return self._aeads


class Sealer:
    """Seals and opens messages; ``keyring=None`` means unkeyed (insecure) mode."""

    def __init__(self, keyring: Keyring | None, *, boot_id: bytes | None = None) -> None:
        self.keyring = keyring
        self._boot = boot_id if boot_id is not None else os.urandom(4)
        if len(self._boot) != 4:
            raise ValueError("boot_id must be 4 bytes")
        self._last_ms = 0
        self._counter = 0

    @property
    def overhead(self) -> int:
        return OVERHEAD if self.keyring is not None else 1

    def _nonce(self, now_ms: int) -> bytes:
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._counter = 0
        else:
            self._counter += 1
            if self._counter > 0xFFFF:
                self._last_ms += 1
                self._counter = 0
        return self._last_ms.to_bytes(6, "big") + self._counter.to_bytes(2, "big") + self._boot

    def seal(self, plaintext: bytes, channel: bytes, now_ms: int) -> bytes:
        if self.keyring is None:
            return bytes((VERSION_PLAIN,)) + plaintext
        nonce = self._nonce(now_ms)
        head = bytes((VERSION_AESGCM,))
        return head + nonce + self.keyring.primary.encrypt(nonce, plaintext, head + channel)

    def open(self, data: bytes, channel: bytes) -> tuple[bytes, int | None, bytes | None]:
        """(plaintext, sealing time in ms, nonce); raises CryptoError."""
        if not data:
            raise CryptoError("malformed", "empty message")
        version = data[0]
        if self.keyring is None:
            if version != VERSION_PLAIN:
                raise CryptoError("bad_key", "encrypted message but this node has no mesh key")
            return data[1:], None, None
        if version != VERSION_AESGCM:
            raise CryptoError(
                "plain" if version == VERSION_PLAIN else "malformed",
                f"unencrypted or unknown envelope version {version}",
            )
        if len(data) < OVERHEAD:
            raise CryptoError("malformed", f"message of {len(data)} bytes is too short")
        nonce = data[1 : 1 + NONCE_SIZE]
        aad = data[:1] + channel
        body = data[1 + NONCE_SIZE :]
        for aead in self.keyring.all:
            try:
                plain = aead.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
            return plain, int.from_bytes(nonce[:6], "big"), nonce
        raise CryptoError("bad_key", "no key in the keyring opens this message")


class ReplayGuard:
    """Drops authenticated messages sealed outside ``window_s`` or seen before."""

    def __init__(self, window_s: float = 30.0, max_entries: int = 200_000) -> None:
        if window_s <= 0:
            raise ValueError(f"replay window must be > 0, got {window_s}")
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._order: deque[tuple[int, bytes]] = deque()

    def check(self, nonce: bytes, sealed_ms: int, now_ms: int) -> None:
        if abs(now_ms - sealed_ms) > self.window_ms:
            raise CryptoError(
                "stale", f"message sealed {(now_ms - sealed_ms) / 1000:.1f} s away from our clock"
            )
        order = self._order
        horizon = now_ms - self.window_ms
        while order and (order[0][0] < horizon or len(order) >= self.max_entries):
            self._seen.discard(order.popleft()[1])
        if nonce in self._seen:
            raise CryptoError("replay", "message already seen (replay)")
        self._seen.add(nonce)
        order.append((max(sealed_ms, now_ms), nonce))
