"""``memkv-mesh bench anchors``: memkv-mesh side by side with Redis and Mooncake Store, one run.

Theory of operation:

- Every system gets the same work: for each block size, rounds of a batch of 16 fresh blocks put,
  then read back into one caller-owned buffer of 16 x size bytes, then deleted (untimed). One
  warm-up round is dropped; throughput is aggregate bytes / seconds over the timed rounds. Rounds
  per size come from the same byte budget as ``memkv-mesh bench local`` (``--budget``).
- memkv-mesh is measured by importing ``run_bench`` from ``memkv_mesh.bench_local`` against a
  daemon this command starts in a temporary directory (numpy memcpy ceiling included).
- Redis: this command starts its own ``redis-server`` (persistence off, ``--save "" --appendonly
  no``) on a Unix socket and/or a free 127.0.0.1 port in a temporary directory. redis-py pipelines
  16 SETs, then 16 GETs; GET results are copied into the caller's buffer inside the timed region,
  because that is where an engine needs them. Lookup is one ``EXISTS`` with 64 keys.
- Mooncake Store: a child worker process (bounded by ``--timeout``) starts ``mooncake_master``
  with its built-in HTTP metadata server, and for mode ``tcp`` a separate ``mooncake_client``
  process that owns the memory segment, so every byte crosses the TCP transfer engine on
  loopback (the issue's anchor: "TCP on loopback"). Mode ``shm`` is Mooncake's same-node path
  and the closest to our design: a "dummy client" (``setup_dummy``) shares a memory pool with a
  local ``mooncake_client`` real client that owns the segment, and the caller's buffers come from
  that pool. Mode ``colocated`` mounts the segment inside the benchmarking process itself.
  Two APIs: ``put_batch``/``get_batch`` (bytes; results copied into the caller's buffer, timed)
  and ``batch_put_from``/``batch_get_into`` (registered buffers, no extra copy). Lookup is one
  ``batch_is_exist`` of 64 keys. The worker first moves itself into a private network namespace
  when the kernel allows it (root or CAP_SYS_ADMIN), because Mooncake's handshake and TCP
  transport listeners bind wildcard addresses whatever host they are given; the JSON says which.
- Ratios at ``--ratio-size`` (2 MiB) compare memkv-mesh with each anchor's *fastest* variant
  (best API, best transport), so a ratio never flatters us by picking a slow path of theirs.
- ``--repeat N`` runs everything N times, interleaved, and reports the per-figure median (the raw
  runs are kept under ``runs`` in the JSON).
- A missing anchor (no redis-server, no mooncake package) is reported as skipped with the reason
  and the exit code stays 0; an anchor that is installed but fails makes the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memkv_mesh.bench_local import BATCH, SIZES, _rounds, _start_daemon, run_bench
from memkv_mesh.client import Client

LOOKUP_KEYS = 64
RATIO_SIZE = 2 << 20
REDIS_VIAS = ("unix", "tcp")
MOONCAKE_MODES = ("tcp", "shm", "colocated")
MOONCAKE_DISTS = ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine")
RESULT_MARK = "MEMKV-ANCHOR-RESULT "
# The targets: memkv-mesh vs Mooncake Store at 2 MiB, and the local prefix lookup.
TARGET_GET_X = 3.0
TARGET_PUT_X = 5.0
TARGET_LOOKUP_P50_US = 50.0
TARGET_LOOKUP_P99_US = 200.0


# --------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.returncode} before listening on 127.0.0.1:{port}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _pcts_us(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return round(lat[len(lat) // 2] * 1e6, 1), round(lat[int(len(lat) * 0.99)] * 1e6, 1)


def _values(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(BATCH)]


def _check_first_round(dest: np.ndarray, expected: np.ndarray, size: int, who: str) -> None:
    if not np.array_equal(dest, expected):
        raise RuntimeError(f"{who} read back wrong bytes at size {size}")


def _timed_rounds(
    size: int,
    budget: int,
    put: Callable[[list[bytes]], None],
    get: Callable[[list[bytes]], None],
    delete: Callable[[list[bytes]], None],
    check: Callable[[], None],
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run warm-up + timed rounds of put(batch) then get(batch); returns GB/s for both.

    The warm-up round (untimed) calls ``between`` after the put, e.g. to scribble over the
    source so that a store which kept a reference instead of a copy is caught by ``check``.
    """
    rounds = _rounds(size, budget)
    put_s = get_s = 0.0
    for r in range(rounds + 1):
        keys = [os.urandom(16).hex().encode() for _ in range(BATCH)]
        t0 = time.perf_counter()
        put(keys)
        t1 = time.perf_counter()
        if r == 0 and between is not None:
            between()
        get(keys)
        t2 = time.perf_counter()
        if r == 0:
            check()
        else:
            put_s += t1 - t0
            get_s += t2 - t1
        delete(keys)
    moved = BATCH * size * rounds
    return {
        "put_GBps": round(moved / put_s / 1e9, 3),
        "get_GBps": round(moved / get_s / 1e9, 3),
        "rounds": rounds,
    }


