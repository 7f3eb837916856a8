"""Self-healing decisions of ``Mesh``, with fake gossip, data plane and store (no I/O): who pushes
which block after a join, a death or a failed replication, and that a pass with nothing moved
looks at nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import trio

from memkv_mesh.mesh import Mesh
from memkv_mesh.placement import Candidate, Rendezvous


@dataclass
class _Meta:
    role: str
    data_addr: str
    capacity_weight: float = 1.0


@dataclass
class _Member:
    node_id: str
    meta: _Meta
    state: str = "alive"


@dataclass
class _Gossip:
    live: list[str]
    suspect: set[str] = field(default_factory=set)

    def members(self) -> list[_Member]:
        return [_Member(n, _Meta("flash", f"{n}:1"), "suspect" if n in self.suspect else "alive") for n in self.live]


@dataclass
class _Plane:
    fail: set[str] = field(default_factory=set)
    pushed: list[tuple[str, bytes]] = field(default_factory=list)

    async def push(self, addr: str, keys: list[bytes], *, expect_node: str | None = None) -> list[bool]:
        node = addr.split(":")[0]
        if node in self.fail:
            raise OSError(f"{node} is unreachable")
        self.pushed += [(node, k) for k in keys]
        return [True] * len(keys)


class _Store:
    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def held_keys(self) -> list[bytes]:
        return list(self.keys)

    def contains(self, keys: list[bytes]) -> list[bool]:
        held = set(self.keys)
        return [k in held for k in keys]

    def lengths(self, keys: list[bytes]) -> list[int]:
        return [100] * len(keys)


KEYS = [os.urandom(32) for _ in range(3000)]


def _mesh(me: str, live: list[str], keys: list[bytes] = KEYS) -> tuple[Mesh, _Gossip, _Plane]:
    g, p = _Gossip(live), _Plane()
    m = Mesh(node_id=me, gossip=g, dataplane=p, store=_Store(keys), replicas=2, repair_bytes_per_s=1e12)
    return m, g, p


def _owners(live: list[str], k: bytes) -> list[str]:
    return Rendezvous([Candidate(n) for n in live]).owners(k, 2)


async def test_first_pass_pushes_what_this_node_leads_and_a_quiet_pass_looks_at_nothing() -> None:
    live = ["a", "b", "c", "d"]
    m, _, p = _mesh("a", live)
    await m.repair_pass()
    # a pushes exactly the blocks it is first owner of, to their second owner.
    want = sorted((o[1], k) for k in KEYS if (o := _owners(live, k))[0] == "a")
    assert sorted(p.pushed) == want and want
    p.pushed.clear()
    assert await m.repair_pass() == 0 and p.pushed == []  # nothing moved, nothing failed


async def test_a_death_moves_only_the_dead_nodes_blocks_and_one_survivor_sends_each() -> None:
    before = ["a", "b", "c", "d", "e"]
    after = ["a", "b", "c", "e"]
    sends: list[tuple[str, str, bytes]] = []
    for me in after:  # every survivor holds every block (a worst case for duplicate pushes)
        m, g, p = _mesh(me, before)
        await m.repair_pass()
        p.pushed.clear()
        g.live = after  # d dies
        await m.repair_pass()
        sends += [(me, dst, k) for dst, k in p.pushed]
    moved = {k for k in KEYS if "d" in _owners(before, k)}
    assert {k for _, _, k in sends} == moved  # only blocks d owned travel
    for src, dst, k in sends:
        was, now = _owners(before, k), _owners(after, k)
        assert dst in now and dst not in was  # to the new owner only
        assert src == next(o for o in was if o in now)  # from the first surviving owner
    assert len(sends) == len(moved)  # one copy each


async def test_blocks_the_replicator_gave_up_on_are_pushed_by_the_next_repair_pass() -> None:
    live = ["b", "c", "d"]
    m, _, p = _mesh("g", live)  # a gpu node: owner of nothing
    await m.repair_pass()
    assert p.pushed == []  # not an owner: the first pass leaves blocks to their owners
    put = KEYS[:50]
    m._to_repair(put)  # what the replicator does with blocks it cannot place or keeps failing
    await m.repair_pass()  # the ring did not move, but the handed-over keys are looked at
    assert sorted(p.pushed) == sorted((o, k) for k in put for o in _owners(live, k))
    p.pushed.clear()
    assert await m.repair_pass() == 0 and p.pushed == []


async def test_a_join_brings_the_newcomer_its_blocks() -> None:
    before, after = ["a", "b"], ["a", "b", "c"]
    m, g, p = _mesh("a", before)
    await m.repair_pass()
    p.pushed.clear()
    g.live = after
    await m.repair_pass()
    for dst, k in p.pushed:
        assert dst == "c" and "c" in _owners(after, k)
    assert {k for _, k in p.pushed} == {
        k for k in KEYS if "c" in _owners(after, k) and next(o for o in _owners(before, k) if o in _owners(after, k)) == "a"
    }


async def test_handoff_sends_owned_blocks_to_the_owners_that_remain() -> None:
    live = ["a", "b", "c", "d"]
    m, _, p = _mesh("b", live)
    with trio.fail_after(10):
        n = await m.handoff()
    rest = ["a", "c", "d"]
    want = sorted((o, k) for k in KEYS if "b" in _owners(live, k) for o in _owners(rest, k))
    assert sorted(p.pushed) == want and n == len(want)


def test_placement_helpers_agree() -> None:
    # the fakes above rely on Mesh placing with the same ring as Rendezvous over the live ids
    m, _, _ = _mesh("a", ["a", "b", "c"])
    assert [m.owners(k) for k in KEYS[:20]] == [_owners(["a", "b", "c"], k) for k in KEYS[:20]]


async def test_a_suspect_keeps_its_blocks_but_is_tried_last() -> None:
    live = ["a", "b", "c", "d"]
    m, g, p = _mesh("g", live)
    await m.repair_pass()
    p.pushed.clear()
    g.suspect = {"b"}  # suspected, not yet confirmed dead: often refuted
    assert await m.repair_pass() == 0 and p.pushed == []  # owners did not move
    keys = [k for k in KEYS if _owners(live, k)[0] == "b"][:10]
    for k, plan in zip(keys, m._peers_for(keys), strict=True):
        assert plan == [o for o in _owners(live, k) if o != "b"] + ["b"]


async def test_a_handed_over_block_is_retried_until_it_lands() -> None:
    live = ["b", "c", "d"]
    m, _, p = _mesh("g", live)
    await m.repair_pass()
    put = KEYS[:50]
    p.fail = {"b"}
    m._to_repair(put)
    await m.repair_pass()  # b still unreachable (a suspect for longer than one interval)
    p.fail = set()
    p.pushed.clear()
    await m.repair_pass()  # b is back: the copies it lacks go now
    to_b = [k for k in put if "b" in _owners(live, k)]
    assert sorted(k for n, k in p.pushed if n == "b") == sorted(to_b) and to_b


async def test_a_failed_repair_push_is_retried_by_the_next_pass() -> None:
    before, after = ["a", "b", "c"], ["a", "b", "c", "x"]
    m, g, p = _mesh("a", before)
    await m.repair_pass()
    g.live = after
    p.fail = {"x"}  # the newcomer is briefly unreachable
    await m.repair_pass()
    p.fail = set()
    p.pushed.clear()
    await m.repair_pass()  # the ring did not move, but the failed pushes are retried
    assert any(n == "x" for n, _ in p.pushed)
    p.pushed.clear()
    assert await m.repair_pass() == 0 and p.pushed == []


async def test_a_peer_on_another_placement_version_is_left_out(caplog: Any) -> None:
    live = ["a", "b", "c"]
    m, g, _ = _mesh("a", live)

    class _Old(_Gossip):
        def members(self) -> list[_Member]:
            ms = super().members()
            for x in ms:
                if x.node_id == "c":
                    x.meta.placement = 1  # type: ignore[attr-defined]
            return ms

    m.gossip = _Old(live)
    assert all("c" not in m.owners(k) for k in KEYS[:200])  # owners only among same-version peers
    assert "another placement version" in caplog.text
