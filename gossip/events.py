"""Membership events and member snapshots: what the core hands to the daemon.

``MembershipEvent`` is emitted by the core (``Swim.take_events()``) on every state change of a
member as seen by this node: ``join`` (first seen alive), ``update`` (alive with new incarnation,
address or metadata), ``suspect``, ``alive`` (a suspect refuted itself), ``dead``, ``leave``.
``source`` is the node that originated the change (the suspecter, the declarer, or the node
itself), so a simulator can tell locally originated suspicions from gossiped ones.

``MemberInfo`` is the immutable snapshot of one member (``Swim.members()``).

Public API: ``MembershipEvent``, ``MemberInfo``, ``EVENT_KINDS``.
"""

from __future__ import annotations

import msgspec

from gossip.messages import NodeMeta

EVENT_KINDS = ("join", "update", "suspect", "alive", "dead", "leave")


class MembershipEvent(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # one of EVENT_KINDS
    node_id: str
    addr: str
    incarnation: int
    meta: NodeMeta
    source: str  # node that originated the change
    at: float  # the core's `now` when the change was applied


class MemberInfo(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    addr: str
    state: str  # "alive" | "suspect" | "dead" | "left"
    incarnation: int
    meta: NodeMeta
