"""Eviction policies: the interface, invariants against a model, S3-FIFO/SIEVE/ARC behaviour,
and the prefix-hit replay on the Mooncake conversation trace (exact LRU reference figures)."""

from __future__ import annotations

import json
from collections.abc import Hashable
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memkv_mesh.eviction import (
    DEFAULT_POLICY,
    POLICIES,
    ARCPolicy,
    EvictionPolicy,
    EvictionStatistics,
    LRUPolicy,
    S3FIFOPolicy,
    SIEVEPolicy,
    make_policy,
)
from simulations.eviction_cli import (
    UNBOUNDED,
    load_trace,
    main,
    measure_speed,
    replay,
    replay_belady,
)

TRACE = Path(__file__).resolve().parent.parent / "simulations" / "traces" / "conversation_trace.jsonl"


@pytest.fixture(scope="module")
def trace() -> list[list[int]]:
    return load_trace(TRACE)


def _drain(
    policy: EvictionPolicy, capacity: int, pinned: AbstractSet[Hashable] = frozenset()
) -> list[Hashable]:
    victims: list[Hashable] = []
    while policy.resident_bytes > capacity:
        v = policy.pop_victim(lambda k: k not in pinned)
        if v is None:
            break
        victims.append(v)
    return victims


# --- the interface ---------------------------------------------------------------------------


def test_policies_listed_and_default_is_one_of_them() -> None:
    assert {"lru", "s3fifo", "sieve", "arc", "fifo", "s3fifo-adaptive"} <= set(POLICIES)
    assert DEFAULT_POLICY in POLICIES


@pytest.mark.parametrize("name", POLICIES)
def test_make_policy_builds_a_conforming_policy(name: str) -> None:
    p = make_policy(name, 1000)
    assert isinstance(p, EvictionPolicy)
    assert p.name == name
    assert len(p) == 0 and p.resident_bytes == 0 and 5 not in p
    assert p.pop_victim() is None


def test_make_policy_unknown_name_names_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'lfu'.*lru.*s3fifo"):
        make_policy("lfu", 1000)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", [0, -5])
def test_capacity_must_be_positive(name: str, bad: int) -> None:
    with pytest.raises(ValueError, match="capacity_bytes must be positive"):
        make_policy(name, bad)


