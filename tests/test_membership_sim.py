"""The in-memory virtual network and the membership simulator (small, fast, seeded runs)."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from gossip.messages import STATE_ALIVE, Entry, NodeMeta, Packet, Ping, encode, wire_meta
from gossip.profile import default_profile
from gossip.swim import Swim
from simulations.membership import Scenario, pooled, simulate
from simulations.membership_cli import main as cli_main
from transport.memory import MemoryNetwork

KEYS = {
    "detection_p50_s", "detection_p99_s", "first_to_last_s", "false_deaths", "false_suspicions",
    "bytes_per_node_per_s", "join_convergence_s", "dissemination_p99_s",
}  # fmt: skip


class _Sink(Swim):
    """A core that records what reaches it, to observe the network's behaviour."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"{name}:1", NodeMeta(), default_profile(), random.Random(0), 0.0)
        self.got: list[tuple[float, str]] = []

    def handle_message(self, pkt: Packet, src: str, now: float) -> None:
        self.got.append((now, src))


def test_network_counts_sealed_bytes_and_loses_nothing_without_loss() -> None:
    net = MemoryNetwork(1, delay=0.001, jitter=0.0)
    a, b = _Sink("a"), _Sink("b")
    net.add(a)
    net.add(b)
    a._outbox.append(("b:1", Ping(1, "b")))
    net.flush("a:1")
    net.run_until(0.01)
    assert b.got == [(0.001, "a:1")]
    assert net.bytes_sent["a:1"] == len(encode(Ping(1, "b"))) + 29


def test_network_partitions_loss_kill_and_starvation() -> None:
    net = MemoryNetwork(1, delay=0.001, jitter=0.0)
    a, b = _Sink("a"), _Sink("b")
    net.add(a)
    net.add(b)

    def send(t: float) -> None:
        def go() -> None:
            a._outbox.append(("b:1", Ping(1, "b")))
            net.flush("a:1")

        net.call_at(t, go)

    net.partition([["a:1"], ["b:1"]])
    send(0.1)
    net.run_until(0.2)
    assert b.got == []
    net.heal()
    net.set_link_loss("a:1", "b:1", 1.0)
    send(0.3)
    net.run_until(0.4)
    assert b.got == []
    net.set_link_loss("a:1", "b:1", 0.0)
    net.starve("b:1", 0.5, 2.0)  # b's loop stalls: packets wait in its socket buffer
    send(1.0)
    net.run_until(2.4)
    assert b.got == []
    net.run_until(2.6)
    assert b.got == [(2.5, "a:1")]  # delivered when it wakes up
    net.kill("b:1")
    send(3.0)
    net.run_until(4.0)
    assert len(b.got) == 1 and net.packets_lost >= 3


def test_network_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="loss"):
        MemoryNetwork(1, loss=1.5)
    net = MemoryNetwork(1)
    with pytest.raises(ValueError, match="starve duration"):
        net.starve("x", 1.0, 0.0)


def test_restart_via_replace_rejoins_with_higher_incarnation() -> None:
    net = MemoryNetwork(2)
    cfg = default_profile()
    cores = [Swim(f"n{i}", f"h{i}:1", NodeMeta(), cfg, random.Random(i), 0.0) for i in range(6)]
    entries = [Entry(c.id, 1, STATE_ALIVE, c.addr, wire_meta(NodeMeta())) for c in cores]
    for c in cores:
        c.seed_members(entries, 0.0)
        net.add(c)
    net.run_until(2.0)
    net.kill("h3:1")
    net.run_until(20.0)
    assert all(c.state_of("n3") == "dead" for c in cores if c.id != "n3")
    fresh = Swim("n3", "h3:1", NodeMeta(), cfg, random.Random(99), 20.0, incarnation=1)
    net.replace(fresh)
    fresh.join(["h0:1"], 20.0)
    net.flush("h3:1")
    net.run_until(30.0)
    # it heard it was dead at incarnation 1 and outbid it
    assert fresh.incarnation >= 2
    assert all(c.state_of("n3") == "alive" for c in cores if c.id != "n3")


