"""Block key fingerprints: what the directory publishes and looks up instead of keys.

A block key (32 bytes) is reduced to a 64-bit *fingerprint* ``fp = xxh3_64(key)``, deterministic
across processes (never Python's ``hash()``). Holders publish fingerprints (``gossip/directory.py``;
summaries carry their top 48 bits) and a receiver's lookup table is keyed by them
(``gossip/directory_table.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

_xxh = xxhash.xxh3_64_intdigest


def fingerprint(key: bytes) -> int:
    """The 64-bit fingerprint of a block key (deterministic across processes)."""
    return _xxh(key)


def fingerprints(keys: Iterable[bytes]) -> list[int]:
    return [_xxh(k) for k in keys]
