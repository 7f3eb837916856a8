"""``memkv-mesh simulate eviction``: replay a trace through the eviction policies.

The metric is the mesh simulator's prefix-hit ratio (issue 5): requests are replayed in file
order; a request's hits are the leading run of its ``hash_ids`` that are cached when it arrives;
then each of its blocks, in order, is touched if cached or inserted if not (evicting with
``pop_victim`` until the cache holds at most C blocks, all blocks the same size); the ratio is
hits over all block references. The plain block-hit ratio (any cached block counts, leading or
not) is reported next to it, and so is each policy's speed in policy calls per second
(insert, touch, pop_victim and membership checks, timed over the whole replay).

``--speed`` adds a microbenchmark closer to the store's use: 32-byte keys, a full cache, 1% of
the blocks pinned (``can_evict`` refuses them), and the cost of a put (insert + pop_victim), a
hit (touch) and a lookup (``in``) measured separately.

``--order reverse`` inserts/touches each request's blocks from the last to the first instead, so
that a request's root blocks end up the most recently used: the prefix-aware call order a store
could use (see docs/eviction.md).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from memkv_mesh.eviction import POLICIES, make_policy

DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "conversation_trace.jsonl"
UNBOUNDED = 0  # capacity value meaning "never evict"


@dataclass(frozen=True, slots=True)
class ReplayResult:
    policy: str
    capacity: int  # blocks; 0 = unbounded
    order: str
    requests: int
    references: int
    prefix_hits: int
    block_hits: int
    calls: int
    seconds: float

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hits / self.references if self.references else 0.0

    @property
    def block_hit_ratio(self) -> float:
        return self.block_hits / self.references if self.references else 0.0

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else math.inf


def load_trace(path: Path) -> list[list[int]]:
    """Read the ``hash_ids`` of every request of a JSONL trace, in file order."""
    requests: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
            ids = record.get("hash_ids") if isinstance(record, dict) else None
            if not isinstance(ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in ids
            ):
                raise ValueError(f"{path}:{lineno}: 'hash_ids' must be a list of integers")
            requests.append(ids)
    return requests


def replay(
    requests: Sequence[Sequence[int]], policy_name: str, capacity: int, *, order: str = "forward"
) -> ReplayResult:
    """Replay ``requests`` through a fresh policy holding at most ``capacity`` blocks."""
    if order not in ("forward", "reverse"):
        raise ValueError(f"order must be 'forward' or 'reverse', got {order!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (0 = unbounded), got {capacity}")
    bounded = capacity != UNBOUNDED
    policy = make_policy(policy_name, capacity if bounded else 1 << 62)
    contains = policy.__contains__
    insert = policy.insert
    touch = policy.touch
    pop_victim = policy.pop_victim
    prefix_hits = block_hits = references = calls = 0
    reverse = order == "reverse"
    start = time.perf_counter()
    for ids in requests:
        references += len(ids)
        for h in ids:
            calls += 1
            if contains(h):
                prefix_hits += 1
            else:
                break
        for h in reversed(ids) if reverse else ids:
            calls += 2
            if contains(h):
                block_hits += 1
                touch(h)
            else:
                insert(h, 1)
                if bounded:
                    while len(policy) > capacity:
                        calls += 1
                        pop_victim()
    seconds = time.perf_counter() - start
    return ReplayResult(
        policy=policy_name,
        capacity=capacity,
        order=order,
        requests=len(requests),
        references=references,
        prefix_hits=prefix_hits,
        block_hits=block_hits,
        calls=calls,
        seconds=seconds,
    )


@dataclass(frozen=True, slots=True)
class SpeedResult:
    policy: str
    capacity: int
    pinned: int
    put_per_second: float  # insert + pop_victim(can_evict) on a full cache
    touch_per_second: float
    lookup_per_second: float


def measure_speed(
    policy_name: str,
    *,
    capacity: int = 10_000,
    operations: int = 100_000,
    pinned_fraction: float = 0.01,
    seed: int = 0,
) -> SpeedResult:
    """Time put (insert + pop_victim), touch and lookup on a full cache with pinned blocks."""
    rng = random.Random(seed)
    policy = make_policy(policy_name, capacity)
    first = [rng.randbytes(32) for _ in range(capacity)]
    fresh = [rng.randbytes(32) for _ in range(operations)]
    for key in first:
        policy.insert(key, 1)
    pinned = set(rng.sample(first, int(capacity * pinned_fraction)))

    def can_evict(key: object) -> bool:
        return key not in pinned

    insert, pop_victim = policy.insert, policy.pop_victim
    start = time.perf_counter()
    for key in fresh:
        insert(key, 1)
        pop_victim(can_evict)
    put_s = time.perf_counter() - start
    if any(key not in policy for key in pinned):
        raise AssertionError(f"{policy_name}: a pinned block was evicted")
    resident = [k for k in fresh[-capacity:] + first if k in policy]
    picks = [resident[rng.randrange(len(resident))] for _ in range(operations)]
    touch = policy.touch
    start = time.perf_counter()
    for key in picks:
        touch(key)
    touch_s = time.perf_counter() - start
    contains = policy.__contains__
    start = time.perf_counter()
    for key in picks:
        contains(key)
    lookup_s = time.perf_counter() - start
    return SpeedResult(
        policy=policy_name,
        capacity=capacity,
        pinned=len(pinned),
        put_per_second=operations / put_s,
        touch_per_second=operations / touch_s,
        lookup_per_second=operations / lookup_s,
    )


def replay_belady(requests: Sequence[Sequence[int]], capacity: int) -> ReplayResult:
    """Replay with Belady's offline rule (evict the block whose next use is farthest).

    Not a policy (it reads the future): a reference line for how much a policy leaves on the
    table. Every missed block is still admitted, as with the real policies, so it is optimal for
    the plain block-hit ratio under forced admission, and an informative, if not strictly
    optimal, figure for the prefix-hit ratio.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (0 = unbounded), got {capacity}")
    never = 1 << 62
    flat = [h for ids in requests for h in ids]
    next_use = [never] * len(flat)
    seen: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = seen.get(flat[i], never)
        seen[flat[i]] = i
    cached: dict[int, int] = {}  # block -> position of its next use
    heap: list[tuple[int, int]] = []  # (-next use, block); stale entries skipped
    prefix_hits = block_hits = references = 0
    pos = 0
    start = time.perf_counter()
    for ids in requests:
        references += len(ids)
        for h in ids:
            if h not in cached:
                break
            prefix_hits += 1
        for h in ids:
            if h in cached:
                block_hits += 1
            cached[h] = next_use[pos]
            heapq.heappush(heap, (-next_use[pos], h))
            pos += 1
            while capacity != UNBOUNDED and len(cached) > capacity:
                neg, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg:
                    del cached[victim]
    return ReplayResult(
        policy="opt",
        capacity=capacity,
        order="forward",
        requests=len(requests),
        references=references,
        prefix_hits=prefix_hits,
        block_hits=block_hits,
        calls=0,
        seconds=time.perf_counter() - start,
    )


