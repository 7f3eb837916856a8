"""Real processes on loopback: 5 nodes; kill -9 one (others mark it dead); restart it (it rejoins
with a higher incarnation); a node with the wrong key never joins. And the mesh's first node (no
seeds of its own) killed with -9 and restarted on a new port (port 0) gets back into every view
through its members snapshot.

Each node is the daemon (``python -m memkv_mesh daemon --config mesh.toml``, membership read with
``python -m memkv_mesh members --socket ... --json``) when the daemon's config has a ``[gossip]``
table; otherwise a minimal runner of ``GossipService`` alone (``RUNNER`` below) that reads the
same TOML and writes its member list to ``<data_dir>/members.json``. ``NODE_KIND`` says which;
``MEMKV_GOSSIP_RUNNER=1`` forces the runner.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
KEY = base64.b64encode(bytes(range(32))).decode()
WRONG_KEY = base64.b64encode(bytes(range(7, 39))).decode()


def _daemon_has_gossip() -> bool:
    try:
        from memkv_mesh.config import Config
    except ImportError:
        return False
    return "gossip" in Config.__struct_fields__ and (REPO / "memkv_mesh" / "daemon.py").exists()


# MEMKV_GOSSIP_RUNNER=1 forces the bare runner (to tell a gossip bug from a daemon bug).
NODE_KIND = (
    "daemon" if _daemon_has_gossip() and not os.environ.get("MEMKV_GOSSIP_RUNNER") else "runner"
)

RUNNER = r"""
import json, os, sys, tomllib
from pathlib import Path
import msgspec, trio
from gossip.messages import NodeMeta
from transport.gossip_config import GossipConfig
from transport.gossip_driver import GossipService

raw = tomllib.loads(Path(sys.argv[1]).read_text())
cfg = msgspec.convert(raw["gossip"], GossipConfig)
data_dir = Path(raw["node"]["data_dir"])
data_dir.mkdir(parents=True, exist_ok=True)
svc = GossipService(cfg, node_id=raw["node"]["id"], meta=NodeMeta(role="both"), state_dir=data_dir)

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        out = data_dir / "members.json"
        while True:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps([msgspec.to_builtins(m) for m in svc.members()]))
            os.replace(tmp, out)
            await trio.sleep(0.1)

