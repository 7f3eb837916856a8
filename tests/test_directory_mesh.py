"""The block directory carried by SWIM: virtual-time mesh, the Trio driver, and the simulator."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from functools import partial

import pytest
import trio

from gossip.directory import Directory, DirectoryConfig
from gossip.messages import STATE_ALIVE, DirDelta, DirSummary, Entry, NodeMeta, wire_meta
from gossip.profile import profile
from gossip.swim import Swim
from simulations.directory_sim import DirScenario, construction, main, simulate
from transport.gossip_config import GossipConfig
from transport.gossip_driver import GossipService
from transport.memory import MemoryNetwork


def addr(i: int) -> str:
    return f"10.0.{i}.1:7946"


def mesh(n: int, *, loss: float = 0.0, with_dir: bool = True, seed: int = 3) -> tuple[
    MemoryNetwork, list[Swim]
]:
    cfg = profile("default")
    net = MemoryNetwork(seed, loss=loss)
    cores = []
    for i in range(n):
        d = Directory(f"n{i}", DirectoryConfig(), random.Random(i), epoch=1) if with_dir else None
        cores.append(Swim(f"n{i}", addr(i), NodeMeta(), cfg, random.Random(seed * 100 + i), 0.0,
                          directory=d))
    entries = [Entry(c.id, 1, STATE_ALIVE, c.addr, wire_meta(c.meta)) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
        net.add(c)
    return net, cores


def dir_of(c: Swim) -> Directory:
    assert c.directory is not None
    return c.directory


def put(net: MemoryNetwork, c: Swim, part: list[bytes], t: float) -> None:
    dir_of(c).local_added(part, t)
    net.flush(c.addr)


def keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def test_holdings_reach_every_node_and_a_dead_holder_is_forgotten() -> None:
    net, cores = mesh(6)
    ks = keys(600)

    def drop(c: Swim, part: list[bytes], t: float) -> None:
        dir_of(c).local_removed(part, t)
        net.flush(c.addr)

    for i, c in enumerate(cores):
        net.call_at(1.0, partial(put, net, c, ks[i * 100 : (i + 1) * 100], 1.0))
    net.run_until(2.0)
    for c in cores:
        assert dir_of(c).prefix_in_mesh(ks) == 600
        assert dir_of(c).statistics().views == 5
    net.call_at(3.0, partial(drop, cores[1], ks[100:150], 3.0))
    net.run_until(3.6)
    for c in cores[2:]:
        assert dir_of(c).prefix_in_mesh(ks) in (100, 101)  # 100: ks[100] gone (or a false hit)
    net.kill(cores[5].addr)
    net.run_until(20.0)
    assert cores[0].state_of("n5") == "dead"
    assert all("n5" not in h for h in dir_of(cores[0]).lookup_holders(ks))
    assert dir_of(cores[0]).statistics().views == 4
    # a late delta or summary from the dead node (or a stranger) does not bring a view back
    cores[0].handle_message(DirDelta("n5", 1, 9, 0, 99, (1, 2)), addr(5), 20.0)
    cores[0].handle_message(DirDelta("zz", 1, 1, 0, 1, (1, 2)), "10.9.9.9:1", 20.0)
    cores[0].handle_stream(DirSummary("n5", 1, 9, 99, 5, b"\xff" * 64, 10), addr(5), 20.0)
    assert dir_of(cores[0]).statistics().views == 4 and not cores[0].has_streams


def test_views_converge_under_loss() -> None:
    net, cores = mesh(8, loss=0.2)
    ks = keys(800)
    for i, c in enumerate(cores):
        for j in range(10):
            t = 1.0 + j * 0.3
            net.call_at(t, partial(put, net, c, ks[i * 100 + j * 10 : i * 100 + (j + 1) * 10], t))
    net.run_until(60.0)
    for c in cores:
        d = dir_of(c)
        for other in cores:
            if other is not c:
                assert d.view_version(other.id) == dir_of(other).version, (c.id, other.id)
        assert d.prefix_in_mesh(ks) == 800
    assert sum(dir_of(c).statistics().gaps for c in cores) > 0  # the repair path was needed


def test_no_blocks_means_no_directory_bytes() -> None:
    a_net, _ = mesh(8, with_dir=True)
    b_net, _ = mesh(8, with_dir=False)
    a_net.run_until(40.0)
    b_net.run_until(40.0)
    assert a_net.bytes_sent == b_net.bytes_sent


def test_simulator_figures_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    r = simulate(DirScenario(nodes=6, blocks=300, rate=10.0, warmup=5.0, duration=12.0,
                             fpr_probes=2000, lookup_reps=50))
    assert r.unreached == 0 and r.changes > 50
    assert r.add_staleness_p99_s is not None and r.add_staleness_p99_s < 0.3
    assert r.remove_staleness_p99_s is not None and r.remove_staleness_p99_s < 0.3
    # 16-bit entries at a load between 0.7 and 0.95: 2.1 to 2.9 B per (holder, block)
    assert 2.0 < r.bytes_per_remote_holding < 2.9 and r.overflow_entries == 0
    assert 0.005 < r.fpr_any_view < 0.045  # ~16 x load / 511 whatever N (5 views here)
    assert 0.7 <= r.table_load_node0 <= 0.95
    assert r.prefix_found == 64 and r.dir_bytes_per_node_per_s > 0
    assert main(["--nodes", "1"]) == 2
    assert "--nodes must be >= 2" in capsys.readouterr().err
    assert main(["--nodes", "4", "--blocks", "50", "--duration", "8", "--warmup", "4",
                 "--lookup-reps", "5", "--fpr-probes", "100", "--json"]) == 0
    assert '"unreached": 0' in capsys.readouterr().out
    c = construction(5000)  # one holder's summary built, then placed by a receiver
    assert c["summary_bytes_per_block"] == 6.0 and c["overflow_entries"] == 0
    assert 0.72 < c["table_load"] <= 0.75 and c["receiver_place_s"] < 2.0
    c = construction(120_000)  # more than install_step (50,000 units): placed over timer calls
    assert c["receiver_calls"] >= 3 and c["overflow_entries"] == 0
    assert 0.72 < c["table_load"] <= 0.75 and c["receiver_max_call_s"] <= c["receiver_place_s"]
    assert main(["--construction", "100", "--json"]) == 0
    assert '"summary_bytes_per_block": 6.0' in capsys.readouterr().out


KEY = base64.b64encode(bytes(range(32))).decode()
FAST = {"probe_interval": 0.1, "probe_timeout": 0.05, "gossip_interval": 0.05,
        "suspicion_mult": 2.0, "join_retry_s": 0.2, "stream_timeout_s": 2.0}


async def wait_for(pred: Callable[[], bool], limit_s: float = 8.0) -> None:
    with trio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_gossip_services_share_the_directory_over_udp_and_tcp() -> None:
    def cfg(seeds: list[str]) -> GossipConfig:
        return GossipConfig(enabled=True, port=0, seeds=seeds, keys=[KEY], **FAST)  # type: ignore[arg-type]

    ks = keys(400)
    async with trio.open_nursery() as nursery:
        a = GossipService(cfg([]), node_id="a", meta=NodeMeta())
        a.directory_added(ks[:200])  # before run: published once it starts
        await nursery.start(a.run)
        b = GossipService(cfg([a.local_addr]), node_id="b", meta=NodeMeta())
        await nursery.start(b.run)
        c = GossipService(cfg([a.local_addr]), node_id="c", meta=NodeMeta())
        await nursery.start(c.run)
        b.directory_added(ks[200:300])
        await wait_for(lambda: c.prefix_in_mesh(ks) == 300 and a.prefix_in_mesh(ks) == 300)
        assert c.lookup_holders([ks[0], ks[250], ks[399]]) == [["a"], ["b"], []]
        assert a.lookup_holders([ks[0]]) == [[]]  # self excluded
        b.directory_removed(ks[200:300])
        await wait_for(lambda: c.prefix_in_mesh(ks) < 210 and a.prefix_in_mesh(ks) < 210)
        st = c.directory_statistics()
        assert st.views == 2 and st.summaries_installed >= 2
        assert a.statistics().dropped_malformed == 0
        nursery.cancel_scope.cancel()
