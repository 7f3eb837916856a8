"""Typed, frozen configuration decoded from ``mesh.toml``.

Every field has a default that lets a laptop run a single node with no edits, and a comment that
says why the default is what it is. An unknown field, a wrong type or an out-of-range value is a
``ConfigError`` naming the file, the field and the problem. Command-line flags that are given
override the file; flags that are not given do not (``load_config(path, overrides)``).

Relative paths in the file are resolved against the directory that holds the file, so
``memkv-mesh daemon --config /etc/memkv/mesh.toml`` and ``cd /etc/memkv && memkv-mesh daemon``
mean the same thing.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from memkv_mesh.eviction import DEFAULT_POLICY, POLICIES
from memkv_mesh.nvme_kvikio import KvikioConfig
from transport.dataplane_config import DataPlaneConfig
from transport.gossip_config import GossipConfig

__all__ = [
    "PAGE_BYTES",
    "ByteSize",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "NodeConfig",
    "StoreConfig",
    "TenantConfig",
    "load_config",
    "parse_byte_size",
]

KEY_BYTES = 32
# Every region the daemon carves out of memory or disk (the arena, a tenant's segment, the NVMe
# tier) is a whole number of pages: mmap offsets and O_DIRECT I/O need it.
PAGE_BYTES = 4096
# Names of the daemon's own DRAM segments (never a tenant's: tenant names start with a letter or
# digit).
DEFAULT_SEGMENT = "default"
MESH_SEGMENT = "_mesh"
_TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_ID = 2**32 - 2  # uid_t/gid_t; 2**32 - 1 is (uid_t)-1, "no id"
# TOML integers are signed 64-bit (tomllib does not enforce it); every size and count the daemon
# hands to the OS (ftruncate, mmap, sleep) must fit one.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A configuration file or flag is wrong; the message names the file and the field."""


class _FieldError(ConfigError):
    """A validation failure of one field (``field`` as written in the message, e.g.
    ``tenants[1].uids``); ``load_config`` prefixes the file name."""

    def __init__(self, field: str, text: str) -> None:
        super().__init__(f"field {field}: {text}")
        self.field = field


class ByteSize(int):
    """A size in bytes; in TOML either an integer or a string such as ``"512 MiB"`` or ``"2GB"``."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_byte_size(value: int | str) -> int:
    """``"512 MiB"`` -> 536870912; ints pass through. ValueError names what was wrong."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte size cannot be negative, got {value}")
        if value > _INT64_MAX:
            raise ValueError(f"byte size {value} is too large (at most {_INT64_MAX} bytes)")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a byte size (int or string like '512 MiB'), got {value!r}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse byte size {value!r}: use an integer or a number with one of "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    number = float(m.group(1))
    if number * _UNITS[unit] > _INT64_MAX:  # also "1000...0 B" that float() makes inf
        raise ValueError(f"byte size {value!r} is too large (at most {_INT64_MAX} bytes)")
    return int(number * _UNITS[unit])


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is ByteSize:
        return ByteSize(parse_byte_size(obj))
    raise NotImplementedError(f"no decoder for {typ}")


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # A name unique in the mesh. Default: the host name, which is unique in most clusters and
    # readable in logs; set it when two daemons share a host (tests, several NUMA nodes).
    id: str = ""
    # "gpu" runs engines and keeps hot blocks in DRAM; "flash" holds replicas on NVMe; "both" is the
    # right default for a single machine, which is both the engine host and its own storage.
    role: Literal["gpu", "flash", "both"] = "both"
    # Where the daemon keeps its socket, NVMe tier and state. Relative to the config file.
    # ".memkv" keeps a laptop run inside the checkout (it is git-ignored).
    data_dir: str = ".memkv"
    # The Unix socket engines connect to. Empty: <data_dir>/memkv.sock, so two daemons with two
    # data dirs never collide.
    socket: str = ""
    # Directory of the shared-memory arena file. Empty: /dev/shm (tmpfs, so the arena is RAM and
    # never written back to disk) where it exists, else data_dir.
    arena_dir: str = ""


class StoreConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # DRAM arena size. 512 MiB fits a laptop next to a browser; a GPU node gives it tens to
    # hundreds of GiB (the arena is the first tier every get is served from).
    dram_bytes: ByteSize = ByteSize(512 * 1024**2)
    # NVMe tier size (preallocated files under <data_dir>/nvme). 0 disables the tier. 1 GiB keeps a
    # laptop's disk use modest; flash nodes set terabytes.
    nvme_bytes: ByteSize = ByteSize(1024**3)
    # Directory for the NVMe tier files. Empty: <data_dir>/nvme. Point it at the NVMe mount.
    nvme_dir: str = ""
    # Largest block accepted. Blocks are hundreds of KiB to ~100 MiB (a 256-token chunk of a 405B
    # model is ~128 MiB); larger values are a client bug and are refused with a clear error.
    max_block_bytes: ByteSize = ByteSize(128 * 1024**2)
    # Eviction policy for both tiers. "s3fifo-adaptive" had the best prefix-hit ratio on the
    # Mooncake conversation trace up to 20,000 blocks (about 2x LRU at 2,000, within 3% at
    # 50,000); docs/eviction.md has the table and the command. "lru" is the conservative choice.
    eviction: str = DEFAULT_POLICY
    # Reserve the arena's memory at start (fallocate on tmpfs). Without it a full /dev/shm would
    # kill the daemon with SIGBUS on first touch; with it start-up fails early and clearly instead.
    preallocate: bool = True
    # How the NVMe tier moves payload bytes. "posix" (pread/pwrite through the page cache) works
    # everywhere; "kvikio" uses kvikio's CuFile (GPUDirect Storage where cuFile works, its POSIX
    # compat mode elsewhere) and needs the `gpu` extra; options in [store.kvikio].
    nvme_backend: Literal["posix", "kvikio"] = "posix"
    kvikio: KvikioConfig = KvikioConfig()
    # Verify every NVMe block's checksum at start-up (reads the whole tier). Off by default: the
    # checksum is verified on every read anyway, and a multi-TB scan delays start-up by minutes.
    verify_on_start: bool = False
    # How NVMe writes are made durable. A flash node confirms a replica only once it is on its NVMe
    # tier; this decides what "on" means. "off": written to the page cache (survives kill -9 of
    # the daemon, not a power loss); "batch": one fdatasync of the data files and the journal per
    # pushed batch, before the replica is confirmed (survives power loss); "always": two fdatasyncs
    # per block, every NVMe write including demotions. "off" is the default for a cache: a power
    # loss costs the replicas written in the last seconds, and R copies on R machines rarely lose
    # power together; the measured cost of each is in docs/storage.md.
    fsync: Literal["off", "batch", "always"] = "off"
    # The daemon hashes the bytes of every put at commit and records that checksum (refusing a
    # commit whose client-sent checksums differ), so no client can commit a block whose checksum
    # does not match its bytes. It costs one more read of each block: 25-35% of put throughput at
    # 2 MiB on the 2-core dev VM (docs/benchmarks.md). On by default; a node whose local clients
    # are all trusted may turn it off, and then clients send the checksums they compute while
    # copying (nearly free) and the daemon records them as given.
    verify_puts: bool = True


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Serve Prometheus text format at http://<listen>/metrics.
    enabled: bool = True
    # Loopback by default: metrics name keys' counts and sizes, not for the open network. Port
    # 9464 is the conventional Prometheus exporter port range; 0 picks a free port.
    listen: str = "127.0.0.1:9464"


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # "info" logs start-up, shutdown and errors; "debug" adds one line per client connection.
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "json" (one object per line, for log shippers) or "text" (for a terminal).
    format: Literal["json", "text"] = "json"


class MeshConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Replicas of each block on flash-capable peers (rendezvous owners). 2 survives the loss of
    # any one node with half the flash of 3; a cache can afford to recompute what two losses cost.
    replicas: int = 2
    # Re-replication after a join, leave or death, in bytes per second per node. 256 MB/s moves a
    # 1 TB flash node's share back within about an hour on a 10-node mesh while leaving most of a
    # 25 GbE NIC to engines' fetches.
    repair_bytes_per_s: ByteSize = ByteSize(256_000_000)
    # Seconds between repair passes when nothing changes (a safety net for missed events).
    repair_interval_s: float = 30.0
    # How long a graceful shutdown may spend handing owned blocks to the remaining owners before
    # leaving anyway (a cache can afford to lose what a stuck hand-off could not move).
    handoff_timeout_s: float = 30.0
    # When a put is acknowledged. "local": once this node stored it; it stays *dirty* (never
    # evicted) until its owners hold it, so eviction and replication lag cannot lose it, only this
    # node's own crash within the lag can. "replicated": once every owner holds it (a put then
    # costs a push round trip). "local" is the default: in `memkv-mesh bench replay`
    # (docs/benchmarks.md) it ran 198 requests/s at p50 11 ms against 105 at 31 ms for
    # "replicated", neither losing a block; a KV cache can recompute what a GPU node's crash costs.
    ack: Literal["local", "replicated"] = "local"
    # Bound on dirty bytes (acknowledged, not yet on all owners) per node; at the bound puts wait
    # (back-pressure). 0 = half of store.dram_bytes: dirty blocks are the freshest, the ones most
    # likely to be read again, so pinning them costs little hit ratio, and the other half stays
    # free for eviction and fetches.
    dirty_bytes: ByteSize = ByteSize(0)
    # How long a put waits at the dirty bound before it fails with the `busy` error (the client
    # can count it and retry, or recompute later). 10 s rides out an owner's death: SWIM confirms
    # it in a few seconds and its share is re-placed. Also the longest an ack = "replicated" put
    # waits for its owners before failing `not_replicated` (the block stays stored and dirty).
    put_wait_s: float = 10.0
    # One push of a batch to one owner may take this long before it counts as failed (and is
    # retried with back-off). A SIGSTOPped owner then costs only its own share for this long.
    replication_timeout_s: float = 5.0
    # How long a mesh-wide delete is remembered (tombstone): longer than any replication lag or
    # repair pass, so a stale replica never brings a deleted block back. A node that rejoins gets
    # every live tombstone. At most 65,536 are kept (oldest go first; ~13 MB).
    tombstone_s: float = 3600.0


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One ``[[tenants]]`` entry. A local client's tenant comes from the socket (SO_PEERCRED):
    its uid, else its primary gid, picks the tenant; the client's own word is never asked."""

    # Names the tenant in logs, metrics, the arena file and the mesh. 1-64 of letters, digits,
    # '.', '_', '-', starting with a letter or digit (names starting with '_' are the daemon's).
    name: str
    # Local users allowed to connect as this tenant. A uid may belong to one tenant only, so the
    # socket's peer credentials always name exactly one tenant.
    uids: list[int] = []
    # ... or users whose primary group is one of these (a uid match wins over a gid match).
    gids: list[int] = []
    # The tenant's own DRAM arena, its DRAM quota. 0 = an equal share of what the tenants with a
    # set size and the mesh segment leave: a zero-thought default that still isolates tenants.
    dram_bytes: ByteSize = ByteSize(0)


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[limits]``: everything an untrusted local client can make the daemon hold is bounded."""

    # Connected local clients. An inference node runs a handful of engine processes (one per GPU
    # or TP rank) plus tools; 1024 is generous for them and stays far below the default 'ulimit -n'
    # of a service (each client costs a socket and a task).
    max_clients: int = 1024
    # Connected clients of one tenant: a quarter of max_clients, so one tenant holding every
    # connection it may still leaves room for the others (engines use a few connections each).
    max_clients_per_tenant: int = 256
    # Leases (blocks pinned in the arena by a get until released) per client. 4096 leases of
    # 256-token blocks cover a 1M-token context: more than any engine holds at once, and a leaking
    # client pins at most that many blocks instead of the whole arena.
    max_leases_per_client: int = 4096
    # Reserved-but-uncommitted put slots per client. 65536 lets an engine stage a large batch of
    # small blocks; a client that reserves and never commits is stopped there.
    max_pending_per_client: int = 65536
    # Leases summed over a tenant's clients: 16 clients' worth, so many engine processes of one
    # tenant fit, while one tenant cannot pin blocks without bound.
    max_leases_per_tenant: int = 65536
    # Pending put slots summed over a tenant's clients (4 clients at the per-client bound).
    max_pending_per_tenant: int = 262144
    # A client that sends part of a frame and then nothing for this long is disconnected. 30 s is
    # far beyond any local memcpy or scheduling stall, and short enough that a stuck or hostile
    # client cannot hold a half-read frame's buffer for long.
    frame_timeout_s: float = 30.0
    # The mesh segment (blocks received from the mesh before a local tenant reads them; no client
    # maps it) when tenants are declared. 0 = max(4 x store.max_block_bytes, store.dram_bytes / 8):
    # room for a few fetches of the largest block in flight, and an eighth of DRAM for replicas.
    mesh_segment_bytes: ByteSize = ByteSize(0)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    node: NodeConfig = NodeConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    # Membership gossip (SWIM + Lifeguard); off in the single-node default. Fields and reasons:
    # transport/gossip_config.py.
    gossip: GossipConfig = GossipConfig()
    # The bulk data plane between daemons (TCP, or UCX where it brings RDMA/CUDA). Runs whenever
    # gossip does; empty keys reuse [gossip] keys. Fields and reasons: transport/dataplane_config.py.
    dataplane: DataPlaneConfig = DataPlaneConfig()
    # Placement of replicas in the mesh.
    mesh: MeshConfig = MeshConfig()
    # Tenants ([[tenants]]). Empty: one implicit tenant, "default", that every local user who can
    # open the socket belongs to (the zero-config single-tenant node).
    tenants: list[TenantConfig] = []
    # Bounds on what local clients can make the daemon hold.
    limits: LimitsConfig = LimitsConfig()
    # Where the file was read from (empty for defaults); relative paths resolve against its dir.
    source: str = ""

    # -- resolved views -----------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def _resolve(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else self.base_dir / path

    @property
    def node_id(self) -> str:
        return self.node.id or socket.gethostname()

    @property
    def data_dir(self) -> Path:
        return self._resolve(self.node.data_dir)

    @property
    def socket_path(self) -> Path:
        return self._resolve(self.node.socket) if self.node.socket else self.data_dir / "memkv.sock"

    @property
    def arena_dir(self) -> Path:
        if self.node.arena_dir:
            return self._resolve(self.node.arena_dir)
        shm = Path("/dev/shm")
        return shm if shm.is_dir() and os.access(shm, os.W_OK) else self.data_dir

    @property
    def dirty_limit_bytes(self) -> int:
        """``[mesh] dirty_bytes``, or half of the DRAM arena when it is 0 (automatic)."""
        return int(self.mesh.dirty_bytes) or max(int(self.store.dram_bytes) // 2, int(self.store.max_block_bytes))

    @property
    def nvme_dir(self) -> Path:
        return self._resolve(self.store.nvme_dir) if self.store.nvme_dir else self.data_dir / "nvme"

    def tenant_segments(self) -> list[tuple[str, int]]:
        """The DRAM arena split into (segment name, bytes), every size a multiple of PAGE_BYTES.

        No tenants: ``[("default", dram)]``. With tenants: ``[("_mesh", m), (tenant, bytes), ...]``
        in declaration order; tenants with ``dram_bytes = 0`` share what is left equally.
        ``load_config`` has checked that the split fits, so on a loaded Config this never raises;
        on a hand-built one a bad split raises ConfigError (``field tenants: ...``).
        """
        return _segments(self)


def _round_down(n: int) -> int:
    return n // PAGE_BYTES * PAGE_BYTES


def _round_up(n: int) -> int:
    return -(-n // PAGE_BYTES) * PAGE_BYTES


def _segments(cfg: Config) -> list[tuple[str, int]]:
    dram = _round_down(int(cfg.store.dram_bytes))
    if not cfg.tenants:
        return [(DEFAULT_SEGMENT, dram)]
    block = int(cfg.store.max_block_bytes)
    mesh = int(cfg.limits.mesh_segment_bytes) or _round_up(max(4 * block, dram // 8))
    fixed = sum(int(t.dram_bytes) for t in cfg.tenants)
    shared = [t.name for t in cfg.tenants if not t.dram_bytes]
    left = dram - mesh - fixed
    share = _round_down(left // len(shared)) if shared and left > 0 else 0
    segs = [(MESH_SEGMENT, mesh)] + [(t.name, int(t.dram_bytes) or share) for t in cfg.tenants]
    total = sum(n for _, n in segs)
    split = ", ".join(f"{name} {n}" for name, n in segs)
    if total > dram:
        raise _FieldError(
            "tenants",
            f"the DRAM split needs {total} bytes ({split}) but store.dram_bytes is {dram}: raise "
            "store.dram_bytes, or lower tenants' dram_bytes or limits.mesh_segment_bytes"
            + ("" if cfg.limits.mesh_segment_bytes else
               " (automatic: max(4 x store.max_block_bytes, store.dram_bytes / 8), so a lower "
               "store.max_block_bytes lowers it)"),
        )
    small = [name for name, n in segs if n < block]
    if small:
        left_note = f"; tenants with dram_bytes = 0 share the {max(left, 0)} bytes left" if shared else ""
        raise _FieldError(
            "tenants",
            f"DRAM segment(s) {', '.join(small)} would be smaller than store.max_block_bytes "
            f"({block}) and could not hold the largest block (split: {split}{left_note}; "
            f"store.dram_bytes is {dram}): raise store.dram_bytes or lower store.max_block_bytes",
        )
    return segs


def _validate_tenants(cfg: Config) -> None:
    seen: dict[str, int] = {}
    owner: dict[str, dict[int, str]] = {"uids": {}, "gids": {}}
    block = int(cfg.store.max_block_bytes)
    for i, t in enumerate(cfg.tenants):
        where = f"tenants[{i}]"
        if not _TENANT_NAME_RE.fullmatch(t.name):
            raise _FieldError(
                f"{where}.name",
                f"{t.name!r} must be 1-64 characters of letters, digits, '.', '_', '-', starting "
                "with a letter or digit",
            )
        if t.name in seen:
            raise _FieldError(f"{where}.name", f"{t.name!r} is already the name of tenants[{seen[t.name]}]")
        seen[t.name] = i
        if not t.uids and not t.gids:
            raise _FieldError(where, f"tenant {t.name!r} needs at least one of uids or gids (who may connect as it)")
        for kind in ("uids", "gids"):
            for j, v in enumerate(getattr(t, kind)):
                if not 0 <= v <= _MAX_ID:
                    raise _FieldError(f"{where}.{kind}[{j}]", f"must be in 0..{_MAX_ID}, got {v}")
                other = owner[kind].get(v)
                if other is not None and other != t.name:
                    raise _FieldError(
                        f"{where}.{kind}[{j}]",
                        f"{kind[:-1]} {v} already belongs to tenant {other!r}: a {kind[:-1]} may "
                        "belong to one tenant only",
                    )
                owner[kind][v] = t.name
        if t.dram_bytes and t.dram_bytes < block:
            raise _FieldError(
                f"{where}.dram_bytes",
                f"must be 0 (an equal share) or at least store.max_block_bytes ({block}), "
                f"got {int(t.dram_bytes)}",
            )


def _page_aligned(cfg: Config) -> Config:
    """Round every region size (store.dram_bytes, store.nvme_bytes, tenants' dram_bytes,
    limits.mesh_segment_bytes) down to a multiple of PAGE_BYTES, so that "2GB" or "100 GB" work
    and the daemon only ever sees whole pages. A nonzero size below one page is an error, never
    a silent 0 (which would mean "no NVMe tier" or "an equal share")."""

    def down(field: str, v: int, zero: str) -> ByteSize:
        if 0 < v < PAGE_BYTES:
            raise _FieldError(field, f"must be 0 ({zero}) or at least {PAGE_BYTES} bytes, got {v}")
        return ByteSize(_round_down(v))

    store = msgspec.structs.replace(
        cfg.store,
        dram_bytes=ByteSize(_round_down(int(cfg.store.dram_bytes))),  # >= 1 MiB is checked later
        nvme_bytes=down("store.nvme_bytes", int(cfg.store.nvme_bytes), "no NVMe tier"),
    )
    limits = msgspec.structs.replace(
        cfg.limits,
        mesh_segment_bytes=down("limits.mesh_segment_bytes", int(cfg.limits.mesh_segment_bytes), "automatic"),
    )
    tenants = [
        msgspec.structs.replace(t, dram_bytes=down(f"tenants[{i}].dram_bytes", int(t.dram_bytes), "an equal share"))
        for i, t in enumerate(cfg.tenants)
    ]
    return msgspec.structs.replace(cfg, store=store, limits=limits, tenants=tenants)


def _validate(cfg: Config) -> None:
    s = cfg.store
    if s.dram_bytes < 1024 * 1024:
        raise ValueError(f"store.dram_bytes must be at least 1 MiB, got {int(s.dram_bytes)}")
    if s.max_block_bytes < 1 or s.max_block_bytes > s.dram_bytes:
        raise ValueError(
            f"store.max_block_bytes must be between 1 and store.dram_bytes ({int(s.dram_bytes)}), "
            f"got {int(s.max_block_bytes)}"
        )
    if s.nvme_bytes and s.nvme_bytes < s.max_block_bytes:
        raise ValueError(
            f"store.nvme_bytes ({int(s.nvme_bytes)}) must be 0 (no NVMe tier) or at least "
            f"store.max_block_bytes ({int(s.max_block_bytes)})"
        )
    if s.eviction not in POLICIES:
        raise ValueError(f"store.eviction {s.eviction!r} is not one of {', '.join(POLICIES)}")
    if not cfg.node.data_dir.strip():
        raise _FieldError("node.data_dir", "must not be empty (\".\" is the config file's directory)")
    if cfg.mesh.replicas < 1:
        raise ValueError(f"mesh.replicas must be at least 1, got {cfg.mesh.replicas}")
    if cfg.mesh.repair_bytes_per_s < 1:
        raise _FieldError("mesh.repair_bytes_per_s", f"must be at least 1, got {int(cfg.mesh.repair_bytes_per_s)}")
    for name in ("repair_interval_s", "put_wait_s", "replication_timeout_s", "tombstone_s"):
        v = getattr(cfg.mesh, name)
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"mesh.{name} must be a positive number of seconds, got {v}")
    if not 0 <= cfg.mesh.handoff_timeout_s < float("inf"):
        raise _FieldError(
            "mesh.handoff_timeout_s", f"must be 0 or a positive number of seconds, got {cfg.mesh.handoff_timeout_s}"
        )
    if cfg.mesh.dirty_bytes and cfg.mesh.dirty_bytes < s.max_block_bytes:
        raise ValueError(
            f"mesh.dirty_bytes ({int(cfg.mesh.dirty_bytes)}) must be 0 (automatic) or at least "
            f"store.max_block_bytes ({int(s.max_block_bytes)})"
        )
    if cfg.mesh.dirty_bytes > s.dram_bytes:
        raise ValueError(
            f"mesh.dirty_bytes ({int(cfg.mesh.dirty_bytes)}) must not exceed store.dram_bytes "
            f"({int(s.dram_bytes)}): dirty blocks stay in DRAM until their owners hold them"
        )
    cfg.dataplane.validate()  # even with gossip off: a bad value is an error now, not at the first mesh start
    if cfg.metrics.enabled:
        host, sep, port = cfg.metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"metrics.listen must be 'host:port', got {cfg.metrics.listen!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", cfg.node_id):
        raise ValueError(
            f"node.id {cfg.node_id!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    lim = cfg.limits
    for name in ("max_clients", "max_clients_per_tenant", "max_leases_per_client", "max_pending_per_client",
                 "max_leases_per_tenant", "max_pending_per_tenant"):  # fmt: skip
        if getattr(lim, name) < 1:
            raise _FieldError(f"limits.{name}", f"must be at least 1, got {getattr(lim, name)}")
    if not 0 < lim.frame_timeout_s < float("inf"):
        raise _FieldError("limits.frame_timeout_s", f"must be a positive number of seconds, got {lim.frame_timeout_s}")
    _validate_tenants(cfg)
    _segments(cfg)


def _check_raw(value: Any, field: str) -> None:
    """Values that no field accepts, refused before decoding with the field's dotted name: an
    integer beyond TOML's 64 bits (tomllib lets it through), a NaN (never a valid setting, and
    NaN compares false with every bound), a string holding NUL (no path, name or key may)."""
    if isinstance(value, dict):
        for k, v in value.items():
            name = k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else repr(k)  # a key may be any string
            _check_raw(v, f"{field}.{name}" if field else name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_raw(v, f"{field}[{i}]")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise _FieldError(field, f"{value} does not fit a 64-bit integer")
    elif isinstance(value, float) and value != value:
        raise _FieldError(field, "nan is not a valid value")
    elif isinstance(value, str) and "\x00" in value:
        raise _FieldError(field, f"{value!r} contains a NUL character")


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], where: str) -> None:
    """Apply dotted overrides ("store.dram_bytes": v) onto a nested dict."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, field = dotted.partition(".")
        table = base.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: field {section}: must be a table ([{section}]), got {table!r}")
        table[field] = value


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (None: built-in defaults), apply dotted ``overrides``, validate.

    Raises ConfigError naming the file and the field on any problem (and saying so when the
    offending value came from an override, i.e. a command-line flag, rather than the file).
    """
    where = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except OSError as e:  # a directory, no permission, an I/O error
            raise ConfigError(f"{where}: cannot read the config file: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from None
    if "source" in raw:
        raise ConfigError(f"{where}: unknown field 'source' at the top level")
    given = {k for k, v in (overrides or {}).items() if v is not None}
    _merge(raw, overrides or {}, where)
    raw["source"] = str(Path(path).resolve()) if path is not None else ""
    try:
        _check_raw(raw, "")
        cfg = _page_aligned(msgspec.convert(raw, Config, dec_hook=_dec_hook))
        _validate(cfg)
    except (msgspec.ValidationError, ValueError) as e:
        field, text = _describe(e)
        if field in given:
            text = text.replace(f"field {field}:", f"field {field} (from the command line):", 1)
        raise ConfigError(f"{where}: {text}") from None
    return cfg


def _describe(e: Exception) -> tuple[str, str]:
    """(dotted field, message): msgspec's "... - at `$.store.dram_bytes`" becomes
    "field store.dram_bytes: ...", and its unknown-field wording names the section."""
    if isinstance(e, _FieldError):
        return e.field, str(e)
    msg = str(e)
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", msg, re.DOTALL)
    if m:
        field = m.group(2)
        unknown = re.match(r"^Object contains unknown field `(.*)`$", m.group(1), re.DOTALL)
        if unknown and field:
            return f"{field}.{unknown.group(1)}", f"unknown field {unknown.group(1)!r} in [{field}]"
        missing = re.match(r"^Object missing required field `(.*)`$", m.group(1), re.DOTALL)
        if missing and field:
            name = f"{field}.{missing.group(1)}"
            return name, f"field {name}: is required and missing"
        # A section's own validation names the field inside it ("gossip.port: must be ...",
        # "kvikio.task_size must be ..."): name that field, not just the section.
        last = re.escape(field.rpartition(".")[2])
        inner = re.match(rf"^(?:[^:]*: )?{last}\.([A-Za-z_]\w*(?:\[\d+\])*):? (.*)$", m.group(1), re.DOTALL) if field else None
        if inner:
            field = f"{field}.{inner.group(1)}"
            return field, f"field {field}: {inner.group(2)}"
        return field, f"field {field or '(top level)'}: {m.group(1)}"
    m = re.match(r"^Object contains unknown field `(.*)`$", msg, re.DOTALL)
    if m:
        return m.group(1), f"unknown field {m.group(1)!r} at the top level"
    m = re.match(r"^([a-z_]+(?:\.[a-z_]+)+(?:\[\d+\])*):? (.*)$", msg, re.DOTALL)  # validation messages lead with the field
    if m:
        return m.group(1), f"field {m.group(1)}: {m.group(2)}"
    return "", msg
