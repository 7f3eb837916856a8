"""A self-contained HTML report: summary table and PNG plots embedded as base64 (matplotlib Agg).

Plots: hit ratio vs cache capacity (the trace's shared-LRU curve, the ideal, this run and any
sweep points), TTFT CDFs with and without the mesh, per-node load, and the timeline (hit ratio
per window, live flash nodes, re-replication traffic), which shows a failure's dip.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine import RunResult
from .ideal import hit_ratio_curve
from .spec import SimSpec
from .trace import Request

__all__ = ["write_html_report", "render_plots"]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the HTML report needs matplotlib: pip install 'memkv-mesh[report]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_plots(
    spec: SimSpec,
    requests: Sequence[Request],
    run: RunResult,
    baseline: RunResult | None,
    sweep: dict[str, Any] | None = None,
    reference: RunResult | None = None,
) -> dict[str, str]:
    """Title -> base64 PNG."""
    plt = _plt()
    out: dict[str, str] = {}
    bb = spec.block_bytes
    tb = bb / 1e12

    # 1. Hit ratio vs capacity.
    unique = len({b for r in requests for b in r.blocks})
    caps = sorted({max(1, int(unique * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)})
    curve = hit_ratio_curve(requests, caps, spec.cluster.eviction)
    ideal = curve[-1][1]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c * tb for c, _ in curve], [h for _, h in curve], "o-", label="one shared cache (LRU)")
    ax.axhline(ideal, color="grey", ls="--", label=f"ideal {ideal:.4f}")
    if run.mesh:
        eff = spec.cluster.flash_nodes * spec.nvme_capacity_blocks / spec.cluster.replicas
        ax.plot([min(eff, unique) * tb], [run.hit_ratio], "r*", ms=14, label="this run (mesh)")
    if sweep:
        for p in sweep["points"]:
            x = p["total_flash_tb"] / spec.cluster.replicas
            ax.plot([x], [p["hit_ratio"]], "s", color="green" if p["qualifies"] else "orange", ms=6)
        ax.plot([], [], "s", color="green", label="sweep point (qualifies)")
        ax.plot([], [], "s", color="orange", label="sweep point (fails)")
    ax.set_xscale("log")
    ax.set_xlabel("distinct cache capacity (TB of KV, after replication)")
    ax.set_ylabel("prefix hit ratio")
    ax.set_title("Hit ratio vs capacity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["Hit ratio vs capacity"] = _png(fig)

    # 2. TTFT CDFs.
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, label in ((run, "with mesh" if run.mesh else "this run"), (baseline, "without mesh")):
        if r is None:
            continue
        xs = np.sort(r.ttft_s)
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.plot(xs, ys, label=f"{label} (p99 {np.percentile(xs, 99):.2f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("share of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["TTFT CDFs"] = _png(fig)

    # 3. Per-node load.
    nplots = 2 if run.flash_read_bytes else 1
    fig, axes = plt.subplots(1, nplots, figsize=(11 if nplots == 2 else 7, 4), squeeze=False)
    ax = axes[0][0]
    busy = np.array(run.gpu_busy_s) / run.duration_s
    ax.bar(range(len(busy)), busy, color="tab:blue")
    ax.set_xlabel("GPU node")
    ax.set_ylabel("prefill busy share")
    ax.set_title("GPU node load")
    if nplots == 2:
        ax = axes[0][1]
        idx = np.arange(len(run.flash_read_bytes))
        ax.bar(idx - 0.2, np.array(run.flash_read_bytes) / 1e12, 0.4, label="read")
        ax.bar(idx + 0.2, np.array(run.flash_write_bytes) / 1e12, 0.4, label="written")
        for f in run.failures:
            ax.axvline(f.flash, color="red", alpha=0.3, lw=6)
        top = max([*run.flash_read_bytes, *run.flash_write_bytes, 1]) / 1e12
        ax.set_ylim(0, top * 1.25)  # room for the legend above the bars
        ax.set_xlabel("flash node")
        ax.set_ylabel("TB")
        ax.set_title("Flash node traffic")
        ax.legend(fontsize=8, loc="upper right", ncol=2)
    from matplotlib.ticker import MaxNLocator

    for a in axes[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    out["Per-node load"] = _png(fig)

    # 4. Timeline (with the no-failure reference run when there is one).
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    smooth = max(1, int(round(60.0 / run.window_s)))

    def rolling(r: RunResult, attr: str) -> tuple[np.ndarray, np.ndarray]:
        refs = np.array([w.refs for w in r.timeline], dtype=float)
        num = np.array([getattr(w, attr) for w in r.timeline], dtype=float)
        k = np.ones(smooth)
        a, b = np.convolve(num, k, "same"), np.convolve(refs, k, "same")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.arange(len(refs)) * r.window_s, np.where(b > 0, a / b, np.nan)

    ts, hr = rolling(run, "hits")
    lbl = "with failures" if run.failures else "hit ratio"
    ax.plot(ts, hr, lw=1.2, label=f"{lbl} ({smooth * run.window_s:g} s rolling)")
    if reference is not None:
        ts_r, hr_r = rolling(reference, "hits")
        ax.plot(ts_r, hr_r, lw=1.0, alpha=0.8, ls="--", label="same trace, no failure")
    if run.mesh:
        ts_m, mh = rolling(run, "mesh_hits")
        ax.plot(ts_m, mh, lw=0.8, alpha=0.6, label="of which mesh")
    ax.set_ylabel("prefix hit ratio")
    ax.set_ylim(0, None)
    for f in run.failures:
        ax.axvspan(f.t_kill, max(f.t_detect, f.t_kill + run.window_s / 4), color="red", alpha=0.25)
        ax2.axvline(f.t_kill, color="red", lw=1)
    ax.set_title(
        "Failure timeline (red: killed, not yet detected)" if run.failures else "Timeline"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax2.plot(ts, [w.rerep_bytes / 1e9 for w in run.timeline], color="purple", lw=1,
             label=f"re-replication GB per {run.window_s:g} s")
    if reference is not None:
        n = min(len(run.timeline), len(reference.timeline))
        lost = np.cumsum([reference.timeline[i].hits - run.timeline[i].hits for i in range(n)])
        ax3 = ax2.twinx()
        ax3.plot(ts[:n], lost, color="darkred", lw=1, label="hits lost (cumulative)")
        ax3.set_ylabel("blocks")
        ax3.legend(loc="center right", fontsize=8)
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("GB")
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    out["Timeline"] = _png(fig)
    return out


_ROWS = [
    ("hit_ratio", "hit ratio"),
    ("ideal_hit_ratio", "ideal hit ratio (unbounded shared cache)"),
    ("local_hit_ratio", "  of which local DRAM"),
    ("mesh_hit_ratio", "  of which mesh"),
    ("ttft_p50_s", "TTFT p50 (s)"),
    ("ttft_p90_s", "TTFT p90 (s)"),
    ("ttft_p99_s", "TTFT p99 (s)"),
    ("gpu_busy_share", "GPU busy share"),
    ("prefill_tokens", "prefill tokens computed"),
    ("prefill_tokens_saved", "prefill tokens saved"),
    ("peak_link_utilisation", "peak link utilisation"),
    ("peak_nvme_utilisation", "peak NVMe utilisation"),
    ("mesh_bytes_read", "mesh bytes read"),
    ("mesh_bytes_written", "mesh bytes written"),
    ("mesh_puts_dropped_bytes", "mesh puts shed (bytes)"),
    ("cost_per_mtok_usd", "cost per M tokens, provisioned (USD)"),
    ("cost_per_mtok_busy_usd", "cost per M tokens, busy GPU hours (USD)"),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def write_html_report(
    path: str | Path,
    summary: dict[str, Any],
    plots: dict[str, str],
    sweep: dict[str, Any] | None = None,
) -> None:
    base = summary.get("without_mesh", {})
    rows = []
    for k, label in _ROWS:
        if k in summary:
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{_fmt(summary[k])}</td>"
                f"<td>{_fmt(base[k]) if k in base else ''}</td></tr>"
            )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>memkv-mesh simulation</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        "<h1>memkv-mesh simulation report</h1>",
        f"<p>Trace <code>{html.escape(str(summary.get('trace', '')))}</code>: "
        f"{summary['requests']} requests over {summary['duration_s']:.0f} s; model "
        f"{html.escape(summary['model'])}; {summary['gpu_nodes']} GPU nodes x "
        f"{summary['gpus_per_node']} GPUs, {summary['flash_nodes']} flash nodes, R = "
        f"{summary['replicas']}, routing {summary['routing']}, eviction {summary['eviction']}.</p>",
        "<h2>Summary</h2><table><tr><th></th><th>with mesh</th><th>without mesh</th></tr>",
        *rows,
        "</table>",
    ]
    if "failure" in summary:
        f = summary["failure"]
        parts.append("<h2>Failure scenario</h2><table>")
        for k, v in f.items():
            parts.append(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>")
        parts.append("</table>")
    if sweep:
        parts.append(
            f"<h2>Sweep</h2><p>Target: {sweep['target_share']:.0%} of the ideal hit ratio "
            f"{sweep['ideal_hit_ratio']:.4f} with TTFT p99 &le; {sweep['slo_p99_s']} s.</p><table>"
            "<tr><th>flash nodes</th><th>TB/node</th><th>total TB</th><th>hit ratio</th>"
            "<th>share of ideal</th><th>TTFT p99 (s)</th><th>$/M tok</th><th>ok</th></tr>"
        )
        for p in sweep["points"]:
            mark = "chosen" if p == sweep.get("chosen") else ("yes" if p["qualifies"] else "no")
            parts.append(
                f"<tr><td>{p['flash_nodes']}</td><td>{p['nvme_tb_per_flash_node']:g}</td>"
                f"<td>{p['total_flash_tb']:g}</td><td>{p['hit_ratio']:.4f}</td>"
                f"<td>{p['share_of_ideal']:.3f}</td><td>{p['ttft_p99_s']:.3f}</td>"
                f"<td>{p['cost_per_mtok_usd']:.4f}</td><td>{mark}</td></tr>"
            )
        parts.append("</table>")
        ch = sweep.get("chosen")
        parts.append(
            "<p><b>Smallest configuration meeting the target:</b> "
            + (
                f"{ch['flash_nodes']} flash nodes x {ch['nvme_tb_per_flash_node']:g} TB "
                f"({ch['total_flash_tb']:g} TB), hit ratio {ch['hit_ratio']:.4f} "
                f"({ch['share_of_ideal']:.1%} of ideal), TTFT p99 {ch['ttft_p99_s']:.2f} s.</p>"
                if ch
                else "none in this sweep.</p>"
            )
        )
    for title, b64 in plots.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{b64}'>")
    parts.append(
        "<h2>Raw summary</h2><details><summary>JSON</summary><pre>"
        + html.escape(json.dumps(summary, indent=1)[:200_000])
        + "</pre></details></body></html>"
    )
    Path(path).write_text("\n".join(parts), encoding="utf-8")
