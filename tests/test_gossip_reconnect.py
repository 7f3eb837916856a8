"""Reconnecting after a split, and the push-pull that merges the sides, step by step.

``gossip/reconnect.py`` (whom to re-contact, how often) alone, then the core: a failed member is
re-contacted, a left one never; one push-pull between the sides carries both refutations;
another node's death verdict only accuses (a stale one from across a split is refuted); a member
we hold dead that pings us is told; seeds that are not members and a restart's snapshot are
retried.
"""

from __future__ import annotations

import random

import msgspec
import pytest
from test_gossip_swim import (  # shared with the SWIM tests
    W,
    addr,
    core,
    declare_dead,
    run_timers_until,
)

from gossip.messages import (
    STATE_ALIVE,
    STATE_DEAD,
    Ack,
    Alive,
    Dead,
    Entry,
    Gossip,
    Ping,
    PushPullFinal,
    PushPullReply,
    PushPullReq,
    Suspect,
)
from gossip.profile import default_profile
from gossip.reconnect import Reconnect
from gossip.swim import Swim


def with_members(c: Swim, states: dict[int, int], inc: int = 1) -> Swim:
    c.seed_members([Entry(f"n{i}", inc, st, addr(i), W) for i, st in states.items()], 0.0)
    return c


def join_streams(c: Swim) -> list[str]:
    return [d for d, m in c.take_streams() if isinstance(m, PushPullReq) and m.join]


def step(c: Swim, t: float, up: set[str]) -> list[tuple[str, object]]:
    """Run the core's timers to ``t``; the members at ``up`` answer its probes. Returns what
    else it sent."""
    other: list[tuple[str, object]] = []
    while c.next_deadline() <= t:
        now = c.next_deadline()
        c.handle_timer(now)
        for dst, p in c.take_outbox():
            if isinstance(p, Ping) and dst in up:
                c.handle_message(Ack(p.seq), dst, now + 0.001)
            else:
                other.append((dst, p))
    return other


# ---------------------------------------------------------------- gossip/reconnect.py alone


def test_reconnect_picks_failed_members_with_probability_failed_over_alive() -> None:
    r = Reconnect(10.0, 2.0, random.Random(1))
    assert r.next_deadline() == float("inf")  # nothing to do, no timer
    r.failed("a", 0.0, alone=False)
    assert 0.0 <= r.next_deadline() < 10.0  # armed at a random phase
    addr_of = {"a": "h:1", "b": "h:2"}.get
    picks = []
    t = r.next_deadline()
    for _ in range(1000):
        picks += r.tick(t, 5, "me:1", addr_of, lambda a: False)
        t = r.next_deadline()
    assert t > 9990.0  # one tick per interval
    assert set(picks) == {"h:1"}
    assert 150 < len(picks) < 250  # probability 1 failed / 5 alive
    r.failed("b", t, alone=False)
    picks = []
    for _ in range(1000):
        picks += r.tick(t, 2, "me:1", addr_of, lambda a: False)
        t = r.next_deadline()
    assert len(picks) == 1000 and {"h:1", "h:2"} == set(picks)  # 2 failed / 2 alive: always
    r.recovered("a")
    r.recovered("b")
    r.tick(t, 2, "me:1", addr_of, lambda a: False)
    assert r.next_deadline() == float("inf")


def test_reconnect_alone_retries_every_seed_and_rejoin_target_then_forgets_the_snapshot() -> None:
    r = Reconnect(10.0, 2.0, random.Random(2))
    r.add_seeds(["s:1", "me:1"], 0.0, alone=True)
    r.add_rejoin(["old:1", "s:1"], 0.0, alone=True)
    assert r.next_deadline() < 2.0
    out = r.tick(r.next_deadline(), 1, "me:1", lambda n: None, lambda a: False)
    assert out == ["s:1", "old:1"]  # never ourselves, no duplicates
    t = r.next_deadline()
    assert r.tick(t, 1, "me:1", lambda n: None, lambda a: False) == ["s:1", "old:1"]
    # joined: the snapshot is forgotten; a seed that is a live member costs nothing, one that
    # is not (the other half of a mesh that formed apart) is a candidate
    t = r.next_deadline()
    assert r.tick(t, 3, "me:1", lambda n: None, lambda a: a == "s:1") == []
    seen = []
    for _ in range(100):
        t = r.next_deadline()
        seen += r.tick(t, 3, "me:1", lambda n: None, lambda a: False)
    assert set(seen) == {"s:1"} and 15 < len(seen) < 55  # 1 candidate / 3 alive
    assert r.seeds == ("s:1", "me:1")


