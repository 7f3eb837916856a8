"""``memkv-mesh bench replay``: an engine-like client replays a trace through real daemons, and the
simulator predicts the same run.

It starts ``--gpu-nodes`` daemons of role ``gpu`` (DRAM only) and ``--flash-nodes`` of role
``flash`` (DRAM and NVMe) in subprocesses on loopback, one mesh key per run, and waits until every
daemon sees every other alive. Then ``--threads`` client threads replay the trace's requests in
order, as fast as the mesh answers (the trace's timestamps are not kept: the client computes
nothing, so there is no prefill to wait for). Request i goes to GPU node ``i % N`` (the
simulator's round-robin router) and does what an engine does:

1. ``lookup`` its block keys (32 bytes: blake2b of the trace's hash id, keyed with a per-run
   namespace): how many leading blocks the mesh holds;
2. ``get_many_into`` those blocks and check every byte against a pattern derived from the key
   (``block_patterns``); a wrong byte is counted, never ignored. The leading run of blocks
   received is the request's hits (a block the lookup promised but the get missed is a *stale
   lookup*, and the engine recomputes from there);
3. ``put_many`` the rest. A ``busy`` refusal (the daemon's back-pressure) is counted and retried
   after a short wait; any other error is counted.

``--kill flash-1@40% --restart flash-1@70%`` kill -9 a flash daemon when that share of the requests
has been issued and restart it on its own data dir (its NVMe blocks come back), so the moment is
the same in every run. After the replay, once replication has settled (the daemons' dirty or
queued counters at 0, or ``--settle-timeout-s``), every block that was put is read back through
each GPU node and checked byte for byte; what cannot be read back is counted.

The prediction: the simulator (``simulations.mesh.replay``) runs the same requests, issued at the
times this run issued them and put when this run's puts were acknowledged, on a cluster of the
same shape (DRAM and NVMe in blocks as the daemons report them, R, round-robin, the eviction
policy, an ideal network) with the daemon's write path modelled: dirty blocks pinned in DRAM,
the replication lag the daemons measured (or this client sampled), the directory delay measured
before the replay, the dirty bound. ``sim_instant_hit_ratio`` is the older model in which every
put is on its owners at once.

``--daemon-python``/``--daemon-src`` run the daemons from another checkout (a ``git worktree`` of
an older commit) with this client, for side-by-side throughput; their config then leaves out
every field an older daemon may not know.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memkv_mesh.spawn import toml_text, wait_serving

if TYPE_CHECKING:
    from memkv_mesh.client import Client
    from simulations.mesh.trace import Request

__all__ = [
    "Action",
    "block_key",
    "block_patterns",
    "build_parser",
    "main",
    "parse_action",
    "run_replay",
    "schedule",
    "wrong_bytes",
]

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = _REPO / "simulations" / "traces" / "conversation_trace.jsonl"
_MiB = 1 << 20
# Keys per read-back call, and the probes used to time the directory before the replay.
_READBACK_BATCH = 256
_DIRECTORY_PROBES = 5
# Every this many requests, the first block put is watched until R flash nodes hold it.
_LAG_SAMPLE_EVERY = 16
_LAG_SAMPLE_GIVE_UP_S = 30.0
_BUSY_WAIT_S = 0.005
_BUSY_GIVE_UP_S = 60.0


# ---- keys and block contents --------------------------------------------------------------------
def block_key(namespace: bytes, block_id: int) -> bytes:
    """The 32-byte key of a trace's block id in a run's namespace (blake2b keyed with it)."""
    return hashlib.blake2b(block_id.to_bytes(16, "little", signed=True), digest_size=32, key=namespace).digest()


_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)
_MIX3 = np.uint64(0x94D049BB133111EB)


def block_patterns(keys: Sequence[bytes], nbytes: int) -> np.ndarray:
    """The bytes each key's block must hold: a ``(len(keys), nbytes)`` uint8 array.

    Word j of a key's block is splitmix64 of (the key's first 8 bytes + j): it depends on the key
    and on the position, so a block of another key, or a shifted or torn one, does not match.
    One numpy expression for a whole batch: ~3 GB/s, far from the client's critical path.
    """
    words = (nbytes + 7) // 8
    seeds = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8").astype(np.uint64)
    x = np.arange(words, dtype=np.uint64)[None, :] + seeds[:, None]
    x *= _MIX1
    x ^= x >> np.uint64(30)
    x *= _MIX2
    x ^= x >> np.uint64(27)
    x *= _MIX3
    x ^= x >> np.uint64(31)
    return x.view(np.uint8).reshape(len(keys), words * 8)[:, :nbytes]


def wrong_bytes(keys: Sequence[bytes], blocks: np.ndarray) -> np.ndarray:
    """Per key, how many bytes of its row of ``blocks`` differ from its pattern."""
    expect = block_patterns(keys, blocks.shape[1])
    return np.count_nonzero(blocks != expect, axis=1)


# ---- kill / restart schedule ----------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """Kill -9 or restart a flash daemon once ``share`` of the requests has been issued."""

    what: str  # "kill" | "restart"
    node: str  # "flash-<i>"
    share: float  # 0..1

    def at_request(self, requests: int) -> int:
        """The index of the request before whose issue the action happens."""
        return min(requests, math.ceil(self.share * requests - 1e-9))


def parse_action(what: str, text: str, flash_nodes: int) -> Action:
    """``"flash-1@40%"`` (or ``@0.4``) -> Action; ValueError names what is wrong."""
    node, sep, when = text.partition("@")
    node = node.strip()
    if not sep or not node.startswith("flash-") or not node[6:].isdigit():
        raise ValueError(f"--{what} {text!r} must look like 'flash-1@40%'")
    idx = int(node[6:])
    if not 0 <= idx < flash_nodes:
        raise ValueError(f"--{what} {text!r}: there is no {node} (flash nodes are flash-0..flash-{flash_nodes - 1})")
    when = when.strip()
    try:
        share = float(when[:-1]) / 100.0 if when.endswith("%") else float(when)
    except ValueError:
        raise ValueError(f"--{what} {text!r}: the share must be a percentage like 40% or a fraction like 0.4") from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--{what} {text!r}: the share must be within 0%..100%")
    return Action(what, node, share)


def schedule(kills: Sequence[str], restarts: Sequence[str], flash_nodes: int) -> list[Action]:
    """The run's actions in the order they fire; a restart needs an earlier kill of its node and
    a node is killed again only after a restart."""
    acts = [parse_action("kill", k, flash_nodes) for k in kills]
    acts += [parse_action("restart", r, flash_nodes) for r in restarts]
    acts.sort(key=lambda a: (a.share, a.what == "kill"))  # at one moment: restart before kill
    down: set[str] = set()
    for a in acts:
        if a.what == "kill":
            if a.node in down:
                raise ValueError(f"--kill {a.node}@{a.share:.0%}: {a.node} is already down then")
            down.add(a.node)
        else:
            if a.node not in down:
                raise ValueError(f"--restart {a.node}@{a.share:.0%}: {a.node} is not killed before then")
            down.discard(a.node)
    return acts


# ---- the trace --------------------------------------------------------------------------------------
def load_requests(args: argparse.Namespace) -> tuple[list[Request], str]:
    from simulations.mesh.synthetic import SHAPES, generate
    from simulations.mesh.trace import read_mooncake

    if args.synthetic:
        reqs = generate(SHAPES[args.synthetic], sessions_per_s=args.sessions_per_s, duration_s=args.duration_s, seed=args.seed)
        name = f"synthetic:{args.synthetic}(rate={args.sessions_per_s},duration={args.duration_s},seed={args.seed})"
        reqs = reqs[: args.requests]
    else:
        reqs = read_mooncake(args.trace, max_requests=args.requests)
        name = str(args.trace)
    if not reqs:
        raise ValueError("the trace holds no requests")
    return reqs, name


def _unique(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ids))  # a put batch may not name a key twice


# ---- daemons ----------------------------------------------------------------------------------------
@dataclass
class _Daemon:
    name: str
    role: str
    dir: Path
    config: Path
    sock: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class _Cluster:
    """The run's daemons: started, watched, killed and restarted by name."""

    args: argparse.Namespace
    root: Path
    arena_root: Path
    key: str
    daemons: dict[str, _Daemon] = field(default_factory=dict)
    seed_addr: str = ""

    def config_tables(self, name: str, role: str, dram: int, nvme: int) -> dict[str, dict[str, Any]]:
        a = self.args
        d = self.root / name
        store: dict[str, Any] = {
            "dram_bytes": dram, "nvme_bytes": nvme, "max_block_bytes": a.block_bytes, "eviction": a.eviction,
        }  # fmt: skip
        mesh: dict[str, Any] = {"replicas": a.replicas}
        # The write-path fields exist only in daemons that have them: written only when asked for.
        if a.fsync is not None:
            store["fsync"] = a.fsync
        if a.ack is not None:
            mesh["ack"] = a.ack
        if a.dirty_bytes is not None:
            mesh["dirty_bytes"] = a.dirty_bytes
        if a.put_wait_s is not None:
            mesh["put_wait_s"] = a.put_wait_s
        return {
            "node": {
                "id": name, "role": role, "data_dir": str(d), "socket": str(d / "memkv.sock"),
                "arena_dir": str(self.arena_root),
            },
            "store": store,
            "metrics": {"enabled": False},
            "log": {"level": "warning", "format": "json"},
            "gossip": {"enabled": True, "bind": "127.0.0.1", "port": 0, "seeds": [self.seed_addr] if self.seed_addr else [],
                       "keys": [self.key]},
            "dataplane": {"transport": a.transport, "host": "127.0.0.1"},
            "mesh": mesh,
        }  # fmt: skip

    def add(self, name: str, role: str, dram: int, nvme: int) -> _Daemon:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "mesh.toml"
        cfg.write_text(toml_text(self.config_tables(name, role, dram, nvme)))
        dm = _Daemon(name, role, d, cfg, d / "memkv.sock", d / "daemon.log")
        self.daemons[name] = dm
        return dm

    def launch(self, dm: _Daemon) -> None:
        a = self.args
        env = dict(os.environ)
        cwd = None
        if a.daemon_src:
            src = str(Path(a.daemon_src).resolve())
            env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cwd = src
        with open(dm.log, "ab") as logf:
            dm.proc = subprocess.Popen(
                [a.daemon_python or sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(dm.config)],
                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            )  # fmt: skip

    def wait_ready(self, dm: _Daemon, timeout: float = 60.0) -> None:
        assert dm.proc is not None
        wait_serving(dm.proc, dm.sock, timeout=timeout, what=f"daemon {dm.name}", log=dm.log)

    def client(self, name: str, timeout: float = 60.0) -> Client:
        from memkv_mesh.client import Client

        return Client(self.daemons[name].sock, timeout=timeout)

    def kill(self, name: str) -> None:
        dm = self.daemons[name]
        if dm.proc is not None and dm.proc.poll() is None:
            dm.proc.send_signal(signal.SIGKILL)
            dm.proc.wait(30)

    def stop_all(self) -> None:
        # kill -9: a graceful stop would hand every owned block on first (minutes for a big
        # replay), and the run's directories are removed afterwards anyway.
        for dm in self.daemons.values():
            if dm.proc is not None and dm.proc.poll() is None:
                dm.proc.send_signal(signal.SIGKILL)
        for dm in self.daemons.values():
            if dm.proc is not None:
                try:
                    dm.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass


