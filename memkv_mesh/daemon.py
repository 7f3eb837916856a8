"""The node's sidecar daemon: a Trio service that owns the arena, the tiers and the Unix socket.

Theory of operation
-------------------
* ``Daemon.run`` is started with ``nursery.start``: it takes exclusive locks on the data
  directory and on the socket path (one daemon per directory, one per socket; a second one is
  refused before it touches anything), recovers the NVMe tier in a worker thread, creates the
  shared-memory arena, binds the Unix socket (mode 0660), starts the metrics endpoint and reports
  itself started. Cancelling its scope stops it; ``finally`` blocks close the tiers and remove the
  socket and arena.
* One task per client connection reads length-prefixed frames and answers each request in order
  (``protocol.py``). What a connection holds (leases, slots allocated but not committed) is
  released when it ends, however it ends: EOF, reset, a protocol error, or daemon shutdown.
* Bad input never takes the daemon down: a frame that does not decode, a wrong key length, an
  oversize block or a full store gets an ``Error`` reply; only a frame too long to trust closes
  that one connection. Anything unexpected is logged and answered with ``internal`` (a reply
  that will not encode included); an error outside any one request closes only that connection.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from memkv_mesh import __version__, protocol
from memkv_mesh.arena import Arena, arena_path
from memkv_mesh.config import Config
from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.metrics import DaemonCounts, Metrics
from memkv_mesh.placement import PLACEMENT_VERSION
from memkv_mesh.store import BlockStore, StoreError

log = logging.getLogger("memkv_mesh.daemon")

__all__ = ["Daemon", "DaemonError"]


class DaemonError(Exception):
    """The daemon cannot start (the message says why and what to change)."""


class _Conn:
    """Identity of one client connection (owner of leases and pending slots)."""

    __slots__ = ("client", "hello", "id", "pid", "stream")
    _ids = 0

    def __init__(self, stream: trio.SocketStream | None = None) -> None:
        _Conn._ids += 1
        self.id = _Conn._ids
        self.hello = False
        self.client = ""
        self.pid = 0
        self.stream = stream  # for the parts of a streamed get (None: the client is gone)


_KEY_LENGTHS = frozenset((KEY_BYTES,))
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
                arena_path(cfg.arena_dir, self.node_id, data_dir), int(cfg.store.dram_bytes),
                preallocate=cfg.store.preallocate,
            )  # fmt: skip
            await trio.to_thread.run_sync(arena.open)
            self.store = BlockStore(
                arena, max_block_bytes=int(cfg.store.max_block_bytes), eviction=cfg.store.eviction, nvme=nvme,
                fsync=cfg.store.fsync,
            )  # fmt: skip
            listener = self._bind_socket()
            self.metrics = Metrics(self.store.statistics, self._info, self._counts, self._mesh_snapshots)
            async with trio.open_nursery() as nursery:
                if cfg.metrics.enabled:
                    host, _, port = cfg.metrics.listen.rpartition(":")
                    try:
                        self.metrics_port = await nursery.start(self.metrics.serve, host, int(port))
                    except OSError as e:
                        raise DaemonError(
                            f"cannot serve metrics on {cfg.metrics.listen}: {e.strerror} "
                            "(set [metrics] listen to a free port, or port 0)"
                        ) from None
                await self._start_gossip(nursery)
                nursery.start_soon(trio.serve_listeners, self._serve_client, [listener])
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
        old = os.umask(0o117)  # the socket file is born 0660, never briefly world-writable
        try:
            raw.bind(str(path))
            raw.listen(128)
        except OSError:
            raw.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
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
        return DaemonCounts(self._connections, self._bad_requests)

    def _info(self) -> dict[str, str]:
        return {"node": self.node_id, "role": self.config.node.role, "version": __version__}

    # ---- clients ------------------------------------------------------------------------------------
    async def _serve_client(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self._connections += 1
        frames = protocol.FrameBuffer()
        out = bytearray()
        store = self.store
        assert store is not None
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                frames.feed(data)
                while (body := frames.next_frame()) is not None:
                    reply = await self._dispatch(conn, body)
                    if reply is not None:
                        await stream.send_all(self._encode_reply(conn, reply, out))
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
            leases, slots = store.drop_owner(conn)
            if leases or slots:
                log.info(
                    "client gone: released its leases and uncommitted slots",
                    extra={"fields": {"conn": conn.id, "pid": conn.pid, "leases": leases, "slots": slots}},
                )
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _get_streamed(
        self, conn: _Conn, keys: list[bytes], lease: int, blocks: list[tuple[int, int] | None]
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
        hits = [i for i, b in enumerate(blocks) if b is not None]
        if hits:
            await self._send_part(conn, lease, hits, [b for b in blocks if b is not None], sent)

        async def on_stored(ks: list[bytes]) -> None:
            part, found = await store.get(conn, ks, count=False)
            index: list[int] = []
            locs: list[tuple[int, int]] = []
            for k, loc in zip(ks, found, strict=True):
                if loc is not None:
                    index.extend(wanted[k])
                    locs.extend([loc] * len(wanted[k]))
            if index:
                await self._send_part(conn, part, index, locs, sent)
            elif part:
                store.release(conn, part)

        await mesh.fetch_missing(list(wanted), on_stored)
        rest = [i for i in range(len(keys)) if not sent[i]]
        final, found = await store.get(conn, [keys[i] for i in rest], count=False) if rest else (0, [])
        out: list[tuple[int, int] | None] = [None] * len(keys)
        for i, loc in zip(rest, found, strict=True):
            out[i] = loc
        return protocol.Located(final, out)

    @staticmethod
    async def _send_part(
        conn: _Conn, lease: int, index: list[int], locs: list[tuple[int, int]], sent: list[bool]
    ) -> None:
        """One ``LocatedPart`` to the client; if it is gone, the lease waits for its cleanup and
        the get goes on (what arrives is stored all the same)."""
        stream = conn.stream
        if stream is None:
            return
        frame = protocol.encode_frame(protocol.LocatedPart(lease, index, locs))
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
            conn.hello, conn.client, conn.pid = True, req.client, req.pid
            log.debug("client connected", extra={"fields": {"conn": conn.id, "client": req.client, "pid": req.pid}})
            assert self._arena is not None
            return protocol.Welcome(
                protocol.PROTOCOL_VERSION, self.node_id, str(self._arena.path), self._arena.size,
                store.max_block_bytes, KEY_BYTES,
            )  # fmt: skip
        if not conn.hello:
            self._bad_requests += 1
            if isinstance(req, protocol.Release):
                return None  # Release never has a reply, not even an error: it would desync the client
            return protocol.Error(protocol.BAD_REQUEST, "send Hello first")
        keys = getattr(req, "keys", None)
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
        if isinstance(req, protocol.Lookup):
            return protocol.Count(self.mesh.lookup(req.keys) if self.mesh is not None else store.lookup(req.keys))
        if isinstance(req, protocol.Get):
            lease, blocks = await store.get(conn, req.keys)
            if self.mesh is not None and None in blocks and req.stream:
                return await self._get_streamed(conn, req.keys, lease, blocks)
            if self.mesh is not None and None in blocks:
                # Fetch what this node lacks from the mesh, then serve everything in one lease.
                if await self.mesh.fetch_missing([k for k, b in zip(req.keys, blocks, strict=True) if b is None]):
                    if lease:
                        store.release(conn, lease)
                    lease, blocks = await store.get(conn, req.keys, count=False)
            return protocol.Located(lease, blocks)
        if isinstance(req, protocol.Release):
            store.release(conn, req.lease)
            return None
        if isinstance(req, protocol.Alloc):
            nbytes = sum(n for n in req.sizes if 0 < n <= store.max_block_bytes)  # bad sizes: the store says so
            if self.mesh is not None and not await self.mesh.wait_room(nbytes):
                limit = self.config.dirty_limit_bytes
                return protocol.Error(
                    protocol.BUSY,
                    f"{store.dirty_bytes} bytes are not yet on their owners (the bound is mesh.dirty_bytes = "
                    f"{limit}) after waiting mesh.put_wait_s = {self.config.mesh.put_wait_s} s: the flash "
                    "peers are behind or unreachable; retry later",
                )
            return protocol.Allocated(await store.alloc(conn, req.keys, req.sizes))
        if isinstance(req, protocol.Commit):
            if req.checksums and min(req.checksums) < 0:  # msgpack caps them at 2**64 - 1
                self._bad_requests += 1
                i = next(i for i, c in enumerate(req.checksums) if c < 0)
                return protocol.Error(
                    protocol.BAD_REQUEST,
                    f"checksum {i} is {req.checksums[i]}; checksums are xxh3-64 digests, 0 <= c < 2**64",
                )
            stored = store.commit(conn, req.keys, req.checksums)
            if self.mesh is not None:
                self.mesh.replicate(req.keys)  # dirty until the owners hold them
                if self.config.mesh.ack == "replicated":
                    wait = self.config.mesh.put_wait_s
                    left = await self.mesh.wait_replicated(req.keys, wait)
                    if left:
                        return protocol.Error(
                            protocol.NOT_REPLICATED,
                            f"{left} of {len(req.keys)} blocks are stored on this node but not yet on all "
                            f"their owners after mesh.put_wait_s = {wait} s (they stay dirty and keep "
                            "being replicated)",
                        )
            return protocol.Count(stored)
        if isinstance(req, protocol.Abort):
            return protocol.Count(store.abort(conn, req.keys))
        if isinstance(req, protocol.Contains):
            return protocol.Present(store.contains(req.keys))
        if isinstance(req, protocol.Delete):
            if self.mesh is None:
                return protocol.Count(await store.delete(req.keys))
            if req.local:
                return protocol.Count(await self.mesh.drop_local(req.keys, self.config.mesh.put_wait_s))
            return protocol.Count(await self.mesh.delete(req.keys))
        if isinstance(req, protocol.StatsRequest):
            return protocol.StatsReply(self.status())
        if isinstance(req, protocol.MembersRequest):
            if self.gossip is None:
                return protocol.Error(protocol.UNAVAILABLE, "gossip is not enabled on this daemon ([gossip] enabled = false)")
            return protocol.MembersReply([msgspec.to_builtins(m) for m in self.gossip.members()])
        raise AssertionError(f"unhandled request {type(req).__name__}")  # pragma: no cover

    # ---- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
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
            "store": msgspec.to_builtins(self.store.statistics()),
        }
        if self.nvme_recovery is not None:
            out["nvme_recovery"] = msgspec.to_builtins(self.nvme_recovery)
        if self.gossip is not None:
            out["gossip"] = msgspec.to_builtins(self.gossip.statistics())
            out["gossip_addr"] = self.gossip.local_addr
        if self.dataplane is not None:
            out["dataplane"] = msgspec.to_builtins(self.dataplane.statistics())
        if self.mesh is not None:
            out["mesh"] = msgspec.to_builtins(self.mesh.statistics())
        return out
