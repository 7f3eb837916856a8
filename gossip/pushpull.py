"""Digest-based push-pull state sync (anti-entropy and join).

Theory of operation
-------------------
Piggybacked gossip is probabilistic: an update can run out of retransmissions before reaching a
member (loss, partitions, a node that was down). Periodically each node therefore syncs its whole
table with one random peer over TCP. Sending full entries both ways, as memberlist does, costs
~45 bytes per member each way; here the initiator sends a *digest* of (node, incarnation, state),
and only the differences travel in full:

1. A -> B ``PushPullReq(digest_A)``
2. B -> A ``PushPullReply(entries A lacks or has older, want = ids where A is newer)``
3. A -> B ``PushPullFinal(entries B wanted)``

"Newer" is the gossip precedence: higher incarnation wins; at equal incarnation
left > dead > suspect > alive. Dead and left members the other side does not know are neither
asked for nor sent (they only matter to nodes that knew them; a receiver ignores them anyway), so
the failed members a node keeps for reconnecting (``gossip/reconnect.py``, up to 24 h) cost only
their digest entries.

A digest that holds the receiver itself as suspect/dead/left, and a reply that does the same to
the initiator, make that node refute before it answers (``gossip/swim.py``): after a split, one
exchange carries both refutations across. The interval grows with the mesh like memberlist's
``pushPullScale``: x(ceil(log2(N) - log2(32)) + 1) above 32 members.

Public API: ``digest``, ``diff``, ``pushpull_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from gossip.members import Member
from gossip.messages import STATE_DEAD, STATE_LEFT, Entry

_SCALE_THRESHOLD = 32


def pushpull_scale(interval: float, n: int) -> float:
    if n <= _SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(_SCALE_THRESHOLD)) + 1
    return interval * mult


def entry(m: Member) -> Entry:
    return Entry(m.node, m.inc, m.state, m.addr, m.meta)


def digest(members: Iterable[Member]) -> tuple[tuple[str, int, int], ...]:
    return tuple((m.node, m.inc, m.state) for m in members)


def diff(
    members: dict[str, Member], remote: Iterable[tuple[str, int, int]]
) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """(entries the remote lacks or has stale, node ids where the remote is newer)."""
    send: list[Entry] = []
    want: list[str] = []
    seen: set[str] = set()
    for node, inc, state in remote:
        seen.add(node)
        mine = members.get(node)
        if mine is None:
            if state != STATE_DEAD and state != STATE_LEFT:
                want.append(node)
            continue
        theirs_key = (inc, state)
        mine_key = (mine.inc, mine.state)
        if theirs_key > mine_key:
            want.append(node)
        elif mine_key > theirs_key:
            send.append(entry(mine))
    for node, m in members.items():
        if node not in seen and m.state != STATE_DEAD and m.state != STATE_LEFT:
            send.append(entry(m))
    return tuple(send), tuple(want)
