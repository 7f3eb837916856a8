"""Lifeguard's local health awareness (LHA).

Theory of operation
-------------------
A node that is itself slow (CPU starved, GC pauses, overloaded NIC) sees its probes fail and would
wrongly suspect healthy peers. LHA keeps a *health score* in ``[0, max_score)``: it goes up when a
probe fails without the expected nacks from the indirect helpers (if helpers could not even nack
us, the problem is likely local), when we must refute a suspicion about ourselves, and goes down
by one on every successful direct probe. Probe interval and probe timeout are multiplied by
``score + 1``, so a node in poor health probes more slowly and waits longer before suspecting.

Public API: ``Awareness``.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("max_score", "score")

    def __init__(self, max_score: int) -> None:
        if max_score < 1:
            raise ValueError(f"awareness max_score must be >= 1, got {max_score}")
        self.max_score = max_score
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(self.max_score - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
