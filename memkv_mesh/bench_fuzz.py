"""``memkv-mesh bench fuzz``: generated hostile input against a live daemon, per entry point.

Theory of operation
-------------------
* One daemon is started as a subprocess (``spawn.toml_text`` / ``wait_serving``) with gossip on,
  a random mesh key and the TCP data plane, so all four entry points are live: the local Unix
  socket, the gossip UDP port, the gossip TCP port (same number) and the data-plane port (read
  from ``stats()``: ``gossip_addr`` and ``dataplane.address``).
* Inputs come from one ``random.Random(seed)`` per entry point, so a run is reproducible with
  ``--seed`` (wall-clock parts such as AES-GCM nonces differ; the reproducer file keeps the
  plaintext). Each entry point mixes: random bytes; valid msgpack of random structures (tagged
  like a message or not); VALID messages mutated structurally (extreme integers such as 2**64-1
  and -2**63, wrong types, huge and empty lists, keys of the wrong length, fields dropped or
  added, unknown tags) and byte-wise (bit flips, truncation, lying msgpack length headers); and
  framing that lies (length prefixes longer or shorter than the body, connections dropped
  mid-frame). Gossip inputs are mostly SEALED WITH THE RIGHT KEY (``gossip_crypto.Sealer``, the
  daemon's own channel labels), so they reach the SWIM core and the directory; unsealed,
  wrongly keyed, stale and replayed ones are mixed in. Data-plane inputs are garbage or mutated
  handshakes before authentication, and frames sent through the data plane's own channel after a
  real ``client_handshake`` (``TcpChannel.send_body``: each body framed and sealed with the
  session's next nonce, exactly as a peer's frame, so the fuzz reaches the decoder behind the
  per-frame authentication).
* Throughput: a local connection carries up to ``_PER_CONN`` frames written at once while a
  second task drains the replies; an input that ends a connection (a lying length, a dropped
  frame, raw garbage) is always the last one on it. Gossip TCP and the data plane do the same.
  UDP is sent without waiting for replies, but windowed against the daemon's own ``packets_in``
  counter so the kernel does not drop what the daemon never saw (``received`` is reported).
* Liveness: the daemon's pid is polled after every connection or burst, and every
  ``--check-every`` inputs (and at the start and end of each entry point) a real ``Client``
  puts a fresh 4 KiB block and reads it back within ``_CHECK_TIMEOUT_S``. The report per entry
  point: inputs, inputs/s, daemon exits, checks passed/failed, the daemon's counters of rejected
  input (``bad_requests``; gossip ``dropped_*`` and ``stream_errors``; data-plane
  ``auth_failures``, ``protocol_errors``, ``peer_errors``), RSS before and after, and how many
  errors the daemon logged (a caught exception is an ERROR line). Exit status 1 if the daemon
  died or a check failed; a death saves the last inputs to a reproducer JSON file and prints
  its path, and a fresh daemon takes over for the next entry point.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from memkv_mesh import protocol
from memkv_mesh.client import MemkvError
from memkv_mesh.keys import KEY_BYTES
from memkv_mesh.spawn import toml_text, wait_serving

__all__ = ["ENTRIES", "EntryResult", "FuzzOptions", "Target", "exit_status", "main", "run_fuzz"]

ENTRIES = ("local", "gossip-udp", "gossip-tcp", "dataplane")
_PER_CONN = 128  # frames written on one connection at most
_UDP_WINDOW = 96  # datagrams the daemon has not counted yet, at most (the kernel buffer holds ~150)
_CHECK_TIMEOUT_S = 10.0
_DP_PRE_SHARE = 0.2  # of the data plane's inputs, those sent before any handshake
_CONN_TIMEOUT_S = 15.0
_LAST_INPUTS = 64  # kept for the reproducer file
_MAX_MUTANT = 1 << 20  # a structural mutant longer than this is cut (it is garbage either way)
_INT_EDGES = (
    0, 1, -1, 2, 31, 32, 127, 128, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, -(2**31),
    2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, -(2**63) + 1,
)  # fmt: skip
_FLOAT_EDGES = (0.0, -0.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 5e-324)


@dataclass
class Input:
    """One generated input: ``wire`` is what was sent; ``plain`` the message before sealing."""

    kind: str
    wire: bytes
    plain: bytes | None = None
    terminal: bool = False  # ends its connection (nothing after it would be read in step)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "wire_hex": self.wire.hex(), "terminal": self.terminal}
        if self.plain is not None:
            out["plain_hex"] = self.plain.hex()
        return out


@dataclass
class EntryResult:
    entry: str
    inputs: int = 0
    seconds: float = 0.0
    inputs_per_s: float = 0.0
    connections: int = 0
    received: int | None = None  # UDP: datagrams the daemon counted (the kernel may drop some)
    daemon_exits: int = 0
    exit_code: int | None = None
    liveness_passed: int = 0
    liveness_failed: int = 0
    liveness_max_ms: float = 0.0
    stalled_connections: int = 0  # connections the daemon neither answered nor closed in time
    rejected: dict[str, int] = field(default_factory=dict)  # the daemon's counters, delta
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    log_errors: int = 0
    reproducer: str | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class FuzzOptions:
    inputs: int = 100_000
    entries: tuple[str, ...] = ENTRIES
    seed: int = 1
    check_every: int = 5000
    out_dir: Path | None = None  # reproducers (default: the run directory, kept on failure)


# ---- the daemon under test ----------------------------------------------------------------------
class Target:
    """A daemon subprocess with gossip and the data plane on; its addresses and node id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "memkv.sock"
        self.log = root / "daemon.log"
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = "fuzz-target"
        self.gossip_addr: tuple[str, int] = ("", 0)
        self.data_addr = ""

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.sock.exists():
            self.sock.unlink()
        tables: dict[str, dict[str, Any]] = {
            "node": {"id": self.node_id, "role": "both", "data_dir": str(self.root / "data"),
                     "socket": str(self.sock), "arena_dir": str(self.root)},
            "store": {"dram_bytes": 64 << 20, "nvme_bytes": 0, "max_block_bytes": 4 << 20},
            "metrics": {"enabled": False},
            "log": {"level": "error", "format": "json"},
            "gossip": {"enabled": True, "bind": "127.0.0.1", "port": 0, "keys": [self.key]},
            "dataplane": {"transport": "tcp", "host": "127.0.0.1"},
        }  # fmt: skip
        cfg = self.root / "mesh.toml"
        cfg.write_text(toml_text(tables))
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(cfg)],
                stdout=logf, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_serving(self.proc, self.sock, timeout=60, what="the fuzz target daemon", log=self.log)
        st = self.stats()
        host, _, port = str(st["gossip_addr"]).rpartition(":")
        self.gossip_addr = (host.strip("[]"), int(port))
        self.data_addr = str(st["dataplane"]["address"])

    def stats(self) -> dict[str, Any]:
        from memkv_mesh.client import Client

        with Client(self.sock, timeout=_CHECK_TIMEOUT_S, name="fuzz-stats") as c:
            return c.stats()

    def exited(self, timeout: float) -> bool:
        """Whether the process ends within ``timeout`` (a dying daemon may still be writing its
        traceback: never signal it before then)."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        if self.proc is None:
            return 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def log_errors(self) -> int:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        levels = ('"level":"error"', '"level":"critical"', '"level": "error"', '"level": "critical"')
        return sum(1 for line in text.splitlines() if any(x in line.lower() for x in levels)
                   or line.startswith("Traceback"))  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _rejected(stats: dict[str, Any]) -> dict[str, int]:
    out = {"bad_requests": int(stats.get("bad_requests", 0))}
    g = stats.get("gossip") or {}
    for k in ("dropped_bad_key", "dropped_replay", "dropped_malformed", "stream_errors", "packets_in"):
        out[f"gossip.{k}"] = int(g.get(k, 0))
    d = stats.get("dataplane") or {}
    for k in ("auth_failures", "protocol_errors", "peer_errors", "connections_accepted"):
        out[f"dataplane.{k}"] = int(d.get(k, 0))
    return out


# ---- generic generators -------------------------------------------------------------------------
_enc = msgspec.msgpack.Encoder()


class Gen:
    """Random values, structures and mutations, all from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int_(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(_INT_EDGES)
        if r < 0.8:
            return self.rng.randrange(-1000, 100_000)
        return self.rng.randrange(-(2**63), 2**64)

    def str_(self, n: int | None = None) -> str:
        rng = self.rng
        n = rng.choice((0, 1, 3, 8, 16, 40, 300)) if n is None else n
        if rng.random() < 0.2:
            return "".join(chr(rng.choice((0, 0x7F, 0xE9, 0x2603, 0xFFFD, 0x1F600))) for _ in range(n))
        return "".join(chr(rng.randrange(33, 127)) for _ in range(n))

    def bytes_(self, n: int | None = None) -> bytes:
        n = self.rng.choice((0, 1, 8, 31, 32, 33, 64, 200)) if n is None else n
        return self.rng.randbytes(n)

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        r = rng.random()
        if depth > 3 or r < 0.3:
            return self.int_()
        if r < 0.4:
            return rng.choice(_FLOAT_EDGES + (rng.random(),))
        if r < 0.5:
            return self.str_()
        if r < 0.62:
            return self.bytes_()
        if r < 0.67:
            return rng.choice((True, False, None))
        if r < 0.7:
            return msgspec.msgpack.Ext(rng.randrange(-128, 128), self.bytes_(rng.choice((0, 1, 4, 16))))
        if r < 0.9:
            return [self.value(depth + 1) for _ in range(rng.choice((0, 1, 2, 3, 5, 9)))]
        return {self.str_(4) if rng.random() < 0.7 else self.int_(): self.value(depth + 1) for _ in range(rng.randrange(4))}

    def random_msgpack(self, tags: Sequence[int]) -> bytes:
        """Valid msgpack: a random structure, often shaped like a tagged message."""
        v = self.value()
        if self.rng.random() < 0.6:
            tag = self.rng.choice(tags) if self.rng.random() < 0.9 else self.int_()
            v = [tag, *(self.value(1) for _ in range(self.rng.randrange(6)))]
        return _enc.encode(v)

    def wrong(self) -> Any:
        """A value of some type, to put where another was expected."""
        rng = self.rng
        return rng.choice((
            lambda: self.rng.choice(_INT_EDGES), lambda: self.str_(), lambda: self.bytes_(),
            lambda: None, lambda: [], lambda: {}, lambda: self.rng.choice(_FLOAT_EDGES),
            lambda: [self.bytes_(32)] * self.rng.choice((2, 1000)), lambda: self.rng.random() < 0.5,
            lambda: [self.rng.choice(_INT_EDGES)] * self.rng.choice((3, 70_000)),
        ))()  # fmt: skip

    def mutate_struct(self, msg: msgspec.Struct) -> bytes:
        """Structural mutation of a valid tagged array_like message, re-encoded."""
        rng = self.rng
        tree = msgspec.msgpack.decode(_enc.encode(msg))
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            if not isinstance(tree, list) or not tree:
                break
            op = rng.random()
            if op < 0.1:
                tree.append(self.value(1))  # an extra field
            elif op < 0.18 and len(tree) > 1:
                del tree[rng.randrange(1, len(tree)) :]  # fields dropped
            elif op < 0.24:
                tree[0] = rng.choice((self.int_(), rng.randrange(0, 80), self.str_(3)))  # another tag
            else:
                # descend to a random leaf or list and replace it
                parent, idx = tree, rng.randrange(1, len(tree)) if len(tree) > 1 else 0
                while isinstance(parent[idx], list) and parent[idx] and rng.random() < 0.6:
                    parent, idx = parent[idx], rng.randrange(len(parent[idx]))
                old = parent[idx]
                r = rng.random()
                if isinstance(old, int) and not isinstance(old, bool) and r < 0.6:
                    parent[idx] = rng.choice(_INT_EDGES)
                elif isinstance(old, bytes) and r < 0.6:
                    parent[idx] = self.bytes_(rng.choice((0, 1, 31, 33, 64, KEY_BYTES)))
                elif isinstance(old, list) and r < 0.5 and len(old) <= 64:
                    parent[idx] = rng.choice(([], old * rng.choice((2, 100)), [self.wrong()]))
                else:
                    parent[idx] = self.wrong()
        out = _enc.encode(tree)
        if len(out) > _MAX_MUTANT:  # nested growth: keep inputs sendable and quick to make
            return out[:_MAX_MUTANT]
        return out

    def mutate_values(self, msg: msgspec.Struct) -> bytes:
        """A mutation that keeps every type (so the message still decodes and reaches the code
        behind the decoder): integers to extremes, strings and bytes to other lengths."""
        rng = self.rng

        def walk(v: Any) -> Any:
            if isinstance(v, bool) or v is None or isinstance(v, float) or rng.random() < 0.5:
                return v
            if isinstance(v, int):
                return rng.choice(_INT_EDGES[:-2] + (2**64 - 1,)) if v >= 0 else rng.choice((-1, -(2**63)))
            if isinstance(v, str):
                return rng.choice(("", v * 40, v + "\x00", "\u2603" * 3, v[:1]))
            if isinstance(v, bytes):
                return self.bytes_(rng.choice((0, 1, 31, 33, 6000)))
            if isinstance(v, list):
                # a leading int is a tag: kept, or the message would not decode
                return [v[0], *map(walk, v[1:])] if v and isinstance(v[0], int) else [walk(x) for x in v]
            return v

        return _enc.encode(walk(msgspec.msgpack.decode(_enc.encode(msg))))

    def mutate_bytes(self, data: bytes) -> bytes:
        """Byte-level mutation: bit flips, interesting bytes, truncation, insertion, lying headers."""
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            op = rng.random()
            pos = rng.randrange(len(b)) if b else 0
            if not b or op < 0.1:
                b[pos:pos] = rng.randbytes(rng.randrange(1, 9))
            elif op < 0.35:
                b[pos] ^= 1 << rng.randrange(8)
            elif op < 0.5:
                b[pos] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xC0, 0xCF, 0xD3, 0x90, 0x9F))
            elif op < 0.62:
                del b[rng.randrange(len(b)) :]  # truncated
            elif op < 0.74:
                # a msgpack header whose length lies: array32 / map32 / bin32 / str32
                b[pos:pos] = bytes((rng.choice((0xDD, 0xDF, 0xC6, 0xDB)),)) + rng.choice(
                    (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00", b"\x00\x00\x00\x05")
                )
            elif op < 0.85:
                n = rng.randrange(1, 16)
                b[pos:pos] = b[pos : pos + n]  # duplicated run
            else:
                del b[pos : pos + rng.randrange(1, 8)]
        return bytes(b)


def _frame_le(body: bytes) -> bytes:
    return protocol.LEN.pack(len(body)) + body


# ---- local Unix socket --------------------------------------------------------------------------
class LocalGen(Gen):
    _TAGS = tuple(range(11))

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.keys = [rng.randbytes(KEY_BYTES) for _ in range(16)]
        self.pending = self.corpus()

    def valid(self) -> protocol.Msg:
        rng = self.rng
        ks = [rng.choice(self.keys) for _ in range(rng.choice((1, 1, 2, 4, 8)))]
        ks = list(dict.fromkeys(ks))
        kind = rng.randrange(11)
        if kind == 0:
            return protocol.Hello(protocol.PROTOCOL_VERSION, self.str_(8), rng.randrange(1, 1 << 22))
        if kind == 1:
            return protocol.Alloc(ks, [rng.choice((1, 4096, 65536)) for _ in ks])
        if kind == 2:
            return protocol.Commit(ks, [rng.randrange(2**64) for _ in ks])
        if kind == 3:
            return protocol.Abort(ks)
        if kind == 4:
            return protocol.Get(ks, rng.random() < 0.3)
        if kind == 5:
            return protocol.Release(rng.randrange(0, 200))
        if kind == 6:
            return protocol.Lookup(ks)
        if kind == 7:
            return protocol.Delete(ks, rng.random() < 0.5)
        if kind == 8:
            return protocol.StatsRequest() if rng.random() < 0.2 else protocol.Lookup(ks)
        if kind == 9:
            return protocol.MembersRequest() if rng.random() < 0.2 else protocol.Contains(ks)
        return protocol.Contains(ks)

    def corpus(self) -> list[Input]:
        """Known-hostile frames, sent first (a seed corpus: edges that once were or could be bugs)."""
        k = self.keys[0]
        msgs: list[Any] = [
            protocol.Alloc([k], [2**64 - 1]), protocol.Alloc([k], [-(2**63)]), protocol.Alloc([k, k], [1, 1]),
            protocol.Commit([k], [2**64 - 1]), protocol.Commit([k], [-1]), protocol.Commit([k], []),
            protocol.Release(2**64 - 1), protocol.Release(-(2**63)), protocol.Get([k] * (protocol.MAX_BATCH + 1)),
            protocol.Lookup([b""]), protocol.Contains([b"\x00" * (KEY_BYTES + 1)]), protocol.Delete([k, k], True),
            protocol.Hello(2**64 - 1, "x" * 10_000, -1), protocol.Get([k], True), protocol.Abort([k] * 3),
        ]  # fmt: skip
        return [Input("corpus", _frame_le(_enc.encode(m))) for m in msgs]

    def one(self) -> Input:
        if self.pending:
            return self.pending.pop(0)
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            body = bytes(protocol.encode_frame(self.valid()))[4:]
            return Input("valid", _frame_le(body))
        if r < 0.5:
            return Input("struct-mutation", _frame_le(self.mutate_struct(self.valid())))
        if r < 0.62:
            body = self.mutate_bytes(bytes(protocol.encode_frame(self.valid()))[4:])
            return Input("byte-mutation", _frame_le(body))
        if r < 0.77:
            return Input("random-msgpack", _frame_le(self.random_msgpack(self._TAGS)))
        if r < 0.82:
            return Input("random-body", _frame_le(self.bytes_(rng.randrange(0, 64))))
        # ---- inputs that end their connection
        if r < 0.95:
            return Input("random-msgpack", _frame_le(self.random_msgpack(self._TAGS)))
        if r < 0.96:
            return Input("random-bytes", self.bytes_(rng.randrange(1, 256)), terminal=True)
        body = bytes(protocol.encode_frame(self.valid()))[4:]
        if r < 0.97:  # dropped mid-frame: a prefix of a frame, then the connection closes
            whole = _frame_le(body)
            return Input("dropped-mid-frame", whole[: rng.randrange(1, len(whole))], terminal=True)
        if r < 0.99:  # a length prefix that lies (longer than the body, or over the limit)
            n = rng.choice((len(body) + 1, len(body) + 1000, protocol.MAX_FRAME_BYTES, protocol.MAX_FRAME_BYTES + 1, 2**32 - 1))
            return Input("lying-length", protocol.LEN.pack(n) + body, terminal=True)
        # shorter than the body: the rest is read as the next frame
        return Input("short-length", protocol.LEN.pack(rng.randrange(len(body))) + body, terminal=True)

    def connection(self, budget: int) -> tuple[bytes, list[Input]]:
        """(setup bytes, inputs) for one connection: usually a Hello first, a terminal input last."""
        rng = self.rng
        setup = b""
        if rng.random() < 0.85:
            setup = bytes(protocol.encode_frame(protocol.Hello(protocol.PROTOCOL_VERSION, "fuzz", os.getpid())))
        inputs: list[Input] = []
        n = min(budget, rng.choice((1, 8, 32, _PER_CONN, _PER_CONN, _PER_CONN)))
        while len(inputs) < n:
            inp = self.one()
            inputs.append(inp)
            if inp.terminal:
                break
        return setup, inputs


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Read and drop whatever comes back, until EOF or a reset."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _send_and_drain(stream: trio.SocketStream, data: bytes, res: EntryResult) -> None:
    """Write ``data`` while draining replies, half-close, and wait for the daemon to close."""
    async with stream:
        with trio.move_on_after(_CONN_TIMEOUT_S) as cs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, stream)
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        if cs.cancelled_caught:
            res.stalled_connections += 1


