"""``memkv-mesh daemon``, ``memkv-mesh status`` and ``memkv-mesh members``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from memkv_mesh.config import ConfigError, load_config
from memkv_mesh.logs import setup_logging

log = logging.getLogger("memkv_mesh.daemon")


def _daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memkv-mesh daemon",
        description="Run the node's sidecar daemon. Flags given override mesh.toml; flags not given do not.",
    )
    p.add_argument("--config", "-c", default=None, help="mesh.toml to read (default: ./mesh.toml if present)")
    p.add_argument("--node-id", dest="node.id", help="[node] id")
    p.add_argument("--role", dest="node.role", choices=["gpu", "flash", "both"], help="[node] role")
    p.add_argument("--data-dir", dest="node.data_dir", help="[node] data_dir")
    p.add_argument("--socket", dest="node.socket", help="[node] socket")
    p.add_argument("--arena-dir", dest="node.arena_dir", help="[node] arena_dir")
    p.add_argument("--dram-bytes", dest="store.dram_bytes", help="[store] dram_bytes, e.g. '4 GiB'")
    p.add_argument("--nvme-bytes", dest="store.nvme_bytes", help="[store] nvme_bytes, 0 disables NVMe")
    p.add_argument("--nvme-dir", dest="store.nvme_dir", help="[store] nvme_dir")
    p.add_argument("--eviction", dest="store.eviction", help="[store] eviction policy")
    p.add_argument("--metrics-listen", dest="metrics.listen", help="[metrics] listen host:port")
    p.add_argument("--no-metrics", dest="metrics.enabled", action="store_const", const=False, help="[metrics] enabled = false")
    p.add_argument("--log-level", dest="log.level", choices=["debug", "info", "warning", "error"], help="[log] level")
    p.add_argument("--log-format", dest="log.format", choices=["json", "text"], help="[log] format")
    return p


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if "." in k and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    ns = _daemon_parser().parse_args(argv)
    path = ns.config
    if path is None:
        from pathlib import Path

        path = "mesh.toml" if Path("mesh.toml").is_file() else None
    try:
        cfg = load_config(path, _overrides(ns))
    except ConfigError as e:
        print(f"memkv-mesh daemon: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format)
    from memkv_mesh.daemon import Daemon, DaemonError

    async def _run() -> None:
        daemon = Daemon(cfg)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    # Watched from the start, so a signal during a long start-up (NVMe recovery,
                    # verify_on_start) stops it at once instead of after it finishes.
                    async for signum in signals:
                        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
                        if daemon.started_at:
                            # A mesh node hands its blocks on and says goodbye before stopping;
                            # a second signal stops it at once.
                            with trio.move_on_after(cfg.mesh.handoff_timeout_s + 5):
                                async with trio.open_nursery() as inner:

                                    async def second_signal() -> None:
                                        async for _ in signals:
                                            inner.cancel_scope.cancel()
                                            return

                                    inner.start_soon(second_signal)
                                    await daemon.leave_gracefully()
                                    inner.cancel_scope.cancel()
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await nursery.start(daemon.run)

    try:
        trio.run(_run)
    except (DaemonError, OSError, BaseExceptionGroup) as e:
        # Trio's nurseries wrap what they raise in exception groups (one per nursery level);
        # a start-up failure is one exception however deep it sits, and is a message, not a trace.
        err = _sole_exception(e)
        if not isinstance(err, DaemonError | OSError):
            raise
        log.error("cannot start: %s", err)
        print(f"memkv-mesh daemon: {err}", file=sys.stderr)
        return 1
    return 0


def _sole_exception(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _client_parser(prog: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=what)
    p.add_argument("--socket", "-s", default=None, help="daemon socket (default: $MEMKV_SOCKET or the one mesh.toml names)")
    p.add_argument("--config", "-c", default=None, help="find the socket from this mesh.toml")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _connect(ns: argparse.Namespace) -> Any:
    from memkv_mesh.client import Client

    sock = ns.socket
    if sock is None and (ns.config is not None or __import__("os").path.exists("mesh.toml")):
        sock = load_config(ns.config or "mesh.toml").socket_path
    return Client(sock, timeout=10.0, name="memkv-mesh-cli")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def status_main(argv: Sequence[str] | None = None) -> int:
    ns = _client_parser("memkv-mesh status", "Print a running daemon's node, tiers, usage and hit/miss counts.").parse_args(argv)
    try:
        with _connect(ns) as c:
            st = c.stats()
    except (ConnectionError, ConfigError) as e:
        print(f"memkv-mesh status: {e}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    s = st["store"]
    gets = s["hits_dram"] + s["hits_nvme"] + s["misses"]
    print(f"node      {st['node_id']} (role {st['role']}, pid {st['pid']}, up {st['uptime_s']:.0f} s, v{st['version']})")
    print(f"socket    {st['socket']}")
    print(f"dram      {_fmt_bytes(s['dram_used_bytes'])} / {_fmt_bytes(s['dram_capacity_bytes'])} in {s['dram_blocks']} blocks  ({st['arena']})")
    for sg in s.get("segments") or []:  # with tenants: one arena segment each, plus _mesh
        print(f"          segment {sg['name']}: {_fmt_bytes(sg['used_bytes'])} / {_fmt_bytes(sg['capacity_bytes'])} in {sg['blocks']} blocks")
    for problem in st.get("arena_problems") or []:
        print(f"ARENA     {problem}")
    if st.get("nvme_dir"):
        print(f"nvme      {_fmt_bytes(s['nvme_used_bytes'])} / {_fmt_bytes(s['nvme_capacity_bytes'])} in {s['nvme_blocks']} blocks  ({st['nvme_dir']})")
        if s.get("nvme_degraded"):
            print(f"          DEGRADED since {time.strftime('%H:%M:%S', time.localtime(s['nvme_degraded_since']))}: "
                  f"{s['nvme_degraded_reason']} (serving from DRAM; resumes by itself when writes succeed again)")
    else:
        print("nvme      disabled")
    hr = (s["hits_dram"] + s["hits_nvme"]) / gets if gets else 0.0
    print(f"gets      {gets} blocks: {s['hits_dram']} dram hits, {s['hits_nvme']} nvme hits, {s['misses']} misses (hit ratio {hr:.3f})")
    print(f"puts      {s['puts']} blocks, {_fmt_bytes(s['put_bytes'])}; lookups {s['lookups']}; deletes {s['deletes']}")
    print(f"evictions {s['demotions']} dram->nvme, {s['dram_drops']} dropped from dram, {s['nvme_drops']} dropped from nvme; corrupt dropped {s['corrupt_dropped']}")
    print(f"clients   {st['connections']} connected, {s['active_leases']} leases, {s['pending_slots']} pending slots; eviction {st['eviction']}")
    if "refused_connections" in st:  # a daemon from before tenants has none of these
        tenants = ", ".join(f"{t['name']} ({t['clients']} clients)" for t in st.get("tenants") or [])
        print(f"tenants   {tenants or '-'}")
        print(
            f"refused   {st['refused_connections']} connections, {st['limited_requests']} requests over [limits], "
            f"{st['frame_timeouts']} half-sent frames, {st['bad_checksums']} commits with wrong checksums, "
            f"{st['bad_requests']} bad requests"
        )
    if st.get("metrics_url"):
        print(f"metrics   {st['metrics_url']}")
    elif st.get("metrics_port"):  # a daemon from before metrics_url
        print(f"metrics   http://127.0.0.1:{st['metrics_port']}/metrics")
    if st.get("gossip_addr"):
        print(f"gossip    {st['gossip_addr']}")
        g = st.get("gossip") or {}
        if "dropped_errors" in g:
            print(
                f"          dropped: bad key {g['dropped_bad_key']}, replay {g['dropped_replay']}, malformed "
                f"{g['dropped_malformed']}, handler errors {g['dropped_errors']}; streams refused {g['streams_refused']}, "
                f"evicted {g['streams_evicted']}"
            )
        for sk in g.get("clock_skew") or []:
            print(f"          CLOCK SKEW {sk['skew_ms'] / 1000:+.1f} s with {sk.get('node') or sk['peer']} (its packets are refused)")
    dp = st.get("dataplane")
    if dp:
        lanes = ", ".join(dp.get("ucx_lanes_in_use") or []) or "none yet (no UCX connection)"
        ucx = f"; UCX offers {', '.join(dp['ucx_transports'])}, lanes in use: {lanes}" if dp["ucx_transports"] else ""
        print(f"dataplane {dp['transport']} at {dp['address']}{ucx} ({dp['reason']})")
        print(
            f"          in {dp['blocks_in']} blocks / {_fmt_bytes(dp['bytes_in'])}, out {dp['blocks_out']} blocks / "
            f"{_fmt_bytes(dp['bytes_out'])}; corrupt {dp['corrupt_blocks']}, auth failures {dp['auth_failures']}, "
            f"peer errors {dp['peer_errors']}"
        )
        if "frame_auth_failures" in dp:
            print(
                f"          security: frame auth failures {dp['frame_auth_failures']}, identity refusals "
                f"{dp['identity_refusals']}, connections refused {dp['connections_refused']}, handshakes evicted "
                f"{dp['handshakes_evicted']} / timed out {dp['handshake_timeouts']}, idle closed {dp['idle_closed']}, "
                f"handler errors {dp['handler_errors']}; bulk bytes {'sealed' if dp.get('encrypt_bulk') else 'plain'}"
            )
    m = st.get("mesh")
    if m:
        print(
            f"mesh      R={m['replicas']} over {m['candidates']} flash peers; fetched {m['fetched']} "
            f"(misses {m['fetch_misses']}), replicated {m['replicated']} (failures {m['replication_failures']}), "
            f"repaired {m['repaired']}, handed off {m['handed_off']}"
        )
        if "dirty_bytes" in m:  # a daemon from before the dirty-block write path has none of these
            print(
                f"          dirty {m['dirty_blocks']} blocks / {_fmt_bytes(m['dirty_bytes'])} of "
                f"{_fmt_bytes(m['dirty_limit_bytes'])} (peak {_fmt_bytes(m['dirty_peak_bytes'])}); replication lag "
                f"p50 {m['replication_lag_p50_s'] * 1e3:.1f} ms, p99 {m['replication_lag_p99_s'] * 1e3:.1f} ms; "
                f"back-pressure waits {m['backpressure_waits']}, busy {m['busy_rejections']}; tombstones {m['tombstones']}"
            )
    return 0


def members_main(argv: Sequence[str] | None = None) -> int:
    ns = _client_parser("memkv-mesh members", "List the mesh members a running daemon knows.").parse_args(argv)
    try:
        with _connect(ns) as c:
            members = c.members()
    except (ConnectionError, ConfigError) as e:
        print(f"memkv-mesh members: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # MemkvError: gossip disabled
        print(f"memkv-mesh members: {e}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(members, indent=2, sort_keys=True))
        return 0
    print(f"{'node':<20} {'address':<24} {'state':<8} {'inc':>5}  role")
    for m in sorted(members, key=lambda m: str(m.get("node_id"))):
        meta = m.get("meta") or {}
        role = meta.get("role", "") if isinstance(meta, dict) else ""
        print(f"{m.get('node_id', ''):<20} {m.get('addr', ''):<24} {m.get('state', ''):<8} {m.get('incarnation', 0):>5}  {role}")
    return 0