@pytest.mark.parametrize("name", POLICIES)
def test_capacity_must_be_an_int(name: str) -> None:
    with pytest.raises(TypeError, match="capacity_bytes must be an int"):
        make_policy(name, 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", POLICIES)
def test_insert_touch_remove_semantics(name: str) -> None:
    p = make_policy(name, 100)
    p.insert(b"a", 10)
    p.insert(b"b", 20)
    assert b"a" in p and b"b" in p and len(p) == 2 and p.resident_bytes == 30
    with pytest.raises(KeyError, match="already resident"):
        p.insert(b"a", 10)
    assert len(p) == 2 and p.resident_bytes == 30  # the failed insert changed nothing
    with pytest.raises(ValueError, match=r"size of block b'c' must be positive"):
        p.insert(b"c", 0)
    with pytest.raises(TypeError, match="must be an int"):
        p.insert(b"c", 1.0)  # type: ignore[arg-type]
    assert b"c" not in p
    p.touch(b"a")
    p.touch(b"zz")  # absent: no-op
    p.remove(b"zz")  # absent: no-op
    assert len(p) == 2
    p.remove(b"a")
    assert b"a" not in p and len(p) == 1 and p.resident_bytes == 20
    p.remove(b"a")  # twice: no-op
    assert p.resident_bytes == 20
    p.insert(b"a", 5)  # a removed key may come back
    assert p.resident_bytes == 25
    stats = p.statistics()
    assert isinstance(stats, EvictionStatistics)
    assert (stats.policy, stats.entries, stats.resident_bytes) == (name, 2, 25)
    assert (stats.inserts, stats.hits, stats.removes, stats.evictions) == (3, 1, 1, 0)
    assert p.pop_victim() in (b"a", b"b")
    assert p.statistics().evictions == 1 and len(p) == 1


@pytest.mark.parametrize("name", POLICIES)
def test_pop_victim_returns_none_when_everything_is_pinned(name: str) -> None:
    p = make_policy(name, 10)
    for k in range(8):
        p.insert(k, 1)
    for k in range(0, 8, 2):
        p.touch(k)
    calls: list[Hashable] = []

    def refuse(key: Hashable) -> bool:
        calls.append(key)
        return False

    assert p.pop_victim(refuse) is None
    assert len(p) == 8 and p.resident_bytes == 8 and all(k in p for k in range(8))
    assert set(calls) == set(range(8))  # every block was offered before giving up
    assert p.pop_victim(refuse) is None  # and again, from wherever it stopped
    assert p.statistics().pinned_skips >= 8
    # unpinning one block makes it the victim
    assert p.pop_victim(lambda k: k == 5) == 5
    assert 5 not in p and len(p) == 7


@pytest.mark.parametrize("name", POLICIES)
def test_pinned_blocks_cost_o1_amortised(name: str) -> None:
    """A few pinned blocks at the old end are not rescanned on every call."""
    p = make_policy(name, 1000)
    for k in range(1000):
        p.insert(k, 1)
    pinned = set(range(10))  # the oldest blocks, first in line for every policy
    calls = 0

    def can_evict(key: Hashable) -> bool:
        nonlocal calls
        calls += 1
        return key not in pinned

    victims = [p.pop_victim(can_evict) for _ in range(500)]
    assert None not in victims and not pinned & set(victims)
    assert len(set(victims)) == 500
    assert calls <= 500 + 2 * len(pinned)  # not 500 * 10
    assert all(k in p for k in pinned)


# --- invariants against a model (hypothesis) --------------------------------------------------

_KEYS = st.integers(min_value=0, max_value=24)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), _KEYS, st.integers(min_value=1, max_value=9)),
        st.tuples(st.just("touch"), _KEYS, st.just(0)),
        st.tuples(st.just("remove"), _KEYS, st.just(0)),
        st.tuples(st.just("pin"), _KEYS, st.just(0)),
        st.tuples(st.just("unpin"), _KEYS, st.just(0)),
        st.tuples(st.just("pop"), st.just(0), st.just(0)),
    ),
    max_size=120,
)


@pytest.mark.parametrize("name", POLICIES)
@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
)
@given(ops=_OPS, capacity=st.integers(min_value=1, max_value=40))
def test_invariants_against_a_model(name: str, ops: list[tuple[str, int, int]], capacity: int) -> None:
    p = make_policy(name, capacity)
    model: dict[int, int] = {}  # resident key -> size
    pinned: set[int] = set()
    evictions = 0
    for op, key, size in ops:
        if op == "insert":
            if key in model:
                with pytest.raises(KeyError):
                    p.insert(key, size)
            else:
                p.insert(key, size)
                model[key] = size
                # the owner's loop: evict until the budget holds again
                for v in _drain(p, capacity, pinned):
                    assert v in model, f"{name} evicted {v!r}, which is not resident"
                    assert v not in pinned, f"{name} evicted pinned block {v!r}"
                    del model[v]
                    evictions += 1
                if p.resident_bytes > capacity:  # only when the rest is pinned
                    assert set(model) <= pinned
        elif op == "touch":
            p.touch(key)
        elif op == "remove":
            p.remove(key)
            model.pop(key, None)
        elif op == "pin":
            pinned.add(key)
        elif op == "unpin":
            pinned.discard(key)
        else:
            v = p.pop_victim(lambda k: k not in pinned)
            if v is None:
                assert set(model) <= pinned
            else:
                assert v in model and v not in pinned
                del model[v]
                evictions += 1
        assert len(p) == len(model)
        assert p.resident_bytes == sum(model.values())
        assert all(k in p for k in model)
        assert not any(k in p for k in range(25) if k not in model)
    stats = p.statistics()
    assert stats.evictions == evictions and stats.entries == len(model)
    # draining with nothing pinned empties the policy, each block once
    drained = []
    while (v := p.pop_victim()) is not None:
        drained.append(v)
    assert sorted(drained) == sorted(model)  # type: ignore[type-var]
    assert len(p) == 0 and p.resident_bytes == 0


