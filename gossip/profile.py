"""Timing profiles of the SWIM core: ``SwimConfig`` and the two named profiles.

Theory of operation
-------------------
``memberlist`` reproduces hashicorp/memberlist's LAN defaults on this core, as the baseline: probe
every 1 s with a 500 ms timeout, 3 indirect checks, suspicion 4 x log10(N) x probe interval
(max 6x that), gossip every 200 ms to 3 nodes, retransmit mult 4, push-pull every 30 s (scaled up
past 32 members).

``default`` is tuned for detection speed at the same (or lower) byte cost:

- probe twice as often (0.5 s, timeout 250 ms). Probes are cheap here (a ping is 37-39 bytes on
  the wire including the AEAD envelope, an ack 33-35) and idle gossip is nothing but probes and a
  digest-based push-pull, so doubling the probe rate stays far under the byte budget.
- the suspicion timeout is 4 x log10(N) x 0.5 s (3.6 s at N=64), with Lifeguard confirmations
  shrinking it from 6x that. Faster probing means confirmations arrive twice as fast too.
- retransmit mult 6 (memberlist: 4). Only updates pay for it, idle traffic does not; with 4 an
  epidemic misses a given node with probability ~exp(-0.9 x 12) at 10% loss, which over an hour
  of refutations at N=256 left a node or two holding a stale suspicion until it expired.
- direct refutation: a suspect update is also sent straight to the suspected node (piggybacked on
  the probes it gets, and on one Gossip packet), and the refuting node sends its new ``Alive``
  straight back to the suspecters it heard from. A slow node therefore refutes within one packet
  latency of waking up, which is what lets the shorter suspicion timeout stay free of false
  deaths when nodes stall for seconds. A refutation is also sent straight to up to 64 random
  members (``refute_fanout``): every member runs its own suspicion timer, refutations are rare,
  and an epidemic alone left one member of 64 still suspecting 2.4 s after a twice-stalled node
  woke up (a false death in one of five simulated hours at 10% loss).

Both profiles reconnect to failed members and unknown seeds (``reconnect_interval_s``,
``reconnect_timeout_s``, ``gossip/reconnect.py``): memberlist itself does not, Serf does it on top
of it, and without it the sides of a partition never merge again.

Public API: ``SwimConfig``, ``default_profile``, ``memberlist_profile``, ``profile``.
"""

from __future__ import annotations

import msgspec


class SwimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    probe_interval: float = 0.5
    probe_timeout: float = 0.25
    indirect_checks: int = 3
    suspicion_mult: float = 4.0
    suspicion_max_mult: float = 6.0
    suspicion_log_base: float = 10.0
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    retransmit_mult: int = 6
    pushpull_interval: float = 30.0  # 0 disables periodic push-pull
    awareness_max: int = 8
    udp_limit: int = 1400  # bytes of a datagram on the wire
    wire_overhead: int = 29  # AEAD envelope added by the transport (version + nonce + tag)
    # Keep left members this long, dead ones at least this long (and reconnect_timeout_s while
    # reconnecting): longer than the transport's 30 s replay window, so a replayed old Alive finds
    # the tombstone and is refused.
    tombstone_s: float = 120.0
    gossip_to_dead_s: float = 30.0  # keep gossiping to dead members so they can refute
    direct_refute: bool = True
    tcp_fallback: bool = True  # memberlist's TCP ping alongside the indirect probes
    refute_fanout: int = 64  # a refutation also goes straight to this many random members
    # Serf's reconnect (gossip/reconnect.py): every this many seconds a node re-contacts one failed
    # member (or unknown seed) with probability failed/alive. Serf uses 30 s; 10 s bridges a healed
    # split within ~10 s even when one side is a single node (each side makes about
    # min(|A|, |B|) attempts per interval), so the sides are one mesh within 30 s, and a healthy
    # mesh pays about one failed TCP connect per dead member per 10 s, mesh-wide. 0 disables.
    reconnect_interval_s: float = 10.0
    # Failed (dead, not left) members are kept and re-contacted this long: Serf's 24 h, so a split
    # of a working day heals by itself (longer ones heal through the seeds). Costs ~10 bytes per
    # dead member in each push-pull digest.
    reconnect_timeout_s: float = 86400.0
    # While a node knows no other member it re-contacts seeds, rejoin targets and one failed member
    # this often: cheap (one node, a few connects) and it is what a lone node needs most.
    join_retry_s: float = 2.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("probe_interval", self.probe_interval > 0),
            ("probe_timeout", 0 < self.probe_timeout < self.probe_interval),
            ("indirect_checks", self.indirect_checks >= 0),
            ("suspicion_mult", self.suspicion_mult > 0),
            ("suspicion_max_mult", self.suspicion_max_mult >= 1),
            ("suspicion_log_base", self.suspicion_log_base > 1),
            ("gossip_interval", self.gossip_interval > 0),
            ("gossip_nodes", self.gossip_nodes >= 1),
            ("retransmit_mult", self.retransmit_mult >= 1),
            ("pushpull_interval", self.pushpull_interval >= 0),
            ("awareness_max", self.awareness_max >= 1),
            ("udp_limit", 200 <= self.udp_limit <= 65000),
            ("wire_overhead", 0 <= self.wire_overhead < 100),
            ("tombstone_s", self.tombstone_s > 0),
            ("gossip_to_dead_s", self.gossip_to_dead_s >= 0),
            ("refute_fanout", self.refute_fanout >= 0),
            ("reconnect_interval_s", self.reconnect_interval_s >= 0),
            ("reconnect_timeout_s", self.reconnect_timeout_s >= 0),
            ("join_retry_s", self.join_retry_s > 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SwimConfig.{name}: invalid value {getattr(self, name)!r}")


def default_profile() -> SwimConfig:
    return SwimConfig()


def memberlist_profile() -> SwimConfig:
    return SwimConfig(
        probe_interval=1.0,
        probe_timeout=0.5,
        indirect_checks=3,
        suspicion_mult=4.0,
        suspicion_max_mult=6.0,
        gossip_interval=0.2,
        gossip_nodes=3,
        retransmit_mult=4,
        pushpull_interval=30.0,
        direct_refute=False,
        refute_fanout=0,
    )


PROFILES = {"default": default_profile, "memberlist": memberlist_profile}


def profile(name: str) -> SwimConfig:
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(
            f"unknown gossip profile {name!r} (expected one of {sorted(PROFILES)})"
        ) from None
