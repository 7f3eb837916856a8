"""The node's sidecar daemon: a Trio service that owns the arena, the tiers and the Unix socket.

Theory of operation
-------------------
* ``Daemon.run`` is started with ``nursery.start``: it takes exclusive locks on the data
  directory and on the socket path (one daemon per directory, one per socket; a second one is
  refused before it touches anything), recovers the NVMe tier in a worker thread, creates the
  shared-memory arena, binds the Unix socket (mode 0660), starts the metrics endpoint and reports
  itself started. Cancelling its scope stops it; ``finally`` blocks close the tiers and remove the
  socket and arena.
* Who a client is comes from the socket (``SO_PEERCRED``): ``memkv_mesh/tenants.py`` maps the
  peer to a tenant (or the operator, or a refusal). Every key of a request is scoped to the
  tenant before anything looks at it, the client gets its tenant's arena segment as a file
  descriptor with the ``Welcome``, and every offset it is told is relative to that segment. Puts
  are committed with the checksum of the bytes actually in the slot (hashed by the daemon).
* Bounded per client: ``[limits]`` caps connections, leases and pending slots (per client and per
  tenant), and a client that leaves a frame half sent for ``frame_timeout_s`` is disconnected.
* One task per client connection reads length-prefixed frames and answers each request in order
  (``protocol.py``). What a connection holds (leases, slots allocated but not committed) is
  released when it ends, however it ends: EOF, reset, a protocol error, or daemon shutdown.
* Bad input never takes the daemon down: a frame that does not decode, a wrong key length, an
  oversize block or a full store gets an ``Error`` reply; only a frame too long to trust closes
  that one connection. Anything unexpected is logged and answered with ``internal`` (a reply
  that will not encode included); an error outside any one request closes only that connection.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import logging
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from memkv_mesh import __version__, protocol
from memkv_mesh.arena import Arena, ArenaError, arena_dir_path
from memkv_mesh.config import Config
from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.metrics import DaemonCounts, Metrics
from memkv_mesh.placement import PLACEMENT_VERSION
from memkv_mesh.store import BlockStore, StoreError
from memkv_mesh.tenants import OPERATOR, Tenant, Tenants

log = logging.getLogger("memkv_mesh.daemon")

__all__ = ["Daemon", "DaemonError"]


class DaemonError(Exception):
    """The daemon cannot start (the message says why and what to change)."""


class _Conn:
    """Identity of one client connection (owner of leases and pending slots)."""

    __slots__ = ("client", "gid", "hello", "id", "pid", "stream", "tenant", "uid")
    _ids = 0

    def __init__(self, stream: trio.SocketStream | None = None) -> None:
        _Conn._ids += 1
        self.id = _Conn._ids
        self.hello = False
        self.client = ""
        self.pid = 0
        self.uid = -1
        self.gid = -1
        self.tenant: Tenant | None = None  # None: the operator (names no blocks)
        self.stream = stream  # for the parts of a streamed get (None: the client is gone)


_KEY_LENGTHS = frozenset((KEY_BYTES,))
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# How often the arena files are checked against the ones the daemon created.
_ARENA_CHECK_S = 2.0
# Tombstones (mesh-wide deletes) kept at most: about 200 bytes each in CPython, so ~13 MB.
_TOMBSTONES_MAX = 65536
# A streamed get's part that a client does not take within this long closes its connection.
_PART_SEND_S = 30.0
# msgspec's words for a tag that names no request type ("Invalid value 99 - at `$[0]`").
_UNKNOWN_TAG = re.compile(r"^Invalid value (-?\d+) - at `\$\[0\]`$")

_OP_NAMES = {
    protocol.Hello: "hello",
    protocol.Alloc: "alloc",
    protocol.Commit: "commit",
    protocol.Abort: "abort",
    protocol.Get: "get",
    protocol.Release: "release",
    protocol.Lookup: "lookup",
    protocol.Delete: "delete",
    protocol.StatsRequest: "stats",
    protocol.MembersRequest: "members",
    protocol.Contains: "contains",
}


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node_id
        self.socket_path = config.socket_path
        self.started_at = 0.0
        self.store: BlockStore | None = None
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.gossip: Any = None
        self.dataplane: Any = None
        self.mesh: Any = None
        self._left = False
        self.nvme_recovery: Any = None
        self._arena: Arena | None = None
        self._lock_fds: list[int] = []
        self._connections = 0
        self._bad_requests = 0
        self.tenants = Tenants(config)
        self._refused = 0  # connections refused: no tenant, or over limits.max_clients
        self._frame_timeouts = 0
        self._limited = 0  # requests refused by a [limits] cap
        self._bad_checksums = 0
        self.arena_problems: list[str] = []

    # ---- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock(data_dir)
        nvme = None
        try:
            if cfg.store.nvme_bytes:
                from memkv_mesh.nvme import NvmeTier

                nvme_bytes = int(cfg.store.nvme_bytes) // 4096 * 4096
                io: dict[str, Any] = {}
                if cfg.store.nvme_backend == "kvikio":
                    from memkv_mesh.nvme_kvikio import kvikio_io_factory

                    io["io_factory"] = kvikio_io_factory(cfg.store.kvikio)
                nvme = NvmeTier(
                    cfg.nvme_dir, nvme_bytes, policy=cfg.store.eviction, sync=cfg.store.fsync == "always", **io
                )
                if nvme.max_block_bytes < cfg.store.max_block_bytes:
                    raise DaemonError(
                        f"store.max_block_bytes ({int(cfg.store.max_block_bytes)}) does not fit the NVMe "
                        f"tier's data files ({nvme.max_block_bytes}); raise store.nvme_bytes"
                    )
                try:
                    self.nvme_recovery = await trio.to_thread.run_sync(
                        functools.partial(nvme.open, verify_all=cfg.store.verify_on_start)
                    )
                except (OSError, ValueError, RuntimeError) as e:
                    # RuntimeError: the kvikio backend without kvikio/CUDA (GpuUnavailableError).
                    raise DaemonError(
                        f"cannot open the NVMe tier at {cfg.nvme_dir} ({cfg.store.nvme_backend}): {e}"
                    ) from None
            arena = self._arena = Arena(
                arena_dir_path(cfg.arena_dir, self.node_id, data_dir), cfg.tenant_segments(),
                preallocate=cfg.store.preallocate,
            )  # fmt: skip
            try:
                await trio.to_thread.run_sync(arena.open)
            except ArenaError as e:
                self._arena = None
                raise DaemonError(str(e)) from None
            self.store = BlockStore(
                arena, max_block_bytes=int(cfg.store.max_block_bytes), eviction=cfg.store.eviction, nvme=nvme,
                fsync=cfg.store.fsync,
            )  # fmt: skip
            listener = self._bind_socket()
            self.metrics = Metrics(self.store.statistics, self._info, self._counts, self._mesh_snapshots)
            async with trio.open_nursery() as nursery:
                if cfg.metrics.enabled:
                    host, _, port = cfg.metrics.listen.rpartition(":")
                    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]
                    try:
                        self.metrics_port = await nursery.start(self.metrics.serve, host, int(port))
                    except OSError as e:
                        raise DaemonError(
                            f"cannot serve metrics on {cfg.metrics.listen}: {e.strerror} "
                            "(set [metrics] listen to a free port, or port 0)"
                        ) from None
                await self._start_gossip(nursery)
                nursery.start_soon(trio.serve_listeners, self._serve_client, [listener])
                nursery.start_soon(self._watch_arena)
                self.started_at = time.time()
                log.info(
                    "daemon started",
                    extra={"fields": {
                        "node": self.node_id, "version": __version__, "socket": str(self.socket_path),
                        "arena": str(arena.path), "dram_bytes": arena.size,
                        "nvme_bytes": int(cfg.store.nvme_bytes), "eviction": cfg.store.eviction,
                        "metrics_port": self.metrics_port,
                        "nvme_recovered": getattr(self.nvme_recovery, "recovered", 0),
                        "gossip": self.gossip.local_addr if self.gossip is not None else None,
                    }},
                )  # fmt: skip
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                if self.gossip is not None and not self._left:
                    with trio.move_on_after(2):
                        await self.gossip.leave()
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
            if nvme is not None:
                nvme.close()
            if self._arena is not None:
                self._arena.close()
            self._release_lock()
            log.info("daemon stopped", extra={"fields": {"node": self.node_id}})

    def _on_member_event(self, event: Any) -> None:
        # A join, leave or death moves the owners of some blocks: wake the mesh's repair (and send
        # a node that rejoined the tombstones of what was deleted meanwhile).
        if self.mesh is not None:
            self.mesh.member_event(event)

    async def leave_gracefully(self) -> None:
        """Before stopping a mesh node: hand owned blocks to the owners that remain, then leave.

        Runs while the daemon still serves (the data plane is needed to push the blocks).
        """
        if self.mesh is not None:
            with trio.move_on_after(self.config.mesh.handoff_timeout_s):
                n = await self.mesh.handoff()
                log.info("handed off blocks before leaving", extra={"fields": {"blocks": n}})
        if self.gossip is not None:
            with trio.move_on_after(2):
                await self.gossip.leave()
            self._left = True

    async def _start_gossip(self, nursery: trio.Nursery) -> None:
        """With [gossip] enabled: the data plane, then membership advertising it, then the mesh."""
        gcfg = self.config.gossip
        if not gcfg.enabled:
            return
        from memkv_mesh.mesh import Mesh
        from memkv_mesh.tombstones import Tombstones
        from transport.dataplane import DataPlane, DataPlaneError
        from transport.gossip_driver import GossipService, NodeMeta

        assert self.store is not None
        mcfg = self.config.mesh
        # A flash node's DRAM is a cache over its NVMe: replicas are written through before they
        # are confirmed, so a kill -9 loses only transfers in flight.
        self.store.write_through = self.config.node.role in ("flash", "both") and self.store.nvme is not None
        tombstones = Tombstones(mcfg.tombstone_s, _TOMBSTONES_MAX)
        dcfg = self.config.dataplane
        if not dcfg.keys and gcfg.keys:
            dcfg = msgspec.structs.replace(dcfg, keys=list(gcfg.keys))
        try:
            self.dataplane = DataPlane(dcfg, self.store, node_id=self.node_id, tombstones=tombstones)
            data_addr = await nursery.start(self.dataplane.run)
        except (OSError, ValueError, DataPlaneError) as e:
            raise DaemonError(f"cannot start the data plane ({dcfg.transport}): {e}") from None
        meta = NodeMeta(
            role=self.config.node.role,
            # Rendezvous weight of a flash peer: its NVMe capacity in GiB (at least 1).
            capacity_weight=float(max(1, int(self.config.store.nvme_bytes) >> 30)),
            data_addr=data_addr,
            protocol_version=protocol.PROTOCOL_VERSION,
            placement=PLACEMENT_VERSION,
        )
        try:
            self.gossip = GossipService(
                gcfg, node_id=self.node_id, meta=meta, state_dir=self.config.data_dir, on_event=self._on_member_event
            )
            await nursery.start(self.gossip.run)
        except (OSError, ValueError) as e:
            raise DaemonError(f"cannot start gossip on {gcfg.bind}:{gcfg.port}: {e}") from None
        self.mesh = Mesh(
            node_id=self.node_id, gossip=self.gossip, dataplane=self.dataplane, store=self.store,
            replicas=mcfg.replicas, repair_bytes_per_s=float(mcfg.repair_bytes_per_s),
            repair_interval_s=mcfg.repair_interval_s, tombstones=tombstones,
            dirty_limit_bytes=self.config.dirty_limit_bytes, put_wait_s=mcfg.put_wait_s,
            replication_timeout_s=mcfg.replication_timeout_s,
        )  # fmt: skip
        await nursery.start(self.mesh.run)

    def _take_lock(self, data_dir: Path) -> None:
        """Exclusive locks on the data dir and on the socket path, or DaemonError saying whose.

        The socket's own lock (``<socket>.lock``) matters when two daemons with two data dirs are
        given one socket path: without it the second would unlink the first's live socket, and
        the first would unlink the second's when it stops.
        """
        fds = [self._flock(
            data_dir / "daemon.lock",
            f"is running with data_dir {data_dir}; "
            "stop it or give this one another [node] data_dir",
        )]  # fmt: skip
        try:
            sock = self.socket_path
            sock.parent.mkdir(parents=True, exist_ok=True)
            fds.append(self._flock(
                sock.with_name(sock.name + ".lock"),
                f"is serving the socket {sock}; "
                "stop it or give this one another [node] socket",
            ))  # fmt: skip
        except BaseException:
            os.close(fds[0])
            raise
        self._lock_fds = fds

    @staticmethod
    def _flock(path: Path, busy: str) -> int:
        """An exclusive lock on ``path`` (created if missing), holding our pid; else
        DaemonError("another daemon (pid N) " + busy)."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    try:
                        other = path.read_text().strip()
                    except OSError:
                        other = ""
                    raise DaemonError(f"another daemon (pid {other or '?'}) {busy}") from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
            os.close(fd)  # the file was replaced while we locked it: lock the one now there

    def _release_lock(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    def _bind_socket(self) -> trio.SocketListener:
        path = self.socket_path
        if len(os.fsencode(path)) > 107:
            raise DaemonError(
                f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow 107. "
                "Set [node] socket to a shorter path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()  # stale: we hold the socket's lock, so no live daemon owns it
        except FileNotFoundError:
            pass
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # With tenants declared the daemon checks every peer itself (SO_PEERCRED), so any local
        # user may connect (and is refused unless it is a tenant's); otherwise the file's mode is
        # the access control: the daemon's user and group.
        mode = 0o666 if self.tenants.declared else 0o660
        old = os.umask(0o111 if self.tenants.declared else 0o117)  # never briefly wider than mode
        try:
            raw.bind(str(path))
            raw.listen(128)
        except OSError:
            raw.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, mode)
        return trio.SocketListener(trio.socket.from_stdlib_socket(raw))

    def _metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = self.config.metrics.listen.rpartition(":")[0]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        return f"http://{host}:{self.metrics_port}/metrics"

    def _mesh_snapshots(self) -> tuple[Any, Any]:
        """(data plane stats, mesh stats), each None where this daemon does not run it."""
        dp = self.dataplane.statistics() if self.dataplane is not None else None
        return dp, self.mesh.statistics() if self.mesh is not None else None

    def _counts(self) -> DaemonCounts:
        return DaemonCounts(
            self._connections, self._bad_requests, self._refused, self._frame_timeouts, self._limited,
            self._bad_checksums, len(self.arena_problems), self.gossip.statistics() if self.gossip is not None else None,
        )  # fmt: skip

    def _info(self) -> dict[str, str]:
        return {"node": self.node_id, "role": self.config.node.role, "version": __version__}

    # ---- clients ------------------------------------------------------------------------------------
    async def _refuse(self, stream: trio.SocketStream, code: str, why: str) -> None:
        self._refused += 1
        with trio.move_on_after(1):
            try:
                await stream.send_all(protocol.encode_frame(protocol.Error(code, why)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        with trio.CancelScope(shield=True):
            await stream.aclose()

    def _identify(self, conn: _Conn, stream: trio.SocketStream) -> str | None:
        """Who is at the other end (SO_PEERCRED); None if welcome, else why it is refused."""
        try:
            cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError as e:
            return f"cannot identify the peer: {e}"
        conn.pid, conn.uid, conn.gid = _PEERCRED.unpack(cred)
        who = self.tenants.resolve(conn.uid, conn.gid)
        if who is None:
            return (
                f"uid {conn.uid} gid {conn.gid} is in no tenant of this daemon "
                "(ask the operator to add it to a [[tenants]] entry of mesh.toml)"
            )
        conn.tenant = None if who == OPERATOR else who  # type: ignore[assignment]
        return None

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        limits = self.config.limits
        if self._connections >= limits.max_clients:
            log.warning("refusing a client: limits.max_clients reached", extra={"fields": {"max": limits.max_clients}})
            await self._refuse(stream, protocol.BUSY, f"this daemon serves at most limits.max_clients = {limits.max_clients} clients; retry later")
            return
        why = self._identify(conn, stream)
        if why is not None:
            log.warning("refusing a client: %s", why, extra={"fields": {"pid": conn.pid, "uid": conn.uid, "gid": conn.gid}})
            await self._refuse(stream, protocol.FORBIDDEN, why)
            return
        if conn.tenant is not None and len(conn.tenant.conns) >= limits.max_clients_per_tenant:
            log.warning(
                "refusing a client: limits.max_clients_per_tenant reached",
                extra={"fields": {"tenant": conn.tenant.name, "uid": conn.uid, "max": limits.max_clients_per_tenant}},
            )
            await self._refuse(
                stream, protocol.BUSY,
                f"tenant {conn.tenant.name!r} has limits.max_clients_per_tenant = {limits.max_clients_per_tenant} "
                "clients connected; retry later",
            )  # fmt: skip
            return
        self._connections += 1
        if conn.tenant is not None:
            conn.tenant.conns.add(conn)
        frames = protocol.FrameBuffer()
        out = bytearray()
        store = self.store
        assert store is not None
        timeout = limits.frame_timeout_s
        try:
            while True:
                if len(frames):
                    # Part of a frame is here: the rest must follow promptly, or the client is
                    # stuck or hostile and is cut off (what it held is freed below).
                    data = None
                    with trio.move_on_after(timeout):
                        data = await stream.receive_some(65536)
                    if data is None:
                        self._frame_timeouts += 1
                        log.warning(
                            "closing client: %d bytes of a frame and nothing more for limits.frame_timeout_s = %s s",
                            len(frames), timeout, extra={"fields": {"conn": conn.id, "pid": conn.pid, "uid": conn.uid}},
                        )  # fmt: skip
                        break
                else:
                    data = await stream.receive_some(65536)
                if not data:
                    break
                frames.feed(data)
                while (body := frames.next_frame()) is not None:
                    reply = await self._dispatch(conn, body)
                    if reply is None:
                        continue
                    frame = self._encode_reply(conn, reply, out)
                    if isinstance(reply, protocol.Welcome) and reply.arena_fd and conn.tenant is not None:
                        await self._send_with_fd(stream, frame, self._segment_fd(conn.tenant))
                    else:
                        await stream.send_all(frame)
        except protocol.ProtocolError as e:
            self._bad_requests += 1
            log.warning("closing client: %s", e, extra={"fields": {"conn": conn.id, "pid": conn.pid}})
            with trio.move_on_after(1):
                try:
                    await stream.send_all(protocol.encode_frame(protocol.Error(protocol.BAD_REQUEST, str(e))))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # Our bug, not the client's: close this one connection (what it held is released
            # below) and keep serving everyone else; escaping would cancel the whole daemon.
            log.exception("client handler failed; closing the connection", extra={"fields": {"conn": conn.id}})
        finally:
            self._connections -= 1
            if conn.tenant is not None:
                conn.tenant.conns.discard(conn)
            leases, slots = store.drop_owner(conn)
            if leases or slots:
                log.info(
                    "client gone: released its leases and uncommitted slots",
                    extra={"fields": {"conn": conn.id, "pid": conn.pid, "leases": leases, "slots": slots}},
                )
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _segment_fd(self, tenant: Tenant) -> int:
        assert self._arena is not None
        return self._arena.segments[tenant.segment].fd

    @staticmethod
    async def _send_with_fd(stream: trio.SocketStream, frame: bytearray, fd: int) -> None:
        """``frame`` with ``fd`` attached (SCM_RIGHTS) to its first byte."""
        fds = array.array("i", [fd])
        n = await stream.socket.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        if n < len(frame):
            await stream.send_all(memoryview(frame)[n:])

    async def _watch_arena(self) -> None:
        """Check now and then that the arena files are still the ones this daemon created."""
        assert self._arena is not None
        while True:
            await trio.sleep(_ARENA_CHECK_S)
            problems = await trio.to_thread.run_sync(self._arena.check)
            for p in problems:
                if p not in self.arena_problems:
                    log.error("arena tampered with: %s", p, extra={"fields": {"node": self.node_id}})
            self.arena_problems = problems

    def _located(
        self, lease: int, keys: list[bytes], blocks: list[tuple[int, int] | None], segment: int, sums: bool
    ) -> protocol.Located:
        """The reply for a get: offsets relative to the client's segment, checksums if asked."""
        store = self.store
        assert store is not None
        base = store.segment_base(segment)
        if base:
            blocks = [None if b is None else (b[0] - base, b[1]) for b in blocks]
        if not sums:
            return protocol.Located(lease, blocks)
        cks = [None if b is None else store.dram_checksum(k, b[0] + base) for k, b in zip(keys, blocks, strict=True)]
        return protocol.Located(lease, blocks, cks)

    async def _get_streamed(
        self, conn: _Conn, keys: list[bytes], lease: int, blocks: list[tuple[int, int] | None], segment: int, sums: bool
    ) -> protocol.Located:
        """A get that misses locally, streamed: the local hits go to the client at once, each
        block fetched from the mesh as soon as it has landed and been verified, so the client
        copies them out while the rest are on the wire. The final ``Located`` has the rest."""
        store, mesh = self.store, self.mesh
        assert store is not None and mesh is not None
        sent = [False] * len(keys)
        wanted: dict[bytes, list[int]] = {}
        for i, (k, b) in enumerate(zip(keys, blocks, strict=True)):
            if b is None:
                wanted.setdefault(k, []).append(i)
        base = store.segment_base(segment)
        hits = [i for i, b in enumerate(blocks) if b is not None]
        if hits:
            await self._send_part(conn, lease, hits, [(keys[i], b) for i, b in enumerate(blocks) if b is not None], sent, base, sums)

        async def on_stored(ks: list[bytes]) -> None:
            part, found = await store.get(conn, ks, count=False, segment=segment)
            index: list[int] = []
            locs: list[tuple[bytes, tuple[int, int]]] = []
            for k, loc in zip(ks, found, strict=True):
                if loc is not None:
                    index.extend(wanted[k])
                    locs.extend([(k, loc)] * len(wanted[k]))
            if index:
                await self._send_part(conn, part, index, locs, sent, base, sums)
            elif part:
                store.release(conn, part)

        await mesh.fetch_missing(list(wanted), on_stored)
        rest = [i for i in range(len(keys)) if not sent[i]]
        rest_keys = [keys[i] for i in rest]
        final, found = await store.get(conn, rest_keys, count=False, segment=segment) if rest else (0, [])
        located = self._located(final, rest_keys, found, segment, sums)
        out: list[tuple[int, int] | None] = [None] * len(keys)
        cks: list[int | None] = [None] * len(keys)
        for j, i in enumerate(rest):
            out[i] = located.blocks[j]
            if sums:
                cks[i] = located.checksums[j]
        return protocol.Located(final, out, cks if sums else [])

    async def _send_part(
        self, conn: _Conn, lease: int, index: list[int], found: list[tuple[bytes, tuple[int, int]]], sent: list[bool],
        base: int, sums: bool,
    ) -> None:
        """One ``LocatedPart`` to the client; if it is gone, the lease waits for its cleanup and
        the get goes on (what arrives is stored all the same)."""
        stream = conn.stream
        if stream is None:
            return
        store = self.store
        assert store is not None
        locs = [(off - base, n) for _, (off, n) in found]
        cks = [store.dram_checksum(k, off) or 0 for k, (off, _) in found] if sums else []
        frame = protocol.encode_frame(protocol.LocatedPart(lease, index, locs, cks))
        # A frame cut in half would put the client's reply stream out of step for good: the send
        # is shielded from the fetch being cancelled (a peer failing mid-batch), and one that
        # cannot finish in time closes the connection instead (the daemon frees what it held).
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_PART_SEND_S) as slow:
                try:
                    await stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.stream = None
                    return
            if slow.cancelled_caught:
                log.warning("client not reading a streamed get; closing it", extra={"fields": {"conn": conn.id}})
                conn.stream = None
                await stream.aclose()
                return
        for i in index:
            sent[i] = True

    @staticmethod
    def _encode_reply(conn: _Conn, reply: protocol.Msg, out: bytearray) -> bytearray:
        """The reply's frame; if the encoder refuses it (a daemon bug), an ``internal`` error in
        its place, so the client still gets exactly one reply and the stream stays in step."""
        out.clear()
        try:
            return protocol.encode_frame(reply, out)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
            log.exception("cannot encode %s reply", type(reply).__name__, extra={"fields": {"conn": conn.id}})
            out.clear()
            msg = f"internal error encoding the {type(reply).__name__} reply; see the daemon log"
            return protocol.encode_frame(protocol.Error(protocol.INTERNAL, msg), out)

    async def _dispatch(self, conn: _Conn, body: bytes) -> protocol.Msg | None:
        t0 = time.perf_counter()
        try:
            req = protocol.request_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._bad_requests += 1
            m = _UNKNOWN_TAG.match(str(e))
            why = f"unknown request tag {m.group(1)}" if m else str(e)
            return protocol.Error(protocol.BAD_REQUEST, f"malformed request: {why}")
        op = _OP_NAMES[type(req)]
        try:
            reply = await self._handle(conn, req)
        except StoreError as e:
            self._bad_requests += e.code in (protocol.BAD_REQUEST, protocol.BAD_KEY, protocol.TOO_LARGE)
            reply = protocol.Error(e.code, e.message)
        except Exception:
            log.exception("internal error handling %s", op, extra={"fields": {"conn": conn.id}})
            reply = protocol.Error(protocol.INTERNAL, f"internal error handling {op}; see the daemon log")
        assert self.metrics is not None
        self.metrics.observe(op, time.perf_counter() - t0)
        return reply

    async def _handle(self, conn: _Conn, req: Any) -> protocol.Msg | None:
        store = self.store
        assert store is not None
        if isinstance(req, protocol.Hello):
            if req.version != protocol.PROTOCOL_VERSION:
                return protocol.Error(
                    protocol.BAD_REQUEST,
                    f"protocol version {req.version} is not supported; this daemon speaks "
                    f"{protocol.PROTOCOL_VERSION} (upgrade the client or the daemon)",
                )
            # The pid, uid and gid are the socket's (SO_PEERCRED), whatever Hello says.
            conn.hello, conn.client = True, req.client
            tenant = conn.tenant
            log.debug(
                "client connected",
                extra={"fields": {
                    "conn": conn.id, "client": req.client, "pid": conn.pid, "uid": conn.uid,
                    "tenant": tenant.name if tenant is not None else OPERATOR,
                }},
            )  # fmt: skip
            assert self._arena is not None
            if tenant is None:
                return protocol.Welcome(
                    protocol.PROTOCOL_VERSION, self.node_id, "", 0, store.max_block_bytes, KEY_BYTES, False, OPERATOR
                )
            mine = self._arena.segments[tenant.segment]
            return protocol.Welcome(
                protocol.PROTOCOL_VERSION, self.node_id, str(mine.path), mine.size, store.max_block_bytes, KEY_BYTES,
                True, tenant.name, not self.config.store.verify_puts,
            )  # fmt: skip
        if not conn.hello:
            self._bad_requests += 1
            if isinstance(req, protocol.Release):
                return None  # Release never has a reply, not even an error: it would desync the client
            return protocol.Error(protocol.BAD_REQUEST, "send Hello first")
        keys = getattr(req, "keys", None)
        tenant = conn.tenant
        if keys is not None:
            if len(keys) > protocol.MAX_BATCH:
                self._bad_requests += 1
                return protocol.Error(
                    protocol.BAD_REQUEST, f"{len(keys)} keys in one request; the limit is {protocol.MAX_BATCH}"
                )
            # Every keyed request, lookups included: a wrong-length key can never match, and an
            # engine that silently got 0 hits for it forever would never learn why.
            if not set(map(len, keys)) <= _KEY_LENGTHS:
                self._bad_requests += 1
                i = next(i for i, k in enumerate(keys) if len(k) != KEY_BYTES)
                return protocol.Error(
                    protocol.BAD_KEY, f"key {i} is {len(keys[i])} bytes; keys are {KEY_BYTES} bytes"
                )
            if tenant is None:
                self._bad_requests += 1
                return protocol.Error(
                    protocol.FORBIDDEN,
                    f"uid {conn.uid} is this node's operator, not a tenant: it may ask for stats and members "
                    "but names no blocks (connect as a user of a [[tenants]] entry)",
                )
            # From here on only the tenant's own key space exists for this request.
            keys = tenant.scope(keys)
        if isinstance(req, protocol.Lookup):
            assert keys is not None
            return protocol.Count(self.mesh.lookup(keys) if self.mesh is not None else store.lookup(keys))
        if isinstance(req, protocol.Get):
            assert tenant is not None and keys is not None
            if (err := self._over_limit(conn, tenant, leases=1)) is not None:
                return err
            seg = tenant.segment
            lease, blocks = await store.get(conn, keys, segment=seg)
            if self.mesh is not None and None in blocks and req.stream:
                return await self._get_streamed(conn, keys, lease, blocks, seg, req.checksums)
            if self.mesh is not None and None in blocks:
                # Fetch what this node lacks from the mesh, then serve everything in one lease.
                if await self.mesh.fetch_missing([k for k, b in zip(keys, blocks, strict=True) if b is None]):
                    if lease:
                        store.release(conn, lease)
                    lease, blocks = await store.get(conn, keys, count=False, segment=seg)
            return self._located(lease, keys, blocks, seg, req.checksums)
        if isinstance(req, protocol.Release):
            store.release(conn, req.lease)
            return None
        if isinstance(req, protocol.Alloc):
            assert tenant is not None and keys is not None
            if (err := self._over_limit(conn, tenant, pending=len(keys))) is not None:
                return err
            nbytes = sum(n for n in req.sizes if 0 < n <= store.max_block_bytes)  # bad sizes: the store says so
            if self.mesh is not None and not await self.mesh.wait_room(nbytes):
                limit = self.config.dirty_limit_bytes
                return protocol.Error(
                    protocol.BUSY,
                    f"{store.dirty_bytes} bytes are not yet on their owners (the bound is mesh.dirty_bytes = "
                    f"{limit}) after waiting mesh.put_wait_s = {self.config.mesh.put_wait_s} s: the flash "
                    "peers are behind or unreachable; retry later",
                )
            offsets = await store.alloc(conn, keys, req.sizes, tenant.segment)
            base = store.segment_base(tenant.segment)
            return protocol.Allocated([o - base if o >= 0 else o for o in offsets] if base else offsets)
        if isinstance(req, protocol.Commit):
            if req.checksums and min(req.checksums) < 0:  # msgpack caps them at 2**64 - 1
                self._bad_requests += 1
                i = next(i for i, c in enumerate(req.checksums) if c < 0)
                return protocol.Error(
                    protocol.BAD_REQUEST,
                    f"checksum {i} is {req.checksums[i]}; checksums are xxh3-64 digests, 0 <= c < 2**64",
                )
            assert keys is not None
            if req.checksums and len(req.checksums) != len(keys):
                self._bad_requests += 1
                return protocol.Error(
                    protocol.BAD_REQUEST, f"{len(keys)} keys but {len(req.checksums)} checksums (send one per key, or none)"
                )
            # The checksum recorded is the one of the bytes in the slot now, whatever the client
            # says; if it said something else, the commit is refused whole. (verify_puts = false:
            # a trusted node records the client's checksums as given.)
            if req.checksums and not self.config.store.verify_puts:
                sums = list(req.checksums)
            else:
                sums = await store.pending_checksums(conn, keys)
            if req.checksums and sums != req.checksums:
                i = next(i for i, (a, b) in enumerate(zip(sums, req.checksums, strict=True)) if a != b)
                store.abort(conn, keys)
                self._bad_checksums += 1
                log.warning(
                    "refused a commit: block bytes do not match the checksum sent",
                    extra={"fields": {"conn": conn.id, "pid": conn.pid, "uid": conn.uid, "block": i}},
                )
                return protocol.Error(
                    protocol.BAD_CHECKSUM,
                    f"block {i} of the commit hashes to {sums[i]:#018x} but the commit says {req.checksums[i]:#018x}; "
                    "nothing of this commit was stored and its slots are freed (allocate again)",
                )
            stored = store.commit(conn, keys, sums)
            if self.mesh is not None:
                self.mesh.replicate(keys)  # dirty until the owners hold them
                if self.config.mesh.ack == "replicated":
                    wait = self.config.mesh.put_wait_s
                    left = await self.mesh.wait_replicated(keys, wait)
                    if left:
                        return protocol.Error(
                            protocol.NOT_REPLICATED,
                            f"{left} of {len(keys)} blocks are stored on this node but not yet on all "
                            f"their owners after mesh.put_wait_s = {wait} s (they stay dirty and keep "
                            "being replicated)",
                        )
            return protocol.Count(stored)
        if isinstance(req, protocol.Abort):
            assert keys is not None
            return protocol.Count(store.abort(conn, keys))
        if isinstance(req, protocol.Contains):
            assert keys is not None
            return protocol.Present(store.contains(keys))
        if isinstance(req, protocol.Delete):
            assert keys is not None
            if self.mesh is None:
                return protocol.Count(await store.delete(keys))
            if req.local:
                return protocol.Count(await self.mesh.drop_local(keys, self.config.mesh.put_wait_s))
            return protocol.Count(await self.mesh.delete(keys))
        if isinstance(req, protocol.StatsRequest):
            return protocol.StatsReply(self.status(conn.tenant if self.tenants.declared else None))
        if isinstance(req, protocol.MembersRequest):
            if self.gossip is None:
                return protocol.Error(protocol.UNAVAILABLE, "gossip is not enabled on this daemon ([gossip] enabled = false)")
            return protocol.MembersReply([msgspec.to_builtins(m) for m in self.gossip.members()])
        raise AssertionError(f"unhandled request {type(req).__name__}")  # pragma: no cover

    def _over_limit(self, conn: _Conn, tenant: Tenant, *, leases: int = 0, pending: int = 0) -> protocol.Error | None:
        """A ``limit`` error if this request would take the client or its tenant over a cap."""
        store = self.store
        assert store is not None
        lim = self.config.limits
        if leases:
            mine, cap, what = store.lease_count(conn), lim.max_leases_per_client, "leases"
            field, ours, tcap = "max_leases_per_client", store.lease_count, lim.max_leases_per_tenant
            n = leases
        else:
            mine, cap, what = store.pending_count(conn), lim.max_pending_per_client, "uncommitted slots"
            field, ours, tcap = "max_pending_per_client", store.pending_count, lim.max_pending_per_tenant
            n = pending
        if mine + n > cap:
            self._limited += 1
            return protocol.Error(
                protocol.LIMIT, f"this client holds {mine} {what}; limits.{field} = {cap} (release or commit some first)"
            )
        total = sum(ours(c) for c in tenant.conns)
        if total + n > tcap:
            self._limited += 1
            tfield = field.replace("client", "tenant")
            return protocol.Error(
                protocol.LIMIT,
                f"tenant {tenant.name!r} holds {total} {what} over its clients; limits.{tfield} = {tcap}",
            )
        return None

    # ---- status -----------------------------------------------------------------------------------
    def status(self, tenant: Tenant | None = None) -> dict[str, object]:
        """The node's status; for a tenant's client (with tenants declared) without the other
        tenants' arena segments and client counts."""
        assert self.store is not None and self._arena is not None
        cfg = self.config
        out: dict[str, object] = {
            "node_id": self.node_id,
            "role": cfg.node.role,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            "socket": str(self.socket_path),
            "arena": str(self._arena.path),
            "nvme_dir": str(cfg.nvme_dir) if cfg.store.nvme_bytes else None,
            "eviction": cfg.store.eviction,
            "metrics_port": self.metrics_port,
            "metrics_url": self._metrics_url(),
            "connections": self._connections,
            "bad_requests": self._bad_requests,
            "refused_connections": self._refused,
            "frame_timeouts": self._frame_timeouts,
            "limited_requests": self._limited,
            "bad_checksums": self._bad_checksums,
            "arena_problems": list(self.arena_problems),
            "tenants": [
                {"name": t.name, "clients": len(t.conns), "segment": self._arena.segments[t.segment].name}
                for t in self.tenants.all
                if tenant is None or t is tenant
            ],
            "store": msgspec.to_builtins(self.store.statistics()),
        }
        if tenant is not None:  # a tenant sees its own segment only (node-wide counters stay)
            own = self._arena.segments[tenant.segment].name
            store_out = out["store"]
            assert isinstance(store_out, dict)
            store_out["segments"] = [sg for sg in store_out["segments"] if sg["name"] == own]
        if self.nvme_recovery is not None:
            out["nvme_recovery"] = msgspec.to_builtins(self.nvme_recovery)
        if self.gossip is not None:
            out["gossip"] = msgspec.to_builtins(self.gossip.statistics())
            out["gossip_addr"] = self.gossip.local_addr
            dir_stats = getattr(self.gossip, "directory_statistics", None)
            if dir_stats is not None:  # the block directory: how many remote holdings it knows
                out["directory"] = msgspec.to_builtins(dir_stats())
        if self.dataplane is not None:
            out["dataplane"] = msgspec.to_builtins(self.dataplane.statistics())
        if self.mesh is not None:
            out["mesh"] = msgspec.to_builtins(self.mesh.statistics())
        return out
