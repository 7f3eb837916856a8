"""Eviction policies for a node's block store tiers (DRAM arena, NVMe).

Theory of operation
-------------------
A policy only *orders* the resident blocks of one tier; it never frees anything itself. The owner
(the tier) tells it about every new block (``insert``), every hit (``touch``) and every block that
leaves for another reason (``remove``), and when the tier is over its budget it asks for victims
one at a time with ``pop_victim`` until the new block fits. ``pop_victim`` removes the victim from
the policy before returning it, so the owner's next step is to drop (or demote) exactly that block.

Rules every policy here keeps:

* ``capacity_bytes`` is the tier's budget. A policy uses it only to size its internal queues
  (S3-FIFO's small queue, ghost lists, ARC's target); it never refuses an insert. The owner decides
  when to evict, so ``resident_bytes`` may exceed the capacity between an insert and the owner's
  ``pop_victim`` loop.
* A block for which ``can_evict(key)`` is False (leased to a reader, pinned by a transfer) is
  skipped and stays resident. A skipped block is handled as the policy would handle a block that
  is in use: LRU and ARC move it to the recent end of its list, FIFO and S3-FIFO give it another
  pass through its queue (S3-FIFO keeps its frequency bits), SIEVE's hand passes it and leaves it
  exactly where it is.
  Because skipped blocks go behind the others, a few pinned blocks cost O(1) amortised per call,
  not a rescan each time. ``None`` is returned only after every resident block was offered and
  refused, which costs O(n) and only happens when everything is pinned.
* ``can_evict`` must not call back into the policy.
* Keys are any hashable value (32-byte block keys in the store, ints in the simulators); sizes are
  positive ints in the owner's unit (bytes in the store, 1 per block in the simulators).

Policies (``POLICIES``): ``lru``; ``fifo`` (a baseline); ``sieve`` (Zhang et al., NSDI'24: a FIFO
with a visited bit and a moving hand); ``s3fifo`` (Yang et al., SOSP'23: a small probationary FIFO
of ~10% of the bytes, a main FIFO with 2-bit frequencies and reinsertion, and a ghost FIFO of
recently evicted keys); ``s3fifo-adaptive`` (ours: S3-FIFO with a ghost of 4x the capacity and
the small queue's share adapted ARC-style, the default); ``arc`` (Megiddo and Modha, FAST'03, in
bytes). ``docs/eviction.md`` has their prefix-hit ratios on the Mooncake conversation trace, their
speed, and the reasons for the default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "ARCPolicy",
    "DEFAULT_POLICY",
    "EvictionPolicy",
    "EvictionStatistics",
    "FIFOPolicy",
    "LRUPolicy",
    "POLICIES",
    "S3FIFOPolicy",
    "SIEVEPolicy",
    "make_policy",
]

CanEvict = Callable[[Hashable], bool]


@dataclass(frozen=True, slots=True)
class EvictionStatistics:
    """An immutable snapshot of one policy's state and counters (for metrics and status)."""

    policy: str
    capacity_bytes: int
    entries: int
    resident_bytes: int
    inserts: int
    hits: int  # touches of resident blocks
    removes: int  # resident blocks removed by the owner
    evictions: int  # victims returned by pop_victim
    pinned_skips: int  # times a refused (pinned) block was passed over
    ghost_entries: int  # remembered evicted keys (S3-FIFO, ARC); 0 for the others
    ghost_hits: int  # inserts of a key that was still remembered as a ghost


@runtime_checkable
class EvictionPolicy(Protocol):
    """What a tier needs from an eviction policy. See the module docstring for the rules."""

    name: str

    def insert(self, key: Hashable, size: int) -> None:
        """Add a new resident block; KeyError if ``key`` is already resident."""

    def touch(self, key: Hashable) -> None:
        """Record a hit on a resident block; no-op if absent."""

    def remove(self, key: Hashable) -> None:
        """Forget a resident block the owner deleted or moved; no-op if absent."""

    def pop_victim(self, can_evict: CanEvict | None = None) -> Hashable | None:
        """Choose, remove and return the next victim, skipping refused keys; None if none."""

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    @property
    def resident_bytes(self) -> int: ...

    def statistics(self) -> EvictionStatistics: ...


