"""Partitions of any length heal, and a restarted node gets back in: real cores, virtual time.

The partition runs use the simulator (``simulations/membership.py``: N real ``Swim`` cores over
``transport/memory.py``, 1% loss, seeded): a random group is cut off at t = 60 for 10, 60 or 300
seconds; after ``heal()`` every node must see every other node alive within 30 s of virtual time,
and no member of a side may ever be marked dead by a member of the same side (the part that was
never cut off in particular). The others drive ``MemoryNetwork`` directly.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from gossip.messages import STATE_ALIVE, Entry, NodeMeta, wire_meta
from gossip.profile import SwimConfig, default_profile
from gossip.swim import Swim
from simulations.membership import Scenario, simulate
from transport.memory import MemoryNetwork

META = NodeMeta(role="both")
W = wire_meta(META)
HEAL_LIMIT_S = 30.0


@pytest.mark.parametrize(
    ("nodes", "cut", "length_s", "seed"),
    [
        (16, 6, 10.0, 1),  # 10 vs 6
        (16, 6, 60.0, 2),
        (16, 6, 300.0, 3),
        (16, 1, 60.0, 4),  # a single node cut off from 15
        (24, 2, 10.0, 5),
        (24, 3, 300.0, 6),
        (24, 1, 300.0, 7),
        (32, 3, 60.0, 8),
    ],
)
def test_partition_heals_within_30s_without_false_deaths(
    nodes: int, cut: int, length_s: float, seed: int
) -> None:
    r = simulate(Scenario(nodes=nodes, partition_s=length_s, partition_nodes=cut,
                          duration=60 + length_s + 90, seed=seed, updates=0))
    assert r.cross_deaths > 0  # the sides did declare each other dead
    assert r.heal_s is not None and r.heal_s <= HEAL_LIMIT_S, r.heal_s
    assert r.false_deaths_uncut == 0
    assert r.false_deaths_within_sides == 0
    assert r.false_deaths == 0


# ---------------------------------------------------------------- MemoryNetwork directly


def addr(i: int, port: int = 7946) -> str:
    return f"10.0.0.{i}:{port}"


def make(i: int, cfg: SwimConfig, now: float = 0.0, inc: int = 1, port: int = 7946) -> Swim:
    return Swim(f"n{i}", addr(i, port), META, cfg, random.Random(1000 + i + port), now,
                incarnation=inc)


def mesh(ids: list[int], net: MemoryNetwork, cfg: SwimConfig) -> list[Swim]:
    cores = [make(i, cfg) for i in ids]
    entries = [Entry(c.id, 1, STATE_ALIVE, c.addr, W) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
        net.add(c)
    return cores


def alive_views(cores: list[Swim]) -> dict[str, set[str]]:
    return {c.id: {m.node_id for m in c.members() if m.state == "alive"} for c in cores}


def run_until_one_mesh(net: MemoryNetwork, cores: list[Swim], t0: float, limit: float) -> float:
    everyone = {c.id for c in cores}
    t = t0
    while t < t0 + limit:
        t += 0.25
        net.run_until(t)
        if all(v == everyone for v in alive_views(cores).values()):
            return t - t0
    views = {k: sorted(everyone - v) for k, v in alive_views(cores).items()}
    pytest.fail(f"not one mesh {limit} s after t={t0}: missing {views}")


def test_killed_first_node_restarts_on_a_new_address_with_no_seeds_and_gets_back_in() -> None:
    """The mesh's first node (no seeds of its own) is killed; it restarts on a new port with only
    the member addresses its driver saved (``snapshot_addrs`` -> ``rejoin``), while the network
    still drops its packets for 5 s, so the first tries fail and must be retried."""
    cfg = default_profile()
    net = MemoryNetwork(11)
    cores = mesh(list(range(8)), net, cfg)
    first = cores[0]
    net.run_until(5.0)
    snapshot = first.snapshot_addrs(64)
    assert sorted(snapshot) == sorted(addr(i) for i in range(1, 8))
    old_inc = first.incarnation
    net.kill(first.addr)
    net.run_until(30.0)
    assert all(c.state_of("n0") == "dead" for c in cores[1:])
    fresh = make(0, cfg, now=30.0, inc=old_inc + 1, port=7000)  # a new port: a new address
    net.add(fresh)
    net.partition([[fresh.addr], [c.addr for c in cores[1:]]])
    net.call_at(35.0, net.heal)
    fresh.rejoin(snapshot, 30.0)
    net.flush(fresh.addr)
    took = run_until_one_mesh(net, [fresh, *cores[1:]], 30.0, HEAL_LIMIT_S)
    assert 5.0 <= took <= HEAL_LIMIT_S
    for c in cores[1:]:
        assert c.members()[0].node_id == "n0" and c.members()[0].addr == fresh.addr


def test_two_halves_that_formed_apart_merge_through_their_seeds() -> None:
    """Each half started while the other was unreachable, so neither holds the other as failed:
    only re-contacting seeds that are not members merges them."""
    cfg = default_profile()
    net = MemoryNetwork(12)
    a = mesh([0, 1, 2, 3, 4, 5], net, cfg)
    b = mesh([6, 7, 8, 9], net, cfg)
    net.partition([[c.addr for c in a], [c.addr for c in b]])
    for c in [*a, *b]:
        c.add_seeds([addr(0), addr(6)], 0.0)
        net.flush(c.addr)
    net.run_until(60.0)
    assert alive_views(a)["n0"] == {"n0", "n1", "n2", "n3", "n4", "n5"}
    net.heal()
    run_until_one_mesh(net, [*a, *b], 60.0, HEAL_LIMIT_S)


def test_a_split_longer_than_reconnect_timeout_heals_through_the_seeds() -> None:
    cfg = msgspec.structs.replace(default_profile(), reconnect_timeout_s=60.0)
    net = MemoryNetwork(13)
    cores = mesh(list(range(10)), net, cfg)
    for c in cores:
        c.add_seeds([addr(0), addr(9)], 0.0)
    net.run_until(5.0)
    net.partition([[c.addr for c in cores[:7]], [c.addr for c in cores[7:]]])
    net.run_until(405.0)
    # the failed members were reaped (tombstone_s = 120 s > reconnect_timeout_s)
    assert cores[0].state_of("n9") is None and cores[9].state_of("n0") is None
    net.heal()
    run_until_one_mesh(net, cores, 405.0, HEAL_LIMIT_S)