# --- LRU ---------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_and_pinned_go_to_the_recent_end() -> None:
    p = LRUPolicy(10)
    for k in "abcd":
        p.insert(k, 1)
    p.touch("a")  # order now b c d a
    assert p.pop_victim() == "b"
    assert p.pop_victim(lambda k: k != "c") == "d"  # c pinned: skipped, moved behind a
    assert p.pop_victim() == "a"
    assert p.pop_victim() == "c"
    assert p.pop_victim() is None


# --- S3-FIFO -----------------------------------------------------------------------------------


def _s3_filled() -> S3FIFOPolicy:
    """Capacity 10 (S target 1): keys 1..10 in S, 1..5 hit once, then 11 inserted."""
    p = S3FIFOPolicy(10)
    for k in range(1, 11):
        p.insert(k, 1)
    for k in range(1, 6):
        p.touch(k)
    p.insert(11, 1)
    return p


def test_s3fifo_one_hit_wonders_leave_from_the_small_queue() -> None:
    p = _s3_filled()
    assert all(p.in_small(k) for k in range(1, 12))
    victim = p.pop_victim()
    # 1..5 were hit: promoted to M with their bits cleared; 6 was never hit: evicted to G
    assert victim == 6
    assert all(p.in_main(k) and p.frequency(k) == 0 for k in range(1, 6))
    assert p.in_ghost(6) and 6 not in p
    # the next victims are the other one-hit wonders, still from S, oldest first; M is untouched
    p.insert(12, 1)
    assert p.pop_victim() == 7
    assert all(p.in_main(k) for k in range(1, 6))
    stats = p.statistics()
    assert stats.ghost_entries == 2 and stats.evictions == 2


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    p = _s3_filled()
    assert p.pop_victim() == 6
    p.insert(6, 1)  # back while still remembered
    assert p.in_main(6) and not p.in_small(6) and not p.in_ghost(6)
    assert p.frequency(6) == 0
    assert p.statistics().ghost_hits == 1
    p.insert(99, 1)  # a never-seen key goes to S
    assert p.in_small(99)


def test_s3fifo_main_reinserts_by_frequency() -> None:
    p = _s3_filled()
    p.pop_victim()  # M = 1..5 (oldest first), S = 7..11
    p.touch(1)
    p.touch(1)
    p.touch(2)
    for k in (7, 8, 9, 10, 11):
        p.remove(k)  # empty S so eviction works on M
    # 1 (freq 2) and 2 (freq 1) go round again with one bit less; 3 is the first with freq 0
    assert p.pop_victim() == 3
    assert p.frequency(1) == 1 and p.frequency(2) == 0
    assert p.pop_victim() == 4
    assert p.pop_victim() == 5
    assert p.pop_victim() == 2
    assert p.pop_victim() == 1
    assert p.pop_victim() is None


def test_s3fifo_frequency_is_capped_at_3() -> None:
    p = S3FIFOPolicy(10)
    p.insert("k", 1)
    for _ in range(10):
        p.touch("k")
    assert p.frequency("k") == 3
    assert p.frequency("absent") is None


def test_s3fifo_pinned_one_hit_wonder_stays_in_small() -> None:
    p = _s3_filled()
    victim = p.pop_victim(lambda k: k != 6)
    assert victim == 7  # 6 refused: back to S's head, keeps its place in S
    assert p.in_small(6) and p.frequency(6) == 0 and not p.in_ghost(6)


def test_s3fifo_ghost_is_bounded() -> None:
    p = S3FIFOPolicy(100, ghost_factor=0.2)  # remembers 20 blocks of size 1
    for k in range(1000):
        p.insert(k, 1)
        _drain(p, 100)
    assert p.statistics().ghost_entries == 20


