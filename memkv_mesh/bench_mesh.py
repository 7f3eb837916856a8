"""``memkv-mesh bench mesh``: block throughput between nodes in separate processes.

It starts ``--nodes`` node processes (``python -m memkv_mesh.bench_mesh``), each with its own
shared-memory arena, ``BlockStore`` and ``DataPlane`` on the chosen transport, and drives them
over their stdin/stdout with one JSON command per line. For each block size:

* ``remote_get_GBps``: the product path. Two real daemons, A (flash) and B (gpu), on the same
  transport; B's local client ``get_many_into`` batches of ``--batch`` blocks only A holds: B
  fetches them over the data plane into its arena and streams each to the client as it lands
  (B's copies are deleted, untimed, before every round). ``remote_get_vs_raw`` is the median of
  the per-trial ratios to ``raw_GBps`` (target >= 0.7). Left out (null) with ``--no-daemons``.
* ``remote_get_lease_GBps``: the same remote get with the zero-copy ``get_many`` (a lease on B's
  arena, released at once): the bytes are readable in the client's address space, as a GPU
  engine's DMA from the pinned arena would read them, with no CPU copy into a private buffer.
* ``dataplane_get_GBps``: the data plane alone: node process 0, which does not hold the blocks,
  calls ``DataPlane.fetch`` for blocks node process 1 holds; the bytes land in node 0's arena,
  checksum verified. No daemon, no client, no copy-out.
* ``replicate_GBps``: node 0 puts fresh blocks and pushes each batch to R = min(2, nodes - 1)
  peers in parallel; block bytes leaving node 0 per second (each block counted once per replica).
* ``raw_GBps``: the bare transport between two node processes, same sizes, same run: a plain
  blocking TCP socket (``sendall`` / ``recv_into``) for tcp, bare ucxx tag send/recv for ucx
  (blocking progress on the worker's event fd, like the data plane; same UCX_TLS; a window of
  ``--batch`` sends/receives posted at once, as the data plane posts a batch). Sender and
  receiver cycle through ``--batch`` distinct buffers, the same working set the data plane moves
  per call. ``raw_hot_GBps`` is the same with one buffer reused, which stays in the CPU caches and
  measured 15-30% faster on this VM: the cache-friendly upper bound, reported for transparency.
  ``raw_GBps`` is the ceiling remote_get is judged against (target >= 0.7 x raw).

Throughputs are total bytes / total timed seconds over the rounds after one untimed warm-up round;
between rounds the fetched/pushed copies are deleted (untimed) so every round moves bytes.
Every trial runs raw, data plane, remote get and replicate back to back. Then, unless
``--no-daemons``, ``lookup_remote_p50_us`` / ``lookup_remote_p99_us``: B's lookup of 64 keys held
only on A, answered from the gossiped directory with no network round trip.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SIZES = (2 * 1024 * 1024, 16 * 1024 * 1024)


# ---- the controller (this process) -------------------------------------------------------------
class _NodeProc:
    def __init__(self, idx: int, args: argparse.Namespace, tmp: Path, key: str) -> None:
        arena = max(256 << 20, 3 * args.batch * max(args.sizes) + (64 << 20))
        spec = {
            "node_id": f"bench{idx}", "transport": args.transport, "key": key, "arena_dir": str(tmp),
            "arena_bytes": arena, "max_block": max(args.sizes), "host": "127.0.0.1",
        }  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memkv_mesh.bench_mesh", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench node exited with code {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"bench node: {out['error']}")
        return out

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            self.call("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    key = base64.b64encode(os.urandom(32)).decode()
    with tempfile.TemporaryDirectory(prefix="memkv-bench-mesh-", dir=args.arena_dir) as tmp:
        nodes: list[_NodeProc] = []
        daemons: _Daemons | None = None
        try:
            for i in range(args.nodes):
                nodes.append(_NodeProc(i, args, Path(tmp), key))
            if not args.no_daemons:
                daemons = _Daemons(args, Path(tmp), key)
            n0, n1 = nodes[0], nodes[1]
            replicas = nodes[1 : 1 + min(2, args.nodes - 1)]
            out: dict[str, Any] = {
                "transport": n0.info["transport"],
                "reason": n0.info["reason"],
                "ucx_transports": n0.info["ucx_transports"],
                "nodes": args.nodes,
                "batch": args.batch,
                "sizes": [],
                "lookup_remote_p50_us": None,
                "loadavg_before": os.getloadavg()[0],
            }
            for size in args.sizes:
                out["sizes"].append(_measure_size(args, size, n0, n1, replicas, out["transport"], daemons))
            if daemons is not None:
                out.update(daemons.lookup_latency())
            out["loadavg_after"] = os.getloadavg()[0]
            out["node0_stats"] = n0.call("stats")["stats"]
            # What UCX endpoints really used (ucp_ep_query), beside what the context offers.
            out["ucx_lanes"] = out["node0_stats"].get("ucx_lanes_in_use", [])
            return out
        finally:
            if daemons is not None:
                daemons.stop()
            for n in nodes:
                n.stop()


def _start_daemon(tmp: Path, name: str, role: str, args: argparse.Namespace, key: str, seeds: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    from memkv_mesh.spawn import spawn_daemon

    d = tmp / name
    d.mkdir()
    arena = max(256 << 20, 3 * args.batch * max(args.sizes) + (64 << 20))
    seed_list = ", ".join(f'"{x}"' for x in seeds)
    (d / "mesh.toml").write_text(
        f'[node]\nid = "{name}"\nrole = "{role}"\ndata_dir = "{d}"\narena_dir = "{d}"\n'
        f"[store]\ndram_bytes = {arena}\nnvme_bytes = 0\nmax_block_bytes = {max(args.sizes)}\n"
        '[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
        f'[gossip]\nenabled = true\nport = 0\nseeds = [{seed_list}]\nkeys = ["{key}"]\n'
        f'[dataplane]\ntransport = "{args.transport}"\n[mesh]\nreplicas = 1\n'
    )
    sock = d / "memkv.sock"
    return spawn_daemon(d / "mesh.toml", sock), sock


class _Daemons:
    """The product path: two real daemons, A (flash) holding the blocks and B (gpu) whose local
    client gets them (B fetches them into its arena through the data plane and streams them to
    the client), and B's lookup of a prefix held only on A (the gossiped directory)."""

    def __init__(self, args: argparse.Namespace, tmp: Path, key: str) -> None:
        from memkv_mesh.client import Client

        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[Client] = []
        pa, sa = _start_daemon(tmp, "a", "flash", args, key, [])
        self.procs.append(pa)
        self.a = Client(sa)
        self.clients.append(self.a)
        pb, sb = _start_daemon(tmp, "b", "gpu", args, key, [str(self.a.stats()["gossip_addr"])])
        self.procs.append(pb)
        self.b = Client(sb)
        self.clients.append(self.b)
        deadline = time.monotonic() + 30
        while sum(m["state"] == "alive" for m in self.b.members()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("bench daemons did not see each other within 30 s")
            time.sleep(0.05)

    def put(self, size: int, n: int) -> list[bytes]:
        import numpy as np

        rng = np.random.default_rng(size)
        keys = [os.urandom(32) for _ in range(n)]
        self.a.put_many(keys, [rng.integers(0, 255, size, dtype=np.uint8) for _ in keys])
        return keys

    def remote_get(self, keys: list[bytes], dest: Any, size: int, rounds: int) -> tuple[float, int]:
        """(seconds, bytes) of ``rounds`` client gets on B of blocks only A holds, copied into
        ``dest``; with ``dest`` None, zero-copy gets (a lease on B's arena, released at once)."""
        secs = 0.0
        for _ in range(rounds):
            self.b.delete(keys, local=True)  # B never holds them when the get starts
            t0 = time.perf_counter()
            if dest is None:
                lease = self.b.get_many(keys)
                got = [None if v is None else v.nbytes for v in lease.views]
                lease.release()
            else:
                got = self.b.get_many_into(keys, dest)
            secs += time.perf_counter() - t0
            if got != [size] * len(keys):
                raise RuntimeError(f"client remote get at {size}: {got}")
        return secs, rounds * size * len(keys)

    def drop(self, keys: list[bytes]) -> None:
        self.b.delete(keys, local=True)
        self.a.delete(keys, local=True)

    def lookup_latency(self) -> dict[str, float]:
        keys = [os.urandom(32) for _ in range(64)]
        self.a.put_many(keys, [b"x" * 4096] * 64)
        deadline = time.monotonic() + 30
        while self.b.lookup(keys) < 64:  # the directory reaches B
            if time.monotonic() > deadline:
                raise RuntimeError("B's lookup never saw A's blocks within 30 s")
            time.sleep(0.02)
        lat = []
        for _ in range(2000):
            t0 = time.perf_counter()
            self.b.lookup(keys)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return {
            "lookup_remote_p50_us": round(lat[len(lat) // 2] * 1e6, 1),
            "lookup_remote_p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
        }

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _measure_size(
    args: argparse.Namespace, size: int, n0: _NodeProc, n1: _NodeProc, replicas: list[_NodeProc], transport: str,
    daemons: _Daemons | None,
) -> dict[str, Any]:
    """``--repeat`` interleaved trials of raw, remote get (through the daemons' client), the data
    plane's fetch alone, and replicate; medians of each, and of the per-trial ratios to raw.

    Interleaving matters on a shared 2-core VM: a neighbour's burst then hits all of them alike
    instead of one of them, and the per-trial get/raw ratio stays fair.
    """
    import numpy as np

    rounds = max(2, min(50, args.budget // (args.batch * size * args.repeat)))
    count = rounds * args.batch
    held = n1.call("put", size=size, n=args.batch, seed=size)["keys"]
    mine = n0.call("put", size=size, n=args.batch, seed=size + 1)["keys"]
    peers = [p.info["address"] for p in replicas]
    n0.call("remote_get", peer=n1.info["address"], keys=held, rounds=1)  # warm-up (connect, fault in)
    n0.call("replicate", peers=peers, keys=mine, rounds=1)
    for p in replicas:
        p.call("delete", keys=mine)
    dkeys: list[bytes] = []
    dest = np.empty(args.batch * size, dtype=np.uint8)
    if daemons is not None:
        dkeys = daemons.put(size, args.batch)
        daemons.remote_get(dkeys, dest, size, 1)  # warm-up
    raw, hot, dp, dp_ratio, get, ratio, rep, zc, zc_ratio = [], [], [], [], [], [], [], [], []

    def bare(nbuf: int) -> float:
        kw = {"transport": transport, "size": size, "count": count, "nbuf": nbuf, "window": args.batch}
        lst = n1.call("raw_listen", **kw)
        r = n0.call("raw_send", address=lst["address"], **kw)
        return size * count / r["seconds"] / 1e9

    for _ in range(args.repeat):
        raw.append(bare(args.batch))
        hot.append(bare(1))
        r = n0.call("remote_get", peer=n1.info["address"], keys=held, rounds=rounds)
        dp.append(r["bytes"] / r["seconds"] / 1e9)
        dp_ratio.append(dp[-1] / raw[-1])
        if daemons is not None:
            secs, moved = daemons.remote_get(dkeys, dest, size, rounds)
            get.append(moved / secs / 1e9)
            ratio.append(get[-1] / raw[-1])
            secs, moved = daemons.remote_get(dkeys, None, size, rounds)
            zc.append(moved / secs / 1e9)
            zc_ratio.append(zc[-1] / raw[-1])
        secs, moved = 0.0, 0
        for _ in range(rounds):
            r = n0.call("replicate", peers=peers, keys=mine, rounds=1)
            secs += r["seconds"]
            moved += r["bytes"]
            for p in replicas:
                p.call("delete", keys=mine)
        rep.append(moved / secs / 1e9)
    n1.call("delete", keys=held)
    n0.call("delete", keys=mine)
    if daemons is not None:
        daemons.drop(dkeys)
    return {
        "size": size,
        "remote_get_GBps": round(_median(get), 3) if get else None,
        "raw_GBps": round(_median(raw), 3),
        "remote_get_vs_raw": round(_median(ratio), 3) if ratio else None,
        "replicate_GBps": round(_median(rep), 3),
        "dataplane_get_GBps": round(_median(dp), 3),
        "dataplane_get_vs_raw": round(_median(dp_ratio), 3),
        "raw_hot_GBps": round(_median(hot), 3),
        "remote_get_lease_GBps": round(_median(zc), 3) if zc else None,
        "remote_get_lease_vs_raw": round(_median(zc_ratio), 3) if zc_ratio else None,
        "trials": {
            "remote_get_GBps": [round(x, 3) for x in get],
            "remote_get_lease_GBps": [round(x, 3) for x in zc],
            "dataplane_get_GBps": [round(x, 3) for x in dp],
            "raw_GBps": [round(x, 3) for x in raw],
            "raw_hot_GBps": [round(x, 3) for x in hot],
            "replicate_GBps": [round(x, 3) for x in rep],
        },
        "rounds_per_trial": rounds,
    }


def _parse_sizes(text: str) -> list[int]:
    from memkv_mesh.config import parse_byte_size

    try:
        sizes = [parse_byte_size(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes needs positive sizes, got {text!r}")
    return sizes


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="memkv-mesh bench mesh", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="node processes to start (>= 2; default 3)")
    p.add_argument("--transport", choices=("tcp", "ucx", "auto"), default="tcp", help="data-plane transport")
    p.add_argument("--sizes", type=_parse_sizes, default=list(SIZES), help="block sizes, e.g. '2MiB,16MiB'")
    p.add_argument("--batch", type=int, default=8, help="blocks per get/replicate call (default 8)")
    p.add_argument("--budget", type=_parse_sizes, default=[1 << 30], help="bytes per size and measurement, all trials (default 1GiB)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved trials per size; medians are reported (default 5)")
    p.add_argument("--arena-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="where the node arenas live")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-daemons", action="store_true", help="skip the measurement through real daemons' local clients")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error(f"--nodes must be at least 2, got {args.nodes}")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    args.budget = args.budget[0]
    try:
        out = run_bench(args)
    except RuntimeError as e:
        print(f"memkv-mesh bench mesh: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"transport {out['transport']} ({out['reason']}); UCX transports: {out['ucx_transports'] or '-'}; "
        f"lanes used: {out['ucx_lanes'] or '-'}"
    )
    print(f"medians of {args.repeat} interleaved trials; load average {out['loadavg_before']:.1f} -> {out['loadavg_after']:.1f}")
    print(
        f"{'size':>10} {'remote_get GB/s':>16} {'raw GB/s':>9} {'get/raw':>8} {'lease/raw':>10} "
        f"{'data plane GB/s':>16} {'dp/raw':>7} {'replicate GB/s':>15} {'raw hot GB/s':>13}"
    )
    for row in out["sizes"]:
        print(
            f"{row['size']:>10} {row['remote_get_GBps'] or '-':>16} {row['raw_GBps']:>9} "
            f"{row['remote_get_vs_raw'] or '-':>8} {row['remote_get_lease_vs_raw'] or '-':>10} "
            f"{row['dataplane_get_GBps']:>16} {row['dataplane_get_vs_raw']:>7} "
            f"{row['replicate_GBps']:>15} {row['raw_hot_GBps']:>13}"
        )
    if out.get("lookup_remote_p50_us") is not None:
        print(f"lookup of 64 keys held on another node: p50 {out['lookup_remote_p50_us']} us, p99 {out['lookup_remote_p99_us']} us")
    return 0


# ---- a node process -------------------------------------------------------------------------------
class _Node:
    def __init__(self, spec: dict[str, Any]) -> None:
        import trio

        from memkv_mesh.arena import Arena
        from memkv_mesh.store import BlockStore
        from transport.dataplane import DataPlane
        from transport.dataplane_config import DataPlaneConfig

        self.trio = trio
        self.arena = Arena(
            Path(spec["arena_dir"]) / f"{spec['node_id']}-{os.getpid()}.arena", spec["arena_bytes"], preallocate=True
        )
        self.arena.open()
        self.store = BlockStore(self.arena, max_block_bytes=spec["max_block"])
        cfg = DataPlaneConfig(transport=spec["transport"], keys=[spec["key"]], host=spec["host"])
        self.dp = DataPlane(cfg, self.store, node_id=spec["node_id"])
        self.raw_threads: list[threading.Thread] = []

    async def put(self, size: int, n: int, seed: int) -> dict[str, Any]:
        import hashlib

        import numpy as np
        import xxhash

        rng = np.random.default_rng(seed)
        keys = []
        owner = object()
        for i in range(n):
            k = hashlib.blake2b(f"bench:{seed}:{i}".encode(), digest_size=32).digest()
            (off,) = await self.store.alloc(owner, [k], [size])
            if off >= 0:
                with self.arena.slice(off, size) as v:
                    np.frombuffer(v, dtype=np.uint8)[:] = rng.integers(0, 256, size, dtype=np.uint8)
                    ck = xxhash.xxh3_64_intdigest(v)
                self.store.commit(owner, [k], [ck])
            keys.append(k.hex())
        return {"keys": keys}

    async def remote_get(self, peer: str, keys: list[str], rounds: int) -> dict[str, Any]:
        ks = [bytes.fromhex(k) for k in keys]
        secs, moved = 0.0, 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            got = await self.dp.fetch(peer, ks)
            secs += time.perf_counter() - t0
            if not all(got):
                raise RuntimeError(f"remote get missed {got.count(False)} of {len(ks)} blocks")
            moved += sum(loc[1] for loc in await self._sizes(ks))
            await self.store.delete(ks)
        return {"seconds": secs, "bytes": moved}

    async def _sizes(self, ks: list[bytes]) -> list[tuple[int, int]]:
        owner = object()
        lease, locs = await self.store.get(owner, ks)
        self.store.release(owner, lease)
        return [loc for loc in locs if loc is not None]

    async def replicate(self, peers: list[str], keys: list[str], rounds: int) -> dict[str, Any]:
        ks = [bytes.fromhex(k) for k in keys]
        size = sum(loc[1] for loc in await self._sizes(ks))
        results: list[list[bool]] = []

        async def one(peer: str) -> None:
            results.append(await self.dp.push(peer, ks))

        t0 = time.perf_counter()
        for _ in range(rounds):
            async with self.trio.open_nursery() as n:
                for p in peers:
                    n.start_soon(one, p)
        secs = time.perf_counter() - t0
        if not all(all(r) for r in results):
            raise RuntimeError("replication failed for some blocks")
        return {"seconds": secs, "bytes": size * len(peers) * rounds}

    async def delete(self, keys: list[str]) -> dict[str, Any]:
        return {"deleted": await self.store.delete([bytes.fromhex(k) for k in keys])}

    def raw_listen(self, transport: str, size: int, count: int, nbuf: int, window: int) -> dict[str, Any]:
        ready: list[str] = []
        ev = threading.Event()
        target = _raw_tcp_receiver if transport == "tcp" else _raw_ucx_receiver
        t = threading.Thread(target=target, args=(size, count, nbuf, window, ready, ev), daemon=True)
        t.start()
        ev.wait(30)
        self.raw_threads.append(t)
        return {"address": ready[0]}

    def raw_send(
        self, transport: str, address: str, size: int, count: int, nbuf: int, window: int
    ) -> dict[str, Any]:
        fn = _raw_tcp_sender if transport == "tcp" else _raw_ucx_sender
        return {"seconds": fn(address, size, count, nbuf, window)}

    def stats(self) -> dict[str, Any]:
        import msgspec

        return {"stats": msgspec.to_builtins(self.dp.statistics())}


def _raw_tcp_receiver(
    size: int, count: int, nbuf: int, window: int, ready: list[str], ev: threading.Event
) -> None:
    del window  # a TCP stream pipelines by itself
    srv = socket.create_server(("127.0.0.1", 0))
    ready.append(f"127.0.0.1:{srv.getsockname()[1]}")
    ev.set()
    conn, _ = srv.accept()
    bufs = [memoryview(bytearray(size)) for _ in range(nbuf)]
    for i in range(count + 1):  # one warm-up block
        buf = bufs[i % nbuf]
        pos = 0
        while pos < size:
            got = conn.recv_into(buf[pos:], size - pos)
            if not got:
                raise RuntimeError("raw sender went away")
            pos += got
    conn.sendall(b"k")
    conn.close()
    srv.close()


def _raw_tcp_sender(address: str, size: int, count: int, nbuf: int, window: int) -> float:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    datas = [memoryview(bytearray(os.urandom(size))) for _ in range(nbuf)]
    s.sendall(datas[0])  # warm-up
    t0 = time.perf_counter()
    for i in range(count):
        s.sendall(datas[i % nbuf])
    s.recv(1)
    dt = time.perf_counter() - t0
    s.close()
    return dt


def _ucx_worker() -> tuple[Any, Any, Any]:
    from ucxx._lib import libucxx as L

    ctx = L.UCXContext(feature_flags=(L.Feature.TAG, L.Feature.WAKEUP))
    worker = L.UCXWorker(ctx)
    worker.init_blocking_progress_mode()
    return L, ctx, worker


def _ucx_wait(worker: Any, req: Any) -> None:
    # Blocking progress (sleep on the worker's event fd), as the data plane does: a busy-polling
    # pair of processes starves itself on a shared 2-core VM and would understate the ceiling.
    while not req.completed:
        worker.progress_worker_event()
    req.check_error()


def _raw_ucx_receiver(
    size: int, count: int, nbuf: int, window: int, ready: list[str], ev: threading.Event
) -> None:
    import numpy as np
    from ucxx._lib.arr import Array

    L, ctx, worker = _ucx_worker()
    eps: list[Any] = []
    conn_requests: list[Any] = []
    lst = L.UCXListener.create(worker=worker, port=0, cb_func=conn_requests.append)
    ready.append(f"127.0.0.1:{lst.port}")
    ev.set()
    while not conn_requests:
        worker.progress_worker_event()
    eps.append(lst.create_endpoint_from_conn_request(conn_requests[0], True))
    ep = eps[0]
    bufs = [Array(np.empty(size, dtype=np.uint8)) for _ in range(nbuf)]
    _ucx_wait(worker, ep.tag_recv(bufs[0], L.UCXXTag(1), L.UCXXTagMaskFull))  # warm-up
    for start in range(0, count, window):  # post a window of receives at once, like the data plane
        reqs = [
            ep.tag_recv(bufs[i % nbuf], L.UCXXTag(1), L.UCXXTagMaskFull)
            for i in range(start, min(count, start + window))
        ]
        for r in reqs:
            _ucx_wait(worker, r)
    ack = Array(np.ones(1, dtype=np.uint64))
    _ucx_wait(worker, ep.tag_send(ack, L.UCXXTag(2)))
    for _ in range(1000):
        worker.progress()


def _raw_ucx_sender(address: str, size: int, count: int, nbuf: int, window: int) -> float:
    import numpy as np
    from ucxx._lib.arr import Array

    L, ctx, worker = _ucx_worker()
    host, port = address.rsplit(":", 1)
    ep = L.UCXEndpoint.create(worker, host, int(port), True)
    datas = [Array(np.frombuffer(os.urandom(size), dtype=np.uint8).copy()) for _ in range(nbuf)]
    _ucx_wait(worker, ep.tag_send(datas[0], L.UCXXTag(1)))  # warm-up (and wire-up)
    ack = Array(np.zeros(1, dtype=np.uint64))
    t0 = time.perf_counter()
    for start in range(0, count, window):  # post a window of sends at once, like the data plane
        reqs = [ep.tag_send(datas[i % nbuf], L.UCXXTag(1)) for i in range(start, min(count, start + window))]
        for r in reqs:
            _ucx_wait(worker, r)
    _ucx_wait(worker, ep.tag_recv(ack, L.UCXXTag(2), L.UCXXTagMaskFull))
    dt = time.perf_counter() - t0
    try:
        ep.close_blocking(0, 1)
    except Exception:
        pass
    return dt


def _node_main(spec_json: str) -> int:
    import trio

    # Our replies get the real stdout; fd 1 becomes stderr, so whatever a native library prints
    # (UCX does) cannot corrupt the command channel.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    async def amain() -> None:
        node = _Node(json.loads(spec_json))
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(node.dp.run)
                reply({
                    "address": addr, "transport": node.dp.transport, "reason": node.dp.reason,
                    "ucx_transports": node.dp.statistics().ucx_transports,
                })  # fmt: skip
                while True:
                    line = await trio.to_thread.run_sync(sys.stdin.readline)
                    if not line:
                        break
                    cmd = json.loads(line)
                    op = cmd.pop("op")
                    if op == "quit":
                        reply({"ok": True})
                        break
                    try:
                        fn = getattr(node, op)
                        if op in ("raw_listen", "raw_send"):
                            out = await trio.to_thread.run_sync(functools.partial(fn, **cmd))
                        elif op == "stats":
                            out = fn()
                        else:
                            out = await fn(**cmd)
                    except Exception as e:
                        out = {"error": f"{op}: {type(e).__name__}: {e}"}
                    reply(out)
                nursery.cancel_scope.cancel()
        finally:
            node.arena.close()

    try:
        trio.run(amain)
    except Exception as e:
        reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_node_main(sys.argv[1]))