# ---- gossip -------------------------------------------------------------------------------------
class GossipGen(Gen):
    _PACKET_TAGS = (0, 1, 2, 3, 4, 5)
    _STREAM_TAGS = (32, 33, 34, 0, 1, 35, 36)

    def __init__(self, rng: random.Random, key: bytes, target: str, sink: str) -> None:
        from transport.gossip_crypto import Keyring, Sealer

        super().__init__(rng)
        self.sealer = Sealer(Keyring([key]))
        self.wrong_sealer = Sealer(Keyring([rng.randbytes(32)]))
        self.target = target
        self.sink = sink  # the only host:port fake members get (our own socket)
        self.fakes = [f"fz{i}" for i in range(12)]
        self.sent: collections.deque[bytes] = collections.deque(maxlen=32)  # for replays
        self.pending_udp = self.corpus(stream=False)
        self.pending_tcp = self.corpus(stream=True)

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.25:
            return self.target
        if r < 0.8:
            return self.rng.choice(self.fakes)
        return self.str_()

    def addr(self) -> str:
        if self.rng.random() < 0.85:
            return self.sink
        # addresses that do not parse, or name nothing: never a host to resolve
        return self.rng.choice(("", ":", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000",
                                "127.0.0.1:-1", "[::1]:", "[", ":::::", "127.0.0.1:x", "\x00:1"))  # fmt: skip

    def meta(self) -> Any:
        from gossip.messages import WireMeta

        rng = self.rng
        return WireMeta(
            rng.choice(("gpu", "flash", "both", "", "x" * 50)), rng.choice((1.0, 0.0, 1e9, rng.random())),
            self.addr() if rng.random() < 0.5 else "", rng.choice((1, 0, 2)), rng.choice((1, 2, 0)),
        )  # fmt: skip

    def inc(self) -> int:
        return self.rng.choice((1, 2, 3, 10, 1000, 2**32, 2**63 - 1, 2**64 - 2, 2**64 - 1))

    def update(self) -> Any:
        from gossip.messages import Alive, Dead, Suspect

        r = self.rng.random()
        if r < 0.4:
            return Alive(self.name(), self.inc(), self.addr(), self.meta())
        if r < 0.75:
            return Suspect(self.name(), self.inc(), self.name())
        return Dead(self.name(), self.inc(), self.name())

    def updates(self) -> tuple[Any, ...]:
        return tuple(self.update() for _ in range(self.rng.choice((0, 1, 2, 4))))

    def packet(self) -> Any:
        from gossip.messages import Ack, DirDelta, Gossip, Nack, Ping, PingReq

        rng = self.rng
        seq = rng.choice((0, 1, rng.randrange(1 << 32), 2**64 - 1))
        k = rng.randrange(6)
        if k == 0:
            return Ping(seq, self.name(), self.updates())
        if k == 1:
            return Ack(seq, self.updates())
        if k == 2:
            return PingReq(seq, self.name(), rng.random() < 0.5, self.updates())
        if k == 3:
            return Nack(seq, self.updates())
        if k == 4:
            return Gossip(self.updates())
        fps = tuple(rng.randrange(2**64) for _ in range(rng.choice((0, 1, 5))))
        ver = rng.choice((0, 1, 5, 2**63, 2**64 - 1))
        return DirDelta(self.name(), self.inc(), rng.choice((0, 1, 2**64 - 1)), max(0, ver - rng.randrange(3)), ver, fps, fps[:1])

    def stream_msg(self) -> Any:
        from gossip.messages import (
            Ack,
            DirSummary,
            DirSummaryReq,
            Entry,
            Ping,
            PushPullFinal,
            PushPullReply,
            PushPullReq,
        )

        rng = self.rng

        def entries() -> tuple[Entry, ...]:
            return tuple(Entry(self.name(), self.inc(), rng.randrange(-1, 5), self.addr(), self.meta())
                         for _ in range(rng.choice((0, 1, 3))))  # fmt: skip

        k = rng.randrange(7)
        if k == 0:
            digest = tuple((self.name(), self.inc(), rng.randrange(0, 4)) for _ in range(rng.choice((0, 1, 3))))
            return PushPullReq(rng.random() < 0.5, digest, entries())
        if k == 1:
            return PushPullReply(entries(), tuple(self.name() for _ in range(rng.randrange(3))))
        if k == 2:
            return PushPullFinal(entries())
        if k == 3:
            return Ping(rng.randrange(1 << 32), self.name(), self.updates())
        if k == 4:
            return Ack(rng.randrange(1 << 32), self.updates())
        if k == 5:
            return DirSummaryReq(self.name())
        n = rng.choice((0, 1, 10))
        words = rng.randbytes(6 * n + rng.choice((0, 0, 1, 5)))
        return DirSummary(self.name(), self.inc(), rng.choice((0, 1)), rng.choice((0, 7, 2**64 - 1)),
                          rng.choice((48, 1, 0, 2**64 - 1)), words, rng.choice((n, 0, 2**64 - 1)))  # fmt: skip

    def plaintext(self, stream: bool) -> tuple[str, bytes]:
        from gossip.messages import encode

        rng = self.rng
        valid = self.stream_msg() if stream else self.packet()
        r = rng.random()
        if r < 0.3:
            return "sealed-valid", encode(valid)
        if r < 0.5:
            return "sealed-value-mutation", self.mutate_values(valid)
        if r < 0.65:
            return "sealed-struct-mutation", self.mutate_struct(valid)
        if r < 0.8:
            return "sealed-byte-mutation", self.mutate_bytes(encode(valid))
        return "sealed-random-msgpack", self.random_msgpack(self._STREAM_TAGS if stream else self._PACKET_TAGS)

    def corpus(self, stream: bool) -> list[bytes]:
        """Known-hostile plaintexts, sealed with the right key and sent first: the node's own
        incarnation at the top of its range (its refutation must not overflow), addresses that
        are not addresses (a NUL byte, port 0) for a new member and for its data plane."""
        from gossip import messages as gm

        t, top = self.target, 2**64 - 1
        ok = gm.WireMeta("flash", 1.0, "", 1, 1)
        bad_data = gm.WireMeta("flash", 1.0, "\x00:1", 1, 1)
        if stream:
            msgs: list[Any] = [
                gm.PushPullReq(True, (), (gm.Entry("fzc-nul", 1, 0, "\x00:1", ok),)),
                gm.PushPullReq(True, (), (gm.Entry("fzc-port0", 1, 0, "127.0.0.1:0", ok),)),
                gm.PushPullReq(True, (), (gm.Entry("fzc-data", 1, 0, self.sink, bad_data),)),
                gm.PushPullReq(False, ((t, top, 1), (t, top, 2)), (gm.Entry(t, top, 2, self.sink, ok),)),
                gm.DirSummaryReq(t), gm.DirSummary(t, top, top, top, 48, b"\x01" * 7, top),
            ]  # fmt: skip
        else:
            msgs = [
                gm.Gossip((gm.Suspect(t, top, "fzc"),)), gm.Gossip((gm.Dead(t, top, "fzc"),)),
                gm.Gossip((gm.Alive(t, top, self.sink, ok),)), gm.Gossip((gm.Alive("fzc-nul", 1, "\x00:1", ok),)),
                gm.Gossip((gm.Alive("fzc-port0", 1, "127.0.0.1:0", ok),)),
                gm.Gossip((gm.Alive("fzc-data", 1, self.sink, bad_data),)),
                gm.Ping(top, t), gm.PingReq(top, "fzc-nul"), gm.Gossip((gm.Suspect("fzc-nul", top, t),)),
            ]  # fmt: skip
        return [gm.encode(m) for m in msgs]

    def message(self, stream: bool) -> Input:
        """One sealed-or-not gossip message (a datagram, or a stream frame's body)."""
        from transport.gossip_crypto import CHANNEL_TCP, CHANNEL_UDP, VERSION_PLAIN

        rng = self.rng
        channel, other = (CHANNEL_TCP, CHANNEL_UDP) if stream else (CHANNEL_UDP, CHANNEL_TCP)
        now = int(time.time() * 1000)
        todo = self.pending_tcp if stream else self.pending_udp
        if todo:
            plain = todo.pop(0)
            return Input("sealed-corpus", self.sealer.seal(plain, channel, now), plain)
        r = rng.random()
        if r < 0.75:
            kind, plain = self.plaintext(stream)
            wire = self.sealer.seal(plain, channel, now)
            self.sent.append(wire)
            return Input(kind, wire, plain)
        kind, plain = self.plaintext(stream)
        if r < 0.8:
            return Input("unsealed-plain", bytes((VERSION_PLAIN,)) + plain, plain)
        if r < 0.84:
            return Input("wrong-key", self.wrong_sealer.seal(plain, channel, now), plain)
        if r < 0.87:
            return Input("wrong-channel", self.sealer.seal(plain, other, now), plain)
        if r < 0.9:
            return Input("stale", self.sealer.seal(plain, channel, now - rng.choice((31_000, 10**7, now))), plain)
        if r < 0.93 and self.sent:
            return Input("replayed", rng.choice(self.sent))
        if r < 0.97:
            return Input("corrupted-seal", self.mutate_bytes(self.sealer.seal(plain, channel, now)), plain)
        return Input("random-bytes", self.bytes_(rng.choice((0, 1, 13, 29, 30, 100, 1400))))

    def datagram(self) -> Input:
        inp = self.message(stream=False)
        if len(inp.wire) > 65000:
            inp.wire = inp.wire[:65000]
        return inp

    def tcp_frame(self) -> Input:
        """One stream frame (``>I length | sealed``); terminal unless the daemon reads on after it
        (only a correctly sealed, fresh message that decodes)."""

        rng = self.rng
        r = rng.random()
        if r < 0.04:
            return Input("stream-random-bytes", self.bytes_(rng.randrange(1, 64)), terminal=True)
        inp = self.message(stream=True)
        wire = inp.wire
        if r < 0.08:  # dropped mid-frame
            whole = len(wire).to_bytes(4, "big") + wire
            return Input("stream-dropped-mid-frame", whole[: rng.randrange(1, len(whole))], inp.plain, True)
        if r < 0.11:
            n = rng.choice((len(wire) + 1, 16 << 20, (16 << 20) + 1, 2**32 - 1))
            return Input("stream-lying-length", n.to_bytes(4, "big") + wire, inp.plain, True)
        inp.wire = len(wire).to_bytes(4, "big") + wire
        inp.terminal = not inp.kind.startswith("sealed-") or _gossip_stream_ends(inp.plain)
        return inp

    def tcp_connection(self, budget: int) -> list[Input]:
        """The frames of one gossip stream: some the daemon reads on after, then usually one
        that ends it."""
        rng = self.rng
        out: list[Input] = []
        while self.pending_tcp and len(out) < budget:  # the corpus first, in order
            inp = self.message(stream=True)
            inp.wire = len(inp.wire).to_bytes(4, "big") + inp.wire
            inp.terminal = _gossip_stream_ends(inp.plain)
            out.append(inp)
            if inp.terminal:
                return out
        if out:
            return out
        n = min(budget, rng.choice((1, 4, 16, 48)))
        want_end = rng.random() < 0.85
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            inp = self.tcp_frame()
            if inp.terminal == (len(out) == n - 1 and want_end):
                out.append(inp)
        return out