def test_simulation_is_deterministic_and_reports_every_figure() -> None:
    sc = Scenario(nodes=24, loss=0.02, kill=2, duration=130, seed=5, updates=3)
    r1, r2 = simulate(sc), simulate(sc)
    d1, d2 = msgspec.to_builtins(r1), msgspec.to_builtins(r2)
    d1.pop("wall_s")
    d2.pop("wall_s")
    assert d1 == d2
    assert KEYS <= set(d1)
    assert r1.kills == 2 and r1.undetected == 0 and r1.false_deaths == 0
    assert r1.detection_p50_s is not None and 0 < r1.detection_p50_s < 15
    assert r1.join_convergence_s is not None and r1.join_convergence_s < 5
    assert r1.dissemination_p99_s is not None and r1.dissemination_p99_s < 5
    assert 50 < r1.bytes_per_node_per_s < 400


def test_default_profile_detects_faster_than_memberlist_profile() -> None:
    runs = {
        p: pooled([simulate(Scenario(nodes=32, loss=0.01, kill=4, duration=130, seed=s,
                                     profile=p, updates=0)) for s in (1, 2)])
        for p in ("default", "memberlist")
    }
    d, m = runs["default"], runs["memberlist"]
    assert isinstance(d["detection_p50_s"], float) and isinstance(m["detection_p50_s"], float)
    assert d["detection_p50_s"] <= 0.75 * m["detection_p50_s"]
    assert d["false_deaths"] == 0 and m["false_deaths"] == 0


def test_lossy_starved_mesh_has_no_false_deaths() -> None:
    r = simulate(Scenario(nodes=32, loss=0.10, starve=0.1, starve_every_s=20, duration=300,
                          seed=3, updates=0, joins=0))
    assert r.starvations > 0
    assert r.false_suspicions > 0  # the stalls are noticed...
    assert r.false_deaths == 0  # ...and refuted in time


def test_cli_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["--nodes", "16", "--loss", "0.01", "--kill", "1", "--duration", "120",
                     "--seed", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out) and out["profile"] == "default" and out["kills"] == 1
    code = cli_main(["--nodes", "16", "--runs", "2", "--duration", "50", "--profile",
                     "memberlist", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == 2 and out["join_convergence_within_5s"] == "2/2"


def test_cli_rejects_bad_input_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--nodes", "2"]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert cli_main(["--loss", "1.2"]) == 2
    assert "--loss" in capsys.readouterr().err
    assert cli_main(["--kill", "3", "--duration", "60"]) == 2
    assert "--duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--profile", "fast"])


def test_idle_gossip_fits_the_byte_budget() -> None:
    """Encrypted sizes, membership only: <= 250 B/s per node at N=64, <= 500 at N=256."""
    for n, budget in ((64, 250.0), (256, 500.0)):
        r = simulate(Scenario(nodes=n, loss=0.0, duration=50, seed=1, joins=0))
        assert 0 < r.bytes_per_node_per_s <= budget, (n, r.bytes_per_node_per_s)


def test_cli_partition_scenario_reports_heal_time_and_rejects_bad_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["--nodes", "12", "--partition-s", "20", "--partition-nodes", "3",
                     "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["duration"] == 60 + 20 + 120 and out["partition_nodes"] == 3
    assert out["cross_deaths"] > 0 and out["heal_s"] is not None and out["heal_s"] <= 30
    assert out["false_deaths_within_sides"] == 0
    assert cli_main(["--nodes", "12", "--partition-s", "20", "--partition-nodes", "12"]) == 2
    assert "--partition-nodes" in capsys.readouterr().err
    assert cli_main(["--nodes", "12", "--partition-s", "20", "--kill", "1"]) == 2
    assert "--kill" in capsys.readouterr().err
    assert cli_main(["--nodes", "12", "--partition-s", "200", "--duration", "200"]) == 2
    assert "--duration" in capsys.readouterr().err
