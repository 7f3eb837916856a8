"""SWIM membership with the Lifeguard extensions, as a pure state machine.

Theory of operation
-------------------
No I/O, no clock, no threads: the driver (``transport/gossip_driver.py`` under Trio, or
``transport/memory.py`` in virtual time) passes ``now`` and messages in and takes messages and
events out. Randomness comes from the ``random.Random`` given at construction, so a seeded run is
reproducible.

Failure detection (one probe per probe period, round-robin over a shuffled member list):
``Ping`` the target; no ``Ack`` within ``probe_timeout`` -> ask ``indirect_checks`` random members
to probe it for us (``PingReq``, they answer ``Nack`` if the target did not answer them either) and, like memberlist,
send a TCP fallback ``Ping`` over a stream;
no ack by the end of the probe period -> the target becomes *suspect*.

Rules this module keeps (the gossip precedence):

- a member's incarnation is raised only by the member itself;
- ``Alive(i)`` overrides ``Suspect(j)``/``Dead(j)``/left only if ``i > j``; ``Suspect(i)``
  overrides ``Alive(j)`` if ``i >= j``; a leave ``Dead(x, i, src=x)`` overrides
  ``Alive(j)``/``Suspect(j)`` if ``i >= j``. An old or replayed update therefore never resurrects
  a dead node or undoes a leave;
- a member is declared dead here only by *our own* suspicion timer: another node's verdict
  ``Dead(x, i, src=y)`` is one more accusation (it starts a suspicion at incarnation ``i``, or
  confirms ours), never a death by itself. In one connected mesh the suspicion spreads before the
  verdicts and the verdicts shorten our timer to the minimum, so a dead member is dead here about
  as soon (first-to-last grows by ~0.2 s); but the verdicts the other side of a healed split made
  about ours are stale, and now only start suspicions that the members refute;
- a suspicion started by a verdict, by a push-pull table or by an accuser we hold dead is *weak*:
  the member is told at once (it may be alive and reachable, back from a split); started by a
  live member's verdict it runs the minimum timeout;
- a node that hears itself suspected or declared dead *refutes*: it raises its incarnation above
  the one in the rumour and gossips ``Alive`` (unless it is leaving); with ``refute_fanout`` it
  also sends that ``Alive`` straight to that many random members;
- suspect -> dead after the Lifeguard suspicion timeout (``gossip/suspicion.py``), which every node
  runs on its own; independent confirmations shorten it;
- local health (``gossip/awareness.py``) stretches the probe period of a node whose own probes
  fail without nacks;
- *buddy system*: the ping to a suspect always carries "you are suspected" first (and any queued
  update about the target goes first on any packet to it), so the suspect learns and refutes on
  the next probe even if the rumour ran out of retransmissions (e.g. it started on an isolated
  node). With ``direct_refute`` (default profile) each suspicion we hold on our own account (our
  failed probe, or weak) is also sent straight to the suspect every probe period, and the ack to
  a ping from a member we hold dead carries "you are suspected": a node back from a split learns
  at once that it must refute;
- the block directory (``gossip/directory.py``), when given, rides on this core: its delta
  packets and summary streams go out through ``take_outbox`` / ``take_streams``, its timers are
  part of ``next_deadline``, a member that becomes live gets its marker and one that dies or
  leaves has its view dropped;
- left members are kept as tombstones for ``tombstone_s`` (longer than the transport's replay
  window), dead ones as long as we reconnect to them (``reconnect_timeout_s``, 24 h; never less
  than ``tombstone_s``), so a replayed old ``Alive`` always finds the tombstone; dead ones are
  gossiped to for ``gossip_to_dead_s``, so they can refute a false death;
- *reconnect* (``gossip/reconnect.py``): failed (dead, not left) members, seeds that are not live
  members and, after a restart, the addresses the driver saved (``rejoin``) are re-contacted with
  a join-style push-pull, so partitions of any length heal and a restarted node gets back in;
- *push-pull after a split*: a digest that holds us suspect/dead makes us refute before we
  answer, and an initiator that had to refute on the reply sends its new ``Alive`` in the final
  frame, so one exchange carries both sides' refutations across; the stale verdicts on the
  other members become weak suspicions that those members refute;
- a graceful leave is ``Dead(self, inc, src=self)``;
- our incarnation never passes ``MAX_INCARNATION`` (2**62, what every decoder accepts): a rumour
  about us at the ceiling itself cannot be refuted (counted in ``refutations_impossible``). Only
  a mesh-key holder can send one, and an incarnation that high means a forged rumour, not a
  real one: a node refuting once a millisecond would take 146 million years to get there.

Public API (what drivers and simulators call):

- ``Swim(node_id, addr, meta, config, rng, now, incarnation=1, directory=None)``; ``directory``
  (the ``Directory`` core or None) and ``live_peers()``
- ``handle_message(packet, src_addr, now)``, ``handle_timer(now)``, ``next_deadline()``
- ``has_packets`` / ``has_streams`` / ``has_events`` (cheap checks), and
  ``take_outbox() -> list[(addr, Packet)]``, ``take_streams() -> list[(addr, StreamMsg)]``
  (a push-pull request or a TCP fallback ``Ping``; the driver opens a stream per item),
  ``take_events() -> list[MembershipEvent]``
- ``handle_stream(msg, src_addr, now) -> StreamMsg | None`` (push-pull, both ends)
- ``join(seed_addrs, now)`` (once), ``add_seeds(seed_addrs, now)`` (kept and retried),
  ``rejoin(addrs, now)`` (a restart's saved addresses), ``snapshot_addrs(limit, prefer)`` (what
  to save), ``failed_members()``, ``seed_members(...)``, ``leave(now)``, ``leave_pending()``,
  ``farewell(limit)``,
  ``update_meta(meta, now)``, ``members()``, ``counters()``, ``incarnation``, ``state_of(node)``,
  ``node_at(addr)``
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import msgspec

from gossip.awareness import Awareness
from gossip.broadcast_queue import BroadcastQueue
from gossip.directory import Directory
from gossip.events import MemberInfo, MembershipEvent
from gossip.members import Member, ProbeOrder
from gossip.messages import (
    MAX_INCARNATION,
    STATE_ALIVE,
    STATE_DEAD,
    STATE_LEFT,
    STATE_NAMES,
    STATE_SUSPECT,
    Ack,
    Alive,
    Dead,
    DirDelta,
    DirSummary,
    DirSummaryReq,
    Entry,
    Gossip,
    Nack,
    NodeMeta,
    Packet,
    Ping,
    PingReq,
    PushPullFinal,
    PushPullReply,
    PushPullReq,
    StreamMsg,
    Suspect,
    Update,
    node_meta,
    wire_meta,
)
from gossip.profile import SwimConfig
from gossip.pushpull import diff, digest, entry, pushpull_scale
from gossip.reconnect import Reconnect
from gossip.suspicion import Suspicion, suspicion_timeouts

_INF = math.inf
_SEQ_MASK = 0xFFFF  # 16-bit sequence numbers keep a ping at 3 bytes of seq
_BASE_RESERVE = 48  # bytes reserved for a packet's own fields when packing updates


class SwimCounters(msgspec.Struct, frozen=True, kw_only=True):
    probes: int
    probe_failures: int
    indirect_probes: int
    suspicions_started: int
    deaths_declared: int
    refutations: int
    misdirected: int
    pushpulls: int
    alive: int
    suspect: int
    dead: int
    left: int
    health_score: int
    incarnation: int
    reconnects: int = 0  # push-pulls to failed members, unknown seeds or rejoin targets
    refutations_impossible: int = 0  # rumours about us at MAX_INCARNATION (forged)


class _Probe:
    __slots__ = ("seq", "target", "direct_deadline", "end", "indirect", "nacks", "expected")

    def __init__(self, seq: int, target: str, direct_deadline: float, end: float) -> None:
        self.seq = seq
        self.target = target
        self.direct_deadline = direct_deadline
        self.end = end
        self.indirect = False
        self.nacks = 0
        self.expected = 0


class _Relay:
    __slots__ = ("addr", "seq", "deadline", "nack")

    def __init__(self, addr: str, seq: int, deadline: float, nack: bool) -> None:
        self.addr = addr
        self.seq = seq
        self.deadline = deadline
        self.nack = nack


class Swim:
    def __init__(
        self,
        node_id: str,
        addr: str,
        meta: NodeMeta,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        *,
        incarnation: int = 1,
        directory: Directory | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        if not 0 <= incarnation <= MAX_INCARNATION:
            raise ValueError(f"incarnation must be in 0..{MAX_INCARNATION}, got {incarnation}")
        self.id = node_id
        self.config = config
        self.directory = directory
        self.rng = rng
        self._me = Member(node_id, addr, wire_meta(meta), incarnation, STATE_ALIVE, now)
        self._members: dict[str, Member] = {node_id: self._me}
        self._by_addr: dict[str, str] = {addr: node_id}
        self._live: list[str] = []  # live members other than self, for random picks
        self._live_pos: dict[str, int] = {}
        self._recent_dead: dict[str, float] = {}
        self._tombstones: dict[str, float] = {}  # dead/left members -> since
        self.awareness = Awareness(config.awareness_max)
        self.queue = BroadcastQueue(config.retransmit_mult)
        self._order = ProbeOrder(rng)
        self._suspicions: dict[str, Suspicion] = {}
        self._susp_min = _INF
        self._probe: _Probe | None = None
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = _INF
        self._next_pushpull = (
            now + rng.random() * config.pushpull_interval if config.pushpull_interval > 0 else _INF
        )
        self._next_reap = now + config.tombstone_s / 4
        self._reconnect = Reconnect(config.reconnect_interval_s, config.join_retry_s, rng)
        self._weak: set[str] = set()  # suspicions from verdicts, tables or stale accusers
        self._relays: dict[int, _Relay] = {}
        self._relay_min = _INF
        self._seq = rng.randrange(_SEQ_MASK + 1)
        self._outbox: list[tuple[str, Packet]] = []
        self._streams: list[tuple[str, StreamMsg]] = []
        self._events: list[MembershipEvent] = []
        self._told: set[str] = set()  # suspecters already sent our refutation directly
        self._sync_peer: str | None = None  # the push-pull peer whose table we are merging
        self.leaving = False
        self._budget = config.udp_limit - config.wire_overhead - _BASE_RESERVE
        # counters
        self._c_probes = 0
        self._c_fail = 0
        self._c_indirect = 0
        self._c_susp = 0
        self._c_dead = 0
        self._c_refute = 0
        self._c_misdirected = 0
        self._c_pushpull = 0
        self._c_reconnect = 0
        self._c_ceiling = 0

    # ---------------------------------------------------------------- inspection

    @property
    def incarnation(self) -> int:
        return self._me.inc

    @property
    def addr(self) -> str:
        return self._me.addr

    @property
    def meta(self) -> NodeMeta:
        return node_meta(self._me.meta)

    def n_live(self) -> int:
        return len(self._live) + 1

    def state_of(self, node: str) -> str | None:
        m = self._members.get(node)
        return STATE_NAMES[m.state] if m is not None else None

    def node_at(self, addr: str) -> str | None:
        """The id of the member at ``addr`` (None if none is known there)."""
        return self._by_addr.get(addr)

    def incarnation_of(self, node: str) -> int | None:
        m = self._members.get(node)
        return m.inc if m is not None else None

    def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                node_id=m.node,
                addr=m.addr,
                state=STATE_NAMES[m.state],
                incarnation=m.inc,
                meta=node_meta(m.meta),
            )
            for m in sorted(self._members.values(), key=lambda m: m.node)
        ]

    def counters(self) -> SwimCounters:
        by_state = [0, 0, 0, 0]
        for m in self._members.values():
            by_state[m.state] += 1
        return SwimCounters(
            probes=self._c_probes,
            probe_failures=self._c_fail,
            indirect_probes=self._c_indirect,
            suspicions_started=self._c_susp,
            deaths_declared=self._c_dead,
            refutations=self._c_refute,
            misdirected=self._c_misdirected,
            pushpulls=self._c_pushpull,
            alive=by_state[STATE_ALIVE],
            suspect=by_state[STATE_SUSPECT],
            dead=by_state[STATE_DEAD],
            left=by_state[STATE_LEFT],
            health_score=self.awareness.score,
            incarnation=self._me.inc,
            reconnects=self._c_reconnect,
            refutations_impossible=self._c_ceiling,
        )

    # ---------------------------------------------------------------- driver interface

    @property
    def has_packets(self) -> bool:
        d = self.directory
        return bool(self._outbox) or (d is not None and d.has_packets)

    @property
    def has_streams(self) -> bool:
        d = self.directory
        return bool(self._streams) or (d is not None and d.has_streams)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def take_outbox(self) -> list[tuple[str, Packet]]:
        out = self._outbox
        self._outbox = []
        d = self.directory
        if d is not None and d.has_packets:
            out.extend(d.take_outbox())
        return out

    def take_streams(self) -> list[tuple[str, StreamMsg]]:
        out = self._streams
        self._streams = []
        d = self.directory
        if d is not None and d.has_streams:
            out.extend(d.take_streams())
        return out

    def live_peers(self) -> list[tuple[str, str]]:
        """(node id, address) of the live members other than us."""
        members = self._members
        return [(n, members[n].addr) for n in self._live]

    def take_events(self) -> list[MembershipEvent]:
        out = self._events
        self._events = []
        return out

    def next_deadline(self) -> float:
        t = self._next_probe
        p = self._probe
        if p is not None:
            pt = p.end if p.indirect else p.direct_deadline
            if pt < t:
                t = pt
        if self._susp_min < t:
            t = self._susp_min
        if self._relay_min < t:
            t = self._relay_min
        if self._next_gossip < t:
            t = self._next_gossip
        if self._next_pushpull < t:
            t = self._next_pushpull
        if self._next_reap < t:
            t = self._next_reap
        rt = self._reconnect.next_deadline()
        if rt < t:
            t = rt
        d = self.directory
        if d is not None:
            dt = d.next_deadline()
            if dt < t:
                t = dt
        return t

    def handle_timer(self, now: float) -> None:
        if self._relay_min <= now:
            self._expire_relays(now)
        p = self._probe
        if p is not None:
            if not p.indirect and p.direct_deadline <= now:
                self._start_indirect(p, now)
            if p.indirect and p.end <= now:
                self._probe = None
                self._probe_failed(p, now)
        if self._susp_min <= now:
            self._expire_suspicions(now)
        if self._next_probe <= now:
            self._start_probe(now)
        if self._next_gossip <= now:
            self._gossip_tick(now)
        if self._next_pushpull <= now:
            self._pushpull_tick(now)
        if self._next_reap <= now:
            self._reap(now)
        if self._reconnect.next_deadline() <= now:
            self._reconnect_tick(now)
        d = self.directory
        if d is not None and d.next_deadline() <= now:
            d.handle_timer(now, self.live_peers())

    def handle_message(self, pkt: Packet, src: str, now: float) -> None:
        if isinstance(pkt, DirDelta):
            m = self._members.get(pkt.node)
            if self.directory is not None and m is not None and m.live:
                self.directory.handle_delta(pkt, src, now)  # views exist for live members only
            return
        for u in pkt.updates:
            self._apply(u, now)
        if isinstance(pkt, Ping):
            if pkt.target != self.id:
                self._c_misdirected += 1
                return
            sender = self._by_addr.get(src)
            ups = self._piggy(sender)
            m = self._members.get(sender) if sender is not None else None
            if m is not None and m.state == STATE_DEAD and self.config.direct_refute:
                # a member we hold dead pings us: it was on the other side of a split. Tell it
                # (as the buddy system tells a suspect), so it refutes and is back at once.
                ups = (Suspect(m.node, m.inc, self.id), *ups)
            self._outbox.append((src, Ack(pkt.seq, ups)))
        elif isinstance(pkt, Ack):
            p = self._probe
            if p is not None and p.seq == pkt.seq:
                if not p.indirect:
                    self.awareness.apply_delta(-1)
                self._probe = None
                return
            relay = self._relays.pop(pkt.seq, None)
            if relay is not None:
                self._outbox.append(
                    (relay.addr, Ack(relay.seq, self._piggy(self._by_addr.get(relay.addr))))
                )
        elif isinstance(pkt, PingReq):
            self._handle_ping_req(pkt, src, now)
        elif isinstance(pkt, Nack):
            p = self._probe
            if p is not None and p.seq == pkt.seq:
                p.nacks += 1

    def handle_stream(self, msg: StreamMsg, src: str, now: float) -> StreamMsg | None:
        """One push-pull frame in; the frame to answer on the same stream (or None)."""
        if isinstance(msg, Ping):
            return Ack(msg.seq) if msg.target == self.id else None
        if isinstance(msg, Ack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                self._probe = None
            return None
        if isinstance(msg, (DirSummaryReq, DirSummary)):
            d = self.directory
            if d is None:
                return None
            if isinstance(msg, DirSummary):
                m = self._members.get(msg.node)
                if m is None or not m.live:
                    return None
            return d.handle_stream(msg, src, now)
        peer = self._by_addr.get(src, src)
        if isinstance(msg, PushPullReq):
            self._c_pushpull += 1
            self._merge(msg.entries, peer, now)
            self._refute_digest(msg.digest, now)
            entries, want = diff(self._members, msg.digest)
            return PushPullReply(entries, want)
        if isinstance(msg, PushPullReply):
            inc = self._me.inc
            self._merge(msg.entries, peer, now)
            out = [entry(self._members[n]) for n in msg.want if n in self._members]
            if self._me.inc != inc and self.id not in msg.want:
                # the peer thinks we are dead or suspect: our refutation crosses on this stream
                out.append(entry(self._me))
            if not msg.want and not out:
                return None
            return PushPullFinal(tuple(out))
        self._merge(msg.entries, peer, now)
        return None

    # ---------------------------------------------------------------- membership control

    def seed_members(self, entries: Iterable[Entry], now: float) -> None:
        """Install members known out of band (simulator bootstrap), without gossiping them."""
        members = self._members
        by_addr = self._by_addr
        live = self._live
        live_pos = self._live_pos
        for e in entries:
            node = e.node
            if node in members:
                continue
            m = Member(node, e.addr, e.meta, e.inc, e.state, now)
            members[node] = m
            by_addr[e.addr] = node
            if (e.state == STATE_ALIVE or e.state == STATE_SUSPECT) and node not in live_pos:
                live_pos[node] = len(live)
                live.append(node)
            elif e.state == STATE_DEAD or e.state == STATE_LEFT:
                self._tombstones[node] = now
                if e.state == STATE_DEAD:
                    self._reconnect.failed(node, now, not live)

    def join(self, seed_addrs: Iterable[str], now: float) -> None:
        """Push-pull with each seed (join=True) once and announce ourselves."""
        me = self._me
        req = PushPullReq(True, digest(self._members.values()), (entry(me),))
        for addr in seed_addrs:
            if addr != me.addr:
                self._streams.append((addr, req))
        self._enqueue(Alive(self.id, me.inc, me.addr, me.meta), now)

    def add_seeds(self, seed_addrs: Iterable[str], now: float) -> None:
        """Remember seeds (configured or discovered) and join through those we do not know yet.

        Unlike ``join`` they are retried: every ``join_retry_s`` while we know no other member,
        and afterwards, when no live member has the seed's address, as reconnect candidates
        (``gossip/reconnect.py``).
        """
        addrs = [a for a in seed_addrs if a and a != self._me.addr]
        self._reconnect.add_seeds(addrs, now, not self._live)
        todo = [a for a in addrs if not self._live_addr(a)]
        if todo and not self.leaving:
            self.join(todo, now)

    def rejoin(self, addrs: Iterable[str], now: float) -> None:
        """Join through the members a previous process of this node knew (the driver's members
        snapshot, ``snapshot_addrs``): contacted now and every ``join_retry_s`` until we know
        another member, then forgotten. Ignored once we already know another member."""
        if self._live:
            return
        todo = [a for a in addrs if a and a != self._me.addr]
        self._reconnect.add_rejoin(todo, now, True)
        if todo and not self.leaving:
            self.join(todo, now)

    def snapshot_addrs(self, limit: int, prefer: Iterable[str] = ()) -> list[str]:
        """Addresses of up to ``limit`` live members other than us, for the driver to persist so
        that a restart can ``rejoin``. Addresses in ``prefer`` that are still live come first (a
        snapshot that still holds need not be rewritten); the rest is a random pick."""
        members = self._members
        live = {members[n].addr for n in self._live}
        out = [a for a in dict.fromkeys(prefer) if a in live][:limit]
        if len(out) < limit:
            taken = set(out)
            rest = sorted(a for a in live if a not in taken)
            if len(rest) > limit - len(out):
                rest = self.rng.sample(rest, limit - len(out))
            out.extend(rest)
        return out

    def failed_members(self) -> list[str]:
        """Ids of the failed (dead, not left) members we still try to reconnect to."""
        return [n for n in self._members if self._reconnect.is_failed(n)]

    def leave(self, now: float) -> None:
        """Start a graceful leave: gossip Dead(self, src=self) and stop probing."""
        if self.leaving:
            return
        self.leaving = True
        me = self._me
        me.state = STATE_LEFT
        self._probe = None
        self._next_probe = _INF
        self._enqueue(Dead(self.id, me.inc, self.id), now)
        self._gossip_tick(now)

    def farewell(self, limit: int) -> list[tuple[str, Packet]]:
        """Our leave, addressed straight to up to ``limit`` random live members.

        For a driver whose event loop is stopping: it can send these once without waiting for
        gossip rounds. Call ``leave`` first.
        """
        me = self._me
        pkt = Gossip((Dead(self.id, me.inc, self.id),))
        return [(m.addr, pkt) for m in self._pick(limit, exclude=None, alive_only=False)]

    def leave_pending(self) -> bool:
        """True while our leave has not been sent to ``gossip_nodes`` members (or all of them)."""
        if not self.leaving or not self._live:
            return False
        sent = self.queue.transmits(self.id)
        return sent is not None and sent < min(self.config.gossip_nodes, len(self._live))

    def update_meta(self, meta: NodeMeta, now: float, addr: str | None = None) -> None:
        """Publish new metadata (and/or address) under a new incarnation."""
        me = self._me
        me.inc = min(me.inc + 1, MAX_INCARNATION)
        me.meta = wire_meta(meta)
        if addr is not None and addr != me.addr:
            self._by_addr.pop(me.addr, None)
            me.addr = addr
            self._by_addr[addr] = self.id
        self._enqueue(Alive(self.id, me.inc, me.addr, me.meta), now)

    def set_addr(self, addr: str) -> None:
        """Set our own address before any traffic (the driver learns it when it binds)."""
        me = self._me
        self._by_addr.pop(me.addr, None)
        me.addr = addr
        self._by_addr[addr] = self.id

    # ---------------------------------------------------------------- probing

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _start_probe(self, now: float) -> None:
        cfg = self.config
        period = self.awareness.scale(cfg.probe_interval)
        self._next_probe = now + period
        if self.leaving:
            self._next_probe = _INF
            return
        target = self._order.next(self._members, self.id)
        if target is None:
            return
        seq = self._next_seq()
        self._c_probes += 1
        self._probe = _Probe(seq, target.node, now + cfg.probe_timeout, now + period)
        ups = self._piggy(target.node)
        if target.state == STATE_SUSPECT and not (ups and ups[0].node == target.node):
            # buddy system: a suspect always hears about it from its prober, even after the
            # rumour has used up its retransmissions
            ups = (Suspect(target.node, target.inc, self.id), *ups)
        self._outbox.append((target.addr, Ping(seq, target.node, ups)))
        if self._suspicions and cfg.direct_refute:
            self._remind_suspects(target.node)

    def _remind_suspects(self, skip: str) -> None:
        """The buddy system, for every suspicion we hold on our own account (our failed probe,
        or a weak one): each probe period the suspect hears it straight from us, not only when
        its turn in the probe order comes. A suspect that is alive but was cut off (a split that
        has just healed) then refutes within a probe period instead of dying when our timer
        runs out. Bounded by our own suspicions: a probe period's worth of failed probes each."""
        me = self.id
        members = self._members
        for node, s in self._suspicions.items():
            if node == skip or not (me in s.confirmers or node in self._weak):
                continue
            m = members.get(node)
            if m is not None and m.state == STATE_SUSPECT:
                self._outbox.append((m.addr, Gossip((Suspect(node, m.inc, me),))))

    def _start_indirect(self, p: _Probe, now: float) -> None:
        p.indirect = True
        target = self._members.get(p.target)
        if target is None or not target.live:
            self._probe = None
            return
        k = self.config.indirect_checks
        helpers = self._pick(k, exclude=p.target, alive_only=True)
        p.expected = len(helpers)
        if helpers:
            self._c_indirect += 1
        for h in helpers:
            self._outbox.append(
                (h.addr, PingReq(p.seq, p.target, True, self._piggy(h.node)))
            )
        if self.config.tcp_fallback:
            self._streams.append((target.addr, Ping(p.seq, p.target)))

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self._c_fail += 1
        if p.expected > 0:
            missed = p.expected - p.nacks
            if missed > 0:
                self.awareness.apply_delta(missed)
        else:
            self.awareness.apply_delta(1)
        m = self._members.get(p.target)
        if m is None or not m.live:
            return
        self._apply(Suspect(m.node, m.inc, self.id), now, local=True)

    def _handle_ping_req(self, pkt: PingReq, src: str, now: float) -> None:
        target = self._members.get(pkt.target)
        if target is None or pkt.target == self.id:
            if pkt.nack:
                self._outbox.append((src, Nack(pkt.seq, self._piggy(self._by_addr.get(src)))))
            return
        seq = self._next_seq()
        deadline = now + self.config.probe_timeout
        self._relays[seq] = _Relay(src, pkt.seq, deadline, pkt.nack)
        if deadline < self._relay_min:
            self._relay_min = deadline
        self._outbox.append((target.addr, Ping(seq, target.node, self._piggy(target.node))))

    def _expire_relays(self, now: float) -> None:
        lo = _INF
        for seq, r in list(self._relays.items()):
            if r.deadline <= now:
                del self._relays[seq]
                if r.nack:
                    self._outbox.append(
                        (r.addr, Nack(r.seq, self._piggy(self._by_addr.get(r.addr))))
                    )
            elif r.deadline < lo:
                lo = r.deadline
        self._relay_min = lo

    # ---------------------------------------------------------------- dissemination

    def _piggy(self, dest: str | None) -> tuple[Update, ...]:
        q = self.queue
        if not len(q):
            return ()
        return q.take(self._budget, len(self._live) + 1, dest)

    def _enqueue(self, u: Update, now: float) -> None:
        self.queue.queue(u)
        if self._next_gossip == _INF:
            self._next_gossip = now + self.rng.random() * self.config.gossip_interval

    def _gossip_tick(self, now: float) -> None:
        cfg = self.config
        if not len(self.queue):
            self._next_gossip = _INF
            return
        self._next_gossip = now + cfg.gossip_interval
        targets = self._pick(cfg.gossip_nodes, exclude=None, alive_only=False)
        if self._recent_dead:
            horizon = now - cfg.gossip_to_dead_s
            for node, since in list(self._recent_dead.items()):
                if since < horizon:
                    del self._recent_dead[node]
            if self._recent_dead and self.rng.random() < 0.5:
                node = self.rng.choice(list(self._recent_dead))
                m = self._members.get(node)
                if m is not None:
                    targets.append(m)
        n = len(self._live) + 1
        for m in targets:
            ups = self.queue.take(self._budget, n, m.node)
            if not ups:
                break
            self._outbox.append((m.addr, Gossip(ups)))
        if not len(self.queue):
            self._next_gossip = _INF

    def _pick(self, k: int, exclude: str | None, alive_only: bool) -> list[Member]:
        live = self._live
        if not live or k <= 0:
            return []
        out: list[Member] = []
        members = self._members
        if len(live) <= 2 * k + 2:
            cands = list(live)
            self.rng.shuffle(cands)
            for node in cands:
                m = members[node]
                if node == exclude or (alive_only and m.state != STATE_ALIVE):
                    continue
                out.append(m)
                if len(out) == k:
                    break
            return out
        seen: set[str] = set()
        tries = 0
        rng = self.rng
        while len(out) < k and tries < 4 * k + 8:
            tries += 1
            node = live[int(rng.random() * len(live))]
            if node == exclude or node in seen:
                continue
            seen.add(node)
            m = members[node]
            if alive_only and m.state != STATE_ALIVE:
                continue
            out.append(m)
        return out

    def _pushpull_tick(self, now: float) -> None:
        cfg = self.config
        n = len(self._live) + 1
        self._next_pushpull = now + pushpull_scale(cfg.pushpull_interval, n)
        peers = self._pick(1, exclude=None, alive_only=True)
        if not peers:
            return
        self._c_pushpull += 1
        self._streams.append((peers[0].addr, PushPullReq(False, digest(self._members.values()))))

    def _merge(self, entries: Iterable[Entry], peer: str, now: float) -> None:
        self._sync_peer = peer
        try:
            self._merge_entries(entries, peer, now)
        finally:
            self._sync_peer = None

    def _merge_entries(self, entries: Iterable[Entry], peer: str, now: float) -> None:
        members = self._members
        for e in entries:
            if e.state == STATE_ALIVE:
                self._apply(Alive(e.node, e.inc, e.addr, e.meta), now)
            elif e.state == STATE_LEFT:
                if e.node not in members:
                    continue
                self._apply(Dead(e.node, e.inc, e.node), now)
            else:
                # A remote suspect or dead becomes a suspicion here (as in memberlist), so a
                # node that is in fact alive still gets its chance to refute.
                # It is *weak* (``_apply_dead``): after a split the peer's side holds ours as
                # dead, and that stale verdict must not kill anyone here.
                if e.node not in members:
                    if e.state == STATE_DEAD:
                        continue
                    self._apply(Alive(e.node, e.inc, e.addr, e.meta), now)
                self._apply_suspect(Suspect(e.node, e.inc, peer), now, False, weak=True)

    def _refute_digest(self, remote: Iterable[tuple[str, int, int]], now: float) -> None:
        """A push-pull digest that holds us as suspect/dead/left: refute before answering, so
        our reply carries the new incarnation and the peer's side takes us back at once."""
        me = self._me
        for node, inc, state in remote:
            if node == self.id:
                if state != STATE_ALIVE and inc >= me.inc and not self.leaving:
                    self._refute(inc, None, now)
                return

    def _live_addr(self, addr: str) -> bool:
        node = self._by_addr.get(addr)
        if node is None or node == self.id:
            return False
        m = self._members.get(node)
        return m is not None and m.live and m.addr == addr

    def _reconnect_addr(self, node: str) -> str | None:
        m = self._members.get(node)
        return m.addr if m is not None else None

    def _reconnect_tick(self, now: float) -> None:
        targets = self._reconnect.tick(
            now, len(self._live) + 1, self._me.addr, self._reconnect_addr, self._live_addr
        )
        if not targets or self.leaving:
            return
        me = self._me
        req = PushPullReq(True, digest(self._members.values()), (entry(me),))
        for addr in targets:
            self._c_reconnect += 1
            self._streams.append((addr, req))

    # ---------------------------------------------------------------- state changes

    def _live_add(self, node: str) -> None:
        if node not in self._live_pos:
            self._live_pos[node] = len(self._live)
            self._live.append(node)
            if self.directory is not None:
                self.directory.peer_joined(self._members[node].addr)

    def _live_remove(self, node: str) -> None:
        if self.directory is not None:
            self.directory.forget(node)
        pos = self._live_pos.pop(node, None)
        if pos is None:
            return
        last = self._live.pop()
        if last != node:
            self._live[pos] = last
            self._live_pos[last] = pos

    def _event(self, kind: str, m: Member, source: str, now: float) -> None:
        self._events.append(
            MembershipEvent(
                kind=kind,
                node_id=m.node,
                addr=m.addr,
                incarnation=m.inc,
                meta=node_meta(m.meta),
                source=source,
                at=now,
            )
        )

    def _apply(self, u: Update, now: float, local: bool = False) -> None:
        t = type(u)
        if t is Alive:
            assert isinstance(u, Alive)
            self._apply_alive(u, now)
        elif t is Suspect:
            assert isinstance(u, Suspect)
            self._apply_suspect(u, now, local, weak=self._stale_accuser(u.src))
        else:
            assert isinstance(u, Dead)
            self._apply_dead(u, now)

    def _apply_alive(self, u: Alive, now: float) -> None:
        node = u.node
        if node == self.id:
            me = self._me
            if not self.leaving and (
                u.inc > me.inc or (u.inc == me.inc and (u.addr != me.addr or u.meta != me.meta))
            ):
                self._refute(u.inc, None, now)
            return
        m = self._members.get(node)
        if m is None:
            m = Member(node, u.addr, u.meta, u.inc, STATE_ALIVE, now)
            self._members[node] = m
            self._by_addr[u.addr] = node
            self._live_add(node)
            self._order.add(node)
            self._event("join", m, node, now)
            self._enqueue(u, now)
            return
        if u.inc <= m.inc:
            return
        old = m.state
        m.inc = u.inc
        if m.addr != u.addr:
            if self._by_addr.get(m.addr) == node:
                del self._by_addr[m.addr]
            m.addr = u.addr
        self._by_addr[u.addr] = node
        m.meta = u.meta
        m.state = STATE_ALIVE
        m.since = now
        self._cancel_suspicion(node)
        if old == STATE_DEAD or old == STATE_LEFT:
            self._recent_dead.pop(node, None)
            self._tombstones.pop(node, None)
            self._reconnect.recovered(node)
            self._live_add(node)
            self._order.add(node)
            self._event("join", m, node, now)
        elif old == STATE_SUSPECT:
            self._event("alive", m, node, now)
        else:
            self._event("update", m, node, now)
        self._enqueue(u, now)

    def _stale_accuser(self, src: str) -> bool:
        """An accuser we hold dead (or do not know): its view is from across a split."""
        if src == self.id:
            return False
        a = self._members.get(src)
        return a is None or not a.live

    def _apply_suspect(
        self, u: Suspect, now: float, local: bool, weak: bool = False, verdict: bool = False
    ) -> None:
        node = u.node
        m = self._members.get(node)
        if m is None or u.inc < m.inc:
            if node == self.id:
                self._tell_suspecter(u.src)
            return
        if node == self.id:
            if not self.leaving:
                self._refute(u.inc, u.src, now)
            return
        cfg = self.config
        if local:
            self._weak.discard(node)  # our own probe failed: the suspicion is ours now
        s = self._suspicions.get(node)
        if s is not None and m.state == STATE_SUSPECT and u.inc == m.inc:
            if s.conclude(u.src) if verdict else s.confirm(u.src):
                if s.deadline < self._susp_min:
                    self._susp_min = s.deadline
                else:
                    self._recompute_susp_min()
                self._enqueue(u, now)
                if local and cfg.direct_refute:
                    self._outbox.append((m.addr, Gossip((u,))))
            return
        if m.state == STATE_DEAD or m.state == STATE_LEFT:
            return
        if m.state == STATE_SUSPECT and u.inc == m.inc:
            return  # suspect without a running timer (should not happen); nothing new
        m.inc = u.inc
        m.state = STATE_SUSPECT
        m.since = now
        n = len(self._live) + 1
        k = int(cfg.suspicion_mult) - 2
        if n - 2 < k or verdict:
            k = 0  # a verdict of a live member: the minimum timeout, as if fully confirmed
        lo, hi = suspicion_timeouts(
            cfg.suspicion_mult, cfg.suspicion_max_mult, n, cfg.probe_interval,
            cfg.suspicion_log_base,
        )
        s = Suspicion(now, k, lo, hi, u.src)
        self._suspicions[node] = s
        if s.deadline < self._susp_min:
            self._susp_min = s.deadline
        if local:
            self._c_susp += 1
        elif weak:
            self._weak.add(node)
        self._event("suspect", m, u.src, now)
        self._enqueue(u, now)
        if cfg.direct_refute:
            if local:
                self._outbox.append((m.addr, Gossip((u,))))
            elif weak:
                # the member may be alive and right here (a stale verdict from across a split):
                # it must refute (only it can raise its incarnation) before timers run out, so
                # it hears it at once, from us, and answers us directly
                self._outbox.append((m.addr, Gossip((Suspect(node, u.inc, self.id),))))

    def _apply_dead(self, u: Dead, now: float, own: bool = False) -> None:
        node = u.node
        m = self._members.get(node)
        if m is None or u.inc < m.inc:
            return
        if m.state == STATE_DEAD or m.state == STATE_LEFT:
            if m.state == STATE_DEAD and u.src == node and u.inc >= m.inc:
                m.state = STATE_LEFT  # a leave supersedes a death at the same incarnation
                self._reconnect.recovered(node)  # a left member is not reconnected
            return
        if node == self.id:
            if not self.leaving:
                self._refute(u.inc, u.src, now)
            return
        if u.src != node and not own:
            # Someone else's verdict is one more accusation, never a death by itself: a member
            # dies here when *our* suspicion timer runs out (a leave and our own verdict apply
            # at once). In one connected mesh the suspicion spreads before the verdict, and a
            # live member's verdict fully confirms ours (the minimum timeout from when *we*
            # started suspecting), so a dead member is dead here about as soon. A verdict from
            # the other side of a healed split is stale and only accuses: the member refutes.
            # On a member we hold alive a verdict starts a weak suspicion (told to the member at
            # once, and every probe period), at the minimum timeout if from a live member.
            self._apply_suspect(
                Suspect(node, u.inc, u.src), now, False, weak=True,
                verdict=not self._stale_accuser(u.src),
            )
            return
        m.inc = u.inc
        m.state = STATE_LEFT if u.src == node else STATE_DEAD
        m.since = now
        self._cancel_suspicion(node)
        self._live_remove(node)
        self._recent_dead[node] = now
        self._tombstones[node] = now
        if m.state == STATE_DEAD:
            self._reconnect.failed(node, now, not self._live)
        self._event("leave" if m.state == STATE_LEFT else "dead", m, u.src, now)
        self._enqueue(u, now)

    def _refute(self, inc: int, suspecter: str | None, now: float) -> None:
        me = self._me
        if inc >= MAX_INCARNATION:
            self._c_ceiling += 1  # nothing we could say would be newer (see the header)
            return
        if inc >= me.inc:
            me.inc = inc + 1
            self._c_refute += 1
            self.awareness.apply_delta(1)
            self._told = set()
            alive = Alive(self.id, me.inc, me.addr, me.meta)
            self._enqueue(alive, now)
            if self.config.refute_fanout:
                burst = Gossip((alive,))
                for m in self._pick(self.config.refute_fanout, exclude=None, alive_only=False):
                    self._told.add(m.node)
                    self._outbox.append((m.addr, burst))
            if (
                suspecter is not None and suspecter != self._sync_peer
                and suspecter != self.id and self._reconnect.failed_count()
            ):
                # We were held dead or suspect while we hold others dead: likely back from a
                # split. Sync with the node that told us (it is reachable now), so our own
                # stale verdicts cross too and their members refute, instead of waiting for
                # our next reconnect tick.
                s = self._members.get(suspecter)
                if s is not None:
                    self._c_reconnect += 1
                    self._streams.append((s.addr, PushPullReq(
                        True, digest(self._members.values()), (entry(me),)
                    )))
        if suspecter is not None:
            self._tell_suspecter(suspecter)

    def _tell_suspecter(self, suspecter: str) -> None:
        if not self.config.direct_refute or suspecter in self._told or suspecter == self.id:
            return
        m = self._members.get(suspecter)
        if m is None or not m.live:
            return
        self._told.add(suspecter)
        me = self._me
        self._outbox.append((m.addr, Gossip((Alive(self.id, me.inc, me.addr, me.meta),))))

    def _cancel_suspicion(self, node: str) -> None:
        self._weak.discard(node)
        s = self._suspicions.pop(node, None)
        if s is not None and s.deadline <= self._susp_min:
            self._recompute_susp_min()

    def _recompute_susp_min(self) -> None:
        self._susp_min = min((s.deadline for s in self._suspicions.values()), default=_INF)

    def _expire_suspicions(self, now: float) -> None:
        due = [n for n, s in self._suspicions.items() if s.deadline <= now]
        for node in due:
            del self._suspicions[node]
            self._weak.discard(node)
            m = self._members.get(node)
            if m is not None and m.state == STATE_SUSPECT:
                self._c_dead += 1
                self._apply_dead(Dead(node, m.inc, self.id), now, own=True)
        self._recompute_susp_min()

    def _reap(self, now: float) -> None:
        cfg = self.config
        self._next_reap = now + cfg.tombstone_s / 4
        left_horizon = now - cfg.tombstone_s
        # failed members stay while we reconnect to them; never shorter than tombstone_s, so
        # every tombstone outlives the transport's replay window
        keep_dead = cfg.tombstone_s
        if cfg.reconnect_interval_s > 0:
            keep_dead = max(keep_dead, cfg.reconnect_timeout_s)
        dead_horizon = now - keep_dead
        for node, since in list(self._tombstones.items()):
            m = self._members.get(node)
            if m is None or node == self.id or not (
                m.state == STATE_DEAD or m.state == STATE_LEFT
            ):
                del self._tombstones[node]
                continue
            if since >= (dead_horizon if m.state == STATE_DEAD else left_horizon):
                continue
            del self._tombstones[node]
            self._reconnect.recovered(node)
            del self._members[node]
            if self._by_addr.get(m.addr) == node:
                del self._by_addr[m.addr]
