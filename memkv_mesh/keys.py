"""Chained 32-byte block keys built from token ids and a namespace.

``key_i = BLAKE2b-256(key=namespace, person=b"memkv-block-v1", data=key_{i-1} || tokens_i)`` where
``key_{-1}`` is 32 zero bytes and ``tokens_i`` are chunk i's token ids as little-endian uint32. A
key therefore names a whole prefix: two prompts share key i exactly when they share their first
(i + 1) * block_tokens tokens and their namespace. The hash is keyed and deterministic, so every
process on every node agrees without PYTHONHASHSEED (never Python's ``hash()``).

The namespace is itself a 32-byte BLAKE2b digest of the model id, the KV layout (dtype, tensor-
parallel rank and size, layer range) and the tenant, so blocks of different models, layouts or
tenants never mix. Only whole chunks get keys: a trailing partial chunk is recomputed by the engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["KEY_BYTES", "ROOT", "Namespace", "block_keys", "namespace"]

KEY_BYTES = 32
ROOT = bytes(KEY_BYTES)
_PERSON = b"memkv-block-v1"
_NS_PERSON = b"memkv-ns-v1"

Namespace = bytes


def namespace(
    model: str,
    *,
    dtype: str = "",
    tp_rank: int = 0,
    tp_size: int = 1,
    layers: str = "",
    tenant: str = "",
) -> Namespace:
    """The 32-byte namespace of a model + KV layout + tenant."""
    if not model:
        raise ValueError("namespace needs a model id")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank} tp_size={tp_size}")
    fields = [model, dtype, str(tp_rank), str(tp_size), layers, tenant]
    for name, value in zip(("model", "dtype", "tp_rank", "tp_size", "layers", "tenant"), fields, strict=True):
        if "\x00" in value:
            raise ValueError(f"namespace field {name} may not contain NUL")
    return hashlib.blake2b(
        "\x00".join(fields).encode(), digest_size=KEY_BYTES, person=_NS_PERSON
    ).digest()


def block_keys(
    tokens: Sequence[int] | np.ndarray,
    ns: Namespace,
    *,
    block_tokens: int = 256,
    parent: bytes = ROOT,
) -> list[bytes]:
    """Keys of every whole ``block_tokens`` chunk of ``tokens``, chained from ``parent``.

    ``parent`` lets a caller continue a chain (the key of the last block it already has).
    """
    if len(ns) != KEY_BYTES:
        raise ValueError(f"namespace must be {KEY_BYTES} bytes (use keys.namespace()), got {len(ns)}")
    if len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must be in [0, 2**32)")
    data = arr.astype("<u4", copy=False).tobytes()
    step = block_tokens * 4
    out: list[bytes] = []
    prev = parent
    for start in range(0, (len(arr) // block_tokens) * step, step):
        prev = hashlib.blake2b(
            prev + data[start : start + step], digest_size=KEY_BYTES, key=ns, person=_PERSON
        ).digest()
        out.append(prev)
    return out