def _member_states(c: Client) -> dict[str, str]:
    return {str(m["node_id"]): str(m["state"]) for m in c.members()}


def _wait_all_alive(cluster: _Cluster, timeout: float) -> float:
    names = set(cluster.daemons)
    t0 = time.monotonic()
    deadline = t0 + timeout
    pending = set(names)
    while pending:
        for n in list(pending):
            with cluster.client(n) as c:
                st = _member_states(c)
            if all(st.get(m) == "alive" for m in names):
                pending.discard(n)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemons {sorted(pending)} did not see all {len(names)} members alive within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def _directory_delay(cluster: _Cluster, gpus: list[str], block_bytes: int) -> float | None:
    """Median seconds from a put on one GPU node until another GPU node's lookup sees it."""
    if len(gpus) < 2:
        return None
    out = []
    with cluster.client(gpus[0]) as a, cluster.client(gpus[1]) as b:
        for _ in range(_DIRECTORY_PROBES):
            k = os.urandom(32)
            a.put_many([k], [block_patterns([k], block_bytes)[0]])
            t0 = time.perf_counter()
            while b.lookup([k]) < 1:
                if time.perf_counter() - t0 > 10:
                    return None
                time.sleep(0.002)
            out.append(time.perf_counter() - t0)
            time.sleep(0.05)
    return float(np.median(out))


