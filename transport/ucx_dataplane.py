"""The UCX data plane: ucxx's core (non-asyncio) API driven from Trio.

Theory of operation
-------------------
* ``ucxx`` is imported lazily (``probe``), so the package works without it; ``probe`` reports
  either the UCX transports the context may use (its resources, after ``UCX_TLS``) or why UCX
  cannot start. ``choose_transport`` turns that into the auto decision.
* One UCX context and worker per backend, in *blocking progress mode*: the worker exposes an epoll
  file descriptor. A single Trio task (``_Progress.run``) calls ``worker.progress()``, checks the
  requests tasks are waiting on, then ``worker.arm()``; when arm says the worker is idle it sleeps
  in ``trio.lowlevel.wait_readable(fd)``, otherwise it loops. There is no progress thread and no
  asyncio loop: every ucxx call happens on the Trio thread, and listener callbacks (which ucxx
  invokes from inside ``progress``) just queue the connection request for the serve loop.
* A channel is one UCX endpoint (with error handling, so a dead peer fails its requests).
  Control frames go over the endpoint's stream API (length then body); block bytes go over the
  tag API, which is what uses rendezvous/zero-copy (RDMA, CUDA IPC) for large messages. Tags are
  matched per worker, not per endpoint, so each side receives bulk on a tag taken from its own
  handshake nonce (``start_session``): unique per connection, and the sender learns it only by
  authenticating. Messages with one tag between one pair of endpoints match in order, which keeps
  the protocol's "bytes follow their frame, in list order" rule.
* Control frames are sealed with the connection's ``Session`` once it starts, exactly as over TCP;
  before it, a frame may be at most ``PREAUTH_FRAME_BYTES`` (what UCX itself buffers for a
  stream endpoint is UCX's). The 4-byte length of a frame waits for the caller's limit
  (``IdleTimeout``); its body, once announced, must arrive within ``io_timeout_s``.
* A request must never outlive the buffer it reads into (an arena slice that may be freed and
  reused): if a wait is cancelled or times out, the endpoint is closed, which cancels its
  in-flight requests, and we wait (shielded, bounded) for the request to finish before returning.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
import xxhash

from transport.dataplane import (
    LEN,
    PREAUTH_FRAME_BYTES,
    Channel,
    DataPlaneError,
    IdleTimeout,
    Msg,
    PeerClosed,
    Session,
    open_frame,
    seal_frame,
    split_peer,
)
from transport.dataplane_config import DataPlaneConfig

log = logging.getLogger("memkv_mesh.dataplane")

__all__ = ["UcxBackend", "UcxChannel", "UcxProbe", "probe"]

# Transport names that bring something sockets cannot: RDMA verbs/DevX, EFA, and GPU memory paths.
RDMA_TRANSPORTS = frozenset(
    {"rc", "rc_verbs", "rc_mlx5", "rc_x", "ud", "ud_verbs", "ud_mlx5", "ud_x", "dc", "dc_mlx5", "dc_x",
     "ib", "srd", "gga", "gga_mlx5"}
)  # fmt: skip
CUDA_TRANSPORTS = frozenset({"cuda_copy", "cuda_ipc", "gdr_copy", "rocm_copy", "rocm_ipc", "rocm_gdr"})


class UcxProbe(msgspec.Struct, frozen=True):
    transports: list[str]  # e.g. ["tcp", "sysv", "posix", "cma"]
    devices: list[str]  # e.g. ["tcp/lo", "posix/memory"]
    error: str = ""
    ucx_version: str = ""

    def fast_transports(self) -> list[str]:
        return [t for t in self.transports if t in RDMA_TRANSPORTS or t in CUDA_TRANSPORTS]


_probe_lock = threading.Lock()
_probe_cache: UcxProbe | None = None
_RESOURCE = re.compile(r"^#\s+resource\s+\d+\s*:.*?\s(\S+)/(\S+)\s*$", re.MULTILINE)


def parse_resources(info: str) -> list[str]:
    """``ucp_context_print_info`` text -> ["tl/dev", ...] in order."""
    return [f"{m.group(1)}/{m.group(2)}" for m in _RESOURCE.finditer(info)]


def probe() -> UcxProbe:
    """Can UCX start here, and with which transports? Cached; safe to call from a thread."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None:
            _probe_cache = _probe_uncached()
        return _probe_cache