# --------------------------------------------------------------------------------------- memkv


def _run_memkv(sizes: Sequence[int], budget: int, lookups: int) -> dict[str, Any]:
    """``run_bench`` of ``memkv-mesh bench local`` against a daemon started here.

    A failure is reported (status "failed") rather than raised, so the anchors still run.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="memkv-anchors-") as tmp:
            need = BATCH * max(sizes) * 2 + (64 << 20)
            proc, sock = _start_daemon(Path(tmp), need, max(sizes))
            try:
                with Client(sock, name="bench-anchors") as client:
                    result = run_bench(client, sizes=sizes, budget_bytes=budget, lookups=lookups)
            finally:
                _stop(proc)
    except Exception as exc:  # reported in the result; main() turns it into exit code 1
        return {"status": "failed", "reason": f"memkv-mesh bench: {type(exc).__name__}: {exc}"}
    result["status"] = "ok"
    return result


# --------------------------------------------------------------------------------------- redis


def _redis_server_path() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for cand in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    return None


@contextlib.contextmanager
def _redis_server(binary: str, tmp: Path, via: str) -> Iterator[dict[str, Any]]:
    """Start redis-server on a Unix socket (no TCP at all) or on a free 127.0.0.1 port."""
    cmd = [binary, "--save", "", "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]
    cmd += ["--protected-mode", "yes", "--logfile", str(tmp / f"redis-{via}.log")]
    if via == "unix":
        sock = tmp / "redis.sock"
        cmd += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        conn: dict[str, Any] = {"unix_socket_path": str(sock)}
    else:
        port = _free_port()
        cmd += ["--port", str(port), "--bind", "127.0.0.1"]
        conn = {"host": "127.0.0.1", "port": port}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        yield {"proc": proc, **conn}
    finally:
        _stop(proc)


def _redis_connect(server: dict[str, Any], log: Path) -> Any:
    import redis

    kwargs = {k: v for k, v in server.items() if k != "proc"}
    proc: subprocess.Popen[bytes] = server["proc"]
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}: {_tail(log)}")
        try:
            r = redis.Redis(socket_timeout=120, **kwargs)
            r.ping()
            return r
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not answer PING within 20 s: {_tail(log)}"
                ) from None
            time.sleep(0.05)


def _bench_redis(r: Any, sizes: Sequence[int], budget: int, lookups: int) -> dict[str, Any]:
    if (
        r.config_get("save").get("save", "") != ""
        or r.config_get("appendonly").get("appendonly") != "no"
    ):
        raise RuntimeError("redis-server started with persistence on; the bench needs it off")
    out: dict[str, Any] = {"sizes": []}
    for size in sizes:
        values = _values(size)
        views = [v.data for v in values]
        dest = np.empty(BATCH * size, dtype=np.uint8)

        def put(keys: list[bytes], views: list[memoryview] = views) -> None:
            pipe = r.pipeline(transaction=False)
            for k, v in zip(keys, views, strict=True):
                pipe.set(k, v)
            res = pipe.execute()
            if not all(res):
                raise RuntimeError(f"redis SET failed: {res}")

        def get(keys: list[bytes], size: int = size, dest: np.ndarray = dest) -> None:
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            got = pipe.execute()
            for i, g in enumerate(got):
                if g is None or len(g) != size:
                    raise RuntimeError(
                        f"redis GET {i} returned {None if g is None else len(g)} bytes, expected {size}"
                    )
                dest[i * size : (i + 1) * size] = np.frombuffer(g, dtype=np.uint8)

        def delete(keys: list[bytes]) -> None:
            r.delete(*keys)

        expected = np.concatenate(values)

        def check(
            dest: np.ndarray = dest, expected: np.ndarray = expected, size: int = size
        ) -> None:
            _check_first_round(dest, expected, size, "redis")

        fig = _timed_rounds(size, budget, put, get, delete, check)
        out["sizes"].append(
            {
                "size": size,
                "set_GBps": fig["put_GBps"],
                "get_GBps": fig["get_GBps"],
                "rounds": fig["rounds"],
            }
        )
    keys = [os.urandom(16).hex().encode() for _ in range(LOOKUP_KEYS)]
    r.mset(dict.fromkeys(keys, b"x" * 4096))
    lat = []
    for _ in range(lookups):
        t0 = time.perf_counter()
        n = r.exists(*keys)
        lat.append(time.perf_counter() - t0)
        if n != LOOKUP_KEYS:
            raise RuntimeError(f"redis EXISTS returned {n}, expected {LOOKUP_KEYS}")
    r.delete(*keys)
    out["exists64_p50_us"], out["exists64_p99_us"] = _pcts_us(lat)
    return out


def _run_redis(
    sizes: Sequence[int], budget: int, lookups: int, vias: Sequence[str]
) -> dict[str, Any]:
    binary = _redis_server_path()
    if binary is None:
        return {
            "status": "skipped",
            "reason": "redis-server not found on PATH (apt-get install -y redis-server)",
        }
    if importlib.util.find_spec("redis") is None:
        return {"status": "skipped", "reason": "redis-py is not installed (pip install redis)"}
    import redis
    import redis.utils

    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    out: dict[str, Any] = {
        "status": "ok",
        "server": version,
        "redis_py": redis.__version__,
        "parser": "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python",
        "via": {},
    }
    for via in vias:
        try:
            with tempfile.TemporaryDirectory(prefix="memkv-anchors-redis-") as tmp:
                with _redis_server(binary, Path(tmp), via) as server:
                    r = _redis_connect(server, Path(tmp) / f"redis-{via}.log")
                    try:
                        out["via"][via] = _bench_redis(r, sizes, budget, lookups)
                    finally:
                        r.close()
        except Exception as exc:  # reported in the result; main() turns it into exit code 1
            reason = f"redis ({via}): {type(exc).__name__}: {exc}"
            return {**out, "status": "failed", "reason": reason}
    return out


# ------------------------------------------------------------------------------------ mooncake


def _mooncake_version() -> str | None:
    for dist in MOONCAKE_DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    return None


def _mooncake_binary(name: str) -> str | None:
    cands = [Path(sys.executable).parent / name]
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        cands += [Path(p) / name for p in spec.submodule_search_locations]
    for cand in cands:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _isolate_network() -> str | None:
    """Move this process into a fresh network namespace with only loopback, up.

    Returns None on success, or why it could not (the caller then runs on the host network).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        return f"unshare(CLONE_NEWNET) failed: {errno.errorcode.get(err, err)} {os.strerror(err)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    return None


