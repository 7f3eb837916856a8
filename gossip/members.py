"""The member table entry and the shuffled round-robin probe order.

Theory of operation
-------------------
``Member`` is this node's view of one peer: address, metadata, incarnation, state and when the
state last changed. The incarnation is only ever raised by its owner (to refute or to publish new
metadata); everyone else adopts the highest one they hear with the precedence rules in
``gossip/swim.py``.

``ProbeOrder`` gives SWIM's time-bounded completeness: targets are taken round-robin from a list
that is reshuffled at the end of every pass, so every member is probed once per pass (within N
probe periods) while the order stays unpredictable. New members are inserted at a random position
of the current pass. Dead/left members are skipped.

Public API: ``Member``, ``ProbeOrder``.
"""

from __future__ import annotations

import random

from gossip.messages import STATE_ALIVE, STATE_SUSPECT, WireMeta


class Member:
    __slots__ = ("node", "addr", "meta", "inc", "state", "since")

    def __init__(
        self, node: str, addr: str, meta: WireMeta, inc: int, state: int, since: float
    ) -> None:
        self.node = node
        self.addr = addr
        self.meta = meta
        self.inc = inc
        self.state = state
        self.since = since

    @property
    def live(self) -> bool:
        return self.state == STATE_ALIVE or self.state == STATE_SUSPECT


class ProbeOrder:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._order: list[str] = []
        self._pos = 0

    def add(self, node: str) -> None:
        pos = self._rng.randint(self._pos, len(self._order))
        self._order.insert(pos, node)

    def next(self, members: dict[str, Member], self_id: str) -> Member | None:
        """Next live member to probe, or None if there is none."""
        for _ in range(2):
            while self._pos < len(self._order):
                node = self._order[self._pos]
                self._pos += 1
                m = members.get(node)
                if m is not None and node != self_id and m.live:
                    return m
            # end of a pass: rebuild from the table (drops reaped nodes) and reshuffle
            self._order = [n for n, m in members.items() if n != self_id and m.live]
            self._rng.shuffle(self._order)
            self._pos = 0
        return None
