"""``memkv-mesh bench mesh``: the JSON shape, real bytes moved between node processes, bad flags."""

from __future__ import annotations

import json

import pytest

from memkv_mesh import bench_mesh
from transport import ucx_dataplane


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_bench_mesh_json_between_processes(transport: str, capsys: pytest.CaptureFixture[str]) -> None:
    if transport == "ucx" and ucx_dataplane.probe().error:
        pytest.skip(f"UCX unavailable: {ucx_dataplane.probe().error}")
    argv = ["--nodes", "3", "--transport", transport, "--sizes", "64KiB,1MiB", "--budget", "8MiB",
            "--repeat", "2", "--batch", "2", "--json"]  # fmt: skip
    assert bench_mesh.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transport"] == transport and out["nodes"] == 3
    assert (out["ucx_transports"] != []) == (transport == "ucx")
    assert (out["ucx_lanes"] != []) == (transport == "ucx")
    assert [row["size"] for row in out["sizes"]] == [65536, 1 << 20]
    for row in out["sizes"]:
        for k in ("remote_get_GBps", "raw_GBps", "raw_hot_GBps", "replicate_GBps", "remote_get_vs_raw",
                  "dataplane_get_GBps", "dataplane_get_vs_raw", "remote_get_lease_GBps"):  # fmt: skip
            assert row[k] > 0, (k, row)
        assert len(row["trials"]["raw_GBps"]) == 2 and len(row["trials"]["remote_get_GBps"]) == 2
    assert "lookup_remote_p50_us" in out
    st = out["node0_stats"]
    # node 0 really received every remote-get block and pushed every replica (2 peers), checksummed
    rounds = [row["rounds_per_trial"] for row in out["sizes"]]
    gets = sum((2 * r + 1) * 2 * s for r, s in zip(rounds, [65536, 1 << 20], strict=True))
    assert st["bytes_in"] == gets and st["corrupt_blocks"] == 0
    assert st["blocks_out"] == sum((2 * r + 1) * 2 * 2 for r in rounds)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--nodes", "1"], "--nodes must be at least 2"),
        (["--sizes", "12 parsecs"], "cannot parse byte size"),
        (["--transport", "rdma"], "invalid choice"),
        (["--repeat", "0"], "--repeat must be at least 1"),
    ],
)
def test_bench_mesh_bad_flags(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_mesh.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
