"""The Grafana dashboard (dashboards/memkv-mesh.json) queries only what live daemons export.

A real 2-node mesh (two daemon processes, gossip on a shared random key, the TCP data plane,
metrics on 127.0.0.1:0) serves a few puts and gets; both nodes' /metrics are scraped and parsed
with prometheus_client's own parser, so the names are the ones a Prometheus server stores
(``memkv_hits_total`` for a counter, ``memkv_op_seconds_bucket`` for a histogram). Every
``expr`` of every panel target and every templating query is then read as PromQL: each metric it
names must be in both scrapes, each label it matches or groups by must be on one of the metrics of
that query (or be a label Prometheus adds: ``instance``, ``job``), and each literal label value it
matches must occur. A dashboard with a typo, a counter without ``_total``, or a label value no
daemon emits is reported, and the test proves that by breaking copies of the dashboard.

Where a ``prometheus`` binary is installed, a real Prometheus also scrapes the mesh and runs every
query: each must parse and return series (that test is skipped, saying why, without one).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import DaemonProcess, wait_until, write_config
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "memkv-mesh.json"

# Labels Prometheus attaches to every scraped series (target labels), absent from the exposition.
TARGET_LABELS = {"instance", "job"}
# PromQL words that look like identifiers and are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
}  # fmt: skip
# Keywords followed by a parenthesised list of label names.
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

_TOKEN = re.compile(
    r"""
      (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<var>\$\{[^}]*\}|\$\w+)
    | (?P<range>\[[^\]]*\])
    | (?P<matchers>\{(?:[^}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*\})
    | (?P<num>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')\s*,?'
)
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<expr>.*),\s*)?(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S
)


class Matcher(NamedTuple):
    label: str
    op: str
    value: str


class Selector(NamedTuple):
    metric: str
    matchers: tuple[Matcher, ...]


class Query(NamedTuple):
    where: str  # "panel 'Hit ratio' target A"
    selectors: list[Selector]
    grouping: list[str]  # label names in by/without/on/ignoring/group_* lists


def _matchers(block: str) -> tuple[Matcher, ...]:
    inner, out, pos = block[1:-1], [], 0
    while pos < len(inner.rstrip()):
        m = _MATCHER.match(inner, pos)
        if m is None:
            raise ValueError(f"cannot read label matchers {block!r}")
        out.append(Matcher(m.group(1), m.group(2), m.group(3)[1:-1]))
        pos = m.end()
    return tuple(out)


def parse_promql(expr: str) -> tuple[list[Selector], list[str]]:
    """The metric selectors (name and label matchers) and the grouping label names in ``expr``.

    Strings, Grafana variables, ranges and numbers are skipped; an identifier followed by ``(``,
    ``by`` or ``without`` is a function or aggregation; keywords are not metrics; the parenthesised
    list after by/without/on/ignoring/group_left/group_right holds label names."""
    toks = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]
    selectors: list[Selector] = []
    grouping: list[str] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, "")
        if kind == "matchers":  # a selector with no metric name before it
            ms = _matchers(text)
            names = [m.value for m in ms if m.label == "__name__" and m.op == "="]
            if not names:
                raise ValueError(f"selector without a metric name in {expr!r}")
            selectors.append(Selector(names[0], ms))
        elif kind == "ident" and text in LABEL_LISTS:
            if nxt[1] == "(":
                j = i + 2
                while j < len(toks) and toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        grouping.append(toks[j][1])
                    j += 1
                i = j
        elif (
            kind == "ident"
            and text.lower() not in KEYWORDS
            and nxt[1] not in ("(", "by", "without")
        ):
            ms = _matchers(nxt[1]) if nxt[0] == "matchers" else ()
            selectors.append(Selector(text, ms))
            i += nxt[0] == "matchers"
        i += 1
    return selectors, grouping


