"""Bandwidth resources with FIFO contention: NICs, NVMe devices, PCIe links.

A resource serves transfers one at a time in the order they are reserved, at its full rate:
``reserve(now, nbytes)`` starts the transfer when the resource is next free and returns when it
finishes. A transfer that crosses several resources (an NVMe read, the flash NIC out, the GPU NIC
in) reserves each independently from the same start and finishes at the latest of them: the
stages stream (cut-through), so the slowest or busiest stage sets the time. The fabric core is
assumed non-blocking (full bisection), so only node edges contend.

Busy time is also binned into fixed windows for peak-utilisation figures.
"""

from __future__ import annotations

__all__ = ["Resource"]


class Resource:
    """One link or device of ``gbps`` GB/s (1e9 bytes/s). ``gbps=None`` means infinitely fast."""

    __slots__ = ("name", "_rate", "free_at", "busy_s", "bytes", "_bins", "_w")

    def __init__(self, name: str, gbps: float | None, window_s: float = 1.0) -> None:
        self.name = name
        self._rate = None if gbps is None else gbps * 1e9
        self.free_at = 0.0
        self.busy_s = 0.0
        self.bytes = 0
        self._bins: dict[int, float] = {}
        self._w = window_s

    def reserve(self, now: float, nbytes: int) -> float:
        """Queue a transfer of ``nbytes`` at ``now``; return its finish time."""
        self.bytes += nbytes
        if self._rate is None or nbytes <= 0:
            return now
        start = self.free_at if self.free_at > now else now
        dur = nbytes / self._rate
        end = start + dur
        self.free_at = end
        self.busy_s += dur
        w = self._w
        b0 = int(start / w)
        b1 = int(end / w)
        bins = self._bins
        if b0 == b1:
            bins[b0] = bins.get(b0, 0.0) + dur
        else:
            bins[b0] = bins.get(b0, 0.0) + (b0 + 1) * w - start
            for b in range(b0 + 1, b1):
                bins[b] = bins.get(b, 0.0) + w
            bins[b1] = bins.get(b1, 0.0) + end - b1 * w
        return end

    def peek(self, now: float, nbytes: int) -> float:
        """When a transfer of ``nbytes`` queued at ``now`` would finish; reserves nothing."""
        if self._rate is None or nbytes <= 0:
            return now
        return (self.free_at if self.free_at > now else now) + nbytes / self._rate

    def peak_utilisation(self) -> float:
        """Highest busy share of any window (0..1)."""
        if not self._bins:
            return 0.0
        return min(1.0, max(self._bins.values()) / self._w)

    def utilisation(self, duration_s: float) -> float:
        """Mean busy share over ``duration_s``."""
        return 0.0 if duration_s <= 0 else min(1.0, self.busy_s / duration_s)