def _gossip_stream_ends(plain: bytes | None) -> bool:
    """Whether the gossip stream ends on this (correctly sealed) plaintext: it does not decode."""
    from gossip.messages import MessageError, decode_stream

    try:
        decode_stream(plain or b"")
    except MessageError:
        return True
    return False


# ---- data plane ---------------------------------------------------------------------------------
def _dp_ends(body: bytes) -> bool:
    """Whether the data plane ends the connection on this frame (all but fetches and deletes;
    a push waits for bytes that never come)."""
    from transport import dataplane as dp

    try:
        return not isinstance(dp.decode_body(body), dp.FetchRequest | dp.DeleteRequest)
    except dp.DataPlaneError:
        return True


class DataplaneGen(Gen):
    _TAGS = tuple(range(11)) + (63,)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.pending = self.corpus()

    def valid_request(self) -> Any:
        from transport import dataplane as dp

        rng = self.rng
        ks = [rng.randbytes(KEY_BYTES) for _ in range(rng.choice((1, 2, 8)))]
        k = rng.random()
        if k < 0.45:
            return dp.FetchRequest(ks)
        if k < 0.8:
            return dp.DeleteRequest(ks)
        return dp.PushRequest(ks, [rng.choice((1, 4096)) for _ in ks], [rng.randrange(2**64) for _ in ks], rng.random() < 0.5)

    def other_msg(self) -> Any:
        from transport import dataplane as dp

        rng = self.rng
        return rng.choice((
            lambda: dp.Hello(1, self.str_(4), self.bytes_(8), self.bytes_(32)),
            lambda: dp.Challenge(1, self.str_(4), self.bytes_(32), self.bytes_(32)),
            lambda: dp.Proof(self.bytes_(32)), lambda: dp.Welcome(),
            lambda: dp.FetchReply([rng.choice((-1, 4096))], [0]), lambda: dp.PushReady([0, 1]),
            lambda: dp.PushDone([True]), lambda: dp.DeleteDone([False]), lambda: dp.Error("x", "y"),
        ))()  # fmt: skip

    def corpus(self) -> list[bytes]:
        """Known-hostile bodies after the handshake, sent first: a batch one over the limit (a
        2.2 MB frame), sizes at the ends of their range, empty and NUL keys and names."""
        from transport import dataplane as dp

        k = self.rng.randbytes(KEY_BYTES)
        msgs: list[Any] = [
            dp.FetchRequest([k] * (dp.MAX_BATCH + 1)), dp.FetchRequest([b""]), dp.DeleteRequest([b"\x00" * 33]),
            dp.FetchRequest([k], "\x00" * 300), dp.PushRequest([k], [2**63 - 1], [0]),
            dp.PushRequest([k], [-1], [2**64 - 1]), dp.PushRequest([k, k], [1, 1], [0, 0]),
        ]  # fmt: skip
        return [_enc.encode(m) for m in msgs]

    def post_handshake(self) -> tuple[Input, bytes]:
        """(input, msgpack body) of one frame after the handshake; terminal unless the daemon
        answers it and reads on (a fetch or delete it refuses or serves)."""
        rng = self.rng
        msg = self.valid_request()
        r = rng.random()
        if r < 0.3:
            body = _enc.encode(msg)
            kind = "valid"
        elif r < 0.65:
            body, kind = self.mutate_struct(msg), "struct-mutation"
        elif r < 0.75:
            body, kind = self.mutate_bytes(_enc.encode(msg)), "byte-mutation"
        elif r < 0.9:
            body, kind = self.random_msgpack(self._TAGS), "random-msgpack"
        else:
            body, kind = _enc.encode(self.other_msg()), "unexpected-message"
        return Input(kind, _frame_le(body), body, _dp_ends(body)), body

    def authenticated(self, budget: int) -> list[tuple[Input, bytes]]:
        """The frames of one authenticated connection: some the data plane answers and reads on
        after (a handshake costs the time of ~40 frames, so a connection carries many), then,
        usually, one that ends it."""
        rng = self.rng
        out: list[tuple[Input, bytes]] = []
        while self.pending and len(out) < budget:  # the corpus first, in order
            body = self.pending.pop(0)
            out.append((Input("corpus", _frame_le(body), body, _dp_ends(body)), body))
            if out[-1][0].terminal:
                return out
        if out:
            return out
        n = min(budget, rng.choice((1, 4, 16, 48, 64)))
        want_end = rng.random() < 0.85
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            inp, body = self.post_handshake()
            last = len(out) == n - 1 and want_end
            if last and rng.random() < 0.3:
                # a frame the session does not open: sent unsealed, or sealed and then altered
                kind = rng.choice(("post-unsealed-frame", "post-tampered-frame"))
                out.append((Input(kind, inp.wire, body, True), body))
            elif inp.terminal == last:
                out.append((inp, body))
        return out

    def pre_handshake(self) -> Input:
        """What an unauthenticated peer sends first (always the last thing on its connection)."""
        from transport import dataplane as dp

        rng = self.rng
        hello = dp.Hello(dp.DATAPLANE_VERSION, self.str_(6), self.bytes_(8), self.bytes_(dp.NONCE_BYTES))
        r = rng.random()
        if r < 0.2:
            return Input("pre-random-bytes", self.bytes_(rng.randrange(1, 512)), terminal=True)
        if r < 0.45:
            return Input("pre-hello-mutation", _frame_le(self.mutate_struct(hello)), terminal=True)
        if r < 0.6:
            return Input("pre-byte-mutation", _frame_le(self.mutate_bytes(_enc.encode(hello))), terminal=True)
        if r < 0.7:
            return Input("pre-random-msgpack", _frame_le(self.random_msgpack(self._TAGS)), terminal=True)
        if r < 0.8:
            return Input("pre-unknown-key", _frame_le(_enc.encode(hello)), terminal=True)
        if r < 0.9:
            whole = _frame_le(_enc.encode(hello))
            return Input("pre-dropped-mid-frame", whole[: rng.randrange(1, len(whole))], terminal=True)
        n = rng.choice((5 << 20, 2**32 - 1, (4 << 20) - 1))
        return Input("pre-lying-length", protocol.LEN.pack(n) + _enc.encode(hello), terminal=True)