def _queries_of(dashboard: dict[str, Any]) -> Iterator[Query]:
    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))  # panels inside collapsed rows

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            where = f"panel {p.get('title')!r} target {t.get('refId')}"
            sels, grouping = parse_promql(t["expr"])
            yield Query(where, sels, grouping)
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(q)
        if m is None:  # query_result(...) or a bare expression
            sels, grouping = parse_promql(q)
        else:
            sels, grouping = parse_promql(m.group("expr") or "")
            grouping.append(m.group("label"))
        yield Query(f"variable ${v['name']}", sels, grouping)


Scrape = dict[str, dict[str, set[str]]]  # sample name -> label name -> values seen


def parse_scrape(text: str) -> Scrape:
    out: Scrape = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = out.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


def problems(dashboard: dict[str, Any], scrapes: dict[str, Scrape]) -> list[str]:
    """Everything the dashboard asks for that a scrape lacks; empty when every query can return data."""
    found: list[str] = []
    n_queries = 0
    for q in _queries_of(dashboard):
        n_queries += 1
        if not q.selectors:
            found.append(f"{q.where}: names no metric")
        metric_labels: set[str] = set(TARGET_LABELS)
        for node, scrape in scrapes.items():
            for sel in q.selectors:
                if sel.metric not in scrape:
                    found.append(f"{q.where}: {sel.metric} is not exported by {node}")
                    continue
                labels = scrape[sel.metric]
                metric_labels |= labels.keys()
                for m in sel.matchers:
                    if m.label in TARGET_LABELS or m.label == "__name__":
                        continue
                    if m.label not in labels:
                        found.append(f"{q.where}: {sel.metric} has no label {m.label!r} on {node}")
                    elif "$" not in m.value and m.op in ("=", "=~"):
                        pattern = re.escape(m.value) if m.op == "=" else m.value
                        if not any(re.fullmatch(pattern, v) for v in labels[m.label]):
                            found.append(
                                f"{q.where}: {sel.metric}{{{m.label}{m.op}{m.value!r}}} matches nothing on {node} "
                                f"(values: {sorted(labels[m.label])})"
                            )
        for label in q.grouping:
            if label not in metric_labels:
                found.append(f"{q.where}: groups by {label!r}, a label none of its metrics has")
    if n_queries == 0:
        found.append("the dashboard has no queries")
    return found


# ---- the extractor itself, on expressions with every construct the dashboard uses --------------


def test_parse_promql_finds_metrics_not_functions_keywords_or_labels() -> None:
    sels, grouping = parse_promql(
        'histogram_quantile(0.99, sum by (le, op) (rate(memkv_op_seconds_bucket{job=~"$job", op="get"}'
        "[$__rate_interval] offset 5m))) / on(instance) group_left(node) memkv_node_info"
        ' > bool 1e3 and sum without (tier) (memkv_tier_used_bytes{tier!="a,b}"}) or vector(0)'
    )
    assert [s.metric for s in sels] == [
        "memkv_op_seconds_bucket",
        "memkv_node_info",
        "memkv_tier_used_bytes",
    ]
    assert sels[0].matchers == (Matcher("job", "=~", "$job"), Matcher("op", "=", "get"))
    assert sels[2].matchers == (Matcher("tier", "!=", "a,b}"),)
    assert grouping == ["le", "op", "instance", "node", "tier"]
    assert parse_promql("count(memkv_node_info{}) - 1")[0] == [Selector("memkv_node_info", ())]
    assert parse_promql('{__name__="memkv_puts_total"} * 2')[0] == [
        Selector("memkv_puts_total", (Matcher("__name__", "=", "memkv_puts_total"),))
    ]


# ---- the dashboard against a live mesh ---------------------------------------------------------


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - a loopback URL the daemon reported
        assert r.status == 200
        return str(r.read().decode())


def _traffic(dp: DaemonProcess, n: int = 8) -> str:
    """Puts ``n`` blocks, gets them and one missing key, looks them up; the node's metrics URL."""
    with dp.client() as c:
        keys = [os.urandom(32) for _ in range(n)]
        assert c.put_many(keys, [os.urandom(4096 + i) for i in range(n)]) == n
        lease = c.get_many(keys + [os.urandom(32)])  # n hits and a miss
        lease.release()
        c.lookup(keys)
        return str(c.stats()["metrics_url"])