# ---- the replay ---------------------------------------------------------------------------------------
@dataclass
class _Shared:
    """What the client threads share; every counter is changed under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    next_i: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    put_keys: set[int] = field(default_factory=set)  # block ids put (acknowledged)


@dataclass
class _Run:
    """What one replay measured, per request in request order (seconds from its start)."""

    wall_s: float
    issued: np.ndarray  # when the lookup went out
    put_done: np.ndarray  # when the put was acknowledged (or the request ended)
    latency: np.ndarray
    shared: _Shared
    sampler: _LagSampler | None


def _percentile_ms(x: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(x, q)) * 1e3, 3) if len(x) else None


class _LagSampler:
    """Client-side replication lag: how long after a put's acknowledgement R flash nodes hold
    one of its blocks (every ``_LAG_SAMPLE_EVERY``-th request), by polling their ``contains``."""

    def __init__(self, cluster: _Cluster, flash: list[str], replicas: int, t0: float) -> None:
        self.cluster = cluster
        self.flash = flash
        self.need = min(replicas, len(flash))
        self.t0 = t0
        self.lock = threading.Lock()
        self.incoming: list[tuple[bytes, float]] = []
        self.lags: list[float] = []
        self.never = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)

    def add(self, key: bytes, t_ack: float) -> None:
        with self.lock:
            self.incoming.append((key, t_ack))

    def _run(self) -> None:
        from memkv_mesh.client import MemkvError

        pending: dict[bytes, float] = {}
        clients: dict[str, Client | None] = {}
        while not (self.stop.is_set() and not pending and not self.incoming):
            with self.lock:
                pending.update(self.incoming)
                self.incoming.clear()
            if pending:
                keys = list(pending)
                held = np.zeros(len(keys), dtype=np.int64)
                for n in self.flash:
                    c = clients.get(n)
                    try:
                        if c is None:
                            c = clients[n] = self.cluster.client(n, timeout=5)
                        held += np.array(c.contains(keys), dtype=np.int64)
                    except (ConnectionError, MemkvError, OSError):
                        if c is not None:
                            c.close()
                        clients[n] = None  # down (killed) or restarting: try again next round
                now = time.perf_counter() - self.t0
                for k, h in zip(keys, held.tolist(), strict=True):
                    if h >= self.need:
                        self.lags.append(now - pending.pop(k))
                    elif now - pending[k] > _LAG_SAMPLE_GIVE_UP_S or self.stop.is_set() and now - pending[k] > 5:
                        pending.pop(k)
                        self.never += 1
            time.sleep(0.02)
        for c in clients.values():
            if c is not None:
                c.close()

    def summary(self) -> dict[str, Any]:
        lags = np.array(self.lags)
        return {
            "samples": len(self.lags) + self.never,
            "p50_s": round(float(np.percentile(lags, 50)), 4) if len(lags) else None,
            "p99_s": round(float(np.percentile(lags, 99)), 4) if len(lags) else None,
            "not_replicated": self.never,
        }


class _Watcher:
    """After a kill or restart: when a GPU node's view marks the node dead, or alive again."""

    def __init__(self, cluster: _Cluster, observer: str, node: str, want: str, t0: float, sink: dict[str, Any]) -> None:
        self.args = (cluster, observer, node, want, t0, sink)
        self.thread = threading.Thread(target=self._run, name=f"watch-{node}-{want}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cluster, observer, node, want, t0, sink = self.args
        deadline = time.monotonic() + 120
        try:
            if want == "alive":  # a restart: the daemon first has to answer at all
                cluster.wait_ready(cluster.daemons[node], timeout=120)
            with cluster.client(observer, timeout=10) as c:
                while time.monotonic() < deadline:
                    st = _member_states(c).get(node)
                    ok = st == "alive" if want == "alive" else st in (None, "dead", "left")
                    if ok:
                        sink[f"t_{want}_s"] = round(time.perf_counter() - t0, 4)
                        return
                    time.sleep(0.05)
        except Exception as e:  # reported in the JSON, never fatal to the replay
            sink[f"{want}_error"] = f"{type(e).__name__}: {e}"


def _replay(
    args: argparse.Namespace, cluster: _Cluster, gpus: list[str], flash: list[str],
    reqs: list[Request], keys: list[list[bytes]], ids: list[list[int]], actions: list[Action],
) -> _Run:  # fmt: skip
    from memkv_mesh.client import MemkvError

    n = len(reqs)
    sh = _Shared()
    issued = np.zeros(n)
    put_done = np.zeros(n)
    latency = np.zeros(n)
    acts = sorted(actions, key=lambda a: a.at_request(n))
    t0 = time.perf_counter()
    sampler = _LagSampler(cluster, flash, args.replicas, t0) if flash else None
    if sampler is not None:
        sampler.thread.start()
    watchers: list[_Watcher] = []
    bb = args.block_bytes
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="replay", unit="req", file=sys.stderr, mininterval=0.5, leave=False)

    def fire(a: Action, i: int) -> None:
        t = time.perf_counter() - t0
        ev: dict[str, Any] = {"action": a.what, "node": a.node, "share": a.share, "request": i, "t_s": round(t, 4)}
        if a.what == "kill":
            cluster.kill(a.node)
            watchers.append(_Watcher(cluster, gpus[0], a.node, "dead", t0, ev))
        else:
            cluster.launch(cluster.daemons[a.node])  # same config, same data dir: its NVMe comes back
            watchers.append(_Watcher(cluster, gpus[0], a.node, "alive", t0, ev))
        sh.events.append(ev)

    def take() -> int:
        with sh.lock:
            i = sh.next_i
            if i >= n:
                return -1
            sh.next_i += 1
            while acts and acts[0].at_request(n) <= i:
                fire(acts.pop(0), i)
            return i

    def worker() -> None:
        clients: dict[str, Client] = {}
        buf = np.empty(0, dtype=np.uint8)
        local: Counter[str] = Counter()
        errs: Counter[str] = Counter()
        put_ids: list[int] = []
        try:
            while True:
                i = take()
                if i < 0:
                    break
                node = gpus[i % len(gpus)]
                c = clients.get(node)
                if c is None:
                    c = clients[node] = cluster.client(node)
                ks = keys[i]
                t_start = time.perf_counter()
                issued[i] = t_start - t0
                local["refs"] += len(ks)
                try:
                    promised = c.lookup(ks)
                except (MemkvError, ConnectionError) as e:
                    errs[f"lookup:{getattr(e, 'code', type(e).__name__)}"] += 1
                    promised = 0
                got_n = 0
                if promised:
                    if buf.nbytes < promised * bb:
                        buf = np.empty(promised * bb, dtype=np.uint8)
                    views = [buf[j * bb : (j + 1) * bb] for j in range(promised)]
                    try:
                        got = c.get_many_into(ks[:promised], views)
                    except (MemkvError, ConnectionError) as e:
                        errs[f"get:{getattr(e, 'code', type(e).__name__)}"] += 1
                        got = [None] * promised
                    present = [j for j, g in enumerate(got) if g is not None]
                    bad_len = sum(1 for j in present if got[j] != bb)
                    if present:
                        rows = buf[: promised * bb].reshape(promised, bb)[present]
                        wrong = wrong_bytes([ks[j] for j in present], rows)
                        local["wrong_blocks"] += int(np.count_nonzero(wrong)) + bad_len
                        local["wrong_bytes"] += int(wrong.sum())
                    while got_n < promised and got[got_n] == bb:
                        got_n += 1
                    local["received_blocks"] += len(present)
                    local["stale_lookups"] += promised - got_n
                local["lookup_blocks"] += promised
                local["hits"] += got_n
                rest = ks[got_n:]
                if rest:
                    vals = block_patterns(rest, bb)
                    give_up = time.monotonic() + _BUSY_GIVE_UP_S
                    while True:
                        try:
                            c.put_many(rest, list(vals))
                            put_ids.extend(ids[i][got_n:])
                            break
                        except MemkvError as e:
                            if e.code == "busy" and time.monotonic() < give_up:
                                local["busy_waits"] += 1
                                time.sleep(_BUSY_WAIT_S)
                                continue
                            errs[f"put:{e.code}"] += 1
                            break
                        except ConnectionError as e:
                            errs[f"put:{type(e).__name__}"] += 1
                            break
                    if sampler is not None and i % _LAG_SAMPLE_EVERY == 0:
                        sampler.add(rest[0], time.perf_counter() - t0)
                t_end = time.perf_counter()
                put_done[i] = t_end - t0
                latency[i] = t_end - t_start
                if bar is not None:
                    bar.update(1)
        finally:
            for c in clients.values():
                c.close()
            with sh.lock:
                sh.counts.update(local)
                sh.errors.update(errs)
                sh.put_keys.update(put_ids)

    threads = [threading.Thread(target=worker, name=f"client-{t}") for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    for a in acts:  # an action at 100%: after the last request
        fire(a, n)
    for w in watchers:
        w.thread.join(130)
    if sampler is not None:
        sampler.stop.set()
    return _Run(wall, issued, put_done, latency, sh, sampler)


def _cpu_seconds(cluster: _Cluster) -> dict[str, tuple[int, float]]:
    """(pid, user + system CPU seconds) of each running daemon (``/proc``) and of this client."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[int, float]] = {}
    for name, dm in cluster.daemons.items():
        if dm.proc is None or not dm.running:
            continue
        try:
            fields = Path(f"/proc/{dm.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (dm.proc.pid, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    t = os.times()
    out["client"] = (os.getpid(), t.user + t.system)
    return out


def _cpu_spent(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> dict[str, float]:
    """CPU seconds between two snapshots; a daemon restarted meanwhile counts from its restart."""
    out = {}
    for name, (pid, secs) in after.items():
        pid0, secs0 = before.get(name, (-1, 0.0))
        out[name] = round(secs - secs0 if pid == pid0 else secs, 2)
    return out


def _mesh_stats(cluster: _Cluster) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, dm in cluster.daemons.items():
        if not dm.running:
            continue
        try:
            with cluster.client(name, timeout=10) as c:
                out[name] = c.stats()
        except (ConnectionError, OSError):
            pass
    return out


def _settle(cluster: _Cluster, gpus: list[str], timeout: float) -> tuple[bool, float]:
    """Wait until the GPU nodes have nothing left to replicate: their dirty counters at 0 (or,
    for daemons without one, an empty replication queue and no replication for 1 s)."""
    t0 = time.monotonic()
    last: dict[str, int] = {}
    quiet_since = time.monotonic()
    while True:
        st = _mesh_stats(cluster)
        busy = False
        for g in gpus:
            m = st.get(g, {}).get("mesh", {})
            if "dirty_blocks" in m:
                busy |= m["dirty_blocks"] > 0
            else:
                busy |= m.get("replication_queued", 0) > 0
                done = int(m.get("replicated", 0)) + int(m.get("replication_failures", 0))
                if last.get(g) != done:
                    last[g] = done
                    quiet_since = time.monotonic()
                busy |= time.monotonic() - quiet_since < 1.0
        if not busy:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0
        time.sleep(0.2)


def _read_back(cluster: _Cluster, node: str, keys: list[bytes], bb: int, out: dict[str, Any]) -> None:
    from memkv_mesh.client import MemkvError

    missing: list[int] = []
    wrong = wrong_b = errors = 0
    buf = np.empty(_READBACK_BATCH * bb, dtype=np.uint8)
    with cluster.client(node) as c:
        for lo in range(0, len(keys), _READBACK_BATCH):
            ks = keys[lo : lo + _READBACK_BATCH]
            views = [buf[j * bb : (j + 1) * bb] for j in range(len(ks))]
            try:
                got = c.get_many_into(ks, views)
            except (MemkvError, ConnectionError):
                errors += 1
                missing.extend(range(lo, lo + len(ks)))
                continue
            present = [j for j, g in enumerate(got) if g is not None]
            missing.extend(lo + j for j, g in enumerate(got) if g is None)
            if present:
                w = wrong_bytes([ks[j] for j in present], buf[: len(ks) * bb].reshape(len(ks), bb)[present])
                wrong += int(np.count_nonzero(w)) + sum(1 for j in present if got[j] != bb)
                wrong_b += int(w.sum())
    out[node] = {"missing": missing, "wrong_blocks": wrong, "wrong_bytes": wrong_b, "errors": errors}


def _git_commit(src: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "memkv_mesh", "transport", "gossip"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def _node_summary(name: str, st: dict[str, Any]) -> dict[str, Any]:
    m = st.get("mesh", {})
    s = st.get("store", {})
    fields = (
        "replicated", "replication_failures", "replication_dropped", "replication_queued", "fetched",
        "fetch_misses", "fetch_errors", "repaired", "dirty_blocks", "dirty_bytes", "dirty_peak_bytes",
        "backpressure_waits", "busy_rejections", "replication_lag_p50_s", "replication_lag_p99_s",
    )  # fmt: skip
    out: dict[str, Any] = {"node": name, "role": st.get("role")}
    out.update({f: m.get(f) for f in fields})
    out.update({f"store_{f}": s.get(f) for f in ("dram_blocks", "nvme_blocks", "puts", "hits_dram", "hits_nvme", "misses", "dram_drops")})
    return out


def _sum_field(nodes: list[dict[str, Any]], f: str) -> int | None:
    vals = [x[f] for x in nodes if x.get(f) is not None]
    return int(sum(vals)) if vals else None


def _max_field(nodes: list[dict[str, Any]], f: str) -> float | None:
    vals = [x[f] for x in nodes if x.get(f) is not None]
    return max(vals) if vals else None


def _size_or_share(given: int | None, share: float, working_set: int, floor: int) -> int:
    if given is not None:
        return given
    return max(floor, int(share * working_set) // _MiB * _MiB)


def _start(cluster: _Cluster, gpus: list[str], flash: list[str], dram: int, flash_dram: int, nvme: int) -> float:
    """gpu-0 first (every other daemon joins through it), then the rest at once; returns the
    seconds until every daemon saw every other alive."""
    first = cluster.add(gpus[0], "gpu", dram, 0)
    cluster.launch(first)
    cluster.wait_ready(first)
    with cluster.client(first.name) as c:
        cluster.seed_addr = str(c.stats()["gossip_addr"])
    rest = [cluster.add(g, "gpu", dram, 0) for g in gpus[1:]]
    rest += [cluster.add(f, "flash", flash_dram, nvme) for f in flash]
    for dm in rest:
        cluster.launch(dm)
    for dm in rest:
        cluster.wait_ready(dm)
    return _wait_all_alive(cluster, 60)


def _failures(events: list[dict[str, Any]]) -> list[Any]:
    """The simulator's failures from the replay's kills, with the detection and rejoin times
    the watchers measured (never, when they did not see it)."""
    from simulations.mesh.engine import FailureEvent

    out = []
    for ev in events:
        if ev["action"] != "kill":
            continue
        restart = next(
            (r for r in events if r["action"] == "restart" and r["node"] == ev["node"] and r["t_s"] >= ev["t_s"]), None
        )
        out.append(FailureEvent(
            int(ev["node"][6:]), ev["t_s"], ev.get("t_dead_s", math.inf),
            restart.get("t_alive_s", math.inf) if restart is not None else math.inf,
        ))  # fmt: skip
    return out


def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    """Start the daemons, replay, read back, predict; the JSON-able result."""
    from simulations.mesh.replay import predict_replay, replay_spec

    reqs, trace_name = load_requests(args)
    ids = [_unique(r.blocks) for r in reqs]
    unique = len({b for x in ids for b in x})
    refs = sum(len(x) for x in ids)
    bb = args.block_bytes
    ws = unique * bb
    floor = max(4 * _MiB, -(-bb // _MiB) * _MiB)
    dram = _size_or_share(args.dram_bytes, args.dram_share, ws, floor)
    flash_dram = args.flash_dram_bytes if args.flash_dram_bytes is not None else dram
    nvme = _size_or_share(args.nvme_bytes, args.nvme_share, ws, floor)
    actions = schedule(args.kill or [], args.restart or [], args.flash_nodes)
    namespace = os.urandom(16)
    keys = [[block_key(namespace, b) for b in x] for x in ids]
    key_of = {b: k for x, kx in zip(ids, keys, strict=True) for b, k in zip(x, kx, strict=True)}
    gpus = [f"gpu-{i}" for i in range(args.gpu_nodes)]
    flash = [f"flash-{i}" for i in range(args.flash_nodes)]
    mesh_key = base64.b64encode(os.urandom(32)).decode()
    daemon_src = Path(args.daemon_src).resolve() if args.daemon_src else _REPO
    config = {
        "trace": trace_name, "requests": len(reqs), "gpu_nodes": args.gpu_nodes, "flash_nodes": args.flash_nodes,
        "block_bytes": bb, "dram_bytes": dram, "flash_dram_bytes": flash_dram, "nvme_bytes": nvme,
        "dram_share": round(dram / ws, 4), "nvme_share": round(nvme / ws, 4), "replicas": args.replicas,
        "transport": args.transport, "threads": args.threads, "eviction": args.eviction, "ack": args.ack,
        "fsync": args.fsync, "dirty_bytes": args.dirty_bytes, "put_wait_s": args.put_wait_s,
        "kill": args.kill or [], "restart": args.restart or [], "namespace": namespace.hex(),
        "daemon_python": args.daemon_python or sys.executable, "daemon_src": str(daemon_src),
        "daemon_commit": _git_commit(daemon_src), "client_commit": _git_commit(_REPO),
    }  # fmt: skip
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="memkv-replay-", dir=args.work_dir))
    arena_root = Path(tempfile.mkdtemp(prefix="memkv-replay-", dir=args.arena_dir))
    cluster = _Cluster(args, root, arena_root, mesh_key)
    try:
        join_s = _start(cluster, gpus, flash, dram, flash_dram, nvme)
        dir_delay = _directory_delay(cluster, gpus, bb)
        st0 = _mesh_stats(cluster)
        cpu0 = _cpu_seconds(cluster)
        run = _replay(args, cluster, gpus, flash, reqs, keys, ids, actions)
        st_replay = _mesh_stats(cluster)
        cpu1 = _cpu_seconds(cluster)
        settled, settle_s = _settle(cluster, gpus, args.settle_timeout_s)
        st_end = _mesh_stats(cluster)
        sampler = run.sampler
        if sampler is not None:
            sampler.thread.join(60)
        sh = run.shared
        put_ids = sorted(sh.put_keys)
        put_keys = [key_of[b] for b in put_ids]
        t_rb = time.perf_counter()
        rb: dict[str, Any] = {}
        rb_threads = [threading.Thread(target=_read_back, args=(cluster, g, put_keys, bb, rb)) for g in gpus if args.readback]
        for t in rb_threads:
            t.start()
        for t in rb_threads:
            t.join()
        readback_s = time.perf_counter() - t_rb
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(arena_root, ignore_errors=True)
    load_after = os.getloadavg()[0]

    # ---- figures ----
    counts = sh.counts
    lat = run.latency
    nodes = [_node_summary(n, st_end.get(n) or st_replay.get(n) or {}) for n in cluster.daemons]
    gpu_nodes = [x for x in nodes if x["node"] in gpus]
    lag_p50 = [x["replication_lag_p50_s"] for x in gpu_nodes if x.get("replication_lag_p50_s") is not None]
    client_lag = sampler.summary() if sampler is not None else None
    if lag_p50:
        lag, lag_from = float(np.mean(lag_p50)), "daemon replication_lag_p50_s"
    elif client_lag and client_lag["p50_s"] is not None:
        lag, lag_from = float(client_lag["p50_s"]), "client sampler p50"
    else:
        lag, lag_from = 0.0, "none measured"
    if args.ack == "replicated":
        # The put's acknowledgement (the simulator's put time) already waited for the owners.
        lag, lag_from = 0.0, "none: with ack = replicated the measured put times include replication"
    g0 = st_end.get(gpus[0]) or st_replay.get(gpus[0]) or st0.get(gpus[0]) or {}
    dram_blocks = int(g0.get("store", {}).get("dram_capacity_bytes", dram)) // bb
    f0 = (st_end.get(flash[0]) or st0.get(flash[0]) or {}) if flash else {}
    nvme_blocks = int(f0.get("store", {}).get("nvme_capacity_bytes", nvme)) // bb if flash else 0
    dirty_limit = g0.get("mesh", {}).get("dirty_limit_bytes")
    dirty_blocks = None
    if args.dirty_bytes:
        dirty_blocks = max(1, args.dirty_bytes // bb)
    elif dirty_limit:
        dirty_blocks = max(1, int(dirty_limit) // bb)
    failures = _failures(sh.events)
    sim_args = {
        "gpu_nodes": args.gpu_nodes, "flash_nodes": args.flash_nodes, "dram_blocks": dram_blocks,
        "nvme_blocks": nvme_blocks, "replicas": args.replicas, "block_bytes": bb, "eviction": args.eviction,
    }  # fmt: skip
    t_sim = time.perf_counter()
    pred = predict_replay(
        replay_spec(**sim_args, write_path="async", replication_lag_s=lag,
                    directory_delay_s=dir_delay if dir_delay is not None else 0.14, dirty_blocks=dirty_blocks),
        reqs, run.issued.tolist(), put_s=run.put_done.tolist(), failures=failures,
    )  # fmt: skip
    pred_instant = predict_replay(replay_spec(**sim_args, write_path="instant"), reqs, run.issued.tolist(), failures=failures)
    sim_s = time.perf_counter() - t_sim
    hits = counts["hits"]
    missing_any: set[int] = set()
    for r in rb.values():
        missing_any.update(r["missing"])
    wrong_blocks = counts["wrong_blocks"] + sum(r["wrong_blocks"] for r in rb.values())
    wrong_b = counts["wrong_bytes"] + sum(r["wrong_bytes"] for r in rb.values())
    errors = dict(sh.errors)
    for g, r in rb.items():
        if r["errors"]:
            errors[f"readback:{g}"] = r["errors"]
    # Blocks the GPU nodes fetched from the mesh during the replay (their replication reads
    # count as DRAM hits in the store's counters, so local hits are what is left).
    fetched = sum(
        int(st_replay.get(g, {}).get("mesh", {}).get("fetched", 0)) - int(st0.get(g, {}).get("mesh", {}).get("fetched", 0))
        for g in gpus
    )  # fmt: skip
    refs_n = counts["refs"]
    return {
        "requests": len(reqs),
        "requests_per_s": round(len(reqs) / run.wall_s, 2),
        "wall_s": round(run.wall_s, 3),
        "request_p50_ms": _percentile_ms(lat, 50),
        "request_p99_ms": _percentile_ms(lat, 99),
        "hit_ratio": round(hits / refs_n, 4) if refs_n else 0.0,
        "local_hit_ratio": round(max(0, hits - fetched) / refs_n, 4) if refs_n else 0.0,
        "mesh_hit_ratio": round(min(fetched, hits) / refs_n, 4) if refs_n else 0.0,
        "sim_hit_ratio": round(pred.hit_ratio, 4),
        "sim_instant_hit_ratio": round(pred_instant.hit_ratio, 4),
        "hit_ratio_minus_sim": round(hits / refs_n - pred.hit_ratio, 4) if refs_n else None,
        "block_refs": refs_n,
        "hits": hits,
        "lookup_blocks": counts["lookup_blocks"],
        "stale_lookups": counts["stale_lookups"],
        "blocks_put": len(put_ids),
        "unreadable_blocks": len(missing_any) if args.readback else None,
        "unreadable_per_node": {g: len(r["missing"]) for g, r in rb.items()},
        "sim_unreadable_blocks": pred.blocks_held_nowhere,
        "wrong_blocks": wrong_blocks,
        "wrong_bytes": wrong_b,
        "errors": errors,
        "errors_total": sum(errors.values()),
        "busy_waits": counts["busy_waits"],
        "backpressure_waits": _sum_field(gpu_nodes, "backpressure_waits"),
        "busy_rejections": _sum_field(gpu_nodes, "busy_rejections"),
        "dirty_peak_bytes": _max_field(gpu_nodes, "dirty_peak_bytes"),
        "replication_lag_p50_s": _max_field(gpu_nodes, "replication_lag_p50_s"),
        "replication_lag_p99_s": _max_field(gpu_nodes, "replication_lag_p99_s"),
        "client_replication_lag": client_lag,
        "directory_delay_s": None if dir_delay is None else round(dir_delay, 4),
        "settled": settled,
        "settle_s": round(settle_s, 3),
        "readback_s": round(readback_s, 3),
        "join_s": round(join_s, 3),
        # CPU seconds each process spent during the replay (a restarted daemon: since its restart).
        "cpu_s": _cpu_spent(cpu0, cpu1),
        "sim": {
            **{k: v for k, v in _builtins(pred).items() if k != "spec"},
            "spec": pred.spec, "replication_lag_from": lag_from, "wall_s": round(sim_s, 3),
        },  # fmt: skip
        "events": sh.events,
        "nodes": nodes,
        "trace": {"name": trace_name, "requests": len(reqs), "block_refs": refs, "unique_blocks": unique, "working_set_bytes": ws},
        "machine": {
            "cores": os.cpu_count(), "loadavg_before": round(load_before, 2), "loadavg_after": round(load_after, 2),
            "python": platform.python_version(), "platform": platform.platform(),
        },  # fmt: skip
        "config": config,
    }


def _builtins(obj: Any) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(obj)
    return out


# ---- command line ---------------------------------------------------------------------------------
def _byte_size(text: str) -> int:
    from memkv_mesh.config import parse_byte_size

    try:
        return parse_byte_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memkv-mesh bench replay", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("requests")
    src.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format JSONL trace (default: the conversation trace)")
    src.add_argument("--synthetic", choices=["chat", "agentic"], help="a synthetic trace instead (simulations/mesh/synthetic.py)")
    src.add_argument("--seed", type=int, default=0, help="synthetic: RNG seed")
    src.add_argument("--sessions-per-s", type=float, default=2.0, help="synthetic: session start rate")
    src.add_argument("--duration-s", type=float, default=600.0, help="synthetic: seconds of session starts")
    src.add_argument("--requests", type=int, default=3993, help="replay the first N requests (default 3993)")
    mesh = p.add_argument_group("mesh")
    mesh.add_argument("--gpu-nodes", type=int, default=2, help="daemons of role gpu, no NVMe (default 2)")
    mesh.add_argument("--flash-nodes", type=int, default=3, help="daemons of role flash, with NVMe (default 3)")
    mesh.add_argument("--block-bytes", type=_byte_size, default=16 * 1024, help="bytes per block (default 16KiB)")
    mesh.add_argument("--dram-bytes", type=_byte_size, help="DRAM per GPU node (overrides --dram-share)")
    mesh.add_argument("--dram-share", type=float, default=0.15,
                      help="DRAM per GPU node as a share of the working set, rounded down to a MiB (default 0.15)")
    mesh.add_argument("--flash-dram-bytes", type=_byte_size, help="DRAM per flash node (default: as a GPU node's)")
    mesh.add_argument("--nvme-bytes", type=_byte_size, help="NVMe per flash node (overrides --nvme-share)")
    mesh.add_argument("--nvme-share", type=float, default=1.5, help="NVMe per flash node as a share of the working set (default 1.5)")
    mesh.add_argument("-R", "--replicas", type=int, default=2, help="replicas per block (default 2)")
    mesh.add_argument("--transport", choices=["tcp", "ucx"], default="tcp", help="data plane (default tcp)")
    mesh.add_argument("--eviction", choices=["lru", "fifo"], default="lru", help="eviction policy of every tier (the simulator models lru and fifo)")
    wp = p.add_argument_group("daemon write path (written to the daemons' config only when given)")
    wp.add_argument("--ack", choices=["local", "replicated"], help="[mesh] ack")
    wp.add_argument("--fsync", choices=["off", "batch", "always"], help="[store] fsync")
    wp.add_argument("--dirty-bytes", type=_byte_size, help="[mesh] dirty_bytes (also the simulator's dirty bound)")
    wp.add_argument("--put-wait-s", type=float, help="[mesh] put_wait_s")
    run = p.add_argument_group("run")
    run.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    run.add_argument("--kill", action="append", metavar="flash-I@P%", help="kill -9 a flash daemon once P%% of the requests are issued (repeatable)")
    run.add_argument("--restart", action="append", metavar="flash-I@P%", help="restart a killed flash daemon on its data dir (repeatable)")
    run.add_argument("--settle-timeout-s", type=float, default=120.0, help="how long to wait for replication to settle before the read-back")
    run.add_argument("--daemon-python", help="python that runs the daemons (e.g. an older checkout's venv)")
    run.add_argument("--daemon-src", help="checkout whose memkv_mesh the daemons run (e.g. a git worktree of an older commit)")
    run.add_argument("--work-dir", default=None, help="where the daemons' data dirs and NVMe files go (default: the temp dir)")
    run.add_argument("--arena-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="where the DRAM arenas go")
    run.add_argument("--no-readback", dest="readback", action="store_false",
                     help="skip the read-back (for throughput runs; unreadable_blocks is then null)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.gpu_nodes < 1 or a.flash_nodes < 0:
        p.error("--gpu-nodes must be >= 1 and --flash-nodes >= 0")
    if a.requests < 1 or a.threads < 1 or a.replicas < 1:
        p.error("--requests, --threads and --replicas must be >= 1")
    if a.block_bytes < 8 or a.block_bytes % 8:
        p.error(f"--block-bytes must be a positive multiple of 8, got {a.block_bytes}")
    if not (0 < a.dram_share <= 64 and 0 < a.nvme_share <= 64):
        p.error("--dram-share and --nvme-share must be > 0")
    if a.daemon_src and any(x is not None for x in (a.ack, a.fsync, a.dirty_bytes, a.put_wait_s)):
        p.error("--ack, --fsync, --dirty-bytes and --put-wait-s are write-path fields an older daemon "
                "(--daemon-src) may not know; leave them out")  # fmt: skip
    if a.daemon_python and not a.daemon_src:
        p.error("--daemon-python needs --daemon-src (the checkout whose daemon it runs)")
    if (a.kill or a.restart) and a.flash_nodes < 1:
        p.error("--kill and --restart need flash nodes")
    try:
        schedule(a.kill or [], a.restart or [], a.flash_nodes)
    except ValueError as e:
        p.error(str(e))


def _human(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"trace {r['trace']['name']}: {r['requests']} requests, {r['trace']['block_refs']} block refs, "
        f"{r['trace']['unique_blocks']} unique blocks of {c['block_bytes']} B",
        f"mesh: {c['gpu_nodes']} gpu (DRAM {c['dram_bytes'] / _MiB:.0f} MiB) + {c['flash_nodes']} flash "
        f"(NVMe {c['nvme_bytes'] / _MiB:.0f} MiB), R={c['replicas']}, {c['transport']}, {c['threads']} threads, "
        f"{c['eviction']}; daemons at {c['daemon_commit']}",
        f"{r['requests_per_s']} requests/s; request p50 {r['request_p50_ms']} ms, p99 {r['request_p99_ms']} ms",
        f"hit ratio {r['hit_ratio']} (simulator, write path modelled: {r['sim_hit_ratio']}; every put "
        f"instantly on its owners: {r['sim_instant_hit_ratio']})",
        f"blocks put {r['blocks_put']}, cannot be read back {r['unreadable_blocks']} "
        f"(per node {r['unreadable_per_node']}; simulator {r['sim_unreadable_blocks']})",
        f"wrong blocks {r['wrong_blocks']} ({r['wrong_bytes']} bytes), errors {r['errors_total']} {r['errors'] or ''}",
        f"busy waits {r['busy_waits']}, back-pressure waits {r['backpressure_waits']}, dirty peak "
        f"{r['dirty_peak_bytes']} B, replication lag p50/p99 {r['replication_lag_p50_s']} / "
        f"{r['replication_lag_p99_s']} s (client sampled {r['client_replication_lag']}), directory "
        f"delay {r['directory_delay_s']} s",
        f"settled {r['settled']} after {r['settle_s']} s; read-back {r['readback_s']} s; "
        f"{r['machine']['cores']} cores, load {r['machine']['loadavg_before']} -> {r['machine']['loadavg_after']}",
    ]
    for ev in r["events"]:
        lines.append(f"  {ev}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    _check(p, a)
    a.progress = not (a.json or a.no_progress)
    try:
        out = run_replay(a)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"memkv-mesh bench replay: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out) if a.json else _human(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
