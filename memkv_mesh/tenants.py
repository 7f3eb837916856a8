"""Tenants: who a local client is, and the key space it lives in.

Theory of operation
-------------------
* A tenant is declared in ``mesh.toml`` (``[[tenants]]``: a name, the uids and gids allowed, its
  DRAM quota). The daemon learns who is connecting from the socket itself (``SO_PEERCRED``: pid,
  uid, gid), never from the client's word: ``Tenants.resolve(uid, gid)`` maps the uid first, then
  the primary gid, to a tenant. With no tenants declared every peer that can connect (the socket
  is mode 0660) is the tenant ``default``: single-tenant use needs no configuration.
* A peer that matches no declared tenant is refused, except the *operator* (uid 0 or the daemon's
  own uid), which may ask for statistics and members but names no blocks.
* Keys are scoped per tenant: the daemon never uses a client's key as it is, only
  ``Tenant.scope(keys)``, a one-way function of (tenant, key), Matyas-Meyer-Oseas over AES-128
  (``E_t(m) xor m`` per 16-byte half, ``t`` derived from the tenant's name). The scoped key is what
  the store, the directory, replication and remote fetches see, so a block carries its tenant
  mesh-wide without any field for it: two tenants' same 32-byte key names two blocks, and a
  client can only ever name keys of its own tenant (reaching another tenant's block would need an
  AES preimage). Tenant names are not secrets. One AES call per request batch: ~5 us for one key,
  ~20 us for 64 (``cryptography``'s OpenSSL AES-NI), against ~1 us per key for keyed BLAKE2.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from memkv_mesh.keys import KEY_BYTES

if TYPE_CHECKING:
    from memkv_mesh.config import Config

__all__ = ["OPERATOR", "Tenant", "Tenants", "scope_keys"]

OPERATOR = "_operator"


class Tenant:
    """One tenant: its name, its arena segment and its key scope."""

    __slots__ = ("_enc", "conns", "name", "segment")

    def __init__(self, name: str, segment: int) -> None:
        self.name = name
        self.segment = segment  # index into the arena's segments
        self.conns: set[object] = set()  # its live connections (for the per-tenant caps)
        key = hashlib.blake2b(name.encode(), digest_size=16, person=b"memkv-tenant").digest()
        self._enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def scope(self, keys: Sequence[bytes]) -> list[bytes]:
        """The internal (mesh-wide) keys of this tenant's ``keys`` (each KEY_BYTES long)."""
        if not keys:
            return []
        plain = b"".join(keys)
        if len(plain) != len(keys) * KEY_BYTES:
            raise ValueError(f"keys are {KEY_BYTES} bytes")
        enc = self._enc.update(plain)
        mixed = (np.frombuffer(enc, np.uint64) ^ np.frombuffer(plain, np.uint64)).tobytes()
        return [mixed[i : i + KEY_BYTES] for i in range(0, len(mixed), KEY_BYTES)]

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"


class Tenants:
    """The node's tenants and who may connect as which."""

    def __init__(self, config: Config) -> None:
        segments = config.tenant_segments()
        self.declared = bool(config.tenants)
        index = {name: i for i, (name, _) in enumerate(segments)}
        if not self.declared:
            self.all = [Tenant("default", 0)]
        else:
            self.all = [Tenant(t.name, index[t.name]) for t in config.tenants]
        self._by_uid: dict[int, Tenant] = {}
        self._by_gid: dict[int, Tenant] = {}
        for t, tc in zip(self.all, config.tenants, strict=False):
            self._by_uid.update(dict.fromkeys(tc.uids, t))
            self._by_gid.update(dict.fromkeys(tc.gids, t))
        self._operators = {0, os.geteuid()}

    def resolve(self, uid: int, gid: int) -> Tenant | str | None:
        """The tenant of a peer, ``OPERATOR``, or None (refused)."""
        if not self.declared:
            return self.all[0]
        t = self._by_uid.get(uid) or self._by_gid.get(gid)
        if t is not None:
            return t
        return OPERATOR if uid in self._operators else None


_scopes: dict[str, Tenant] = {}


def scope_keys(keys: Sequence[bytes], tenant: str = "default") -> list[bytes]:
    """The internal keys a daemon stores ``tenant``'s ``keys`` under (tests and tools that look
    into a store or the mesh directly; clients never need them)."""
    t = _scopes.get(tenant)
    if t is None:
        t = _scopes[tenant] = Tenant(tenant, 0)
    return t.scope(keys)