@pytest.fixture(scope="module")
def mesh() -> Iterator[dict[str, DaemonProcess]]:
    """Two daemon processes in one mesh: gossip on a random key, the TCP data plane, metrics on
    127.0.0.1:0; both see each other alive and have served some traffic."""
    key = base64.b64encode(os.urandom(32)).decode()
    root = Path(tempfile.mkdtemp(prefix="mkd-"))  # short: Unix socket paths
    nodes: dict[str, DaemonProcess] = {}
    try:
        for name in ("a", "b"):
            seeds = []
            if nodes:
                with nodes["a"].client() as c:
                    seeds = [str(c.stats()["gossip_addr"])]
            (root / name).mkdir()
            cfg = write_config(
                root / name / "mesh.toml", root / name / "data", root / f"{name}.sock",
                node={"id": name},
                metrics={"enabled": True, "listen": "127.0.0.1:0"},
                gossip={"enabled": True, "bind": "127.0.0.1", "port": 0, "seeds": seeds, "keys": [key]},
                dataplane={"transport": "tcp", "host": "127.0.0.1", "port": 0},
            )  # fmt: skip
            nodes[name] = DaemonProcess(cfg, root / f"{name}.sock")
            nodes[name].start()

        def alive(dp: DaemonProcess) -> set[str]:
            with dp.client() as c:
                return {m["node_id"] for m in c.members() if m["state"] == "alive"}

        wait_until(
            lambda: all(alive(dp) == {"a", "b"} for dp in nodes.values()),
            15,
            "both nodes alive in both views",
        )
        for dp in nodes.values():
            _traffic(dp)
        yield nodes
    finally:
        for dp in nodes.values():
            dp.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_every_dashboard_query_names_metrics_a_live_mesh_exports(
    mesh: dict[str, DaemonProcess],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    scrapes = {name: parse_scrape(_scrape(_traffic(dp))) for name, dp in mesh.items()}
    assert all(
        "memkv_op_seconds_bucket" in s and "memkv_mesh_dirty_bytes" in s for s in scrapes.values()
    )

    found = problems(dashboard, scrapes)
    assert found == [], "\n".join(found)
    queried = {s.metric for q in _queries_of(dashboard) for s in q.selectors}
    assert len(queried) >= 50, sorted(queried)

    # The check can fail: each broken copy of the dashboard is reported.
    def broken(old: str, new: str) -> list[str]:
        """The problems of a copy with ``old`` replaced by ``new`` in the first query that has it."""
        copied = copy.deepcopy(dashboard)
        for p in copied["panels"]:
            for t in p.get("targets", []):
                if old in t["expr"]:
                    t["expr"] = t["expr"].replace(old, new, 1)
                    return problems(copied, scrapes)
        raise AssertionError(f"no query has {old!r}")

    assert any(
        "memkv_hit_total is not exported" in p
        for p in broken("memkv_hits_total", "memkv_hit_total")
    )
    assert any("memkv_puts is not exported" in p for p in broken("memkv_puts_total", "memkv_puts"))
    assert any(
        "memkv_op_seconds is not exported" in p
        for p in broken("memkv_op_seconds_bucket", "memkv_op_seconds")
    )
    assert any(
        "matches nothing" in p
        for p in broken(
            "memkv_dataplane_bytes_total{", 'memkv_dataplane_bytes_total{direction="inn", '
        )
    )
    assert any(
        "groups by 'tier'" in p
        for p in broken(
            "sum by (tier) (memkv_tier_used_bytes", "sum by (tier) (memkv_active_leases"
        )
    )
    no_panels = copy.deepcopy(dashboard)
    no_panels["panels"], no_panels["templating"] = [], {"list": []}
    assert problems(no_panels, scrapes) == ["the dashboard has no queries"]


def test_dashboard_is_an_importable_grafana_dashboard_with_the_issue_s_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ds_var = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds_var] == [("DS_PROMETHEUS", "prometheus")]
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids, titles = set(), []
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        assert p["id"] not in ids, p["title"]
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        titles.append(p["title"])
        assert p["datasource"] == ds and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', t["expr"])
            for open_, close in ("()", "[]", "{}"):
                assert expr.count(open_) == expr.count(close), (p["title"], t["refId"])
    for wanted in (
        "Hit ratio, mesh-wide", "Bytes in / out", "Op latency p50 / p99", "Tier usage",
        "Replication lag p99", "Dirty bytes", "Nodes reporting", "Data-plane errors", "Security refusals",
    ):  # fmt: skip
        assert wanted in titles


