"""DataPlaneConfig validation and the transport choice ("auto" decides and says why)."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest
from test_dataplane_helpers import KEY_A, config, make_store

from transport import ucx_dataplane
from transport.dataplane import DataPlane, DataPlaneError, choose_transport
from transport.dataplane_config import DataPlaneConfig
from transport.ucx_dataplane import UcxProbe, parse_resources


def test_defaults_are_valid_and_documented() -> None:
    cfg = DataPlaneConfig()
    cfg.validate()
    assert cfg.transport == "auto" and cfg.port == 0 and cfg.host == "127.0.0.1"
    src = Path(ucx_dataplane.__file__).with_name("dataplane_config.py").read_text()
    for field in DataPlaneConfig.__struct_fields__:
        # every field is preceded by a comment saying why its default is what it is
        idx = src.index(f"    {field}:")
        assert src[:idx].rstrip().splitlines()[-1].strip().startswith("#"), field


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"port": 70000}, "dataplane.port"),
        ({"max_concurrent_transfers": 0}, "dataplane.max_concurrent_transfers"),
        ({"io_timeout_s": 0.0}, "dataplane.io_timeout_s"),
        ({"host": ""}, "dataplane.host"),
        ({"keys": ["not base64!"]}, r"dataplane.keys\[0\]: not valid base64"),
        ({"keys": [base64.b64encode(b"short").decode()]}, r"dataplane.keys\[0\]: an AES key must be 16, 24 or 32 bytes, got 5"),
        ({"keys": [KEY_A, KEY_A]}, r"keys\[1\] repeats"),
        ({"max_frame_bytes": 10}, "dataplane.max_frame_bytes"),
    ],
)
def test_bad_values_name_the_field(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataPlaneConfig(**kw).validate()  # type: ignore[arg-type]


def test_unknown_field_and_bad_transport_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `trasnport`"):
        msgspec.convert({"trasnport": "tcp"}, DataPlaneConfig)
    with pytest.raises(msgspec.ValidationError, match="transport"):
        msgspec.convert({"transport": "rdma"}, DataPlaneConfig)


def test_bad_config_is_a_dataplane_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "a.arena")
    try:
        with pytest.raises(DataPlaneError, match="dataplane.port"):
            DataPlane(config(port=-1), store, node_id="n")
    finally:
        store.arena.close()


def _fake_probe(monkeypatch: pytest.MonkeyPatch, probe: UcxProbe) -> None:
    monkeypatch.setattr(ucx_dataplane, "probe", lambda: probe)


def test_auto_prefers_tcp_when_ucx_only_has_sockets_and_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, UcxProbe(["tcp", "sysv", "posix", "cma"], ["tcp/lo"]))
    name, why = choose_transport(DataPlaneConfig(transport="auto"))
    assert name == "tcp" and "no RDMA or CUDA transport" in why and "tcp, sysv" in why


def test_auto_takes_ucx_for_rdma_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, UcxProbe(["rc_mlx5", "tcp", "cuda_copy"], []))
    name, why = choose_transport(DataPlaneConfig(transport="auto"))
    assert name == "ucx" and "rc_mlx5, cuda_copy" in why


def test_auto_without_ucxx_uses_tcp_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, UcxProbe([], [], error="ucxx is not importable (No module named 'ucxx')"))
    name, why = choose_transport(DataPlaneConfig(transport="auto"))
    assert name == "tcp" and "not importable" in why


def test_asking_for_ucx_where_it_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, UcxProbe([], [], error="ucxx is not importable"))
    with pytest.raises(DataPlaneError, match="transport = \"ucx\" but UCX cannot start: ucxx is not importable"):
        choose_transport(DataPlaneConfig(transport="ucx"))


async def test_run_fails_loudly_when_ucx_is_forced_but_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_probe(monkeypatch, UcxProbe([], [], error="no UCX here"))
    store = make_store(tmp_path / "a.arena")
    try:
        dp = DataPlane(config(transport="ucx"), store, node_id="n")
        with pytest.raises(DataPlaneError, match="no UCX here"):
            await dp.run()
    finally:
        store.arena.close()


def test_tcp_never_probes_ucx(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> UcxProbe:
        raise AssertionError("probed UCX for transport = tcp")

    monkeypatch.setattr(ucx_dataplane, "probe", boom)
    assert choose_transport(DataPlaneConfig(transport="tcp"))[0] == "tcp"


def test_parse_resources_reads_ucx_context_info() -> None:
    info = (
        "#      resource 0  :  md 0  dev 0  flags -- self/memory\n"
        "#      resource 1  :  md 1  dev 1  flags -- tcp/lo\n"
        "#      resource 2  :  md 5  dev 3  flags -- rc_mlx5/mlx5_0:1\n"
        "#      resource 3  :  md 6  dev 0  flags -- cuda_copy/cuda\n"
    )
    assert parse_resources(info) == ["self/memory", "tcp/lo", "rc_mlx5/mlx5_0:1", "cuda_copy/cuda"]
    assert UcxProbe(["tcp", "rc_mlx5", "cuda_copy"], []).fast_transports() == ["rc_mlx5", "cuda_copy"]


async def test_fetch_before_run_is_a_clear_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "a.arena")
    try:
        dp = DataPlane(config(), store, node_id="n")
        assert dp.transport == "tcp" and dp.reason == "not started"
        with pytest.raises(DataPlaneError, match="not running"):
            await dp.fetch("127.0.0.1:9", [b"k" * 32])
    finally:
        store.arena.close()


def test_keys_share_the_gossip_format_but_not_the_secret() -> None:
    from transport.dataplane_config import decode_keys
    from transport.gossip_config import GossipConfig

    raw = base64.b64decode(KEY_A)
    assert GossipConfig(keys=[KEY_A]).key_bytes() == [raw]  # the same string is a gossip key
    (derived,) = decode_keys([KEY_A])
    assert len(derived) == 32 and derived != raw  # ... but HMAC never uses the AES key itself


def test_dataplane_values_are_checked_even_with_gossip_off(tmp_path) -> None:
    """[dataplane] port = 99999 loaded while gossip was off, and failed only at a later mesh start."""
    from memkv_mesh.config import ConfigError, load_config

    for bad in ("port = 99999", "connect_timeout_s = inf", "max_frame_bytes = 4611686018427387904"):
        p = tmp_path / "mesh.toml"
        p.write_text(f"[dataplane]\n{bad}\n")
        with pytest.raises(ConfigError, match="dataplane"):
            load_config(p)
