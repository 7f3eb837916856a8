"""Transmit-limited broadcast queue for piggybacked dissemination.

Theory of operation
-------------------
Each pending membership update is retransmitted at most ``retransmit_mult * ceil(log10(N + 1))``
times (memberlist's limit), enough for epidemic spread to reach every member with high probability
while the per-update cost stays logarithmic. There is at most one pending update per node: a newer
update about a node replaces (invalidates) the older one. When a packet has room, updates with the
fewest transmissions go first (newest first among equals), and an update about the packet's
destination itself (e.g. "you are suspected") is put first so the subject can refute quickly.

Sizes are the msgpack sizes of each update, computed once on enqueue.

Public API: ``BroadcastQueue``.
"""

from __future__ import annotations

import math

from gossip.messages import Update, encoded_size


class _Item:
    __slots__ = ("update", "size", "transmits", "order")

    def __init__(self, update: Update, size: int, order: int) -> None:
        self.update = update
        self.size = size
        self.transmits = 0
        self.order = order


class BroadcastQueue:
    def __init__(self, retransmit_mult: int) -> None:
        if retransmit_mult < 1:
            raise ValueError(f"retransmit_mult must be >= 1, got {retransmit_mult}")
        self.retransmit_mult = retransmit_mult
        self._items: dict[str, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def limit(self, n_members: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n_members + 1)))

    def queue(self, update: Update) -> None:
        self._order += 1
        self._items[update.node] = _Item(update, encoded_size(update), self._order)

    def transmits(self, node: str) -> int | None:
        """How many times the pending update about ``node`` was sent (None: none pending)."""
        item = self._items.get(node)
        return item.transmits if item is not None else None

    def pending(self, node: str) -> Update | None:
        item = self._items.get(node)
        return item.update if item is not None else None

    def take(self, budget: int, n_members: int, dest: str | None = None) -> tuple[Update, ...]:
        """Updates that fit in ``budget`` bytes, counting one transmission for each."""
        if not self._items or budget <= 0:
            return ()
        limit = self.limit(n_members)
        items = self._items
        chosen: list[_Item] = []
        first = items.get(dest) if dest is not None else None
        if first is not None and first.size <= budget:
            chosen.append(first)
            budget -= first.size
        if len(items) > len(chosen):
            for item in sorted(items.values(), key=lambda it: (it.transmits, -it.order)):
                if item is first:
                    continue
                if item.size <= budget:
                    chosen.append(item)
                    budget -= item.size
                    if budget < 8:
                        break
        for item in chosen:
            item.transmits += 1
            if item.transmits >= limit:
                del items[item.update.node]
        return tuple(it.update for it in chosen)

    def clear(self) -> None:
        self._items.clear()
