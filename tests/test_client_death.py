"""Clients that die: real subprocess clients killed with SIGKILL at the worst moments.

When a client process dies its socket closes, and the daemon releases whatever that connection
held: leases (pinned blocks) and slots allocated but not committed. The tests check the store's
own counters (``active_leases``, ``pending_slots``, ``dram_used_bytes``), that the freed space is
reusable without evicting anything, and that blocks acknowledged to other clients stay intact.
The daemon is a subprocess too, so nothing here shares a process with the victim.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memkv_mesh import protocol
from memkv_mesh.client import Client, MemkvError

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
pytestmark = pytest.mark.slow

# The victim: connects, does what its scenario says, prints READY and its facts, then waits
# for SIGKILL (it never exits on its own: it blocks reading stdin).
_PRELUDE = """
import os, sys, json
from memkv_mesh import protocol
from memkv_mesh.client import Client
c = Client(sys.argv[1], timeout=30, name="victim")
args = json.loads(sys.argv[2])
keys = [bytes.fromhex(k) for k in args["keys"]]
def ready(**facts):
    print("READY " + json.dumps(facts), flush=True)
    sys.stdin.read()
"""

_HOLD_LEASES = """
c.put_many(keys, [bytes([i + 1]) * args["size"] for i in range(len(keys))])
own = c.get_many(keys)
shared = c.get_many([bytes.fromhex(k) for k in args["shared"]])
ready(leases=[own._id, shared._id])
"""

_HALF_WRITTEN = """
offsets = c._expect(c._call(protocol.Alloc(keys, [args["size"]] * len(keys))), protocol.Allocated).offsets
for off in offsets:
    slot = c._slot(off, args["size"] // 2)
    slot[:] = b"\\xee" * len(slot)
    slot.release()
ready(offsets=offsets)
"""

_MID_FRAME = """
offsets = c._expect(c._call(protocol.Alloc(keys, [args["size"]] * len(keys))), protocol.Allocated).offsets
lease = c.get_many([bytes.fromhex(k) for k in args["shared"]])
frame = bytes(protocol.encode_frame(protocol.Commit(keys, list(range(len(keys))))))
c._sock.sendall(frame[: len(frame) // 2])
ready(sent=len(frame) // 2, of=len(frame))
"""


class Victim:
    def __init__(self, proc: subprocess.Popen[bytes], facts: dict[str, Any]) -> None:
        self.proc = proc
        self.facts = facts

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL


@pytest.fixture
def spawn() -> Iterator[Callable[..., Victim]]:
    import json

    procs: list[subprocess.Popen[bytes]] = []

    def start(script: str, sock: Path, **args: Any) -> Victim:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PRELUDE) + textwrap.dedent(script), str(sock), json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = b""
        deadline = time.monotonic() + 30
        while not line.endswith(b"\n"):
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                pytest.fail(f"victim did not get ready in 30 s: {script}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"victim exited with {proc.wait()}: {err}")
            line += chunk
        sel.close()
        tag, _, facts = line.decode().partition(" ")
        assert tag == "READY", line
        return Victim(proc, json.loads(facts))

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _keys(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(32) for _ in range(n)]


def _wait_store(c: Client, timeout: float = 10.0, **want: int) -> dict[str, Any]:
    """Poll the daemon's stats until the store fields match (deadline; no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        st = c.stats()
        s = st["store"]
        if all(s[k] == v for k, v in want.items()):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"store never reached {want}: {s}")
        time.sleep(0.01)


def _assert_intact(c: Client, blocks: dict[bytes, bytes]) -> None:
    keys = list(blocks)
    assert c.lookup(keys) == len(keys)
    out = [bytearray(len(v)) for v in blocks.values()]
    assert c.get_many_into(keys, out) == [len(v) for v in blocks.values()]
    for o, v in zip(out, blocks.values(), strict=True):
        assert bytes(o) == v


def test_killed_lease_holder_unpins_its_blocks(daemon_process, spawn) -> None:
    rng = random.Random(1)
    d = daemon_process(store={"dram_bytes": 8 * MiB, "max_block_bytes": MiB})
    with d.client() as c:
        kept = {k: rng.randbytes(MiB) for k in _keys(rng, 4)}  # acknowledged to this client
        assert c.put_many(list(kept), list(kept.values())) == 4
        theirs = _keys(rng, 4)
        v = spawn(_HOLD_LEASES, d.sock, keys=[k.hex() for k in theirs], size=MiB, shared=[k.hex() for k in kept])
        st = _wait_store(c, active_leases=2, dram_blocks=8)
        assert st["connections"] == 2
        # Deleting the victim's blocks only dooms them: pinned, their extents stay in use.
        assert c.delete(theirs) == 4
        st = c.stats()["store"]
        assert st["dram_blocks"] == 4 and st["dram_used_bytes"] == 8 * MiB
        # Everything left is pinned by the victim: a put cannot evict anything.
        with pytest.raises(MemkvError) as ei:
            c.put(rng.randbytes(32), b"x" * MiB)
        assert ei.value.code == protocol.FULL
        v.kill9()
        st = _wait_store(c, active_leases=0, pending_slots=0)
        assert st["connections"] == 1
        assert st["store"]["dram_used_bytes"] == 4 * MiB and st["store"]["dram_drops"] == 0
        # The freed extents are reused: four more blocks fit without evicting anything.
        more = {k: rng.randbytes(MiB) for k in _keys(rng, 4)}
        assert c.put_many(list(more), list(more.values())) == 4
        assert c.stats()["store"]["dram_drops"] == 0
        _assert_intact(c, kept | more)


def test_killed_between_alloc_and_commit_after_half_the_bytes(daemon_process, spawn) -> None:
    rng = random.Random(2)
    d = daemon_process(store={"dram_bytes": 8 * MiB, "max_block_bytes": MiB})
    with d.client() as c:
        kept = {k: rng.randbytes(MiB) for k in _keys(rng, 4)}
        assert c.put_many(list(kept), list(kept.values())) == 4
        keys = _keys(rng, 4)
        v = spawn(_HALF_WRITTEN, d.sock, keys=[k.hex() for k in keys], size=MiB)
        assert min(v.facts["offsets"]) >= 0
        st = _wait_store(c, pending_slots=4)["store"]
        assert st["dram_used_bytes"] == 8 * MiB and st["dram_blocks"] == 4
        assert c.contains(keys) == [False] * 4  # half-written slots are never visible
        v.kill9()
        st = _wait_store(c, pending_slots=0, active_leases=0)["store"]
        assert st["dram_used_bytes"] == 4 * MiB and st["puts"] == 4
        assert c.contains(keys) == [False] * 4
        # The same keys put by a live client now land in the freed slots and read back whole,
        # not as the dead client's half-written garbage.
        vals = [bytes([0x10 + i]) * MiB for i in range(4)]
        assert c.put_many(keys, vals) == 4
        st = c.stats()["store"]
        assert st["dram_drops"] == 0 and st["dram_used_bytes"] == 8 * MiB
        _assert_intact(c, kept | dict(zip(keys, vals, strict=True)))


def test_killed_mid_frame_frees_everything_and_never_stalls_others(daemon_process, spawn) -> None:
    rng = random.Random(3)
    d = daemon_process(store={"dram_bytes": 8 * MiB, "max_block_bytes": MiB})
    with d.client() as c:
        kept = {k: rng.randbytes(MiB // 2 + i) for i, k in enumerate(_keys(rng, 4))}
        assert c.put_many(list(kept), list(kept.values())) == 4
        used = c.stats()["store"]["dram_used_bytes"]
        keys = _keys(rng, 3)
        v = spawn(_MID_FRAME, d.sock, keys=[k.hex() for k in keys], size=MiB, shared=[k.hex() for k in kept])
        assert 0 < v.facts["sent"] < v.facts["of"]
        # The daemon is waiting for the rest of the victim's frame, yet answers everyone else.
        st = _wait_store(c, pending_slots=3, active_leases=1)
        assert st["connections"] == 2
        _assert_intact(c, kept)
        v.kill9()
        st = _wait_store(c, pending_slots=0, active_leases=0)
        assert st["connections"] == 1 and st["store"]["dram_used_bytes"] == used
        assert c.contains(keys) == [False] * 3  # the half-sent Commit published nothing
        # The whole arena minus the kept blocks is usable again.
        free = {k: bytes([i]) * MiB for i, k in enumerate(_keys(rng, (8 * MiB - used) // MiB))}
        assert c.put_many(list(free), list(free.values())) == len(free)
        assert c.stats()["store"]["dram_drops"] == 0
        _assert_intact(c, kept | free)


def test_many_killed_clients_leave_nothing_behind(daemon_process, spawn) -> None:
    """Three victims at once (leases, pending slots, a half frame); the daemon keeps serving."""
    rng = random.Random(4)
    d = daemon_process(store={"dram_bytes": 16 * MiB, "max_block_bytes": MiB})
    with d.client() as c:
        kept = {k: rng.randbytes(300_000) for k in _keys(rng, 3)}
        assert c.put_many(list(kept), list(kept.values())) == 3
        shared = [k.hex() for k in kept]
        victims = [
            spawn(_HOLD_LEASES, d.sock, keys=[k.hex() for k in _keys(rng, 2)], size=MiB, shared=shared),
            spawn(_HALF_WRITTEN, d.sock, keys=[k.hex() for k in _keys(rng, 2)], size=MiB),
            spawn(_MID_FRAME, d.sock, keys=[k.hex() for k in _keys(rng, 2)], size=MiB, shared=shared),
        ]
        _wait_store(c, active_leases=3, pending_slots=4)
        for v in victims:
            v.kill9()
        st = _wait_store(c, active_leases=0, pending_slots=0)
        assert st["connections"] == 1
        assert st["store"]["dram_blocks"] == 5  # kept + the lease holder's two committed blocks
        _assert_intact(c, kept)
    assert d.proc is not None and d.proc.poll() is None  # the daemon never went down