def _probe_uncached() -> UcxProbe:
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and warns about on every
    # context; the warning is noise in our logs (an explicit setting by the operator wins).
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        from ucxx._lib import libucxx as L
    except ImportError as e:
        return UcxProbe([], [], error=f"ucxx is not importable ({e}); install ucxx-cu12")
    except Exception as e:  # a broken install (missing libucx, bad CUDA libs) is "cannot start"
        return UcxProbe([], [], error=f"ucxx failed to load: {type(e).__name__}: {e}")
    try:
        ctx = L.UCXContext(feature_flags=(L.Feature.TAG, L.Feature.STREAM, L.Feature.WAKEUP))
        info = ctx.info
        del ctx
    except Exception as e:
        return UcxProbe([], [], error=f"UCX context failed to start: {type(e).__name__}: {e}")
    devices = parse_resources(info)
    transports: list[str] = []
    for d in devices:
        tl = d.split("/")[0]
        if tl not in transports and tl != "self":
            transports.append(tl)
    try:
        version = ".".join(map(str, L.get_ucx_version()))
    except Exception:
        version = ""
    if not transports:
        return UcxProbe([], devices, error="UCX found no usable transport (check UCX_TLS)", ucx_version=version)
    return UcxProbe(transports, devices, ucx_version=version)


# ---- which transports an endpoint really uses: ucp_ep_query (UCX >= 1.14) through ctypes --------
# ucxx's Python API does not wrap ucp_ep_query; the endpoint's ucp_ep_h is ``UCXEndpoint.handle``.
# Layouts from UCX 1.21's ucp.h / ucp_def.h (ucp_ep_attr_t, ucp_transports_t, ucp_transport_entry_t).
_EP_ATTR_FIELD_TRANSPORTS = 1 << 3
_MAX_LANES = 32


class _TransportEntry(ctypes.Structure):
    _fields_ = [("transport_name", ctypes.c_char_p), ("device_name", ctypes.c_char_p)]


class _Transports(ctypes.Structure):
    _fields_ = [
        ("entries", ctypes.POINTER(_TransportEntry)),
        ("num_entries", ctypes.c_uint),
        ("entry_size", ctypes.c_size_t),
    ]


class _EpAttr(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("name", ctypes.c_char * 32),  # UCP_ENTITY_NAME_MAX
        ("local_sockaddr", ctypes.c_uint64 * 16),  # struct sockaddr_storage: 128 bytes, 8-aligned
        ("remote_sockaddr", ctypes.c_uint64 * 16),
        ("transports", _Transports),
        ("user_data", ctypes.c_void_p),
    ]


_ep_query: Any = None


def endpoint_transports(ep: Any) -> list[str]:
    """``transport/device`` of each lane a connected endpoint uses (e.g. ``tcp/lo``,
    ``cma/memory``), from ``ucp_ep_query``; [] when UCX cannot say (too old, not wired up yet)."""
    global _ep_query
    try:
        if _ep_query is None:
            import libucx  # the wheel that ships libucp, already loaded by ucxx

            lib = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so.0"))
            fn = lib.ucp_ep_query
            fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(_EpAttr)]
            fn.restype = ctypes.c_int
            _ep_query = fn
        entries = (_TransportEntry * _MAX_LANES)()
        attr = _EpAttr()
        attr.field_mask = _EP_ATTR_FIELD_TRANSPORTS
        attr.transports.entries = entries
        attr.transports.num_entries = _MAX_LANES
        attr.transports.entry_size = ctypes.sizeof(_TransportEntry)
        if _ep_query(ctypes.c_void_p(int(ep.handle)), ctypes.byref(attr)) != 0:
            return []
        out = []
        for e in entries[: min(attr.transports.num_entries, _MAX_LANES)]:
            if e.transport_name:
                device = (e.device_name or b"").decode()
                lane = f"{e.transport_name.decode()}/{device}" if device else e.transport_name.decode()
                if lane not in out:
                    out.append(lane)
        return out
    except Exception as e:  # an older UCX without ucp_ep_query, or another libucx layout
        log.debug("cannot query the UCX endpoint's transports: %s", e)
        return []


