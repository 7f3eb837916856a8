"""Every invalid mesh.toml is a ConfigError naming the field, never a traceback.

Three layers: a hypothesis property over random values for every field of every section (right
types with edge values, wrong types, NaN/inf, 65-bit integers, NUL characters, unknown keys),
fixed regressions for the values that used to escape as other exceptions, and the real command
(``python -m memkv_mesh daemon --config bad.toml``) exiting non-zero with one line and no trace.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv_mesh.config import PAGE_BYTES, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent.parent
OWNED = ("node", "store", "metrics", "log", "mesh", "tenants", "limits")  # sections config.py decodes itself


# ---- a TOML writer for anything hypothesis makes -------------------------------------------------
def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08X}")
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_document(doc: dict[str, Any]) -> str:
    """Every top-level key as ``key = <inline value>`` (inline tables and arrays of them)."""
    return "".join(f"{_toml_str(k)} = {_toml_value(v)}\n" for k, v in doc.items())


# ---- values for every field, from the config's own type information ------------------------------
_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 4095, 4096, 4097, 2**31, 2**32 - 1, 2**32 - 2, 2**63 - 1, -(2**63), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", ".", "..", "x\x00y", "1 GB", "12 XB", "-1", "nan", "inf", "127.0.0.1:0", "_mesh", "a" * 70]),
)
_ANY = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_SIZE_TEXT = st.builds(
    lambda n, unit: f"{n} {unit}",
    st.one_of(st.integers(0, 2**40), st.floats(0, 1e30, allow_nan=False).map(lambda f: f"{f:.3f}")),
    st.sampled_from(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "", "XB"]),
)
_SIZE = st.one_of(
    st.integers(0, 2**66),
    st.sampled_from([4096 * k for k in (1, 2, 256, 4096, 16384, 262144)] + [1 << 20, 1 << 24, 1 << 27, 1 << 29, 1 << 30]),
    _SIZE_TEXT,
)


def _for_type(t: mi.Type) -> st.SearchStrategy[Any]:
    """A plausible value of ``t`` (edge values included) or, sometimes, anything at all."""
    if isinstance(t, mi.StructType):
        plausible: st.SearchStrategy[Any] = _struct(t)
    elif isinstance(t, mi.CustomType):  # ByteSize
        plausible = _SIZE
    elif isinstance(t, mi.BoolType):
        plausible = st.booleans()
    elif isinstance(t, mi.IntType):
        plausible = st.one_of(st.integers(-2, 70000), st.sampled_from([0, 1, 2**32 - 2, 2**63 - 1, 2**63]))
    elif isinstance(t, mi.FloatType):
        plausible = st.one_of(st.floats(-1, 1e5), st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e308]))
    elif isinstance(t, mi.LiteralType):
        plausible = st.sampled_from(list(t.values))
    elif isinstance(t, mi.StrType):
        plausible = st.one_of(st.text(max_size=10), st.sampled_from(["lru", "a", "127.0.0.1:0", "x\x00"]))
    elif isinstance(t, mi.ListType):
        plausible = st.lists(_for_type(t.item_type), max_size=3)
    elif isinstance(t, mi.UnionType):
        plausible = st.one_of([_for_type(x) for x in t.types if not isinstance(x, mi.NoneType)])
    else:
        plausible = _ANY
    return st.integers(0, 9).flatmap(lambda i: _ANY if i == 0 else plausible)  # 1 in 10: any value


def _struct(t: mi.StructType) -> st.SearchStrategy[dict[str, Any]]:
    fields = {f.encode_name: f for f in t.fields if f.encode_name != "source"}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4)) if fields else []
        out = {n: draw(_for_type(fields[n].type)) for n in names}
        for f in t.fields:  # required fields (a tenant's name) are usually there
            if f.required and f.encode_name not in out and draw(st.integers(0, 9)):
                out[f.encode_name] = draw(_for_type(f.type))
        if draw(st.integers(0, 39)) == 0:
            out[draw(st.text(min_size=1, max_size=6))] = draw(_SCALARS)  # an unknown field
        return out

    return build()


_CONFIG_TYPE = mi.type_info(Config)
assert isinstance(_CONFIG_TYPE, mi.StructType)
_RANDOM = _struct(_CONFIG_TYPE)
# A valid multi-tenant config, so that random fields laid over it land near the boundaries of
# the DRAM split and the tenant rules instead of failing on the first section.
_TENANT = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
     "uids": st.lists(st.integers(0, 40), max_size=2), "gids": st.lists(st.integers(0, 40), max_size=2)},
    optional={"dram_bytes": st.sampled_from([0, 16 << 20, 64 << 20, 100_000_000, "200 MiB", 4096, 4095])},
)  # fmt: skip
_BASE = st.fixed_dictionaries(
    {"node": st.just({"id": "n1"}),
     "store": st.fixed_dictionaries({"dram_bytes": st.sampled_from([1 << 30, "1 GB", 256 << 20, 64 << 20]),
                                     "max_block_bytes": st.sampled_from([16 << 20, "1 MB", 4096, 1])}),
     "tenants": st.lists(_TENANT, max_size=4)},
)  # fmt: skip


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(_RANDOM)
    if draw(st.booleans()):
        base = draw(_BASE)
        for k, v in doc.items():  # the random fields win
            base[k] = {**base[k], **v} if isinstance(base.get(k), dict) and isinstance(v, dict) else v
        doc = base
    return doc


_CONFIGS = _configs()


def _check_loaded(cfg: Config) -> None:
    """What a loaded config promises the daemon."""
    for name in OWNED:
        for field, v in _leaves(msgspec.to_builtins(getattr(cfg, name), enc_hook=int), name):
            if isinstance(v, int) and not isinstance(v, bool):
                assert -(2**63) <= v < 2**63, field
            if isinstance(v, float):
                assert math.isfinite(v), field
            if isinstance(v, str):
                assert "\x00" not in v, field
    assert cfg.store.dram_bytes % PAGE_BYTES == 0 and cfg.store.nvme_bytes % PAGE_BYTES == 0
    assert cfg.store.dram_bytes >= cfg.store.max_block_bytes >= 1
    segs = cfg.tenant_segments()
    assert sum(n for _, n in segs) <= cfg.store.dram_bytes
    assert all(n % PAGE_BYTES == 0 and n >= cfg.store.max_block_bytes for _, n in segs)
    assert [name for name, _ in segs] == (["_mesh"] + [t.name for t in cfg.tenants] if cfg.tenants else ["default"])


def _leaves(v: Any, field: str) -> list[tuple[str, Any]]:
    if isinstance(v, dict):
        return [leaf for k, x in v.items() for leaf in _leaves(x, f"{field}.{k}")]
    if isinstance(v, list):
        return [leaf for i, x in enumerate(v) for leaf in _leaves(x, f"{field}[{i}]")]
    return [(field, v)]


def _outcome(path: Path, overrides: dict[str, Any] | None = None) -> str:
    """Load; "ok" or the ConfigError's text. Any other exception fails the test."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(f"{path if path is not None else '<defaults>'}: "), msg
        assert "\n" not in msg.strip() or "not valid TOML" in msg, msg
        assert "field " in msg or "not valid TOML" in msg, msg  # names the field
        return msg
    _check_loaded(cfg)
    return "ok"


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=_CONFIGS)
def test_random_configs_load_or_raise_config_error(tmp_path_factory: pytest.TempPathFactory, doc: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("cfg", numbered=True) / "mesh.toml"
    path.write_text(toml_document(doc))
    _outcome(path)


_FLAGS = ["node.id", "node.data_dir", "node.socket", "node.arena_dir", "store.dram_bytes", "store.nvme_bytes",
          "store.nvme_dir", "store.eviction", "metrics.listen", "log.level", "log.format", "node.role"]  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True)
