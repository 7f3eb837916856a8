"""In-memory network in virtual time, for unit tests and the membership simulator.

Theory of operation
-------------------
``MemoryNetwork`` is a discrete-event loop (a heap of timestamped events) that runs any number
of pure SWIM cores (``gossip.swim.Swim``) exactly as the Trio driver does, but with a virtual
clock, so an hour of a 256-node mesh runs in about a minute and every run with the same seed is
identical. It models:

- **datagrams** with per-link loss (global ``loss`` or ``set_link_loss(a, b, p)``) and delay
  (``delay`` + uniform ``jitter``); lost datagrams still count as sent bytes;
- **streams** (push-pull over TCP): reliable, three frames each delayed like a datagram, failed
  when either end is dead or the two are partitioned (a failed connect counts no bytes: it
  sends no payload);
- **partitions**: ``partition([[a, b], [c]])`` drops everything between groups; ``heal()``;
- **starved nodes**: ``starve(addr, start, duration)`` freezes a node's loop: what arrives is
  queued (like a socket buffer) and its timers do not fire; on wake-up it first drains the queue,
  then runs its overdue timers, as a real driver does;
- **crashes**: ``kill(addr)`` silences a node for good (its traffic is dropped).

Bytes are counted as the transport would put them on the wire: msgpack size of the message plus
``wire_overhead`` (the AEAD envelope: 1 version byte + 12-byte nonce + 16-byte tag = 29), plus a
4-byte length prefix per stream frame. Messages are not actually encrypted here (the crypto cost
is measured separately); the overhead is counted analytically.

Public API: ``MemoryNetwork(seed, loss=0.0, delay=0.0005, jitter=0.0005, wire_overhead=29)``,
``add(core)``, ``kill(addr)``, ``starve(addr, start, duration)``, ``partition(groups)``,
``heal()``, ``set_link_loss(a, b, p)``, ``call_at(t, fn)``, ``run_until(t)``, ``flush(addr)``
(after calling ``join``/``leave``/``update_meta`` on a core from outside), ``replace(core)`` (a
restart at the same address), ``now``,
``on_event`` (callback ``(addr, MembershipEvent)``), ``bytes_sent``, ``packets_sent``,
``nodes`` (addr -> core), ``alive(addr)``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from gossip.events import MembershipEvent
from gossip.messages import Packet, StreamMsg
from gossip.swim import Swim

_TIMER = 0
_PACKET = 1
_STREAM = 2
_CALL = 3
_WAKE = 4

_STREAM_FRAME_PREFIX = 4


class _Node:
    __slots__ = ("core", "addr", "wake", "dead", "frozen_until", "backlog", "idx")

    def __init__(self, core: Swim, idx: int) -> None:
        self.core = core
        self.addr = core.addr
        self.wake = math.inf
        self.dead = False
        self.frozen_until = -math.inf
        self.backlog: list[tuple[int, Any, str]] = []
        self.idx = idx


class MemoryNetwork:
    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.0005,
        wire_overhead: int = 29,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        if delay < 0 or jitter < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {delay}, {jitter}")
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.wire_overhead = wire_overhead
        self.now = 0.0
        self.nodes: dict[str, Swim] = {}
        self._nodes: dict[str, _Node] = {}
        self._heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self._seq = 0
        self._link_loss: dict[tuple[str, str], float] = {}
        self._group: dict[str, int] = {}
        self._enc = msgspec.msgpack.Encoder()
        self.on_event: Callable[[str, MembershipEvent], None] | None = None
        self.bytes_sent: dict[str, int] = {}
        self.packets_sent: dict[str, int] = {}
        self.packets_lost = 0
        self.streams_failed = 0

    # ------------------------------------------------------------------ topology

    def add(self, core: Swim) -> None:
        if core.addr in self._nodes:
            raise ValueError(f"address {core.addr!r} already on the network")
        node = _Node(core, len(self._nodes))
        self._nodes[core.addr] = node
        self.nodes[core.addr] = core
        self.bytes_sent.setdefault(core.addr, 0)
        self.packets_sent.setdefault(core.addr, 0)
        self._after(node)

    def replace(self, core: Swim) -> None:
        """Put a fresh core at an address whose old core was killed (a restart)."""
        old = self._nodes.get(core.addr)
        if old is None or not old.dead:
            raise ValueError(f"no killed node at {core.addr!r} to replace")
        del self._nodes[core.addr]
        self.add(core)

    def flush(self, addr: str) -> None:
        """Send what a core queued outside a network event (``join``, ``leave``, ...)."""
        self._after(self._nodes[addr])

    def alive(self, addr: str) -> bool:
        node = self._nodes.get(addr)
        return node is not None and not node.dead

    def kill(self, addr: str) -> None:
        self._nodes[addr].dead = True

    def starve(self, addr: str, start: float, duration: float) -> None:
        if duration <= 0:
            raise ValueError(f"starve duration must be > 0, got {duration}")
        self.call_at(start, lambda: self._freeze(addr, start + duration))

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        self._group = {}
        for i, g in enumerate(groups):
            for addr in g:
                self._group[addr] = i

    def heal(self) -> None:
        self._group = {}

    def set_link_loss(self, a: str, b: str, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"link loss must be in [0, 1], got {p}")
        self._link_loss[(a, b)] = p
        self._link_loss[(b, a)] = p

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        self._push(max(t, self.now), _CALL, fn, None, None)

    # ------------------------------------------------------------------ event loop

    def _push(self, t: float, kind: int, a: Any, b: Any, c: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b, c))

    def _freeze(self, addr: str, until: float) -> None:
        node = self._nodes.get(addr)
        if node is None or node.dead:
            return
        node.frozen_until = max(node.frozen_until, until)
        self._push(node.frozen_until, _WAKE, node, None, None)

    def _after(self, node: _Node) -> None:
        """Flush a core's output and (re)arm its timer."""
        core = node.core
        if core.has_packets:
            self._send_packets(node, core.take_outbox())
        if core.has_streams:
            for dst, req in core.take_streams():
                self._stream_frame(node.addr, dst, req, 0)
        if core.has_events:
            cb = self.on_event
            evs = core.take_events()
            if cb is not None:
                for ev in evs:
                    cb(node.addr, ev)
        t = core.next_deadline()
        if t < node.wake:
            node.wake = t
            self._push(t, _TIMER, node, t, None)

    def _link_ok(self, src: str, dst: str) -> bool:
        g = self._group
        if g and g.get(src, -1) != g.get(dst, -1):
            return False
        return True

    def _send_packets(self, node: _Node, out: list[tuple[str, Packet]]) -> None:
        src = node.addr
        enc = self._enc.encode
        overhead = self.wire_overhead
        rng = self.rng
        nbytes = 0
        for dst, pkt in out:
            nbytes += len(enc(pkt)) + overhead
            target = self._nodes.get(dst)
            if target is None or target.dead or not self._link_ok(src, dst):
                self.packets_lost += 1
                continue
            loss = self._link_loss.get((src, dst), self.loss) if self._link_loss else self.loss
            if loss and rng.random() < loss:
                self.packets_lost += 1
                continue
            self._push(
                self.now + self.delay + rng.random() * self.jitter, _PACKET, target, pkt, src
            )
        self.bytes_sent[src] += nbytes
        self.packets_sent[src] += len(out)

    def _stream_frame(self, src: str, dst: str, msg: StreamMsg, step: int) -> None:
        target = self._nodes.get(dst)
        ok = target is not None and not target.dead and self._link_ok(src, dst)
        if ok or step > 0:  # a connect that fails sends no payload (SYNs are not counted)
            self.bytes_sent[src] += len(self._enc.encode(msg)) + self.wire_overhead
            self.bytes_sent[src] += _STREAM_FRAME_PREFIX
            self.packets_sent[src] += 1
        if not ok:
            self.streams_failed += 1
            return
        assert target is not None
        t = self.now + 2 * self.delay + self.rng.random() * self.jitter
        self._push(t, _STREAM, target, msg, (src, step))

    def _deliver(self, node: _Node, kind: int, msg: Any, meta: Any) -> None:
        core = node.core
        if kind == _PACKET:
            core.handle_message(msg, meta, self.now)
        else:
            src, step = meta
            reply = core.handle_stream(msg, src, self.now)
            if reply is not None and step < 2:
                self._stream_frame(node.addr, src, reply, step + 1)

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= t_end:
            t, _, kind, a, b, c = pop(heap)
            self.now = t
            if kind == _TIMER:
                node: _Node = a
                if node.dead or b != node.wake:
                    continue
                if node.frozen_until > t:
                    continue  # the wake-up event re-arms it
                node.wake = math.inf
                node.core.handle_timer(t)
                self._after(node)
            elif kind == _PACKET or kind == _STREAM:
                node = a
                if node.dead:
                    continue
                if node.frozen_until > t:
                    node.backlog.append((kind, b, c))
                    continue
                self._deliver(node, kind, b, c)
                self._after(node)
            elif kind == _CALL:
                a()
            else:  # _WAKE
                node = a
                if node.dead or node.frozen_until > t:
                    continue
                backlog = node.backlog
                node.backlog = []
                for k, msg, meta in backlog:
                    self._deliver(node, k, msg, meta)
                node.core.handle_timer(t)
                node.wake = math.inf
                self._after(node)
        self.now = max(self.now, t_end)