def _mooncake_buffers(store: Any, mode: str, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The caller's source and destination buffers, registered with Mooncake.

    Plain process memory for ``tcp`` and ``colocated``; for ``shm`` they must come from the
    dummy client's shared-memory pool (``alloc_from_mem_pool``), which its real client maps.
    """
    bufs = []
    for _ in range(2):
        if mode == "shm":
            ptr = store.alloc_from_mem_pool(nbytes)
            if not ptr:
                raise RuntimeError(f"mooncake alloc_from_mem_pool({nbytes}) failed")
            bufs.append(np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr)))
        else:
            bufs.append(np.empty(nbytes, dtype=np.uint8))
        if store.register_buffer(bufs[-1].ctypes.data, nbytes) != 0:
            raise RuntimeError(f"mooncake register_buffer of {nbytes} bytes failed")
    return bufs[0], bufs[1]


def _bench_mooncake(
    store: Any,
    src_all: np.ndarray,
    dest_all: np.ndarray,
    sizes: Sequence[int],
    budget: int,
    lookups: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": []}
    for size in sizes:
        values = _values(size)
        src = src_all[: BATCH * size]
        dest = dest_all[: BATCH * size]
        expected = np.concatenate(values)
        src[:] = expected
        blocks = [src[i * size : (i + 1) * size] for i in range(BATCH)]
        src_ptrs = [src.ctypes.data + i * size for i in range(BATCH)]
        dest_ptrs = [dest.ctypes.data + i * size for i in range(BATCH)]
        lens = [size] * BATCH

        def put_batch(keys: list[bytes], blocks: list[np.ndarray] = blocks) -> None:
            rc = store.put_batch([k.decode() for k in keys], blocks)
            if rc != 0:
                raise RuntimeError(f"mooncake put_batch returned {rc}")

        def get_batch(keys: list[bytes], size: int = size, dest: np.ndarray = dest) -> None:
            got = store.get_batch([k.decode() for k in keys])
            for i, g in enumerate(got):
                if len(g) != size:
                    raise RuntimeError(
                        f"mooncake get_batch item {i} has {len(g)} bytes, expected {size}"
                    )
                dest[i * size : (i + 1) * size] = np.frombuffer(g, dtype=np.uint8)

        def put_from(
            keys: list[bytes], src_ptrs: list[int] = src_ptrs, lens: list[int] = lens
        ) -> None:
            codes = store.batch_put_from([k.decode() for k in keys], src_ptrs, lens)
            if any(c != 0 for c in codes):
                raise RuntimeError(f"mooncake batch_put_from returned {codes}")

        def get_into(
            keys: list[bytes],
            dest_ptrs: list[int] = dest_ptrs,
            lens: list[int] = lens,
            size: int = size,
        ) -> None:
            got = store.batch_get_into([k.decode() for k in keys], dest_ptrs, lens)
            if any(g != size for g in got):
                raise RuntimeError(f"mooncake batch_get_into returned {got}, expected {size} each")

        def delete(keys: list[bytes]) -> None:
            codes = store.batch_remove([k.decode() for k in keys], True)
            if any(c != 0 for c in codes):
                raise RuntimeError(f"mooncake batch_remove returned {codes}")

        def scribble(src: np.ndarray = src) -> None:
            src.fill(0xAB)

        def check(
            dest: np.ndarray = dest,
            src: np.ndarray = src,
            expected: np.ndarray = expected,
            size: int = size,
        ) -> None:
            _check_first_round(dest, expected, size, "mooncake")
            dest.fill(0)
            src[:] = expected

        entry: dict[str, Any] = {"size": size}
        fig = _timed_rounds(size, budget, put_batch, get_batch, delete, check, scribble)
        entry["put_batch_GBps"], entry["get_batch_GBps"] = fig["put_GBps"], fig["get_GBps"]
        fig = _timed_rounds(size, budget, put_from, get_into, delete, check, scribble)
        entry["put_from_GBps"], entry["get_into_GBps"] = fig["put_GBps"], fig["get_GBps"]
        entry["rounds"] = fig["rounds"]
        out["sizes"].append(entry)
    keys = [os.urandom(16).hex() for _ in range(LOOKUP_KEYS)]
    if store.put_batch(keys, [b"x" * 4096] * LOOKUP_KEYS) != 0:
        raise RuntimeError("mooncake put_batch of the lookup keys failed")
    lat = []
    for _ in range(lookups):
        t0 = time.perf_counter()
        res = store.batch_is_exist(keys)
        lat.append(time.perf_counter() - t0)
        if sum(1 for x in res if x == 1) != LOOKUP_KEYS:
            raise RuntimeError(f"mooncake batch_is_exist returned {res}")
    store.batch_remove(keys, True)
    out["is_exist64_p50_us"], out["is_exist64_p99_us"] = _pcts_us(lat)
    return out


def mooncake_worker_main(argv: Sequence[str]) -> int:
    """The child process that runs one Mooncake mode; prints one RESULT_MARK line of JSON."""
    p = argparse.ArgumentParser(prog="memkv-mesh bench anchors (mooncake worker)")
    p.add_argument("--mode", choices=MOONCAKE_MODES, required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--lookups", type=int, required=True)
    p.add_argument("--tmp", required=True)
    p.add_argument("--no-netns", action="store_true")
    ns = p.parse_args(argv)
    sizes = [int(s) for s in ns.sizes.split(",")]
    tmp = Path(ns.tmp)
    result: dict[str, Any]
    why_not = "--no-netns given" if ns.no_netns else _isolate_network()
    network = (
        "private network namespace, loopback only"
        if why_not is None
        else f"host network ({why_not})"
    )
    try:
        import mooncake.store
    except ImportError as exc:
        print(
            RESULT_MARK
            + json.dumps({"status": "skipped", "reason": f"import mooncake.store failed: {exc}"}),
            flush=True,
        )
        return 0
    master_bin = _mooncake_binary("mooncake_master")
    client_bin = _mooncake_binary("mooncake_client")
    if master_bin is None or (ns.mode != "colocated" and client_bin is None):
        print(
            RESULT_MARK
            + json.dumps(
                {
                    "status": "skipped",
                    "reason": "mooncake_master/mooncake_client binaries not found",
                }
            ),
            flush=True,
        )
        return 0
    segment = max(1 << 30, 4 * BATCH * max(sizes))
    local_buffer = 2 * BATCH * max(sizes) + (64 << 20)
    rpc, http, metrics, cport = _free_port(), _free_port(), _free_port(), _free_port()
    metadata = f"http://127.0.0.1:{http}/metadata"
    procs: list[subprocess.Popen[bytes]] = []
    store: Any = None
    try:
        with open(tmp / "mooncake_master.log", "wb") as mlog:
            master = subprocess.Popen(
                [
                    master_bin, f"--rpc_port={rpc}", "--rpc_address=127.0.0.1",
                    "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                    f"--http_metadata_server_port={http}", f"--metrics_port={metrics}",
                    "--metrics_host=127.0.0.1", "--enable_metric_reporting=false",
                    "--logtostderr=true", "--minloglevel=1",
                ],
                stdout=mlog, stderr=subprocess.STDOUT, cwd=tmp,
            )  # fmt: skip
        procs.append(master)
        _wait_tcp(rpc, master, "mooncake_master (rpc)")
        _wait_tcp(http, master, "mooncake_master (http metadata)")
        if ns.mode in ("tcp", "shm"):
            assert client_bin is not None
            with open(tmp / "mooncake_client.log", "wb") as clog:
                storage = subprocess.Popen(
                    [
                        client_bin, "--host=127.0.0.1", f"--port={cport}",
                        f"--global_segment_size={segment}", f"--local_buffer_size={local_buffer}",
                        f"--master_server_address=127.0.0.1:{rpc}", f"--metadata_server={metadata}",
                        "--protocol=tcp", "--logtostderr=true", "--minloglevel=1",
                    ],
                    stdout=clog, stderr=subprocess.STDOUT, cwd=tmp,
                )  # fmt: skip
            procs.append(storage)
            _wait_tcp(cport, storage, "mooncake_client (storage)")
        store = mooncake.store.MooncakeDistributedStore()
        if ns.mode == "shm":
            # A dummy client: shares a memory pool with the local real client (our architecture).
            rc = store.setup_dummy(local_buffer, local_buffer, f"127.0.0.1:{cport}")
        else:
            rc = store.setup(
                "127.0.0.1",
                metadata,
                segment if ns.mode == "colocated" else 0,
                local_buffer,
                "tcp",
                "",
                f"127.0.0.1:{rpc}",
            )
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore setup ({ns.mode}) returned {rc}")
        # The storage process may mount its segment a moment after it listens: wait for a put.
        deadline = time.monotonic() + 20
        while store.put("memkv-anchors-probe", b"p") != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("mooncake put failed for 20 s after setup (no segment mounted?)")
            time.sleep(0.1)
        store.remove("memkv-anchors-probe", True)
        src, dest = _mooncake_buffers(store, ns.mode, BATCH * max(sizes))
        result = {
            "status": "ok",
            "network": network,
            **_bench_mooncake(store, src, dest, sizes, ns.budget, ns.lookups),
        }
    except Exception as exc:  # reported to the parent, which decides the exit code
        logs = "\n".join(f"--- {f.name}\n{_tail(f)}" for f in sorted(tmp.glob("mooncake_*.log")))
        result = {
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}",
            "network": network,
            "logs": logs,
        }
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        for proc in reversed(procs):
            _stop(proc)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def _run_mooncake_mode(
    mode: str, sizes: Sequence[int], budget: int, lookups: int, timeout: float, netns: bool
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memkv-anchors-mooncake-") as tmpname:
        tmp = Path(tmpname)
        code = "import sys; from memkv_mesh.bench_anchors import mooncake_worker_main as m; sys.exit(m(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "--mode", mode, "--sizes", ",".join(map(str, sizes))]
        cmd += ["--budget", str(budget), "--lookups", str(lookups), "--tmp", tmpname]
        if not netns:
            cmd.append("--no-netns")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
        )
        env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
        env.setdefault("GLOG_minloglevel", "1")
        with open(tmp / "worker.log", "wb") as wlog:
            # A new session so that a timeout can kill the worker and its servers as one group.
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=wlog, env=env, start_new_session=True
            )
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.communicate()
                return {
                    "status": "failed",
                    "reason": f"the mooncake {mode} worker ran past --timeout {timeout:.0f} s and was killed",
                    "logs": _tail(tmp / "worker.log"),
                }
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
        for line in reversed(stdout.decode(errors="replace").splitlines()):
            if line.startswith(RESULT_MARK):
                res: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
                return res
        return {
            "status": "failed",
            "reason": f"the mooncake {mode} worker exited with code {proc.returncode} without a result",
            "logs": _tail(tmp / "worker.log"),
        }


def _run_mooncake(
    sizes: Sequence[int],
    budget: int,
    lookups: int,
    modes: Sequence[str],
    timeout: float,
    netns: bool,
) -> dict[str, Any]:
    version = _mooncake_version()
    if version is None or importlib.util.find_spec("mooncake") is None:
        return {
            "status": "skipped",
            "reason": "Mooncake is not installed (pip install mooncake-transfer-engine-non-cuda; needs apt-get install -y libibverbs1)",
        }
    out: dict[str, Any] = {"status": "ok", "version": version, "modes": {}}
    for mode in modes:
        res = _run_mooncake_mode(mode, sizes, budget, lookups, timeout, netns)
        if res["status"] != "ok":
            return {**res, "version": version, "mode": mode}
        out["modes"][mode] = res
    return out


# --------------------------------------------------------------------------------- aggregation


def _median_tree(items: list[Any]) -> Any:
    """Per-figure median across runs with the same shape (numbers), first value otherwise."""
    first = items[0]
    if isinstance(first, bool) or first is None:
        return first
    if isinstance(first, int | float):
        nums = [x for x in items if isinstance(x, int | float) and not isinstance(x, bool)]
        med = statistics.median(nums)
        return round(med, 3) if isinstance(med, float) else med
    if isinstance(first, dict):
        return {
            k: _median_tree([it[k] for it in items if isinstance(it, dict) and k in it])
            for k in first
        }
    if isinstance(first, list) and all(
        isinstance(it, list) and len(it) == len(first) for it in items
    ):
        return [_median_tree([it[i] for it in items]) for i in range(len(first))]
    return first


def _merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in runs[0]:
        ok = [r[name] for r in runs if r[name].get("status") == "ok"]
        if len(ok) == len(runs):
            merged[name] = _median_tree(ok)
        else:
            # Not every run succeeded: report the first one that did not, never a partial median.
            merged[name] = next(r[name] for r in runs if r[name].get("status") != "ok")
    return merged


def _at(entries: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
    return next((e for e in entries if e["size"] == size), None)


def _ratios(res: dict[str, Any], size: int) -> dict[str, Any]:
    memkv = res.get("memkv", {})
    ours = _at(memkv.get("sizes", []), size) if memkv.get("status") == "ok" else None
    out: dict[str, Any] = {"size": size}
    if ours is None:
        out["note"] = f"memkv-mesh has no figures at {size} bytes"
        return out
    out["memcpy_GBps"] = ours["memcpy_GBps"]
    moon = res.get("mooncake", {})
    if moon.get("status") == "ok":
        for mode, mres in moon["modes"].items():
            theirs = _at(mres["sizes"], size)
            if theirs is None:
                continue
            best_put = max(theirs["put_batch_GBps"], theirs["put_from_GBps"])
            best_get = max(theirs["get_batch_GBps"], theirs["get_into_GBps"])
            out[f"mooncake_{mode}"] = {
                "best_put_GBps": best_put,
                "best_get_GBps": best_get,
                "put_x": round(ours["put_GBps"] / best_put, 2),
                "get_x": round(ours["get_GBps"] / best_get, 2),
                "lookup_p50_x": round(mres["is_exist64_p50_us"] / memkv["lookup64_p50_us"], 2),
            }
    red = res.get("redis", {})
    if red.get("status") == "ok" and red["via"]:
        found = [e for e in (_at(v["sizes"], size) for v in red["via"].values()) if e is not None]
        if found:
            best_set = max(e["set_GBps"] for e in found)
            best_get = max(e["get_GBps"] for e in found)
            best_exists = min(v["exists64_p50_us"] for v in red["via"].values())
            out["redis"] = {
                "best_set_GBps": best_set,
                "best_get_GBps": best_get,
                "put_x": round(ours["put_GBps"] / best_set, 2),
                "get_x": round(ours["get_GBps"] / best_get, 2),
                "best_exists64_p50_us": best_exists,
                "lookup_p50_x": round(best_exists / memkv["lookup64_p50_us"], 2),
            }
    return out


def _targets(res: dict[str, Any], ratios: dict[str, Any]) -> dict[str, Any]:
    memkv = res.get("memkv", {})
    out: dict[str, Any] = {}
    if memkv.get("status") == "ok":
        out[f"lookup64_p50_le_{TARGET_LOOKUP_P50_US:g}us"] = (
            memkv["lookup64_p50_us"] <= TARGET_LOOKUP_P50_US
        )
        out[f"lookup64_p99_le_{TARGET_LOOKUP_P99_US:g}us"] = (
            memkv["lookup64_p99_us"] <= TARGET_LOOKUP_P99_US
        )
    tcp = ratios.get("mooncake_tcp")
    if tcp is not None:
        out[f"get_ge_{TARGET_GET_X:g}x_mooncake_tcp"] = tcp["get_x"] >= TARGET_GET_X
        out[f"put_ge_{TARGET_PUT_X:g}x_mooncake_tcp"] = tcp["put_x"] >= TARGET_PUT_X
    return out


# ---------------------------------------------------------------------------------------- CLI


def _parse_sizes(parser: argparse.ArgumentParser, raw: Sequence[str]) -> list[int]:
    sizes: list[int] = []
    for part in ",".join(raw).split(","):
        if not part.strip():
            continue
        try:
            size = int(part)
        except ValueError:
            parser.error(f"--sizes: {part!r} is not a whole number of bytes")
        if not 1 <= size <= 1 << 30:
            parser.error(f"--sizes: {size} is out of range (1 byte to 1 GiB)")
        sizes.append(size)
    if not sizes:
        parser.error("--sizes: give at least one block size")
    return sizes


def _parse_choices(
    parser: argparse.ArgumentParser, flag: str, raw: str, allowed: Sequence[str]
) -> list[str]:
    picked = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [x for x in picked if x not in allowed]
    if bad or not picked:
        parser.error(f"{flag}: {','.join(bad) or 'nothing'} is not one of {','.join(allowed)}")
    return picked


def _print_table(res: dict[str, Any]) -> None:
    memkv, red, moon = res["memkv"], res["redis"], res["mooncake"]
    print(f"{'size':>9}  {'system':<44} {'put GB/s':>9} {'get GB/s':>9}")
    for size in res["sizes"]:
        rows: list[tuple[str, float | None, float | None]] = []
        ours = _at(memkv.get("sizes", []), size) if memkv.get("status") == "ok" else None
        if ours is not None:
            rows.append(("memkv-mesh put_many/get_many_into", ours["put_GBps"], ours["get_GBps"]))
            rows.append(("numpy memcpy (ceiling)", ours["memcpy_GBps"], None))
        if red.get("status") == "ok":
            for via, v in red["via"].items():
                e = _at(v["sizes"], size)
                if e is not None:
                    rows.append((f"redis ({via}) pipelined SET/GET", e["set_GBps"], e["get_GBps"]))
        if moon.get("status") == "ok":
            for mode, m in moon["modes"].items():
                e = _at(m["sizes"], size)
                if e is not None:
                    rows.append(
                        (
                            f"mooncake {mode} put_batch/get_batch",
                            e["put_batch_GBps"],
                            e["get_batch_GBps"],
                        )
                    )
                    rows.append(
                        (
                            f"mooncake {mode} batch_put_from/get_into",
                            e["put_from_GBps"],
                            e["get_into_GBps"],
                        )
                    )
        for i, (name, put, get) in enumerate(rows):
            label = str(size) if i == 0 else ""
            put_s = f"{put:9.2f}" if put is not None else f"{'':9}"
            get_s = f"{get:9.2f}" if get is not None else f"{'':9}"
            print(f"{label:>9}  {name:<44} {put_s} {get_s}")
    print()
    print(f"lookup of {LOOKUP_KEYS} keys (p50 / p99 us):")
    if memkv.get("status") == "ok":
        print(
            f"  {'memkv-mesh lookup':<36} {memkv['lookup64_p50_us']:>8} / {memkv['lookup64_p99_us']}"
        )
    if red.get("status") == "ok":
        for via, v in red["via"].items():
            print(
                f"  {f'redis ({via}) EXISTS':<36} {v['exists64_p50_us']:>8} / {v['exists64_p99_us']}"
            )
    if moon.get("status") == "ok":
        for mode, m in moon["modes"].items():
            print(
                f"  {f'mooncake {mode} batch_is_exist':<36} {m['is_exist64_p50_us']:>8} / {m['is_exist64_p99_us']}"
            )
    for name in ("memkv", "redis", "mooncake"):
        a = res[name]
        if a.get("status") != "ok":
            print(f"{name}: {a.get('status')}: {a.get('reason')}")
            if a.get("logs"):
                print(a["logs"])
    if moon.get("status") == "ok":
        nets = {m.get("network") for m in moon["modes"].values()}
        print(f"mooncake ran on: {'; '.join(sorted(n for n in nets if n))}")
    rat = res["ratios"]
    print()
    print(
        f"ratios memkv-mesh / anchor at {rat['size']} bytes (anchor's fastest API and transport):"
    )
    for key in ("mooncake_tcp", "mooncake_shm", "mooncake_colocated", "redis"):
        if key in rat:
            r = rat[key]
            print(
                f"  vs {key:<20} put {r['put_x']:>6.2f}x  get {r['get_x']:>6.2f}x  lookup p50 {r['lookup_p50_x']:>6.2f}x"
            )
    if "note" in rat:
        print(f"  {rat['note']}")
    for name, ok in res["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if res["repeat"] > 1:
        print(f"(per-figure medians of {res['repeat']} runs)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="memkv-mesh bench anchors",
        description="Measure memkv-mesh, Redis and Mooncake Store side by side in one run (same sizes, batches of 16).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=[",".join(map(str, SIZES))],
        help="block sizes in bytes (comma- or space-separated)",
    )
    p.add_argument(
        "--only",
        choices=("redis", "mooncake"),
        default=None,
        help="run memkv-mesh and only this anchor",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=1 << 30,
        help="bytes moved per size, direction and system (default 1 GiB)",
    )
    p.add_argument(
        "--lookups",
        type=int,
        default=3000,
        help="timed lookups of 64 keys per system (default 3000)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="run everything N times and report per-figure medians"
    )
    p.add_argument(
        "--redis-via",
        default=",".join(REDIS_VIAS),
        help="redis transports: unix,tcp (default both)",
    )
    p.add_argument(
        "--mooncake-modes",
        default=",".join(MOONCAKE_MODES),
        help="mooncake modes: tcp,shm,colocated (default all)",
    )
    p.add_argument(
        "--ratio-size",
        type=int,
        default=RATIO_SIZE,
        help="block size the ratios and targets use (default 2 MiB)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one mooncake worker may run before it is killed",
    )
    p.add_argument(
        "--no-netns",
        action="store_true",
        help="run mooncake on the host network even if a private namespace is possible",
    )
    ns = p.parse_args(argv)
    sizes = _parse_sizes(p, ns.sizes)
    vias = _parse_choices(p, "--redis-via", ns.redis_via, REDIS_VIAS)
    modes = _parse_choices(p, "--mooncake-modes", ns.mooncake_modes, MOONCAKE_MODES)
    for flag, val, low in (
        ("--budget", ns.budget, 1),
        ("--lookups", ns.lookups, 10),
        ("--repeat", ns.repeat, 1),
        ("--timeout", ns.timeout, 1),
    ):
        if val < low:
            p.error(f"{flag}: {val} is below the minimum {low}")
    runs: list[dict[str, Any]] = []
    for i in range(ns.repeat):
        if ns.repeat > 1 and not ns.json:
            print(f"run {i + 1}/{ns.repeat} ...", file=sys.stderr, flush=True)
        run: dict[str, Any] = {"memkv": _run_memkv(sizes, ns.budget, ns.lookups)}
        skip = {"status": "skipped", "reason": "not selected (--only)"}
        run["redis"] = (
            _run_redis(sizes, ns.budget, ns.lookups, vias) if ns.only in (None, "redis") else skip
        )
        run["mooncake"] = (
            _run_mooncake(sizes, ns.budget, ns.lookups, modes, ns.timeout, not ns.no_netns)
            if ns.only in (None, "mooncake")
            else skip
        )
        runs.append(run)
    result: dict[str, Any] = {
        "sizes": sizes,
        "batch": BATCH,
        "budget_bytes": ns.budget,
        "repeat": ns.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": sys.platform,
        },
        **_merge_runs(runs),
    }
    result["ratios"] = _ratios(result, ns.ratio_size)
    result["targets"] = _targets(result, result["ratios"])
    if ns.repeat > 1:
        result["runs"] = runs
    if ns.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    failed = any(result[name].get("status") == "failed" for name in ("memkv", "redis", "mooncake"))
    return 1 if failed else 0
