"""Trio driver of the SWIM core: UDP packets, TCP push-pull, encryption, events to the daemon.

Theory of operation
-------------------
``GossipService`` owns one pure ``gossip.swim.Swim`` core and does all its I/O:

- one UDP socket (datagrams <= 1400 bytes, each sealed with the mesh key) and a TCP listener on
  the same port number for streams (push-pull state sync and the TCP fallback ping), frames
  being ``u32 length | sealed message``;
- a timer task sleeps until ``core.next_deadline()`` and is woken early when handling a message
  moves that deadline forward;
- a receive task opens, authenticates and decodes each datagram: a packet no key opens is dropped
  and counted (``dropped_bad_key``), a stale or replayed one likewise (``dropped_replay``), a
  malformed one too (``dropped_malformed``); nothing reaches the core unauthenticated;
- after every core step the outbox is sealed and queued to a sender task (never blocking the
  core), streams are opened in their own tasks, and membership events are handed to
  ``on_event`` (the daemon);
- the incarnation is persisted to ``<state_dir>/gossip.incarnation`` (in a worker thread) before
  the service reports started and whenever it changes, so a restarted node always comes back with
  a higher incarnation than anything it said before;
- the addresses of up to 64 live members are persisted to ``<state_dir>/gossip.members`` (the
  *members snapshot*; in a worker thread, at most once a second, only when they changed and never
  while we know no other member, so an isolated node keeps the addresses it had).

Hostile input and bounded resources (see docs/gossip.md, "Hostile input and bounded resources"):

- every decoded message is range checked by its decoder (``gossip/messages.py``); one outside
  the bounds is dropped and counted (``dropped_malformed``), the core never sees it;
- an exception while handling one message (a datagram, a stream frame, a directory message, a
  push-pull merge, the ``on_event`` callback, a timer step) drops that message, is counted
  (``dropped_errors``) and logged with the peer (at most once per ``_LOG_EVERY_S`` per kind and
  peer host), and never reaches the daemon's nursery;
- the TCP listener buffers at most ``PREAUTH_LIMIT`` (64 KiB) of a connection until one of its
  frames has opened with the mesh key (a sender whose first frame is larger sends
  ``STREAM_HELLO`` before it); at most ``max_stream_conns`` incoming streams at once (a new one
  evicts the oldest that has not authenticated, ``streams_evicted``, else it is closed at once,
  ``streams_refused``); every incoming stream lives at most ``stream_timeout_s`` (a slowloris or
  an idle stream is closed); frames above ``PREAUTH_LIMIT`` (authenticated streams only) are
  decrypted and decoded in a worker thread;
- a message sealed outside the replay window is logged with the peer and the clock skew, and
  the latest skew of up to ``SKEW_PEERS`` peers is in ``statistics().clock_skew``.

Join: the seeds of the config (and peers found by mDNS when enabled) and the addresses of the
members snapshot are handed to the core (``Swim.add_seeds``, ``Swim.rejoin``), which contacts them
by push-pull and keeps at it (``gossip/reconnect.py``): all of them every ``join_retry_s`` while
the node knows no other member, then seeds that are not live members and failed members now and
then, so a split mesh merges again and a restarted node gets back in even with no seeds of its
own and on a new address (its peers learn the address from its higher-incarnation ``Alive``).

The block directory (``gossip/directory.py``) rides on the same core, sockets and key: the daemon
reports its holdings with ``directory_added(keys)`` / ``directory_removed(keys)`` (plain calls
from the Trio thread, callable before ``run``), and asks ``lookup_holders(keys)`` (per key, the
alive members other than us that may hold it) and ``prefix_in_mesh(keys)`` (leading keys held
here or maybe elsewhere), answered from local memory. Its epoch is the wall-clock time of the start
in ms, so a restarted node's directory supersedes what the mesh remembered of the previous process.

Public API: ``GossipService`` (``run``, ``leave``, ``members``, ``statistics``, ``local_addr``,
``directory_added``, ``directory_removed``, ``lookup_holders``, ``prefix_in_mesh``,
``directory_statistics``), ``GossipStats``; re-exports ``NodeMeta``, ``MembershipEvent``,
``MemberInfo``.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import msgspec
import trio

from gossip.directory import Directory, DirectoryConfig, DirectoryStats
from gossip.events import MemberInfo, MembershipEvent
from gossip.messages import (
    MAX_INCARNATION,
    STREAM_HELLO,
    MessageError,
    NodeMeta,
    Packet,
    PushPullFinal,
    StreamMsg,
    decode_packet,
    decode_stream,
    encode,
)
from gossip.swim import Swim
from transport.gossip_config import GossipConfig, parse_hostport
from transport.gossip_crypto import (
    CHANNEL_TCP,
    CHANNEL_UDP,
    CryptoError,
    Keyring,
    ReplayGuard,
    Sealer,
)

__all__ = [
    "PREAUTH_LIMIT", "ClockSkew", "GossipService", "GossipStats", "MemberInfo", "MembershipEvent",
    "NodeMeta", "frame",
]  # fmt: skip

log = logging.getLogger("gossip")

_FRAME = struct.Struct(">I")
MAX_FRAME = 16 << 20  # a push-pull of 100k members is ~10 MB; anything bigger is an attack
# Bytes a listener buffers of a connection before one of its frames opened with the mesh key
# (the 4-byte length included). A push-pull digest of ~6000 members fits; a sender whose first
# frame is bigger sends STREAM_HELLO first. Frames bigger than this (authenticated streams only)
# are decrypted and decoded in a worker thread: ~0.1 ms of AES-GCM at 64 KiB, ~25 ms at 16 MiB.
PREAUTH_LIMIT = 64 << 10
SKEW_PEERS = 32  # peers whose latest rejected clock skew statistics() keeps
_LOG_EVERY_S = 10.0  # at most one warning per kind and peer host this often
_LOG_KEYS = 1024  # rate-limit entries kept (then forgotten all at once)
INCARNATION_FILE = "gossip.incarnation"
MEMBERS_FILE = "gossip.members"
# Addresses kept in the members snapshot: any one of them still alive gets a restart back in; 64
# random live members make "none of them is left" unlikely, and the file stays under 2 KB.
SNAPSHOT_MAX = 64
_SNAPSHOT_READ_LIMIT = 64 << 10  # a snapshot is read up to this many bytes (bounded input)
_SNAPSHOT_GAP_S = 1.0  # at most one snapshot write a second, however fast the members change
_SEND_QUEUE = 4096
# Seeds added after start (mDNS, which anyone on the link can spoof): each one is retried by
# the reconnect logic, so their number is bounded. A LAN of 256 peers is found whole.
EXTRA_SEEDS_MAX = 256


class ClockSkew(msgspec.Struct, frozen=True, kw_only=True):
    """The latest message of a peer rejected for being sealed outside the replay window."""

    peer: str  # its address ("host:port" for UDP; the host for a stream)
    node: str  # its node id when the address is a member's, else ""
    skew_ms: int  # its clock minus ours (positive: the peer's clock is ahead)
    at_ms: int  # our wall-clock time when it was rejected


class GossipStats(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    local_addr: str
    profile: str
    encrypted: bool
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    streams_in: int
    streams_out: int
    stream_errors: int
    send_errors: int
    dropped_bad_key: int
    dropped_replay: int
    dropped_malformed: int
    dropped_send_queue: int
    members_alive: int
    members_suspect: int
    members_dead: int
    members_left: int
    incarnation: int
    health_score: int
    probes: int
    probe_failures: int
    suspicions_started: int
    deaths_declared: int
    refutations: int
    reconnects: int = 0  # push-pulls to failed members, unknown seeds and snapshot addresses
    refutations_impossible: int = 0  # rumours about us at MAX_INCARNATION (forged by a key holder)
    dropped_errors: int = 0  # messages whose handling raised (dropped, logged with the peer)
    streams_refused: int = 0  # incoming streams closed at once: max_stream_conns authenticated
    streams_evicted: int = 0  # unauthenticated streams closed to make room for a new one
    clock_skew: tuple[ClockSkew, ...] = ()  # latest rejected skew per peer, newest last


def frame(sealed: bytes) -> bytes:
    """One stream frame: ``u32 length | sealed message`` (``Sealer.seal(..., CHANNEL_TCP, ms)``)."""
    return _FRAME.pack(len(sealed)) + sealed


class _Conn:
    """An incoming stream, for the connection cap."""

    __slots__ = ("authed", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.authed = False


class _RateLog:
    """At most one log line per (kind, peer host) every ``_LOG_EVERY_S`` seconds."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def allow(self, kind: str, peer: str, now: float) -> int | None:
        """None: stay quiet; else the number of lines suppressed since the last one."""
        key = (kind, _host(peer))
        last = self._last.get(key)
        if last is not None and now - last < _LOG_EVERY_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) >= _LOG_KEYS:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)


