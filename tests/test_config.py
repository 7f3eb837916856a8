"""Decoding ``mesh.toml``: defaults, byte sizes, unknown fields, wrong types, validation, paths,
overrides. Every error must name the file and the field."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec
import pytest

from memkv_mesh.config import Config, ConfigError, load_config, parse_byte_size
from memkv_mesh.eviction import DEFAULT_POLICY, POLICIES

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _load(tmp_path: Path, text: str, overrides: dict[str, object] | None = None) -> Config:
    p = tmp_path / "mesh.toml"
    p.write_text(text)
    return load_config(p, overrides)


def _error(tmp_path: Path, text: str, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text, overrides)
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'mesh.toml'}: "), msg  # names the file
    return msg


# ---- defaults -------------------------------------------------------------------------------------
def test_defaults_without_a_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.source == ""
    assert cfg.node.role == "both" and cfg.node_id == socket.gethostname()
    assert cfg.store.dram_bytes == 512 * MiB and cfg.store.nvme_bytes == GiB
    assert cfg.store.max_block_bytes == 128 * MiB and cfg.store.eviction == DEFAULT_POLICY in POLICIES
    assert cfg.store.preallocate is True and cfg.store.verify_on_start is False
    assert cfg.metrics.enabled is True and cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.log.level == "info" and cfg.log.format == "json"
    # With no file, relative paths resolve against the working directory.
    assert cfg.data_dir == tmp_path / ".memkv"
    assert cfg.socket_path == tmp_path / ".memkv" / "memkv.sock"
    assert cfg.nvme_dir == tmp_path / ".memkv" / "nvme"
    shm = Path("/dev/shm")
    assert cfg.arena_dir in (shm, cfg.data_dir)


def test_empty_file_is_all_defaults(tmp_path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.store == load_config(None).store and cfg.metrics == load_config(None).metrics
    assert cfg.source == str((tmp_path / "mesh.toml").resolve())


def test_checked_in_mesh_toml_loads_as_documented() -> None:
    cfg = load_config(REPO / "mesh.toml")
    assert cfg.store.dram_bytes == 512 * MiB and cfg.store.nvme_bytes == GiB
    assert cfg.store.max_block_bytes == 128 * MiB and cfg.store.eviction == DEFAULT_POLICY
    assert cfg.data_dir == REPO / ".memkv"
    assert cfg.metrics.enabled and cfg.node.role == "both"


def test_config_is_frozen_and_typed(tmp_path) -> None:
    cfg = _load(tmp_path, '[store]\ndram_bytes = "64 MiB"\nmax_block_bytes = "8 MiB"\n')
    with pytest.raises(AttributeError):
        cfg.store.dram_bytes = 1  # type: ignore[misc, assignment]
    assert isinstance(cfg.store.dram_bytes, int) and cfg.store.dram_bytes == 64 * MiB
    for struct in (Config, type(cfg.node), type(cfg.store), type(cfg.metrics), type(cfg.log)):
        assert struct.__struct_config__.frozen and struct.__struct_config__.forbid_unknown_fields


# ---- byte sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512 MiB", 512 * MiB),
        ("512MiB", 512 * MiB),
        ("2GB", 2_000_000_000),
        ("2 gb", 2_000_000_000),
        ("1.5 GiB", 3 * GiB // 2),
        (" 4 kib ", 4 * KiB),
        ("3 KB", 3000),
        ("7 B", 7),
        ("1 TiB", 1 << 40),
        ("2 T", 2 * 10**12),
        ("10M", 10**7),
    ],
)
def test_parse_byte_size(value, expected) -> None:
    assert parse_byte_size(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("12 XB", "cannot parse byte size '12 XB'"),
        ("lots", "cannot parse byte size 'lots'"),
        ("", "cannot parse byte size ''"),
        ("-5 MiB", "cannot parse byte size '-5 MiB'"),
        ("5 MiB 3", "cannot parse byte size"),
        (-1, "cannot be negative, got -1"),
        (True, "expected a byte size, got True"),
        (1.5, "expected a byte size (int or string like '512 MiB'), got 1.5"),
        (None, "expected a byte size"),
    ],
)
def test_parse_byte_size_errors(value, fragment) -> None:
    with pytest.raises(ValueError) as ei:
        parse_byte_size(value)
    assert fragment in str(ei.value)


def test_byte_sizes_in_the_file(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        '[store]\ndram_bytes = "2GB"\nnvme_bytes = 3221225472\nmax_block_bytes = "16 MiB"\n',
    )
    assert cfg.store.dram_bytes == 2_000_000_000
    assert cfg.store.nvme_bytes == 3 * GiB
    assert cfg.store.max_block_bytes == 16 * MiB


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('dram_bytes = "half a gig"', "field store.dram_bytes: cannot parse byte size 'half a gig'"),
        ('nvme_bytes = "3 XB"', "field store.nvme_bytes: cannot parse byte size '3 XB'"),
        ("dram_bytes = -4096", "field store.dram_bytes: a byte size cannot be negative, got -4096"),
        ("dram_bytes = 1.5e9", "field store.dram_bytes: expected a byte size"),
        ("max_block_bytes = true", "field store.max_block_bytes: expected a byte size, got True"),
        ("dram_bytes = [1]", "field store.dram_bytes"),
    ],
)
def test_bad_byte_size_in_the_file_names_the_field(tmp_path, line, fragment) -> None:
    assert fragment in _error(tmp_path, f"[store]\n{line}\n")


# ---- unknown fields and wrong types ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[store]\ndram_byte = 1\n", "unknown field 'dram_byte' in [store]"),
        ("[node]\nname = 'x'\n", "unknown field 'name' in [node]"),
        ("[metrics]\nport = 1\n", "unknown field 'port' in [metrics]"),
        ("[log]\nfile = 'x'\n", "unknown field 'file' in [log]"),
        ("colour = 'blue'\n", "unknown field 'colour' at the top level"),
        ("[stor]\ndram_bytes = 1\n", "unknown field 'stor' at the top level"),
        ("source = '/etc'\n", "unknown field 'source' at the top level"),
    ],
)
def test_unknown_fields_are_named(tmp_path, text, fragment) -> None:
    assert fragment in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[store]\npreallocate = 'yes'\n", "field store.preallocate: Expected `bool`, got `str`"),
        ("[store]\neviction = 3\n", "field store.eviction: Expected `str`, got `int`"),
        ("[metrics]\nenabled = 1\n", "field metrics.enabled: Expected `bool`, got `int`"),
        ("[node]\nrole = 'cpu'\n", "field node.role: Invalid enum value 'cpu'"),
        ("[log]\nlevel = 'loud'\n", "field log.level: Invalid enum value 'loud'"),
        ("[log]\nformat = 'xml'\n", "field log.format: Invalid enum value 'xml'"),
        ("[node]\ndata_dir = 5\n", "field node.data_dir: Expected `str`, got `int`"),
        ("store = 5\n", "field store: Expected `object`, got `int`"),
    ],
)
def test_wrong_types_name_the_field(tmp_path, text, fragment) -> None:
    assert fragment in _error(tmp_path, text)


def test_not_toml_and_missing_file(tmp_path) -> None:
    assert "not valid TOML" in _error(tmp_path, "[store\n")
    assert "not valid TOML" in _error(tmp_path, "dram_bytes = \n")
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        load_config(tmp_path / "nope.toml")


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[store]\ndram_bytes = '512 KiB'\n", "field store.dram_bytes: must be at least 1 MiB, got 524288"),
        (
            "[store]\ndram_bytes = '64 MiB'\nmax_block_bytes = '128 MiB'\n",
            f"field store.max_block_bytes: must be between 1 and store.dram_bytes ({64 * MiB}), got {128 * MiB}",
        ),
        ("[store]\nmax_block_bytes = 0\n", "field store.max_block_bytes: must be between 1"),
        (
            "[store]\nnvme_bytes = '1 MiB'\nmax_block_bytes = '2 MiB'\n",
            "field store.nvme_bytes: (1048576) must be 0 (no NVMe tier) or at least store.max_block_bytes",
        ),
        ("[store]\neviction = 'random'\n", "field store.eviction: 'random' is not one of lru"),
        ("[metrics]\nlisten = 'localhost'\n", "field metrics.listen: must be 'host:port', got 'localhost'"),
        ("[metrics]\nlisten = ':9464'\n", "field metrics.listen: must be 'host:port'"),
        ("[metrics]\nlisten = '127.0.0.1:http'\n", "field metrics.listen"),
        ("[metrics]\nlisten = '127.0.0.1:70000'\n", "field metrics.listen"),
        ("[node]\nid = 'has space'\n", "field node.id: 'has space' must be 1-64 characters"),
        ("[node]\nid = '" + "x" * 65 + "'\n", "field node.id"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, text, fragment) -> None:
    assert fragment in _error(tmp_path, text)


def test_valid_edge_values(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        "[store]\ndram_bytes = '1 MiB'\nmax_block_bytes = '1 MiB'\nnvme_bytes = 0\n"
        "[metrics]\nenabled = false\nlisten = 'garbage'\n"  # not checked when disabled
        "[node]\nid = 'a.b-c_1'\n",
    )
    assert cfg.store.dram_bytes == cfg.store.max_block_bytes == MiB and cfg.store.nvme_bytes == 0
    assert cfg.node_id == "a.b-c_1" and not cfg.metrics.enabled
    for policy in ("lru", "fifo", "sieve"):
        assert _load(tmp_path, f"[store]\neviction = '{policy}'\n").store.eviction == policy


# ---- paths ----------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_files_directory(tmp_path, monkeypatch) -> None:
    etc = tmp_path / "etc" / "memkv"
    etc.mkdir(parents=True)
    (etc / "mesh.toml").write_text(
        "[node]\ndata_dir = 'state'\nsocket = 'run/m.sock'\narena_dir = '../shm'\n[store]\nnvme_dir = 'flash'\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in (etc / "mesh.toml", Path("../etc/memkv/mesh.toml")):
        cfg = load_config(path)
        assert cfg.data_dir == etc / "state"
        assert cfg.socket_path == etc / "run" / "m.sock"
        assert cfg.arena_dir.resolve() == tmp_path / "etc" / "shm"
        assert cfg.nvme_dir == etc / "flash"


def test_default_socket_and_nvme_dir_follow_data_dir(tmp_path) -> None:
    cfg = _load(tmp_path, "[node]\ndata_dir = 'd'\n")
    assert cfg.socket_path == tmp_path / "d" / "memkv.sock"
    assert cfg.nvme_dir == tmp_path / "d" / "nvme"


def test_absolute_and_home_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = _load(tmp_path, "[node]\ndata_dir = '/var/lib/memkv'\nsocket = '~/m.sock'\n")
    assert cfg.data_dir == Path("/var/lib/memkv")
    assert cfg.socket_path == tmp_path / "home" / "m.sock"


# ---- overrides ------------------------------------------------------------------------------------
def test_overrides_replace_file_values_and_only_those_given(tmp_path) -> None:
    text = "[node]\nid = 'file'\nrole = 'flash'\n[store]\ndram_bytes = '64 MiB'\nmax_block_bytes = '4 MiB'\n"
    cfg = _load(
        tmp_path, text,
        {"node.id": "flag", "store.dram_bytes": "32 MiB", "store.eviction": None, "metrics.enabled": False},
    )  # fmt: skip
    assert cfg.node_id == "flag" and cfg.store.dram_bytes == 32 * MiB and not cfg.metrics.enabled
    assert cfg.node.role == "flash" and cfg.store.max_block_bytes == 4 * MiB  # from the file
    assert cfg.store.eviction == DEFAULT_POLICY  # None means "flag not given": the file (here: default) wins
    assert _load(tmp_path, text).node_id == "file"  # the file itself is untouched


def test_overrides_without_a_file_and_into_new_sections(tmp_path) -> None:
    cfg = load_config(None, {"log.level": "debug", "store.nvme_bytes": "0"})
    assert cfg.log.level == "debug" and cfg.store.nvme_bytes == 0
    cfg = _load(tmp_path, "[store]\nnvme_bytes = 0\n", {"metrics.listen": "127.0.0.1:0"})
    assert cfg.metrics.listen == "127.0.0.1:0"


def test_bad_override_is_named_as_coming_from_the_command_line(tmp_path) -> None:
    msg = _error(tmp_path, "[store]\ndram_bytes = '256 MiB'\n", {"store.dram_bytes": "lots"})
    assert "field store.dram_bytes (from the command line): cannot parse byte size 'lots'" in msg
    msg = _error(tmp_path, "", {"store.eviction": "nope"})
    assert "field store.eviction (from the command line): 'nope' is not one of" in msg
    # A bad value in the file is not blamed on the command line.
    msg = _error(tmp_path, "[store]\neviction = 'nope'\n", {"store.dram_bytes": "256 MiB"})
    assert "field store.eviction: 'nope'" in msg and "command line" not in msg
    msg = _error(tmp_path, "", {"store.colour": "blue"})
    assert "unknown field 'colour' in [store]" in msg
    msg = _error(tmp_path, "store = 5\n", {"store.dram_bytes": "256 MiB"})
    assert "field store: must be a table" in msg


def test_error_type_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(msgspec.ValidationError):  # the raw decoder still refuses unknown fields
        msgspec.convert({"nope": 1}, Config)