# ---- the runner ---------------------------------------------------------------------------------
Hook = Callable[[str, int, Target], None]


class _Run:
    def __init__(self, target: Target, opts: FuzzOptions, res: EntryResult, hook: Hook | None) -> None:
        self.t = target
        self.opts = opts
        self.res = res
        self.hook = hook
        self.last: collections.deque[Input] = collections.deque(maxlen=_LAST_INPUTS)
        self.first: list[Input] = []  # the corpus and what followed it: a death may lag its cause
        self.next_check = opts.check_every
        self.check_rng = random.Random(opts.seed ^ 0x5EED)

    def done(self) -> bool:
        return self.res.inputs >= self.opts.inputs or not self.t.alive

    async def sent(self, inputs: Sequence[Input]) -> None:
        """Account for inputs just delivered; poll the pid; run a liveness check when due."""
        self.res.inputs += len(inputs)
        self.first.extend(inputs[: max(0, _LAST_INPUTS - len(self.first))])
        self.last.extend(inputs)
        if self.hook is not None:
            self.hook(self.res.entry, self.res.inputs, self.t)
        if not self.t.alive:
            return
        if self.res.inputs >= self.next_check:
            self.next_check = self.res.inputs + self.opts.check_every
            await self.check()

    async def check(self) -> None:
        """A real client's put + get round trip; a failure names what happened."""
        from memkv_mesh.client import Client

        key = self.check_rng.randbytes(KEY_BYTES)
        value = self.check_rng.randbytes(4096)

        def roundtrip() -> None:
            with Client(self.t.sock, timeout=_CHECK_TIMEOUT_S, name="fuzz-liveness") as c:
                c.put(key, value)
                got = bytearray(len(value))
                if c.get_into(key, got) != len(value) or bytes(got) != value:
                    raise RuntimeError("the block read back is missing or differs")

        t0 = time.perf_counter()
        err = ""
        with trio.move_on_after(_CHECK_TIMEOUT_S + 1) as cs:
            try:
                await trio.to_thread.run_sync(roundtrip, abandon_on_cancel=True)
            except Exception as e:  # noqa: BLE001 - any failure is a failed check, reported
                err = f"{type(e).__name__}: {e}"
        if cs.cancelled_caught:
            err = f"no answer within {_CHECK_TIMEOUT_S + 1:.0f} s"
        ms = (time.perf_counter() - t0) * 1000
        if err:
            dead: bool = await trio.to_thread.run_sync(self.t.exited, 5.0)
            if dead:
                return  # the daemon died: reported as an exit, not as a failed check
            self.res.liveness_failed += 1
            self.res.failures.append(f"liveness check after {self.res.inputs} inputs failed: {err}")
        else:
            self.res.liveness_passed += 1
            self.res.liveness_max_ms = max(self.res.liveness_max_ms, round(ms, 1))


