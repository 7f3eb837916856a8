"""An extent allocator over ``[0, capacity)``: pure, no I/O, no locks.

Theory of operation
-------------------
The space is a line of ``capacity`` bytes cut into extents whose offsets and sizes are multiples
of ``align``. Every byte is in exactly one extent, either *used* (returned by ``alloc`` or marked
by ``reserve``) or *free*. Two rules are kept after every call:

* **no overlap**: used and free extents tile ``[0, capacity)`` exactly;
* **maximal free extents**: no two free extents touch. ``free`` merges a released extent with a
  free neighbour on either side, so when everything is freed one free extent of ``capacity``
  bytes remains.

Placement is **best fit, lowest address among equal sizes**: ``alloc(n)`` takes the smallest
free extent of at least ``round_up(n, align)`` bytes and carves the block from its start, leaving
the rest free. Why best fit: Johnstone and Wilson ("The Memory Fragmentation Problem: Solved?",
ISMM 1998) measured best fit and address-ordered first fit as the two low-fragmentation policies
on real programs, and best fit is the one that a size-ordered index answers in one search; first
fit by address would need a tree augmented with the largest free size under each node. Keeping
the large free extents whole matters here: blocks range from 4 KiB to ~100 MiB, and a 100 MiB
block needs 100 MiB of contiguous space.

Indexes (all exact, no lazy deletion):

* ``_used``: offset -> size of each used extent (``free`` and ``extent_size`` look up here);
* ``_free_start`` / ``_free_end``: start -> size and end -> start of each free extent, so the
  neighbours of an extent being freed are found in O(1);
* ``_by_size``: the free extents as ``size << shift | offset`` in a sorted sequence, so the best
  fit is one ceiling search and ``largest_free`` is its last element;
* ``_by_addr``: the free extent starts, sorted, so ``reserve`` finds the free extent that holds a
  given offset with one floor search.

Both sorted sequences are :class:`_SortedInts`, a list of sorted chunks of at most
``2 * _LOAD`` ints with a list of chunk maxima: a search is two bisections (O(log n)) and an
insert or delete moves at most ``2 * _LOAD`` pointers inside one chunk, so each call is
O(log n) comparisons plus a bounded memmove.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator

import msgspec

__all__ = ["AllocStats", "ExtentAllocator"]


class AllocStats(msgspec.Struct, frozen=True):
    """A snapshot of an :class:`ExtentAllocator` (bytes, and extent counts)."""

    capacity: int
    used: int
    free: int
    largest_free: int
    extents: int  # used extents
    free_extents: int


class _SortedInts:
    """A sorted set of distinct ints: sorted chunks plus the list of chunk maxima."""

    __slots__ = ("_chunks", "_maxes", "_len")

    _LOAD = 256

    def __init__(self) -> None:
        self._chunks: list[list[int]] = []
        self._maxes: list[int] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for chunk in self._chunks:
            yield from chunk

    def add(self, x: int) -> None:
        maxes = self._maxes
        if not maxes:
            self._chunks.append([x])
            maxes.append(x)
            self._len = 1
            return
        i = bisect_left(maxes, x)
        if i == len(maxes):
            i -= 1
            chunk = self._chunks[i]
            chunk.append(x)
            maxes[i] = x
        else:
            chunk = self._chunks[i]
            insort(chunk, x)
        self._len += 1
        if len(chunk) > 2 * self._LOAD:
            tail = chunk[self._LOAD :]
            del chunk[self._LOAD :]
            maxes[i] = chunk[-1]
            self._chunks.insert(i + 1, tail)
            maxes.insert(i + 1, tail[-1])

    def remove(self, x: int) -> None:
        maxes = self._maxes
        i = bisect_left(maxes, x)
        if i == len(maxes):
            raise KeyError(x)
        chunk = self._chunks[i]
        j = bisect_left(chunk, x)
        if chunk[j] != x:
            raise KeyError(x)
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._chunks[i]
            del maxes[i]
        elif j == len(chunk):
            maxes[i] = chunk[-1]

    def ceiling(self, x: int) -> int | None:
        """The smallest element >= x, or None."""
        maxes = self._maxes
        i = bisect_left(maxes, x)
        if i == len(maxes):
            return None
        chunk = self._chunks[i]
        return chunk[bisect_left(chunk, x)]

    def floor(self, x: int) -> int | None:
        """The largest element <= x, or None."""
        maxes = self._maxes
        i = bisect_left(maxes, x)
        if i < len(maxes):
            chunk = self._chunks[i]
            j = bisect_right(chunk, x)
            if j:
                return chunk[j - 1]
        if i == 0:
            return None
        return self._chunks[i - 1][-1]

    def last(self) -> int | None:
        return self._maxes[-1] if self._maxes else None


class ExtentAllocator:
    """Allocate aligned extents of ``[0, capacity)``; see the module docstring for the rules.

    Not thread-safe: callers that share one allocator between threads hold their own lock.
    """

    __slots__ = (
        "_capacity",
        "_align",
        "_mask_align",
        "_shift",
        "_off_mask",
        "_used",
        "_used_bytes",
        "_free_start",
        "_free_end",
        "_by_size",
        "_by_addr",
    )

    def __init__(self, capacity: int, *, align: int = 4096) -> None:
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a positive power of two, got {align!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if capacity % align:
            raise ValueError(f"capacity {capacity} is not a multiple of align {align}")
        self._capacity = capacity
        self._align = align
        self._mask_align = align - 1
        self._shift = capacity.bit_length()
        self._off_mask = (1 << self._shift) - 1
        self._used: dict[int, int] = {}
        self._used_bytes = 0
        self._free_start: dict[int, int] = {}
        self._free_end: dict[int, int] = {}
        self._by_size = _SortedInts()
        self._by_addr = _SortedInts()
        self._add_free(0, capacity)

    # -- free-extent bookkeeping ---------------------------------------------------------------

    def _add_free(self, start: int, size: int) -> None:
        self._free_start[start] = size
        self._free_end[start + size] = start
        self._by_size.add((size << self._shift) | start)
        self._by_addr.add(start)

    def _remove_free(self, start: int, size: int) -> None:
        del self._free_start[start]
        del self._free_end[start + size]
        self._by_size.remove((size << self._shift) | start)
        self._by_addr.remove(start)

    def _round(self, size: int, what: str) -> int:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"{what}: size must be a positive int, got {size!r}")
        return (size + self._mask_align) & ~self._mask_align

    # -- public API ----------------------------------------------------------------------------

    def alloc(self, size: int) -> int | None:
        """Return the offset of a fresh extent of ``round_up(size, align)`` bytes, or None when
        no free extent is that large."""
        need = self._round(size, "alloc")
        if need > self._capacity:
            return None
        key = self._by_size.ceiling(need << self._shift)
        if key is None:
            return None
        have = key >> self._shift
        start = key & self._off_mask
        self._remove_free(start, have)
        if have > need:
            self._add_free(start + need, have - need)
        self._used[start] = need
        self._used_bytes += need
        return start

    def free(self, offset: int) -> None:
        """Release the extent allocated at ``offset``, merging it with free neighbours."""
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(
                f"free({offset!r}): no allocated extent starts there (double free or bad offset)"
            )
        self._used_bytes -= size
        start, end = offset, offset + size
        left = self._free_end.get(start)
        if left is not None:
            self._remove_free(left, start - left)
            start = left
        right = self._free_start.get(end)
        if right is not None:
            self._remove_free(end, right)
            end += right
        self._add_free(start, end - start)

    def reserve(self, offset: int, size: int) -> None:
        """Mark ``[offset, offset + round_up(size, align))`` used, as if ``alloc`` had returned it
        (recovery after a restart). ValueError if it is misaligned, out of range or overlaps a
        used extent."""
        need = self._round(size, "reserve")
        if not isinstance(offset, int) or offset < 0 or offset & self._mask_align:
            raise ValueError(
                f"reserve: offset must be a non-negative multiple of {self._align}, got {offset!r}"
            )
        if offset + need > self._capacity:
            raise ValueError(
                f"reserve({offset}, {size}): extent ends at {offset + need}, "
                f"past capacity {self._capacity}"
            )
        start = self._by_addr.floor(offset)
        have = self._free_start[start] if start is not None else 0
        if start is None or start + have < offset + need:
            raise ValueError(f"reserve({offset}, {size}): overlaps an allocated extent")
        self._remove_free(start, have)
        if offset > start:
            self._add_free(start, offset - start)
        tail = start + have - (offset + need)
        if tail:
            self._add_free(offset + need, tail)
        self._used[offset] = need
        self._used_bytes += need

    def extent_size(self, offset: int) -> int:
        """The size of the used extent at ``offset`` (ValueError if none starts there)."""
        size = self._used.get(offset)
        if size is None:
            raise ValueError(f"extent_size({offset!r}): no allocated extent starts there")
        return size

    def __contains__(self, offset: object) -> bool:
        return offset in self._used

    def extents(self) -> list[tuple[int, int]]:
        """The used extents as sorted ``(offset, size)`` pairs (O(n log n); for tests and tools)."""
        return sorted(self._used.items())

    def free_extents(self) -> list[tuple[int, int]]:
        """The free extents as sorted ``(offset, size)`` pairs (O(n); for tests and tools)."""
        return [(start, self._free_start[start]) for start in self._by_addr]

    @property
    def align(self) -> int:
        return self._align

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self._capacity - self._used_bytes

    @property
    def largest_free(self) -> int:
        key = self._by_size.last()
        return 0 if key is None else key >> self._shift

    def statistics(self) -> AllocStats:
        return AllocStats(
            capacity=self._capacity,
            used=self._used_bytes,
            free=self._capacity - self._used_bytes,
            largest_free=self.largest_free,
            extents=len(self._used),
            free_extents=len(self._free_start),
        )
