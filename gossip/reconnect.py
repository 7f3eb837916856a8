"""Reconnect: how the sides of a healed partition, and a restarted node, find each other again.

Theory of operation
-------------------
SWIM probes and syncs only with live members. Once the two sides of a partition have declared
each other dead, nothing in the core would contact the other side again, and a node that restarts
on a new address is known to nobody. This module decides *whom* to re-contact and *when*; the core
(``gossip/swim.py``) contacts each pick with a join-style push-pull (its digest and its own entry),
which refutes the stale deaths on both sides and merges the two tables.

Three kinds of addresses:

- **failed members** (Serf's reconnect): members declared dead, never those that left gracefully.
  The core keeps them for ``reconnect_timeout_s`` (Serf: 24 h) instead of reaping them with the
  other tombstones. Every ``reconnect_interval_s`` a node picks one at random with probability
  ``min(1, failed / alive)`` (Serf's scaling, alive counting ourselves). Across a split into
  sides A and B each side then makes about ``min(|A|, |B|)`` attempts per interval, so a healed
  split of any shape is bridged within about one interval; in a healthy mesh with F dead members
  the whole mesh makes about F attempts per interval, whatever its size.
- **seeds** (configured, or found by mDNS): contacted at start; afterwards a seed whose address is
  not a live member's is one more candidate of the same random pick. That heals what failed
  members cannot: two halves that formed apart and never knew each other, or a split that outlived
  ``reconnect_timeout_s``. A seed that is a live member costs nothing.
- **rejoin targets**: the addresses of the members a previous process of this node knew (the
  driver's members snapshot), so that a restarted node with no seeds of its own, even on a new
  address, gets back in. Forgotten once we know another member.

While a node knows no other member (it is *alone*) it contacts every seed and rejoin target, and
one failed member, every ``join_retry_s`` instead.

With ``reconnect_interval_s = 0`` failed members are not re-contacted and seeds are retried only
while alone (the behaviour before this module).

Public API: ``Reconnect`` (``add_seeds``, ``add_rejoin``, ``failed``, ``recovered``,
``is_failed``, ``failed_count``, ``seeds``, ``next_deadline``, ``tick``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

_INF = math.inf


class Reconnect:
    def __init__(self, interval: float, join_retry: float, rng: random.Random) -> None:
        if interval < 0 or join_retry <= 0:
            raise ValueError(f"bad reconnect timings: interval {interval}, join retry {join_retry}")
        self.interval = interval
        self.join_retry = join_retry
        self._rng = rng
        self._seeds: list[str] = []
        self._rejoin: list[str] = []
        self._failed: dict[str, None] = {}  # node ids, in the order they failed
        self._next = _INF

    # ---------------------------------------------------------------- inputs

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(self._seeds)

    def add_seeds(self, addrs: Iterable[str], now: float, alone: bool) -> None:
        for a in addrs:
            if a and a not in self._seeds:
                self._seeds.append(a)
        self._arm(now, alone)

    def add_rejoin(self, addrs: Iterable[str], now: float, alone: bool) -> None:
        if not alone:
            return  # already in a mesh: failed members and seeds do the rest
        for a in addrs:
            if a and a not in self._rejoin:
                self._rejoin.append(a)
        self._arm(now, alone)

    def failed(self, node: str, now: float, alone: bool) -> None:
        """``node`` was declared dead (not left): a candidate until it recovers or is reaped."""
        if self.interval <= 0:
            return
        self._failed[node] = None
        self._arm(now, alone)

    def recovered(self, node: str) -> None:
        """``node`` is alive again, left gracefully, or was reaped: stop re-contacting it."""
        self._failed.pop(node, None)

    def is_failed(self, node: str) -> bool:
        return node in self._failed

    def failed_count(self) -> int:
        return len(self._failed)

    # ---------------------------------------------------------------- timer

    def next_deadline(self) -> float:
        return self._next

    def _arm(self, now: float, alone: bool) -> None:
        if self._next == _INF and (self._seeds or self._rejoin or self._failed):
            # a random phase, so the nodes that saw the same split do not all try at once
            period = self.join_retry if alone or self.interval <= 0 else self.interval
            self._next = now + self._rng.random() * period

    def tick(
        self,
        now: float,
        n_live: int,
        own_addr: str,
        addr_of: Callable[[str], str | None],
        live_addr: Callable[[str], bool],
    ) -> list[str]:
        """Addresses to push-pull with now. ``n_live`` counts us; ``addr_of(node)`` gives a failed
        member's address; ``live_addr(addr)`` says whether a live member has that address."""
        out: list[str] = []
        rng = self._rng
        if n_live <= 1:
            for a in (*self._seeds, *self._rejoin):
                if a != own_addr and a not in out:
                    out.append(a)
            if self._failed:
                addr = addr_of(rng.choice(list(self._failed)))
                if addr is not None and addr != own_addr and addr not in out:
                    out.append(addr)
            self._next = now + self.join_retry
        else:
            self._rejoin.clear()
            if self.interval > 0:
                pool: list[str] = []
                for node in self._failed:
                    addr = addr_of(node)
                    if addr is not None and addr != own_addr:
                        pool.append(addr)
                taken = set(pool)
                for a in self._seeds:
                    if a != own_addr and a not in taken and not live_addr(a):
                        pool.append(a)
                        taken.add(a)
                if pool and rng.random() < len(pool) / n_live:
                    out.append(rng.choice(pool))
                self._next = now + self.interval
            else:
                self._next = now + self.join_retry  # only to notice when we are alone again
        if not (self._seeds or self._rejoin or self._failed):
            self._next = _INF
        return out