async def _fuzz_local(run: _Run) -> None:
    gen = LocalGen(random.Random(f"{run.opts.seed}:local"))
    while not run.done():
        setup, inputs = gen.connection(run.opts.inputs - run.res.inputs)
        try:
            stream = await trio.open_unix_socket(str(run.t.sock))
        except OSError as e:
            if run.t.alive:
                run.res.failures.append(f"cannot connect to the local socket: {e}")
            break
        run.res.connections += 1
        await _send_and_drain(stream, setup + b"".join(i.wire for i in inputs), run.res)
        await run.sent(inputs)


async def _fuzz_gossip_udp(run: _Run) -> None:
    from memkv_mesh.client import AsyncClient

    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    sink = f"127.0.0.1:{sock.getsockname()[1]}"
    # what the daemon answers our fake members lands on this socket unread (the kernel drops it)
    gen = GossipGen(random.Random(f"{run.opts.seed}:gossip-udp"), _raw_key(run.t), run.t.node_id, sink)
    stats = await AsyncClient.connect(run.t.sock, name="fuzz-udp-window")
    base = int((await stats.stats())["gossip"]["packets_in"])
    counted = 0  # what the daemon had counted when we last asked
    lost = 0  # datagrams the kernel dropped (never counted, however long we wait)
    try:
        with sock:
            while not run.done():
                burst = [gen.datagram() for _ in range(min(32, run.opts.inputs - run.res.inputs))]
                for inp in burst:
                    try:
                        await sock.sendto(inp.wire, run.t.gossip_addr)
                    except OSError:
                        pass
                await run.sent(burst)
                # window against what the daemon has counted, so the kernel drops (almost) nothing
                stall = trio.current_time() + 1.0
                while run.t.alive:
                    try:
                        counted = int((await stats.stats())["gossip"]["packets_in"]) - base
                    except (ConnectionError, OSError, MemkvError) as e:
                        # the daemon died (an exit, reported by the caller) or stopped answering
                        if not await trio.to_thread.run_sync(run.t.exited, 10.0):
                            run.res.failures.append(f"status on the local socket failed: {e}")
                        return
                    if run.res.inputs - lost - counted <= _UDP_WINDOW // 2:
                        break
                    if trio.current_time() > stall:
                        lost = run.res.inputs - counted
                        break
                    await trio.sleep(0.001)
    finally:
        run.res.received = counted
        with trio.CancelScope(shield=True):
            try:
                await stats.aclose()
            except Exception:  # noqa: BLE001 - the daemon may be gone
                pass


