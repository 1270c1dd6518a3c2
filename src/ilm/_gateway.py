"""
Peers built from stored records, and the node's side of stream ownership.

:func:`load_peers` builds the peers of stored records: at the start (every
record the store opened with), and when a gateway takes a stream (the
records its grant read).

:func:`ownership_guard` gives the node's :class:`ilm._ownership_guard.
OwnershipGuard` when its store is shared by several gateways (a backend
providing :class:`ilm.backends.IStreamOwnership`), with the callbacks the
guard calls back through (:class:`_GuardedPeers`): a peer restarted from a
grant, a stream dropped, a peer's deliveries woken, a peer's outbound
record as the shared store holds it (other gateways' appends, the
owner's acknowledgements).  Any other store gets
no guard, and the node behaves as with a single process.  The guard's
call sites are where their code lives: link events and frames in
:mod:`ilm._link`, a failed commit in :mod:`ilm._outcomes`, renewals
started and stopped in :mod:`ilm._lifecycle`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from ilm._link import PeerRouter
from ilm._node import NodeCore
from ilm._outcomes import stored_up_to
from ilm._ownership_guard import OwnershipGuard
from ilm._peer import CLOSING, READY
from ilm._peerid import PeerId
from ilm._store import InboundRecord, OutboundRecord
from ilm.backends._ownership import StreamTaken

__all__ = ["load_peers", "ownership_guard"]


def load_peers(
    core: NodeCore,
    router: PeerRouter,
    outbound: Iterable[OutboundRecord],
    inbound: Iterable[InboundRecord],
) -> None:
    """
    Build the peers of these stored records (at the start, or when a
    gateway takes a stream).
    """
    outbound, inbound = tuple(outbound), tuple(inbound)
    now = core.clock.seconds()
    for record in outbound:
        peer = router.add_peer(record.peer_id, record.acked, record.last_position)
        peer.sender.outbox_bytes = record.pending_bytes
        if record.last_position > record.acked:
            peer.sender.accept_times.append((record.last_position, now))
    for mark in inbound:
        peer = core.peers.get(mark.peer_id) or router.new_peer(mark.peer_id)
        if mark.retired:
            peer.retired[mark.incarnation] = None
        else:
            peer.add_stream(mark.incarnation, mark.delivered)
    # In the records' order (a dict, not a set: runs replay exactly).
    loaded = dict.fromkeys(
        [*(r.peer_id for r in outbound), *(r.peer_id for r in inbound)]
    )
    for peer_id in loaded:
        peer = core.peers[peer_id]
        # A store written with a larger limit (or by an older ILM).
        forgotten = peer.forget_retired()
        if forgotten:
            router.forgotten(peer, forgotten)


def ownership_guard(core: NodeCore, router: PeerRouter) -> OwnershipGuard | None:
    """
    :return: the node's guard if its store provides ``IStreamOwnership``,
        else ``None`` (nothing changes).
    """
    peers = _GuardedPeers(core, router)
    network = core.network
    return OwnershipGuard.for_backend(
        core.backend,
        clock=core.clock,
        proceed=router.link_taken,
        restart=peers.restart,
        replay=router.frame_received,
        drop=peers.drop,
        wake=lambda peer_id: core.guard(peers.wake, peer_id),
        barrier=lambda: router.committer.barrier(),
        linked=lambda peer_id: peer_id in network.connected_peers(),
        delivering=peers.delivering,
        waiting=lambda: [
            peer_id
            for peer_id, peer in core.peers.items()
            if peer.link != READY and (peer.sender.waiters or peer.sender.outbox_count)
        ],
        caught_up=lambda peer_id, record: core.guard(peers.caught_up, peer_id, record),
    )


class _GuardedPeers:
    """What the guard asks of the node's peers."""

    def __init__(self, core: NodeCore, router: PeerRouter) -> None:
        self._core = core
        self._router = router

    def restart(self, peer_id: PeerId, taken: StreamTaken) -> None:
        """
        This gateway took ``peer_id``'s stream: its state restarts from
        what the grant read, as after a restart of the node; the sends not
        yet committed and the receipts waited for carry over.
        """
        core, router = self._core, self._router
        old = core.peers.pop(peer_id, None)
        if old is not None:
            old.cancel_timers()
        load_peers(
            core,
            router,
            () if taken.outbound is None else (taken.outbound,),
            taken.inbound,
        )
        peer = core.peers.get(peer_id) or router.new_peer(peer_id)
        if old is None:
            return
        sender, previous = peer.sender, old.sender
        sender.waiters = previous.waiters
        previous.waiters = []
        previous.moved_to = sender
        sender.pending = previous.pending
        sender.pending_deferreds = previous.pending_deferreds
        sender.accepted_at = previous.accepted_at
        sender.outbox_count += len(previous.pending)
        sender.outbox_bytes += sum(map(len, previous.pending))
        outboxes = router.committer.outboxes
        if peer_id in outboxes:
            outboxes[peer_id] = sender

    def drop(self, peer_id: PeerId, reason: Exception) -> None:
        """
        This gateway no longer owns ``peer_id``'s stream: close its link,
        forget its state and its bookkeeping not yet committed.
        """
        core = self._core
        peer = core.peers.pop(peer_id, None)
        self._router.committer.bookkeeping.drop_peer(peer_id)
        if peer is not None:
            peer.cancel_timers()
            if peer.link == READY:
                core.link_downs += 1
            peer.link = CLOSING
        core.network.close_link(peer_id, reason)

    def caught_up(self, peer_id: PeerId, record: Any) -> None:
        """
        A look at ``peer_id``'s outbound record in a shared store: messages
        other gateways appended are transmitted from here; receipts waited
        for on a gateway without the peer's link resolve as the owner's
        acknowledgements reach the store.
        """
        peer = self._core.peers.get(peer_id)
        if peer is None or record is None:
            return
        sender = peer.sender
        stored_up_to(sender, record.last_position)
        if peer.link == READY:
            sender.pump()
            return
        # Another gateway serves the peer: what this one accepted is done
        # once the store records it acknowledged.
        sender.outbox_count = max(
            0, min(sender.outbox_count, peer.out.stored - record.acked)
        )
        waiters = sender.waiters
        while waiters and waiters[0][0] <= record.acked:
            _, _, d, receipt = heapq.heappop(waiters)
            d.callback(receipt)
        self._core.check_drained()

    def wake(self, peer_id: PeerId) -> None:
        peer = self._core.peers.get(peer_id)
        if peer is not None:
            peer.deliverer.deliver()

    def delivering(self, peer_id: PeerId) -> bool:
        peer = self._core.peers.get(peer_id)
        return peer is not None and peer.deliverer.delivering
