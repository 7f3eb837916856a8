"""ExtentAllocator: unit tests plus a Hypothesis state machine checked against a naive model."""

from __future__ import annotations

import bisect
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memkv_mesh.alloc import AllocStats, ExtentAllocator, _SortedInts

A = 4096


def test_fresh_allocator_is_one_free_extent() -> None:
    a = ExtentAllocator(64 * A)
    assert a.capacity == 64 * A
    assert a.used_bytes == 0
    assert a.free_bytes == 64 * A
    assert a.largest_free == 64 * A
    assert a.free_extents() == [(0, 64 * A)]
    assert a.statistics() == AllocStats(
        capacity=64 * A, used=0, free=64 * A, largest_free=64 * A, extents=0, free_extents=1
    )


def test_alloc_rounds_up_to_align() -> None:
    a = ExtentAllocator(16 * A)
    off = a.alloc(1)
    assert off == 0
    assert a.extent_size(0) == A
    off2 = a.alloc(A + 1)
    assert off2 == A
    assert a.extent_size(A) == 2 * A
    assert a.used_bytes == 3 * A


def test_alloc_none_when_no_contiguous_extent() -> None:
    a = ExtentAllocator(4 * A)
    offs = [a.alloc(A) for _ in range(4)]
    assert offs == [0, A, 2 * A, 3 * A]
    assert a.alloc(1) is None
    a.free(A)
    a.free(3 * A)
    assert a.free_bytes == 2 * A
    assert a.alloc(2 * A) is None  # two free pages, not contiguous
    assert a.alloc(5 * A) is None  # larger than the capacity
    assert a.alloc(A) == A


def test_best_fit_prefers_smallest_then_lowest_address() -> None:
    a = ExtentAllocator(32 * A)
    # carve: [0,4) used, [4,10) used, [10,11) used, [11,13) used, [13,14) used, rest free
    blocks = [a.alloc(n * A) for n in (4, 6, 1, 2, 1)]
    assert blocks == [0, 4 * A, 10 * A, 11 * A, 13 * A]
    a.free(4 * A)  # free hole of 6 pages at 4
    a.free(11 * A)  # free hole of 2 pages at 11
    # holes: 6 @4, 2 @11, 18 @14. A 2-page request takes the exact 2-page hole.
    assert a.alloc(2 * A) == 11 * A
    # a 3-page request takes the 6-page hole (smaller than the 18-page tail), from its start
    assert a.alloc(3 * A) == 4 * A
    assert a.free_extents() == [(7 * A, 3 * A), (14 * A, 18 * A)]


def test_free_coalesces_both_sides() -> None:
    a = ExtentAllocator(8 * A)
    x, y, z = a.alloc(A), a.alloc(2 * A), a.alloc(A)
    assert (x, y, z) == (0, A, 3 * A)
    assert x is not None and y is not None and z is not None
    a.free(x)
    a.free(z)
    assert a.free_extents() == [(0, A), (3 * A, 5 * A)]
    a.free(y)
    assert a.free_extents() == [(0, 8 * A)]
    assert a.statistics().free_extents == 1
    assert a.largest_free == 8 * A


def test_double_free_and_unknown_offset_raise() -> None:
    a = ExtentAllocator(8 * A)
    off = a.alloc(A)
    assert off is not None
    a.free(off)
    with pytest.raises(ValueError, match="double free"):
        a.free(off)
    a.alloc(2 * A)
    with pytest.raises(ValueError, match="no allocated extent"):
        a.free(A)  # inside an extent, not its start
    with pytest.raises(ValueError, match="extent_size"):
        a.extent_size(A)