@given(flags=st.dictionaries(st.sampled_from(_FLAGS), st.one_of(st.text(max_size=12), _SIZE_TEXT), max_size=3))
def test_random_command_line_flags_load_or_raise_config_error(flags: dict[str, str]) -> None:
    """Flags arrive as strings (``memkv-mesh daemon --dram-bytes ...``)."""
    _outcome(None, flags)  # type: ignore[arg-type]


# ---- the values that used to escape as something else ---------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # OverflowError: "1" and 400 zeros is inf as a float.
        ('[store]\ndram_bytes = "1' + "0" * 400 + ' B"\n', "field store.dram_bytes: byte size"),
        ('[store]\ndram_bytes = "99999999999999999999 TiB"\n', "field store.dram_bytes: byte size '99999999999999999999 TiB' is too large"),
        # Integers beyond 64 bits loaded (tomllib allows them) and failed later in ftruncate/mmap.
        ("[store]\ndram_bytes = 99999999999999999999\n", "field store.dram_bytes: 99999999999999999999 does not fit a 64-bit integer"),
        ("[mesh]\nreplicas = 99999999999999999999\n", "field mesh.replicas: 99999999999999999999 does not fit"),
        ("[[tenants]]\nname = 'a'\nuids = [99999999999999999999]\n", "field tenants[0].uids[0]: 99999999999999999999 does not fit"),
        # NaN compared false with every bound and loaded; inf and negatives were never checked here.
        ("[mesh]\nrepair_interval_s = nan\n", "field mesh.repair_interval_s: nan is not a valid value"),
        ("[mesh]\nrepair_interval_s = inf\n", "field mesh.repair_interval_s: must be a positive number of seconds, got inf"),
        ("[mesh]\nhandoff_timeout_s = -1\n", "field mesh.handoff_timeout_s: must be 0 or a positive number of seconds"),
        ("[mesh]\nhandoff_timeout_s = inf\n", "field mesh.handoff_timeout_s: must be 0 or a positive"),
        ("[mesh]\nput_wait_s = nan\n", "field mesh.put_wait_s: nan is not a valid value"),
        # NUL in a path loaded, then os.* raised "embedded null byte" at start-up.
        ('[node]\ndata_dir = "a\\u0000b"\n', "field node.data_dir: 'a\\x00b' contains a NUL character"),
        ('[node]\nsocket = "a\\u0000b"\n', "field node.socket: 'a\\x00b' contains a NUL character"),
        ('[store]\nnvme_dir = "a\\u0000b"\n', "field store.nvme_dir: 'a\\x00b' contains a NUL character"),
        ('[node]\narena_dir = "\\u0000"\n', "field node.arena_dir"),
        ('[node]\ndata_dir = ""\n', "field node.data_dir: must not be empty"),
        # Sections decoded by other modules: the field inside the section is named.
        ("[gossip]\nport = -1\n", "field gossip.port: must be in 0..65535, got -1"),
        ("[gossip]\nkeys = ['!!']\n", "field gossip.keys[0]: not valid base64"),
        ("[gossip]\nprobe_interval = nan\n", "field gossip.probe_interval: nan is not a valid value"),
        ("[store.kvikio]\ntask_size = 1\n", "field store.kvikio.task_size: must be an integer of at least 4096 bytes"),
        ("[gossip]\nenabled = true\ninsecure_no_key = true\n[dataplane]\nkeys = ['!!']\n", "field dataplane.keys[0]: not valid base64"),
        ("[gossip]\nenabled = true\ninsecure_no_key = true\n[dataplane]\nport = 70000\n", "field dataplane.port: must be 0-65535"),
    ],
)  # fmt: skip
def test_values_that_escaped_are_config_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    assert fragment in _outcome(path)


