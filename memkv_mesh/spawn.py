"""Start a daemon in a subprocess and wait until it answers (benchmarks and check scripts)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["spawn_daemon"]


def spawn_daemon(config: Path, sock: Path, *, timeout: float = 60.0, **popen: Any) -> subprocess.Popen[bytes]:
    """``python -m memkv_mesh daemon --config CONFIG``; returns once a client can connect to ``sock``.

    RuntimeError (with the exit code) if the daemon exits or does not answer within ``timeout``.
    """
    from memkv_mesh.client import Client

    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [sys.executable, "-m", "memkv_mesh", "daemon", "--config", str(config)], **popen
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon for {config} exited with code {proc.returncode}")
        if sock.exists():
            try:
                Client(sock, timeout=5).close()
                return proc
            except ConnectionError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the daemon for {config} did not answer within {timeout:.0f} s")
