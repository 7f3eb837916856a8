"""Block directory simulator: N SWIM cores carrying the directory in virtual time.

Theory of operation
-------------------
``simulate(DirScenario)`` runs N real ``gossip.swim.Swim`` cores, each with a real
``gossip.directory.Directory``, on ``transport.memory.MemoryNetwork`` (loopback-like delay by
default), on a fixed timeline:

- t = 0: every node starts with the full member list and ``blocks`` blocks (each new block is
  put on ``replicas`` distinct nodes: ``blocks`` counts holdings per node);
- [0, ``warmup``): the directories converge (every node fetches every other node's summary);
- [``warmup``, ``duration``): every node adds and removes blocks as two Poisson processes of
  ``rate / 2`` per second each (a remove takes a random block the node holds). For each change,
  the *staleness* is the time from the ``local_added`` / ``local_removed`` call until every other
  node's view of the holder has reached the version that carries it;
- the same timeline is run a second time with no blocks at all: the difference in bytes sent is
  the directory's traffic (``dir_bytes_per_node_per_s``); the membership-only figure is printed
  next to it.

At the end, on node 0: ``memory_bytes / blocks`` of its remote views (bytes per remote holding,
and per unique block of the mesh), the false-positive rate of one view and of "any view" on keys
nobody holds, and the latency of ``prefix_in_mesh`` / ``lookup_holders`` on a 64-key prefix held
by random other nodes, timed with ``time.perf_counter`` around the call (outside the core).

``--construction BLOCKS`` only times one holder's summary build and its placement in an empty
receiver (both run on the Trio thread of their node): the placement in total and its longest
single call (the receiver places ``install_step`` work units per call, driven by its timer).

Public API: ``DirScenario``, ``DirResult``, ``simulate(scenario)``, ``construction(blocks)``,
``main(argv) -> int`` (``memkv-mesh simulate directory``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from functools import partial

import msgspec

from gossip.directory import Directory, DirectoryConfig
from gossip.messages import STATE_ALIVE, Entry, NodeMeta, wire_meta
from gossip.profile import profile
from gossip.swim import Swim
from transport.memory import MemoryNetwork


class DirScenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nodes: int = 32
    blocks: int = 2000  # holdings per node at start
    replicas: int = 2
    rate: float = 20.0  # holdings changes per node per second (half adds, half removes)
    warmup: float = 10.0
    duration: float = 40.0
    loss: float = 0.0
    delay: float = 0.0002  # one-way, loopback-like
    jitter: float = 0.0002
    seed: int = 1
    fpr_probes: int = 20000
    lookup_reps: int = 2000
    target_load: float = DirectoryConfig().target_load

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError(f"--nodes must be >= 2, got {self.nodes}")
        if self.blocks < 0:
            raise ValueError(f"--blocks must be >= 0, got {self.blocks}")
        if not 1 <= self.replicas <= self.nodes:
            raise ValueError(f"--replicas must be in [1, nodes], got {self.replicas}")
        if self.rate < 0:
            raise ValueError(f"--rate must be >= 0, got {self.rate}")
        if self.warmup <= 0 or self.duration <= self.warmup:
            raise ValueError("--warmup must be > 0 and --duration > --warmup")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"--loss must be in [0, 1), got {self.loss}")
        if self.fpr_probes < 1 or self.lookup_reps < 1:
            raise ValueError("--fpr-probes and --lookup-reps must be >= 1")
        _dir_config(self.target_load)  # validates it


def _dir_config(target_load: float) -> DirectoryConfig:
    """The directory's defaults at another target load (max_load kept above it)."""
    return DirectoryConfig(target_load=target_load, max_load=max(DirectoryConfig().max_load, min(1.0, target_load + 0.07)))


