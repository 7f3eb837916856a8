"""Fixtures for the security tests: daemons with tenants in world-traversable directories, clients
that run as other users (a forked child that drops to a uid/gid), and a raw protocol client that
maps the arena it is handed.

Why the re-export at the top: tests/ has no ``__init__.py``, so this file and tests/conftest.py
are both imported as the module ``conftest``, and whichever pytest imported last is what
``from conftest import write_config`` finds. This directory sorts before ``test_*.py``, so without
the re-export every test module that imports a helper from tests/conftest.py would fail to
collect when the whole suite runs. We load tests/conftest.py under a private name and re-export
its plain helpers (not its fixtures or hooks, which pytest already has from the file itself).
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import pickle
import select
import shutil
import signal
import socket
import sys
import tempfile
import traceback
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memkv_mesh import protocol


def _load_root_conftest() -> types.ModuleType:
    path = Path(__file__).resolve().parent.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("_memkv_tests_root_conftest", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _is_fixture(obj: object) -> bool:
    return hasattr(obj, "_fixture_function_marker") or hasattr(obj, "_pytestfixturefunction")


_root = _load_root_conftest()
for _name, _obj in vars(_root).items():
    if _name.startswith(("_", "pytest_")) or _name in globals() or _is_fixture(_obj):
        continue
    if isinstance(_obj, types.ModuleType):
        continue
    globals()[_name] = _obj

DaemonProcess = _root.DaemonProcess
write_config = _root.write_config
wait_until = _root.wait_until

# Users the tests run clients as (no passwd entries needed: SO_PEERCRED reports numbers).
UID_A, UID_B, UID_C = 65530, 65531, 65532  # tenants "alpha", "beta", and a user in no tenant
GID_A, GID_B, GID_C = 65530, 65531, 65532
GID_GROUP = 65540  # tenant "gamma" is this group
UID_G1, UID_G2 = 65533, 65535  # two users whose primary group is GID_GROUP (65534 is nobody)

TENANTS: list[dict[str, Any]] = [
    {"name": "alpha", "uids": [UID_A]},
    {"name": "beta", "uids": [UID_B]},
    {"name": "gamma", "gids": [GID_GROUP]},
]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the tests run clients as other uids (setuid in a forked child)"
)


# ---- running code as another user -----------------------------------------------------------------
class ChildFailed(AssertionError):
    """The function run as another user raised; the message holds its traceback."""


def run_as(uid: int, gid: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """Run ``fn(*args)`` in a forked child that has dropped to ``uid``/``gid`` (no supplementary
    groups) and return its result (pickled back through a pipe). Whatever it raises is raised
    here as ChildFailed with the child's traceback. The child never returns into pytest or Trio:
    it leaves with ``os._exit``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                out: tuple[str, Any] = ("ok", fn(*args))
                data = pickle.dumps(out)
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                data = pickle.dumps(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                view = view[n:]
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise ChildFailed(f"{fn.__name__} as uid {uid} did not finish within {timeout} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise ChildFailed(f"{fn.__name__} as uid {uid} died without a result")
    status, value = pickle.loads(b"".join(chunks))
    if status != "ok":
        raise ChildFailed(f"{fn.__name__} as uid {uid}/gid {gid} raised {value}")
    return value


class HeldAs:
    """``with HeldAs(uid, gid, fn, *args) as result:`` runs ``fn(*args)`` in a child dropped to
    ``uid``/``gid``; ``fn`` returns ``(result, keep)``: ``result`` comes back here, ``keep``
    (clients, leases, ...) stays alive in the child until the ``with`` block ends, so a test can
    act as another user while this one holds what it took."""

    def __init__(self, uid: int, gid: int, fn: Callable[..., tuple[Any, Any]], *args: Any, timeout: float = 60.0) -> None:
        self.uid, self.gid, self.fn, self.args, self.timeout = uid, gid, fn, args, timeout
        self.pid = 0
        self._go = -1

    def __enter__(self) -> Any:
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.close(go_w)
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                keep = None
                try:
                    result, keep = self.fn(*self.args)
                    data = pickle.dumps(("ok", result))
                except BaseException as e:  # noqa: BLE001
                    data = pickle.dumps(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view) :]
                os.close(w)
                while os.read(go_r, 1):  # until the parent closes its end
                    pass
                del keep
            finally:
                os._exit(0)
        os.close(w)
        os.close(go_r)
        self.pid, self._go = pid, go_w
        chunks: list[bytes] = []
        try:
            while True:
                ready, _, _ = select.select([r], [], [], self.timeout)
                if not ready:
                    os.kill(pid, signal.SIGKILL)
                    raise ChildFailed(f"{self.fn.__name__} as uid {self.uid} did not finish within {self.timeout} s")
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except BaseException:
            self.__exit__()
            raise
        finally:
            os.close(r)
        if not chunks:
            self.__exit__()
            raise ChildFailed(f"{self.fn.__name__} as uid {self.uid} died without a result")
        status, value = pickle.loads(b"".join(chunks))
        if status != "ok":
            self.__exit__()
            raise ChildFailed(f"{self.fn.__name__} as uid {self.uid}/gid {self.gid} raised {value}")
        return value

    def __exit__(self, *exc: object) -> None:
        if self._go >= 0:
            os.close(self._go)
            self._go = -1
        if self.pid:
            os.waitpid(self.pid, 0)
            self.pid = 0


# ---- a raw protocol client ------------------------------------------------------------------------
class RawClient:
    """A hand-driven, blocking connection to the daemon's socket: frames from memkv_mesh.protocol,
    file descriptors the daemon passes (SCM_RIGHTS) collected, and the arena mapped from the one
    that comes with ``Welcome`` (or, from a daemon that passes none, opened by its path)."""

    def __init__(self, sock_path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(sock_path))
        self.frames = protocol.FrameBuffer()
        self.fds: list[int] = []
        self.welcome: protocol.Welcome | None = None
        self.mmap: mmap.mmap | None = None

    def send(self, msg: protocol.Msg) -> None:
        self.sock.sendall(bytes(protocol.encode_frame(msg)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_or_eof(self) -> protocol.Reply | None:
        while True:
            body = self.frames.next_frame()
            if body is not None:
                return protocol.reply_decoder.decode(body)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 8)
            except ConnectionResetError:
                return None
            self.fds.extend(fds)
            if not data:
                return None
            self.frames.feed(data)

    def recv(self) -> protocol.Reply:
        reply = self.recv_or_eof()
        assert reply is not None, "the daemon closed the connection"
        return reply

    def call(self, msg: protocol.Msg) -> protocol.Reply:
        self.send(msg)
        return self.recv()

    def hello(self, name: str = "raw-sec-test", pid: int | None = None) -> protocol.Reply:
        """Hello; on Welcome, map the arena (writable, as every client's mapping is). A daemon
        that refuses at accept may have closed before the Hello is sent: the reply is read all
        the same (as ``Client`` does)."""
        try:
            self.send(protocol.Hello(protocol.PROTOCOL_VERSION, name, os.getpid() if pid is None else pid))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at accept (no tenant, too many clients): its Error is still readable
        reply = self.recv()
        if isinstance(reply, protocol.Welcome):
            self.welcome = reply
            if reply.arena_bytes > 0:
                if self.fds:
                    fd = self.fds[0]
                    self.mmap = mmap.mmap(fd, reply.arena_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                else:
                    fd = os.open(reply.arena_path, os.O_RDWR)
                    try:
                        self.mmap = mmap.mmap(
                            fd, reply.arena_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                        )
                    finally:
                        os.close(fd)
        return reply

    def eof_within(self, timeout: float) -> bool:
        """True if the daemon closes the connection within ``timeout`` s (replies before it are
        read and dropped)."""
        self.sock.settimeout(timeout)
        try:
            while self.recv_or_eof() is not None:
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self.mmap is not None:
            self.mmap.close()
            self.mmap = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- daemons with tenants -------------------------------------------------------------------------
def tenants_toml(tenants: list[dict[str, Any]]) -> str:
    """``[[tenants]]`` tables (spawn.toml_text writes only plain tables)."""
    out = []
    for t in tenants:
        out.append("[[tenants]]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in t.items())  # ints, strings, lists of ints
    return "\n".join(out) + "\n"


class SecDaemon(DaemonProcess):  # type: ignore[misc,valid-type]
    """A daemon process whose socket, data and arena directories other users can reach (0755)."""

    node_id: str
    data_dir: Path
    arena_dir: Path


def open_dir(prefix: str) -> Path:
    """A short temporary directory that every user may traverse (mkdtemp makes them 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


class SecDaemons:
    """Makes daemons (``make``) and stops and removes them all (``close``).

    Each daemon gets its own 0755 directory under /tmp: ``<dir>/mesh.toml``, ``<dir>/data`` (also
    the arena directory), ``<dir>/d.sock``."""

    def __init__(self) -> None:
        self.made: list[tuple[SecDaemon, Path]] = []

    def make(self, tenants: list[dict[str, Any]] | None = None, *, start: bool = True, **sections: Any) -> SecDaemon:
        base = open_dir("mks-")
        node_id = f"sec{uuid.uuid4().hex[:8]}"
        node = {"id": node_id, **sections.pop("node", {})}
        data = base / "data"
        cfg = write_config(base / "mesh.toml", data, base / "d.sock", node=node, **sections)
        if tenants:
            with open(cfg, "a") as f:
                f.write(tenants_toml(tenants))
        dp = SecDaemon(cfg, base / "d.sock")
        dp.node_id, dp.data_dir, dp.arena_dir = node_id, data, data
        self.made.append((dp, base))
        if start:
            dp.start()
        return dp

    def close(self) -> None:
        for dp, base in self.made:
            dp.stop()
            shutil.rmtree(base, ignore_errors=True)
        self.made = []


@pytest.fixture
def sec_daemon() -> Iterator[Callable[..., SecDaemon]]:
    """Factory: ``sec_daemon(tenants=[...], limits={...}, start=True, **sections)``; every daemon
    made is stopped and its directory removed after the test."""
    daemons = SecDaemons()
    yield daemons.make
    daemons.close()