async def _fuzz_gossip_tcp(run: _Run) -> None:
    gen = GossipGen(random.Random(f"{run.opts.seed}:gossip-tcp"), _raw_key(run.t), run.t.node_id, "127.0.0.1:9")
    host, port = run.t.gossip_addr
    while not run.done():
        inputs = gen.tcp_connection(run.opts.inputs - run.res.inputs)
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            if run.t.alive:
                run.res.failures.append(f"cannot connect to the gossip TCP port: {e}")
            break
        run.res.connections += 1
        await _send_and_drain(stream, b"".join(i.wire for i in inputs), run.res)
        await run.sent(inputs)


async def _fuzz_dataplane(run: _Run) -> None:
    from transport import dataplane as dp
    from transport.dataplane_config import DataPlaneConfig, decode_keys
    from transport.tcp_dataplane import TcpChannel

    gen = DataplaneGen(random.Random(f"{run.opts.seed}:dataplane"))
    keys = decode_keys([run.t.key])
    cfg = DataPlaneConfig(transport="tcp")
    host, port = dp.split_peer(run.t.data_addr)
    pre = 0  # inputs sent before a handshake: a fifth of them (each costs a connection)
    while not run.done():
        budget = run.opts.inputs - run.res.inputs
        if pre < _DP_PRE_SHARE * run.res.inputs:  # an unauthenticated peer
            pre += 1
            inp = gen.pre_handshake()
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as e:
                if run.t.alive:
                    run.res.failures.append(f"cannot connect to the data plane: {e}")
                break
            run.res.connections += 1
            await _send_and_drain(stream, inp.wire, run.res)
            await run.sent([inp])
            continue
        # an authenticated peer: a real handshake, then frames through the data plane's channel
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            if run.t.alive:
                run.res.failures.append(f"cannot connect to the data plane: {e}")
            break
        # the data plane's own channel over a stream we keep, to half-close it when done
        chan = TcpChannel(stream, run.t.data_addr, max_frame=cfg.max_frame_bytes, io_timeout=cfg.io_timeout_s)
        run.res.connections += 1
        inputs: list[Input] = []
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(_CONN_TIMEOUT_S) as cs:
                try:
                    await dp.client_handshake(chan, keys, "fuzz-peer", 5.0)
                except dp.DataPlaneError as e:
                    if run.t.alive:
                        run.res.failures.append(f"data-plane handshake with the right key failed: {e}")
                    await chan.aclose()
                    break
                closed = trio.Event()
                nursery.start_soon(_drain_channel, chan, closed)
                try:
                    for inp, body in gen.authenticated(budget):
                        # framed and sealed with the session's next nonce by the data plane's own
                        # send path, exactly as a peer's frame would be
                        if inp.kind == "post-unsealed-frame":
                            await chan.send_raw(inp.wire)
                        elif inp.kind == "post-tampered-frame":
                            sealed = bytearray(dp.frame_body(chan.session, body))
                            i = gen.rng.randrange(len(sealed))
                            sealed[i] ^= 1 << gen.rng.randrange(8)
                            inp.wire = bytes(sealed)
                            await chan.send_raw(inp.wire)
                        else:
                            await chan.send_body(body)
                        inputs.append(inp)
                except dp.DataPlaneError:
                    pass
                # half-close, then wait for the daemon to read everything and close its side
                # (a close with replies unread would reset the connection before it read ours)
                try:
                    await stream.send_eof()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await closed.wait()
            if cs.cancelled_caught:
                run.res.stalled_connections += 1
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await chan.aclose()
            except (dp.DataPlaneError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await run.sent(inputs)


async def _drain_channel(chan: Any, closed: trio.Event) -> None:
    from transport.dataplane import DataPlaneError

    try:
        while True:
            await chan.recv_msg(None)
    except DataPlaneError:
        pass  # EOF, or bytes after a FetchReply that are not a frame
    finally:
        closed.set()


_DRIVERS = {
    "local": _fuzz_local,
    "gossip-udp": _fuzz_gossip_udp,
    "gossip-tcp": _fuzz_gossip_tcp,
    "dataplane": _fuzz_dataplane,
}


def _raw_key(t: Target) -> bytes:
    return base64.b64decode(t.key)


def _save_reproducer(run: _Run, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fuzz-repro-{run.res.entry}-seed{run.opts.seed}-{run.res.inputs}.json"
    doc = {
        "entry": run.res.entry, "seed": run.opts.seed, "inputs_sent": run.res.inputs,
        "exit_code": run.res.exit_code, "node_id": run.t.node_id,
        "note": "the first and the last inputs before the daemon died (a death can lag its cause: "
                "a member added now is sent to later), oldest first; wire_hex is what was sent "
                "(gossip: sealed with that run's key, so replay plain_hex sealed with yours)",
        "first_inputs": [i.record() for i in run.first],
        "inputs": [i.record() for i in run.last],
        "daemon_log_tail": run.t.log.read_text(errors="replace")[-4000:] if run.t.log.exists() else "",
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=1))
    return path


async def _run_entry(target: Target, opts: FuzzOptions, entry: str, hook: Hook | None, out_dir: Path) -> EntryResult:
    res = EntryResult(entry)
    run = _Run(target, opts, res, hook)
    res.rss_before_kib = target.rss_kib()
    errors0 = target.log_errors()
    try:
        before = _rejected(await trio.to_thread.run_sync(target.stats))
    except (ConnectionError, OSError, MemkvError) as e:
        before = {}
        res.failures.append(f"status before the run failed: {e}")
    await run.check()
    t0 = time.perf_counter()
    await _DRIVERS[entry](run)
    res.seconds = round(time.perf_counter() - t0, 3)
    res.inputs_per_s = round(res.inputs / res.seconds, 1) if res.seconds else 0.0
    if target.alive:
        await run.check()
    dead = await trio.to_thread.run_sync(target.exited, 0.5)
    if not dead:
        try:
            after = _rejected(await trio.to_thread.run_sync(target.stats))
            res.rejected = {k: after[k] - before.get(k, 0) for k in after}
            res.rss_after_kib = target.rss_kib()
        except (ConnectionError, OSError, MemkvError) as e:
            dead = await trio.to_thread.run_sync(target.exited, 10.0)
            if not dead:
                res.failures.append(f"status after the run failed: {e}")
    if dead:
        assert target.proc is not None
        target.proc.wait()
        res.daemon_exits = 1
        res.exit_code = target.proc.returncode
        res.failures.append(f"the daemon exited (code {res.exit_code}) after {res.inputs} inputs")
        res.reproducer = str(_save_reproducer(run, out_dir))
    res.log_errors = target.log_errors() - errors0
    return res


def run_fuzz(opts: FuzzOptions, *, hook: Hook | None = None, root: Path | None = None) -> list[EntryResult]:
    """Fuzz each entry point of ``opts.entries`` against one daemon (a fresh one after a death).

    ``hook(entry, inputs_sent, target)`` is called after every connection or burst (tests use it
    to kill the daemon and prove a death is reported)."""
    own_root = root is None
    base = Path(tempfile.mkdtemp(prefix="mkfz-")) if root is None else root
    out_dir = opts.out_dir or base
    results: list[EntryResult] = []
    target: Target | None = None
    finished = False
    try:
        for i, entry in enumerate(opts.entries):
            if target is None or not target.alive:
                if target is not None:
                    target.stop()
                target = Target(base / f"d{i}")
                target.start()
            results.append(trio.run(_run_entry, target, opts, entry, hook, out_dir))
        finished = True
    finally:
        if target is not None:
            target.stop()
        failed = not finished or any(r.failures for r in results)
        if failed and own_root:
            print(f"bench fuzz: the run's daemons, configs and logs are kept in {base}", file=sys.stderr)
        if own_root and not failed and opts.out_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return results


# ---- command line -------------------------------------------------------------------------------
def _table(results: list[EntryResult]) -> str:
    lines = [
        f"{'entry':<11} {'inputs':>8} {'inputs/s':>9} {'exits':>5} {'checks ok/fail':>14} "
        f"{'rss KiB before/after':>21} {'log errors':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.entry:<11} {r.inputs:>8} {r.inputs_per_s:>9.0f} {r.daemon_exits:>5} "
            f"{f'{r.liveness_passed}/{r.liveness_failed}':>14} {f'{r.rss_before_kib}/{r.rss_after_kib}':>21} "
            f"{r.log_errors:>10}"
        )
    lines.append("")
    for r in results:
        shown = {k: v for k, v in r.rejected.items() if v}
        extra = f", daemon counted {r.received}" if r.received is not None else ""
        lines.append(f"{r.entry}: {r.connections} connections{extra}; rejected/counters: {shown}")
        for f in r.failures:
            lines.append(f"  FAIL {f}")
        if r.reproducer:
            lines.append(f"  reproducer: {r.reproducer}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="memkv-mesh bench fuzz",
        description="Generated hostile input against a live daemon, per entry point; exit 1 if it "
        "died or stopped answering a real client.",
    )
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per entry point (default 100000)")
    ap.add_argument("--entry", default=",".join(ENTRIES), help=f"comma-separated subset of {','.join(ENTRIES)}")
    ap.add_argument("--seed", type=int, default=1, help="seed of the input generators (default 1)")
    ap.add_argument("--check-every", type=int, default=5000, help="inputs between liveness checks (default 5000)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where reproducers go (default: the run's temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    entries = tuple(e.strip() for e in a.entry.split(",") if e.strip())
    bad = [e for e in entries if e not in ENTRIES]
    if bad or not entries:
        ap.error(f"--entry: unknown entry point(s) {bad}; choose from {','.join(ENTRIES)}")
    if a.inputs < 1 or a.check_every < 1:
        ap.error("--inputs and --check-every must be at least 1")
    opts = FuzzOptions(inputs=a.inputs, entries=entries, seed=a.seed, check_every=a.check_every, out_dir=a.out_dir)
    results = run_fuzz(opts)
    if a.json:
        doc = {"seed": a.seed, "inputs_per_entry": a.inputs, "machine": f"{os.cpu_count()} cores, {sys.platform}",
               "results": [asdict(r) for r in results]}  # fmt: skip
        print(json.dumps(doc, indent=1))
    else:
        print(_table(results))
    for r in results:
        if r.reproducer:
            print(f"reproducer: {r.reproducer}", file=sys.stderr)
    return exit_status(results)


def exit_status(results: Sequence[EntryResult]) -> int:
    """1 if the daemon died, a liveness check failed or anything else went wrong; else 0."""
    return 1 if any(r.daemon_exits or r.liveness_failed or r.failures for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