class DirResult(msgspec.Struct, frozen=True, kw_only=True):
    nodes: int
    blocks_per_node: int
    replicas: int
    rate: float
    loss: float
    seed: int
    changes: int
    unreached: int
    add_staleness_p50_s: float | None
    add_staleness_p99_s: float | None
    remove_staleness_p50_s: float | None
    remove_staleness_p99_s: float | None
    bytes_per_remote_holding: float
    bytes_per_mesh_block: float
    memory_bytes_node0: int
    dir_bytes_per_node_per_s: float
    membership_bytes_per_node_per_s: float
    fpr_per_view: float
    fpr_any_view: float
    lookup_prefix64_p50_us: float  # all 64 keys held, their fingerprints cached (a repeat)
    lookup_prefix64_p99_us: float
    lookup_prefix64_cold_p50_us: float  # the same, hashing every key (first sight)
    lookup_prefix64_early_p50_us: float  # the prefix stops at key 8 (cached)
    holders_prefix64_p50_us: float
    prefix_found: int
    table_load_node0: float
    resizes: int  # tables rebuilt, summed over nodes
    overflow_entries: int  # summed over nodes
    gaps: int
    summaries_installed: int
    wall_s: float


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _addr(i: int) -> str:
    return f"10.{i // 250}.{i % 250}.1:7946"


class _Run(msgspec.Struct):
    add_s: list[float]
    remove_s: list[float]
    unreached: int
    held: list[list[bytes]]
    cores: list[Swim]
    bytes_per_node_per_s: float


