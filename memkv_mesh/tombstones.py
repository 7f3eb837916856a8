"""Tombstones: the keys deleted mesh-wide lately, so a stale replica never brings one back.

Theory of operation
-------------------
* A mesh-wide delete (``Mesh.delete``) removes a block from this node, its owners and every
  holder the directory names; each node it reaches records the key here for ``ttl_s`` seconds.
  ``ttl_s`` must outlive the replication lag and any push still in flight (a push of a tombstoned
  key is refused with ``DELETED``, and the pusher then deletes its own copy too), and the time a
  node can be away and come back with an old copy (a node that rejoins is sent every live
  tombstone, so it drops what it should no longer hold).
* A put after a delete wins: the node it was put on lifts its tombstone and replicates it as
  *fresh*, which owners accept over their tombstones (a repair or hand-off push is not fresh and
  is refused). So an acknowledged put is never lost to an older delete.
* Bounded: at most ``max_entries`` keys; past that the oldest tombstones go first (counted). A
  tombstone that expired or was pushed out no longer protects its key: a copy that missed the
  delete can then serve again. The cap is a memory bound (about 200 bytes per key in CPython).
* Time is whatever clock the caller passes (Trio's in the daemon); expired tombstones go at the
  next ``add`` or ``expire`` (the mesh calls it from its periodic loop). Nothing here blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["Tombstones"]


class Tombstones:
    def __init__(self, ttl_s: float, max_entries: int) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()  # key -> expiry, oldest first
        self.pushed_out = 0  # tombstones dropped early by the cap

    def add(self, keys: Iterable[bytes], now: float) -> None:
        self.expire(now)
        until = now + self.ttl_s
        d = self._until
        for k in keys:
            d[k] = until
            d.move_to_end(k)
        while len(d) > self.max_entries:
            d.popitem(last=False)
            self.pushed_out += 1

    def discard(self, keys: Iterable[bytes]) -> None:
        """Lift tombstones: the keys were put again (a put after a delete is newer than it)."""
        d = self._until
        if d:
            for k in keys:
                d.pop(k, None)

    def expire(self, now: float) -> None:
        d = self._until
        while d:
            k, until = next(iter(d.items()))
            if until > now:
                break
            del d[k]

    def __contains__(self, key: object) -> bool:
        return key in self._until

    def __len__(self) -> int:
        return len(self._until)

    def __bool__(self) -> bool:
        return bool(self._until)

    def any_of(self, keys: Sequence[bytes]) -> list[bool]:
        d = self._until
        return [k in d for k in keys]

    def live(self) -> list[bytes]:
        """Every tombstoned key, oldest first (what a rejoining node is sent)."""
        return list(self._until)
