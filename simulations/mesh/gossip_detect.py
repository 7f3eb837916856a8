"""Failure-detection timing from the real SWIM cores (``gossip/``) for the mesh simulator.

Every node of the simulated cluster (GPU nodes first, then flash nodes) runs a real
``gossip.swim.Swim`` core on ``transport.memory.MemoryNetwork`` in virtual time, from a converged
member list at t = 0 until the end of the trace. Flash nodes named by ``failure.kill`` crash at
their times. A crash is *detected* for the mesh when every live node has marked it dead (its view
has converged), which is when the engine drops it from placement and re-replication starts; the
first and median marks are reported too.

Membership traffic does not depend on the KV traffic (the gossip runs on its own UDP socket), so the
two are run one after the other in the same virtual time rather than interleaved; the result is
the same. False deaths (alive nodes declared dead) are counted and reported, not fed to the mesh.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gossip.events import MembershipEvent
from gossip.messages import STATE_ALIVE, Entry, wire_meta
from gossip.profile import profile
from simulations.membership import make_core, node_addr
from transport.memory import MemoryNetwork

from .engine import FailureEvent
from .spec import SimSpec, parse_kill

__all__ = ["GossipTiming", "gossip_failures"]


@dataclass
class GossipTiming:
    failures: list[FailureEvent]
    info: dict[str, Any] = field(default_factory=dict)


def gossip_failures(
    spec: SimSpec,
    *,
    until_s: float,
    seed: int = 1,
    loss: float = 0.0,
    profile_name: str = "default",
    progress: bool = False,
) -> GossipTiming:
    """Run the SWIM cores for the whole cluster until ``until_s`` and time each kill's detection."""
    c = spec.cluster
    kills = [parse_kill(k, c.flash_nodes) for k in spec.failure.kill]
    n = c.gpu_nodes + c.flash_nodes
    if n < 3:
        raise ValueError("--gossip needs at least 3 nodes in the cluster")
    end = max([until_s, *(t + 60.0 for _, t in kills)])
    wall0 = time.perf_counter()
    cfg = profile(profile_name)
    net = MemoryNetwork(seed, loss=loss, wire_overhead=cfg.wire_overhead)
    cores = [make_core(i, cfg, seed, 0.0) for i in range(n)]
    entries = [Entry(x.id, x.incarnation, STATE_ALIVE, x.addr, wire_meta(x.meta)) for x in cores]
    for x in cores:
        x.seed_members(entries, 0.0)
        net.add(x)
    id_of_addr = {node_addr(i): f"n{i}" for i in range(n)}
    victims = {f"n{c.gpu_nodes + f}": (f, t) for f, t in kills}
    killed: set[str] = set()
    marks: dict[str, dict[str, float]] = {v: {} for v in victims}
    counts = {"false_deaths": 0, "events": 0}

    def on_event(addr: str, ev: MembershipEvent) -> None:
        counts["events"] += 1
        if ev.kind != "dead":
            return
        if ev.node_id in killed:
            marks[ev.node_id].setdefault(id_of_addr[addr], ev.at)
        elif ev.source == id_of_addr[addr]:
            counts["false_deaths"] += 1

    net.on_event = on_event
    for vid, (f, t) in victims.items():

        def do_kill(vid: str = vid, f: int = f) -> None:
            killed.add(vid)
            net.kill(node_addr(c.gpu_nodes + f))

        net.call_at(t, do_kill)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(end), desc=f"gossip ({n} nodes)", unit="sim-s", file=sys.stderr,
                   mininterval=0.5, leave=False)  # fmt: skip
    step = 10.0
    t = 0.0
    while t < end:
        t = min(end, t + step)
        net.run_until(t)
        if bar is not None:
            bar.update(int(t) - bar.n)
    if bar is not None:
        bar.close()

    live = {f"n{i}" for i in range(n)} - killed
    failures: list[FailureEvent] = []
    per_kill: list[dict[str, Any]] = []
    for vid, (f, t_kill) in victims.items():
        seen = marks[vid]
        times = sorted(seen[o] for o in live if o in seen)
        complete = len(times) == len(live)
        t_detect = times[-1] if complete else math.inf
        failures.append(FailureEvent(f, t_kill, t_detect))
        per_kill.append(
            {
                "node": f"flash-{f}",
                "t_kill_s": t_kill,
                "first_mark_s": times[0] - t_kill if times else None,
                "median_mark_s": times[len(times) // 2] - t_kill if times else None,
                "all_marked_s": t_detect - t_kill if complete else None,
            }
        )
    total_bytes = sum(net.bytes_sent.values())
    info = {
        "nodes": n,
        "profile": profile_name,
        "loss": loss,
        "simulated_s": end,
        "detections": per_kill,
        "false_deaths": counts["false_deaths"],
        "membership_events": counts["events"],
        "gossip_bytes_per_node_per_s": total_bytes / n / end if end > 0 else 0.0,
        "wall_s": time.perf_counter() - wall0,
    }
    return GossipTiming(sorted(failures, key=lambda e: e.t_kill), info)