class _Progress:
    """Drives one UCX worker from Trio: progress, complete waiters, arm, sleep on the epoll fd."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.fd: int = worker.epoll_file_descriptor
        self._waiters: list[tuple[Any, trio.Event]] = []
        self._sleep: trio.CancelScope | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        w = self.worker
        while True:
            w.progress()
            self._complete()
            if w.arm():
                # Idle: sleep until the fd fires or a task posts a request (``kick``). While
                # requests are outstanding, also wake every 5 ms: a safety net for a transport
                # without wake-up support (the fd is what normally wakes us).
                wait = 0.005 if self._waiters else 0.25
                with trio.CancelScope(deadline=trio.current_time() + wait) as self._sleep:
                    await trio.lowlevel.wait_readable(self.fd)
                self._sleep = None
            else:
                await trio.lowlevel.checkpoint()

    def _complete(self) -> None:
        if not self._waiters:
            return
        keep = []
        for req, ev in self._waiters:
            if req.completed:
                ev.set()
            else:
                keep.append((req, ev))
        self._waiters = keep

    def kick(self) -> None:
        if self._sleep is not None:
            self._sleep.cancel()

    async def wait(self, req: Any) -> None:
        if not req.completed:
            self.worker.progress()
        if not req.completed:
            ev = trio.Event()
            self._waiters.append((req, ev))
            self.kick()
            await ev.wait()
        else:
            await trio.lowlevel.checkpoint()


class UcxChannel:
    def __init__(self, backend: UcxBackend, ep: Any, peer: str) -> None:
        self.peer = peer
        self._b = backend
        self._ep = ep
        self._send_tag = 0
        self._recv_tag = 0
        self._closed = False
        self._len = bytearray(4)
        self._max = PREAUTH_FRAME_BYTES  # until the session starts
        self._io_timeout = backend.config.io_timeout_s
        self.session: Session | None = None

    def start_session(self, session: Session) -> None:
        self.session = session
        self._max = self._b.config.max_frame_bytes
        self._recv_tag = int.from_bytes(session.local_nonce[:8], "little")
        self._send_tag = int.from_bytes(session.remote_nonce[:8], "little")
        # Authenticated: the handshake went over this endpoint, so UCX has wired up its lanes.
        self._b.note_lanes(self.peer, endpoint_transports(self._ep))

    async def _run(self, req: Any, keep: object, limit_s: float | None, what: str) -> None:
        await self._run_all([req], keep, limit_s, what)

    async def _run_all(
        self, reqs: list[Any], keep: object, limit_s: float | None, what: str,
        each: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Wait for every request (each within ``limit_s``), in order, awaiting ``each(i)`` once
        request ``i`` is done; on cancel, timeout or error, close the endpoint and let *all* of
        them finish before returning, since they point into ``keep``."""
        prog = self._b.progress
        try:
            for i, req in enumerate(reqs):
                with trio.fail_after(limit_s if limit_s else float("inf")):
                    await prog.wait(req)
                try:
                    req.check_error()
                except Exception as e:
                    raise PeerClosed(f"peer {self.peer}: {what} failed: {type(e).__name__}: {e}") from None
                if each is not None:
                    await each(i)
        except trio.TooSlowError:
            await self._abandon(reqs)
            raise DataPlaneError(f"peer {self.peer}: {what} stalled for {limit_s} s") from None
        except BaseException:
            await self._abandon(reqs)
            raise

    async def _abandon(self, reqs: list[Any]) -> None:
        # Shielded, and driving progress ourselves: on shutdown the progress task is cancelled too.
        with trio.CancelScope(shield=True):
            self._close_ep()
            worker = self._b.worker
            deadline = trio.current_time() + 5
            while not all(r.completed for r in reqs) and trio.current_time() < deadline:
                worker.progress()
                if not all(r.completed for r in reqs):
                    await trio.sleep(0.001)
            stuck = [r for r in reqs if not r.completed]
            if stuck:  # pragma: no cover - UCX did not cancel in time
                log.error("%d UCX requests did not finish after their endpoint closed", len(stuck))
                self._b.leaked.extend(stuck)

    async def send_msg(self, msg: Msg) -> None:
        self._check()
        from ucxx._lib.arr import Array

        frame = seal_frame(self.session, msg)
        arr = Array(frame)
        req = self._ep.stream_send(arr)
        await self._run(req, (frame, arr), self._io_timeout, "send")

    async def recv_msg(self, limit_s: float | None) -> Msg:
        self._check()
        from ucxx._lib.arr import Array

        lb = bytearray(4)
        arr = Array(lb)
        try:
            await self._run(self._ep.stream_recv(arr), (lb, arr), limit_s, "receive")
        except DataPlaneError as e:
            if "stalled" in str(e):  # no frame began within limit_s (the endpoint is closed now)
                raise IdleTimeout(f"peer {self.peer}: no frame within {limit_s} s") from None
            raise
        (n,) = LEN.unpack_from(lb, 0)
        if n > self._max or n == 0:
            raise DataPlaneError(f"peer {self.peer} sent a {n}-byte frame; the limit is {self._max}")
        body = bytearray(n)
        barr = Array(body)
        self._check()
        await self._run(self._ep.stream_recv(barr), (body, barr), self._io_timeout, "receive")
        return open_frame(self.session, body)

    async def send_blocks(self, views: list[memoryview]) -> None:
        self._check()
        from ucxx._lib import libucxx as L
        from ucxx._lib.arr import Array

        arrs = [Array(v) for v in views]
        tag = L.UCXXTag(self._send_tag)
        reqs = [self._ep.tag_send(a, tag) for a in arrs]  # all posted: UCX pipelines them
        await self._run_all(reqs, (views, arrs), self._io_timeout, "bulk send")

    async def recv_blocks(
        self, targets: list[memoryview | int], on_block: Callable[[int, int], None] | None = None
    ) -> list[int]:
        self._check()
        from ucxx._lib import libucxx as L
        from ucxx._lib.arr import Array

        bufs = [memoryview(bytearray(t)) if isinstance(t, int) else t for t in targets]
        arrs = [Array(b) for b in bufs]
        tag = L.UCXXTag(self._recv_tag)
        # Posted in order; one tag between one pair of endpoints matches in send order.
        reqs = [self._ep.tag_recv(a, tag, L.UCXXTagMaskFull) for a in arrs]
        out: list[int] = []
        big = self._b.config.thread_checksum_bytes

        async def landed(i: int) -> None:
            # Each block is hashed as soon as it is in (in a thread when large, so the loop stays
            # live) and handed on while the later ones are still arriving.
            t = targets[i]
            if isinstance(t, int):
                digest = 0
            elif len(t) >= big:
                digest = await trio.to_thread.run_sync(xxhash.xxh3_64_intdigest, t)
            else:
                digest = xxhash.xxh3_64_intdigest(t)
            out.append(digest)
            if on_block is not None:
                on_block(i, digest)

        await self._run_all(reqs, (bufs, arrs), self._io_timeout, "bulk receive", landed)
        return out

    def _check(self) -> None:
        """Call right before posting (no await in between). Posting on an endpoint whose error
        callback has already run blocks inside ucxx forever (reproduced: ucxx 0.52 / UCX 1.21,
        connecting to a closed port), so a dead endpoint must be caught here."""
        if self._closed:
            raise PeerClosed(f"peer {self.peer}: connection already closed")
        if not self._ep.alive:
            self._close_ep()
            raise PeerClosed(f"peer {self.peer}: the UCX endpoint failed (peer unreachable or gone)")

    def _close_ep(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                # close_blocking (one attempt, no wait) also cancels the endpoint's posted tag
                # receives, which plain close() leaves pending.
                self._ep.close_blocking(0, 1)
            except Exception:
                pass
            self._b.progress.kick()

    async def aclose(self) -> None:
        self._close_ep()
        self._b.forget(self)
        await trio.lowlevel.checkpoint()


class UcxBackend:
    name = "ucx"

    def __init__(self, config: DataPlaneConfig) -> None:
        self.config = config
        p = probe()
        if p.error:
            raise DataPlaneError(f"UCX cannot start: {p.error}")
        self.ucx_transports: list[str] = list(p.transports)
        self.ucx_devices: list[str] = list(p.devices)
        self.lanes_in_use: list[str] = []  # transport/device of the lanes endpoints really use
        self._lane_sets: set[tuple[str, ...]] = set()
        from ucxx._lib import libucxx as L

        self._L = L
        self._ctx = L.UCXContext(feature_flags=(L.Feature.TAG, L.Feature.STREAM, L.Feature.WAKEUP))
        self.worker = L.UCXWorker(self._ctx)
        self.worker.init_blocking_progress_mode()
        self.progress = _Progress(self.worker)
        self._pending: list[Any] = []
        self._channels: set[UcxChannel] = set()
        self._ids = itertools.count(1)
        self._listener: Any = None
        self.leaked: list[Any] = []
        self._started = False

    def forget(self, chan: UcxChannel) -> None:
        self._channels.discard(chan)

    def note_lanes(self, peer: str, lanes: list[str]) -> None:
        """Record the lanes an authenticated endpoint uses; log each new combination once."""
        key = tuple(lanes)
        if key not in self._lane_sets:
            self._lane_sets.add(key)
            log.info(
                "UCX endpoint lanes",
                extra={"fields": {"peer": peer, "lanes": ", ".join(lanes) or "unknown (ucp_ep_query gave none)"}},
            )
        for lane in lanes:
            if lane not in self.lanes_in_use:
                self.lanes_in_use.append(lane)

    async def serve(
        self, handler: Callable[[Channel], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        send, recv = trio.open_memory_channel[Any](1024)

        def on_conn(conn_request: Any) -> None:  # called by ucxx inside worker.progress()
            try:
                send.send_nowait(conn_request)
            except trio.WouldBlock:
                log.warning("UCX connection request dropped: too many pending")

        try:
            self._listener = self._L.UCXListener.create(worker=self.worker, port=cfg.port, cb_func=on_conn)
        except Exception as e:
            raise DataPlaneError(f"cannot start a UCX listener on port {cfg.port}: {e}") from None
        address = f"{cfg.host}:{self._listener.port}"
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.progress.run)
                self._started = True

                async def accept_loop() -> None:
                    async for conn_request in recv:
                        try:
                            ep = self._listener.create_endpoint_from_conn_request(conn_request, True)
                        except Exception as e:
                            log.warning("UCX accept failed: %s", e)
                            continue
                        chan = UcxChannel(self, ep, f"ucx-peer-{next(self._ids)}")
                        self._channels.add(chan)
                        nursery.start_soon(handler, chan)

                nursery.start_soon(accept_loop)
                task_status.started(address)
        finally:
            self._started = False
            for chan in list(self._channels):
                chan._close_ep()
            self._channels.clear()
            with trio.CancelScope(shield=True):
                for _ in range(10):  # let UCX finish the closes before the listener goes away
                    self.worker.progress()
                    await trio.sleep(0.001)
            self._listener = None

    async def connect(self, peer: str) -> Channel:
        if not self._started:
            raise DataPlaneError("the UCX backend is not running")
        host, port = split_peer(peer)
        try:
            ep = self._L.UCXEndpoint.create(self.worker, host, port, True)
        except Exception as e:
            raise DataPlaneError(f"cannot connect to {peer} over UCX: {e}") from None
        chan = UcxChannel(self, ep, peer)
        self._channels.add(chan)
        self.progress.kick()
        await trio.lowlevel.checkpoint()
        return chan