def _host(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else addr


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GossipService:
    def __init__(
        self,
        config: GossipConfig,
        *,
        node_id: str,
        meta: NodeMeta,
        on_event: Callable[[MembershipEvent], None] | None = None,
        state_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        directory_config: DirectoryConfig | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        keys = config.key_bytes()
        if not keys and not config.insecure_no_key:
            raise ValueError(
                "gossip.keys: no mesh key configured (set gossip.keys, or gossip.insecure_no_key "
                "= true to run unencrypted)"
            )
        self.config = config
        self.node_id = node_id
        self.meta = meta
        self.on_event = on_event
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._wall = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._swim_cfg = config.swim_config()
        self._directory = Directory(
            node_id,
            directory_config if directory_config is not None else DirectoryConfig(),
            self._rng,
            epoch=0,  # set in run(), before anything is published
            udp_limit=self._swim_cfg.udp_limit,
            wire_overhead=self._swim_cfg.wire_overhead,
        )
        self._sealer = Sealer(Keyring(keys) if keys else None)
        self._guard = ReplayGuard(config.replay_window_s)
        self._core: Swim | None = None
        self._local_addr = ""
        self._udp: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._send_tx, self._send_rx = trio.open_memory_channel[tuple[tuple[str, int], bytes]](
            _SEND_QUEUE
        )
        self._wake = trio.Event()
        self._timer_target = float("inf")
        self._persist_wanted = trio.Event()
        self._persisted_inc = -1
        self._snapshot_wanted = trio.Event()
        self._snapshot: list[str] = []  # what the members snapshot file holds
        self._leave_done = trio.Event()
        self._running = False
        self._extra_seeds: list[str] = []
        self._conns: dict[_Conn, None] = {}  # incoming streams, oldest first
        self._skew: dict[str, ClockSkew] = {}  # latest rejected skew per peer, oldest first
        self._ratelog = _RateLog()
        self._c = dict.fromkeys(
            (
                "packets_in", "packets_out", "bytes_in", "bytes_out", "streams_in",
                "streams_out", "stream_errors", "send_errors", "dropped_bad_key",
                "dropped_replay", "dropped_malformed", "dropped_send_queue", "dropped_errors",
                "streams_refused", "streams_evicted",
            ),
            0,
        )  # fmt: skip

    # ------------------------------------------------------------------ public surface

    @property
    def local_addr(self) -> str:
        """The "host:port" peers use to reach us (bound port, advertised host)."""
        return self._local_addr

    def members(self) -> list[MemberInfo]:
        return self._core.members() if self._core is not None else []

    def statistics(self) -> GossipStats:
        core = self._core
        c = self._c
        counters = core.counters() if core is not None else None
        return GossipStats(
            node_id=self.node_id,
            local_addr=self._local_addr,
            profile=self.config.profile,
            encrypted=self._sealer.keyring is not None,
            packets_in=c["packets_in"],
            packets_out=c["packets_out"],
            bytes_in=c["bytes_in"],
            bytes_out=c["bytes_out"],
            streams_in=c["streams_in"],
            streams_out=c["streams_out"],
            stream_errors=c["stream_errors"],
            send_errors=c["send_errors"],
            dropped_bad_key=c["dropped_bad_key"],
            dropped_replay=c["dropped_replay"],
            dropped_malformed=c["dropped_malformed"],
            dropped_send_queue=c["dropped_send_queue"],
            members_alive=counters.alive if counters else 0,
            members_suspect=counters.suspect if counters else 0,
            members_dead=counters.dead if counters else 0,
            members_left=counters.left if counters else 0,
            incarnation=counters.incarnation if counters else 0,
            health_score=counters.health_score if counters else 0,
            probes=counters.probes if counters else 0,
            probe_failures=counters.probe_failures if counters else 0,
            suspicions_started=counters.suspicions_started if counters else 0,
            deaths_declared=counters.deaths_declared if counters else 0,
            refutations=counters.refutations if counters else 0,
            reconnects=counters.reconnects if counters else 0,
            refutations_impossible=counters.refutations_impossible if counters else 0,
            dropped_errors=c["dropped_errors"],
            streams_refused=c["streams_refused"],
            streams_evicted=c["streams_evicted"],
            clock_skew=tuple(self._skew.values()),
        )

    # ------------------------------------------------------------------ block directory

    def directory_added(self, keys: Iterable[bytes]) -> None:
        """Blocks now held by this node (the store's put/commit, replica fetch, recovery)."""
        self._directory.local_added(keys, trio.current_time())
        self._flush()

    def directory_removed(self, keys: Iterable[bytes]) -> None:
        """Blocks no longer held by this node (eviction, drop, delete)."""
        self._directory.local_removed(keys, trio.current_time())
        self._flush()

    def lookup_holders(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Per key, the alive members other than us that may hold it (no network round trip)."""
        found = self._directory.lookup_holders(keys)
        core = self._core
        if core is None:
            return [[] for _ in found]
        alive: dict[str, bool] = {}
        out: list[list[str]] = []
        for names in found:
            row = []
            for n in names:
                ok = alive.get(n)
                if ok is None:
                    ok = alive[n] = core.state_of(n) == "alive"
                if ok:
                    row.append(n)
            out.append(row)
        return out

    def prefix_in_mesh(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held here or (maybe, per the directory) by another node."""
        return self._directory.prefix_in_mesh(keys)

    def directory_statistics(self) -> DirectoryStats:
        return self._directory.statistics()

    def add_seeds(self, addrs: list[str]) -> None:
        """Join through more peers (mDNS discovery calls this); safe from the Trio thread."""
        core = self._core
        room = EXTRA_SEEDS_MAX - len(self._extra_seeds)
        new = [a for a in dict.fromkeys(addrs) if a not in self._extra_seeds][: max(0, room)]
        self._extra_seeds.extend(new)
        if core is None or not new or not self._running:
            return
        self._step("discovery", "discovered seeds", lambda: core.add_seeds(new, trio.current_time()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        inc = await self._load_incarnation()
        self._snapshot = await self._load_snapshot()
        udp, listener, port = await self._bind()
        self._udp = udp
        # wall-clock ms: grows across restarts even without a state_dir (the incarnation then
        # restarts at 1), so receivers drop what they knew of the previous process
        self._directory.epoch = max(inc, self._now_ms())
        host = self.config.advertise_host()
        self._local_addr = _fmt_addr(host, self.config.advertise_port(port))
        self._core = Swim(
            self.node_id,
            self._local_addr,
            self.meta,
            self._swim_cfg,
            self._rng,
            trio.current_time(),
            incarnation=inc,
            directory=self._directory,
        )
        await self._persist(inc)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._recv_loop, udp)
                nursery.start_soon(self._send_loop, udp)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._persist_loop)
                if self.state_dir is not None:
                    nursery.start_soon(self._snapshot_loop)
                nursery.start_soon(trio.serve_listeners, self._serve_stream, [listener])
                if self.config.mdns:
                    from transport.discovery import run_mdns

                    await nursery.start(run_mdns, self)
                self._running = True
                log.info(
                    "gossip started",
                    extra={"fields": {
                        "node": self.node_id, "addr": self._local_addr,
                        "profile": self.config.profile, "incarnation": inc,
                        "encrypted": self._sealer.keyring is not None,
                        "transport": "udp+tcp",
                    }},
                )  # fmt: skip
                now = trio.current_time()
                self._core.add_seeds([*self.config.seeds, *self._extra_seeds], now)
                if self._snapshot:
                    log.info(
                        "gossip rejoins through the members snapshot",
                        extra={"fields": {"addrs": len(self._snapshot)}},
                    )
                    self._core.rejoin(self._snapshot, now)
                self._flush()
                task_status.started()
        finally:
            self._running = False
            self._nursery = None
            udp.close()
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def leave(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 (the daemon's API)
        """Tell the mesh we are leaving; waits until it was gossiped (or ``timeout``)."""
        core = self._core
        if core is None or core.leaving:
            return
        now = trio.current_time()
        core.leave(now)
        direct = core.farewell(8)
        if self._running and self._udp is not None:
            self._flush()
            # the direct farewell goes out now, before we return, not through the send queue
            await self._send_direct(self._udp, direct)
            if core.leave_pending():
                with trio.move_on_after(timeout):
                    await self._leave_done.wait()
            return
        # run() has ended: send the farewell once from a fresh socket
        packets = core.take_outbox() + direct
        family = trio.socket.AF_INET6 if ":" in self.config.bind else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        with sock, trio.move_on_after(timeout):
            await self._send_direct(sock, packets)

    async def _send_direct(
        self, sock: trio.socket.SocketType, packets: list[tuple[str, Packet]]
    ) -> None:
        for addr, pkt in packets:
            try:
                data = self._sealer.seal(encode(pkt), CHANNEL_UDP, self._now_ms())
                await sock.sendto(data, parse_hostport(addr, "member address"))
                self._c["packets_out"] += 1
                self._c["bytes_out"] += len(data)
            except (OSError, ValueError):
                self._c["send_errors"] += 1

    # ------------------------------------------------------------------ binding & state

    async def _bind(self) -> tuple[trio.socket.SocketType, trio.SocketListener, int]:
        cfg = self.config
        family = trio.socket.AF_INET6 if ":" in cfg.bind else trio.socket.AF_INET
        last: OSError | None = None
        for _ in range(20 if cfg.port == 0 else 1):
            udp = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
            try:
                await udp.bind((cfg.bind, cfg.port))
                port = udp.getsockname()[1]
                tcp = trio.socket.socket(family, trio.socket.SOCK_STREAM)
                try:
                    tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                    await tcp.bind((cfg.bind, port))
                    tcp.listen(128)
                except OSError as exc:
                    tcp.close()
                    raise exc
                return udp, trio.SocketListener(tcp), port
            except OSError as exc:
                udp.close()
                last = exc
        raise OSError(
            f"gossip: cannot bind UDP+TCP {cfg.bind}:{cfg.port}: {last} "
            "(set [gossip] port to a free port, or 0)"
        )

    async def _load_incarnation(self) -> int:
        if self.state_dir is None:
            return 1
        path = self.state_dir / INCARNATION_FILE

        def read() -> int:
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                return 0
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{path}: not an incarnation number: {text[:40]!r}") from None

        inc = await trio.to_thread.run_sync(read) + 1
        if inc > MAX_INCARNATION:
            # never reached by refutations (146 million years at one a millisecond): the file
            # was written by hand or by another program. Peers would drop anything above.
            log.warning("gossip incarnation %d in %s is past the ceiling %d; using the ceiling",
                        inc, path, MAX_INCARNATION)
            inc = MAX_INCARNATION
        return max(inc, 1)

    async def _persist(self, inc: int) -> None:
        if self.state_dir is None or inc <= self._persisted_inc:
            return
        path = self.state_dir / INCARNATION_FILE

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(f"{inc}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        await trio.to_thread.run_sync(write)
        self._persisted_inc = inc

    async def _persist_loop(self) -> None:
        while True:
            await self._persist_wanted.wait()
            self._persist_wanted = trio.Event()
            core = self._core
            if core is not None:
                try:
                    await self._persist(core.incarnation)
                except OSError as exc:
                    log.warning("cannot persist the gossip incarnation: %s", exc)

    async def _load_snapshot(self) -> list[str]:
        """The members snapshot of a previous process (bad lines and excess are ignored)."""
        if self.state_dir is None:
            return []
        path = self.state_dir / MEMBERS_FILE

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read(_SNAPSHOT_READ_LIMIT)
            except FileNotFoundError:
                return b""

        try:
            data = await trio.to_thread.run_sync(read)
        except OSError as exc:
            log.warning("cannot read the gossip members snapshot %s: %s", path, exc)
            return []
        out: list[str] = []
        for line in data.decode("utf-8", "replace").splitlines():
            addr = line.strip()
            if not addr or addr.startswith("#") or addr in out:
                continue
            try:
                parse_hostport(addr, "snapshot address")
            except ValueError:
                continue
            out.append(addr)
            if len(out) == SNAPSHOT_MAX:
                break
        return out

    async def _write_snapshot(self, addrs: list[str]) -> None:
        assert self.state_dir is not None
        path = self.state_dir / MEMBERS_FILE
        text = "# memkv-mesh: live gossip members, to rejoin through after a restart\n"
        text += "".join(f"{a}\n" for a in addrs)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        await trio.to_thread.run_sync(write)

    async def _snapshot_loop(self) -> None:
        while True:
            await self._snapshot_wanted.wait()
            self._snapshot_wanted = trio.Event()
            core = self._core
            if core is None:
                continue
            addrs = core.snapshot_addrs(SNAPSHOT_MAX, prefer=self._snapshot)
            # alone (isolated, or everyone else died): keep the addresses we had
            if addrs and addrs != self._snapshot:
                try:
                    await self._write_snapshot(addrs)
                    self._snapshot = addrs
                except OSError as exc:
                    log.warning("cannot persist the gossip members snapshot: %s", exc)
            await trio.sleep(_SNAPSHOT_GAP_S)

    # ------------------------------------------------------------------ core stepping

    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _drop(self, counter: str, src: str, what: str, exc: BaseException | None = None) -> None:
        """Count a dropped message and log it with the peer (rate-limited)."""
        self._c[counter] += 1
        suppressed = self._ratelog.allow(counter, src, trio.current_time())
        if suppressed is None:
            return
        log.warning(
            "gossip dropped %s from %s (%s): %s%s", what, src, counter,
            f"{type(exc).__name__}: {exc}" if exc is not None else "",
            f" ({suppressed} more like it not logged)" if suppressed else "",
            exc_info=exc if counter == "dropped_errors" else None,
        )  # fmt: skip

    def _flush(self) -> None:
        core = self._core
        if core is None:
            return
        if core.has_packets:
            now_ms = self._now_ms()
            for addr, pkt in core.take_outbox():
                try:
                    dest = parse_hostport(addr, "member address")
                    data = self._sealer.seal(encode(pkt), CHANNEL_UDP, now_ms)
                except (ValueError, OverflowError, TypeError):
                    self._c["send_errors"] += 1
                    continue
                try:
                    self._send_tx.send_nowait((dest, data))
                except trio.WouldBlock:
                    self._c["dropped_send_queue"] += 1
        if core.has_streams and self._nursery is not None:
            for addr, msg in core.take_streams():
                self._nursery.start_soon(self._stream_client, addr, msg)
        if core.has_events:
            cb = self.on_event
            if self.state_dir is not None:
                self._snapshot_wanted.set()
            for ev in core.take_events():
                if cb is not None:
                    try:
                        cb(ev)
                    except Exception as exc:  # the daemon's bug must not stop membership
                        self._drop("dropped_errors", ev.addr, f"the {ev.kind} event", exc)
        if core.incarnation > self._persisted_inc and self.state_dir is not None:
            self._persist_wanted.set()
        if core.leaving and not core.leave_pending():
            self._leave_done.set()
        if core.next_deadline() < self._timer_target:
            self._wake.set()

    def _step(self, src: str, what: str, fn: Callable[[], object]) -> bool:
        """Run one core step and flush; an exception drops the message (counted, logged)."""
        try:
            fn()
            self._flush()
        except Exception as exc:
            self._drop("dropped_errors", src, what, exc)
            try:
                self._flush()  # what the core queued before it failed still goes out
            except Exception as exc2:
                self._drop("dropped_errors", src, "the flush after an error", exc2)
            return False
        return True

    async def _timer_loop(self) -> None:
        core = self._core
        assert core is not None
        while True:
            target = core.next_deadline()
            self._timer_target = target
            self._wake = trio.Event()
            with trio.move_on_at(target):
                await self._wake.wait()
            now = trio.current_time()
            if now >= core.next_deadline():
                if not self._step("timer", "a timer step", functools.partial(core.handle_timer, now)):
                    await trio.sleep(0.1)  # a failing step must not spin the loop

    async def _recv_loop(self, udp: trio.socket.SocketType) -> None:
        while True:
            try:
                data, src = await udp.recvfrom(65536)
            except OSError:  # e.g. ICMP port unreachable surfacing on some platforms
                continue
            self._on_datagram(data, _fmt_addr(src[0], src[1]))

    def _open(self, data: bytes, channel: bytes, src: str) -> bytes | None:
        try:
            plain, sealed_ms, nonce = self._sealer.open(data, channel)
        except CryptoError as exc:
            self._crypto_drop(exc, src)
            return None
        return self._fresh((plain, sealed_ms, nonce), src, channel)

    def _fresh(self, opened: tuple[bytes, int | None, bytes | None], src: str, channel: bytes) -> (
        bytes | None
    ):
        """The plaintext if it was sealed inside the replay window and not seen before."""
        plain, sealed_ms, nonce = opened
        if nonce is None or sealed_ms is None:
            return plain
        now_ms = self._now_ms()
        try:
            self._guard.check(nonce, sealed_ms, now_ms)
        except CryptoError as exc:
            if exc.reason == "stale":
                # a stream's source port is a fresh one each time: key it by the host
                peer = src if channel == CHANNEL_UDP else _host(src)
                self._note_skew(peer, src, sealed_ms - now_ms, now_ms)
            self._crypto_drop(exc, src)
            return None
        return plain

    def _crypto_drop(self, exc: CryptoError, src: str) -> None:
        if exc.reason in ("replay", "stale"):
            self._c["dropped_replay"] += 1
        elif exc.reason == "malformed":
            self._c["dropped_malformed"] += 1
        else:
            self._c["dropped_bad_key"] += 1

    def _note_skew(self, peer: str, src: str, skew_ms: int, now_ms: int) -> None:
        core = self._core
        node = core.node_at(src) if core is not None else None
        self._skew.pop(peer, None)
        self._skew[peer] = ClockSkew(peer=peer, node=node or "", skew_ms=skew_ms, at_ms=now_ms)
        while len(self._skew) > SKEW_PEERS:
            del self._skew[next(iter(self._skew))]
        suppressed = self._ratelog.allow("clock_skew", src, trio.current_time())
        if suppressed is not None:
            log.warning(
                "gossip dropped a message from %s%s sealed %+d ms from our clock (replay window "
                "%d ms): the clocks disagree; check NTP on both nodes%s",
                src, f" ({node})" if node else "", skew_ms, self._guard.window_ms,
                f" ({suppressed} more like it not logged)" if suppressed else "",
                extra={"fields": {"peer": src, "node": node or "", "skew_ms": skew_ms}},
            )  # fmt: skip

    def _on_datagram(self, data: bytes, src: str) -> None:
        self._c["packets_in"] += 1
        self._c["bytes_in"] += len(data)
        plain = self._open(data, CHANNEL_UDP, src)
        if plain is None:
            return
        try:
            pkt: Packet = decode_packet(plain)
        except MessageError as exc:
            self._drop("dropped_malformed", src, "a datagram", exc)
            return
        core = self._core
        if core is None:
            return
        self._step(
            src, f"a {type(pkt).__name__} datagram",
            lambda: core.handle_message(pkt, src, trio.current_time()),
        )  # fmt: skip

    async def _send_loop(self, udp: trio.socket.SocketType) -> None:
        async for dest, data in self._send_rx:
            try:
                await udp.sendto(data, dest)
                self._c["packets_out"] += 1
                self._c["bytes_out"] += len(data)
            except (OSError, ValueError, UnicodeError):
                # An address no socket call takes (messages.Addr keeps them out; this is the
                # last line): that one packet is lost, never the sender task and the daemon.
                self._c["send_errors"] += 1

    # ------------------------------------------------------------------ streams

    async def _read_frame(self, stream: trio.abc.ReceiveStream, limit: int) -> bytes | None:
        """The next frame's sealed bytes (None at a clean end); never buffers past the frame
        being read, and refuses a frame longer than ``limit`` before reading its body."""
        head = await _receive_exactly(stream, 4)
        if head is None:
            return None
        (n,) = _FRAME.unpack(head)
        if n > limit:
            raise MessageError(f"frame of {n} bytes exceeds the {limit} byte limit")
        body = await _receive_exactly(stream, n)
        if body is None:
            raise MessageError("stream closed inside a frame")
        return body

    async def _write_frame(self, stream: trio.abc.SendStream, msg: StreamMsg, first: bool) -> None:
        data = frame(self._sealer.seal(encode(msg), CHANNEL_TCP, self._now_ms()))
        if first and len(data) > PREAUTH_LIMIT:
            # the listener buffers PREAUTH_LIMIT bytes until a frame authenticates: one small one
            hello = frame(self._sealer.seal(encode(STREAM_HELLO), CHANNEL_TCP, self._now_ms()))
            data = hello + data
        await stream.send_all(data)
        self._c["bytes_out"] += len(data)

    async def _open_frame(self, sealed: bytes, src: str) -> StreamMsg | None:
        """The decoded message (None: STREAM_HELLO); raises CryptoError / MessageError."""
        self._c["bytes_in"] += len(sealed) + 4
        big = len(sealed) > PREAUTH_LIMIT
        try:
            if big:  # only ever after the stream authenticated (see _serve_stream)
                opened = await trio.to_thread.run_sync(self._sealer.open, sealed, CHANNEL_TCP)
            else:
                opened = self._sealer.open(sealed, CHANNEL_TCP)
        except CryptoError as exc:
            self._crypto_drop(exc, src)
            raise
        plain = self._fresh(opened, src, CHANNEL_TCP)
        if plain is None:
            raise CryptoError("replay", "stream frame stale or replayed")
        try:
            if big:
                msg = await trio.to_thread.run_sync(decode_stream, plain)
            else:
                msg = decode_stream(plain)
        except MessageError as exc:
            self._drop("dropped_malformed", src, "a stream frame", exc)
            raise
        return None if msg == STREAM_HELLO else msg

    async def _stream_client(self, addr: str, msg: StreamMsg) -> None:
        core = self._core
        assert core is not None
        try:
            host, port = parse_hostport(addr, "peer address")
            with trio.fail_after(self.config.stream_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await self._write_frame(stream, msg, True)
                    answered = False
                    while True:
                        # a peer we chose to contact: frames up to MAX_FRAME, bounded in time
                        sealed = await self._read_frame(stream, MAX_FRAME)
                        if sealed is None:
                            if not answered:  # the peer hung up: it could not open our frame
                                raise MessageError(f"{addr} closed the stream without answering")
                            break
                        got = await self._open_frame(sealed, addr)
                        if got is None:
                            continue  # STREAM_HELLO before a big answer
                        answered = True
                        reply = self._handle_stream(got, addr)
                        if reply is None:
                            break
                        await self._write_frame(stream, reply, False)
                        if isinstance(reply, PushPullFinal):
                            break  # the last frame of a push-pull: nothing comes back
            self._c["streams_out"] += 1
        except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._c["stream_errors"] += 1
            log.debug("gossip stream to %s failed: %s", addr, exc)
        except Exception as exc:
            self._c["stream_errors"] += 1
            self._drop("dropped_errors", addr, "a stream", exc)

    def _handle_stream(self, msg: StreamMsg, src: str) -> StreamMsg | None:
        """One frame through the core; an exception in it drops the stream (counted, logged)."""
        core = self._core
        assert core is not None
        reply: list[StreamMsg | None] = [None]

        def run() -> None:
            reply[0] = core.handle_stream(msg, src, trio.current_time())

        if not self._step(src, f"a {type(msg).__name__} stream frame", run):
            raise _Handled()
        return reply[0]

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        core = self._core
        try:
            peer = stream.socket.getpeername()
            src = _fmt_addr(peer[0], peer[1])
        except OSError:
            src = "?"
        if core is None:
            await trio.aclose_forcefully(stream)
            return
        if len(self._conns) >= self.config.max_stream_conns:
            victim = next((c for c in self._conns if not c.authed), None)
            if victim is None:  # all authenticated: the newcomer waits for a later try
                await trio.aclose_forcefully(stream)
                self._drop("streams_refused", src, "a connection (max_stream_conns reached)")
                return
            del self._conns[victim]
            victim.scope.cancel()
            self._c["streams_evicted"] += 1
        conn = _Conn()
        self._conns[conn] = None
        self._c["streams_in"] += 1
        try:
            with conn.scope:
                async with stream:
                    with trio.fail_after(self.config.stream_timeout_s):
                        while True:
                            limit = MAX_FRAME if conn.authed else PREAUTH_LIMIT - 4
                            sealed = await self._read_frame(stream, limit)
                            if sealed is None:
                                return
                            msg = await self._open_frame(sealed, src)
                            conn.authed = True
                            if msg is None:
                                continue  # STREAM_HELLO: a big frame follows
                            reply = self._handle_stream(msg, src)
                            if reply is not None:
                                await self._write_frame(stream, reply, False)
        except _Handled:
            self._c["stream_errors"] += 1
        except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._c["stream_errors"] += 1
            log.debug("gossip stream from %s dropped: %s", src, exc)
        except Exception as exc:
            self._c["stream_errors"] += 1
            self._drop("dropped_errors", src, "a stream", exc)
        finally:
            self._conns.pop(conn, None)


class _Handled(Exception):
    """A stream frame whose handling failed (already counted and logged): end the stream."""


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    """``n`` bytes, or None if the stream ended before the first; raises inside them."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 16))
        if not chunk:
            if not buf:
                return None
            raise MessageError(f"stream closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
