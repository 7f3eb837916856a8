"""Start daemons in subprocesses and wait until they answer: one helper for tests, benchmarks,
demos and check scripts (config text, start, readiness)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["spawn_daemon", "toml_text", "wait_serving"]


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    """A mesh.toml from ``{"store": {"dram_bytes": 1 << 20, ...}, ...}`` (bools, numbers, strings
    and lists of them: all a daemon config needs)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))  # a TOML basic string is a JSON string

    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {val(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _tail(log: Path | None, n: int = 2000) -> str:
    if log is None:
        return ""
    try:
        return ": " + log.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def wait_serving(
    proc: subprocess.Popen[bytes], sock: Path, *, timeout: float = 60.0, what: str = "the daemon", log: Path | None = None
) -> None:
    """Return once a client can connect to ``sock``; RuntimeError (with the exit code and the end
    of ``log``) if the process exits first or does not answer within ``timeout``."""
    from memkv_mesh.client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}{_tail(log)}")
        if sock.exists():
            try:
                Client(sock, timeout=5).close()
                return
            except ConnectionError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s{_tail(log)}")


def spawn_daemon(config: Path, sock: Path, *, timeout: float = 60.0, **popen: Any) -> subprocess.Popen[bytes]:
    """``python -m memkv_mesh daemon --config CONFIG``; returns once a client can connect to ``sock``.

    RuntimeError (with the exit code) if the daemon exits or does not answer within ``timeout``.
    """
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(config)], **popen
    )
    try:
        wait_serving(proc, sock, timeout=timeout, what=f"the daemon for {config}")
    except RuntimeError:
        if proc.poll() is None:
            proc.kill()
        raise
    return proc
