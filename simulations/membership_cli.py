"""``memkv-mesh simulate membership``: run the membership simulator and print its figures.

One run prints one JSON object (``--json``) or a table; ``--runs R`` repeats the scenario with
seeds S, S+1, ... and prints one JSON object of pooled figures (percentiles over all kills of all
runs, worst join convergence and how many runs converged within 5 s, summed false deaths; with
``--partition-s``, the worst heal time and how many runs healed within 30 s).

``--partition-s P --partition-nodes K``: K random nodes are cut off from the rest at t = 60 for P
seconds, then the network heals (see ``simulations/membership.py``).

Public API: ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import msgspec

from gossip.profile import PROFILES
from simulations.membership import PARTITION_START, Scenario, pooled, simulate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memkv-mesh simulate membership",
        description="Run N SWIM/Lifeguard cores in virtual time and report detection, false "
        "deaths, bytes per node and convergence.",
    )
    p.add_argument("--nodes", type=int, default=64, help="mesh size N (default 64)")
    p.add_argument("--loss", type=float, default=0.01, help="packet loss rate (default 0.01)")
    p.add_argument("--kill", type=int, default=0, help="nodes to crash during the run")
    p.add_argument("--starve", type=float, default=0.0,
                   help="fraction of nodes that stall for --starve-seconds at random times")
    p.add_argument("--starve-seconds", type=float, default=2.0, help="stall length (default 2)")
    p.add_argument("--starve-every", type=float, default=60.0,
                   help="mean seconds between stalls of a starved node (default 60)")
    p.add_argument("--duration", type=float, default=None,
                   help="simulated seconds (default 120; with --partition-s: 60 + the "
                   "partition + 120)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="repeat with seeds seed..seed+runs-1")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--joins", type=int, default=1, help="nodes joining at t=5..10 s (default 1)")
    p.add_argument("--updates", type=int, default=None,
                   help="metadata updates for dissemination (default 20 if the run is long "
                   "enough, else 0)")
    p.add_argument("--partition-s", type=float, default=0.0,
                   help="cut --partition-nodes random nodes off the rest at t=60 for this long, "
                   "then heal; reports heal_s (heal to one mesh), false deaths within the sides "
                   "and bytes")
    p.add_argument("--partition-nodes", type=int, default=None,
                   help="size of the cut-off group (default: a third of the nodes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--samples", action="store_true",
                   help="include the raw per-kill / per-update samples (and per-run results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.runs < 1:
        print("error: --runs must be >= 1", file=sys.stderr)
        return 2
    duration = args.duration
    if duration is None:
        duration = PARTITION_START + args.partition_s + 120 if args.partition_s > 0 else 120.0
    part_nodes = args.partition_nodes
    if part_nodes is None:
        part_nodes = max(1, args.nodes // 3) if args.partition_s > 0 else 0
    updates = args.updates
    if updates is None:
        updates = 20 if duration >= 120 and args.partition_s <= 0 else 0
    results = []
    try:
        for r in range(args.runs):
            sc = Scenario(
                nodes=args.nodes,
                loss=args.loss,
                kill=args.kill,
                starve=args.starve,
                starve_s=args.starve_seconds,
                starve_every_s=args.starve_every,
                duration=duration,
                seed=args.seed + r,
                profile=args.profile,
                joins=args.joins,
                updates=updates,
                partition_s=args.partition_s,
                partition_nodes=part_nodes,
            )
            results.append(simulate(sc))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.runs == 1:
        out: dict[str, object] = msgspec.to_builtins(results[0])
        if not args.samples:
            for k in ("detection_samples_s", "spread_samples_s", "dissemination_samples_s"):
                out.pop(k, None)
    else:
        out = pooled(results)
        if args.samples:
            out["per_run"] = [msgspec.to_builtins(r) for r in results]
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28} {v}")
    return 0
