"""
Building the public snapshots (:class:`ilm.PeerStatus`,
:class:`ilm.NodeStats`) from a node's live objects.  Reading never changes
anything; what the snapshots mean is documented in :mod:`ilm._status`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ilm._committer import GroupCommitter
from ilm._node import NodeCore, Peer
from ilm._peer import HELLO_SENT, READY
from ilm._peerid import PeerId
from ilm._status import (
    LINK_CONNECTING,
    LINK_DOWN,
    LINK_UP,
    HistogramCounter,
    NodeStats,
    PeerStatus,
)

__all__ = ["node_stats", "peer_status"]


def peer_status(
    core: NodeCore, committer: GroupCommitter, peer_id: PeerId, now: float
) -> PeerStatus:
    """
    One peer's :class:`PeerStatus` (a blank one for a peer with no state).
    Its ``last_link_error`` is why the network last failed to reach the
    peer, if the network says, else why the last link went.
    """
    link_error = core.link_error(peer_id)
    peer = core.peers.get(peer_id)
    if peer is None:
        return PeerStatus(
            peer_id=peer_id,
            link=LINK_DOWN,
            link_since=None,
            last_link_error=link_error,
            pending=0,
            pending_bytes=0,
            oldest_pending_age=None,
            in_flight=0,
            last_message_id=0,
            last_acknowledged=0,
            sent=0,
            acknowledged=0,
            retransmitted=0,
            delivered=0,
            last_delivered=0,
            delivery_held=False,
            delivery_held_reason=None,
            delivery_held_since=None,
            delivery_retries=0,
            peer_incarnation=None,
            incarnations=0,
        )
    out = peer.out
    sender = peer.sender
    pending = sender.pending
    unstored = sum(map(len, pending)) if pending else 0
    for holder, _first, contents, _deferreds in committer.in_commit:
        if holder is sender:
            unstored += sum(map(len, contents))
    inbound = peer.inbound
    stream = inbound[-1] if inbound else None
    link = peer.link
    deliverer = peer.deliverer
    acked = out.acked
    accept_times = sender.accept_times
    return PeerStatus(
        peer_id=peer_id,
        link=(
            LINK_UP
            if link == READY
            else LINK_CONNECTING
            if link == HELLO_SENT
            else LINK_DOWN
        ),
        link_since=peer.link_since,
        last_link_error=link_error if link_error is not None else peer.lost_reason,
        pending=out.stored - acked,
        pending_bytes=max(0, sender.outbox_bytes - unstored),
        oldest_pending_age=now - accept_times[0][1] if accept_times else None,
        in_flight=out.sent - acked if link == READY else 0,
        last_message_id=out.stored,
        last_acknowledged=acked,
        sent=sender.sent_total + len(pending),
        acknowledged=sender.acked_total,
        retransmitted=sender.retransmitted,
        delivered=deliverer.delivered,
        last_delivered=stream.delivered if stream is not None else 0,
        delivery_held=deliverer.held,
        delivery_held_reason=deliverer.hold.reason,
        delivery_held_since=deliverer.hold.since,
        delivery_retries=deliverer.hold.retry.failures,
        peer_incarnation=(
            peer.seen_incarnation
            if peer.seen_incarnation is not None
            else stream.incarnation
            if stream is not None
            else None
        ),
        incarnations=len(inbound),
        link_incarnation=peer.peer_incarnation,
        cached=out.cache_end - acked,
        cached_bytes=out.cached_bytes,
        queued=tuple([len(s.queue) for s in inbound]),
        queued_bytes=peer.held.bytes,
    )


def node_stats(
    core: NodeCore,
    committer: GroupCommitter,
    state: str,
    started_at: float | None,
    delivery_seconds: HistogramCounter,
) -> NodeStats:
    """
    The node's :class:`NodeStats`.
    """
    peers: Iterable[Peer] = core.peers.values()
    senders = [peer.sender for peer in peers]
    deliverers = [peer.deliverer for peer in peers]
    return NodeStats(
        started_at=started_at,
        state=state,
        sent=sum(s.sent_total + len(s.pending) for s in senders),
        stored=committer.stored,
        delivered=sum(d.delivered for d in deliverers),
        acknowledged=sum(s.acked_total for s in senders),
        retransmitted=sum(s.retransmitted for s in senders),
        refused=core.refused,
        delivery_failures=sum(d.hold.failures for d in deliverers),
        link_ups=core.link_ups,
        link_downs=core.link_downs,
        commits=committer.commits,
        commit_failures=committer.failures,
        commit_seconds=committer.seconds.snapshot(),
        commit_batch=committer.batch_sizes.snapshot(),
        delivery_seconds=delivery_seconds.snapshot(),
        store_in_doubt=committer.in_doubt,
    )
