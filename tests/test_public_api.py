"""The public surface is what memkv_mesh.__all__ lists, and gossip/ stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import memkv_mesh

REPO = Path(__file__).resolve().parent.parent


def test_exports() -> None:
    for name in memkv_mesh.__all__:
        assert hasattr(memkv_mesh, name), name
    assert {"Client", "AsyncClient", "Lease", "MemkvError", "block_keys", "namespace"} <= set(memkv_mesh.__all__)


def test_gossip_core_imports_no_io_and_no_clock() -> None:
    forbidden = {"trio", "socket", "time", "asyncio", "select", "selectors", "threading"}
    files = sorted((REPO / "gossip").glob("*.py"))
    assert files
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            bad = forbidden.intersection(names)
            assert not bad, f"{f.name} imports {bad}: gossip/ state machines must stay pure"
