"""What a local client can make the daemon hold is bounded, and committed bytes are checked.

Issue 11's local attacks, each against a real daemon process: a client that sends half a frame
and then nothing (held forever on the old main), more connections than ``limits.max_clients``,
leases and pending put slots without bound (per client and per tenant), a commit whose checksum
does not match its bytes (accepted on the old main), and an in-place overwrite of a committed
block by a client of the same tenant (the owner then read the attacker's bytes: a local get
checked nothing; ``verify=True`` catches it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash
from conftest import (
    GID_A,
    GID_B,
    TENANTS,
    UID_A,
    UID_B,
    HeldAs,
    RawClient,
    SecDaemon,
    run_as,
    wait_until,
)

from memkv_mesh import protocol
from memkv_mesh.client import Client, MemkvError

pytestmark = pytest.mark.slow

LIMIT = "limit"


def _store(dp: SecDaemon) -> dict[str, Any]:
    with dp.client() as c:
        st = c.stats()["store"]
        assert isinstance(st, dict)
        return st


def _hello(raw: RawClient) -> protocol.Welcome:
    w = raw.hello()
    assert isinstance(w, protocol.Welcome), w
    return w


def _put_keys(dp: SecDaemon, n: int, size: int = 4096) -> list[bytes]:
    keys = [os.urandom(32) for _ in range(n)]
    with Client(dp.sock, timeout=30) as c:
        assert c.put_many(keys, [os.urandom(size) for _ in keys]) == n
    return keys


def _error(reply: protocol.Reply, code: str) -> protocol.Error:
    assert isinstance(reply, protocol.Error), f"expected a {code!r} error, got {reply!r}"
    assert reply.code == code, reply
    assert reply.message, reply
    return reply


# ---- partial frames ------------------------------------------------------------------------------
@pytest.mark.parametrize("partial", ["length", "body"])
def test_partial_frame_is_disconnected_and_what_it_held_freed(sec_daemon: Any, partial: str) -> None:
    dp = sec_daemon(limits={"frame_timeout_s": 1.0})
    (held,) = _put_keys(dp, 1)
    with RawClient(dp.sock) as raw:
        _hello(raw)
        # something to free: one lease and one pending slot
        loc = raw.call(protocol.Get([held]))
        assert isinstance(loc, protocol.Located) and loc.lease and loc.blocks[0] is not None, loc
        assert isinstance(raw.call(protocol.Alloc([os.urandom(32)], [4096])), protocol.Allocated)
        st = _store(dp)
        assert (st["active_leases"], st["pending_slots"]) == (1, 1)
        # then part of a frame, and silence
        raw.send_bytes(b"\x10\x00" if partial == "length" else protocol.LEN.pack(1000) + b"\x92\x06")
        t0 = time.monotonic()
        assert raw.eof_within(15), "a client silent in the middle of a frame is held forever"
        waited = time.monotonic() - t0
    assert 0.5 <= waited < 10, waited
    wait_until(lambda: (_store(dp)["active_leases"], _store(dp)["pending_slots"]) == (0, 0), 10, "lease and slot freed")


def test_idle_client_between_frames_is_kept(sec_daemon: Any) -> None:
    """Only a frame cut short times out: an engine idle between requests keeps its connection."""
    dp = sec_daemon(limits={"frame_timeout_s": 1.0})
    with Client(dp.sock, timeout=30) as c:
        assert c.lookup([os.urandom(32)]) == 0
        time.sleep(2.5)  # the condition under test: idle for longer than frame_timeout_s
        assert c.lookup([os.urandom(32)]) == 0


# ---- connections ---------------------------------------------------------------------------------
def _refused_reply(sock: Path) -> tuple[protocol.Reply | None, bool]:
    """A raw connection over the cap: whatever the daemon says (before or after our Hello), and
    whether it then closes the connection."""
    with RawClient(sock, timeout=3) as raw:
        try:
            reply = raw.recv_or_eof()  # a daemon that refuses at accept speaks first
        except TimeoutError:
            raw.sock.settimeout(10)
            reply = raw.hello()
        return reply, raw.eof_within(10)


def _connect(sock: Path) -> Client:
    """A client, once there is room: the connection spawn_daemon made to see the daemon serve
    may still count against max_clients for a moment after it closed."""
    out: list[Client] = []

    def room() -> bool:
        try:
            out.append(Client(sock, timeout=30))
            return True
        except MemkvError as e:
            assert e.code == "busy", e
            return False

    wait_until(room, 10, "room for a client")
    return out[0]


def test_max_clients(sec_daemon: Any) -> None:
    dp = sec_daemon(limits={"max_clients": 2})
    c1, c2 = _connect(dp.sock), _connect(dp.sock)
    try:
        reply, closed = _refused_reply(dp.sock)
        assert reply is not None, "closed without a word"
        _error(reply, "busy")
        assert closed, "a connection over limits.max_clients is kept open"
        # the two already connected are served
        assert c1.lookup([os.urandom(32)]) == 0 and c2.lookup([os.urandom(32)]) == 0
        c1.close()

        _connect(dp.sock).close()  # a slot comes free once c1 is gone
    finally:
        c1.close()
        c2.close()


def test_client_over_max_clients_sees_busy(sec_daemon: Any) -> None:
    """What an engine sees when it connects over the cap: MemkvError 'busy', not a broken pipe."""
    dp = sec_daemon(limits={"max_clients": 1})
    with _connect(dp.sock):
        with pytest.raises(MemkvError) as e:
            Client(dp.sock, timeout=30)
        assert e.value.code == "busy"


# ---- leases and pending slots per client ---------------------------------------------------------
def test_lease_cap_per_client(sec_daemon: Any) -> None:
    dp = sec_daemon(limits={"max_leases_per_client": 2})
    k1, k2, k3 = _put_keys(dp, 3)
    with Client(dp.sock, timeout=30) as c:
        l1, l2 = c.get(k1), c.get(k2)
        assert l1 is not None and l2 is not None
        with pytest.raises(MemkvError) as e:
            c.get(k3)
        assert e.value.code == LIMIT
        assert c.lookup([k1, k2, k3]) == 3  # the connection goes on
        l1.release()
        l3 = c.get(k3)
        assert l3 is not None
        l2.release()
        l3.release()
    # another client is not held back by the first one's leases
    with Client(dp.sock, timeout=30) as c, Client(dp.sock, timeout=30) as other:
        held = [c.get(k1), c.get(k2)]
        lease = other.get(k3)
        assert lease is not None
        lease.release()
        for h in held:
            assert h is not None
            h.release()


def test_pending_cap_per_client(sec_daemon: Any) -> None:
    dp = sec_daemon(limits={"max_pending_per_client": 2})
    ks = [os.urandom(32) for _ in range(3)]
    with RawClient(dp.sock) as raw:
        _hello(raw)
        assert isinstance(raw.call(protocol.Alloc(ks[:2], [4096, 4096])), protocol.Allocated)
        _error(raw.call(protocol.Alloc(ks[2:], [4096])), LIMIT)
        assert isinstance(raw.call(protocol.Lookup(ks)), protocol.Count)  # the connection goes on
        assert raw.call(protocol.Abort(ks[:2])) == protocol.Count(2)
        assert isinstance(raw.call(protocol.Alloc(ks[2:], [4096])), protocol.Allocated)
    # one batch over the cap is refused as a whole, with the error an engine can switch on
    with Client(dp.sock, timeout=30) as c:
        with pytest.raises(MemkvError) as e:
            c.put_many(ks, [b"v" * 4096] * 3)
        assert e.value.code == LIMIT
        assert c.put_many(ks[:2], [b"v" * 4096] * 2) == 2


# ---- per tenant ----------------------------------------------------------------------------------
def _hold_tenant_share(sock: Path, keys: list[bytes]) -> tuple[dict[str, Any], Any]:
    """As one tenant, from three connections: take the tenant's whole lease and pending share
    (3 each with 2 per client), then try for one more of each from a connection under its own cap."""
    c1, c2, c3 = (Client(sock, timeout=30) for _ in range(3))
    leases = [c1.get(keys[0]), c1.get(keys[1]), c2.get(keys[2])]
    assert all(x is not None for x in leases)
    out: dict[str, Any] = {}
    try:
        c3.get(keys[3])
        out["lease"] = "granted"
    except MemkvError as e:
        out["lease"] = e.code
    r1, r2 = RawClient(sock), RawClient(sock)
    for r in (r1, r2):
        assert isinstance(r.hello(), protocol.Welcome)
    assert isinstance(r1.call(protocol.Alloc([os.urandom(32), os.urandom(32)], [4096, 4096])), protocol.Allocated)
    assert isinstance(r2.call(protocol.Alloc([os.urandom(32)], [4096])), protocol.Allocated)
    reply = r2.call(protocol.Alloc([os.urandom(32)], [4096]))
    out["pending"] = reply.code if isinstance(reply, protocol.Error) else type(reply).__name__
    out["lookup_after"] = c3.lookup(keys)
    return out, (c1, c2, c3, leases, r1, r2)


def _take_leases(sock: Path, keys: list[bytes]) -> int:
    """How many of ``keys`` one client can hold leases on at once (-1: refused ``limit``)."""
    with Client(sock, timeout=30) as c:
        try:
            leases = [c.get(k) for k in keys]
        except MemkvError as e:
            assert e.code == LIMIT, e
            return -1
        n = sum(x is not None for x in leases)
        for x in leases:
            if x is not None:
                x.release()
        return n


def _alloc(sock: Path, n: int) -> str:
    with RawClient(sock) as raw:
        assert isinstance(raw.hello(), protocol.Welcome)
        reply = raw.call(protocol.Alloc([os.urandom(32) for _ in range(n)], [4096] * n))
        return reply.code if isinstance(reply, protocol.Error) else type(reply).__name__


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: clients run as tenant uids")
def test_caps_per_tenant(sec_daemon: Any) -> None:
    limits = {
        "max_leases_per_client": 2, "max_leases_per_tenant": 3,
        "max_pending_per_client": 2, "max_pending_per_tenant": 3,
    }  # fmt: skip
    dp = sec_daemon(TENANTS, limits=limits, store={"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20})
    a_keys = [os.urandom(32) for _ in range(4)]
    b_keys = [os.urandom(32) for _ in range(2)]
    run_as(UID_A, GID_A, _put_many, dp.sock, a_keys)
    run_as(UID_B, GID_B, _put_many, dp.sock, b_keys)
    with HeldAs(UID_A, GID_A, _hold_tenant_share, dp.sock, a_keys) as out:
        assert out == {"lease": LIMIT, "pending": LIMIT, "lookup_after": 4}, out
        # alpha is at its caps; beta is not held back by them
        assert run_as(UID_B, GID_B, _take_leases, dp.sock, b_keys) == 2
        assert run_as(UID_B, GID_B, _alloc, dp.sock, 2) == "Allocated"
        # and a fresh alpha client is refused
        assert run_as(UID_A, GID_A, _alloc, dp.sock, 1) == LIMIT
    # alpha's connections closed: its share is free again
    wait_until(lambda: run_as(UID_A, GID_A, _alloc, dp.sock, 2) == "Allocated", 10, "alpha's slots freed")
    wait_until(lambda: run_as(UID_A, GID_A, _take_leases, dp.sock, a_keys[:2]) == 2, 10, "alpha's leases freed")


def _put_many(sock: Path, keys: list[bytes]) -> int:
    with Client(sock, timeout=30) as c:  # two at a time: the pending cap per client is 2
        return sum(c.put_many(keys[i : i + 2], [os.urandom(4096) for _ in keys[i : i + 2]]) for i in range(0, len(keys), 2))


# ---- checksums -----------------------------------------------------------------------------------
def test_commit_with_a_wrong_checksum_stores_nothing(sec_daemon: Any) -> None:
    dp = sec_daemon()
    k1, k2, k3 = (os.urandom(32) for _ in range(3))
    v1, v2, v3 = os.urandom(50_000), os.urandom(50_000), os.urandom(8192)
    with RawClient(dp.sock) as raw:
        _hello(raw)
        assert raw.mmap is not None
        alloc = raw.call(protocol.Alloc([k1, k2], [len(v1), len(v2)]))
        assert isinstance(alloc, protocol.Allocated), alloc
        for off, v in zip(alloc.offsets, (v1, v2), strict=True):
            raw.mmap[off : off + len(v)] = v
        # the first checksum is right, the second is not: the whole commit is refused
        bad = raw.call(protocol.Commit([k1, k2], [xxhash.xxh3_64_intdigest(v1), xxhash.xxh3_64_intdigest(v2) ^ 1]))
        _error(bad, "bad_checksum")
        assert raw.call(protocol.Contains([k1, k2])) == protocol.Present([False, False])
        assert raw.call(protocol.Lookup([k1])) == protocol.Count(0)
        # control: a commit whose checksum matches is stored
        alloc = raw.call(protocol.Alloc([k3], [len(v3)]))
        assert isinstance(alloc, protocol.Allocated)
        off = alloc.offsets[0]
        raw.mmap[off : off + len(v3)] = v3
        assert raw.call(protocol.Commit([k3], [xxhash.xxh3_64_intdigest(v3)])) == protocol.Count(1)
    with Client(dp.sock, timeout=30) as c:
        assert c.contains([k1, k2, k3]) == [False, False, True]
        assert c.get(k1) is None
    # a client that sends checksums stores what it wrote; the plain client too
    with Client(dp.sock, timeout=30, checksum=True) as c:
        assert c.put_many([k1, k2], [v1, v2]) == 2
        assert c.get_many_into([k1, k2], [bytearray(len(v1)), bytearray(len(v2))]) == [len(v1), len(v2)]


def test_verify_catches_an_in_place_overwrite(sec_daemon: Any) -> None:
    dp = sec_daemon()
    key, value = os.urandom(32), os.urandom(100_000)
    other, other_value = os.urandom(32), os.urandom(10_000)
    with Client(dp.sock, timeout=30) as owner:
        assert owner.put_many([key, other], [value, other_value]) == 2
        # a process of the same tenant writes into the committed block through its own mapping
        with RawClient(dp.sock) as attacker:
            _hello(attacker)
            loc = attacker.call(protocol.Get([key]))
            assert isinstance(loc, protocol.Located) and loc.blocks[0] is not None, loc
            off, n = loc.blocks[0]
            assert attacker.mmap is not None
            attacker.mmap[off : off + 64] = b"\xa5" * 64
            attacker.send(protocol.Release(loc.lease))
        # without verify the reader gets the attacker's bytes (the cost of not hashing) ...
        buf = bytearray(len(value))
        assert owner.get_many_into([key], [buf]) == [len(value)]
        assert bytes(buf[:64]) == b"\xa5" * 64
        # ... with verify the block is a miss, through every get
        assert owner.get_many_into([key], [bytearray(len(value))], verify=True) == [None]
        with owner.get_many([key, other], verify=True) as lease:
            assert lease.views[0] is None
            assert lease.views[1] is not None and bytes(lease.views[1]) == other_value  # intact: served
        assert owner.get_into(other, bytearray(len(other_value)), verify=True) == len(other_value)


# ---- one tenant cannot crowd out the others; a tenant sees its own segment only --------------
SMALL = {"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20}

def _hold_one_client(sock: Path) -> tuple[str, Any]:
    c = Client(sock, timeout=30)
    try:
        Client(sock, timeout=30).close()
        return "second accepted", c
    except MemkvError as e:
        return e.code, c


def _one_client_ok(sock: Path) -> bool:
    with Client(sock, timeout=30) as c:
        return c.lookup([os.urandom(32)]) == 0


def _own_view(sock: Path) -> tuple[list[str], list[str]]:
    with Client(sock, timeout=30) as c:
        st = c.stats()
        return [t["name"] for t in st["tenants"]], [s["name"] for s in st["store"]["segments"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: clients run as tenant uids")
def test_a_tenant_at_its_connection_cap_leaves_room_for_the_others(sec_daemon: Any) -> None:
    dp = sec_daemon(TENANTS, limits={"max_clients_per_tenant": 1}, store=SMALL)
    with HeldAs(UID_A, GID_A, _hold_one_client, dp.sock) as code:
        assert code == "busy"  # alpha's second connection
        assert run_as(UID_B, GID_B, _one_client_ok, dp.sock)  # beta is not crowded out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: clients run as tenant uids")
def test_a_tenant_sees_only_its_own_segment_in_stats(sec_daemon: Any) -> None:
    dp = sec_daemon(TENANTS, store=SMALL)
    names, segments = run_as(UID_A, GID_A, _own_view, dp.sock)
    own = TENANTS[0]["name"]
    assert names == [own] and segments == [own]
    with dp.client() as c:  # the operator sees them all
        st = c.stats()
        assert {t["name"] for t in st["tenants"]} == {t["name"] for t in TENANTS}
        assert {s["name"] for s in st["store"]["segments"]} == {"_mesh"} | {t["name"] for t in TENANTS}
