"""Mesh simulator outputs: JSON summary keys, sweep choice, HTML report, CLI behaviour."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from simulations.mesh import ClusterSpec, SimSpec, read_mooncake, sweep
from simulations.mesh_cli import main

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"

SUMMARY_KEYS = {
    "hit_ratio", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "gpu_busy_share", "prefill_tokens_saved",
    "bytes_per_node", "peak_link_utilisation", "peak_nvme_utilisation", "cost_per_mtok_usd",
    "cost_per_mtok_busy_usd", "without_mesh", "ideal_hit_ratio",
}  # fmt: skip


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_summary_has_every_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        ["--trace", str(TRACE), "--max-requests", "1500", "--gpu-nodes", "8", "--flash-nodes", "4",
         "--routing", "round-robin", "--json"], capsys)  # fmt: skip
    assert code == 0
    s = json.loads(out)
    assert SUMMARY_KEYS <= set(s)
    assert s["requests"] == 1500
    assert len(s["bytes_per_node"]["gpu"]) == 8 and len(s["bytes_per_node"]["flash"]) == 4
    assert s["hit_ratio"] > s["without_mesh"]["hit_ratio"]
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert s["prefill_tokens_saved"] + s["prefill_tokens"] == s["input_tokens"]
    assert 0 <= s["peak_nvme_utilisation"] <= 1 and 0 <= s["gpu_busy_share"] <= 1
    assert s["hit_ratio"] <= s["ideal_hit_ratio"] + 1e-12
    flash_read = sum(n["read"] for n in s["bytes_per_node"]["flash"])
    gpu_read = sum(n["read"] for n in s["bytes_per_node"]["gpu"])
    assert flash_read == gpu_read > 0  # every mesh byte read lands on a GPU node
    assert s["cost_per_mtok_busy_usd"] < s["without_mesh"]["cost_per_mtok_busy_usd"]


def test_cli_errors_are_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(["--json"], capsys)
    assert code == 2 and "give --trace FILE" in err
    code, _, err = _run(["--trace", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "cannot read trace" in err
    code, _, err = _run(["--trace", str(TRACE), "--kill", "flash-99@1", "--json"], capsys)
    assert code == 2 and "no flash node 99" in err
    code, _, err = _run(["--trace", str(TRACE), "--sweep-nvme-tb", "1"], capsys)
    assert code == 2 and "both --sweep-nvme-tb and --sweep-flash-nodes" in err
    bad = tmp_path / "c.toml"
    bad.write_text("[cluster]\nflash_node = 1\n")
    code, _, err = _run(["--trace", str(TRACE), "--cluster", str(bad)], capsys)
    assert code == 2 and "flash_node" in err and "c.toml" in err
    code, _, err = _run(["--trace", str(TRACE), "--html", str(tmp_path / "no" / "r.html")], capsys)
    assert code == 2 and "--html" in err and "does not exist" in err
    code, _, err = _run(["--synthetic", "chat", "--sessions-per-s", "0"], capsys)
    assert code == 2 and "sessions_per_s" in err
    with pytest.raises(SystemExit):
        main(["--dram-blocks", "lots"])
    assert "expected a block count" in capsys.readouterr().err


def test_flags_override_the_cluster_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        ["--trace", str(TRACE), "--max-requests", "300", "--cluster",
         str(REPO / "simulations" / "examples" / "cluster.toml"), "--gpu-nodes", "3",
         "--model", "qwen3-32b", "--no-baseline", "--json"], capsys)  # fmt: skip
    assert code == 0
    s = json.loads(out)
    assert s["gpu_nodes"] == 3  # the flag
    assert s["flash_nodes"] == 4  # the file
    assert s["model"] == "qwen3-32b"
    assert "without_mesh" not in s


def test_synthetic_trace_can_be_written_and_read_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    p = tmp_path / "chat.jsonl"
    code, out, _ = _run(
        ["--synthetic", "chat", "--duration-s", "60", "--write-trace", str(p), "--gpu-nodes", "2",
         "--flash-nodes", "1", "--json"], capsys)  # fmt: skip
    assert code == 0
    s1 = json.loads(out)
    code, out, _ = _run(
        ["--trace", str(p), "--gpu-nodes", "2", "--flash-nodes", "1", "--json"], capsys
    )
    s2 = json.loads(out)
    assert s1["requests"] == s2["requests"] == len(read_mooncake(p))
    assert s1["hit_ratio"] == pytest.approx(s2["hit_ratio"])


def test_progress_bar_goes_to_stderr_unless_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--trace", str(TRACE), "--max-requests", "600", "--gpu-nodes", "2", "--flash-nodes", "1"]
    code, out, err = _run(argv, capsys)
    assert code == 0 and "hit ratio" in out and "req" in err
    code, out, err = _run([*argv, "--json"], capsys)
    assert code == 0 and err == ""


def test_sweep_names_the_smallest_qualifying_configuration() -> None:
    reqs = read_mooncake(TRACE, max_requests=2500)
    spec = SimSpec(
        cluster=ClusterSpec(gpu_nodes=8, flash_nodes=1, dram_blocks=0, routing="round-robin",
                            nvme_read_gbps=40.0, nvme_write_gbps=40.0)
    )  # fmt: skip
    out = sweep(spec, reqs, nvme_tb=[0.1, 0.5, 4.0], flash_nodes=[2, 4], target_share=0.9,
                slo_p99_s=100.0)  # fmt: skip
    pts = out["points"]
    assert len(pts) == 6
    # More flash never hurts the hit ratio (same node count).
    for n in (2, 4):
        hrs = [p["hit_ratio"] for p in pts if p["flash_nodes"] == n]
        assert hrs == sorted(hrs)
    ok = [p for p in pts if p["qualifies"]]
    assert ok and all(p["share_of_ideal"] >= 0.9 for p in ok)
    ch = out["chosen"]
    assert ch is not None and ch["total_flash_tb"] == min(p["total_flash_tb"] for p in ok)
    assert not any(p["total_flash_tb"] < ch["total_flash_tb"] for p in ok)
    # The tiniest configuration misses the target.
    assert not pts[0]["qualifies"]
    # An impossible SLO leaves nothing chosen.
    none = sweep(spec, reqs[:300], nvme_tb=[4.0], flash_nodes=[2], slo_p99_s=1e-6)
    assert none["chosen"] is None


def test_sweep_bad_args() -> None:
    reqs = read_mooncake(TRACE, max_requests=10)
    with pytest.raises(ValueError, match="target share"):
        sweep(SimSpec(), reqs, nvme_tb=[1.0], flash_nodes=[1], target_share=1.5)
    with pytest.raises(ValueError, match="flash node counts"):
        sweep(SimSpec(), reqs, nvme_tb=[1.0], flash_nodes=[0])


@pytest.mark.slow
def test_html_report_with_sweep_and_failure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    js = tmp_path / "r.json"
    code, out, _ = _run(
        ["--trace", str(TRACE), "--max-requests", "2500", "--gpu-nodes", "8", "--flash-nodes", "4",
         "--nvme-tb", "0.3", "--routing", "round-robin", "--kill", "flash-1@300",
         "--sweep-nvme-tb", "0.2,1", "--sweep-flash-nodes", "2,4", "--html", str(html),
         "--out", str(js), "--no-progress"], capsys)  # fmt: skip
    assert code == 0
    assert "smallest configuration" in out or "no configuration" in out
    text = html.read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(pngs) == 4
    for p in pngs:
        assert base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n"
    for title in ("Hit ratio vs capacity", "TTFT CDFs", "Per-node load", "Timeline"):
        assert title in text
    s = json.loads(js.read_text())
    f = s["failure"]
    assert f["kills"][0]["node"] == "flash-1"
    assert f["hits_lost"] >= 0 and f["rereplication_bytes"] > 0
    assert len(s["sweep"]["points"]) == 4
