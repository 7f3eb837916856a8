"""The pure-Trio TCP data plane: the fallback transport, and the fastest one on TCP-only hosts.

Theory of operation
-------------------
* One TCP connection is one ``TcpChannel``. Control frames (4-byte length + msgpack) are read
  through a small buffer; block bytes are read with ``recv_into`` straight into the caller's
  view (an arena slice), after first taking whatever bytes the frame reader already buffered.
  Nothing is copied on the receive path except that leftover (at most one 256 KiB read).
* Sends go out with ``send`` on a memoryview of the arena slice, looping on short writes; the
  kernel copies from the mapping, we never do.
* Runs of at least ``THREAD_BULK_BYTES`` are moved by a worker thread looping ``readv``/``write``
  on the non-blocking fd (``poll`` when it would block, checking every 50 ms whether the Trio task
  was cancelled), and big received blocks are hashed in that same thread while they are hot in its
  cache: one thread hop per block instead of one Trio wake-up per socket read. The calling task
  waits for the thread, so the arena slice is never released while a thread still writes into it.
* Socket buffers are left to the kernel's autotuning (an explicit SO_RCVBUF would switch it off).
* Every receive has the caller's timeout; EOF is ``PeerClosed`` and any socket error is
  ``DataPlaneError`` naming the peer, so the protocol layer sees one kind of failure.
* Before the session starts (handshake not done) a channel reads at most ``PREAUTH_BUFFER_BYTES``
  (64 KiB) ahead and accepts frames of at most ``PREAUTH_FRAME_BYTES``; after it, frames are
  sealed and opened with the ``Session`` (``seal_frame`` / ``open_frame``) and may be up to
  ``max_frame_bytes``. A frame once begun must be complete within ``io_timeout_s``.
* ``open_channel`` is the small public client API (the fuzz benchmark's): connect, optionally
  run the client handshake, then ``send_msg`` / ``send_body`` (a raw body through the session's
  framing) / ``send_raw`` (bytes as they are) / ``recv_msg``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import xxhash

from transport.dataplane import (
    LEN,
    PREAUTH_BUFFER_BYTES,
    PREAUTH_FRAME_BYTES,
    Channel,
    DataPlaneError,
    IdleTimeout,
    Msg,
    PeerClosed,
    Session,
    client_handshake,
    frame_body,
    open_frame,
    seal_frame,
    split_peer,
)
from transport.dataplane_config import DataPlaneConfig

__all__ = ["TcpBackend", "TcpChannel", "open_channel"]

_READ = 256 * 1024
# Bulk runs at least this long are moved by a worker thread (one thread hop, ~40 us, instead of a
# Trio wake-up per socket read); below it the hop costs more than the loop saves.
THREAD_BULK_BYTES = 512 * 1024
# Buffers per sendmsg / recvmsg_into call (Linux's IOV_MAX is 1024).
_IOV_MAX = 512
# How often a bulk thread (blocked in readv/write) checks whether its Trio task was cancelled.
_POLL_MS = 50
_SOCK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _tune(sock: trio.socket.SocketType) -> None:
    # Only blocking calls (the bulk threads) see these: they return EAGAIN after 50 ms of no
    # progress so the thread can check for cancellation. Trio's non-blocking calls are unaffected.
    tv = struct.pack("ll", 0, _POLL_MS * 1000)
    for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, tv)
        except OSError:
            pass
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    # trio.SocketStream caps unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT), good for latency of
    # small messages but it wakes the bulk sender every 16 KiB: measured on loopback at 2 MiB,
    # 4.6-4.8 GB/s with the cap vs 5.4-5.5 without. The data plane moves bulk; lift the cap.
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, struct.pack("I", 0xFFFFFFFF))
        except OSError:
            pass


def _stalled(deadline: float, peer: str, what: str) -> None:
    """A blocking call timed out (SO_RCVTIMEO/SO_SNDTIMEO): honour cancellation and the stall limit."""
    trio.from_thread.check_cancelled()
    if time.monotonic() > deadline:
        raise DataPlaneError(f"peer {peer}: {what} stalled")


class _Blocking:
    """The fd in blocking mode for the duration of a bulk thread: the kernel wakes the thread when
    bytes (or buffer space) arrive, with no poll() call per would-block. (Measured against a
    non-blocking readv + poll loop: no difference beyond noise; this is the simpler one.) The
    socket's SO_RCVTIMEO/SO_SNDTIMEO (set once per channel) make a blocked call return every
    50 ms so the thread can notice cancellation. Trio never touches the socket meanwhile: the
    channel's only task is waiting for this thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        os.set_blocking(self.fd, True)

    def __exit__(self, *exc: object) -> None:
        os.set_blocking(self.fd, False)