def test_s3fifo_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="small_fraction"):
        S3FIFOPolicy(100, small_fraction=1.5)
    with pytest.raises(ValueError, match="ghost_factor"):
        S3FIFOPolicy(100, ghost_factor=-1.0)
    with pytest.raises(ValueError, match="move_to_main_threshold"):
        S3FIFOPolicy(100, move_to_main_threshold=0)


def test_s3fifo_adaptive_moves_the_small_target() -> None:
    p = make_policy("s3fifo-adaptive", 100)
    assert isinstance(p, S3FIFOPolicy) and p.adaptive
    start = p.small_target_bytes
    assert start == 10
    for k in range(100):
        p.insert(k, 1)
    p.insert(100, 1)
    assert p.pop_victim() == 0  # a one-hit wonder leaves S for the ghost list
    p.insert(0, 1)  # it comes back: S was too small to keep it
    assert p.in_main(0)
    grown = p.small_target_bytes
    assert grown > start
    # empty S, then evict a main block and bring it back: M was too small, S shrinks
    for k in range(1, 101):
        p.remove(k)
    p.insert(200, 1)
    p.remove(200)
    assert p.pop_victim() == 0
    p.insert(0, 1)
    assert p.in_main(0) and p.small_target_bytes < grown


def test_s3fifo_plain_does_not_adapt() -> None:
    p = S3FIFOPolicy(100)
    for k in range(101):
        p.insert(k, 1)
    assert p.pop_victim() == 0
    p.insert(0, 1)
    assert p.in_main(0) and p.small_target_bytes == 10


# --- SIEVE -------------------------------------------------------------------------------------


def test_sieve_hand_keeps_visited_blocks_and_stays_put() -> None:
    p = SIEVEPolicy(10)
    for k in range(4):
        p.insert(k, 1)
    p.touch(0)
    p.touch(2)
    # hand: 0 visited (cleared) -> 1 evicted; from 2: visited (cleared) -> 3; wrap -> 0, 2
    assert [p.pop_victim() for _ in range(4)] == [1, 3, 0, 2]


def test_sieve_pinned_block_keeps_its_place() -> None:
    p = SIEVEPolicy(10)
    for k in range(4):
        p.insert(k, 1)
    assert p.pop_victim(lambda k: k != 0) == 1
    assert p.pop_victim() == 2  # the hand moved on from 1, past nothing new
    assert p.pop_victim() == 3
    assert p.pop_victim() == 0


# --- ARC ---------------------------------------------------------------------------------------


def test_arc_keeps_a_reused_block_through_a_scan() -> None:
    arc, lru = ARCPolicy(4), LRUPolicy(4)
    for p in (arc, lru):
        p.insert("hot", 1)
        p.touch("hot")
        for k in range(20):  # a scan of one-time blocks
            p.insert(k, 1)
            _drain(p, 4)
    assert "hot" in arc
    assert "hot" not in lru


# --- replay and the CLI ------------------------------------------------------------------------


def test_replay_counts_leading_hits_only() -> None:
    r = replay([[1, 2], [3, 2]], "lru", UNBOUNDED)
    assert (r.references, r.prefix_hits, r.block_hits) == (4, 0, 1)
    assert r.prefix_hit_ratio == 0.0 and r.block_hit_ratio == 0.25


def test_replay_reverse_order_keeps_roots() -> None:
    fwd = replay([[1, 2, 3], [1, 2]], "lru", 2)
    rev = replay([[1, 2, 3], [1, 2]], "lru", 2, order="reverse")
    assert fwd.prefix_hits == 0  # forward: 1 was the oldest and left first
    assert rev.prefix_hits == 2  # reverse: 3 left first, the prefix 1,2 survived


def test_belady_keeps_the_block_used_soonest() -> None:
    requests = [[1, 2, 3], [1], [2]]
    opt = replay_belady(requests, 2)
    assert (opt.prefix_hits, opt.block_hits) == (2, 2)  # 3 (never used again) was evicted
    lru = replay(requests, "lru", 2)
    assert (lru.prefix_hits, lru.block_hits) == (0, 0)


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(
    requests=st.lists(
        st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=6, unique=True),
        max_size=40,
    ),
    capacity=st.integers(min_value=1, max_value=12),
)
def test_belady_bounds_every_policy_on_block_hits(requests: list[list[int]], capacity: int) -> None:
    best = replay_belady(requests, capacity).block_hits
    for name in POLICIES:
        assert replay(requests, name, capacity).block_hits <= best, name