def _run(sc: DirScenario, with_blocks: bool) -> _Run:
    cfg = profile("default")
    dcfg = _dir_config(sc.target_load)
    rng = random.Random(sc.seed)
    net = MemoryNetwork(sc.seed, loss=sc.loss, delay=sc.delay, jitter=sc.jitter,
                        wire_overhead=cfg.wire_overhead)
    n = sc.nodes
    cores: list[Swim] = []
    for i in range(n):
        node = f"n{i}"
        d = Directory(node, dcfg, random.Random(sc.seed * 7919 + i), epoch=1,
                      udp_limit=cfg.udp_limit, wire_overhead=cfg.wire_overhead)
        meta = NodeMeta(role="both", data_addr=f"10.{i // 250}.{i % 250}.1:7000")
        cores.append(Swim(node, _addr(i), meta, cfg, random.Random(sc.seed * 1_000_003 + i), 0.0,
                          directory=d))
    entries = [Entry(c.id, c.incarnation, STATE_ALIVE, c.addr, wire_meta(c.meta)) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
        net.add(c)

    held: list[list[bytes]] = [[] for _ in range(n)]  # per node, for random removes
    pos: list[dict[bytes, int]] = [{} for _ in range(n)]
    # staleness bookkeeping
    pending: list[list[tuple[float, bool]]] = [[] for _ in range(n)]
    targets: list[list[list[float]]] = [[] for _ in range(n)]  # [ver, t0, is_add, remaining]
    ptr: dict[tuple[int, int], int] = {}
    samples: dict[bool, list[float]] = {True: [], False: []}
    idx_of = {c.id: i for i, c in enumerate(cores)}
    measuring = {"on": False}

    def observer_for(r: int) -> None:
        def obs(holder: str, ver: int, now: float) -> None:
            h = idx_of[holder]
            if h == r:
                for t0, is_add in pending[h]:
                    targets[h].append([float(ver), t0, 1.0 if is_add else 0.0, float(n - 1)])
                pending[h] = []
                return
            tl = targets[h]
            p = ptr.get((r, h), 0)
            while p < len(tl) and tl[p][0] <= ver:
                e = tl[p]
                e[3] -= 1
                if e[3] == 0:
                    samples[e[2] == 1.0].append(now - e[1])
                p += 1
            ptr[(r, h)] = p

        d = cores[r].directory
        assert d is not None
        d.observer = obs

    for r in range(n):
        observer_for(r)

    def add_block(i: int, key: bytes, now: float) -> None:
        if key in pos[i]:
            return
        pos[i][key] = len(held[i])
        held[i].append(key)
        d = cores[i].directory
        assert d is not None
        d.local_added([key], now)
        if measuring["on"]:
            pending[i].append((now, True))
        net.flush(cores[i].addr)

    def remove_block(i: int, now: float) -> None:
        lst = held[i]
        if not lst:
            return
        j = rng.randrange(len(lst))
        key = lst[j]
        last = lst.pop()
        if last != key:
            lst[j] = last
            pos[i][last] = j
        del pos[i][key]
        d = cores[i].directory
        assert d is not None
        d.local_removed([key], now)
        if measuring["on"]:
            pending[i].append((now, False))
        net.flush(cores[i].addr)

    def new_block(i: int, now: float) -> None:
        key = rng.randbytes(32)
        others = [j for j in rng.sample(range(n), min(n, sc.replicas + 1)) if j != i]
        for j in [i, *others[: sc.replicas - 1]]:
            add_block(j, key, now)

    if with_blocks:
        def initial() -> None:
            for i in range(n):
                while len(held[i]) < sc.blocks:
                    new_block(i, net.now)

        net.call_at(0.01, initial)

        def start_measuring() -> None:
            measuring["on"] = True

        net.call_at(sc.warmup, start_measuring)
        if sc.rate > 0:
            for i in range(n):
                for is_add in (True, False):
                    t = sc.warmup + rng.expovariate(sc.rate / 2)
                    while t < sc.duration:
                        net.call_at(t, partial(new_block if is_add else remove_block, i, t))
                        t += rng.expovariate(sc.rate / 2)

    bytes_at_warmup: dict[str, int] = {}

    def snap() -> None:
        bytes_at_warmup.update(net.bytes_sent)

    net.call_at(sc.warmup, snap)
    net.run_until(sc.duration + 5.0)  # a tail so the last changes can arrive
    window = sc.duration + 5.0 - sc.warmup
    sent = sum(net.bytes_sent.values()) - sum(bytes_at_warmup.values())
    unreached = sum(1 for h in range(n) for e in targets[h] if e[3] > 0)
    unreached += sum(len(p) for p in pending)
    return _Run(samples[True], samples[False], unreached, held, cores, sent / window / n)


def simulate(sc: DirScenario) -> DirResult:
    wall0 = time.perf_counter()
    run = _run(sc, True)
    base_bps = _run(sc, False).bytes_per_node_per_s
    held, cores, add_s, rm_s = run.held, run.cores, run.add_s, run.remove_s
    d0 = cores[0].directory
    assert d0 is not None
    remote_holdings = sum(len(h) for h in held[1:])
    unique = len({k for h in held for k in h})
    mem = d0.memory_bytes()
    # false positives on keys nobody holds
    rng = random.Random(sc.seed + 99)
    probes = [rng.randbytes(32) for _ in range(sc.fpr_probes)]
    holders = d0.lookup_holders(probes)
    views = max(1, d0.statistics().views)
    fpr_view = sum(len(h) for h in holders) / (len(probes) * views)
    fpr_any = sum(1 for h in holders if h) / len(probes)
    # a 64-key prefix whose blocks live on random other nodes
    prefix = [rng.choice(held[1 + rng.randrange(sc.nodes - 1)]) for _ in range(64)]
    found = d0.prefix_in_mesh(prefix)
    early = prefix[:8] + [rng.randbytes(32)] + prefix[9:]  # key 8 is held nowhere
    pc = time.perf_counter

    def timed(keys: list[bytes], cold: bool, reps: int) -> list[float]:
        out: list[float] = []
        for _ in range(reps):
            if cold:
                d0.clear_hash_cache()
            t0 = pc()
            d0.prefix_in_mesh(keys)
            out.append(pc() - t0)
        return out

    lat = timed(prefix, False, sc.lookup_reps)
    cold = timed(prefix, True, sc.lookup_reps)
    lat_early = timed(early, False, sc.lookup_reps)
    hl: list[float] = []
    for _ in range(max(1, sc.lookup_reps // 4)):
        t0 = pc()
        d0.lookup_holders(prefix)
        hl.append(pc() - t0)
    st = [c.directory.statistics() for c in cores if c.directory is not None]
    return DirResult(
        nodes=sc.nodes,
        blocks_per_node=sc.blocks,
        replicas=sc.replicas,
        rate=sc.rate,
        loss=sc.loss,
        seed=sc.seed,
        changes=len(add_s) + len(rm_s) + run.unreached,
        unreached=run.unreached,
        add_staleness_p50_s=_pct(add_s, 0.5),
        add_staleness_p99_s=_pct(add_s, 0.99),
        remove_staleness_p50_s=_pct(rm_s, 0.5),
        remove_staleness_p99_s=_pct(rm_s, 0.99),
        bytes_per_remote_holding=mem / max(1, remote_holdings),
        bytes_per_mesh_block=mem / max(1, unique),
        memory_bytes_node0=mem,
        dir_bytes_per_node_per_s=run.bytes_per_node_per_s - base_bps,
        membership_bytes_per_node_per_s=base_bps,
        fpr_per_view=fpr_view,
        fpr_any_view=fpr_any,
        lookup_prefix64_p50_us=(_pct(lat, 0.5) or 0.0) * 1e6,
        lookup_prefix64_p99_us=(_pct(lat, 0.99) or 0.0) * 1e6,
        lookup_prefix64_cold_p50_us=(_pct(cold, 0.5) or 0.0) * 1e6,
        lookup_prefix64_early_p50_us=(_pct(lat_early, 0.5) or 0.0) * 1e6,
        holders_prefix64_p50_us=(_pct(hl, 0.5) or 0.0) * 1e6,
        prefix_found=found,
        table_load_node0=st[0].table_load,
        resizes=sum(s.resizes for s in st),
        overflow_entries=sum(s.overflow_entries for s in st),
        gaps=sum(s.gaps for s in st),
        summaries_installed=sum(s.summaries_installed for s in st),
        wall_s=time.perf_counter() - wall0,
    )


def construction(blocks: int, seed: int = 1) -> dict[str, float]:
    """Seconds to build one holder's summary of ``blocks`` blocks and to place it in an empty
    receiver (the work a summary fetch puts on each side's Trio thread)."""
    rng = random.Random(seed)
    holder = Directory("h", DirectoryConfig(), random.Random(seed), epoch=1)
    holder.local_added((rng.randbytes(32) for _ in range(blocks)), 0.0)
    holder.handle_timer(1.0, [])  # publish (nobody to send to)
    pc = time.perf_counter
    t0 = pc()
    summary = holder.summary()
    t1 = pc()
    receiver = Directory("r", DirectoryConfig(), random.Random(seed + 1), epoch=1)
    receiver.handle_stream(summary, "h:1", 1.0)
    calls = [pc() - t1]
    now = 1.0
    while receiver.statistics().installing:  # what the driver does: the deadline is "now"
        assert receiver.next_deadline() <= now
        t = pc()
        receiver.handle_timer(now, [("h", "h:1")])
        calls.append(pc() - t)
        now += 1e-3
    st = receiver.statistics()
    return {
        "blocks": float(blocks),
        "summary_build_s": t1 - t0,
        "receiver_place_s": sum(calls),
        "receiver_calls": float(len(calls)),
        "receiver_max_call_s": max(calls),
        "summary_bytes_per_block": len(summary.words) / max(1, blocks),
        "table_load": st.table_load,
        "overflow_entries": float(st.overflow_entries),
    }


def _parser() -> argparse.ArgumentParser:
    d = DirScenario()
    p = argparse.ArgumentParser(
        prog="memkv-mesh simulate directory",
        description="Run N SWIM cores with the gossiped block directory in virtual time and "
        "report its memory, staleness, traffic, false-positive rate and lookup latency.",
    )
    p.add_argument("--nodes", type=int, default=d.nodes, help=f"mesh size (default {d.nodes})")
    p.add_argument("--blocks", type=int, default=d.blocks,
                   help=f"blocks held per node at start (default {d.blocks})")
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help=f"nodes each new block is put on (default {d.replicas})")
    p.add_argument("--rate", type=float, default=d.rate,
                   help=f"holdings changes per node per second (default {d.rate})")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=d.duration, help="simulated seconds")
    p.add_argument("--loss", type=float, default=d.loss, help="packet loss rate (default 0)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--target-load", type=float, default=d.target_load,
                   help=f"load a receiver's lookup table is sized for (default {d.target_load})")
    p.add_argument("--fpr-probes", type=int, default=d.fpr_probes)
    p.add_argument("--lookup-reps", type=int, default=d.lookup_reps)
    p.add_argument("--construction", type=int, default=0, metavar="BLOCKS",
                   help="only time building and placing one holder's summary of BLOCKS blocks")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sc = DirScenario(
            nodes=args.nodes, blocks=args.blocks, replicas=args.replicas, rate=args.rate,
            warmup=args.warmup, duration=args.duration, loss=args.loss, seed=args.seed,
            target_load=args.target_load, fpr_probes=args.fpr_probes,
            lookup_reps=args.lookup_reps,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = construction(args.construction, args.seed) if args.construction > 0 else (
        msgspec.to_builtins(simulate(sc))
    )
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
