"""SWIM membership with the Lifeguard extensions, as pure state machines (no I/O, no clock).

The public surface, used by ``transport/gossip_driver.py`` (Trio), ``transport/memory.py``
(virtual time) and the simulators:

- ``Swim``: the core (``gossip/swim.py``); ``SwimConfig`` and the ``default`` / ``memberlist``
  profiles (``gossip/profile.py``);
- ``NodeMeta``, ``MemberInfo``, ``MembershipEvent``: what the daemon sees;
- the wire messages and codec (``gossip/messages.py``);
- the Lifeguard pieces, one file each: ``Suspicion`` (``suspicion.py``), ``Awareness``
  (``awareness.py``), ``BroadcastQueue`` (``broadcast_queue.py``), push-pull digests
  (``pushpull.py``), the member table entry and probe order (``members.py``), whom to re-contact
  after a split or a restart: ``Reconnect`` (``reconnect.py``);
- the block directory: ``Directory``, ``DirectoryConfig``, ``DirectoryStats``
  (``directory.py``), its lookup table ``HolderTable`` (``directory_table.py``), ``fingerprint``
  (``directory_filter.py``) and its messages ``DirDelta``, ``DirSummaryReq``, ``DirSummary``.
"""

from gossip.awareness import Awareness
from gossip.broadcast_queue import BroadcastQueue
from gossip.directory import Directory, DirectoryConfig, DirectoryStats
from gossip.directory_filter import fingerprint
from gossip.directory_table import HolderTable
from gossip.events import EVENT_KINDS, MemberInfo, MembershipEvent
from gossip.messages import (
    MAX_INCARNATION,
    STREAM_HELLO,
    Ack,
    Alive,
    Dead,
    DirDelta,
    DirSummary,
    DirSummaryReq,
    Entry,
    Gossip,
    MessageError,
    Nack,
    NodeMeta,
    Packet,
    Ping,
    PingReq,
    PushPullFinal,
    PushPullReply,
    PushPullReq,
    StreamMsg,
    Suspect,
    Update,
    WireMeta,
    decode_packet,
    decode_stream,
    encode,
    node_meta,
    wire_meta,
)
from gossip.profile import SwimConfig, default_profile, memberlist_profile, profile
from gossip.reconnect import Reconnect
from gossip.suspicion import Suspicion, suspicion_timeouts
from gossip.swim import Swim, SwimCounters

__all__ = [
    "EVENT_KINDS",
    "MAX_INCARNATION",
    "STREAM_HELLO",
    "Ack",
    "Alive",
    "Awareness",
    "BroadcastQueue",
    "Dead",
    "DirDelta",
    "DirSummary",
    "DirSummaryReq",
    "Directory",
    "HolderTable",
    "DirectoryConfig",
    "DirectoryStats",
    "Entry",
    "Gossip",
    "MemberInfo",
    "MembershipEvent",
    "MessageError",
    "Nack",
    "NodeMeta",
    "Packet",
    "Ping",
    "PingReq",
    "PushPullFinal",
    "PushPullReply",
    "PushPullReq",
    "Reconnect",
    "StreamMsg",
    "Suspect",
    "Suspicion",
    "Swim",
    "SwimConfig",
    "SwimCounters",
    "Update",
    "WireMeta",
    "decode_packet",
    "decode_stream",
    "default_profile",
    "encode",
    "fingerprint",
    "memberlist_profile",
    "node_meta",
    "profile",
    "suspicion_timeouts",
    "wire_meta",
]
