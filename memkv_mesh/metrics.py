"""Prometheus metrics for the daemon, served by a tiny Trio HTTP endpoint at ``/metrics``.

The store and other components never import prometheus_client: they expose ``statistics()``
snapshots, and the collector here turns the latest snapshot into metric families at scrape time.
Only op latencies are recorded as they happen (a histogram cannot be rebuilt from a snapshot).
The daemon's own numbers (open connections, bad requests) come the same way, as ``DaemonCounts``.
A scrape that fails (a collector raising) answers 500 and is logged; it never stops the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from memkv_mesh.store import StoreStats

log = logging.getLogger("memkv_mesh.metrics")

# Latency buckets from 10 us to 1 s: a lookup is tens of microseconds, a 16 x 16 MiB put tens of ms.
_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0)

_COUNTERS = {
    "puts": ("memkv_puts", "Blocks stored"),
    "put_bytes": ("memkv_put_bytes", "Bytes of blocks stored"),
    "get_bytes": ("memkv_get_bytes", "Bytes of blocks served"),
    "lookups": ("memkv_lookups", "Prefix lookups answered"),
    "deletes": ("memkv_deletes", "Blocks deleted"),
    "corrupt_dropped": ("memkv_corrupt_blocks_dropped", "Corrupt or torn NVMe blocks found and dropped"),
}


class _StoreCollector:
    def __init__(
        self,
        snapshot: Callable[[], StoreStats],
        info: Callable[[], dict[str, str]],
        daemon: Callable[[], DaemonCounts] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._info = info
        self._daemon = daemon

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        info = GaugeMetricFamily("memkv_node_info", "Node identity", labels=list(self._info()))
        info.add_metric(list(self._info().values()), 1)
        yield info
        hits = CounterMetricFamily("memkv_hits", "Blocks found by get, by tier", labels=["tier"])
        hits.add_metric(["dram"], s.hits_dram)
        hits.add_metric(["nvme"], s.hits_nvme)
        yield hits
        misses = CounterMetricFamily("memkv_misses", "Blocks asked for by get and not found")
        misses.add_metric([], s.misses)
        yield misses
        for field, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], getattr(s, field))
            yield c
        ev = CounterMetricFamily("memkv_evictions", "Blocks evicted, by kind", labels=["kind"])
        ev.add_metric(["dram_to_nvme"], s.demotions)
        ev.add_metric(["dram_dropped"], s.dram_drops)
        ev.add_metric(["nvme_dropped"], s.nvme_drops)
        yield ev
        used = GaugeMetricFamily("memkv_tier_used_bytes", "Bytes in use per tier", labels=["tier"])
        cap = GaugeMetricFamily("memkv_tier_capacity_bytes", "Capacity per tier", labels=["tier"])
        blocks = GaugeMetricFamily("memkv_tier_blocks", "Blocks per tier", labels=["tier"])
        for tier, u, capacity, b in (
            ("dram", s.dram_used_bytes, s.dram_capacity_bytes, s.dram_blocks),
            ("nvme", s.nvme_used_bytes, s.nvme_capacity_bytes, s.nvme_blocks),
        ):
            used.add_metric([tier], u)
            cap.add_metric([tier], capacity)
            blocks.add_metric([tier], b)
        yield used
        yield cap
        yield blocks
        leases = GaugeMetricFamily("memkv_active_leases", "Get leases not yet released")
        leases.add_metric([], s.active_leases)
        yield leases
        pending = GaugeMetricFamily("memkv_pending_slots", "Arena slots allocated by clients and not yet committed")
        pending.add_metric([], s.pending_slots)
        yield pending
        if self._daemon is not None:
            d = self._daemon()
            conns = GaugeMetricFamily("memkv_client_connections", "Client connections open on the Unix socket")
            conns.add_metric([], d.connections)
            yield conns
            bad = CounterMetricFamily(
                "memkv_bad_requests", "Client requests refused as malformed or invalid (or frames too long to trust)"
            )
            bad.add_metric([], d.bad_requests)
            yield bad
            for name, doc, value in (
                ("memkv_refused_connections", "Local connections refused: no tenant for the peer's uid/gid, or over limits.max_clients", d.refused),
                ("memkv_frame_timeouts", "Local clients cut off for leaving a frame half sent (limits.frame_timeout_s)", d.frame_timeouts),
                ("memkv_limited_requests", "Local requests refused by a [limits] cap on leases or pending slots", d.limited),
                ("memkv_bad_checksums", "Commits refused because the block bytes did not match the checksums sent", d.bad_checksums),
            ):
                c = CounterMetricFamily(name, doc)
                c.add_metric([], value)
                yield c
            g = GaugeMetricFamily("memkv_arena_problems", "Arena files found deleted or replaced (see memkv-mesh status)")
            g.add_metric([], d.arena_problems)
            yield g
            if d.gossip is not None:
                gs = d.gossip
                dropped = CounterMetricFamily("memkv_gossip_dropped", "Gossip messages dropped, by reason", labels=["reason"])
                for reason in ("bad_key", "replay", "malformed", "errors", "send_queue"):
                    dropped.add_metric([reason], getattr(gs, f"dropped_{reason}"))
                yield dropped
                streams = CounterMetricFamily(
                    "memkv_gossip_streams_closed", "Incoming gossip streams closed by the listener's cap", labels=["why"]
                )
                streams.add_metric(["refused"], gs.streams_refused)
                streams.add_metric(["evicted"], gs.streams_evicted)
                yield streams
                members = GaugeMetricFamily("memkv_gossip_members", "Gossip members this node knows, by state", labels=["state"])
                for state in ("alive", "suspect", "dead", "left"):
                    members.add_metric([state], getattr(gs, f"members_{state}"))
                yield members
                c = CounterMetricFamily(
                    "memkv_gossip_refutations_impossible", "Rumours about this node at the incarnation ceiling (forged by a key holder)"
                )
                c.add_metric([], gs.refutations_impossible)
                yield c
                g = GaugeMetricFamily("memkv_gossip_clock_skew_max_ms", "Largest clock skew of a peer whose packets were rejected")
                g.add_metric([], max((abs(x.skew_ms) for x in gs.clock_skew), default=0))
                yield g
        g = GaugeMetricFamily("memkv_nvme_degraded", "1 while the NVMe tier refuses writes (disk full, I/O errors)")
        g.add_metric([], int(s.nvme_degraded))
        yield g
        errs = CounterMetricFamily("memkv_nvme_io_errors", "NVMe tier I/O errors, by direction", labels=["op"])
        errs.add_metric(["write"], s.nvme_write_errors)
        errs.add_metric(["read"], s.nvme_read_errors)
        yield errs
        c = CounterMetricFamily("memkv_relocations", "Blocks copied into a tenant's arena segment on its first local read")
        c.add_metric([], s.relocations)
        yield c


# Data-plane and mesh counters: statistics field -> (metric name, help, label values or None).
_DATAPLANE_COUNTERS = {
    "blocks_in": ("memkv_dataplane_blocks", "Blocks moved by the data plane, by direction", ("in",)),
    "blocks_out": ("memkv_dataplane_blocks", "Blocks moved by the data plane, by direction", ("out",)),
    "bytes_in": ("memkv_dataplane_bytes", "Block bytes moved by the data plane, by direction", ("in",)),
    "bytes_out": ("memkv_dataplane_bytes", "Block bytes moved by the data plane, by direction", ("out",)),
    "corrupt_blocks": ("memkv_dataplane_corrupt_blocks", "Blocks from peers that failed their checksum", None),
    "auth_failures": ("memkv_dataplane_auth_failures", "Data-plane connections refused for the mesh key", None),
    "peer_errors": ("memkv_dataplane_peer_errors", "Data-plane transfers lost to an unreachable or failing peer", None),
    "protocol_errors": ("memkv_dataplane_protocol_errors", "Data-plane messages that broke the protocol", None),
    "frame_auth_failures": ("memkv_dataplane_frame_auth_failures", "Data-plane frames that failed their session's AEAD (connection closed)", None),
    "identity_refusals": ("memkv_dataplane_identity_refusals", "Data-plane requests or handshakes under a node name not the peer's", None),
    "connections_refused": ("memkv_dataplane_connections_refused", "Data-plane connections closed at once: dataplane.max_connections", None),
    "handshakes_evicted": ("memkv_dataplane_handshakes_evicted", "Data-plane handshakes dropped to make room: dataplane.max_handshakes", None),
    "handshake_timeouts": ("memkv_dataplane_handshake_timeouts", "Data-plane handshakes not done within connect_timeout_s", None),
    "idle_closed": ("memkv_dataplane_idle_closed", "Authenticated data-plane connections closed for idleness", None),
    "handler_errors": ("memkv_dataplane_handler_errors", "Data-plane requests whose handling raised (that connection closed)", None),
}
_MESH_COUNTERS = {
    "fetched": ("memkv_mesh_fetched", "Blocks fetched from peers on a local miss"),
    "fetch_misses": ("memkv_mesh_fetch_misses", "Blocks no peer could supply on a local miss"),
    "fetch_errors": ("memkv_mesh_fetch_errors", "Fetches from a peer that failed"),
    "replicated": ("memkv_mesh_replicated", "Block copies pushed to owners after a put"),
    "replication_failures": ("memkv_mesh_replication_failures", "Block copies a push failed to deliver (retried)"),
    "replication_dropped": ("memkv_mesh_replication_dropped", "Keys dropped from a full replication or retry queue"),
    "repaired": ("memkv_mesh_repaired", "Block copies pushed by repair passes after membership changes"),
    "repaired_bytes": ("memkv_mesh_repaired_bytes", "Bytes pushed by repair passes"),
    "handed_off": ("memkv_mesh_handed_off", "Block copies pushed before a graceful leave"),
    "backpressure_waits": ("memkv_mesh_backpressure_waits", "Puts that waited at the dirty-bytes bound"),
    "busy_rejections": ("memkv_mesh_busy_rejections", "Puts refused busy after waiting at the dirty-bytes bound"),
    "replication_replaced": ("memkv_mesh_replication_replaced", "Owner shares of dirty blocks re-placed after a ring change"),
    "replication_given_up": ("memkv_mesh_replication_given_up", "Block copies an owner kept refusing (handed to repair)"),
    "replication_unplaced": ("memkv_mesh_replication_unplaced", "Blocks put while no flash peer was a candidate"),
    "deletes": ("memkv_mesh_deletes", "Keys deleted mesh-wide from this node"),
    "delete_requests_failed": ("memkv_mesh_delete_requests_failed", "Mesh-wide delete requests that did not reach a peer (retried)"),
}


class _MeshCollector:
    """The data plane's and the mesh glue's snapshots (whichever the daemon runs)."""

    def __init__(self, snapshots: Callable[[], tuple[Any, Any]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterable[Metric]:
        dp, mesh = self._snapshots()
        if dp is not None:
            info = GaugeMetricFamily(
                "memkv_dataplane_info",
                "The data-plane transport, what UCX offers and the lanes endpoints really use",
                labels=["transport", "ucx_transports", "ucx_lanes", "address"],
            )
            info.add_metric(
                [dp.transport, ",".join(dp.ucx_transports), ",".join(dp.ucx_lanes_in_use), dp.address], 1
            )
            yield info
            families: dict[str, CounterMetricFamily] = {}
            for field, (name, doc, labels) in _DATAPLANE_COUNTERS.items():
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = CounterMetricFamily(name, doc, labels=["direction"] if labels else None)
                fam.add_metric(list(labels or ()), getattr(dp, field))
            yield from families.values()
            for name, doc, value in (
                ("memkv_dataplane_connections_open", "Data-plane connections open", dp.connections_open),
                ("memkv_dataplane_active_transfers", "Data-plane transfers in flight", dp.active_transfers),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        if mesh is not None:
            for field, (name, doc) in _MESH_COUNTERS.items():
                c = CounterMetricFamily(name, doc)
                c.add_metric([], getattr(mesh, field))
                yield c
            for name, doc, value in (
                ("memkv_mesh_candidates", "Flash peers placement currently uses", mesh.candidates),
                ("memkv_mesh_replication_queued", "Keys waiting to be pushed to their owners", mesh.replication_queued),
                ("memkv_mesh_dirty_bytes", "Bytes acknowledged and not yet on all their owners", mesh.dirty_bytes),
                ("memkv_mesh_dirty_limit_bytes", "The dirty-bytes bound at which puts wait", mesh.dirty_limit_bytes),
                ("memkv_mesh_replication_lag_p99_seconds", "p99 of put acknowledgement to all owners holding the block", mesh.replication_lag_p99_s),
                ("memkv_mesh_tombstones", "Keys deleted mesh-wide and remembered", mesh.tombstones),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g


class DaemonCounts(NamedTuple):
    """The daemon's own numbers, beside the store's snapshot."""

    connections: int
    bad_requests: int
    refused: int = 0
    frame_timeouts: int = 0
    limited: int = 0
    bad_checksums: int = 0
    arena_problems: int = 0
    gossip: Any = None  # transport.gossip_driver.GossipStats on a mesh node


class Metrics:
    """The daemon's registry: op latency histograms, the store snapshot collector, and (when the
    daemon is a mesh node) the data plane's and the mesh's snapshots."""

    def __init__(
        self,
        snapshot: Callable[[], StoreStats],
        info: Callable[[], dict[str, str]],
        daemon: Callable[[], DaemonCounts] | None = None,
        mesh: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.op_seconds = Histogram(
            "memkv_op_seconds",
            "Time the daemon spends on one client request, by op",
            labelnames=["op"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._observers: dict[str, Any] = {}
        self.registry.register(_StoreCollector(snapshot, info, daemon))
        if mesh is not None:
            self.registry.register(_MeshCollector(mesh))

    def observe(self, op: str, seconds: float) -> None:
        obs = self._observers.get(op)
        if obs is None:
            obs = self._observers[op] = self.op_seconds.labels(op=op).observe
        obs(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """HTTP/1.0-style: GET /metrics answers and closes; anything else 404."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
                line = head.split(b"\r\n", 1)[0].split()
                if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                    try:
                        body = self.render()
                        status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
                    except Exception:
                        # A failing collector must cost one scrape, never the daemon (an exception
                        # here would escape serve_listeners and cancel the daemon's nursery).
                        log.exception("metrics scrape failed")
                        body = b"metrics collection failed; see the daemon log\n"
                        status, ctype = b"500 Internal Server Error", b"text/plain"
                else:
                    body, status, ctype = b"not found: try /metrics\n", b"404 Not Found", b"text/plain"
                await stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                    + b"\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n" + body
                )  # fmt: skip
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()
