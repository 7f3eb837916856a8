"""``memkv-mesh simulate mesh``: the trace-driven mesh simulator's command line.

Flags given on the command line override the cluster file (``--cluster``); flags not given do not.
With no cluster file the defaults of ``simulations.mesh.spec`` apply (64 GPU nodes, 16 flash
nodes, Llama-3-70B). Prints a short human summary, or the JSON summary with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from simulations.mesh.engine import FailureEvent, fixed_delay_failures, simulate, with_restarts
from simulations.mesh.ideal import prefix_hit_ratio
from simulations.mesh.spec import (
    MODEL_PRESETS,
    SimSpec,
    SpecError,
    load_spec,
    model_preset,
)
from simulations.mesh.summary import summarize
from simulations.mesh.sweep import sweep
from simulations.mesh.synthetic import SHAPES, generate
from simulations.mesh.trace import Request, TraceError, read_mooncake, write_mooncake

__all__ = ["main", "build_parser", "DEFAULT_TRACE"]

DEFAULT_TRACE = "simulations/traces/conversation_trace.jsonl"


def _dram_blocks(text: str) -> int | None:
    if text.lower() in ("unbounded", "inf", "none"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block count or 'unbounded', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"--dram-blocks must be >= 0, got {v}")
    return v


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memkv-mesh simulate mesh",
        description="Trace-driven simulation of a KV-cache mesh for capacity planning.",
    )
    src = p.add_argument_group("input")
    src.add_argument("--trace", help=f"Mooncake-format JSONL trace (e.g. {DEFAULT_TRACE})")
    src.add_argument("--synthetic", choices=sorted(SHAPES), help="generate a synthetic trace instead")
    src.add_argument("--sessions-per-s", type=float, default=2.0, help="synthetic: session start rate")
    src.add_argument("--duration-s", type=float, default=600.0, help="synthetic: seconds of session starts")
    src.add_argument("--seed", type=int, default=0, help="RNG seed (synthetic traces, --gossip)")
    src.add_argument("--write-trace", metavar="FILE", help="also write the (synthetic) trace as JSONL")
    src.add_argument("--max-requests", type=int, help="only the first N requests of the trace")
    src.add_argument("--time-scale", type=float, default=1.0,
                     help="multiply arrival times (0.5 = twice the request rate)")
    cl = p.add_argument_group("cluster (override --cluster FILE)")
    cl.add_argument("--cluster", metavar="TOML", help="cluster spec file (see simulations/examples/)")
    cl.add_argument("--model", choices=sorted(MODEL_PRESETS), help="model preset")
    cl.add_argument("--gpu-nodes", type=int)
    cl.add_argument("--gpus-per-node", type=int)
    cl.add_argument("--flash-nodes", type=int)
    cl.add_argument("--dram-gb", type=float, help="DRAM for KV per GPU node (GB)")
    cl.add_argument("--dram-blocks", type=_dram_blocks, metavar="N|unbounded", default=argparse.SUPPRESS,
                    help="DRAM per GPU node in blocks (overrides --dram-gb)")
    cl.add_argument("--nvme-tb", type=float, help="NVMe per flash node (TB)")
    cl.add_argument("--nvme-read-gbps", type=float)
    cl.add_argument("--nvme-write-gbps", type=float)
    cl.add_argument("--nic-gbps", type=float)
    cl.add_argument("--replicas", "-R", type=int)
    cl.add_argument("--policy", choices=["lru", "fifo"], help="eviction policy (DRAM and NVMe)")
    cl.add_argument("--routing", choices=["round-robin", "least-loaded", "prefix-aware"])
    cl.add_argument("--put-policy", choices=["all", "on-reuse"],
                    help="which blocks GPU nodes put to the mesh")
    cl.add_argument("--ideal-network", action="store_true", default=None,
                    help="infinite bandwidth everywhere (prefill still takes time)")
    wp = p.add_argument_group("write path")
    wp.add_argument("--write-path", choices=["instant", "async"],
                    help="instant: puts are on their owners at prefill end (default); async: the "
                    "daemon's write path (dirty blocks pinned in DRAM, replication lag, directory "
                    "delay, back-pressure)")
    wp.add_argument("--replication-lag-s", type=float, help="async: put to owners holding it (s)")
    wp.add_argument("--directory-delay-s", type=float, help="async: put to other nodes' directories (s)")
    wp.add_argument("--dirty-blocks", type=int, help="async: dirty blocks per GPU node before puts wait")
    cl.add_argument("--usd-per-gpu-hour", type=float)
    cl.add_argument("--usd-per-tb-month", type=float)
    fl = p.add_argument_group("failures")
    fl.add_argument("--kill", action="append", metavar="flash-I@SECONDS",
                    help="kill a flash node at a time (repeatable)")
    fl.add_argument("--restart", action="append", metavar="flash-I@SECONDS",
                    help="restart a killed flash node on its old disk at a time (repeatable)")
    fl.add_argument("--detect-delay-s", type=float, help="failure detection delay (fixed model)")
    fl.add_argument("--rereplication-gbps", type=float, help="mesh-wide re-replication rate cap")
    fl.add_argument("--gossip", action="store_true",
                    help="run the real SWIM cores (gossip/) on every node for the whole trace "
                    "and take failure detection times from them")
    fl.add_argument("--gossip-profile", default="default", choices=["default", "memberlist"],
                    help="SWIM timing profile for --gossip")
    fl.add_argument("--gossip-loss", type=float, default=0.0, help="--gossip: packet loss rate")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--sweep-nvme-tb", type=_floats, metavar="LIST", help="e.g. 0.5,1,2,4")
    sw.add_argument("--sweep-flash-nodes", type=_ints, metavar="LIST", help="e.g. 4,8,16")
    sw.add_argument("--target-share", type=float, default=0.95, help="share of the ideal hit ratio")
    sw.add_argument("--slo-p99-s", type=float, default=5.0, help="TTFT p99 SLO (s)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the JSON summary (no progress bar)")
    out.add_argument("--out", metavar="FILE", help="write the JSON summary to FILE")
    out.add_argument("--html", metavar="FILE", help="write an HTML report with plots")
    out.add_argument("--no-baseline", action="store_true", help="skip the run without the mesh")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--window-s", type=float, default=10.0, help="timeline window (s)")
    return p


def _apply_overrides(spec: SimSpec, a: argparse.Namespace) -> SimSpec:
    c: dict[str, Any] = {}
    for flag, field in (
        ("gpu_nodes", "gpu_nodes"),
        ("gpus_per_node", "gpus_per_node"),
        ("flash_nodes", "flash_nodes"),
        ("dram_gb", "dram_gb_per_node"),
        ("nvme_tb", "nvme_tb_per_flash_node"),
        ("nvme_read_gbps", "nvme_read_gbps"),
        ("nvme_write_gbps", "nvme_write_gbps"),
        ("nic_gbps", "nic_gbps"),
        ("replicas", "replicas"),
        ("policy", "eviction"),
        ("routing", "routing"),
        ("ideal_network", "ideal_network"),
        ("put_policy", "put_policy"),
        ("write_path", "write_path"),
        ("replication_lag_s", "replication_lag_s"),
        ("directory_delay_s", "directory_delay_s"),
        ("dirty_blocks", "dirty_blocks"),
    ):
        v = getattr(a, flag)
        if v is not None:
            c[field] = v
    if hasattr(a, "dram_blocks"):  # SUPPRESS default: present only when given
        c["dram_blocks"] = a.dram_blocks
        c["dram_unbounded"] = a.dram_blocks is None
    cost: dict[str, Any] = {}
    if a.usd_per_gpu_hour is not None:
        cost["usd_per_gpu_hour"] = a.usd_per_gpu_hour
    if a.usd_per_tb_month is not None:
        cost["usd_per_tb_month"] = a.usd_per_tb_month
    fail: dict[str, Any] = {}
    if a.kill:
        fail["kill"] = list(a.kill)
    if a.restart:
        fail["restart"] = list(a.restart)
    if a.detect_delay_s is not None:
        fail["detect_delay_s"] = a.detect_delay_s
    if a.rereplication_gbps is not None:
        fail["rereplication_gbps"] = a.rereplication_gbps
    return msgspec.structs.replace(
        spec,
        cluster=msgspec.structs.replace(spec.cluster, **c),
        model=model_preset(a.model) if a.model else spec.model,
        cost=msgspec.structs.replace(spec.cost, **cost),
        failure=msgspec.structs.replace(spec.failure, **fail),
    ).validate()


def _load_requests(a: argparse.Namespace, spec: SimSpec) -> tuple[list[Request], str]:
    if a.trace and a.synthetic:
        raise SpecError("give either --trace or --synthetic, not both")
    if a.synthetic:
        reqs = generate(
            SHAPES[a.synthetic],
            sessions_per_s=a.sessions_per_s,
            duration_s=a.duration_s,
            seed=a.seed,
            block_tokens=spec.cluster.block_tokens,
            decode_tokens_per_s=spec.model.decode_tokens_per_s,
        )
        name = f"synthetic:{a.synthetic}(rate={a.sessions_per_s},duration={a.duration_s},seed={a.seed})"
        if a.max_requests is not None:
            reqs = reqs[: a.max_requests]
    else:
        if not a.trace:
            raise SpecError(f"give --trace FILE (e.g. --trace {DEFAULT_TRACE}) or --synthetic chat|agentic")
        reqs = read_mooncake(a.trace, max_requests=a.max_requests)
        name = str(a.trace)
    if a.time_scale <= 0:
        raise SpecError(f"--time-scale must be > 0, got {a.time_scale}")
    if a.time_scale != 1.0:
        reqs = [msgspec.structs.replace(r, arrival_s=r.arrival_s * a.time_scale) for r in reqs]
    if a.write_trace:
        write_mooncake(reqs, a.write_trace)
    if not reqs:
        raise SpecError("the trace holds no requests")
    return reqs, name


def _failures(
    spec: SimSpec, a: argparse.Namespace, reqs: list[Request], progress: bool
) -> tuple[list[FailureEvent], dict[str, Any] | None]:
    if not a.gossip:
        return fixed_delay_failures(spec), None
    from simulations.mesh.gossip_detect import gossip_failures

    g = gossip_failures(spec, until_s=reqs[-1].arrival_s, seed=a.seed, loss=a.gossip_loss,
                        profile_name=a.gossip_profile, progress=progress)  # fmt: skip
    return with_restarts(g.failures, spec), g.info


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f} s"


def _human(s: dict[str, Any]) -> str:
    lines = [
        f"trace {s['trace']}: {s['requests']} requests, {s['duration_s']:.0f} s simulated",
        f"cluster: {s['gpu_nodes']} GPU nodes x {s['gpus_per_node']}, {s['flash_nodes']} flash nodes, "
        f"R={s['replicas']}, {s['routing']}, {s['eviction']}, model {s['model']}",
        f"hit ratio {s['hit_ratio']:.4f} (local {s['local_hit_ratio']:.4f}, mesh {s['mesh_hit_ratio']:.4f})"
        + (f", ideal {s['ideal_hit_ratio']:.4f}" if "ideal_hit_ratio" in s else ""),
        f"TTFT p50/p90/p99 {s['ttft_p50_s']:.3f} / {s['ttft_p90_s']:.3f} / {s['ttft_p99_s']:.3f} s",
    ]
    if "without_mesh" in s:
        b = s["without_mesh"]
        lines.append(
            f"without mesh: hit ratio {b['hit_ratio']:.4f}, TTFT p50/p90/p99 {b['ttft_p50_s']:.3f} / "
            f"{b['ttft_p90_s']:.3f} / {b['ttft_p99_s']:.3f} s, GPU busy {b['gpu_busy_share']:.3f}"
        )
    lines.append(
        f"GPU busy share {s['gpu_busy_share']:.3f}; prefill tokens saved {s['prefill_tokens_saved']}; "
        f"peak link {s['peak_link_utilisation']:.2f}, peak NVMe {s['peak_nvme_utilisation']:.2f}"
    )
    if s.get("write_path") == "async":
        lines.append(
            f"write path async (lag {s['replication_lag_s']} s, directory delay {s['directory_delay_s']} s, "
            f"dirty bound {s['dirty_blocks_bound']}): back-pressure waits {s['backpressure_waits']} "
            f"({s['backpressure_wait_s']:.2f} s), dirty peak per node {s['dirty_peak_blocks']} blocks, "
            f"{s['blocks_held_nowhere']} of {s['blocks_put']} blocks put held nowhere at the end"
        )
    if s["flash_nodes"]:
        lines.append(
            f"mesh traffic: {s['mesh_bytes_read'] / 1e12:.2f} TB read, "
            f"{s['mesh_bytes_written'] / 1e12:.2f} TB written, "
            f"{s['mesh_puts_dropped_bytes'] / 1e12:.2f} TB of puts shed (queues too far behind), "
            f"{s['mesh_fetches_skipped']} fetches skipped (recompute was faster)"
        )
    lines.append(
        f"cost per M tokens: ${s['cost_per_mtok_usd']:.4f} provisioned, "
        f"${s['cost_per_mtok_busy_usd']:.4f} busy-GPU"
    )
    if "failure" in s:
        f = s["failure"]
        lines.append(
            f"failure: hit ratio before {_r(f['hit_ratio_before'])}, during detection "
            f"{_r(f['hit_ratio_detect_window'])}, after {_r(f['hit_ratio_after'])}; re-replicated "
            f"{f['rereplication_bytes'] / 1e9:.1f} GB ({f['rereplication_blocks']} blocks), "
            f"lost {f['lost_blocks']} blocks"
        )
        if "hits_lost" in f:
            lines.append(
                f"failure cost: {f['hits_lost']} block hits lost; hit ratio in the 300 s after the "
                f"kill {_r(f['hit_ratio_300s_after_kill'])} vs "
                f"{_r(f['hit_ratio_300s_after_kill_no_failure'])} "
                f"without the failure"
            )
    if "gossip" in s:
        g = s["gossip"]
        lines.append(
            f"gossip: {g['nodes']} SWIM cores ({g['profile']}, loss {g['loss']}) over "
            f"{g['simulated_s']:.0f} s, {g['gossip_bytes_per_node_per_s']:.0f} B/s per node, "
            f"{g['false_deaths']} false deaths, {g['wall_s']:.1f} s wall"
        )
        for d in g["detections"]:
            lines.append(
                f"  {d['node']} killed at {d['t_kill_s']:g} s: dead to the first node after "
                f"{_s(d['first_mark_s'])}, to half {_s(d['median_mark_s'])}, to all live nodes "
                f"{_s(d['all_marked_s'])}"
            )
    if "wall_s" in s:
        lines.append(f"wall time {s['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    progress = not (a.json or a.no_progress)
    t0 = time.perf_counter()
    try:
        for flag, path in (("--html", a.html), ("--out", a.out), ("--write-trace", a.write_trace)):
            if path and not Path(path).resolve().parent.is_dir():
                raise SpecError(f"{flag} {path!r}: directory {str(Path(path).parent)!r} does not exist")
        spec = load_spec(a.cluster) if a.cluster else SimSpec()
        spec = _apply_overrides(spec, a)
        reqs, name = _load_requests(a, spec)
        if (a.sweep_nvme_tb is None) != (a.sweep_flash_nodes is None):
            raise SpecError("a sweep needs both --sweep-nvme-tb and --sweep-flash-nodes")
        failures, gossip_info = _failures(spec, a, reqs, progress)
    except (SpecError, TraceError, ValueError) as e:
        print(f"memkv-mesh simulate mesh: error: {e}", file=sys.stderr)
        return 2
    sweep_out = None
    if a.sweep_nvme_tb is not None:
        try:
            sweep_out = sweep(
                spec,
                reqs,
                nvme_tb=a.sweep_nvme_tb,
                flash_nodes=a.sweep_flash_nodes,
                target_share=a.target_share,
                slo_p99_s=a.slo_p99_s,
                progress=progress,
            )
        except (SpecError, ValueError) as e:
            print(f"memkv-mesh simulate mesh: error: {e}", file=sys.stderr)
            return 2
    run = simulate(spec, reqs, failures=failures, progress=progress, progress_desc="mesh",
                   window_s=a.window_s)
    base = None
    if not a.no_baseline and spec.cluster.flash_nodes > 0:
        base = simulate(spec, reqs, mesh=False, progress=progress, progress_desc="baseline",
                        window_s=a.window_s)
    reference = None
    if failures:
        reference = simulate(spec, reqs, failures=(), progress=progress,
                             progress_desc="no-failure", window_s=a.window_s)
    ideal = prefix_hit_ratio(reqs, None, spec.cluster.eviction)
    summary = summarize(spec, run, base, ideal_hit_ratio=ideal, reference=reference, trace=name,
                        wall_s=time.perf_counter() - t0)
    if gossip_info is not None:
        summary["gossip"] = gossip_info
    if sweep_out is not None:
        summary["sweep"] = sweep_out
    text = json.dumps(summary, indent=1)
    try:
        if a.html:
            from simulations.mesh.report import render_plots, write_html_report

            plots = render_plots(spec, reqs, run, base, sweep_out, reference)
            write_html_report(a.html, summary, plots, sweep_out)
        if a.out:
            Path(a.out).write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        print(f"memkv-mesh simulate mesh: error: cannot write output: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(text)
    else:
        print(_human(summary))
        if sweep_out is not None:
            print(_sweep_text(sweep_out))
        if a.html:
            print(f"report: {a.html}")
    return 0


def _sweep_text(sw: dict[str, Any]) -> str:
    lines = [
        f"sweep: target {sw['target_share']:.0%} of ideal {sw['ideal_hit_ratio']:.4f}, "
        f"TTFT p99 <= {sw['slo_p99_s']} s",
        "  flash  TB/node  total TB  hit ratio  share  p99 s  $/Mtok  ok",
    ]
    for p in sw["points"]:
        lines.append(
            f"  {p['flash_nodes']:5d}  {p['nvme_tb_per_flash_node']:7g}  {p['total_flash_tb']:8g}  "
            f"{p['hit_ratio']:9.4f}  {p['share_of_ideal']:5.3f}  {p['ttft_p99_s']:5.2f}  "
            f"{p['cost_per_mtok_usd']:6.4f}  {'yes' if p['qualifies'] else 'no'}"
        )
    ch = sw["chosen"]
    if ch is None:
        lines.append("no configuration in the sweep meets the target")
    else:
        lines.append(
            f"smallest configuration: {ch['flash_nodes']} flash nodes x "
            f"{ch['nvme_tb_per_flash_node']:g} TB ({ch['total_flash_tb']:g} TB), hit ratio "
            f"{ch['hit_ratio']:.4f} ({ch['share_of_ideal']:.1%} of ideal), TTFT p99 {ch['ttft_p99_s']:.2f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))