def _check_capacity(capacity_bytes: int) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise TypeError(f"capacity_bytes must be an int, got {type(capacity_bytes).__name__}")
    if capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
    return capacity_bytes


def _check_size(key: Hashable, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size of block {key!r} must be an int, got {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"size of block {key!r} must be positive, got {size}")


def _already_resident(key: Hashable) -> KeyError:
    return KeyError(f"block {key!r} is already resident; use touch() for a hit")


class _Counters:
    """Bookkeeping shared by every policy: byte total and the statistics counters."""

    name: str = ""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = _check_capacity(capacity_bytes)
        self._bytes = 0
        self._inserts = 0
        self._hits = 0
        self._removes = 0
        self._evictions = 0
        self._pinned_skips = 0
        self._ghost_hits = 0

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def _ghost_entries(self) -> int:
        return 0

    def _entries(self) -> int:
        raise NotImplementedError

    def statistics(self) -> EvictionStatistics:
        return EvictionStatistics(
            policy=self.name,
            capacity_bytes=self.capacity_bytes,
            entries=self._entries(),
            resident_bytes=self._bytes,
            inserts=self._inserts,
            hits=self._hits,
            removes=self._removes,
            evictions=self._evictions,
            pinned_skips=self._pinned_skips,
            ghost_entries=self._ghost_entries(),
            ghost_hits=self._ghost_hits,
        )


# ---------------------------------------------------------------------------------------------
# LRU and FIFO: one ordered dict, oldest first.


class LRUPolicy(_Counters):
    """Least recently used. A hit moves the block to the recent end; victims leave the old end.

    A pinned block met at the old end is moved to the recent end (it is in use).
    """

    name = "lru"
    _move_on_touch = True

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._order: OrderedDict[Hashable, int] = OrderedDict()  # key -> size, oldest first

    def _entries(self) -> int:
        return len(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def insert(self, key: Hashable, size: int) -> None:
        if key in self._order:
            raise _already_resident(key)
        _check_size(key, size)
        self._order[key] = size
        self._bytes += size
        self._inserts += 1

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._hits += 1
            if self._move_on_touch:
                self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        size = self._order.pop(key, None)
        if size is not None:
            self._bytes -= size
            self._removes += 1

    def pop_victim(self, can_evict: CanEvict | None = None) -> Hashable | None:
        order = self._order
        if can_evict is None:
            if not order:
                return None
            key, size = order.popitem(last=False)
        else:
            for _ in range(len(order)):
                key = next(iter(order))
                if can_evict(key):
                    size = order.pop(key)
                    break
                order.move_to_end(key)
                self._pinned_skips += 1
            else:
                return None
        self._bytes -= size
        self._evictions += 1
        return key


class FIFOPolicy(LRUPolicy):
    """First in, first out: hits do not reorder. A baseline; pinned blocks go to the back."""

    name = "fifo"
    _move_on_touch = False


# ---------------------------------------------------------------------------------------------
# SIEVE


class _SieveNode:
    __slots__ = ("key", "newer", "older", "size", "visited")

    def __init__(self, key: Hashable, size: int) -> None:
        self.key = key
        self.size = size
        self.visited = False
        self.newer: _SieveNode | None = None
        self.older: _SieveNode | None = None


class SIEVEPolicy(_Counters):
    """SIEVE: one FIFO that never reorders, a visited bit per block, and a hand.

    New blocks enter at the head. A hit sets the visited bit. To evict, the hand walks from where
    it stopped toward the head (wrapping to the tail): a visited block has its bit cleared and is
    passed over; the first unvisited block is the victim and the hand stays at its newer neighbour.
    Old blocks that keep being hit stay near the tail, new ones are judged quickly. A pinned,
    unvisited block is passed over and keeps its place (a visited one has its bit cleared by the
    sweep, pinned or not, as the rule says).
    """

    name = "sieve"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._nodes: dict[Hashable, _SieveNode] = {}
        self._head: _SieveNode | None = None  # newest
        self._tail: _SieveNode | None = None  # oldest
        self._hand: _SieveNode | None = None  # None: start at the tail

    def _entries(self) -> int:
        return len(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def insert(self, key: Hashable, size: int) -> None:
        if key in self._nodes:
            raise _already_resident(key)
        _check_size(key, size)
        node = _SieveNode(key, size)
        node.older = self._head
        if self._head is not None:
            self._head.newer = node
        else:
            self._tail = node
        self._head = node
        self._nodes[key] = node
        self._bytes += size
        self._inserts += 1

    def touch(self, key: Hashable) -> None:
        node = self._nodes.get(key)
        if node is not None:
            node.visited = True
            self._hits += 1

    def _unlink(self, node: _SieveNode) -> None:
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._head = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._tail = node.newer
        node.newer = node.older = None
        del self._nodes[node.key]
        self._bytes -= node.size

    def remove(self, key: Hashable) -> None:
        node = self._nodes.get(key)
        if node is not None:
            self._unlink(node)
            self._removes += 1

    def pop_victim(self, can_evict: CanEvict | None = None) -> Hashable | None:
        tail = self._tail
        if tail is None:
            return None
        node: _SieveNode = self._hand if self._hand is not None else tail
        refused_in_a_row = 0
        total = len(self._nodes)
        while True:
            if node.visited:
                node.visited = False
                refused_in_a_row = 0
            elif can_evict is None or can_evict(node.key):
                break
            else:
                self._pinned_skips += 1
                refused_in_a_row += 1
                if refused_in_a_row >= total:  # a full sweep found only pinned blocks
                    self._hand = node
                    return None
            newer = node.newer
            node = newer if newer is not None else tail
        newer = node.newer
        self._unlink(node)
        self._hand = newer  # None: the next sweep starts again at the tail
        self._evictions += 1
        return node.key


# ---------------------------------------------------------------------------------------------
# S3-FIFO


class _S3Entry:
    __slots__ = ("freq", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.freq = 0


class S3FIFOPolicy(_Counters):
    """S3-FIFO: small FIFO S (~10% of the bytes), main FIFO M, ghost FIFO G; 2-bit frequencies.

    * A new block enters S, unless its key is in G (it was evicted recently and came back), in
      which case it enters M directly. Every block starts with frequency 0.
    * A hit increments the block's frequency, capped at 3; nothing moves (no lock, no list work).
    * Eviction takes from S while S holds at least its target share of the bytes (or M is empty),
      else from M. The tail of S moves to M if it was hit at least ``move_to_main_threshold``
      times since insertion (frequency cleared), otherwise it is evicted and its key goes to G:
      one-hit wonders leave after a short probation without disturbing M. The tail of M goes
      back to M's head with its frequency decremented if that is above 0, else it is evicted.
    * G remembers keys of blocks evicted from S, oldest forgotten first, up to
      ``ghost_factor * capacity_bytes`` bytes of blocks; the paper's choice (as many entries as
      M holds) is ``ghost_factor = 1 - small_fraction``, the default. A ghost costs a key and an
      int, not a block, so a store can afford a ghost several times its capacity.
    * ``adaptive=True`` (our variant, "s3fifo-adaptive") also puts keys evicted from M into G,
      marked as such, and moves the target share of S the way ARC moves its target: a block that
      returns after leaving S (S was too small to keep it until its reuse) grows S, one that
      returns after leaving M shrinks it, each by the block's size times the ratio of the bytes
      G remembers from M and from S (at least 1x). The target stays within [1%, 90%] of the
      capacity. A returning block of either kind enters M.
    * A pinned block at the tail of S with frequency below the threshold goes back to S's head; a
      pinned block at the tail of M with frequency 0 goes back to M's head. Both keep their bits.
    """

    name = "s3fifo"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        small_fraction: float = 0.1,
        ghost_factor: float | None = None,
        move_to_main_threshold: int = 1,
        adaptive: bool = False,
    ) -> None:
        super().__init__(capacity_bytes)
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        if ghost_factor is None:
            ghost_factor = 1.0 - small_fraction
        if not ghost_factor >= 0.0:
            raise ValueError(f"ghost_factor must be >= 0, got {ghost_factor}")
        if move_to_main_threshold not in (1, 2, 3):
            raise ValueError(
                f"move_to_main_threshold must be 1, 2 or 3, got {move_to_main_threshold}"
            )
        if adaptive:
            self.name = "s3fifo-adaptive"
        self.adaptive = adaptive
        self.ghost_limit_bytes = int(capacity_bytes * ghost_factor)
        self._small_min = max(1.0, 0.01 * capacity_bytes)
        self._small_max = max(self._small_min, 0.9 * capacity_bytes)
        self._small_target = max(1.0, capacity_bytes * small_fraction)  # float: it adapts
        self._threshold = move_to_main_threshold
        self._small: OrderedDict[Hashable, _S3Entry] = OrderedDict()  # oldest first
        self._main: OrderedDict[Hashable, _S3Entry] = OrderedDict()  # oldest first
        # G: key -> (size, evicted from M?), oldest first; M evictions only when adaptive.
        self._ghost: OrderedDict[Hashable, tuple[int, bool]] = OrderedDict()
        self._ghost_small_bytes = 0
        self._ghost_main_bytes = 0
        self._small_bytes = 0

    def _entries(self) -> int:
        return len(self._small) + len(self._main)

    def _ghost_entries(self) -> int:
        return len(self._ghost)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main

    @property
    def small_bytes(self) -> int:
        """Bytes resident in the small (probation) queue."""
        return self._small_bytes

    @property
    def small_target_bytes(self) -> float:
        """Bytes S may hold before eviction takes from it (moves when ``adaptive``)."""
        return self._small_target

    def in_small(self, key: Hashable) -> bool:
        return key in self._small

    def in_main(self, key: Hashable) -> bool:
        return key in self._main

    def in_ghost(self, key: Hashable) -> bool:
        return key in self._ghost

    def frequency(self, key: Hashable) -> int | None:
        """The 2-bit access count of a resident block, None if not resident."""
        entry = self._small.get(key) or self._main.get(key)
        return None if entry is None else entry.freq

    def insert(self, key: Hashable, size: int) -> None:
        if key in self._small or key in self._main:
            raise _already_resident(key)
        _check_size(key, size)
        entry = _S3Entry(size)
        ghost = self._ghost.pop(key, None)
        if ghost is not None:
            ghost_size, from_main = ghost
            from_small_bytes, from_main_bytes = self._ghost_small_bytes, self._ghost_main_bytes
            if from_main:
                self._ghost_main_bytes -= ghost_size
                step = size * max(1.0, from_small_bytes / from_main_bytes)
                self._small_target = max(self._small_min, self._small_target - step)
            else:
                self._ghost_small_bytes -= ghost_size
                if self.adaptive:
                    step = size * max(1.0, from_main_bytes / from_small_bytes)
                    self._small_target = min(self._small_max, self._small_target + step)
            self._ghost_hits += 1
            self._main[key] = entry
        else:
            self._small[key] = entry
            self._small_bytes += size
        self._bytes += size
        self._inserts += 1

    def touch(self, key: Hashable) -> None:
        entry = self._small.get(key) or self._main.get(key)
        if entry is not None:
            self._hits += 1
            if entry.freq < 3:
                entry.freq += 1

    def remove(self, key: Hashable) -> None:
        entry = self._small.pop(key, None)
        if entry is not None:
            self._small_bytes -= entry.size
        else:
            entry = self._main.pop(key, None)
            if entry is None:
                return
        self._bytes -= entry.size
        self._removes += 1

    def _remember(self, key: Hashable, size: int, from_main: bool) -> None:
        ghost = self._ghost
        ghost[key] = (size, from_main)
        if from_main:
            self._ghost_main_bytes += size
        else:
            self._ghost_small_bytes += size
        limit = self.ghost_limit_bytes
        while ghost and self._ghost_small_bytes + self._ghost_main_bytes > limit:
            _, (old_size, old_from_main) = ghost.popitem(last=False)
            if old_from_main:
                self._ghost_main_bytes -= old_size
            else:
                self._ghost_small_bytes -= old_size

    def _evict_small(self, can_evict: CanEvict | None) -> Hashable | None:
        small, main = self._small, self._main
        refused_in_a_row = 0
        while small and refused_in_a_row < len(small):
            key = next(iter(small))
            entry = small[key]
            if entry.freq >= self._threshold:
                del small[key]
                self._small_bytes -= entry.size
                entry.freq = 0
                main[key] = entry
                refused_in_a_row = 0
            elif can_evict is None or can_evict(key):
                del small[key]
                self._small_bytes -= entry.size
                self._bytes -= entry.size
                self._remember(key, entry.size, False)
                return key
            else:
                small.move_to_end(key)
                self._pinned_skips += 1
                refused_in_a_row += 1
        return None

    def _evict_main(self, can_evict: CanEvict | None) -> Hashable | None:
        main = self._main
        refused_in_a_row = 0
        while main and refused_in_a_row < len(main):
            key = next(iter(main))
            entry = main[key]
            if entry.freq > 0:
                entry.freq -= 1
                main.move_to_end(key)
                refused_in_a_row = 0
            elif can_evict is None or can_evict(key):
                del main[key]
                self._bytes -= entry.size
                if self.adaptive:
                    self._remember(key, entry.size, True)
                return key
            else:
                main.move_to_end(key)
                self._pinned_skips += 1
                refused_in_a_row += 1
        return None

    def pop_victim(self, can_evict: CanEvict | None = None) -> Hashable | None:
        if self._small and (self._small_bytes >= self._small_target or not self._main):
            victim = self._evict_small(can_evict)
            if victim is None:  # everything in S pinned (or moved to M): try M
                victim = self._evict_main(can_evict)
        else:
            victim = self._evict_main(can_evict)
            if victim is None:  # everything in M pinned: try S even though it is small
                victim = self._evict_small(can_evict)
        if victim is not None:
            self._evictions += 1
        return victim


# ---------------------------------------------------------------------------------------------
# ARC


class ARCPolicy(_Counters):
    """Adaptive Replacement Cache, in bytes.

    T1 holds blocks seen once recently, T2 blocks seen at least twice; B1 and B2 remember the keys
    recently evicted from T1 and T2. A target ``p`` (bytes of T1) adapts: an insert of a key found
    in B1 means T1 was too small (p grows), one found in B2 means T2 was too small (p shrinks);
    such a key enters T2. Victims come from the LRU end of T1 while T1 is above ``p`` (or exactly
    at it when the last insert came from B2), else from T2, and go to B1 or B2. The ghost lists
    are trimmed on insert so that T1+B1 <= c and T1+T2+B1+B2 <= 2c (c = capacity_bytes). A pinned
    block at the LRU end of a list moves to that list's MRU end; if every block of the preferred
    list is pinned the other list is tried.
    """

    name = "arc"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._t1: OrderedDict[Hashable, int] = OrderedDict()  # key -> size, LRU first
        self._t2: OrderedDict[Hashable, int] = OrderedDict()
        self._b1: OrderedDict[Hashable, int] = OrderedDict()
        self._b2: OrderedDict[Hashable, int] = OrderedDict()
        self._t1_bytes = 0
        self._t2_bytes = 0
        self._b1_bytes = 0
        self._b2_bytes = 0
        self.p = 0.0  # target bytes for T1
        self._last_from_b2 = False

    def _entries(self) -> int:
        return len(self._t1) + len(self._t2)

    def _ghost_entries(self) -> int:
        return len(self._b1) + len(self._b2)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def insert(self, key: Hashable, size: int) -> None:
        if key in self._t1 or key in self._t2:
            raise _already_resident(key)
        _check_size(key, size)
        c = self.capacity_bytes
        self._last_from_b2 = False
        if key in self._b1:
            b1, b2 = self._b1_bytes, self._b2_bytes
            self.p = min(float(c), self.p + size * max(1.0, b2 / b1))
            self._b1_bytes -= self._b1.pop(key)
            self._t2[key] = size
            self._t2_bytes += size
            self._ghost_hits += 1
        elif key in self._b2:
            b1, b2 = self._b1_bytes, self._b2_bytes
            self.p = max(0.0, self.p - size * max(1.0, b1 / b2))
            self._b2_bytes -= self._b2.pop(key)
            self._t2[key] = size
            self._t2_bytes += size
            self._ghost_hits += 1
            self._last_from_b2 = True
        else:
            while self._b1 and self._t1_bytes + self._b1_bytes + size > c:
                _, old = self._b1.popitem(last=False)
                self._b1_bytes -= old
            total = self._t1_bytes + self._t2_bytes + self._b1_bytes + self._b2_bytes
            while self._b2 and total + size > 2 * c:
                _, old = self._b2.popitem(last=False)
                self._b2_bytes -= old
                total -= old
            self._t1[key] = size
            self._t1_bytes += size
        self._bytes += size
        self._inserts += 1

    def touch(self, key: Hashable) -> None:
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_bytes -= size
            self._t2[key] = size
            self._t2_bytes += size
            self._hits += 1
        elif key in self._t2:
            self._t2.move_to_end(key)
            self._hits += 1

    def remove(self, key: Hashable) -> None:
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_bytes -= size
        else:
            size = self._t2.pop(key, None)
            if size is None:
                return
            self._t2_bytes -= size
        self._bytes -= size
        self._removes += 1

    def _evict_from(self, recent: bool, can_evict: CanEvict | None) -> Hashable | None:
        lst = self._t1 if recent else self._t2
        for _ in range(len(lst)):
            key = next(iter(lst))
            if can_evict is None or can_evict(key):
                size = lst.pop(key)
                if recent:
                    self._t1_bytes -= size
                    self._b1[key] = size
                    self._b1_bytes += size
                else:
                    self._t2_bytes -= size
                    self._b2[key] = size
                    self._b2_bytes += size
                self._bytes -= size
                return key
            lst.move_to_end(key)
            self._pinned_skips += 1
        return None

    def pop_victim(self, can_evict: CanEvict | None = None) -> Hashable | None:
        t1 = self._t1_bytes
        from_t1 = bool(self._t1) and (
            t1 > self.p or (self._last_from_b2 and t1 >= self.p) or not self._t2
        )
        self._last_from_b2 = False
        victim = self._evict_from(from_t1, can_evict)
        if victim is None:
            victim = self._evict_from(not from_t1, can_evict)
        if victim is not None:
            self._evictions += 1
        return victim


# ---------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "fifo": FIFOPolicy,
    "sieve": SIEVEPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "s3fifo-adaptive": lambda capacity_bytes: S3FIFOPolicy(
        capacity_bytes, ghost_factor=4.0, adaptive=True
    ),
}

POLICIES: tuple[str, ...] = tuple(_FACTORIES)

# The highest prefix-hit ratio on the Mooncake conversation trace at every capacity up to 20,000
# blocks (2x LRU at 2,000), 3% below LRU at 50,000; see docs/eviction.md for the table.
DEFAULT_POLICY = "s3fifo-adaptive"


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """Build the policy called ``name`` for a tier of ``capacity_bytes``."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of: {', '.join(POLICIES)}"
        )
    return factory(capacity_bytes)