# ---- the queries on a real Prometheus, where one is installed -----------------------------------


def _grafana_to_promql(expr: str) -> str:
    """What Grafana sends for "All" on both variables and a 10 s rate interval."""
    return (
        expr.replace("$__rate_interval", "10s")
        .replace('"$job"', '".*"')
        .replace('"$instance"', '".*"')
    )


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="no prometheus binary (apt-get install prometheus)"
)
def test_every_dashboard_query_returns_series_from_a_real_prometheus(
    mesh: dict[str, DaemonProcess], tmp_path: Path
) -> None:
    """A real Prometheus scrapes both nodes every second while they serve traffic; every panel
    query must parse and return at least one series, every variable at least one value."""
    targets = [urllib.parse.urlsplit(_traffic(dp)).netloc for dp in mesh.values()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: memkv-mesh\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def api(path: str, **params: Any) -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
                return dict(json.load(r))
        except urllib.error.HTTPError as e:  # a bad query answers 400 with the parser's error
            return dict(json.load(e))
        except OSError:
            return {"status": "down"}

    def scraped_enough() -> bool:
        for dp in mesh.values():
            _traffic(dp, 2)
        r = api(
            "/api/v1/query",
            query="min(count_over_time(memkv_node_info[10s])) >= 4 and count(memkv_node_info) == 2",
        )
        return r.get("status") == "success" and bool(r["data"]["result"])

    try:
        wait_until(scraped_enough, 25, "Prometheus to scrape both nodes 4 times")
        dashboard = json.loads(DASHBOARD.read_text())
        found: list[str] = []
        n = 0
        for p in dashboard["panels"]:
            for t in p.get("targets", []):
                n += 1
                r = api("/api/v1/query", query=_grafana_to_promql(t["expr"]))
                if r["status"] != "success":
                    found.append(f"{p['title']!r} {t['refId']}: {r.get('error')}")
                elif not r["data"]["result"]:
                    found.append(f"{p['title']!r} {t['refId']}: no series")
        for v in dashboard["templating"]["list"]:
            if v["type"] == "query":
                m = _LABEL_VALUES.match(_grafana_to_promql(v["query"]["query"]))
                assert m is not None
                r = api(f"/api/v1/label/{m.group('label')}/values", **{"match[]": m.group("expr")})
                if r["status"] != "success" or not r["data"]:
                    found.append(f"variable {v['name']}: {r}")
        assert found == [], "\n".join(found)
        assert n >= 70
        # And a broken query is an error there too.
        assert api("/api/v1/query", query="sum by (tier (memkv_hits_total)")["status"] == "error"
    finally:
        prom.terminate()
        prom.wait(20)
        log.close()


def test_status_reports_the_block_directory(mesh: dict[str, DaemonProcess]) -> None:
    """``status`` shows the gossiped block directory's counts (tools wait on them, e.g. ``demo
    vllm`` before its remote hit): each node knows the other's blocks."""

    def directory(dp: DaemonProcess) -> dict[str, Any]:
        with dp.client() as c:
            d: dict[str, Any] = c.stats()["directory"]
            return d

    wait_until(lambda: all(directory(dp)["view_blocks"] >= 8 for dp in mesh.values()), 15,
               "each node's directory counts the other's 8 blocks")  # fmt: skip
    for dp in mesh.values():
        d = directory(dp)
        assert d["views"] == 1 and d["local_blocks"] >= 8, d
