"""Finding peers: seeds from mesh.toml, and zeroconf/mDNS on a LAN when enabled.

Theory of operation
-------------------
Seeds are explicit "host:port" strings (``[gossip] seeds``); the driver push-pulls with them at
start and retries while it knows nobody. With ``[gossip] mdns = true`` each node also announces
itself as ``<node_id>._memkv._udp.local.`` (TXT ``id``, ``v``: node id and protocol version) and
browses the same type; every peer found is handed to ``GossipService.add_seeds``, which joins
through it if it is not a member yet. Discovery only proposes addresses: the mesh key still
decides who gets in, so a spoofed mDNS answer costs one rejected push-pull.

mDNS is not authenticated: anyone on the link can announce services. What an announcement can
make us spend is bounded: at most ``MAX_RESOLVING`` resolver threads at once (a flood of
announcements is ignored beyond them), and the driver keeps at most ``EXTRA_SEEDS_MAX``
discovered addresses (``GossipService.add_seeds``).

zeroconf runs its own asyncio loop in its own thread; nothing of it touches the Trio loop except
``TrioToken.run_sync_soon`` callbacks carrying found addresses, and its blocking calls (start,
register, close) run in worker threads.

Public API: ``SERVICE_TYPE``, ``MAX_RESOLVING``, ``build_service_info``, ``parse_service_info``,
``run_mdns``.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from transport.gossip_driver import GossipService

log = logging.getLogger("gossip")

SERVICE_TYPE = "_memkv._udp.local."
_NAME_MAX = 63  # a DNS label
# Announcements resolved at once (a thread each, blocked up to 3 s on the answer). A LAN of
# peers starting together resolves in a few rounds; a flood of spoofed announcements costs at
# most this many threads.
MAX_RESOLVING = 8


def _instance_name(node_id: str, service_type: str) -> str:
    label = node_id.replace(".", "-")[:_NAME_MAX]
    if not label:
        raise ValueError("mDNS: node id must not be empty")
    return f"{label}.{service_type}"


def build_service_info(
    node_id: str, addr: str, service_type: str = SERVICE_TYPE, protocol_version: int = 1
) -> Any:
    """The zeroconf ``ServiceInfo`` announcing this node's gossip address."""
    from zeroconf import ServiceInfo

    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"mDNS: advertise an IP address, not {host!r}") from None
    return ServiceInfo(
        service_type,
        _instance_name(node_id, service_type),
        addresses=[ip.packed],
        port=int(port),
        properties={"id": node_id, "v": str(protocol_version)},
        server=f"{_instance_name(node_id, service_type).split('.')[0]}.local.",
    )


def parse_service_info(info: Any, self_id: str) -> str | None:
    """"host:port" of a discovered peer, or None for ourselves / an unusable record."""
    if info is None or not info.port:
        return None
    props = info.properties or {}
    node = props.get(b"id")
    if isinstance(node, bytes) and node.decode(errors="replace") == self_id:
        return None
    from zeroconf import IPVersion

    for raw in info.addresses_by_version(IPVersion.All):
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            continue
        return f"[{ip}]:{info.port}" if ip.version == 6 else f"{ip}:{info.port}"
    return None


class _Mdns:
    """The zeroconf side; every method runs in a zeroconf or worker thread."""

    def __init__(self, service: GossipService, token: trio.lowlevel.TrioToken) -> None:
        self.service = service
        self.token = token
        self.zc: Any = None
        self.browser: Any = None
        self.info: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._resolving = threading.BoundedSemaphore(MAX_RESOLVING)
        self.ignored = 0  # announcements dropped while MAX_RESOLVING were being resolved

    def start(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        cfg = self.service.config
        host = self.service.local_addr.rpartition(":")[0].strip("[]")
        self.info = build_service_info(self.service.node_id, self.service.local_addr,
                                       cfg.mdns_service, self.service.meta.protocol_version)
        ipv = IPVersion.V6Only if ":" in host else IPVersion.V4Only
        if host in ("0.0.0.0", "::"):
            self.zc = Zeroconf(ip_version=ipv)
        else:
            self.zc = Zeroconf(interfaces=[host], ip_version=ipv)
        self.zc.register_service(self.info, allow_name_change=True)
        self.browser = ServiceBrowser(self.zc, cfg.mdns_service, handlers=[self._on_change])

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change is not ServiceStateChange.Added:
            return
        if not self._resolving.acquire(blocking=False):
            self.ignored += 1
            return
        threading.Thread(
            target=self._resolve, args=(service_type, name), daemon=True, name="mdns-resolve"
        ).start()

    def _resolve(self, service_type: str, name: str) -> None:
        try:
            with self._lock:
                if self._closed:
                    return
                zc = self.zc
            info = zc.get_service_info(service_type, name, timeout=3000)
            addr = parse_service_info(info, self.service.node_id)
        except Exception as exc:  # a malformed record must not kill discovery
            log.debug("mdns: cannot resolve %s: %s", name, exc)
            return
        finally:
            self._resolving.release()
        if addr is None:
            return
        try:
            self.token.run_sync_soon(self.service.add_seeds, [addr])
        except trio.RunFinishedError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self.browser is not None:
            self.browser.cancel()
        if self.zc is not None:
            if self.info is not None:
                self.zc.unregister_service(self.info)
            self.zc.close()


async def run_mdns(
    service: GossipService, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Announce ``service`` and feed discovered peers to it, until cancelled."""
    mdns = _Mdns(service, trio.lowlevel.current_trio_token())
    try:
        await trio.to_thread.run_sync(mdns.start)
    except OSError as exc:
        raise OSError(f"gossip.mdns: cannot start mDNS: {exc}") from None
    log.info("mdns discovery started", extra={"fields": {"type": service.config.mdns_service}})
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mdns.close)
