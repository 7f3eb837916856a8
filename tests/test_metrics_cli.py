"""Prometheus /metrics scraped over HTTP, and ``memkv-mesh status`` / ``members`` output.

The metrics tests run an in-process daemon with ``[metrics] listen = "127.0.0.1:0"`` and scrape
it with a plain TCP client, parsing the text format with prometheus_client's own parser, so the
names, labels and values checked are exactly what a Prometheus server would store. The CLI tests
run ``memkv_mesh.cli.main`` against a subprocess daemon and read what it printed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from memkv_mesh import cli
from memkv_mesh.client import AsyncClient, Client
from memkv_mesh.daemon import Daemon
from memkv_mesh.eviction import DEFAULT_POLICY

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _http_get(port: int, path: str, request: bytes | None = None) -> tuple[bytes, bytes]:
    """(status line + headers, body) of one HTTP request to the metrics port."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request or f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def _scrape(daemon: Daemon) -> Samples:
    assert daemon.metrics_port
    head, body = await _http_get(daemon.metrics_port, "/metrics")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"Content-Type: text/plain" in head
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def mdaemon(make_config: Any) -> AsyncIterator[Daemon]:
    """An in-process daemon serving /metrics on a free loopback port (8 MiB arena, no NVMe)."""
    cfg = make_config(
        metrics={"enabled": True, "listen": "127.0.0.1:0"},
        store={"dram_bytes": 8 * MiB, "max_block_bytes": MiB},
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(cfg).run)
        yield d
        nursery.cancel_scope.cancel()


async def test_metrics_port_is_real_and_other_paths_404(mdaemon) -> None:
    assert isinstance(mdaemon.metrics_port, int) and mdaemon.metrics_port > 0
    head, body = await _http_get(mdaemon.metrics_port, "/")
    assert head.startswith(b"HTTP/1.1 404") and b"/metrics" in body
    head, _ = await _http_get(mdaemon.metrics_port, "/metrics?x=1")
    assert head.startswith(b"HTTP/1.1 200")
    # Garbage, an early close and a POST do not take the endpoint (or the daemon) down.
    head, _ = await _http_get(mdaemon.metrics_port, "", request=b"\x00\xff garbage\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    stream = await trio.open_tcp_stream("127.0.0.1", mdaemon.metrics_port)
    await stream.send_all(b"GET /met")
    await stream.aclose()
    head, _ = await _http_get(mdaemon.metrics_port, "", request=b"POST /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    s = await _scrape(mdaemon)
    info = [k for k in s if k[0] == "memkv_node_info"]
    assert len(info) == 1 and dict(info[0][1])["node"] == mdaemon.node_id and s[info[0]] == 1


async def test_metrics_move_with_puts_gets_misses_and_usage(mdaemon) -> None:
    rng = random.Random(7)
    before = await _scrape(mdaemon)
    assert _v(before, "memkv_puts_total") == 0 and _v(before, "memkv_misses_total") == 0
    assert _v(before, "memkv_tier_capacity_bytes", tier="dram") == 8 * MiB
    assert _v(before, "memkv_tier_used_bytes", tier="dram") == 0
    assert _v(before, "memkv_tier_capacity_bytes", tier="nvme") == 0
    keys = [rng.randbytes(32) for _ in range(3)]
    vals = [rng.randbytes(n) for n in (5000, 100_000, 300_000)]
    async with await AsyncClient.connect(mdaemon.socket_path) as c:
        assert await c.put_many(keys, vals) == 3
        for _ in range(4):
            assert await c.lookup(keys) == 3
        got = await c.get_many_into(keys + [rng.randbytes(32)], [bytearray(300_000) for _ in range(4)])
        assert got == [5000, 100_000, 300_000, None]
        lease = await c.get(keys[0])  # held during the scrape
        assert lease is not None
        s = await _scrape(mdaemon)
        await c.release(lease)
    assert _v(s, "memkv_puts_total") == 3
    assert _v(s, "memkv_put_bytes_total") == sum(map(len, vals))
    assert _v(s, "memkv_hits_total", tier="dram") == 4  # 3 from get_many_into, 1 from get
    assert _v(s, "memkv_hits_total", tier="nvme") == 0
    assert _v(s, "memkv_misses_total") == 1
    assert _v(s, "memkv_get_bytes_total") == sum(map(len, vals)) + 5000
    assert _v(s, "memkv_lookups_total") == 4
    assert _v(s, "memkv_active_leases") == 1
    assert _v(s, "memkv_tier_blocks", tier="dram") == 3
    st = mdaemon.store.statistics()
    assert _v(s, "memkv_tier_used_bytes", tier="dram") == st.dram_used_bytes >= sum(map(len, vals))
    # Op latency histograms: one series per op, counts equal to the requests made.
    assert _v(s, "memkv_op_seconds_count", op="lookup") == 4
    assert _v(s, "memkv_op_seconds_count", op="alloc") == 1
    assert _v(s, "memkv_op_seconds_count", op="commit") == 1
    assert _v(s, "memkv_op_seconds_count", op="get") == 2
    assert _v(s, "memkv_op_seconds_count", op="hello") == 1
    assert _v(s, "memkv_op_seconds_count", op="release") == 1  # the get_many_into's
    assert 0 < _v(s, "memkv_op_seconds_sum", op="lookup") < 4.0
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in s.items() if k[0] == "memkv_op_seconds_bucket" and dict(k[1])["op"] == "lookup"
    )
    assert buckets[-1] == (float("inf"), 4)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))  # cumulative
    assert buckets[0][0] <= 1e-5 and len(buckets) >= 10
    # Deletes shrink usage; counters never go down.
    async with await AsyncClient.connect(mdaemon.socket_path) as c:
        assert await c.delete(keys) == 3
    after = await _scrape(mdaemon)
    assert _v(after, "memkv_deletes_total") == 3
    assert _v(after, "memkv_tier_used_bytes", tier="dram") == 0
    assert _v(after, "memkv_tier_blocks", tier="dram") == 0
    assert _v(after, "memkv_puts_total") == 3 and _v(after, "memkv_active_leases") == 0


