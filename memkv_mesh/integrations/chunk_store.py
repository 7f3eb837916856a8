"""What the LMCache connector does, without LMCache: named chunks in a memkv-mesh daemon.

Theory of operation
-------------------
* An engine-side cache (LMCache) names each chunk with a string that already identifies the whole
  prefix (model, world size, worker, chained chunk hash, dtype, tags). ``ChunkStore.key`` maps that
  name to a 32-byte memkv key: ``BLAKE2b-256(key=namespace, person="memkv-lmcache-v1", name)``.
  The hash is keyed and deterministic, so every process on every node maps a name to the same key
  (never Python's ``hash()``); the namespace keeps tenants apart.
* A stored chunk is one block: an optional header (the engine's own chunk metadata, fixed size)
  followed by the payload bytes. ``put`` builds the block in one buffer and stores it with one
  ``put_many``; ``get_into`` reads the block in place (a zero-copy lease) and copies the payload
  straight into the engine's buffer, so the payload is copied once on each side.
* ``prefix_hits`` is the engine's batched "how many leading chunks are cached" question: one
  ``lookup`` round trip to the local daemon, answered from its index.
* The daemon indexes 32-byte hashes, not names, so it cannot list names. ``names()`` lists the
  names this process stored or found that are still present; that is all a client can know.

Public API: ``ChunkStore``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from memkv_mesh.client import Client
from memkv_mesh.keys import KEY_BYTES, namespace

__all__ = ["ChunkStore"]

_PERSON = b"memkv-lmcache-v1"


class ChunkStore:
    """Named chunks in the local daemon, with a fixed-size header before each payload."""

    def __init__(self, client: Client, *, tenant: str = "", header_bytes: int = 0) -> None:
        if header_bytes < 0:
            raise ValueError(f"header_bytes must be >= 0, got {header_bytes}")
        self.client = client
        self.header_bytes = header_bytes
        self.ns = namespace("lmcache", tenant=tenant)
        self._names: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def key(self, name: str) -> bytes:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a chunk name must be a non-empty string, got {name!r}")
        return hashlib.blake2b(name.encode(), digest_size=KEY_BYTES, key=self.ns, person=_PERSON).digest()

    def _remember(self, keys: Sequence[bytes], names: Sequence[str]) -> None:
        with self._lock:
            self._names.update(zip(keys, names, strict=True))

    # ---- queries -------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.client.contains([self.key(name)])[0]

    def prefix_hits(self, names: Sequence[str]) -> int:
        """How many leading chunks of ``names`` the daemon holds (one round trip)."""
        if not names:
            return 0
        return self.client.lookup([self.key(n) for n in names])

    def names(self) -> list[str]:
        """Names this process stored or found that the daemon still holds."""
        with self._lock:
            items = list(self._names.items())
        if not items:
            return []
        present = self.client.contains([k for k, _ in items])
        with self._lock:
            for (k, _), p in zip(items, present, strict=True):
                if not p:
                    self._names.pop(k, None)
        return [n for (_, n), p in zip(items, present, strict=True) if p]

    # ---- data ----------------------------------------------------------------------------------
    def put(self, name: str, payload: Any, header: bytes = b"") -> bool:
        """Store one chunk; False if it was already stored."""
        return self.put_many([name], [payload], [header]) == 1

    def put_many(self, names: Sequence[str], payloads: Sequence[Any], headers: Sequence[bytes] | None = None) -> int:
        """Store chunks (one round trip pair); returns how many were new."""
        if len(names) != len(payloads):
            raise ValueError(f"{len(names)} names but {len(payloads)} payloads")
        hdrs = list(headers) if headers is not None else [b""] * len(names)
        if len(hdrs) != len(names):
            raise ValueError(f"{len(names)} names but {len(hdrs)} headers")
        keys = [self.key(n) for n in names]
        blocks: list[Any] = []
        for i, (p, h) in enumerate(zip(payloads, hdrs, strict=True)):
            if len(h) != self.header_bytes:
                raise ValueError(f"header {i} is {len(h)} bytes; this store's headers are {self.header_bytes}")
            view = memoryview(p).cast("B")
            if not h:
                blocks.append(view)
                continue
            block = np.empty(len(h) + view.nbytes, dtype=np.uint8)
            block[: len(h)] = np.frombuffer(h, dtype=np.uint8)
            block[len(h) :] = np.frombuffer(view, dtype=np.uint8)
            blocks.append(block)
        n = self.client.put_many(keys, blocks)
        self._remember(keys, names)
        return n

    def get_into(
        self,
        names: Sequence[str],
        make_buffer: Callable[[int, memoryview, int], Any],
    ) -> list[Any]:
        """Read chunks in one round trip, copying each payload into a buffer the caller makes.

        ``make_buffer(i, header, payload_len)`` returns ``(buffer, result)``: a writable buffer of at
        least ``payload_len`` bytes and what to return for chunk i, or None to treat the chunk as a
        miss. Returns one result per name, None for a miss; the header view is only valid inside
        the call.
        """
        keys = [self.key(n) for n in names]
        out: list[Any] = [None] * len(names)
        if not keys:
            return out
        with self.client.get_many(keys) as lease:
            for i, view in enumerate(lease.views):
                if view is None or view.nbytes < self.header_bytes:
                    continue
                header = view[: self.header_bytes]
                plen = view.nbytes - self.header_bytes
                made = make_buffer(i, header, plen)
                header.release()
                if made is None:
                    continue
                buf, result = made
                dst = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
                if dst.nbytes < plen:
                    raise ValueError(f"buffer {i} holds {dst.nbytes} bytes; chunk {names[i]!r} has {plen}")
                src = view[self.header_bytes :]
                np.copyto(dst[:plen], np.frombuffer(src, dtype=np.uint8))
                src.release()
                out[i] = result
        self._remember([k for k, r in zip(keys, out, strict=True) if r is not None],
                       [n for n, r in zip(names, out, strict=True) if r is not None])  # fmt: skip
        return out

    def delete(self, names: Sequence[str]) -> int:
        keys = [self.key(n) for n in names]
        with self._lock:
            for k in keys:
                self._names.pop(k, None)
        return self.client.delete(keys) if keys else 0