def _parse_capacities(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("inf", "unbounded"):
            out.append(UNBOUNDED)
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"capacity {part!r} is not a whole number of blocks (or 'inf')"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"capacity {part!r} must be positive (or 'inf')")
        out.append(value)
    return out


def _parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise argparse.ArgumentTypeError(
                f"unknown policy {name!r}; choose from {', '.join(POLICIES)}"
            )
    if not names:
        raise argparse.ArgumentTypeError("no policy named")
    return names


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memkv-mesh simulate eviction",
        description="Prefix-hit and block-hit ratios of the eviction policies on a trace.",
    )
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="JSONL trace file")
    parser.add_argument(
        "--capacities",
        type=_parse_capacities,
        default=_parse_capacities("1000,2000,6000,20000"),
        help="comma-separated cache sizes in blocks; 'inf' for unbounded",
    )
    parser.add_argument(
        "--policies",
        type=_parse_policies,
        default=list(POLICIES),
        help=f"comma-separated policies (default all: {','.join(POLICIES)})",
    )
    parser.add_argument(
        "--order",
        choices=("forward", "reverse", "both"),
        default="forward",
        help="order a request's blocks are inserted/touched in (default forward)",
    )
    parser.add_argument(
        "--opt",
        action="store_true",
        help="also print Belady's offline optimum (reads the future; a reference, not a policy)",
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="also time put/touch/lookup on a full 10,000-block cache with 1%% pinned",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str]) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        requests = load_trace(args.trace)
    except OSError as exc:
        parser.error(f"cannot read --trace {args.trace}: {exc.strerror or exc}")
    except ValueError as exc:
        parser.error(f"bad --trace: {exc}")
    orders = ["forward", "reverse"] if args.order == "both" else [args.order]
    results = [
        replay(requests, name, cap, order=order)
        for order in orders
        for name in args.policies
        for cap in args.capacities
    ]
    if args.opt:
        results += [replay_belady(requests, cap) for cap in args.capacities]
    speeds = [measure_speed(name) for name in args.policies] if args.speed else []
    if args.json:
        print(
            json.dumps(
                {
                    "trace": str(args.trace),
                    "requests": len(requests),
                    "references": sum(len(r) for r in requests),
                    "results": [
                        {
                            **asdict(r),
                            "prefix_hit_ratio": r.prefix_hit_ratio,
                            "block_hit_ratio": r.block_hit_ratio,
                            "calls_per_second": r.calls_per_second if r.calls else None,
                        }
                        for r in results
                    ],
                    "speed": [asdict(s) for s in speeds],
                },
                indent=2,
            )
        )
        return 0
    refs = sum(len(r) for r in requests)
    print(f"trace {args.trace}: {len(requests)} requests, {refs} block references")
    header = f"{'policy':<16} {'order':<8} {'capacity':>9} {'prefix-hit':>10} {'block-hit':>9} {'calls/s':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        cap = "inf" if r.capacity == UNBOUNDED else str(r.capacity)
        speed = f"{r.calls_per_second:>11,.0f}" if r.calls else f"{'-':>11}"
        print(
            f"{r.policy:<16} {r.order:<8} {cap:>9} {r.prefix_hit_ratio:>10.4f} "
            f"{r.block_hit_ratio:>9.4f} {speed}"
        )
    if speeds:
        print()
        print(
            f"speed on a full {speeds[0].capacity:,}-block cache, {speeds[0].pinned} pinned, "
            "32-byte keys (operations per second):"
        )
        header = f"{'policy':<16} {'put':>11} {'touch':>11} {'lookup':>11}"
        print(header)
        print("-" * len(header))
        for s in speeds:
            print(
                f"{s.policy:<16} {s.put_per_second:>11,.0f} {s.touch_per_second:>11,.0f} "
                f"{s.lookup_per_second:>11,.0f}"
            )
    return 0