trio.run(main)
"""


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port")


class Node:
    def __init__(self, root: Path, name: str, port: int, seeds: list[str], key: str) -> None:
        self.name = name
        self.addr = f"127.0.0.1:{port}"
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = root / f"{name}.toml"
        seeds_toml = ", ".join(f'"{s}"' for s in seeds if s != self.addr)
        self.config.write_text(
            f'[node]\nid = "{name}"\ndata_dir = "{self.data_dir}"\n'
            "[store]\ndram_bytes = 67108864\nnvme_bytes = 0\nmax_block_bytes = 16777216\n"
            "[metrics]\nenabled = false\n"
            f'[gossip]\nenabled = true\nport = {port}\nseeds = [{seeds_toml}]\nkeys = ["{key}"]\n'
            "join_retry_s = 0.5\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if NODE_KIND == "daemon":
            cmd = [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(self.config)]
        else:
            cmd = [sys.executable, "-c", RUNNER, str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def members(self) -> dict[str, dict[str, Any]]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        if NODE_KIND == "daemon":
            sock = self.data_dir / "memkv.sock"
            if not sock.exists():
                return {}
            out = subprocess.run(
                [sys.executable, "-m", "memkv_mesh", "members", "--socket", str(sock), "--json"],
                cwd=REPO, capture_output=True, timeout=20,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            if out.returncode != 0:
                return {}
            data = json.loads(out.stdout)
        else:
            try:
                data = json.loads((self.data_dir / "members.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return {}
        return {m["node_id"]: m for m in data}


def wait_until(pred: Callable[[], bool], limit_s: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + limit_s
    why = f"timed out waiting for {what}"
    while time.monotonic() < deadline:
        if pred():
            return
        exited = [n.name for n in nodes if n.proc is not None and n.proc.poll() is not None]
        if exited:
            why = f"{exited} exited while waiting for {what}"
            break
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-2000:]}" for n in nodes if n.log.exists())
    views = {n.name: {k: (v["state"], v["incarnation"]) for k, v in n.members().items()}
             for n in nodes}
    pytest.fail(f"{why} ({NODE_KIND}); views={views}\n{logs}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Node], Path]]:
    ports = [free_port() for _ in range(5)]
    seeds = [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]
    nodes = [Node(tmp_path, f"n{i + 1}", p, seeds, KEY) for i, p in enumerate(ports)]
    try:
        yield nodes, tmp_path
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.slow
def test_five_processes_kill_restart_and_wrong_key(cluster: tuple[list[Node], Path]) -> None:
    nodes, root = cluster
    names = {n.name for n in nodes}
    for n in nodes:
        n.start()

    def all_alive(view_nodes: list[Node], expect: set[str]) -> bool:
        for n in view_nodes:
            m = n.members()
            if {k for k, v in m.items() if v["state"] == "alive"} != expect:
                return False
        return True

    wait_until(lambda: all_alive(nodes, names), 60, "5 nodes to converge", nodes)
    victim = nodes[2]
    inc_before = nodes[0].members()[victim.name]["incarnation"]
    victim.kill9()
    others = [n for n in nodes if n is not victim]
    wait_until(
        lambda: all(n.members().get(victim.name, {}).get("state") == "dead" for n in others),
        30, "the killed node to be marked dead", nodes,
    )
    victim.start()
    wait_until(
        lambda: all(
            n.members().get(victim.name, {}).get("state") == "alive"
            and n.members()[victim.name]["incarnation"] > inc_before
            for n in nodes
        ),
        30, "the restarted node to rejoin with a higher incarnation", nodes,
    )
    intruder = Node(root, "intruder", free_port(), [nodes[0].addr, nodes[1].addr], WRONG_KEY)
    nodes.append(intruder)
    intruder.start()
    wait_until(lambda: "intruder" in intruder.members(), 30, "the intruder to start", nodes)
    time.sleep(3.0)  # several join retries and probe rounds
    for n in nodes[:-1]:
        assert "intruder" not in n.members(), n.name
    assert set(intruder.members()) == {"intruder"}


def _daemon_members(dp: Any) -> dict[str, dict[str, Any]]:
    from memkv_mesh.client import MemkvError

    try:
        c = dp.client()
    except (ConnectionError, OSError):
        return {}
    try:
        return {m["node_id"]: m for m in c.members()}
    except (ConnectionError, OSError, MemkvError):
        return {}
    finally:
        c.close()


@pytest.mark.slow
def test_first_node_killed_and_restarted_on_a_new_port_is_back_in_every_view(
    tmp_path: Path, short_dir: Path
) -> None:
    """n1 has no seeds (n2 and n3 joined through it) and port 0; after kill -9 it restarts on a
    new port, knowing nobody but what its snapshot (<data_dir>/gossip.members) says."""
    if NODE_KIND != "daemon":
        pytest.skip("the daemon reports the port-0 gossip address; the bare runner does not")
    from conftest import DaemonProcess, write_config

    def make(name: str, seeds: list[str]) -> Any:
        data = tmp_path / name
        data.mkdir()
        sock = short_dir / f"{name}.sock"
        gossip = {"enabled": True, "port": 0, "seeds": seeds, "keys": [KEY], "join_retry_s": 0.5}
        cfg = write_config(data / "mesh.toml", data / "data", sock, node={"id": name},
                           gossip=gossip)  # fmt: skip
        return DaemonProcess(cfg, sock)

    def gossip_addr(dp: Any) -> str:
        c = dp.client()
        try:
            return str(c.stats()["gossip_addr"])
        finally:
            c.close()

    def wait(pred: Callable[[], bool], limit_s: float, what: str) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if pred():
                return time.monotonic() - t0
            time.sleep(0.2)
        views = {dp.sock.name: {k: (v["state"], v["addr"]) for k, v in _daemon_members(dp).items()}
                 for dp in procs}
        pytest.fail(f"timed out after {limit_s} s waiting for {what}; views={views}")

    n1 = make("n1", [])
    procs = [n1]
    try:
        n1.start()
        first_addr = gossip_addr(n1)
        n2, n3 = make("n2", [first_addr]), make("n3", [first_addr])
        procs += [n2, n3]
        n2.start()
        n3.start()
        names = {"n1", "n2", "n3"}

        def all_alive() -> bool:
            for dp in procs:
                m = _daemon_members(dp)
                if {k for k, v in m.items() if v["state"] == "alive"} != names:
                    return False
            return True

        wait(all_alive, 60, "3 nodes to converge")
        snap = tmp_path / "n1" / "data" / "gossip.members"

        def saved() -> list[str]:
            text = snap.read_text() if snap.exists() else ""
            return [a for a in text.splitlines() if a and not a.startswith("#")]

        deadline = time.monotonic() + 10
        while len(saved()) < 2 and time.monotonic() < deadline:  # written right after the joins
            time.sleep(0.1)
        n1.kill()
        wait(lambda: all(_daemon_members(dp).get("n1", {}).get("state") == "dead"
                         for dp in (n2, n3)), 30, "n2 and n3 to mark the killed n1 dead")
        t0 = time.monotonic()
        n1.start()
        new_addr = gossip_addr(n1)
        assert new_addr != first_addr

        def back() -> bool:
            return all_alive() and all(
                _daemon_members(dp)["n1"]["addr"] == new_addr for dp in (n2, n3)
            )

        wait(back, 30, "the restarted n1 to be alive in every view")
        assert len(saved()) == 2  # what got it back in (it now lists n2 and n3 again)
        print(f"\nrestarted first node (new port) alive in every view "
              f"{time.monotonic() - t0:.2f} s after its restart began (daemon start included)")
    finally:
        for dp in procs:
            dp.stop()