def test_reconnect_interval_zero_only_retries_seeds_while_alone() -> None:
    r = Reconnect(0.0, 2.0, random.Random(3))
    r.failed("a", 0.0, alone=False)
    assert r.failed_count() == 0
    r.add_seeds(["s:1"], 0.0, alone=False)
    for _ in range(50):
        assert r.tick(r.next_deadline(), 4, "me:1", lambda n: "h:1", lambda a: False) == []
    assert r.tick(r.next_deadline(), 1, "me:1", lambda n: "h:1", lambda a: False) == ["s:1"]
    with pytest.raises(ValueError):
        Reconnect(-1.0, 2.0, random.Random(0))


# ---------------------------------------------------------------- the core


def test_failed_member_is_reconnected_with_a_join_push_pull_and_a_left_one_never() -> None:
    c = with_members(core(0), {1: STATE_ALIVE, 2: STATE_ALIVE, 3: STATE_ALIVE})
    declare_dead(c, "n1", 1.0)
    c.handle_message(Gossip((Dead("n3", 1, "n3"),)), addr(3), 1.0)
    assert (c.state_of("n1"), c.state_of("n3")) == ("dead", "left")
    assert c.failed_members() == ["n1"]
    targets: list[str] = []
    for t in range(2, 302):
        step(c, float(t), {addr(2)})
        for dst, m in c.take_streams():
            if isinstance(m, PushPullReq) and m.join:
                targets.append(dst)
                assert m.entries == (Entry("n0", 1, STATE_ALIVE, addr(0), W),)
                assert ("n1", 1, STATE_DEAD) in m.digest
    # every 10 s with probability 1 failed / 2 alive (we and n2; n3 left): ~15 in 300 s
    assert set(targets) == {addr(1)} and 5 <= len(targets) <= 25
    assert c.counters().reconnects == len(targets)


def test_one_push_pull_across_a_split_carries_both_refutations() -> None:
    # side A = {a0, a1}, side B = {b2, b3}; each holds the other side dead at incarnation 1
    a = with_members(core(0), {1: STATE_ALIVE, 2: STATE_DEAD, 3: STATE_DEAD})
    b = with_members(core(2), {3: STATE_ALIVE, 0: STATE_DEAD, 1: STATE_DEAD})
    req = PushPullReq(True, tuple((m.node_id, m.incarnation, {"alive": 0, "dead": 2}[m.state])
                                  for m in a.members()), (Entry("n0", 1, STATE_ALIVE, addr(0), W),))
    reply = b.handle_stream(req, addr(0), 1.0)
    # b saw itself dead in a's digest and refuted before answering
    assert b.incarnation == 2
    assert isinstance(reply, PushPullReply)
    sent = {e.node: (e.inc, e.state) for e in reply.entries}
    assert sent["n2"] == (2, STATE_ALIVE) and sent["n0"] == (1, STATE_DEAD)
    final = a.handle_stream(reply, addr(2), 1.01)
    assert a.state_of("n2") == "alive" and a.incarnation == 2  # took b back, and refuted
    assert isinstance(final, PushPullFinal)
    assert Entry("n0", 2, STATE_ALIVE, addr(0), W) in final.entries  # a's refutation crosses
    assert b.handle_stream(final, addr(0), 1.02) is None
    assert b.state_of("n0") == "alive" and b.incarnation_of("n0") == 2
    # a's stale verdict on b's side-mate n3 is only a suspicion at b, told straight to n3
    assert b.state_of("n3") == "suspect"
    told = [p for d, p in b.take_outbox() if d == addr(3)]
    assert Gossip((Suspect("n3", 1, "n2"),)) in told
    # n3 refutes straight back to b: nobody on b's side ever marks n3 dead
    n3 = with_members(core(3), {2: STATE_ALIVE, 0: STATE_DEAD, 1: STATE_DEAD})
    n3.handle_message(Gossip((Suspect("n3", 1, "n2"),)), addr(2), 1.03)
    back = [p for d, p in n3.take_outbox() if d == addr(2)]
    assert Gossip((Alive("n3", 2, addr(3), W),)) in back
    b.handle_message(back[0], addr(3), 1.04)
    assert b.state_of("n3") == "alive"


