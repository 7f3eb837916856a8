"""Lifeguard's dynamic suspicion timeout (one ``Suspicion`` per suspected member).

Theory of operation
-------------------
When a member is suspected, every node that hears of it starts its own timer. The timeout starts
at ``max_timeout`` and shrinks toward ``min_timeout`` as *independent confirmations* arrive
(suspect messages about the same incarnation from nodes other than those already counted):

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

where ``k`` is the number of confirmations expected to reach ``min``. A real failure is noticed by
many probers quickly, so its timeout collapses to ``min``; a false suspicion (a lost packet, a
slow node) rarely gets confirmations, so it waits near ``max`` and the suspect has a long time to
refute. With ``k < 1`` the timeout is simply ``min``.

``confirm`` returns True only for a new confirmation, which is when the suspect message should be
re-broadcast (so confirmations spread without echoing duplicates). ``conclude`` counts another
live member's death verdict (its own timer ran out): as many confirmations as it takes, so the
timer is at ``min`` from its own start (``gossip/swim.py`` never lets the verdict kill directly).

Public API: ``Suspicion``, ``suspicion_timeouts``.
"""

from __future__ import annotations

import math


def suspicion_timeouts(
    mult: float, max_mult: float, n: int, probe_interval: float, log_base: float = 10.0
) -> tuple[float, float]:
    """(min, max) suspicion timeout for a mesh of ``n`` members (memberlist's formula)."""
    scale = max(1.0, math.log(max(1, n), log_base))
    lo = mult * scale * probe_interval
    return lo, max_mult * lo


class Suspicion:
    __slots__ = ("start", "k", "min_timeout", "max_timeout", "confirmers", "n", "deadline")

    def __init__(
        self, start: float, k: int, min_timeout: float, max_timeout: float, first_from: str
    ) -> None:
        if min_timeout <= 0 or max_timeout < min_timeout:
            raise ValueError(f"bad suspicion timeouts: min={min_timeout} max={max_timeout}")
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.confirmers: set[str] = {first_from}
        self.n = 0
        self.deadline = start + self.timeout()

    def timeout(self) -> float:
        if self.k < 1:
            return self.min_timeout
        frac = math.log(self.n + 1) / math.log(self.k + 1)
        return max(self.min_timeout, self.max_timeout - (self.max_timeout - self.min_timeout) * frac)

    def confirm(self, source: str) -> bool:
        """Count an independent confirmation; True if it was new (re-broadcast it then)."""
        if self.n >= self.k or source in self.confirmers:
            return False
        self.confirmers.add(source)
        self.n += 1
        self.deadline = self.start + self.timeout()
        return True

    def conclude(self, source: str) -> bool:
        """A live member's verdict: fully confirmed, the deadline is ``start + min_timeout``."""
        self.confirmers.add(source)
        if self.n >= self.k:
            return False  # already at the minimum: nothing to re-broadcast
        self.n = self.k
        self.deadline = self.start + self.timeout()
        return True
