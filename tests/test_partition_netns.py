"""Real daemons cut apart by a real network partition, healed, and one mesh again within 30 s.

Each daemon runs in its own network namespace (``ip netns exec``) with a veth to its side's
Linux bridge; the two bridges (in the root namespace) are joined by ONE veth pair, all in one
/24. The partition is ``ip link set <that veth> down`` (every packet between the sides is
dropped, TCP connects time out), the heal ``up``. Gossip and the data plane bind the namespace's
address; the daemons' Unix sockets are plain paths, reachable from the root namespace, where the
test reads ``members`` through the client. Default gossip timings (nothing shortened).

Needs root and ``ip`` (iproute2); skipped otherwise. Names carry the pid and a random tag so
parallel runs do not collide; namespaces, bridges and veths are removed even on failure.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, write_config

pytestmark = pytest.mark.slow

KEY = base64.b64encode(bytes(range(32))).decode()
SIDE_A = 3  # nodes p0..p2 on bridge A, p3..p4 on bridge B
NODES = 5
HEAL_LIMIT_S = 30.0


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


class NetLab:
    """Two bridges joined by one veth pair; one namespace per node, on one side or the other."""

    def __init__(self, n: int, side_a: int) -> None:
        tag = f"{os.getpid() % 1000:03d}{random.randrange(1 << 12):03x}"
        self.tag = tag
        self.bridges = (f"mkA{tag}", f"mkB{tag}")
        self.link = f"mkL{tag}"  # the veth between the bridges; its peer is mkM<tag>
        rnd = random.Random()
        self.subnet = f"10.{rnd.randrange(100, 250)}.{rnd.randrange(256)}"
        self.ns = [f"memkv-{tag}-{i}" for i in range(n)]
        self.ips = [f"{self.subnet}.{i + 1}" for i in range(n)]
        self.side = [0 if i < side_a else 1 for i in range(n)]
        self._made_ns: list[str] = []
        self._made_links: list[str] = []

    def build(self) -> None:
        for br in self.bridges:
            _ip("link", "add", br, "type", "bridge")
            self._made_links.append(br)
            _ip("link", "set", br, "up")
        peer = f"mkM{self.tag}"
        _ip("link", "add", self.link, "type", "veth", "peer", "name", peer)
        self._made_links.append(self.link)
        _ip("link", "set", self.link, "master", self.bridges[0])
        _ip("link", "set", peer, "master", self.bridges[1])
        _ip("link", "set", self.link, "up")
        _ip("link", "set", peer, "up")
        for i, ns in enumerate(self.ns):
            _ip("netns", "add", ns)
            self._made_ns.append(ns)
            host, inner = f"mk{self.tag}h{i}", f"mk{self.tag}p{i}"
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            self._made_links.append(host)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host, "master", self.bridges[self.side[i]])
            _ip("link", "set", host, "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def partition(self) -> None:
        _ip("link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")

    def teardown(self) -> None:
        for ns in self._made_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        for link in reversed(self._made_links):  # a veth's peer goes with it
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)


class NsDaemon:
    """``ip netns exec <ns> python -m memkv_mesh daemon`` (``ip`` execs it: the pid is python's)."""

    def __init__(self, name: str, ns: str, ip: str, seed_ip: str, root: Path, sock: Path) -> None:
        self.name = name
        self.ns = ns
        self.sock = sock
        data = root / name
        data.mkdir()
        gossip = {"enabled": True, "bind": ip, "port": 7946, "seeds": [f"{seed_ip}:7946"],
                  "keys": [KEY]}  # fmt: skip
        self.config = write_config(
            data / "mesh.toml", data / "data", sock, node={"id": name}, gossip=gossip,
            dataplane={"host": ip, "transport": "tcp"},
        )
        self.log = data / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "memkv_mesh", "daemon",
                 "--config", str(self.config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def members(self) -> dict[str, str]:
        """node id -> state, as this daemon sees it ({} if it does not answer)."""
        from memkv_mesh.client import Client, MemkvError

        if self.proc is None or self.proc.poll() is not None or not self.sock.exists():
            return {}
        try:
            c = Client(self.sock, timeout=10)
        except (ConnectionError, OSError):
            return {}
        try:
            return {m["node_id"]: m["state"] for m in c.members()}
        except (ConnectionError, OSError, MemkvError):
            return {}
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def lab(tmp_path: Path, short_dir: Path) -> Iterator[tuple[NetLab, list[NsDaemon]]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is missing")
    net = NetLab(NODES, SIDE_A)
    daemons: list[NsDaemon] = []
    try:
        try:
            net.build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot build network namespaces and bridges here: {exc}")
        daemons = [
            NsDaemon(f"p{i}", net.ns[i], net.ips[i], net.ips[0], tmp_path, short_dir / f"p{i}.sock")
            for i in range(NODES)
        ]
        yield net, daemons
    finally:
        for d in daemons:
            d.stop()
        net.teardown()


def _poll(pred: Callable[[], bool], limit_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


def _logs(daemons: list[NsDaemon]) -> str:
    return "\n".join(f"--- {d.name}\n{d.log.read_text()[-1500:]}" for d in daemons if d.log.exists())


def test_partitions_of_10_and_60_s_heal_within_30_s(
    lab: tuple[NetLab, list[NsDaemon]],
) -> None:
    net, daemons = lab
    names = {d.name for d in daemons}
    side = {d.name: net.side[i] for i, d in enumerate(daemons)}
    for d in daemons:
        d.start()
    views: dict[str, dict[str, str]] = {}

    def look() -> dict[str, dict[str, str]]:
        views.update({d.name: d.members() for d in daemons})
        return views

    def one_mesh() -> bool:
        return all({k for k, v in m.items() if v == "alive"} == names for m in look().values())

    within_side_deaths: list[tuple[str, str]] = []

    def note_within_side_deaths() -> None:
        for obs, m in views.items():
            for node, state in m.items():
                if state == "dead" and side[node] == side[obs]:
                    within_side_deaths.append((obs, node))

    if _poll(one_mesh, 90) is None:
        pytest.fail(f"the 5 daemons never converged: {views}\n{_logs(daemons)}")
    for length in (10.0, 60.0):
        net.partition()
        t_cut = time.monotonic()
        split_seen = False
        while time.monotonic() - t_cut < length:
            look()
            note_within_side_deaths()
            split_seen = split_seen or any(
                state == "dead" and side[node] != side[obs]
                for obs, m in views.items() for node, state in m.items()
            )
            time.sleep(0.5)
        assert split_seen, f"the {length:.0f} s partition never showed: {views}"
        net.heal()
        took = _poll(one_mesh, HEAL_LIMIT_S)
        note_within_side_deaths()
        if took is None:
            pytest.fail(f"{length:.0f} s partition: not one mesh {HEAL_LIMIT_S:.0f} s after the "
                        f"heal: {views}\n{_logs(daemons)}")
        print(f"\n{length:.0f} s partition ({SIDE_A} vs {NODES - SIDE_A} daemons): one mesh "
              f"{took:.1f} s after the heal")
        assert within_side_deaths == [], within_side_deaths