def test_replay_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="order"):
        replay([[1]], "lru", 1, order="sideways")
    with pytest.raises(ValueError, match="capacity"):
        replay([[1]], "lru", -1)
    with pytest.raises(ValueError, match="unknown eviction policy 'nope'"):
        replay([[1]], "nope", 1)


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [(2_000, 0.0537), (6_000, 0.1386), (20_000, 0.2875), (UNBOUNDED, 0.3664)],
)
def test_lru_reproduces_the_reference_prefix_hit_ratios(
    trace: list[list[int]], capacity: int, expected: float
) -> None:
    assert len(trace) == 12_031
    r = replay(trace, "lru", capacity)
    assert round(r.prefix_hit_ratio, 4) == expected


def test_default_policy_beats_lru_on_the_trace(trace: list[list[int]]) -> None:
    """The measured reason for the default (docs/eviction.md), kept honest as the code changes."""
    for capacity in (2_000, 20_000):
        lru = replay(trace, "lru", capacity).prefix_hit_ratio
        best = replay(trace, DEFAULT_POLICY, capacity).prefix_hit_ratio
        assert best > lru, (capacity, best, lru)


def test_cli_json_on_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--trace", str(TRACE), "--capacities", "2000", "--policies", "lru,s3fifo", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 12_031 and out["references"] == 288_500
    by = {(r["policy"], r["capacity"]): r for r in out["results"]}
    assert round(by[("lru", 2000)]["prefix_hit_ratio"], 4) == 0.0537
    assert by[("s3fifo", 2000)]["block_hit_ratio"] >= by[("s3fifo", 2000)]["prefix_hit_ratio"]
    assert out["speed"] == []


def test_cli_table_and_speed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "t.jsonl"
    small.write_text('{"hash_ids": [1, 2]}\n\n{"hash_ids": [1, 3]}\n')
    code = main(
        ["--trace", str(small), "--capacities", "1,inf", "--policies", "lru", "--order", "both", "--speed", "--opt"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "2 requests, 4 block references" in out
    lines = [line.split() for line in out.splitlines()]
    assert lines[3][:5] == ["lru", "forward", "1", "0.0000", "0.0000"]
    assert lines[4][:5] == ["lru", "forward", "inf", "0.2500", "0.2500"]
    # reverse, C=1: 1 is cached when the second request arrives (a prefix hit), but inserting 3
    # first evicts it before its touch, so it is not a block hit
    assert lines[5][:5] == ["lru", "reverse", "1", "0.2500", "0.0000"]
    assert lines[7] == ["opt", "forward", "1", "0.2500", "0.2500", "-"]  # 2 evicted, never reused
    assert "put" in out and "touch" in out and "lookup" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "lru,belady"], "unknown policy 'belady'"),
        (["--capacities", "100,lots"], "capacity 'lots' is not a whole number"),
        (["--capacities", "-3"], "capacity '-3' must be positive"),
        (["--trace", "/nonexistent/trace.jsonl"], "cannot read --trace"),
    ],
)
def test_cli_bad_arguments_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_trace_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hash_ids": [1]}\n{"hash_ids": "nope"}\n')
    with pytest.raises(SystemExit):
        main(["--trace", str(bad)])
    assert "bad.jsonl:2: 'hash_ids' must be a list of integers" in capsys.readouterr().err
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit):
        main(["--trace", str(bad)])
    assert "bad.jsonl:1: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("name", POLICIES)
def test_measure_speed_runs_and_keeps_pinned_blocks(name: str) -> None:
    r = measure_speed(name, capacity=500, operations=2_000)
    assert r.pinned == 5
    assert r.put_per_second > 0 and r.touch_per_second > 0 and r.lookup_per_second > 0