async def test_metrics_count_evictions(mdaemon) -> None:
    rng = random.Random(8)
    async with await AsyncClient.connect(mdaemon.socket_path) as c:
        for i in range(12):  # 12 MiB into an 8 MiB arena with no NVMe tier: 4 dropped
            assert await c.put(rng.randbytes(32), bytes([i]) * MiB)
    s = await _scrape(mdaemon)
    assert _v(s, "memkv_evictions_total", kind="dram_dropped") == 4
    assert _v(s, "memkv_evictions_total", kind="dram_to_nvme") == 0
    assert _v(s, "memkv_evictions_total", kind="nvme_dropped") == 0
    assert _v(s, "memkv_tier_used_bytes", tier="dram") == 8 * MiB
    assert _v(s, "memkv_tier_blocks", tier="dram") == 8


async def test_metrics_with_an_nvme_tier(make_config: Any) -> None:
    """Demotions DRAM -> NVMe, NVMe hits and NVMe usage show up per tier."""
    cfg = make_config(
        metrics={"enabled": True, "listen": "127.0.0.1:0"},
        store={"dram_bytes": 4 * MiB, "nvme_bytes": 32 * MiB, "max_block_bytes": MiB, "eviction": "lru"},
    )  # fmt: skip
    rng = random.Random(9)
    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(cfg).run)
        keys = [rng.randbytes(32) for _ in range(8)]
        vals = [bytes([i + 1]) * MiB for i in range(8)]
        async with await AsyncClient.connect(d.socket_path) as c:
            for k, v in zip(keys, vals, strict=True):
                assert await c.put(k, v)
            s = await _scrape(d)
            assert _v(s, "memkv_evictions_total", kind="dram_to_nvme") >= 4
            assert _v(s, "memkv_tier_blocks", tier="nvme") >= 4
            assert _v(s, "memkv_tier_used_bytes", tier="nvme") >= 4 * MiB
            assert _v(s, "memkv_tier_capacity_bytes", tier="nvme") > 0
            buf = bytearray(MiB)
            assert await c.get_into(keys[0], buf) == MiB and bytes(buf) == vals[0]  # LRU demoted it
            s2 = await _scrape(d)
        assert _v(s2, "memkv_hits_total", tier="nvme") == 1
        assert _v(s2, "memkv_hits_total", tier="dram") == 0
        nursery.cancel_scope.cancel()