def test_another_nodes_death_verdict_only_accuses_and_a_live_member_refutes_it() -> None:
    c = with_members(core(0), {i: STATE_ALIVE for i in range(1, 7)})
    declare_dead(c, "n4", 1.0)  # n4 is held dead here: the other side of a split
    c.take_outbox()
    c.take_events()
    c.handle_message(Gossip((Dead("n1", 1, "n4"),)), addr(4), 2.0)  # n4's stale verdict on n1
    assert c.state_of("n1") == "suspect"
    assert (addr(1), Gossip((Suspect("n1", 1, "n0"),))) in c.take_outbox()  # told straight away
    for _ in range(3):  # more copies of the verdict change nothing
        c.handle_message(Gossip((Dead("n1", 1, "n4"),)), addr(4), 2.1)
    assert c.state_of("n1") == "suspect"
    c.handle_message(Gossip((Alive("n1", 2, addr(1), W),)), addr(1), 2.2)  # n1 refutes
    assert c.state_of("n1") == "alive"
    assert "dead" not in [e.kind for e in c.take_events() if e.node_id == "n1"]
    # even after a suspicion we heard of, verdicts only shorten our timer to the minimum
    c.handle_message(Gossip((Suspect("n2", 1, "n5"),)), addr(5), 3.0)
    for judge in ("n3", "n5", "n6"):
        c.handle_message(Gossip((Dead("n2", 1, judge),)), addr(3), 3.1)
    assert c.state_of("n2") == "suspect"
    lo = c._suspicions["n2"].min_timeout
    run_timers_until(c, 3.0 + lo - 0.01)
    assert c.state_of("n2") == "suspect"
    run_timers_until(c, 3.0 + lo)
    assert c.state_of("n2") == "dead"
    assert [(e.kind, e.source) for e in c.take_events() if e.node_id == "n2"][-1] == ("dead", "n0")
    # a live member's verdict on a member we never heard suspected: the minimum timeout too
    c.handle_message(Gossip((Dead("n3", 1, "n5"),)), addr(5), 10.0)
    assert c.state_of("n3") == "suspect"
    run_timers_until(c, 10.0 + c._suspicions["n3"].min_timeout)
    assert c.state_of("n3") == "dead"


def test_a_member_held_dead_that_pings_us_is_told_and_comes_back() -> None:
    c = with_members(core(0), {1: STATE_ALIVE, 2: STATE_ALIVE})
    declare_dead(c, "n1", 1.0)
    c.take_outbox()
    c.handle_message(Ping(9, "n0"), addr(1), 2.0)
    ((dst, ack),) = c.take_outbox()
    assert dst == addr(1) and isinstance(ack, Ack) and ack.updates[0] == Suspect("n1", 1, "n0")
    lonely = with_members(core(1), {0: STATE_ALIVE, 2: STATE_ALIVE})
    lonely.handle_message(ack, addr(0), 2.01)
    assert lonely.incarnation == 2
    back = [p for d, p in lonely.take_outbox() if d == addr(0)]
    c.handle_message(back[0], addr(1), 2.02)
    assert c.state_of("n1") == "alive" and c.failed_members() == []


def test_a_node_back_from_a_split_syncs_with_whoever_told_it_so_its_verdicts_cross() -> None:
    z = with_members(core(1), {0: STATE_ALIVE, 2: STATE_DEAD, 3: STATE_DEAD})
    z.handle_message(Gossip((Suspect("n1", 1, "n0"),)), addr(0), 1.0)  # "you are suspected"
    assert z.incarnation == 2
    ((dst, req),) = z.take_streams()
    assert dst == addr(0) and isinstance(req, PushPullReq) and req.join
    m = with_members(core(0), {1: STATE_DEAD, 2: STATE_ALIVE, 3: STATE_ALIVE})
    reply = m.handle_stream(req, addr(1), 1.01)
    assert m.state_of("n1") == "alive"  # z's new incarnation took it back
    assert isinstance(reply, PushPullReply) and sorted(reply.want) == ["n2", "n3"]
    final = z.handle_stream(reply, addr(0), 1.02)
    assert isinstance(final, PushPullFinal)
    m.handle_stream(final, addr(1), 1.03)
    # z's stale verdicts reached m as suspicions, told straight to n2 and n3, which refute
    assert (m.state_of("n2"), m.state_of("n3")) == ("suspect", "suspect")
    told = {d for d, p in m.take_outbox() if isinstance(p, Gossip) and isinstance(p.updates[0], Suspect)}
    assert {addr(2), addr(3)} <= told
    # a node that holds nobody dead (an ordinary false suspicion) just refutes
    ok = with_members(core(4), {0: STATE_ALIVE, 2: STATE_ALIVE})
    ok.handle_message(Gossip((Suspect("n4", 1, "n0"),)), addr(0), 1.0)
    assert ok.incarnation == 2 and ok.take_streams() == []


