"""The block directory core (gossip/directory.py) and its filter, driven by hand, no network."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gossip.directory import Directory, DirectoryConfig
from gossip.directory_filter import BloomWords, fingerprint, masks
from gossip.messages import (
    DirDelta,
    DirSummary,
    DirSummaryReq,
    decode_packet,
    decode_stream,
    encode,
)

ADDR = {"a": "10.0.0.1:7946", "b": "10.0.0.2:7946", "c": "10.0.0.3:7946"}


def mk(node: str, epoch: int = 1, **cfg: object) -> Directory:
    cfg.setdefault("batch_s", 0.1)  # the tests step time in 0.1 s
    return Directory(node, DirectoryConfig(**cfg), random.Random(7), epoch=epoch)  # type: ignore[arg-type]


def keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


class Wire:
    """Carries packets and summary streams between directories, optionally dropping deltas."""

    def __init__(self, *dirs: Directory) -> None:
        self.dirs = {d.id: d for d in dirs}
        self.by_addr = {ADDR[d.id]: d for d in dirs}
        self.drop: set[tuple[str, int]] = set()  # (receiver, delta version) to lose
        self.delivered = 0

    def peers(self, me: str) -> list[tuple[str, str]]:
        return [(n, ADDR[n]) for n in self.dirs if n != me]

    def tick(self, now: float) -> None:
        now += 1e-9  # 0.2 + 0.1 > 0.3 in binary floating point
        for d in self.dirs.values():
            if d.next_deadline() <= now:
                d.handle_timer(now, self.peers(d.id))
        self.pump(now)

    def pump(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for d in list(self.dirs.values()):
                for addr, pkt in d.take_outbox():
                    moved = True
                    dst = self.by_addr[addr]
                    if (dst.id, pkt.ver) in self.drop and pkt.prev != pkt.ver:
                        continue
                    self.delivered += 1
                    dst.handle_delta(decode_packet(encode(pkt)), ADDR[d.id], now)  # type: ignore[arg-type]
                for addr, req in d.take_streams():
                    moved = True
                    holder = self.by_addr[addr]
                    reply = holder.handle_stream(req, ADDR[d.id], now)
                    if reply is not None:
                        d.handle_stream(decode_stream(encode(reply)), addr, now)  # type: ignore[arg-type]


def test_filter_has_no_false_negatives_and_a_known_false_positive_rate() -> None:
    ks = keys(20000)
    fps = [fingerprint(k) for k in ks]
    f = BloomWords.build(fps, len(fps), 12.0, 5)
    assert f.nbytes == 12 * 20000 // 8
    assert all(f.contains(x) for x in fps)
    absent = np.array([fingerprint(k) for k in keys(50000, seed=2)], dtype=np.uint64)
    w = f.words.size
    idx = ((absent >> np.uint64(32)) * np.uint64(w)) >> np.uint64(32)
    m = masks(absent, 5)
    rate = float(((f.words[idx.astype(np.intp)] & m) == m).mean())
    assert 0.005 < rate < 0.015, rate  # ~1.0% at 12 bits/key, k = 5 (blocked, one word per key)
    g = BloomWords.from_bytes(f.to_bytes(), 5)
    assert np.array_equal(g.words, f.words)


def test_filter_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        BloomWords.from_bytes(b"123", 5)
    with pytest.raises(ValueError, match="k must be"):
        BloomWords.from_bytes(b"\0" * 8, 0)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="directory.k"):
        DirectoryConfig(k=11)
    with pytest.raises(ValueError, match="directory.removed_frac"):
        DirectoryConfig(removed_frac=0.0)
    with pytest.raises(ValueError, match="epoch"):
        Directory("a", DirectoryConfig(), random.Random(1), epoch=-1)
    d = mk("a")
    with pytest.raises(TypeError, match="block key must be bytes"):
        d.local_added(["not bytes"], 0.0)  # type: ignore[list-item]


def test_adds_and_removes_reach_a_peer_and_lookups_follow() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    ks = keys(300)
    a.local_added(ks[:200], 0.0)
    b.local_added(ks[200:], 0.0)
    assert a.next_deadline() == pytest.approx(0.1)
    w.tick(0.1)  # first deltas: no view yet -> summary fetched, deltas replayed on top
    assert b.view_version("a") == a.version and a.view_version("b") == b.version
    assert b.prefix_in_mesh(ks) == 300  # 200 on a (directory), 100 here (exact)
    assert a.prefix_in_mesh(ks) == 300
    holders = b.lookup_holders(ks[:5] + ks[250:255])
    assert holders[:5] == [["a"]] * 5
    assert all(h == [] for h in holders[5:])  # self is never listed
    # removal: a stale positive must disappear once the delta is applied
    a.local_removed(ks[10:20], 0.2)
    a.local_added(ks[10:12], 0.2)  # re-added in the same batch: net no change for these two
    w.tick(0.3)
    assert b.prefix_in_mesh(ks) == 12
    hs = b.lookup_holders(ks[10:20])
    assert hs[0] == ["a"] and hs[1] == ["a"]
    # what remains at ks[12:20] can only be a filter false positive (~1% each)
    assert sum(1 for h in hs[2:] if h) <= 1
    st = b.statistics()
    assert st.views == 1 and st.removed_entries == 8 and st.memory_bytes == st.filter_bytes + 64


def test_an_add_and_a_remove_in_one_batch_cancel() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    a.local_added(keys(3), 0.0)
    w.tick(0.1)
    v = a.version
    k = keys(1, seed=9)
    a.local_added(k, 0.2)
    a.local_removed(k, 0.25)
    w.tick(0.35)
    assert a.version == v and a.next_deadline() > 0.35  # nothing published


def test_a_lost_delta_is_a_gap_repaired_by_a_summary() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    ks = keys(50)
    a.local_added(ks[:10], 0.0)
    w.tick(0.1)
    assert b.view_version("a") == 1
    w.drop.add(("b", 2))
    a.local_added(ks[10:20], 0.2)
    w.tick(0.3)
    assert b.view_version("a") == 1  # lost, and nothing after it yet
    assert b.prefix_in_mesh(ks) < 20
    a.local_added(ks[20:30], 0.4)
    w.tick(0.5)  # version 3 arrives with prev=2: gap -> summary
    assert b.statistics().gaps == 1
    assert b.view_version("a") == 3 and b.prefix_in_mesh(ks) == 30


def test_a_lost_tail_is_repaired_by_the_burst_marker() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    ks = keys(20)
    a.local_added(ks[:10], 0.0)
    w.tick(0.1)
    w.drop.add(("b", 2))
    a.local_added(ks[10:], 0.2)
    w.tick(0.3)
    assert b.view_version("a") == 1
    t = a.next_deadline()
    assert t == pytest.approx(0.3 + a.config.marker_s)
    w.tick(t)
    assert b.view_version("a") == 2 and b.prefix_in_mesh(ks) == 20


def test_refresh_markers_go_round_robin_and_only_once_something_was_published() -> None:
    a = mk("a", refresh_fanout=1)
    peers = [("b", ADDR["b"]), ("c", ADDR["c"])]
    assert a.next_deadline() == float("inf")  # nothing held, nothing ever sent
    a.local_added(keys(1), 0.0)
    a.handle_timer(0.1, peers)
    assert len(a.take_outbox()) == 2
    a.handle_timer(0.1 + a.config.marker_s, peers)
    assert [x for x, _ in a.take_outbox()] == [ADDR["b"], ADDR["c"]]  # the burst marker
    sent = []
    t = a.next_deadline()
    assert 0.1 + 0.5 * a.config.refresh_s <= t <= 0.1 + 1.5 * a.config.refresh_s
    for _ in range(4):
        a.handle_timer(t, peers)
        out = a.take_outbox()
        assert len(out) == 1 and out[0][1].prev == out[0][1].ver == 1
        sent.append(out[0][0])
        t += a.config.refresh_s
    assert sent == [ADDR["b"], ADDR["c"], ADDR["b"], ADDR["c"]]


def test_removals_past_the_threshold_start_a_new_generation_and_receivers_refetch() -> None:
    a, b = mk("a", min_keys=16), mk("b")
    w = Wire(a, b)
    ks = keys(256)
    a.local_added(ks, 0.0)
    w.tick(0.1)
    installed = b.statistics().summaries_installed
    assert installed == 1
    a.local_removed(ks[:10], 0.2)  # 10 <= 1/16 x 256 = 16: same generation
    w.tick(0.3)
    assert a.statistics().generation == 1 and b.statistics().removed_entries == 10
    a.local_removed(ks[10:30], 0.4)  # 30 > 16: new generation, b fetches a fresh filter
    w.tick(0.5)
    assert a.statistics().generation == 2
    sb = b.statistics()
    assert sb.summaries_installed == installed + 1 and sb.removed_entries == 0
    assert b.prefix_in_mesh(ks[30:]) == 226


def test_a_restarted_holder_supersedes_its_old_view() -> None:
    a, b = mk("a", epoch=1), mk("b")
    w = Wire(a, b)
    ks = keys(40)
    a.local_added(ks[:20], 0.0)
    w.tick(0.1)
    assert b.prefix_in_mesh(ks) == 20
    a2 = mk("a", epoch=2)  # a restarted: holds other blocks now, versions start over
    w2 = Wire(a2, b)
    a2.local_added(ks[20:], 1.0)
    w2.tick(1.1)
    assert b.lookup_holders(ks[20:21]) == [["a"]]
    assert b.prefix_in_mesh(ks[:20]) < 3  # gone, apart from a false positive or two
    # an old delta of the previous process is ignored
    b.handle_delta(DirDelta("a", 1, 1, 1, 5, (fingerprint(ks[0]),)), ADDR["a"], 1.2)
    assert b.statistics().stale_ignored >= 1 and b.view_version("a") == a2.version


def test_forget_drops_a_view_and_bad_frames_are_rejected() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    ks = keys(10)
    a.local_added(ks, 0.0)
    a.local_removed(ks[:1], 0.05)
    w.tick(0.1)
    a.local_removed(ks[1:2], 0.2)
    w.tick(0.3)
    assert b.lookup_holders(ks[2:3]) == [["a"]]
    b.forget("a")
    assert b.lookup_holders(ks[2:3]) == [[]] and b.memory_bytes() == 0
    assert b.prefix_in_mesh(ks) == 0
    b.handle_stream(DirSummary("c", 1, 1, 1, 5, b"xyz"), ADDR["c"], 0.4)
    b.handle_stream(DirSummary("c", 1, 1, 1, 3, b"\0" * 8), ADDR["c"], 0.4)  # k differs
    b.handle_delta(DirDelta("c", 1, 1, 5, 4), ADDR["c"], 0.4)  # prev > ver
    assert b.statistics().summaries_rejected == 3 and b.statistics().views == 0
    assert b.handle_stream(DirSummaryReq("c"), ADDR["c"], 0.4) is None  # not ours to answer


def test_a_big_batch_is_split_into_datagram_sized_deltas() -> None:
    a, b = mk("a"), mk("b")
    w = Wire(a, b)
    ks = keys(1000)
    a.local_added(ks, 0.0)
    a.handle_timer(0.1, w.peers("a"))
    out = a.take_outbox()
    assert len(out) == 7  # (1400 - 29 - 48 - 1) // 9 = 146 fingerprints per datagram
    assert all(1300 < len(encode(d)) + 29 <= 1400 for _, d in out[:-1])
    assert [d.ver for _, d in out] == list(range(1, 8))
    for _, d in out:
        b.handle_delta(d, ADDR["a"], 0.2)
    w.pump(0.2)
    assert b.prefix_in_mesh(ks) == 1000


def test_a_summary_is_built_once_per_version_and_excludes_unpublished_changes() -> None:
    a = mk("a")
    ks = keys(30)
    a.local_added(ks[:20], 0.0)
    a.handle_timer(0.1 + 1e-9, [])
    s1 = a.handle_stream(DirSummaryReq("a"), ADDR["b"], 0.2)
    assert s1 is not None and s1 is a.handle_stream(DirSummaryReq("a"), ADDR["c"], 0.2)
    assert s1.ver == 1 and s1.count == 20
    a.local_added(ks[20:], 0.3)  # not yet published: the summary stays as of version 1
    a.local_removed(ks[:5], 0.3)
    s2 = a.handle_stream(DirSummaryReq("a"), ADDR["b"], 0.31)
    assert s2 is not None and s2.ver == 1 and s2.count == 20
    f = BloomWords.from_bytes(s2.words, s2.k)
    assert all(f.contains(fingerprint(k)) for k in ks[:20])
    a.handle_timer(0.4 + 1e-9, [])
    s3 = a.handle_stream(DirSummaryReq("a"), ADDR["b"], 0.5)
    assert s3 is not None and s3 is not s1 and s3.ver == 2 and s3.count == 25
    assert a.statistics().summaries_sent == 4


@pytest.mark.parametrize("seed", range(12))
def test_random_churn_with_loss_and_reordering_converges_to_the_truth(seed: int) -> None:
    """Whatever is lost or reordered, once the burst marker is through the view is exact:
    every held key is found, and every removed key is gone unless the filter has a false
    positive for it."""
    rng = random.Random(seed)
    a, b = mk("a", min_keys=16), mk("b")
    peers = [("b", ADDR["b"])]
    universe = keys(400, seed=100 + seed)
    held: set[bytes] = set()
    in_flight: list[DirDelta] = []
    now = 0.0
    for _ in range(60):
        now += 0.1
        for _ in range(rng.randrange(1, 30)):
            k = rng.choice(universe)
            if k in held and rng.random() < 0.5:
                held.discard(k)
                a.local_removed([k], now)
            elif k not in held:
                held.add(k)
                a.local_added([k], now)
        now += 0.1
        a.handle_timer(now + 1e-9, peers)
        for _, d in a.take_outbox():
            if rng.random() >= 0.2:  # 20% loss
                in_flight.append(d)
        rng.shuffle(in_flight)  # reordering
        keep = rng.randrange(len(in_flight) + 1)
        for d in in_flight[keep:]:
            b.handle_delta(d, ADDR["a"], now)
        in_flight = in_flight[:keep]
        for _, req in b.take_streams():
            if rng.random() < 0.8:  # some summary fetches fail too
                reply = a.handle_stream(req, ADDR["b"], now)
                assert reply is not None
                b.handle_stream(reply, ADDR["a"], now)
    for d in in_flight:
        b.handle_delta(d, ADDR["a"], now)
    # the burst marker (and, failing that, a refresh marker) tells b where a stands
    t = a.next_deadline()
    a.handle_timer(t, peers)
    for _, d in a.take_outbox():
        b.handle_delta(d, ADDR["a"], t)
    for _, req in b.take_streams():
        reply = a.handle_stream(req, ADDR["b"], t)
        assert reply is not None
        b.handle_stream(reply, ADDR["a"], t)
    # a fetch lost earlier (of a gap, or of a new generation) is retried by b's own timer
    t = b.next_deadline()
    if t < float("inf"):
        assert t <= now + b.config.fetch_timeout_s
        b.handle_timer(t, [("a", ADDR["a"])])
        for _, req in b.take_streams():
            reply = a.handle_stream(req, ADDR["b"], t)
            assert reply is not None
            b.handle_stream(reply, ADDR["a"], t)
    assert b.view_version("a") == a.version
    assert b.next_deadline() == float("inf")  # caught up: nothing left to retry
    order = sorted(universe)
    found = b.lookup_holders(order)
    assert all(f == ["a"] for k, f in zip(order, found, strict=True) if k in held)
    false_hits = sum(1 for k, f in zip(order, found, strict=True) if k not in held and f)
    assert false_hits <= 3 + 0.03 * (len(universe) - len(held)), false_hits