# ---- memkv-mesh status / members ------------------------------------------------------------------
def test_status_prints_node_tiers_usage_and_counts(daemon_process, capsys) -> None:
    d = daemon_process(store={"dram_bytes": 16 * MiB, "max_block_bytes": MiB})
    rng = random.Random(10)
    with d.client() as c:
        keys = [rng.randbytes(32) for _ in range(3)]
        assert c.put_many(keys, [b"a" * 4096, b"b" * 8192, b"c" * MiB]) == 3
        assert c.get_many_into(keys[:2] + [rng.randbytes(32)], [bytearray(8192)] * 3) == [4096, 8192, None]
        node_id = c.node_id
    assert cli.main(["status", "--socket", str(d.sock)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert f"node      {node_id} (role both, pid {d.proc.pid}" in out
    assert lines["socket"].endswith(str(d.sock))
    assert "/ 16.0 MiB in 3 blocks" in lines["dram"]
    assert lines["nvme"].split() == ["nvme", "disabled"]
    assert "3 blocks: 2 dram hits, 0 nvme hits, 1 misses (hit ratio 0.667)" in lines["gets"]
    assert "3 blocks" in lines["puts"] and "lookups 0" in lines["puts"]
    assert "0 dropped from dram" in lines["evictions"]
    assert f"0 leases, 0 pending slots; eviction {DEFAULT_POLICY}" in lines["clients"]
    assert "metrics" not in lines  # disabled in the test config


def test_status_json_is_the_daemons_stats(daemon_process, capsys) -> None:
    d = daemon_process()
    with d.client() as c:
        c.put(bytes(32), b"x" * 1000)
    assert cli.main(["status", "--json", "--socket", str(d.sock)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["pid"] == d.proc.pid and st["role"] == "both" and st["socket"] == str(d.sock)
    assert st["store"]["puts"] == 1 and st["store"]["put_bytes"] == 1000
    assert st["store"]["dram_capacity_bytes"] == 32 * MiB and st["store"]["dram_blocks"] == 1
    assert st["nvme_dir"] is None and st["metrics_port"] is None
    assert st["connections"] >= 1  # the status command's own connection
    assert st["bad_requests"] == 0 and st["uptime_s"] >= 0


def test_status_finds_the_socket_from_the_config(daemon_process, capsys) -> None:
    d = daemon_process()
    assert cli.main(["status", "--json", "--config", str(d.config_path)]) == 0
    assert json.loads(capsys.readouterr().out)["socket"] == str(d.sock)


def test_status_without_a_daemon_is_a_clear_error(tmp_path, capsys) -> None:
    assert cli.main(["status", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("memkv-mesh status: cannot connect to the memkv-mesh daemon at")
    assert "is `memkv-mesh daemon` running?" in err


def test_members_without_gossip_is_a_clear_error(daemon_process, capsys) -> None:
    d = daemon_process()
    assert cli.main(["members", "--socket", str(d.sock)]) == 1
    assert "gossip is not enabled on this daemon" in capsys.readouterr().err


def test_status_in_a_real_process(daemon_process) -> None:
    import subprocess
    import sys

    from conftest import REPO

    d = daemon_process()
    r = subprocess.run(
        [sys.executable, "-m", "memkv_mesh", "status", "--json", "--socket", str(d.sock)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pid"] == d.proc.pid
    with Client(d.sock, timeout=10) as c:  # the CLI's connection goes away with its process
        deadline = time.monotonic() + 10
        while c.stats()["connections"] != 1:
            assert time.monotonic() < deadline, "the CLI's connection was never closed"
            time.sleep(0.01)


async def test_metrics_count_connections_pending_slots_and_bad_requests(mdaemon) -> None:
    from memkv_mesh import protocol

    s = await _scrape(mdaemon)
    assert _v(s, "memkv_bad_requests_total") == 0 and _v(s, "memkv_client_connections") == 0
    assert _v(s, "memkv_pending_slots") == 0
    raw = await trio.open_unix_socket(str(mdaemon.socket_path))
    frames = protocol.FrameBuffer()

    async def call(data: bytes) -> protocol.Reply:
        await raw.send_all(data)
        with trio.fail_after(10):
            while (body := frames.next_frame()) is None:
                frames.feed(await raw.receive_some(65536))
        return protocol.reply_decoder.decode(body)

    assert isinstance(await call(b"\x01\x00\x00\x00\xc1"), protocol.Error)  # does not decode
    assert isinstance(await call(bytes(protocol.encode_frame(protocol.Lookup([bytes(32)])))), protocol.Error)  # no Hello
    assert isinstance(await call(bytes(protocol.encode_frame(protocol.Hello(protocol.PROTOCOL_VERSION)))), protocol.Welcome)
    alloc = await call(bytes(protocol.encode_frame(protocol.Alloc([bytes(32)], [4096]))))
    assert isinstance(alloc, protocol.Allocated)
    s = await _scrape(mdaemon)
    assert _v(s, "memkv_bad_requests_total") == 2
    assert _v(s, "memkv_client_connections") == 1
    assert _v(s, "memkv_pending_slots") == 1
    await raw.aclose()
    with trio.fail_after(10):
        while mdaemon.store.statistics().pending_slots:
            await trio.lowlevel.checkpoint()
    s = await _scrape(mdaemon)
    assert _v(s, "memkv_client_connections") == 0 and _v(s, "memkv_pending_slots") == 0
    assert _v(s, "memkv_bad_requests_total") == 2


def test_status_prints_a_working_metrics_url(daemon_process, capsys) -> None:
    import urllib.request

    d = daemon_process(metrics={"enabled": True, "listen": "127.0.0.1:0"})
    assert cli.main(["status", "--socket", str(d.sock)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("metrics"))
    url = line.split()[1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    assert "memkv_op_seconds_bucket" in body and 'memkv_tier_capacity_bytes{tier="dram"}' in body


async def test_a_failing_collector_costs_one_scrape_not_the_endpoint() -> None:
    from memkv_mesh.metrics import Metrics
    from memkv_mesh.store import StoreStats

    broken = [True]

    def snapshot() -> StoreStats:
        if broken[0]:
            raise RuntimeError("store is gone")
        return StoreStats(*([0] * len(StoreStats.__struct_fields__)))

    m = Metrics(snapshot, lambda: {"node": "n"})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(m.serve, "127.0.0.1", 0)
        head, body = await _http_get(port, "/metrics")
        assert head.startswith(b"HTTP/1.1 500") and b"see the daemon log" in body
        broken[0] = False
        head, body = await _http_get(port, "/metrics")
        assert head.startswith(b"HTTP/1.1 200") and b"memkv_misses_total 0.0" in body
        nursery.cancel_scope.cancel()


def test_status_with_an_nvme_tier(daemon_process, capsys) -> None:
    import re

    d = daemon_process(store={"dram_bytes": 4 * MiB, "nvme_bytes": 32 * MiB, "max_block_bytes": MiB})
    rng = random.Random(11)
    with d.client() as c:
        keys = [rng.randbytes(32) for _ in range(6)]
        for i, k in enumerate(keys):
            assert c.put(k, bytes([i]) * MiB)
        for k in keys:  # those demoted by the later puts are NVMe hits
            assert c.get_into(k, bytearray(MiB)) == MiB
        st = c.stats()["store"]
        assert st["hits_nvme"] >= 1 and st["hits_dram"] + st["hits_nvme"] == 6
    assert cli.main(["status", "--socket", str(d.sock)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    m = re.search(r"nvme +(\S+ \S+) / (\S+ \S+) in (\d+) blocks +\((.+)\)$", lines["nvme"])
    assert m, lines["nvme"]
    assert int(m.group(3)) == st["nvme_blocks"] >= 2 and m.group(4).endswith("nvme")
    assert f"{st['demotions']} dram->nvme" in lines["evictions"] and st["demotions"] >= 2
    assert f"{st['hits_dram']} dram hits, {st['hits_nvme']} nvme hits, 0 misses (hit ratio 1.000)" in lines["gets"]


async def test_metrics_count_refused_commits_and_show_arena_and_tier_health(mdaemon) -> None:
    import os

    from memkv_mesh import protocol
    from memkv_mesh.client import MemkvError

    s = await _scrape(mdaemon)
    assert _v(s, "memkv_bad_checksums_total") == 0 and _v(s, "memkv_arena_problems") == 0
    assert _v(s, "memkv_nvme_degraded") == 0 and _v(s, "memkv_refused_connections_total") == 0
    async with await AsyncClient.connect(mdaemon.socket_path, checksum=True) as c:
        c._fill = lambda offsets, keys, values: (keys, [1] * len(keys))  # type: ignore[method-assign]  # lie
        with pytest.raises(MemkvError) as e:
            await c.put(os.urandom(32), b"x" * 4096)
        assert e.value.code == protocol.BAD_CHECKSUM
    s = await _scrape(mdaemon)
    assert _v(s, "memkv_bad_checksums_total") == 1
    seg = mdaemon._arena.segments[0]
    os.unlink(seg.path)  # the arena file deleted under the daemon: a gauge, and status, say so
    assert mdaemon._arena.check()
    with trio.fail_after(10):
        while not mdaemon.arena_problems:  # noqa: ASYNC110 (the daemon checks every 2 s)
            await trio.sleep(0.1)
    assert _v(await _scrape(mdaemon), "memkv_arena_problems") == 1


def test_status_of_a_mesh_node_shows_tenants_refusals_and_the_security_counters(daemon_process, capsys) -> None:
    import base64
    import os

    key = base64.b64encode(os.urandom(32)).decode()
    d = daemon_process(
        gossip={"enabled": True, "bind": "127.0.0.1", "port": 0, "keys": [key]},
        dataplane={"host": "127.0.0.1", "port": 0},
    )
    assert cli.main(["status", "--socket", str(d.sock)]) == 0
    out = capsys.readouterr().out
    assert "tenants   default (1 clients)" in out
    assert "refused   0 connections, 0 requests over [limits]" in out
    assert "dropped: bad key 0, replay 0, malformed 0, handler errors 0" in out
    assert "security: frame auth failures 0, identity refusals 0" in out and "bulk bytes plain" in out