def test_reserve_splits_free_extent_and_rejects_overlap() -> None:
    a = ExtentAllocator(16 * A)
    a.reserve(4 * A, 2 * A)
    assert a.free_extents() == [(0, 4 * A), (6 * A, 10 * A)]
    assert a.extent_size(4 * A) == 2 * A
    a.reserve(0, A)
    a.reserve(15 * A, 1)
    assert a.free_extents() == [(A, 3 * A), (6 * A, 9 * A)]
    with pytest.raises(ValueError, match="overlaps"):
        a.reserve(3 * A, 2 * A)  # runs into the extent at 4
    with pytest.raises(ValueError, match="overlaps"):
        a.reserve(5 * A, A)  # inside the extent at 4
    with pytest.raises(ValueError, match="overlaps"):
        a.reserve(0, A)
    with pytest.raises(ValueError, match="multiple of 4096"):
        a.reserve(100, A)
    with pytest.raises(ValueError, match="past capacity"):
        a.reserve(14 * A, 3 * A)
    # a reserved extent frees like an allocated one
    a.free(4 * A)
    a.free(0)
    a.free(15 * A)
    assert a.free_extents() == [(0, 16 * A)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0}, "capacity must be a positive int"),
        ({"capacity": -A}, "capacity must be a positive int"),
        ({"capacity": A + 1}, "not a multiple of align"),
        ({"capacity": 4 * A, "align": 3000}, "power of two"),
        ({"capacity": 4 * A, "align": 0}, "power of two"),
    ],
)
def test_bad_construction(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExtentAllocator(**kwargs)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_sizes(size: object) -> None:
    a = ExtentAllocator(4 * A)
    with pytest.raises(ValueError, match="alloc: size must be a positive int"):
        a.alloc(size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserve: size must be a positive int"):
        a.reserve(0, size)  # type: ignore[arg-type]


def test_small_align() -> None:
    a = ExtentAllocator(100, align=1)
    assert a.alloc(30) == 0
    assert a.alloc(70) == 30
    assert a.alloc(1) is None
    a.free(0)
    assert a.alloc(10) == 0
    assert a.free_extents() == [(10, 20)]


def test_sorted_ints_against_a_sorted_list() -> None:
    rng = random.Random(7)
    s = _SortedInts()
    model: list[int] = []  # kept sorted with bisect
    for _ in range(20_000):
        x = rng.randrange(5_000)
        i = bisect.bisect_left(model, x)
        present = i < len(model) and model[i] == x
        if present and rng.random() < 0.6:
            s.remove(x)
            del model[i]
        elif not present:
            s.add(x)
            model.insert(i, x)
        q = rng.randrange(-10, 5_010)
        j = bisect.bisect_left(model, q)
        assert s.ceiling(q) == (model[j] if j < len(model) else None)
        k = bisect.bisect_right(model, q)
        assert s.floor(q) == (model[k - 1] if k else None)
    assert list(s) == model
    assert len(s) == len(model)
    assert s.last() == model[-1]
    with pytest.raises(KeyError):
        s.remove(10_000)
    with pytest.raises(KeyError):
        s.remove(next(v for v in range(model[0], model[-1]) if v not in set(model)))


def test_many_extents_stay_consistent() -> None:
    """Enough extents to split the sorted chunks many times; then free all in random order."""
    rng = random.Random(1)
    a = ExtentAllocator(1 << 30)
    live: list[int] = []
    for _ in range(5_000):
        off = a.alloc(rng.choice((1, 2, 3, 8, 25)) * A)
        assert off is not None
        live.append(off)
    rng.shuffle(live)
    for off in live[:2_500]:
        a.free(off)
    for _ in range(2_000):
        off = a.alloc(rng.choice((1, 2, 4)) * A)
        assert off is not None
        live.append(off)
    still = live[2_500:]
    assert len(set(still)) == len(still)
    assert a.used_bytes == sum(a.extent_size(o) for o in still)
    rng.shuffle(still)
    for off in still:
        a.free(off)
    assert a.free_extents() == [(0, 1 << 30)]
    assert a.used_bytes == 0


# -- state machine against a naive model -----------------------------------------------------------


def _gaps(used: dict[int, int], capacity: int) -> list[tuple[int, int]]:
    gaps = []
    pos = 0
    for off, size in sorted(used.items()):
        if off > pos:
            gaps.append((pos, off - pos))
        pos = off + size
    if pos < capacity:
        gaps.append((pos, capacity - pos))
    return gaps


class AllocatorMachine(RuleBasedStateMachine):
    """Every step is checked against a dict of used extents; the model computes best fit itself."""

    ALIGN = 512
    CAPACITY = 64 * ALIGN

    def __init__(self) -> None:
        super().__init__()
        self.a = ExtentAllocator(self.CAPACITY, align=self.ALIGN)
        self.used: dict[int, int] = {}

    def _round(self, n: int) -> int:
        return -(-n // self.ALIGN) * self.ALIGN

    @rule(size=st.integers(1, 20 * 512))
    def alloc(self, size: int) -> None:
        need = self._round(size)
        fits = [g for g in _gaps(self.used, self.CAPACITY) if g[1] >= need]
        expected = min(fits, key=lambda g: (g[1], g[0]))[0] if fits else None
        got = self.a.alloc(size)
        assert got == expected
        if got is not None:
            self.used[got] = need

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        off = data.draw(st.sampled_from(sorted(self.used)))
        self.a.free(off)
        del self.used[off]

    @rule(off=st.integers(0, 64 * 512))
    def free_unknown(self, off: int) -> None:
        if off in self.used:
            return
        with pytest.raises(ValueError):
            self.a.free(off)

    @rule(page=st.integers(0, 63), size=st.integers(1, 8 * 512))
    def reserve(self, page: int, size: int) -> None:
        off = page * self.ALIGN
        need = self._round(size)
        ok = off + need <= self.CAPACITY and all(
            off + need <= o or o + s <= off for o, s in self.used.items()
        )
        if ok:
            self.a.reserve(off, size)
            self.used[off] = need
        else:
            with pytest.raises(ValueError):
                self.a.reserve(off, size)

    @invariant()
    def matches_model(self) -> None:
        a = self.a
        assert a.extents() == sorted(self.used.items())
        gaps = _gaps(self.used, self.CAPACITY)
        # free extents are exactly the maximal gaps: coalescing never leaves two touching
        assert a.free_extents() == gaps
        assert a.used_bytes == sum(self.used.values())
        assert a.free_bytes == self.CAPACITY - a.used_bytes
        assert a.largest_free == max((g[1] for g in gaps), default=0)
        stats = a.statistics()
        assert stats.extents == len(self.used)
        assert stats.free_extents == len(gaps)
        for off, size in self.used.items():
            assert off % self.ALIGN == 0
            assert a.extent_size(off) == size

    def teardown(self) -> None:
        for off in list(self.used):
            self.a.free(off)
        assert self.a.free_extents() == [(0, self.CAPACITY)]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, derandomize=True
)