def test_suspects_of_our_own_are_reminded_every_probe_period() -> None:
    c = with_members(core(0), {i: STATE_ALIVE for i in range(1, 8)})
    # our own probe of n3 failed: we suspect it ourselves
    c._apply(Suspect("n3", 1, "n0"), 1.0, local=True)
    c.take_outbox()
    up = {addr(i) for i in range(1, 8) if i != 3}
    sent = step(c, 1.0 + 5 * c.config.probe_interval, up)
    reminders = sum(1 for d, p in sent if d == addr(3) and p == Gossip((Suspect("n3", 1, "n0"),)))
    assert reminders >= 4  # once per probe period (the probe of n3 itself carries it otherwise)
    # a suspicion we only heard of is the suspecter's to remind
    c2 = with_members(core(0), {i: STATE_ALIVE for i in range(1, 8)})
    c2.handle_message(Gossip((Suspect("n3", 1, "n2"),)), addr(2), 1.0)
    c2.take_outbox()
    sent = step(c2, 3.0, {addr(i) for i in range(1, 8)})
    assert (addr(3), Gossip((Suspect("n3", 1, "n0"),))) not in sent


def test_seeds_are_retried_while_alone_and_when_they_are_not_members() -> None:
    cfg = msgspec.structs.replace(default_profile(), tcp_fallback=False)
    c = core(0, cfg)
    c.add_seeds([addr(9), addr(0)], 0.0)
    assert join_streams(c) == [addr(9)]  # contacted at once, never ourselves
    run_timers_until(c, 6.0)
    assert join_streams(c).count(addr(9)) >= 2  # alone: every join_retry_s
    # in a mesh whose members do not include the seed: still re-contacted now and then
    with_members(c, {1: STATE_ALIVE})
    c.take_streams()
    hits = 0
    for t in range(7, 607):
        step(c, float(t), {addr(1)})
        hits += join_streams(c).count(addr(9))
    assert 10 <= hits <= 50  # every 10 s with probability 1 candidate / 2 alive
    # a seed that is a live member is never contacted again
    c.seed_members([Entry("n9", 1, STATE_ALIVE, addr(9), W)], 607.0)
    for t in range(608, 908):
        step(c, float(t), {addr(1), addr(9)})
        assert addr(9) not in join_streams(c)
    assert c.state_of("n9") == "alive"


def test_rejoin_targets_are_retried_while_alone_then_forgotten() -> None:
    c = core(5, inc=4)
    c.rejoin([addr(1), addr(2), addr(5)], 0.0)
    assert sorted(join_streams(c)) == [addr(1), addr(2)]
    run_timers_until(c, 4.5)
    assert join_streams(c).count(addr(1)) == 2
    with_members(c, {1: STATE_ALIVE})  # joined
    c.take_streams()
    for t in range(5, 60):
        step(c, float(t), {addr(1)})
        assert addr(2) not in join_streams(c)
    c.rejoin([addr(7)], 60.0)  # already in a mesh: ignored
    assert addr(7) not in join_streams(c)


def test_snapshot_addrs_prefers_the_previous_snapshot_and_is_bounded() -> None:
    c = with_members(core(0), {i: STATE_ALIVE for i in range(1, 11)})
    declare_dead(c, "n4", 1.0)
    snap = c.snapshot_addrs(4)
    assert len(snap) == 4 and addr(0) not in snap and addr(4) not in snap
    assert c.snapshot_addrs(4, prefer=snap) == snap
    again = c.snapshot_addrs(4, prefer=[addr(4), snap[0], "x:1"])
    assert again[0] == snap[0] and addr(4) not in again and len(again) == 4
    assert sorted(c.snapshot_addrs(100)) == sorted(addr(i) for i in range(1, 11) if i != 4)
