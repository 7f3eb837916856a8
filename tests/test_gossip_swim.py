"""The SWIM + Lifeguard core, driven deterministically: directly and over the virtual network."""

from __future__ import annotations

import random

import msgspec
import pytest

from gossip.events import MembershipEvent
from gossip.messages import (
    STATE_ALIVE,
    Ack,
    Alive,
    Dead,
    Entry,
    Gossip,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPullReply,
    PushPullReq,
    Suspect,
    wire_meta,
)
from gossip.profile import SwimConfig, default_profile
from gossip.swim import Swim
from transport.memory import MemoryNetwork

META = NodeMeta(role="both", capacity_weight=1.0)
W = wire_meta(META)


def addr(i: int) -> str:
    return f"127.0.0.{i}:7946"


def core(i: int, cfg: SwimConfig | None = None, inc: int = 1, now: float = 0.0) -> Swim:
    return Swim(f"n{i}", addr(i), META, cfg or default_profile(), random.Random(i), now,
                incarnation=inc)


def seeded(n: int, cfg: SwimConfig | None = None) -> list[Swim]:
    cores = [core(i, cfg) for i in range(n)]
    entries = [Entry(c.id, 1, STATE_ALIVE, c.addr, W) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
    return cores


def mesh(
    n: int, seed: int = 1, cfg: SwimConfig | None = None, loss: float = 0.0
) -> tuple[MemoryNetwork, list[Swim], list[tuple[str, MembershipEvent]]]:
    net = MemoryNetwork(seed, loss=loss)
    events: list[tuple[str, MembershipEvent]] = []
    net.on_event = lambda a, ev: events.append((a, ev))
    cores = seeded(n, cfg)
    for c in cores:
        net.add(c)
    return net, cores, events


# ---------------------------------------------------------------- direct, step by step


def run_timers_until(c: Swim, t: float) -> None:
    while c.next_deadline() <= t:
        c.handle_timer(c.next_deadline())


def declare_dead(c: Swim, node: str, now: float) -> None:
    """As when ``c``'s own suspicion timer runs out (another node's verdict only accuses)."""
    inc = c.incarnation_of(node)
    assert inc is not None
    c._apply_dead(Dead(node, inc, c.id), now, own=True)


def test_ping_is_acked_and_misdirected_ping_dropped() -> None:
    c = core(0)
    c.handle_message(Ping(5, "n0"), addr(1), 0.1)
    assert c.take_outbox() == [(addr(1), Ack(5))]
    c.handle_message(Ping(6, "someone-else"), addr(1), 0.2)
    assert c.take_outbox() == []
    assert c.counters().misdirected == 1


def test_failed_probe_goes_indirect_then_suspects_and_tells_the_target() -> None:
    cores = seeded(5)
    c = cores[0]
    t = c.next_deadline()
    c.handle_timer(t)
    (dst, ping), = c.take_outbox()
    assert isinstance(ping, Ping)
    target = ping.target
    # no ack: at the direct timeout, k=3 PingReqs and a TCP fallback ping
    t2 = c.next_deadline()
    assert t2 == pytest.approx(t + c.config.probe_timeout)
    c.handle_timer(t2)
    out = c.take_outbox()
    assert sorted(type(p).__name__ for _, p in out) == ["PingReq"] * 3
    assert all(isinstance(p, PingReq) and p.target == target and p.seq == ping.seq for _, p in out)
    assert {d for d, _ in out}.isdisjoint({dst, c.addr})
    assert [type(m).__name__ for _, m in c.take_streams()] == ["Ping"]
    # one helper nacks, two say nothing: at the end of the period -> suspect
    c.handle_message(Nack(ping.seq), out[0][0], t2 + 0.01)
    c.handle_timer(t + c.config.probe_interval)
    assert c.state_of(target) == "suspect"
    evs = c.take_events()
    assert [(e.kind, e.node_id, e.source) for e in evs] == [("suspect", target, "n0")]
    # Lifeguard: two missing nacks raise the health score by two
    assert c.awareness.score == 2
    # direct refutation channel: the suspect update goes straight to the target too
    direct = [p for d, p in c.take_outbox() if d == dst]
    assert any(isinstance(p, Gossip) and p.updates[0] == Suspect(target, 1, "n0") for p in direct)


def test_ack_in_time_clears_probe_and_improves_health() -> None:
    c = seeded(4)[0]
    c.awareness.apply_delta(3)
    c.handle_timer(c.next_deadline())
    (_, ping), = c.take_outbox()
    assert isinstance(ping, Ping)
    c.handle_message(Ack(ping.seq), "x", c.next_deadline() - 0.1)
    assert c.awareness.score == 2
    run_timers_until(c, c.next_deadline() + 0.0)
    assert c.state_of(ping.target) == "alive"


def test_probe_interval_scales_with_health_score() -> None:
    c = seeded(4)[0]
    c.awareness.apply_delta(3)
    t = c.next_deadline()
    c.handle_timer(t)
    (_, ping), = c.take_outbox()
    assert isinstance(ping, Ping)
    c.handle_message(Ack(ping.seq), "x", t + 0.01)
    # period 0.5 s x (score 3 + 1): the next probe is 2 s later (score fell to 2 on the ack)
    assert c.next_deadline() == pytest.approx(t + 4 * c.config.probe_interval)


def test_ping_req_relays_ack_and_nacks_on_timeout() -> None:
    c = seeded(4)[0]
    c.handle_message(PingReq(77, "n2", True), addr(1), 1.0)
    (dst, ping), = c.take_outbox()
    assert dst == addr(2) and isinstance(ping, Ping)
    c.handle_message(Ack(ping.seq), addr(2), 1.05)
    assert c.take_outbox() == [(addr(1), Ack(77))]
    c.handle_message(PingReq(78, "n3", True), addr(1), 2.0)
    c.take_outbox()
    run_timers_until(c, 2.0 + c.config.probe_timeout)
    assert (addr(1), Nack(78)) in c.take_outbox()


def test_suspicion_confirmations_shorten_the_timeout_and_are_rebroadcast() -> None:
    c = seeded(10)[0]
    c.handle_message(Gossip((Suspect("n5", 1, "n1"),)), addr(1), 1.0)
    d0 = c._suspicions["n5"].deadline
    c.queue.clear()
    c.handle_message(Gossip((Suspect("n5", 1, "n2"),)), addr(2), 1.1)
    d1 = c._suspicions["n5"].deadline
    assert d1 < d0
    assert c.queue.pending("n5") == Suspect("n5", 1, "n2")
    c.queue.clear()
    c.handle_message(Gossip((Suspect("n5", 1, "n2"),)), addr(2), 1.2)  # duplicate
    assert c._suspicions["n5"].deadline == d1 and len(c.queue) == 0
    c.handle_message(Gossip((Suspect("n5", 1, "n3"),)), addr(3), 1.3)
    d2 = c._suspicions["n5"].deadline
    lo = c._suspicions["n5"].min_timeout
    assert d2 == pytest.approx(1.0 + lo)  # k = 2 confirmations reach the minimum
    c.take_events()
    run_timers_until(c, d2)
    assert c.state_of("n5") == "dead"
    assert [(e.kind, e.source) for e in c.take_events() if e.node_id == "n5"] == [("dead", "n0")]


def test_refutation_raises_incarnation_and_answers_the_suspecter_directly() -> None:
    c = seeded(5, msgspec.structs.replace(default_profile(), refute_fanout=0))[0]
    c.handle_message(Gossip((Suspect("n0", 1, "n3"),)), addr(3), 1.0)
    assert c.incarnation == 2
    assert c.queue.pending("n0") == Alive("n0", 2, addr(0), W)
    assert (addr(3), Gossip((Alive("n0", 2, addr(0), W),))) in c.take_outbox()
    assert c.awareness.score == 1  # having to refute is a sign of poor local health
    # a late confirmer of the old rumour also gets the refutation, once
    c.handle_message(Gossip((Suspect("n0", 1, "n4"),)), addr(4), 1.1)
    c.handle_message(Gossip((Suspect("n0", 1, "n4"),)), addr(4), 1.2)
    assert c.take_outbox() == [(addr(4), Gossip((Alive("n0", 2, addr(0), W),)))]
    assert c.incarnation == 2
    # declared dead: refute too
    c.handle_message(Gossip((Dead("n0", 2, "n1"),)), addr(1), 2.0)
    assert c.incarnation == 3


def test_refutation_burst_reaches_members_directly() -> None:
    c = seeded(10)[0]  # default profile: refute_fanout 64 >= 9 other members
    c.handle_message(Gossip((Suspect("n0", 1, "n3"),)), addr(3), 1.0)
    alive = Gossip((Alive("n0", 2, addr(0), W),))
    assert sorted(d for d, p in c.take_outbox() if p == alive) == sorted(
        addr(i) for i in range(1, 10)
    )
    c.handle_message(Gossip((Suspect("n0", 1, "n4"),)), addr(4), 1.1)
    assert c.take_outbox() == []  # n4 already has it


def test_restarted_node_outbids_its_old_incarnation() -> None:
    c = core(0, inc=1)
    c.handle_message(Gossip((Alive("n0", 9, addr(0), W),)), addr(1), 0.5)
    assert c.incarnation == 10


def test_old_alive_never_resurrects_the_dead_nor_undoes_a_leave() -> None:
    c = seeded(5)[0]
    declare_dead(c, "n1", 1.0)
    assert c.state_of("n1") == "dead"
    for _ in range(3):  # replays
        c.handle_message(Gossip((Alive("n1", 1, addr(1), W),)), addr(3), 2.0)
        c.handle_message(Gossip((Suspect("n1", 1, "n3"),)), addr(3), 2.0)
    assert c.state_of("n1") == "dead"
    c.handle_message(Gossip((Dead("n2", 1, "n2"),)), addr(2), 3.0)  # n2 leaves
    assert c.state_of("n2") == "left"
    c.handle_message(Gossip((Alive("n2", 1, addr(2), W),)), addr(3), 4.0)
    c.handle_message(Gossip((Dead("n2", 1, "n3"),)), addr(3), 4.0)
    assert c.state_of("n2") == "left"
    # a genuinely restarted node (higher incarnation) comes back
    c.take_events()
    c.handle_message(Gossip((Alive("n1", 2, addr(1), W),)), addr(1), 5.0)
    assert c.state_of("n1") == "alive"
    assert [(e.kind, e.incarnation) for e in c.take_events()] == [("join", 2)]


def test_alive_precedence_over_suspect_needs_a_higher_incarnation() -> None:
    c = seeded(5)[0]
    c.handle_message(Gossip((Suspect("n1", 3, "n2"),)), addr(2), 1.0)
    c.handle_message(Gossip((Alive("n1", 3, addr(1), W),)), addr(3), 1.1)
    assert c.state_of("n1") == "suspect"
    c.handle_message(Gossip((Alive("n1", 4, addr(1), W),)), addr(1), 1.2)
    assert c.state_of("n1") == "alive"
    assert "n1" not in c._suspicions


def test_buddy_system_tells_a_suspect_on_every_ping_to_it() -> None:
    c = seeded(3)[0]
    c.handle_message(Gossip((Suspect("n1", 1, "n2"),)), addr(2), 0.02)
    c.queue.clear()  # the rumour has run out of retransmissions
    c.take_outbox()
    for _ in range(4):
        c.handle_timer(c.next_deadline())
        for _dst, p in c.take_outbox():
            if isinstance(p, Ping) and p.target == "n1":
                assert p.updates[0] == Suspect("n1", 1, "n0")
                return
    pytest.fail("n1 was never probed")


def test_leave_gossips_left_and_stops_probing() -> None:
    c = seeded(5)[0]
    c.leave(1.0)
    out = c.take_outbox()
    assert out and all(p == Gossip((Dead("n0", 1, "n0"),)) for _, p in out)
    assert c.state_of("n0") == "left"
    c.handle_message(Gossip((Suspect("n0", 1, "n1"),)), addr(1), 1.1)
    assert c.incarnation == 1  # a leaving node does not refute
    run_timers_until(c, 10.0)
    assert not any(isinstance(p, Ping) for _, p in c.take_outbox())


def test_pushpull_join_exchanges_state_in_three_frames() -> None:
    a, b = core(0), core(1)
    a.join([b.addr], 0.0)
    ((dst, req),) = a.take_streams()
    assert dst == b.addr and isinstance(req, PushPullReq) and req.join
    reply = b.handle_stream(req, a.addr, 0.01)
    assert isinstance(reply, PushPullReply)
    assert b.state_of("n0") == "alive"  # the joiner's entry was pushed unasked
    final = a.handle_stream(reply, b.addr, 0.02)
    assert a.state_of("n1") == "alive"
    assert final is None  # nothing wanted
    c = core(2)
    c.seed_members([Entry("n7", 4, STATE_ALIVE, "h:7", W)], 0.0)
    reply2 = c.handle_stream(PushPullReq(False, (("n7", 5, STATE_ALIVE), ("n8", 1, 0))), "x", 1.0)
    assert isinstance(reply2, PushPullReply) and sorted(reply2.want) == ["n7", "n8"]


def test_update_meta_gossips_a_new_incarnation() -> None:
    c = core(0)
    c.update_meta(msgspec.structs.replace(META, capacity_weight=3.0), 1.0)
    assert c.incarnation == 2
    pending = c.queue.pending("n0")
    assert isinstance(pending, Alive) and pending.meta.capacity_weight == 3.0


# ---------------------------------------------------------------- over the virtual network


def test_crash_is_detected_by_every_member() -> None:
    net, cores, events = mesh(8)
    net.run_until(5.0)
    net.kill(addr(3))
    net.run_until(30.0)
    for c in cores:
        if c.id != "n3":
            assert c.state_of("n3") == "dead", c.id
    assert not [e for _, e in events if e.kind == "suspect" and e.node_id != "n3"]


def test_join_converges() -> None:
    net, cores, events = mesh(6)
    new = core(9, now=2.0)
    net.run_until(2.0)
    net.add(new)
    new.join([addr(0)], 2.0)
    net.flush(new.addr)
    net.run_until(5.0)
    for c in [*cores, new]:
        assert sorted(m.node_id for m in c.members() if m.state == "alive") == sorted(
            [f"n{i}" for i in range(6)] + ["n9"]
        ), c.id


def test_isolated_node_is_suspected_then_refutes_after_healing() -> None:
    net, cores, events = mesh(8)
    net.run_until(2.0)
    others = [addr(i) for i in range(8) if i != 2]
    net.partition([others, [addr(2)]])
    net.run_until(3.5)  # shorter than the 2 s minimum suspicion timeout after the first suspect
    assert any(e.kind == "suspect" and e.node_id == "n2" for _, e in events)
    net.heal()
    net.run_until(20.0)
    assert not any(e.kind == "dead" for _, e in events)
    assert cores[2].incarnation >= 2
    for c in cores:
        assert c.state_of("n2") == "alive"
        assert c.incarnation_of("n2") == cores[2].incarnation


def test_starved_node_refutes_before_anyone_declares_it_dead() -> None:
    net, cores, events = mesh(16, loss=0.05)
    net.starve(addr(4), 3.0, 2.0)
    net.run_until(30.0)
    assert any(e.kind == "suspect" and e.node_id == "n4" for _, e in events)
    assert not any(e.kind == "dead" for _, e in events)
    assert cores[4].incarnation >= 2


def test_indirect_probes_cover_a_broken_link() -> None:
    cfg = msgspec.structs.replace(default_profile(), tcp_fallback=False)
    net, cores, events = mesh(6, cfg=cfg)
    net.set_link_loss(addr(0), addr(1), 1.0)
    net.run_until(60.0)
    assert cores[0].counters().indirect_probes > 0
    assert not any(e.kind in ("suspect", "dead") for _, e in events)


def test_local_health_slows_an_isolated_node() -> None:
    net, cores, events = mesh(6)
    net.partition([[addr(i) for i in range(1, 6)], [addr(0)]])
    net.run_until(12.0)
    lonely = cores[0].counters()
    assert lonely.health_score == cores[0].config.awareness_max - 1
    assert lonely.probes < cores[1].counters().probes / 2


def test_graceful_leave_is_seen_as_left() -> None:
    net, cores, events = mesh(8)
    net.run_until(2.0)
    cores[5].leave(2.0)
    net.flush(addr(5))
    net.run_until(4.0)
    net.kill(addr(5))
    net.run_until(30.0)
    for c in cores:
        if c.id != "n5":
            assert c.state_of("n5") == "left"


def test_same_seed_same_history() -> None:
    def history(seed: int) -> list[tuple[str, str, str, float]]:
        net, cores, events = mesh(12, seed=seed, loss=0.1)
        net.run_until(5.0)
        net.kill(addr(7))
        net.run_until(40.0)
        return [(a, e.kind, e.node_id, e.at) for a, e in events]

    assert history(3) == history(3)
    assert history(3) != history(4)


def test_tombstones_are_reaped_after_their_time() -> None:
    """Left members go after tombstone_s; failed ones stay while we reconnect to them."""
    cfg = msgspec.structs.replace(default_profile(), reconnect_timeout_s=600.0)
    c = seeded(5, cfg)[0]
    declare_dead(c, "n1", 1.0)
    c.handle_message(Gossip((Dead("n4", 1, "n4"),)), addr(4), 1.0)
    assert (c.state_of("n1"), c.state_of("n4")) == ("dead", "left")
    run_timers_until(c, 1.0 + cfg.tombstone_s / 2)
    # still remembered: a replay inside the window is refused
    assert (c.state_of("n1"), c.state_of("n4")) == ("dead", "left")
    run_timers_until(c, 1.0 + cfg.tombstone_s * 1.5)
    assert c.state_of("n4") is None
    assert c.state_of("n1") == "dead" and "n1" in c.failed_members()  # (n2, n3: no network)
    run_timers_until(c, 1.0 + cfg.reconnect_timeout_s + cfg.tombstone_s / 2)
    assert c.state_of("n1") is None and "n1" not in c.failed_members()
    # without reconnect, a failed member is reaped like any tombstone
    c2 = seeded(4, msgspec.structs.replace(default_profile(), reconnect_interval_s=0.0))[0]
    declare_dead(c2, "n1", 1.0)
    assert c2.state_of("n1") == "dead" and c2.failed_members() == []
    run_timers_until(c2, 1.0 + cfg.tombstone_s * 1.5)
    assert c2.state_of("n1") is None