def test_unreadable_and_undecodable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": cannot read the config file: Is a directory"):
        load_config(tmp_path)  # IsADirectoryError escaped
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[node]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid TOML: 'utf-8' codec"):
        load_config(bad)  # UnicodeDecodeError escaped


# ---- the command --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment", "code"),
    [
        ("[store]\ndram_bytes = 99999999999999999999\n", "field store.dram_bytes", 2),
        ('[store]\ndram_bytes = "1' + "0" * 400 + ' B"\n', "field store.dram_bytes: byte size", 2),
        ("[limits]\nmax_clients = 0\n", "field limits.max_clients: must be at least 1, got 0", 2),
        ("[limits]\nframe_timeout_s = nan\n", "field limits.frame_timeout_s: nan is not a valid value", 2),
        ("[[tenants]]\nname = '_x'\nuids = [1]\n", "field tenants[0].name: '_x' must be", 2),
        ("[[tenants]]\nname = 'a'\nuids = [1]\n", "field tenants: DRAM segment(s) a would be smaller", 2),
        ('[node]\ndata_dir = "a\\u0000b"\n', "field node.data_dir", 2),
        ("[gossip]\nport = 99999\n", "field gossip.port", 2),
        (b'[node]\nid = "caf\xe9"\n', "not valid TOML", 2),
        # Loads, then cannot start (the arena's directory is a file): one line too. (Not a huge
        # arena: on a file system that allows the size, posix_fallocate would fill the disk.)
        ("[node]\nid = 't1'\narena_dir = '{a_file}'\n[metrics]\nenabled = false\n[store]\nnvme_bytes = 0\n",
         "memkv-mesh daemon: ", 1),
    ],
)  # fmt: skip
def test_daemon_with_a_bad_config_exits_with_one_line(
    tmp_path: Path, short_dir: Path, text: str | bytes, fragment: str, code: int
) -> None:
    path = tmp_path / "bad.toml"
    common = (
        f"[node]\nid = 't1'\ndata_dir = {_toml_str(str(tmp_path / 'data'))}\narena_dir = {_toml_str(str(tmp_path))}\n"
        f"socket = {_toml_str(str(short_dir / 's.sock'))}\n[metrics]\nenabled = false\n"
    )
    (tmp_path / "a-file").write_text("not a directory")
    if isinstance(text, str):
        text = text.replace("{a_file}", str(tmp_path / "a-file"))
    body = text if isinstance(text, bytes) else text.encode()
    if b"[node]" not in body:
        body = common.encode() + body
    elif b"data_dir" not in body and isinstance(text, str):  # keep its state in tmp_path
        body = body.replace(b"[node]\n", f"[node]\ndata_dir = {_toml_str(str(tmp_path / 'data'))}\nsocket = {_toml_str(str(short_dir / 's.sock'))}\n".encode(), 1)
    path.write_bytes(body)
    proc = subprocess.run(
        [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(path)],
        cwd=REPO, capture_output=True, timeout=60,
    )  # fmt: skip
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("{")]  # JSON log lines aside
    assert len(lines) == 1 and lines[0].startswith("memkv-mesh daemon: "), err
    assert fragment in lines[0], err


def test_a_dram_size_that_is_not_a_page_multiple_starts(daemon_process: Any) -> None:
    """It used to end in a traceback from the allocator ("capacity ... is not a multiple of align
    4096"); the size is now rounded down to whole pages."""
    d = daemon_process(store={"dram_bytes": 20_000_001, "max_block_bytes": 1 << 20, "nvme_bytes": 0})
    with d.client() as c:
        assert c.stats()["store"]["dram_capacity_bytes"] == 20_000_001 // 4096 * 4096


@pytest.mark.parametrize("field", ["probe_interval", "probe_timeout", "gossip_interval", "pushpull_interval", "stream_timeout_s", "reconnect_timeout_s"])
def test_gossip_timings_must_be_finite(tmp_path: Path, field: str) -> None:
    """probe_interval = inf loaded and the daemon never probed."""
    p = tmp_path / "mesh.toml"
    p.write_text(f"[gossip]\n{field} = inf\n")
    with pytest.raises(ConfigError, match=f"gossip.{field}"):
        load_config(p)
