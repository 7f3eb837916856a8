"""``[gossip]`` table of mesh.toml: how this node joins the membership mesh.

Every field has a default, and the comment on each says why it is what it is. Values are
validated when the struct is built (``msgspec`` decoding included): a bad value raises
``ValueError`` naming the field, e.g. ``gossip.port: must be in 0..65535, got 70000``.

Timing knobs left at ``None`` take the value of the chosen ``profile`` (``gossip/profile.py``);
set one to override just that knob.

Security: with ``enabled = true`` the node refuses to start without ``keys`` unless
``insecure_no_key = true`` is set explicitly (then packets are neither encrypted nor
authenticated; for a laptop only). Keyed and unkeyed nodes never talk to each other.

Public API: ``GossipConfig`` (``swim_config()``, ``key_bytes()``, ``seed_addrs()``),
``parse_hostport``.
"""

from __future__ import annotations

import ipaddress

import msgspec

from gossip.profile import PROFILES, SwimConfig, profile
from transport.gossip_crypto import parse_keys


def parse_hostport(value: str, field: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:7946"), naming the field in the error."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{field}: expected 'host:port', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"{field}: port must be in 1..65535, got {p} in {value!r}")
    return host, p


class GossipConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Off by default: the documented single-node mesh.toml must run with nothing else around.
    enabled: bool = False
    # Loopback by default, so turning gossip on never exposes a port by accident.
    bind: str = "127.0.0.1"
    # memberlist's port (7946) so firewalls written for Serf/Consul-style meshes fit; 0 picks a
    # free port (tests). UDP and TCP use the same number.
    port: int = 7946
    # The "host:port" or "host" peers should use to reach us; "" = the bound address. Required
    # when binding 0.0.0.0 / :: (the wildcard is not an address a peer can use).
    advertise: str = ""
    # Where to join: "host:port" of any existing members. Empty = start a new mesh (or rely on
    # mDNS). Any one live seed is enough; the rest of the mesh is learned from it.
    seeds: list[str] = []
    # Base64 AES keys (16/24/32 bytes). The first encrypts, all decrypt: rotate by adding the new
    # key second everywhere, then first everywhere, then removing the old one.
    keys: list[str] = []
    # Explicit opt-out of encryption: an unauthenticated gossip port lets anyone on the network
    # declare members dead, so it must be asked for by name.
    insecure_no_key: bool = False
    # mDNS discovery of peers on the local link (_memkv._udp.local.). Off by default: multicast
    # is often filtered in data centres, and seeds are explicit.
    mdns: bool = False
    # The service type announced and browsed with mDNS.
    mdns_service: str = "_memkv._udp.local."
    # "default" (faster detection, see gossip/profile.py) or "memberlist" (its LAN timings).
    profile: str = "default"
    # Timing overrides (None = the profile's value).
    probe_interval: float | None = None
    probe_timeout: float | None = None
    indirect_checks: int | None = None
    suspicion_mult: float | None = None
    suspicion_max_mult: float | None = None
    gossip_interval: float | None = None
    gossip_nodes: int | None = None
    retransmit_mult: int | None = None
    pushpull_interval: float | None = None
    # Accept messages sealed at most this far from our clock; longer than any sane NTP skew,
    # shorter than the core's 120 s tombstones so a replay can never outlive the tombstone.
    replay_window_s: float = 30.0
    # Re-contact the seeds, the members snapshot of a restart and one failed member this often
    # while we know no other member (seeds started later, a node cut off alone): one node, a few
    # connects every 2 s, and a lone node gets back within 2 s of its network healing.
    join_retry_s: float = 2.0
    # Every this many seconds a node re-contacts one failed (dead, not left) member or a seed
    # that is not a live member, with probability failed/alive (Serf's reconnect). Serf uses
    # 30 s; 10 s bridges a healed split of any shape within about 10 s, even one side being a
    # single node (each side makes about min(|A|, |B|) attempts per interval), so the sides are
    # one mesh again within 30 s. In a healthy mesh each dead member costs about one failed TCP
    # connect per 10 s, mesh-wide, whatever the mesh size. 0 turns reconnecting off (a healed
    # split then stays split).
    reconnect_interval_s: float = 10.0
    # Failed members are kept and re-contacted this long: Serf's 24 h, so a split that lasts a
    # working day heals by itself (longer ones heal through the seeds). A dead member costs ~10
    # bytes in each push-pull digest meanwhile.
    reconnect_timeout_s: float = 86400.0
    # A push-pull or TCP fallback ping that takes longer than this is abandoned; an incoming
    # stream is closed this long after it was accepted, whatever it sent, so a slowloris peer
    # (a partial frame, an idle connection) holds a slot at most this long. A push-pull of a
    # 1000-member mesh takes ~5 ms on a LAN; 5 s leaves room for a 100k-member one (~10 MB).
    stream_timeout_s: float = 5.0
    # Incoming gossip streams open at once. In a healthy mesh a node serves about one push-pull
    # per pushpull_interval (30 s) plus a few TCP fallback pings per probe period: a handful.
    # 64 leaves room for a whole mesh joining through one seed at once, while a flood of
    # connections costs at most 64 x 64 KiB of buffers. A new connection past the cap evicts
    # the oldest one that has not authenticated yet (streams_evicted), else it is closed at once
    # (streams_refused) and the peer retries at its next push-pull.
    max_stream_conns: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.bind, str) or not self.bind:
            raise ValueError("gossip.bind: must be a non-empty address")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"gossip.port: must be in 0..65535, got {self.port}")
        wildcard = self.bind in ("0.0.0.0", "::")
        if wildcard and not self.advertise:
            raise ValueError(
                f"gossip.advertise: required when gossip.bind is the wildcard {self.bind!r}"
            )
        if self.advertise and ":" in self.advertise and not self.advertise.startswith("["):
            parse_hostport(self.advertise, "gossip.advertise")
        for i, s in enumerate(self.seeds):
            parse_hostport(s, f"gossip.seeds[{i}]")
        parse_keys(self.keys)
        if self.enabled and not self.keys and not self.insecure_no_key:
            raise ValueError(
                "gossip.keys: gossip is enabled but no mesh key is set; add a base64 AES key "
                "(python -c \"import os,base64;print(base64.b64encode(os.urandom(32)).decode())\")"
                " or set gossip.insecure_no_key = true"
            )
        if self.profile not in PROFILES:
            raise ValueError(
                f"gossip.profile: must be one of {sorted(PROFILES)}, got {self.profile!r}"
            )
        if not self.mdns_service.endswith("._udp.local.") and not self.mdns_service.endswith(
            "._tcp.local."
        ):
            raise ValueError(
                f"gossip.mdns_service: must look like '_name._udp.local.', got {self.mdns_service!r}"
            )
        for name in ("replay_window_s", "join_retry_s", "stream_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"gossip.{name}: must be > 0 and finite, got {getattr(self, name)!r}")
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "pushpull_interval"):
            v = getattr(self, name)
            if v is not None and not 0 < v < float("inf"):
                raise ValueError(f"gossip.{name}: must be > 0 and finite, got {v!r}")
        if not 1 <= self.max_stream_conns <= 65536:
            raise ValueError(
                f"gossip.max_stream_conns: must be in 1..65536, got {self.max_stream_conns!r}"
            )
        for name in ("reconnect_interval_s", "reconnect_timeout_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"gossip.{name}: must be >= 0 and finite, got {getattr(self, name)!r}")
        try:
            self.swim_config()
        except ValueError as exc:
            raise ValueError(f"gossip timing: {exc}".replace("SwimConfig.", "gossip.")) from None

    def swim_config(self) -> SwimConfig:
        base = profile(self.profile)
        over = {
            name: getattr(self, name)
            for name in (
                "probe_interval",
                "probe_timeout",
                "indirect_checks",
                "suspicion_mult",
                "suspicion_max_mult",
                "gossip_interval",
                "gossip_nodes",
                "retransmit_mult",
                "pushpull_interval",
            )
            if getattr(self, name) is not None
        }
        over["join_retry_s"] = self.join_retry_s
        over["reconnect_interval_s"] = self.reconnect_interval_s
        over["reconnect_timeout_s"] = self.reconnect_timeout_s
        if not self.keys:
            over["wire_overhead"] = 1
        return msgspec.structs.replace(base, **over)

    def key_bytes(self) -> list[bytes]:
        return parse_keys(self.keys)

    def seed_addrs(self) -> list[tuple[str, int]]:
        return [parse_hostport(s, f"gossip.seeds[{i}]") for i, s in enumerate(self.seeds)]

    def advertise_host(self) -> str:
        if not self.advertise:
            return self.bind
        if self.advertise.startswith("["):
            return self.advertise.split("]")[0][1:]
        host, sep, port = self.advertise.rpartition(":")
        if sep and port.isdigit():
            try:
                ipaddress.ip_address(self.advertise)
                return self.advertise  # a bare IPv6 address
            except ValueError:
                return host
        return self.advertise

    def advertise_port(self, bound_port: int) -> int:
        if self.advertise and not self.advertise.startswith("["):
            host, sep, port = self.advertise.rpartition(":")
            if sep and port.isdigit() and host:
                return int(port)
        return bound_port
