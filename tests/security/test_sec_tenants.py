"""Tenant isolation on a node (and across a two-node mesh), attacked from real client processes.

The daemon is a real process run as root (so root is the node's operator); every tenant client is
a forked child that has dropped to the tenant's uid/gid before it connects, so the daemon learns
who it is from SO_PEERCRED exactly as in production. Tenants (conftest.TENANTS): "alpha" (uid
65530), "beta" (uid 65531), "gamma" (primary gid 65540: uids 65533 and 65535); uid 65532 is in no
tenant.

Each attack of issue 11 is one test: naming, reading, probing (lookup/contains), deleting and
overwriting another tenant's block by its key; finding its bytes in one's own mapping; opening its
arena file by path; connecting as a user in no tenant; a keyed request from the operator. On the
main before tenants (5449748) the daemon refuses the config (``tenants`` is an unknown field), and
without tenants every one of these attacks succeeds (see docs/security.md).
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    GID_A,
    GID_B,
    GID_C,
    GID_GROUP,
    TENANTS,
    UID_A,
    UID_B,
    UID_C,
    UID_G1,
    UID_G2,
    RawClient,
    SecDaemon,
    SecDaemons,
    needs_root,
    run_as,
    wait_until,
)

from memkv_mesh import protocol
from memkv_mesh.client import AsyncClient, Client, MemkvError

pytestmark = [needs_root, pytest.mark.slow]

A = (UID_A, GID_A)
B = (UID_B, GID_B)
NOBODY = (UID_C, GID_C)
G1 = (UID_G1, GID_GROUP)
G2 = (UID_G2, GID_GROUP)


@pytest.fixture(scope="module")
def node() -> Iterator[SecDaemon]:
    """One daemon with the three tenants, shared by the tests here (each uses its own keys)."""
    daemons = SecDaemons()
    try:
        yield daemons.make(TENANTS, store={"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20})
    finally:
        daemons.close()


def _as(who: tuple[int, int], fn: Any, *args: Any) -> Any:
    return run_as(who[0], who[1], fn, *args)


# ---- what runs inside a tenant's process ---------------------------------------------------------
def _put(sock: Path, key: bytes, value: bytes) -> bool:
    with Client(sock, timeout=30) as c:
        return c.put(key, value)


def _probe(sock: Path, key: bytes, size: int) -> dict[str, Any]:
    """Everything a client can learn about ``key``: get (zero copy), get_many_into, get_many,
    contains, lookup."""
    with Client(sock, timeout=30) as c:
        lease = c.get(key)
        got = None if lease is None else bytes(lease.view)
        if lease is not None:
            lease.release()
        buf = bytearray(size)
        into = c.get_many_into([key], [buf])
        with c.get_many([key]) as many:
            many_views = [None if v is None else bytes(v) for v in many.views]
        return {
            "get": got,
            "into": into,
            "into_bytes": bytes(buf) if into[0] is not None else None,
            "get_many": many_views,
            "contains": c.contains([key]),
            "lookup": c.lookup([key]),
        }


def _delete(sock: Path, key: bytes) -> tuple[int, int]:
    with Client(sock, timeout=30) as c:
        return c.delete(key, local=True), c.delete(key)


def _scan_mapping(sock: Path, key: bytes, needles: list[bytes]) -> dict[str, Any]:
    """Map the arena as a client does, ask for ``key`` (the attacker's get misses, but it may make
    the daemon move things), then look for each needle anywhere in the whole mapping."""
    with Client(sock, timeout=30) as c:
        lease = c.get(key)
        if lease is not None:
            lease.release()
        arena = c._arena
        assert arena is not None
        whole = bytes(arena)
        return {"size": len(whole), "found": [whole.find(n) >= 0 for n in needles]}


def _welcome(sock: Path, name: str = "raw-sec-test", pid: int | None = None) -> dict[str, Any]:
    """A raw Hello: the Welcome's arena path and size, and the inode of the fd that came with it."""
    with RawClient(sock) as raw:
        w = raw.hello(name, pid)
        assert isinstance(w, protocol.Welcome), w
        return {
            "arena_path": w.arena_path,
            "arena_bytes": w.arena_bytes,
            "fds": len(raw.fds),
            "fd_inode": os.fstat(raw.fds[0]).st_ino if raw.fds else None,
        }


