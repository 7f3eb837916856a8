"""``memkv-mesh simulate membership``: run the membership simulator and print its figures.

One run prints one JSON object (``--json``) or a table; ``--runs R`` repeats the scenario with
seeds S, S+1, ... and prints one JSON object of pooled figures (percentiles over all kills of all
runs, worst join convergence and how many runs converged within 5 s, summed false deaths).

Public API: ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import msgspec

from gossip.profile import PROFILES
from simulations.membership import Scenario, pooled, simulate


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
    p.add_argument("--duration", type=float, default=120.0, help="simulated seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="repeat with seeds seed..seed+runs-1")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--joins", type=int, default=1, help="nodes joining at t=5..10 s (default 1)")
    p.add_argument("--updates", type=int, default=None,
                   help="metadata updates for dissemination (default 20 if the run is long "
                   "enough, else 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--samples", action="store_true",
                   help="include the raw per-kill / per-update samples (and per-run results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.runs < 1:
        print("error: --runs must be >= 1", file=sys.stderr)
        return 2
    updates = args.updates
    if updates is None:
        updates = 20 if args.duration >= 120 else 0
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
                duration=args.duration,
                seed=args.seed + r,
                profile=args.profile,
                joins=args.joins,
                updates=updates,
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
