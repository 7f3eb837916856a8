"""Membership simulator: N real SWIM cores in virtual time over ``transport.memory``.

Theory of operation
-------------------
One run (``simulate(Scenario)``) follows a fixed timeline so its figures are comparable between
the ``default`` and ``memberlist`` profiles:

- t = 0: ``nodes - joins`` members start with the full member list (a converged mesh);
- t in [5, 10): ``joins`` new nodes join through one random seed each (TCP push-pull + gossip);
  ``join_convergence_s`` is the time until every live node sees the joiner alive and the joiner
  sees every live node alive;
- [20, 50): the *idle window*: nothing happens but gossip (and the configured loss/starvation);
  ``bytes_per_node_per_s`` is the bytes sent per node per second in it, as encrypted on the wire
  (msgpack size + 29-byte AEAD envelope; +4-byte frame prefix on streams);
- [50, duration - 60]: ``kill`` nodes crash (kill -9) at uniform random times, and ``updates`` live
  nodes publish new metadata. ``detection_*`` run from a kill until *every* live node marks the
  node dead; ``first_to_last_s`` is from the first node's dead mark to the last one's;
  ``dissemination_p99_s`` is the p99 over updates of the time until 99.99% of live nodes hold it;
- starvation: ``starve`` x nodes nodes (never killed ones) freeze for ``starve_s`` seconds at
  Poisson random times (mean gap ``starve_every_s``) from t = 20 on;
- ``false_suspicions`` counts suspicions a node *started itself* (a failed probe) about a node
  that was alive; ``false_deaths`` counts the times a node's own suspicion timer declared an alive
  node dead (with a partition: not counting the marks across the split, reported apart);
- partition (``partition_s > 0``): at t = 60 a random ``partition_nodes`` nodes are cut off from
  the rest (``MemoryNetwork.partition``), at ``60 + partition_s`` the network heals. ``heal_s``
  is the time from the heal until every node sees every other node alive, for good (the last time
  that became true; None if it is not true at the end). ``false_deaths_uncut`` counts the dead
  marks (by anyone's timer or gossip) of a member of the larger side by members of the larger
  side, ``false_deaths_within_sides`` those within either side, ``cross_deaths`` the (expected)
  marks across the split and ``cross_deaths_after_heal`` those of them made after the heal (a
  suspicion that ran out within a moment of the heal, refuted soon after);
  ``partition_bytes_per_node_per_s`` and ``heal_bytes_per_node_per_s`` are
  the bytes sent during the partition and in the 30 s after the heal. Kills cannot be combined
  with a partition.

Public API: ``Scenario``, ``Result``, ``simulate(scenario) -> Result``, ``pooled(results)``,
``make_core``, ``node_addr``.
"""

from __future__ import annotations

import math
import random
import time

import msgspec

from gossip.events import MembershipEvent
from gossip.messages import STATE_ALIVE, Entry, NodeMeta, wire_meta
from gossip.profile import SwimConfig, profile
from gossip.swim import Swim
from transport.memory import MemoryNetwork

