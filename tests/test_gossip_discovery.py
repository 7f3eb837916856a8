"""Discovery: mDNS service records (pure), and two services finding each other on loopback."""

from __future__ import annotations

import base64

import pytest
import trio
from zeroconf import ServiceInfo

from gossip.messages import NodeMeta
from transport.discovery import SERVICE_TYPE, build_service_info, parse_service_info
from transport.gossip_config import GossipConfig
from transport.gossip_driver import GossipService

KEY = base64.b64encode(bytes(range(32))).decode()


def test_service_info_round_trip() -> None:
    info = build_service_info("gpu-7.rack2", "10.1.2.3:7946")
    assert info.type == SERVICE_TYPE
    assert info.name == "gpu-7-rack2._memkv._udp.local."
    assert info.port == 7946 and info.properties[b"id"] == b"gpu-7.rack2"
    assert parse_service_info(info, "someone-else") == "10.1.2.3:7946"
    assert parse_service_info(info, "gpu-7.rack2") is None  # ourselves
    v6 = build_service_info("n1", "[fd00::5]:7000")
    assert parse_service_info(v6, "x") == "[fd00::5]:7000"


def test_unusable_records_are_ignored_and_bad_input_named() -> None:
    assert parse_service_info(None, "x") is None
    no_addr = ServiceInfo(SERVICE_TYPE, f"n2.{SERVICE_TYPE}", port=7946, properties={"id": "n2"})
    assert parse_service_info(no_addr, "x") is None
    with pytest.raises(ValueError, match="advertise an IP address"):
        build_service_info("n1", "node.example:7946")


@pytest.mark.slow
async def test_two_services_find_each_other_by_mdns_on_loopback() -> None:
    cfg = GossipConfig(enabled=True, port=0, keys=[KEY], mdns=True, probe_interval=0.2,
                       probe_timeout=0.1)
    async with trio.open_nursery() as nursery:
        svcs = [GossipService(cfg, node_id=n, meta=NodeMeta()) for n in ("a", "b")]
        for s in svcs:
            try:
                await nursery.start(s.run)
            except OSError as exc:  # no multicast at all on this host
                pytest.skip(f"mDNS unavailable: {exc}")
        with trio.fail_after(20):
            while not all(  # noqa: ASYNC110 - observing two services, no event to wait on
                sorted(m.node_id for m in s.members() if m.state == "alive") == ["a", "b"]
                for s in svcs
            ):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
