"""Decoding ``mesh.toml``: defaults, byte sizes, unknown fields, wrong types, validation, paths,
overrides. Every error must name the file and the field."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec
import pytest

from memkv_mesh.config import (
    Config,
    ConfigError,
    LimitsConfig,
    StoreConfig,
    TenantConfig,
    load_config,
    parse_byte_size,
)
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
    assert cfg.store.dram_bytes == 2_000_000_000 // 4096 * 4096  # region sizes: whole pages
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


# ---- region sizes are whole pages ---------------------------------------------------------------
def test_region_sizes_round_down_to_a_page(tmp_path) -> None:
    """A DRAM size that is not a multiple of 4096 used to end in a traceback at start-up (the
    allocator refused it); every region size is now rounded down to a page when loaded."""
    cfg = _load(
        tmp_path,
        "[store]\ndram_bytes = '100 MB'\nnvme_bytes = 1000000001\nmax_block_bytes = '1 MB'\n"
        "[limits]\nmesh_segment_bytes = '10 MB'\n"
        "[[tenants]]\nname = 'a'\nuids = [1]\ndram_bytes = '20 MB'\n",
    )
    assert cfg.store.dram_bytes == 100_000_000 // 4096 * 4096
    assert cfg.store.nvme_bytes == 1_000_000_001 // 4096 * 4096
    assert cfg.limits.mesh_segment_bytes == 10_000_000 // 4096 * 4096
    assert cfg.tenants[0].dram_bytes == 20_000_000 // 4096 * 4096
    assert cfg.store.max_block_bytes == 1_000_000  # a block bound, not a region: kept as given
    for name, n in cfg.tenant_segments():
        assert n % 4096 == 0, name
    cfg = load_config(None, {"store.dram_bytes": "2GB", "store.max_block_bytes": "1 MiB"})
    assert cfg.store.dram_bytes == 1_999_998_976


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[store]\nnvme_bytes = 100\nmax_block_bytes = 1\n", "field store.nvme_bytes: must be 0 (no NVMe tier) or at least 4096 bytes, got 100"),
        ("[limits]\nmesh_segment_bytes = 4095\n", "field limits.mesh_segment_bytes: must be 0 (automatic) or at least 4096"),
        ("[[tenants]]\nname = 'a'\nuids = [1]\ndram_bytes = 1\n", "field tenants[0].dram_bytes: must be 0 (an equal share) or at least 4096"),
        # The bound is checked on the rounded size: the arena the daemon would really get.
        ("[store]\ndram_bytes = 1048577\nmax_block_bytes = 1048577\n", "field store.max_block_bytes: must be between 1 and store.dram_bytes (1048576)"),
    ],
)  # fmt: skip
def test_a_nonzero_size_never_rounds_to_zero(tmp_path, text, fragment) -> None:
    assert fragment in _error(tmp_path, text)


# ---- [[tenants]] ----------------------------------------------------------------------------------
_BIG = "[store]\ndram_bytes = '1 GiB'\nmax_block_bytes = '16 MiB'\n"


def _tenants(*entries: str) -> str:
    return _BIG + "".join(f"[[tenants]]\n{e}\n" for e in entries)


def test_no_tenants_is_one_default_segment(tmp_path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.tenants == [] and cfg.limits == LimitsConfig()
    assert cfg.tenant_segments() == [("default", 512 * MiB)]


def test_tenants_decode_in_order(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        _tenants(
            "name = 'team-a'\nuids = [1001, 1002]\ndram_bytes = '256 MiB'",
            "name = 'team.b_2'\ngids = [2001]",
            "name = 'C'\nuids = [0]\ngids = [0]",  # root may be a tenant; uid 0 and gid 0 are distinct spaces
        ),
    )
    assert [t.name for t in cfg.tenants] == ["team-a", "team.b_2", "C"]
    a, b, c = cfg.tenants
    assert a == TenantConfig(name="team-a", uids=[1001, 1002], dram_bytes=256 * MiB)  # type: ignore[arg-type]
    assert b.uids == [] and b.gids == [2001] and b.dram_bytes == 0
    assert c.uids == [0] and c.gids == [0]
    for struct in (TenantConfig, LimitsConfig):
        assert struct.__struct_config__.frozen and struct.__struct_config__.forbid_unknown_fields
    assert isinstance(a.dram_bytes, int)


def test_segment_split_with_tenants(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        _tenants("name = 'a'\nuids = [1]", "name = 'b'\nuids = [2]\ndram_bytes = '100 MiB'", "name = 'c'\nuids = [3]"),
    )
    # mesh: max(4 x 16 MiB, 1 GiB / 8) = 128 MiB; a and c share 1 GiB - 128 - 100 MiB = 796 MiB.
    segs = cfg.tenant_segments()
    assert segs == [("_mesh", 128 * MiB), ("a", 398 * MiB), ("b", 100 * MiB), ("c", 398 * MiB)]
    assert sum(n for _, n in segs) <= cfg.store.dram_bytes


def test_segment_split_rounds_each_share_down_to_a_page(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        _tenants(*(f"name = 't{i}'\nuids = [{i}]" for i in range(3)))
        + "[limits]\nmesh_segment_bytes = '64 MiB'\n",
    )
    segs = cfg.tenant_segments()
    share = (GiB - 64 * MiB) // 3 // 4096 * 4096
    assert segs == [("_mesh", 64 * MiB)] + [(f"t{i}", share) for i in range(3)]
    assert all(n % 4096 == 0 for _, n in segs) and sum(n for _, n in segs) <= GiB


def test_automatic_mesh_segment_is_rounded_up_to_a_page(tmp_path) -> None:
    # 4 x max_block (4 x 1 MB = 4,000,000) beats dram / 8 here and is not a page multiple.
    cfg = _load(tmp_path, "[store]\ndram_bytes = '16 MiB'\nmax_block_bytes = '1 MB'\n[[tenants]]\nname = 'a'\nuids = [1]\n")
    mesh = cfg.tenant_segments()[0]
    assert mesh == ("_mesh", -(-4_000_000 // 4096) * 4096)
    assert cfg.tenant_segments()[1] == ("a", (16 * MiB - mesh[1]) // 4096 * 4096)


def test_tenant_segments_exactly_filling_dram(tmp_path) -> None:
    cfg = _load(
        tmp_path,
        _tenants("name = 'a'\nuids = [1]\ndram_bytes = '512 MiB'", "name = 'b'\nuids = [2]\ndram_bytes = '384 MiB'"),
    )
    assert cfg.tenant_segments() == [("_mesh", 128 * MiB), ("a", 512 * MiB), ("b", 384 * MiB)]


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        (["name = ''\nuids = [1]"], "field tenants[0].name: '' must be 1-64 characters"),
        (["name = 'a b'\nuids = [1]"], "field tenants[0].name: 'a b' must be"),
        (["name = '" + "x" * 65 + "'\nuids = [1]"], "field tenants[0].name"),
        (["name = '_mesh'\nuids = [1]"], "field tenants[0].name: '_mesh'"),  # the daemon's segment
        (["name = '..'\nuids = [1]"], "field tenants[0].name: '..'"),  # never a path component
        (["name = 'a/b'\nuids = [1]"], "field tenants[0].name"),
        (["name = 'a'\nuids = [1]", "name = 'a'\nuids = [2]"], "field tenants[1].name: 'a' is already the name of tenants[0]"),
        (["uids = [1]"], "field tenants[0].name: is required and missing"),
        (["name = 'a'"], "field tenants[0]: tenant 'a' needs at least one of uids or gids"),
        (["name = 'a'\nuids = []\ngids = []"], "field tenants[0]: tenant 'a' needs at least one"),
        (["name = 'a'\nuids = [-1]"], "field tenants[0].uids[0]: must be in 0..4294967294, got -1"),
        (["name = 'a'\nuids = [1, 4294967295]"], "field tenants[0].uids[1]: must be in 0..4294967294, got 4294967295"),
        (["name = 'a'\ngids = [9223372036854775807]"], "field tenants[0].gids[0]: must be in 0..4294967294"),
        (["name = 'a'\nuids = [1]", "name = 'b'\nuids = [2, 1]"], "field tenants[1].uids[1]: uid 1 already belongs to tenant 'a'"),
        (["name = 'a'\ngids = [7]", "name = 'b'\ngids = [7]"], "field tenants[1].gids[0]: gid 7 already belongs to tenant 'a'"),
        (["name = 'a'\nuids = ['1001']"], "field tenants[0].uids[0]: Expected `int`, got `str`"),
        (["name = 'a'\nuids = 1001"], "field tenants[0].uids: Expected `array`, got `int`"),
        (["name = 'a'\nuids = [true]"], "field tenants[0].uids[0]: Expected `int`, got `bool`"),
        (["name = 'a'\nuids = [1.0]"], "field tenants[0].uids[0]: Expected `int`, got `float`"),
        (["name = 5\nuids = [1]"], "field tenants[0].name: Expected `str`, got `int`"),
        (["name = 'a'\nuids = [1]\nuid = 1"], "unknown field 'uid' in [tenants[0]]"),
        (["name = 'a'\nuids = [1]\ndram_bytes = 'lots'"], "field tenants[0].dram_bytes: cannot parse byte size 'lots'"),
        (["name = 'a'\nuids = [1]\ndram_bytes = -4096"], "field tenants[0].dram_bytes: a byte size cannot be negative"),
        (["name = 'a'\nuids = [1]\ndram_bytes = '8 MiB'"], f"field tenants[0].dram_bytes: must be 0 (an equal share) or at least store.max_block_bytes ({16 * MiB}), got {8 * MiB}"),
    ],
)  # fmt: skip
def test_bad_tenants_name_the_field(tmp_path, entries, fragment) -> None:
    assert fragment in _error(tmp_path, _tenants(*entries))


def test_a_uid_and_a_gid_with_the_same_number_may_belong_to_different_tenants(tmp_path) -> None:
    cfg = _load(tmp_path, _tenants("name = 'a'\nuids = [5]", "name = 'b'\ngids = [5]"))
    assert [t.name for t in cfg.tenants] == ["a", "b"]
    # Repeating an id inside one tenant is harmless.
    assert _load(tmp_path, _tenants("name = 'a'\nuids = [5, 5]")).tenants[0].uids == [5, 5]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tenants = 5\n", "field tenants: Expected `array`, got `int`"),
        ("[tenants]\nname = 'a'\n", "field tenants: Expected `array`, got `object`"),
        ("tenants = [5]\n", "field tenants[0]: Expected `object`, got `int`"),
    ],
)
def test_tenants_must_be_an_array_of_tables(tmp_path, text, fragment) -> None:
    assert fragment in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # The laptop default (512 MiB arena, 128 MiB blocks): the mesh segment takes it all.
        (
            "[[tenants]]\nname = 'a'\nuids = [1]\n",
            ["field tenants: DRAM segment(s) a would be smaller than store.max_block_bytes (134217728)",
             "store.dram_bytes is 536870912", "raise store.dram_bytes or lower store.max_block_bytes"],
        ),
        (
            _tenants("name = 'a'\nuids = [1]\ndram_bytes = '800 MiB'", "name = 'b'\nuids = [2]\ndram_bytes = '200 MiB'"),
            ["field tenants: the DRAM split needs", "_mesh 134217728, a 838860800, b 209715200",
             f"store.dram_bytes is {GiB}"],
        ),
        (
            _tenants("name = 'a'\nuids = [1]\ndram_bytes = '890 MiB'", "name = 'b'\nuids = [2]"),
            ["field tenants: DRAM segment(s) b would be smaller", "share the 6291456 bytes left"],
        ),
        (
            _tenants("name = 'a'\nuids = [1]") + "[limits]\nmesh_segment_bytes = '4 MiB'\n",
            ["field tenants: DRAM segment(s) _mesh would be smaller than store.max_block_bytes"],
        ),
        (
            _tenants("name = 'a'\nuids = [1]") + "[limits]\nmesh_segment_bytes = '2 GiB'\n",
            ["field tenants: the DRAM split needs"],
        ),
    ],
)  # fmt: skip
def test_a_split_that_does_not_fit_is_a_config_error(tmp_path, text, fragments) -> None:
    msg = _error(tmp_path, text)
    for fragment in fragments:
        assert fragment in msg


def test_the_split_is_checked_with_command_line_overrides(tmp_path) -> None:
    text = _tenants("name = 'a'\nuids = [1]")
    assert _load(tmp_path, text).tenant_segments()[1][0] == "a"
    msg = _error(tmp_path, text, {"store.dram_bytes": "64 MiB"})
    assert "field tenants: DRAM segment(s) a would be smaller" in msg and "split: _mesh 67108864, a 0" in msg


def test_tenant_segments_of_a_hand_built_config_raise_config_error() -> None:
    cfg = Config(
        store=StoreConfig(dram_bytes=64 * MiB, max_block_bytes=16 * MiB),  # type: ignore[arg-type]
        tenants=[TenantConfig(name="a", uids=[1])],
    )
    with pytest.raises(ConfigError, match=r"^field tenants: DRAM segment\(s\) a would be smaller"):
        cfg.tenant_segments()


# ---- [limits] -------------------------------------------------------------------------------------
def test_limits_defaults_and_values(tmp_path) -> None:
    lim = load_config(None).limits
    assert (lim.max_clients, lim.max_leases_per_client, lim.max_pending_per_client) == (1024, 4096, 65536)
    assert (lim.max_leases_per_tenant, lim.max_pending_per_tenant) == (65536, 262144)
    assert lim.frame_timeout_s == 30.0 and lim.mesh_segment_bytes == 0
    cfg = _load(
        tmp_path,
        "[limits]\nmax_clients = 1\nmax_leases_per_client = 1\nmax_pending_per_client = 1\n"
        "max_leases_per_tenant = 1\nmax_pending_per_tenant = 1\nframe_timeout_s = 0.001\n"
        "mesh_segment_bytes = '64 MiB'\n",
    )
    assert cfg.limits == LimitsConfig(
        max_clients=1, max_leases_per_client=1, max_pending_per_client=1, max_leases_per_tenant=1,
        max_pending_per_tenant=1, frame_timeout_s=0.001, mesh_segment_bytes=64 * MiB,  # type: ignore[arg-type]
    )  # fmt: skip
    assert _load(tmp_path, "[limits]\nframe_timeout_s = 5\n").limits.frame_timeout_s == 5.0  # int is a float


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        *[(f"{f} = 0", f"field limits.{f}: must be at least 1, got 0") for f in
          ("max_clients", "max_leases_per_client", "max_pending_per_client", "max_leases_per_tenant", "max_pending_per_tenant")],
        ("max_clients = -5", "field limits.max_clients: must be at least 1, got -5"),
        ("max_clients = 1.5", "field limits.max_clients: Expected `int`, got `float`"),
        ("max_clients = '10'", "field limits.max_clients: Expected `int`, got `str`"),
        ("max_leases_per_client = true", "field limits.max_leases_per_client: Expected `int`, got `bool`"),
        ("frame_timeout_s = 0", "field limits.frame_timeout_s: must be a positive number of seconds, got 0"),
        ("frame_timeout_s = -1.0", "field limits.frame_timeout_s: must be a positive"),
        ("frame_timeout_s = nan", "field limits.frame_timeout_s: nan is not a valid value"),
        ("frame_timeout_s = inf", "field limits.frame_timeout_s: must be a positive number of seconds, got inf"),
        ("frame_timeout_s = '30s'", "field limits.frame_timeout_s: Expected `float`, got `str`"),
        ("mesh_segment_bytes = -1", "field limits.mesh_segment_bytes: a byte size cannot be negative"),
        ("mesh_segment_bytes = 'big'", "field limits.mesh_segment_bytes: cannot parse byte size 'big'"),
        ("max_client = 1", "unknown field 'max_client' in [limits]"),
    ],
)  # fmt: skip
def test_bad_limits_name_the_field(tmp_path, line, fragment) -> None:
    assert fragment in _error(tmp_path, f"[limits]\n{line}\n")


def test_bad_limit_from_the_command_line_is_named_so(tmp_path) -> None:
    msg = _error(tmp_path, "", {"limits.max_clients": 0})
    assert "field limits.max_clients (from the command line): must be at least 1" in msg


def test_mesh_toml_commented_tenants_example_loads_when_uncommented(tmp_path) -> None:
    """The checked-in file declares no tenants (it runs as is); its commented example is valid
    once uncommented with the smaller max_block_bytes its comment asks for, and says why not
    without it."""
    import re

    text = (REPO / "mesh.toml").read_text()
    assert load_config(REPO / "mesh.toml").tenants == []
    example = re.sub(r"(?m)^# (\[\[tenants\]\]|\[limits\]|[a-z_]+ = )", r"\1", text)
    assert len(re.findall(r"(?m)^\[\[tenants\]\]", example)) == 2 and "\n[limits]" in example
    msg = _error(tmp_path, example)
    assert "field tenants: the DRAM split needs" in msg and "store.dram_bytes is 536870912" in msg
    assert "a lower store.max_block_bytes lowers it" in msg
    cfg = _load(tmp_path, example.replace('max_block_bytes = "128 MiB"', 'max_block_bytes = "32 MiB"'))
    assert [t.name for t in cfg.tenants] == ["team-a", "team-b"] and cfg.limits == LimitsConfig()
    assert cfg.tenant_segments() == [("_mesh", 128 * MiB), ("team-a", 128 * MiB), ("team-b", 256 * MiB)]