JOIN_START = 5.0
IDLE_START = 20.0
IDLE_END = 50.0
TAIL = 60.0  # no kill or update in the last minute, so detection can finish
PARTITION_START = 60.0  # after the idle window, so the idle bytes are the same as without
HEAL_WINDOW = 30.0  # heal_bytes_per_node_per_s is measured over this long after the heal


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nodes: int = 64
    loss: float = 0.01
    kill: int = 0
    starve: float = 0.0
    starve_s: float = 2.0
    starve_every_s: float = 60.0
    duration: float = 120.0
    seed: int = 1
    profile: str = "default"
    joins: int = 1
    updates: int = 0
    delay: float = 0.0005
    jitter: float = 0.0005
    partition_s: float = 0.0
    partition_nodes: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 3:
            raise ValueError(f"--nodes must be >= 3, got {self.nodes}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"--loss must be in [0, 1), got {self.loss}")
        if self.kill < 0 or self.kill > self.nodes - self.joins - 2:
            raise ValueError(f"--kill must be in [0, nodes - joins - 2], got {self.kill}")
        if not 0.0 <= self.starve <= 0.5:
            raise ValueError(f"--starve must be a fraction in [0, 0.5], got {self.starve}")
        if self.starve_s <= 0 or self.starve_every_s <= 0:
            raise ValueError("--starve-seconds and --starve-every must be > 0")
        if self.joins < 0 or self.joins >= self.nodes - 1:
            raise ValueError(f"--joins must be in [0, nodes - 2], got {self.joins}")
        if self.updates < 0:
            raise ValueError(f"--updates must be >= 0, got {self.updates}")
        if self.duration < IDLE_END:
            raise ValueError(f"--duration must be >= {IDLE_END} s, got {self.duration}")
        if (self.kill or self.updates) and self.duration < IDLE_END + TAIL + 10:
            raise ValueError(
                f"--duration must be >= {IDLE_END + TAIL + 10} s with --kill or --updates"
            )
        if self.partition_s < 0:
            raise ValueError(f"--partition-s must be >= 0, got {self.partition_s}")
        if self.partition_s > 0:
            if not 1 <= self.partition_nodes <= self.nodes - 1:
                raise ValueError(
                    f"--partition-nodes must be in [1, nodes - 1], got {self.partition_nodes}"
                )
            if self.kill:
                raise ValueError("--kill cannot be combined with --partition-s")
            if self.duration < PARTITION_START + self.partition_s + 60:
                raise ValueError(
                    f"--duration must be >= {PARTITION_START + self.partition_s + 60:g} s with "
                    f"--partition-s {self.partition_s:g} (60 s after the heal)"
                )
        profile(self.profile)  # validates the name


class Result(msgspec.Struct, frozen=True, kw_only=True):
    profile: str
    nodes: int
    loss: float
    seed: int
    duration: float
    detection_p50_s: float | None
    detection_p99_s: float | None
    detection_max_s: float | None
    first_to_last_s: float | None
    undetected: int
    false_deaths: int
    false_suspicions: int
    bytes_per_node_per_s: float
    bytes_per_node_per_s_total: float
    join_convergence_s: float | None
    dissemination_p99_s: float | None
    kills: int
    starved_nodes: int
    starvations: int
    events: int
    wall_s: float
    detection_samples_s: list[float] = []
    spread_samples_s: list[float] = []
    dissemination_samples_s: list[float] = []
    partition_s: float = 0.0
    partition_nodes: int = 0
    heal_s: float | None = None
    false_deaths_uncut: int = 0
    false_deaths_within_sides: int = 0
    suspicions_within_sides: int = 0
    cross_deaths: int = 0
    cross_deaths_after_heal: int = 0
    partition_bytes_per_node_per_s: float = 0.0
    heal_bytes_per_node_per_s: float = 0.0
    reconnects: int = 0


def node_addr(i: int) -> str:
    return f"10.{i // 250}.{i % 250}.1:7946"


def make_core(i: int, cfg: SwimConfig, seed: int, now: float, inc: int = 1) -> Swim:
    meta = NodeMeta(role="both", capacity_weight=1.0, data_addr=f"10.{i // 250}.{i % 250}.1:7000")
    return Swim(f"n{i}", node_addr(i), meta, cfg, random.Random(seed * 1_000_003 + i), now,
                incarnation=inc)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    idx = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[idx]


def simulate(sc: Scenario) -> Result:
    wall0 = time.perf_counter()
    cfg = profile(sc.profile)
    rng = random.Random(sc.seed)
    net = MemoryNetwork(sc.seed, loss=sc.loss, delay=sc.delay, jitter=sc.jitter,
                        wire_overhead=cfg.wire_overhead)
    n0 = sc.nodes - sc.joins
    cores = [make_core(i, cfg, sc.seed, 0.0) for i in range(n0)]
    entries = [Entry(c.id, c.incarnation, STATE_ALIVE, c.addr, wire_meta(c.meta)) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
        net.add(c)
    id_of_addr = {node_addr(i): f"n{i}" for i in range(sc.nodes)}
    killed_at: dict[str, float] = {}
    joined_at: dict[str, float] = {}
    # observer -> time the observer marked the node dead, per killed node
    dead_seen: dict[str, dict[str, float]] = {}
    join_seen: dict[str, dict[str, float]] = {}
    upd_seen: dict[tuple[str, int], dict[str, float]] = {}
    upd_at: dict[tuple[str, int], float] = {}
    counts = {"false_deaths": 0, "false_susp": 0, "events": 0, "uncut": 0, "within": 0,
              "susp_within": 0, "cross": 0, "cross_after": 0}  # fmt: skip

    # partition: side of each node (0 = the cut-off group), the larger side is "uncut"
    side: dict[str, int] = {}
    uncut = 1
    t_split = PARTITION_START
    t_heal = PARTITION_START + sc.partition_s
    if sc.partition_s > 0:
        order = list(range(sc.nodes))
        random.Random(sc.seed * 7919 + 17).shuffle(order)  # own stream: other draws unchanged
        cut = set(order[: sc.partition_nodes])
        side = {f"n{i}": (0 if i in cut else 1) for i in range(sc.nodes)}
        uncut = 1 if sc.nodes - sc.partition_nodes >= sc.partition_nodes else 0
        groups = [[node_addr(i) for i in sorted(cut)],
                  [node_addr(i) for i in range(sc.nodes) if i not in cut]]
        net.call_at(t_split, lambda: net.partition(groups))
    # after the heal: per observer, the nodes it does not see alive; one mesh = all empty
    not_alive: dict[str, set[str]] = {}
    mesh = {"bad": 0, "ok_since": -1.0}

    def on_event(addr: str, ev: MembershipEvent) -> None:
        counts["events"] += 1
        obs = id_of_addr[addr]
        node = ev.node_id
        kind = ev.kind
        cross = bool(side) and side[obs] != side[node]
        if side and not cross and (kind == "dead" or kind == "suspect"):
            counts["within" if kind == "dead" else "susp_within"] += 1
            if kind == "dead" and side[obs] == uncut:
                counts["uncut"] += 1
        if kind == "dead":
            if cross:
                counts["cross"] += 1
                if ev.at >= t_heal:
                    counts["cross_after"] += 1
            if node in killed_at:
                dead_seen[node].setdefault(obs, ev.at)
            elif ev.source == obs and not cross:
                counts["false_deaths"] += 1
        elif kind == "suspect":
            if ev.source == obs and node not in killed_at and not cross:
                counts["false_susp"] += 1
        elif kind == "join" or kind == "update" or kind == "alive":
            if node in join_seen:
                join_seen[node].setdefault(obs, ev.at)
            if kind == "update" and upd_at:
                key = (node, ev.incarnation)
                if key in upd_seen:
                    upd_seen[key].setdefault(obs, ev.at)
        if not_alive:
            bad = not_alive[obs]
            if kind == "join" or kind == "update" or kind == "alive":
                if node in bad:
                    bad.discard(node)
                    if not bad:
                        mesh["bad"] -= 1
                        if mesh["bad"] == 0:
                            mesh["ok_since"] = ev.at
            elif node not in bad:
                if not bad:
                    mesh["bad"] += 1
                    mesh["ok_since"] = -1.0
                bad.add(node)

    def heal() -> None:
        net.heal()
        ids = [f"n{i}" for i in range(sc.nodes)]
        for i in range(sc.nodes):
            core = net.nodes[node_addr(i)]
            not_alive[core.id] = {o for o in ids if o != core.id and core.state_of(o) != "alive"}
        mesh["bad"] = sum(1 for b in not_alive.values() if b)
        mesh["ok_since"] = net.now if mesh["bad"] == 0 else -1.0

    if sc.partition_s > 0:
        net.call_at(t_heal, heal)

    net.on_event = on_event

    # joins
    for j in range(sc.joins):
        i = n0 + j
        t = JOIN_START + rng.random() * 5.0
        seed_addr = node_addr(rng.randrange(n0))

        def do_join(i: int = i, t: float = t, seed_addr: str = seed_addr) -> None:
            core = make_core(i, cfg, sc.seed, t)
            joined_at[core.id] = t
            join_seen[core.id] = {}
            net.add(core)
            core.join([seed_addr], t)
            net.flush(core.addr)

        net.call_at(t, do_join)

    # kills and metadata updates
    all_ids = list(range(n0))
    rng.shuffle(all_ids)
    victims = all_ids[: sc.kill]
    others = all_ids[sc.kill:]
    lo, hi = IDLE_END, sc.duration - TAIL
    for i in victims:
        t = lo + rng.random() * (hi - lo)

        def do_kill(i: int = i) -> None:
            killed_at[f"n{i}"] = net.now
            dead_seen[f"n{i}"] = {}
            net.kill(node_addr(i))

        net.call_at(t, do_kill)
    for _ in range(sc.updates):
        i = rng.choice(others)
        t = lo + rng.random() * (hi - lo)

        def do_update(i: int = i) -> None:
            core = net.nodes[node_addr(i)]
            core.update_meta(msgspec.structs.replace(core.meta, capacity_weight=2.0), net.now)
            key = (core.id, core.incarnation)
            upd_at[key] = net.now
            upd_seen[key] = {core.id: net.now}
            net.flush(core.addr)

        net.call_at(t, do_update)

    # starvation
    n_starved = round(sc.starve * sc.nodes)
    starved = others[:n_starved] if n_starved <= len(others) else others
    starvations = 0
    for i in starved:
        t = IDLE_START + rng.expovariate(1.0 / sc.starve_every_s)
        while t < sc.duration:
            net.starve(node_addr(i), t, sc.starve_s)
            starvations += 1
            t += sc.starve_s + rng.expovariate(1.0 / sc.starve_every_s)

    # run: measure the bytes of the idle window (and of the partition and the heal)
    marks = {IDLE_START, IDLE_END, sc.duration}
    if sc.partition_s > 0:
        marks |= {t_split, t_heal, t_heal + HEAL_WINDOW}
    sent: dict[float, int] = {}
    for t in sorted(marks):
        net.run_until(t)
        sent[t] = sum(net.bytes_sent.values())
    idle_bps = (sent[IDLE_END] - sent[IDLE_START]) / sc.nodes / (IDLE_END - IDLE_START)
    total_bps = sent[sc.duration] / sc.nodes / sc.duration
    part_bps = heal_bps = 0.0
    heal_s: float | None = None
    if sc.partition_s > 0:
        part_bps = (sent[t_heal] - sent[t_split]) / sc.nodes / sc.partition_s
        heal_bps = (sent[t_heal + HEAL_WINDOW] - sent[t_heal]) / sc.nodes / HEAL_WINDOW
        if mesh["bad"] == 0 and mesh["ok_since"] >= 0:
            heal_s = mesh["ok_since"] - t_heal

    live_ids = {f"n{i}" for i in range(sc.nodes)} - set(killed_at)

    # detection
    detections: list[float] = []
    spreads: list[float] = []
    undetected = 0
    for node, t_kill in killed_at.items():
        # observers: nodes alive at the end, and the other victims killed after detection
        seen = dead_seen[node]
        observers = [o for o in live_ids]
        times = [seen.get(o) for o in observers]
        if any(t is None for t in times):
            undetected += 1
            continue
        ts = [t for t in times if t is not None]
        detections.append(max(ts) - t_kill)
        spreads.append(max(ts) - min(ts))

    # join convergence: every live node sees the joiner, the joiner sees every live node
    joins: list[float] = []
    for node, t_join in joined_at.items():
        seen = join_seen[node]
        others_t = [seen.get(o) for o in live_ids if o != node]
        if any(t is None for t in others_t):
            joins.append(math.inf)
            continue
        core = net.nodes[node_addr(int(node[1:]))]
        # when did the joiner itself learn everyone? push-pull gives it the table at once;
        # use its own join events via its member list state at the end as a sanity check
        missing = [o for o in live_ids if o != node and core.state_of(o) != "alive"]
        if missing:
            joins.append(math.inf)
            continue
        joins.append(max(t for t in others_t if t is not None) - t_join)

    # dissemination
    diss: list[float] = []
    need = math.ceil(0.9999 * len(live_ids))
    for key, t0 in upd_at.items():
        ts = sorted(upd_seen[key].values())
        if len(ts) < need:
            diss.append(math.inf)
        else:
            diss.append(ts[need - 1] - t0)

    def fin(x: float | None) -> float | None:
        if x is None:
            return None
        return round(x, 3) if math.isfinite(x) else None

    return Result(
        profile=sc.profile,
        nodes=sc.nodes,
        loss=sc.loss,
        seed=sc.seed,
        duration=sc.duration,
        detection_p50_s=fin(_pct(detections, 0.50)),
        detection_p99_s=fin(_pct(detections, 0.99)),
        detection_max_s=fin(max(detections) if detections else None),
        first_to_last_s=fin(_pct(spreads, 0.99)),
        undetected=undetected,
        false_deaths=counts["false_deaths"],
        false_suspicions=counts["false_susp"],
        bytes_per_node_per_s=round(idle_bps, 1),
        bytes_per_node_per_s_total=round(total_bps, 1),
        join_convergence_s=fin(max(joins) if joins else None),
        dissemination_p99_s=fin(_pct(diss, 0.99)),
        kills=len(killed_at),
        starved_nodes=len(starved),
        starvations=starvations,
        events=counts["events"],
        wall_s=round(time.perf_counter() - wall0, 2),
        detection_samples_s=[round(x, 3) for x in detections],
        spread_samples_s=[round(x, 3) for x in spreads],
        dissemination_samples_s=[round(x, 3) if math.isfinite(x) else -1.0 for x in diss],
        partition_s=sc.partition_s,
        partition_nodes=sc.partition_nodes if sc.partition_s > 0 else 0,
        heal_s=fin(heal_s),
        false_deaths_uncut=counts["uncut"],
        false_deaths_within_sides=counts["within"],
        suspicions_within_sides=counts["susp_within"],
        cross_deaths=counts["cross"],
        cross_deaths_after_heal=counts["cross_after"],
        partition_bytes_per_node_per_s=round(part_bps, 1),
        heal_bytes_per_node_per_s=round(heal_bps, 1),
        reconnects=sum(c.counters().reconnects for c in net.nodes.values()),
    )


def pooled(results: list[Result]) -> dict[str, object]:
    """Figures over several seeded runs: percentiles of the pooled samples, worst cases, sums."""
    det = [x for r in results for x in r.detection_samples_s]
    spread = [x for r in results for x in r.spread_samples_s]
    diss = [x if x >= 0 else math.inf for r in results for x in r.dissemination_samples_s]
    joins = [r.join_convergence_s for r in results]
    ok = sum(1 for j in joins if j is not None and j <= 5.0)
    finite_joins = [j for j in joins if j is not None]

    def fin(x: float | None) -> float | None:
        return round(x, 3) if x is not None and math.isfinite(x) else None

    return {
        "profile": results[0].profile,
        "nodes": results[0].nodes,
        "loss": results[0].loss,
        "runs": len(results),
        "seeds": [r.seed for r in results],
        "kills": sum(r.kills for r in results),
        "detection_p50_s": fin(_pct(det, 0.50)),
        "detection_p99_s": fin(_pct(det, 0.99)),
        "detection_max_s": fin(max(det) if det else None),
        "first_to_last_s": fin(_pct(spread, 0.99)),
        "undetected": sum(r.undetected for r in results),
        "false_deaths": sum(r.false_deaths for r in results),
        "false_suspicions": sum(r.false_suspicions for r in results),
        "bytes_per_node_per_s": round(
            sum(r.bytes_per_node_per_s for r in results) / len(results), 1
        ),
        "bytes_per_node_per_s_max": max(r.bytes_per_node_per_s for r in results),
        "join_convergence_s": fin(max(finite_joins)) if len(finite_joins) == len(joins) else None,
        "join_convergence_within_5s": f"{ok}/{len(results)}",
        "dissemination_p99_s": fin(_pct(diss, 0.99)),
        "starvations": sum(r.starvations for r in results),
        "wall_s": round(sum(r.wall_s for r in results), 2),
        **(_pooled_partition(results) if results[0].partition_s > 0 else {}),
    }


def _pooled_partition(results: list[Result]) -> dict[str, object]:
    heals = [r.heal_s for r in results]
    done = [h for h in heals if h is not None]
    return {
        "partition_s": results[0].partition_s,
        "partition_nodes": results[0].partition_nodes,
        "heal_s_max": max(done) if len(done) == len(heals) else None,
        "heal_s_p50": _pct(done, 0.5),
        "healed_within_30s": f"{sum(1 for h in done if h <= 30.0)}/{len(results)}",
        "false_deaths_uncut": sum(r.false_deaths_uncut for r in results),
        "false_deaths_within_sides": sum(r.false_deaths_within_sides for r in results),
        "suspicions_within_sides": sum(r.suspicions_within_sides for r in results),
        "cross_deaths": sum(r.cross_deaths for r in results),
        "cross_deaths_after_heal": sum(r.cross_deaths_after_heal for r in results),
        "partition_bytes_per_node_per_s": round(
            sum(r.partition_bytes_per_node_per_s for r in results) / len(results), 1
        ),
        "heal_bytes_per_node_per_s": round(
            sum(r.heal_bytes_per_node_per_s for r in results) / len(results), 1
        ),
        "reconnects": sum(r.reconnects for r in results),
    }
