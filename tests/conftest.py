"""Shared fixtures: configs with small tiers, an in-process daemon, and daemons in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from memkv_mesh.config import Config, load_config
from memkv_mesh.spawn import toml_text

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "simulations" / "traces" / "conversation_trace.jsonl"


@pytest.fixture
def lmc() -> Any:
    """The lmcache package, for the LMCache integration tests: skipped when it is not installed,
    unless MEMKV_REQUIRE_LMCACHE=1 (scripts/test's LMCache stage), where its absence fails."""
    if os.environ.get("MEMKV_REQUIRE_LMCACHE") == "1":
        import lmcache  # an ImportError here fails the test: this run must exercise LMCache

        return lmcache
    return pytest.importorskip("lmcache", reason="lmcache is not installed (pip install 'memkv-mesh[lmcache]')")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mk-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(path: Path, data_dir: Path, sock: Path, **sections: dict[str, Any]) -> Path:
    """A mesh.toml for tests: small arena beside the data dir, no metrics, quiet logs."""
    node = {"id": f"t{uuid.uuid4().hex[:8]}", "data_dir": str(data_dir), "socket": str(sock), "arena_dir": str(data_dir)}
    store: dict[str, Any] = {"dram_bytes": 32 << 20, "nvme_bytes": 0, "max_block_bytes": 8 << 20}
    metrics: dict[str, Any] = {"enabled": False}
    log: dict[str, Any] = {"level": "warning", "format": "json"}
    node.update(sections.pop("node", {}))
    store.update(sections.pop("store", {}))
    metrics.update(sections.pop("metrics", {}))
    log.update(sections.pop("log", {}))
    tables = {"node": node, "store": store, "metrics": metrics, "log": log, **sections}
    path.write_text(toml_text(tables))
    return path


def wait_until(pred: Any, timeout: float, what: str) -> None:
    """Poll ``pred`` (state other processes change) until it holds; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def members_in_state(dp: Any, state: str) -> set[str]:
    """The members a daemon process lists in ``state`` ("alive", "dead", ...)."""
    with dp.client() as c:
        return {m["node_id"] for m in c.members() if m["state"] == state}


@pytest.fixture
def make_config(tmp_path: Path, short_dir: Path) -> Any:
    def make(**sections: dict[str, Any]) -> Config:
        cfg_path = write_config(tmp_path / "mesh.toml", tmp_path / "data", short_dir / "s.sock", **sections)
        return load_config(cfg_path)

    return make


@pytest.fixture
async def daemon(make_config: Any) -> AsyncIterator[Any]:
    """An in-process daemon with a 32 MiB arena and no NVMe tier."""
    from memkv_mesh.daemon import Daemon

    async with trio.open_nursery() as nursery:
        d = await nursery.start(Daemon(make_config()).run)
        yield d
        nursery.cancel_scope.cancel()


class DaemonProcess:
    """A daemon in a subprocess (``python -m memkv_mesh daemon``) that tests can kill -9."""

    def __init__(self, config_path: Path, sock: Path) -> None:
        self.config_path = config_path
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.with_suffix(".log")

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        from memkv_mesh.spawn import spawn_daemon

        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = spawn_daemon(
                self.config_path, self.sock, timeout=timeout, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
            )
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self.log_path.read_text()}") from None
        return self

    def client(self) -> Any:
        from memkv_mesh.client import Client

        return Client(self.sock, timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self.proc is not None:
            code = self.proc.returncode
        if getattr(self, "_log", None):
            self._log.close()
        return code


@pytest.fixture
def daemon_process(tmp_path: Path, short_dir: Path) -> Iterator[Any]:
    """Factory: ``daemon_process(store={...})`` starts a subprocess daemon; all are stopped after."""
    started: list[DaemonProcess] = []

    def make(name: str = "d", **sections: dict[str, Any]) -> DaemonProcess:
        data = tmp_path / name
        data.mkdir(exist_ok=True)
        sock = short_dir / f"{name}.sock"
        cfg = write_config(data / "mesh.toml", data / "data", sock, **sections)
        dp = DaemonProcess(cfg, sock).start()
        started.append(dp)
        return dp

    yield make
    for dp in started:
        dp.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.path.exists("/dev/nvidia0"):
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