def _recv_runs_thread(
    fd: int,
    jobs: list[tuple[memoryview | None, int, int]],
    limit: float,
    peer: str,
    landed: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Fill each (view or None = discard, bytes already there, length) from the socket; digests.

    ``landed(i, digest)`` is called from this thread after each job (it must only hand off)."""
    scratch = memoryview(bytearray(_READ)) if any(v is None for v, _, _ in jobs) else None
    digests = []
    with _Blocking(fd):
        for view, pos, n in jobs:
            deadline = time.monotonic() + limit
            # Hash each chunk right after it lands, while it is still in cache (measured: hashing
            # the whole block afterwards cost 12-15% of the throughput at 2 MiB).
            h = xxhash.xxh3_64()
            if view is not None and pos:
                h.update(view[:pos])
            while pos < n:
                target = view[pos:] if view is not None else scratch[: n - pos]  # type: ignore[index]
                try:
                    got = os.readv(fd, [target])
                except (BlockingIOError, InterruptedError):
                    _stalled(deadline, peer, "receive")
                    continue
                except OSError as e:
                    raise PeerClosed(f"peer {peer}: receive failed after {pos} of {n} bytes: {e}") from None
                if got == 0:
                    raise PeerClosed(f"peer {peer} closed the connection after {pos} of {n} bytes")
                if view is not None:
                    h.update(view[pos : pos + got])
                pos += got
                deadline = time.monotonic() + limit
            digests.append(h.intdigest() if view is not None else 0)
            if landed is not None:
                landed(len(digests) - 1, digests[-1])
    return digests


def _send_runs_thread(fd: int, views: list[memoryview], limit: float, peer: str) -> None:
    with _Blocking(fd):
        for view in views:
            deadline = time.monotonic() + limit
            while view:
                try:
                    sent = os.write(fd, view)
                except (BlockingIOError, InterruptedError):
                    _stalled(deadline, peer, "send")
                    continue
                except OSError as e:
                    raise PeerClosed(f"peer {peer}: send failed: {e}") from None
                view = view[sent:]
                deadline = time.monotonic() + limit


class TcpChannel:
    def __init__(self, stream: trio.SocketStream, peer: str, *, max_frame: int, io_timeout: float) -> None:
        self.peer = peer
        self._stream = stream
        self._sock = stream.socket
        self._buf = bytearray()
        self._max_frame = max_frame
        self._max = PREAUTH_FRAME_BYTES  # until the session starts
        self._io_timeout = io_timeout
        self.session: Session | None = None
        self.peer_node = ""  # the server's node id, for a channel made by open_channel
        _tune(self._sock)

    def start_session(self, session: Session) -> None:
        self.session = session
        self._max = self._max_frame

    async def send_msg(self, msg: Msg) -> None:
        await self._send_all(memoryview(seal_frame(self.session, msg)))

    async def send_body(self, body: bytes | bytearray | memoryview) -> None:
        """Send ``body`` as one frame: length-prefixed, sealed by the session when there is one.
        It need not be a valid message (the fuzz benchmark's entry point)."""
        await self._send_all(memoryview(frame_body(self.session, body)))

    async def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes exactly as given: no length prefix, no sealing."""
        await self._send_all(memoryview(data))

    async def send_blocks(self, views: list[memoryview]) -> None:
        if sum(map(len, views)) >= THREAD_BULK_BYTES:
            # Big batches: one worker thread writes them all (one hop, no Trio wake-up per write).
            fd, limit = self._sock.fileno(), self._io_timeout
            await trio.to_thread.run_sync(_send_runs_thread, fd, views, limit, self.peer)
        else:
            await self._send_many(views)

    async def _send_many(self, views: list[memoryview]) -> None:
        """Small batches on the loop: one sendmsg per call for all the views left (a batch of
        16 KiB blocks was one send per block, each a trip through Trio's socket machinery)."""
        sock = self._sock
        todo = [v for v in views if len(v)]
        try:
            with trio.fail_after(self._io_timeout):
                while todo:
                    sent = await sock.sendmsg(todo[:_IOV_MAX])
                    while sent and sent >= len(todo[0]):
                        sent -= len(todo[0])
                        todo.pop(0)
                    if sent:
                        todo[0] = todo[0][sent:]
        except trio.TooSlowError:
            raise DataPlaneError(f"peer {self.peer}: send stalled for {self._io_timeout} s") from None
        except _SOCK_ERRORS as e:
            raise PeerClosed(f"peer {self.peer}: send failed: {e}") from None

    async def _send_all(self, view: memoryview) -> None:
        sock = self._sock
        try:
            with trio.fail_after(self._io_timeout):
                while view:
                    sent = await sock.send(view)
                    view = view[sent:]
        except trio.TooSlowError:
            raise DataPlaneError(f"peer {self.peer}: send stalled for {self._io_timeout} s") from None
        except _SOCK_ERRORS as e:
            raise PeerClosed(f"peer {self.peer}: send failed: {e}") from None

    async def _fill(self) -> None:
        # Before the session: never hold more than PREAUTH_BUFFER_BYTES (the frame limit keeps
        # what is buffered under it, so there is always room to read). After it: _READ at a time.
        want = _READ if self.session is not None else max(1, PREAUTH_BUFFER_BYTES - len(self._buf))
        try:
            data = await self._sock.recv(want)
        except _SOCK_ERRORS as e:
            raise PeerClosed(f"peer {self.peer}: receive failed: {e}") from None
        if not data:
            raise PeerClosed(f"peer {self.peer} closed the connection")
        self._buf += data

    async def recv_msg(self, limit_s: float | None) -> Msg:
        buf = self._buf
        started = bool(buf)
        with trio.CancelScope(deadline=trio.current_time() + limit_s if limit_s else float("inf")) as cs:
            if started:
                cs.deadline = min(cs.deadline, trio.current_time() + self._io_timeout)
            while True:
                if len(buf) >= 4:
                    (n,) = LEN.unpack_from(buf, 0)
                    if n > self._max:
                        what = " before authenticating" if self.session is None else ""
                        raise DataPlaneError(
                            f"peer {self.peer} sent a {n}-byte frame{what}; the limit is {self._max}"
                        )
                    if len(buf) >= 4 + n:
                        body = bytes(buf[4 : 4 + n])
                        del buf[: 4 + n]
                        return open_frame(self.session, body)
                await self._fill()
                if not started:  # the frame has begun: the rest within io_timeout_s
                    started = True
                    cs.deadline = min(cs.deadline, trio.current_time() + self._io_timeout)
        assert cs.cancelled_caught
        if not started:
            raise IdleTimeout(f"peer {self.peer}: no frame within {limit_s} s")
        raise DataPlaneError(f"peer {self.peer}: a frame stalled (incomplete after {self._io_timeout} s)")

    async def recv_blocks(
        self, targets: list[memoryview | int], on_block: Callable[[int, int], None] | None = None
    ) -> list[int]:
        buf = self._buf
        jobs: list[tuple[memoryview | None, int, int]] = []
        remaining = 0
        for t in targets:
            view, n = (None, t) if isinstance(t, int) else (t, len(t))
            take = min(len(buf), n)  # bytes the frame reader already pulled in
            if take:
                if view is not None:
                    view[:take] = buf[:take]
                del buf[:take]
            jobs.append((view, take, n))
            remaining += n - take
        if remaining >= THREAD_BULK_BYTES:
            # Big runs: a worker thread loops readv straight into the arena and hashes each block
            # while it is hot; the GIL is free during the syscalls and the loop stays free.
            # Each landed block is handed to the Trio thread with run_sync_soon (never waits); the
            # thread's own result is delivered the same way, after them, so all have run by then.
            fd, limit = self._sock.fileno(), self._io_timeout
            landed = None
            if on_block is not None:
                token, cb = trio.lowlevel.current_trio_token(), on_block

                def landed(i: int, digest: int) -> None:
                    token.run_sync_soon(cb, i, digest)

            return await trio.to_thread.run_sync(_recv_runs_thread, fd, jobs, limit, self.peer, landed)
        # Small runs (under THREAD_BULK_BYTES in all): on the loop, under one deadline, each
        # recvmsg_into filling as many of the runs as the socket has bytes for.
        views = [v if v is not None else memoryview(bytearray(n)) for v, _, n in jobs]
        digests: list[int] = []
        try:
            with trio.fail_after(self._io_timeout):
                i = 0  # the first run not yet full; pos: its bytes so far (plus any overrun)
                pos = jobs[0][1] if jobs else 0
                while True:
                    while i < len(jobs) and pos >= len(views[i]):
                        pos -= len(views[i])  # what a recv put into the runs after this one
                        view = jobs[i][0]
                        digests.append(xxhash.xxh3_64_intdigest(view) if view is not None else 0)
                        if on_block is not None:
                            on_block(i, digests[-1])
                        i += 1
                        if i < len(jobs):
                            pos += jobs[i][1]  # bytes the frame reader already had (then pos was 0)
                    if i == len(jobs):
                        break
                    end = min(len(jobs), i + _IOV_MAX)
                    bufs = [views[i][pos:], *(views[j][jobs[j][1] :] for j in range(i + 1, end))]
                    pos += await self._recv_many(bufs, i, pos)
        except trio.TooSlowError:
            raise DataPlaneError(f"peer {self.peer}: bytes stalled for {self._io_timeout} s") from None
        return digests

    async def _recv_many(self, bufs: list[memoryview], i: int, pos: int) -> int:
        """One recvmsg_into over ``bufs`` (the rest of run ``i``, then the runs after it)."""
        try:
            got, _, _, _ = await self._sock.recvmsg_into(bufs)
        except _SOCK_ERRORS as e:
            raise PeerClosed(f"peer {self.peer}: receive failed in run {i} after {pos} bytes: {e}") from None
        if got == 0:
            raise PeerClosed(f"peer {self.peer} closed the connection in run {i} after {pos} bytes")
        return int(got)

    async def aclose(self) -> None:
        await self._stream.aclose()


class TcpBackend:
    name = "tcp"

    def __init__(self, config: DataPlaneConfig) -> None:
        self.config = config
        self.ucx_transports: list[str] = []

    def _channel(self, stream: trio.SocketStream, peer: str) -> TcpChannel:
        return TcpChannel(
            stream, peer, max_frame=self.config.max_frame_bytes, io_timeout=self.config.io_timeout_s
        )

    async def serve(
        self, handler: Callable[[Channel], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        try:
            listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        except OSError as e:
            raise DataPlaneError(
                f"cannot listen on {cfg.host}:{cfg.port} for the data plane: {e.strerror or e} "
                "(set [dataplane] host/port, or port 0 for a free one)"
            ) from None
        host, port = listeners[0].socket.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        async def serve_one(stream: trio.SocketStream) -> None:
            try:
                name = stream.socket.getpeername()
                peer = f"{name[0]}:{name[1]}"
            except OSError:
                peer = "?"
            await handler(self._channel(stream, peer))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_one, listeners)
            task_status.started(address)

    async def connect(self, peer: str) -> Channel:
        host, port = split_peer(peer)
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise DataPlaneError(f"cannot connect to {peer}: {e.strerror or e}") from None
        return self._channel(stream, peer)


async def open_channel(
    address: str, keys: list[bytes], node_id: str, *, authenticate: bool = True, timeout_s: float = 5.0,
    max_frame: int = 4 << 20, encrypt_bulk: bool = False,
) -> TcpChannel:  # fmt: skip
    """A client connection to the data plane at ``address`` ("host:port").

    ``keys``: the keyring as the data plane uses it (``dataplane_config.decode_keys`` of the
    base64 keys; the first one is used). With ``authenticate`` (the default) the client
    handshake runs as ``node_id`` and the channel comes back with its session: ``send_msg`` and
    ``send_body`` then seal each frame with the next counter nonce, exactly as a peer would, and
    ``peer_node`` is the server's node id. Without it, the channel is raw (nothing sealed).
    ``DataPlaneError`` (``AuthError`` for a refused handshake) when it cannot; the caller closes
    the channel with ``aclose``."""
    host, port = split_peer(address)
    with trio.fail_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise DataPlaneError(f"cannot connect to {address}: {e.strerror or e}") from None
        chan = TcpChannel(stream, address, max_frame=max_frame, io_timeout=timeout_s)
        if authenticate:
            try:
                chan.peer_node = await client_handshake(chan, keys, node_id, timeout_s, encrypt_bulk=encrypt_bulk)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await chan.aclose()
                raise
    return chan