def _open_by_path(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, flags in (("rdonly", os.O_RDONLY), ("rdwr", os.O_RDWR)):
        try:
            os.close(os.open(path, flags))
            out[name] = "opened"
        except OSError as e:
            out[name] = e.errno
    try:
        os.listdir(os.path.dirname(path))
        out["listdir"] = "listed"
    except OSError as e:
        out["listdir"] = e.errno
    return out


def _connect_refused(sock: Path) -> dict[str, Any]:
    """A user in no tenant: the Client, then a raw Hello (must get an Error, then EOF)."""
    out: dict[str, Any] = {}
    try:
        with Client(sock, timeout=30) as c:
            c.lookup([b"\0" * 32])
        out["client"] = "connected"
    except MemkvError as e:
        out["client"] = (e.code, e.message)
    except ConnectionError as e:
        out["client"] = ("connection", str(e))
    with RawClient(sock) as raw:
        reply = raw.hello()
        out["raw"] = (reply.code, reply.message) if isinstance(reply, protocol.Error) else type(reply).__name__
        out["closed"] = raw.eof_within(10)
    return out


def _raw_get(sock: Path, key: bytes, name: str, pid: int) -> list[Any]:
    """A raw client that claims another tenant's name and pid in its Hello, then asks for a key."""
    with RawClient(sock) as raw:
        assert isinstance(raw.hello(name, pid), protocol.Welcome)
        reply = raw.call(protocol.Get([key]))
        assert isinstance(reply, protocol.Located), reply
        if reply.lease:
            raw.send(protocol.Release(reply.lease))
        return list(reply.blocks)


# ---- the tests -----------------------------------------------------------------------------------
def test_socket_is_open_to_all_and_the_daemon_checks_peers(node: SecDaemon) -> None:
    # With tenants the socket is 0666 (any local user may connect and is then checked by uid).
    assert stat.S_IMODE(os.stat(node.sock).st_mode) == 0o666


def test_same_key_in_another_tenant_names_another_block(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(100_000)
    assert _as(A, _put, node.sock, key, value) is True
    theirs = _as(B, _probe, node.sock, key, len(value))
    # beta asks for alpha's key every way a client can: nothing, not even a hint.
    assert theirs == {
        "get": None, "into": [None], "into_bytes": None, "get_many": [None], "contains": [False], "lookup": 0,
    }  # fmt: skip
    mine = _as(A, _probe, node.sock, key, len(value))
    assert mine["get"] == value and mine["into_bytes"] == value and mine["get_many"] == [value]
    assert mine["contains"] == [True] and mine["lookup"] == 1


def test_another_tenant_cannot_delete(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(50_000)
    assert _as(A, _put, node.sock, key, value)
    assert _as(B, _delete, node.sock, key) == (0, 0)  # local, then mesh-wide: nothing of alpha's
    assert _as(A, _probe, node.sock, key, len(value))["get"] == value


def test_another_tenant_cannot_overwrite(node: SecDaemon) -> None:
    key, mine, theirs = os.urandom(32), os.urandom(70_000), os.urandom(70_000)
    assert _as(A, _put, node.sock, key, mine)
    # beta's put of the same key is a new block in beta's own key space, not "already stored".
    assert _as(B, _put, node.sock, key, theirs) is True
    assert _as(A, _probe, node.sock, key, len(mine))["get"] == mine
    assert _as(B, _probe, node.sock, key, len(theirs))["get"] == theirs


def test_tenant_is_taken_from_the_socket_not_the_hello(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(10_000)
    assert _as(A, _put, node.sock, key, value)
    a_pid = _as(A, os.getpid)
    # beta claims to be alpha (client name, a pid): the daemon does not ask.
    assert _as(B, _raw_get, node.sock, key, "alpha", a_pid) == [None]


def test_own_mapping_holds_no_bytes_of_another_tenant(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(256 * 1024)
    assert _as(A, _put, node.sock, key, value)
    # Windows from the start, middle and end of the block: any copy of it would show.
    needles = [value[i : i + 64] for i in (0, len(value) // 2, len(value) - 64)]
    theirs = _as(B, _scan_mapping, node.sock, key, needles)
    assert theirs["size"] > 0
    assert theirs["found"] == [False, False, False], "beta's mapping holds alpha's bytes"
    # The scan can find a block: alpha's own mapping holds it.
    assert _as(A, _scan_mapping, node.sock, key, needles)["found"] == [True, True, True]


def test_cannot_open_another_tenants_arena_by_path(node: SecDaemon) -> None:
    a = _as(A, _welcome, node.sock)
    b = _as(B, _welcome, node.sock)
    # Each tenant is handed its own segment as a file descriptor; the path is informational.
    assert a["fds"] >= 1 and b["fds"] >= 1
    assert a["arena_path"] != b["arena_path"]
    assert a["fd_inode"] == os.stat(a["arena_path"]).st_ino
    assert b["fd_inode"] == os.stat(b["arena_path"]).st_ino
    assert 0 < b["arena_bytes"] < 48 << 20  # a share of DRAM, not the whole arena
    # beta cannot open alpha's file by its path, nor list the arena directory.
    assert _as(B, _open_by_path, a["arena_path"]) == {
        "rdonly": errno.EACCES, "rdwr": errno.EACCES, "listdir": errno.EACCES,
    }  # fmt: skip


def test_user_in_no_tenant_is_refused(node: SecDaemon) -> None:
    out = _as(NOBODY, _connect_refused, node.sock)
    code, message = out["client"]
    assert code == "forbidden", out
    assert str(UID_C) in message, f"the refusal should name the uid: {message!r}"
    assert out["raw"][0] == "forbidden", out
    assert out["closed"], "the daemon keeps a refused connection open"
    # and the daemon serves the tenants as before
    key = os.urandom(32)
    assert _as(A, _put, node.sock, key, b"x" * 4096)


def test_group_tenant(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(20_000)
    assert _as(G1, _put, node.sock, key, value)
    # another user whose primary group is gamma's sees gamma's block; alpha does not
    assert _as(G2, _probe, node.sock, key, len(value))["get"] == value
    assert _as(A, _probe, node.sock, key, len(value))["contains"] == [False]


def test_operator_reads_stats_but_no_blocks(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(4096)
    assert _as(A, _put, node.sock, key, value)
    assert os.geteuid() == 0  # the test process: root, the node's operator
    with RawClient(node.sock) as raw:
        w = raw.hello()
        assert isinstance(w, protocol.Welcome), w
        assert w.arena_bytes == 0 and not raw.fds, "the operator must be handed no arena"
    with Client(node.sock, timeout=30) as op:
        st = op.stats()
        assert st["node_id"] == node.node_id
        with pytest.raises(MemkvError) as e:
            op.members()
        assert e.value.code != "forbidden"  # allowed (this daemon has no gossip: "unavailable")
        refused = {
            "lookup": lambda: op.lookup([key]),
            "contains": lambda: op.contains([key]),
            "get": lambda: op.get(key),
            "put": lambda: op.put(os.urandom(32), b"y" * 4096),
            "delete": lambda: op.delete(key),
        }
        for what, call in refused.items():
            with pytest.raises(MemkvError) as e:
                call()
            assert e.value.code == "forbidden", (what, e.value)
    assert _as(A, _probe, node.sock, key, len(value))["get"] == value


def _async_client(sock: Path, key: bytes, value: bytes | None) -> Any:
    """The Trio client in a tenant's process: put ``value`` (if given), then read ``key``; or the
    error code it is refused with."""

    async def main() -> Any:
        try:
            c = await AsyncClient.connect(sock)
        except MemkvError as e:
            return ("refused", e.code, e.message)
        async with c:
            if value is not None:
                assert await c.put(key, value)
            buf = bytearray(1 << 20)
            n = (await c.get_many_into([key], [buf]))[0]
            arena = c._arena
            assert arena is not None
            return (None if n is None else bytes(buf[:n]), len(arena))

    return trio.run(main)


def test_async_client_gets_its_segment_and_the_refusal(node: SecDaemon) -> None:
    key, value = os.urandom(32), os.urandom(30_000)
    got, size = _as(A, _async_client, node.sock, key, value)
    assert got == value and 0 < size < 48 << 20
    assert _as(B, _async_client, node.sock, key, None)[0] is None
    refused = _as(NOBODY, _async_client, node.sock, key, None)
    assert refused[:2] == ("refused", "forbidden"), refused
    assert str(UID_C) in refused[2]


# ---- across the mesh -----------------------------------------------------------------------------
_MESH_KEY = base64.b64encode(os.urandom(32)).decode()


def _mesh_sections(role: str, seeds: list[str]) -> dict[str, Any]:
    store: dict[str, Any] = {"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20}
    if role != "gpu":
        store["nvme_bytes"] = 64 << 20
    return {
        "node": {"role": role},
        "store": store,
        "gossip": {"enabled": True, "port": 0, "seeds": seeds, "keys": [_MESH_KEY]},
        "dataplane": {"transport": "tcp"},
        "mesh": {"replicas": 1, "repair_interval_s": 1.0},
    }


def _alive(dp: SecDaemon) -> set[str]:
    with dp.client() as c:  # root: the operator may list members
        return {str(m["node_id"]) for m in c.members() if m["state"] == "alive"}


def test_mesh_fetch_finds_only_own_tenants_blocks(sec_daemon: Any) -> None:
    """alpha puts on the GPU node x; its block is replicated to the flash node y. On y, beta (same
    key) finds nothing, locally or through the mesh; alpha finds its bytes; beta's mesh-wide
    delete of the key deletes nothing of alpha's."""
    x = sec_daemon(TENANTS, **_mesh_sections("gpu", []))
    with x.client() as c:
        seed = [c.stats()["gossip_addr"]]
    y = sec_daemon(TENANTS, **_mesh_sections("flash", seed))
    wait_until(lambda: _alive(x) == _alive(y) == {x.node_id, y.node_id}, 30, "both nodes alive on both")
    key, value = os.urandom(32), os.urandom(200_000)
    assert _as(A, _put, x.sock, key, value)
    # beta on y (the block's owner) and on x, then alpha on y: beta first, so that nothing alpha's
    # read brings to y could mask a leak.
    for where in (y, x):
        theirs = _as(B, _probe, where.sock, key, len(value))
        assert theirs["get"] is None and theirs["into"] == [None] and theirs["get_many"] == [None], where.node_id
        assert theirs["contains"] == [False] and theirs["lookup"] == 0, where.node_id
    assert _as(A, _probe, y.sock, key, len(value))["get"] == value
    theirs = _as(B, _probe, y.sock, key, len(value))
    assert theirs["get"] is None and theirs["lookup"] == 0
    # beta's mesh-wide delete of the key (it waits for the owners' answers) reaches nothing of
    # alpha's, on either node
    assert _as(B, _delete, x.sock, key) == (0, 0)
    for where in (x, y):
        assert _as(A, _probe, where.sock, key, len(value))["get"] == value, where.node_id
