"""
Stream ownership in the messenger, for a store shared by several gateway
processes of one node (a backend providing
:class:`ilm.backends.IStreamOwnership`).

:class:`OwnershipGuard` holds the whole policy; the messenger calls it at
a few points and it calls the messenger back through narrow callables.
It keeps a record of each stream on this gateway and makes the take-overs
and the drops; its parts do the rest: :class:`ilm._lease_keeper.LeaseKeeper`
(renewals, local deadlines, wake-ups, releases),
:class:`ilm._dial_claims.DialClaims` (claims and dialling) and
:class:`AppendWatcher` (others' appends):

- **A link arrives** (:meth:`OwnershipGuard.link_established`): the
  gateway takes the peer's stream (``acquire(peer_id, take_over=True)``,
  raising the epoch) before anything of the link is handled; frames that
  arrive meanwhile are held and replayed in order.  Once granted, the
  messenger restarts the peer from the state the grant read
  (``restart``): moving a stream is exactly "that stream crashed and
  restarted from its store", which the resume handshake handles.
- **Delivery** (:meth:`OwnershipGuard.may_deliver`): only while the
  backend ``holds`` the stream (after a take-over's ``deliver_after``
  wait, before its local deadline), and not while the link is leaving.
  When the window opens, or a renewal moves the deadline, the peer's
  deliveries are woken (``wake``).
- **Renewal** (:class:`ilm._lease_keeper.LeaseKeeper`): every third of
  the lease; each stream the store reports lost is dropped.
- **Fencing** (:meth:`OwnershipGuard.commit_failed`): a commit failing with
  :class:`ilm.backends.Fenced` drops each fenced stream at once (``drop``:
  close its link, forget its in-memory state, take its entries out of the
  pending bookkeeping); it comes back only with a new link, reloaded from
  the store.
- **A link ends** (:meth:`OwnershipGuard.link_lost`): no more deliveries
  for it; once what is pending is committed (``barrier``) and no new link
  arrived meanwhile, the lease is released so that the gateway the peer
  reaches next can deliver at once instead of waiting for the expiry.  A
  peer this gateway dials keeps its lease instead: the owner keeps
  dialling it.
- **Dialling** (:class:`ilm._dial_claims.DialClaims`): a configured peer is
  dialled only while this gateway owns its stream; a stream with no live
  lease is claimed (``acquire(peer_id, take_over=False)``) and then
  dialled, so that only the lease decides who redials an offline peer.

A backend without ``IStreamOwnership`` gets no guard: the messenger then
behaves as with any single-process store.  docs/scaling.md has the design
and the failure cases.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ilm._dial_claims import DialClaims
from ilm._lease_keeper import LeaseKeeper, StreamRecord
from ilm._peer import CLOSING, READY
from ilm._peerid import PeerId
from ilm._store import OutboundRecord
from ilm.backends._ownership import Fenced, IStreamOwnership, StreamTaken

__all__ = ["GatedHost", "GatewayStreams", "OwnershipGuard"]

log = Logger(namespace="ilm.ownership")


@attr.s(auto_attribs=True, slots=True)
class AppendWatcher:
    """
    Reads the outbound records of the streams a gateway owns (and of peers
    with receipts waiting), every ``interval`` seconds and sooner when the
    store hints at an append, and hands them to ``caught_up``: how an owner
    learns what other gateways appended for its peers.

    :ivar may_look: whether a peer's stream is taken here and its link up
        (not being taken, not leaving).
    :ivar linked: whether the network has a link with a peer now.
    :ivar waiting: the peers to look at whose stream is not served here:
        receipts waiting for an acknowledgement, or messages (this
        gateway's or others') counted against the outbox limits.
    :ivar caught_up: the messenger learns a peer's outbound record as the
        shared store holds it (others' appends, the owner's
        acknowledgements).
    :ivar interval: seconds between two polls; the store's append hints
        (``watch``) wake a read sooner.
    """

    ownership: Any
    clock: IReactorTime
    may_look: Callable[[PeerId], bool]
    linked: Callable[[PeerId], bool]
    waiting: Callable[[], list[PeerId]]
    caught_up: Callable[[PeerId, Any], None]
    interval: float
    _call: IDelayedCall | None = None
    _reading: set[PeerId] = attr.ib(factory=set)
    _stopped: bool = False

    def start(self) -> None:
        self._stopped = False
        self._call = self.clock.callLater(self.interval, self._poll)
        d = self.ownership.watch(self._hinted)
        d.addErrback(
            lambda reason: log.info(
                "no append hints from the store ({reason}): polling only",
                reason=reason.getErrorMessage(),
                ilm_event="append_hints_unavailable",
            )
        )

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _poll(self) -> None:
        self._call = None
        if self._stopped:
            return
        peers = [
            peer_id
            for peer_id in self.ownership.owned()
            if self.linked(peer_id) and self.may_look(peer_id)
        ]
        for peer_id in [*peers, *self.waiting()]:
            self._look(peer_id)
        self._call = self.clock.callLater(self.interval, self._poll)

    def _hinted(self, peer_id: PeerId) -> None:
        if not self._stopped and self.may_look(peer_id):
            self._look(peer_id)

    def _look(self, peer_id: PeerId) -> None:
        """Read ``peer_id``'s outbound record (one read at a time per peer)."""
        if peer_id in self._reading:
            return
        self._reading.add(peer_id)

        def done(result: object) -> None:
            self._reading.discard(peer_id)
            if not isinstance(result, Failure) and not self._stopped:
                self.caught_up(peer_id, result)

        d = self.ownership.outbound_state(peer_id)
        d.addBoth(done)
        d.addErrback(
            lambda reason: log.failure(
                "internal error while {doing}",
                reason,
                doing="reading an outbound record",
                ilm_event="internal_error",
            )
        )


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class OwnershipGuard:
    """
    Takes, keeps, fences and gives up the streams of one gateway: the
    stream records, the take-overs and the drops are its own; renewals,
    the local deadlines and releases are its :class:`LeaseKeeper`'s, the
    claims and the dialling its :class:`DialClaims`'s, the reads of
    others' appends its :class:`AppendWatcher`'s.

    :ivar ownership: the backend, as :class:`IStreamOwnership`.
    :ivar clock: timers (renewal, delivery windows, claims, polls).
    :ivar monotonic: the backend's local clock of lease deadlines.
    :ivar proceed: the messenger handles a link that is now this gateway's
        (its handshake starts).
    :ivar restart: the messenger rebuilds a peer's state from a grant.
    :ivar replay: the messenger handles a frame held while taking.
    :ivar drop: the messenger closes the peer's link (with the reason) and
        forgets its in-memory state and pending bookkeeping.
    :ivar wake: the messenger delivers what is queued for a peer.
    :ivar barrier: fires once what is pending now is committed.
    :ivar linked: whether the network has a link with a peer now.
    :ivar margin: the fraction of the lease before its local deadline at
        which no new delivery starts, so that a delivery in progress (an
        asynchronous target) ends before the lease does and never overlaps
        the next owner's first one (default a fifth).
    :ivar dialled: the configured peers, which the network dials only
        when told (``dial``): while this gateway owns their stream.

    The others are its parts': ``delivering`` the :class:`LeaseKeeper`'s;
    ``initiated``, ``dial`` and ``claim_interval`` (its ``interval``) the
    :class:`DialClaims`'; ``waiting``, ``caught_up`` and ``poll_interval``
    (its ``interval``) the :class:`AppendWatcher`'s.
    """

    ownership: Any
    clock: IReactorTime
    proceed: Callable[[PeerId], None]
    restart: Callable[[PeerId, StreamTaken], None]
    replay: Callable[[PeerId, bytes], None]
    drop: Callable[[PeerId, Exception], None]
    wake: Callable[[PeerId], None]
    barrier: Callable[[], Deferred[None]]
    linked: Callable[[PeerId], bool]
    delivering: Callable[[PeerId], bool] = lambda peer_id: False
    initiated: Callable[[PeerId], bool] = lambda peer_id: False
    waiting: Callable[[], list[PeerId]] = list
    caught_up: Callable[[PeerId, Any], None] = lambda peer_id, record: None
    poll_interval: float = 0.2
    monotonic: Callable[[], float] = time.monotonic
    margin: float = 0.2
    dialled: frozenset[PeerId] = frozenset()
    dial: Callable[[PeerId, bool], None] = lambda peer_id, wanted: None
    claim_interval: float = 1.0
    _streams: dict[PeerId, StreamRecord] = attr.ib(factory=dict, init=False)
    _stopped: bool = attr.ib(default=False, init=False)
    _leases: LeaseKeeper = attr.ib(init=False)
    _appends: AppendWatcher = attr.ib(init=False)
    _claims: DialClaims = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._leases = LeaseKeeper(
            ownership=self.ownership,
            streams=self._streams,
            clock=self.clock,
            monotonic=self.monotonic,
            margin=self.margin,
            lost=self._lease_lost,
            renewal_ended=lambda: self._claims.sync_all(),
            released=lambda peer_id: self._claims.sync(peer_id),
            wake=self.wake,
            delivering=self.delivering,
            barrier=self.barrier,
        )
        self._claims = DialClaims(
            peers=frozenset(self.dialled),
            owned=self.ownership.owned,
            live=self._leases.live,
            initiated=self.initiated,
            claimable=lambda peers: self.ownership.claimable(peers=peers),
            acquire=lambda peer_id: self.ownership.acquire(peer_id, take_over=False),
            claiming=self._claiming,
            claimed=self._claimed,
            dial=self.dial,
            clock=self.clock,
            interval=self.claim_interval,
        )
        self._appends = AppendWatcher(
            ownership=self.ownership,
            clock=self.clock,
            may_look=self.may_look,
            linked=self.linked,
            waiting=self.waiting,
            caught_up=self.caught_up,
            interval=self.poll_interval,
        )

    @staticmethod
    def shares(backend: object) -> bool:
        """Whether ``backend`` is a store shared by several gateways."""
        return bool(IStreamOwnership.providedBy(backend))

    @classmethod
    def for_backend(cls, backend: object, **callbacks: Any) -> OwnershipGuard | None:
        """
        :return: a guard if ``backend`` provides :class:`IStreamOwnership`,
            else ``None`` (nothing changes).
        """
        if not IStreamOwnership.providedBy(backend):
            return None
        # The backend's clock of lease deadlines: its own ``monotonic``, or
        # PostgresBackend's (kept by its leases part).
        monotonic = getattr(backend, "monotonic", None) or getattr(
            getattr(backend, "_leases", None), "_monotonic", None
        )
        if callable(monotonic):
            callbacks.setdefault("monotonic", monotonic)
        return cls(ownership=backend, **callbacks)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """
        Renew the leases held, every third of the lease; poll the streams
        this gateway owns for others' appends, woken sooner by the store's
        hints; claim the configured peers nobody serves.
        """
        self._stopped = False
        self._leases.start()
        self._appends.start()
        self._claims.start()

    def stop(self, crashed: bool = False) -> None:
        """
        No more renewals, wake-ups or claims (the store releases on close);
        the network is told to stop dialling, unless ``crashed`` (the node
        was abandoned: nothing more is said to the network).
        """
        self._stopped = True
        self._leases.stop()
        self._appends.stop()
        self._claims.stop(tell=not crashed)

    def dialling(self) -> frozenset[PeerId]:
        """The configured peers the network is told to dial now."""
        return self._claims.dialling()

    def may_look(self, peer_id: PeerId) -> bool:
        stream = self._streams.get(peer_id)
        return stream is not None and not stream.leaving and stream.held is None

    def _unexpected(self, reason: Failure, doing: str) -> None:
        log.failure(
            "internal error while {doing}",
            reason,
            doing=doing,
            ilm_event="internal_error",
        )

    # -- links ---------------------------------------------------------------------

    def link_established(self, peer_id: PeerId) -> None:
        """
        A link with ``peer_id`` arrived: take its stream, then let the
        messenger handle the link (frames that arrive meanwhile are held).

        A link the peer dialled takes the stream whoever holds it; a link
        this gateway dialled only keeps the stream it owns
        (:meth:`DialClaims.takes_over`).
        """
        stream = self._streams.setdefault(peer_id, StreamRecord())
        stream.generation += 1
        stream.held = []
        stream.leaving = False
        self._leases.cancel_wake(stream)
        generation = stream.generation
        take_over = self._claims.takes_over(peer_id)
        d: Deferred[StreamTaken] = self.ownership.acquire(peer_id, take_over=take_over)
        d.addCallbacks(
            self._taken,
            self._not_taken,
            callbackArgs=(peer_id, generation),
            errbackArgs=(peer_id, generation),
        )
        d.addErrback(self._unexpected, "taking a stream")

    def taking(self, peer_id: PeerId, frame: bytes) -> bool:
        """
        :return: whether ``frame`` from ``peer_id`` was held, because the
            stream is still being taken (it is replayed once taken).
        """
        stream = self._streams.get(peer_id)
        if stream is None or stream.held is None:
            return False
        stream.held.append(frame)
        return True

    def _taken(self, taken: StreamTaken, peer_id: PeerId, generation: int) -> None:
        stream = self._streams.get(peer_id)
        if stream is None or stream.generation != generation:
            return
        held, stream.held = stream.held or [], None
        self._claims.sync(peer_id)
        if not self.linked(peer_id):
            # The link ended while taking: give the stream up again.
            self.link_lost(peer_id)
            return
        log.info(
            "took the stream of {peer_id!r} (epoch {epoch}, from "
            "{previous_owner}); delivering in {deliver_after:.3f} s",
            peer_id=peer_id,
            epoch=taken.epoch,
            previous_owner=taken.previous_owner or "nobody",
            deliver_after=taken.deliver_after,
            ilm_event="stream_taken",
        )
        self._reload(peer_id, stream, taken)
        self.proceed(peer_id)
        for frame in held:
            if stream.generation != generation:
                break
            self.replay(peer_id, frame)
        self._leases.wake_at_window(peer_id)

    def _not_taken(self, reason: Failure, peer_id: PeerId, generation: int) -> None:
        stream = self._streams.get(peer_id)
        if stream is None or stream.generation != generation:
            return
        stream.held = None
        # The messenger forgets the peer: so does the guard (a later grant
        # restarts it from the store).
        self._streams.pop(peer_id, None)
        self._claims.sync(peer_id)
        error = reason.value
        self.drop(
            peer_id,
            error if isinstance(error, Exception) else Exception(str(error)),
        )
        log.warn(
            "could not take the stream of {peer_id!r}: {reason}; link closed",
            peer_id=peer_id,
            reason=reason.getErrorMessage(),
            ilm_event="stream_not_taken",
        )

    def _reload(
        self, peer_id: PeerId, stream: StreamRecord, taken: StreamTaken
    ) -> None:
        """A grant of ``peer_id``'s stream: its state as the grant read it."""
        if not (
            stream.epoch
            and taken.previous_epoch == stream.epoch
            and taken.previous_owner in (None, self.ownership.gateway)
        ):
            # Another gateway may have written since this one last held the
            # stream: its state restarts from what the grant read.  (Taken
            # back with nothing in between, the state here is still right,
            # and ahead of the store: marks not yet committed; only other
            # gateways' appends are news.)
            self.restart(peer_id, taken)
        else:
            self.caught_up(peer_id, taken.outbound)
        stream.epoch = taken.epoch

    def link_lost(self, peer_id: PeerId) -> None:
        """
        The link with ``peer_id`` ended: deliver nothing more for it; once
        what is pending is committed, and if no new link arrived, release
        its lease (unless this gateway dials the peer:
        :meth:`DialClaims.keeps`).
        """
        stream = self._streams.get(peer_id)
        if stream is None or stream.leaving:
            return
        stream.leaving = True
        stream.held = None
        self._leases.cancel_wake(stream)
        if self._claims.keeps(peer_id):
            return
        self._leases.release_when_done(peer_id, stream)

    # -- claiming offline peers --------------------------------------------------

    def _claiming(self, peer_id: PeerId) -> int | None:
        """
        A claim of ``peer_id``'s stream begins: nothing is delivered for it
        until a link arrives.

        :return: the claim's generation, or ``None`` if a link is taking
            the stream now (its own take-over decides).
        """
        current = self._streams.get(peer_id)
        if self._stopped or (current is not None and current.held is not None):
            return None
        stream = self._streams.setdefault(peer_id, StreamRecord())
        stream.generation += 1
        stream.leaving = True
        return stream.generation

    def _claimed(self, peer_id: PeerId, generation: int, taken: StreamTaken) -> None:
        """
        A claim granted: the peer's state restarts from the grant (unless
        a link arrived meanwhile: its own take-over decides).
        """
        stream = self._streams.get(peer_id)
        if stream is not None and stream.generation == generation:
            self._reload(peer_id, stream, taken)

    # -- delivery --------------------------------------------------------------------

    def may_deliver(self, peer_id: PeerId) -> bool:
        """
        :return: whether this gateway may start a delivery for ``peer_id``
            now: it holds the stream, the link is here, and the local
            deadline is more than the margin away.
        """
        return self._leases.may_deliver(peer_id)

    def delivery_settled(self, peer_id: PeerId) -> None:
        """
        A delivery for ``peer_id`` ended: a release waiting for it goes on.
        """
        self._leases.delivery_settled(peer_id)

    # -- fencing ---------------------------------------------------------------------

    def commit_failed(self, reason: Failure) -> bool:
        """
        A commit failed: if it was fenced, drop every fenced stream.

        :return: whether it was fenced.
        """
        error = reason.value
        if not isinstance(error, Fenced):
            return False
        for peer_id, (epoch, owner) in sorted(error.streams.items(), key=repr):
            self._drop(
                peer_id,
                error,
                f"the store holds epoch {epoch} owned by {owner or 'nobody'}",
            )
        return True

    def _lease_lost(self, peer_id: PeerId) -> None:
        """A renewal found ``peer_id``'s lease lost: drop its stream."""
        self._drop(
            peer_id,
            Fenced({peer_id: (0, None)}),
            "its lease was taken over or released meanwhile",
        )

    def _drop(self, peer_id: PeerId, error: Exception, why: str) -> None:
        stream = self._streams.pop(peer_id, None)
        if stream is not None:
            self._leases.cancel_wake(stream)
        self._claims.sync(peer_id)
        log.warn(
            "dropped the stream of {peer_id!r}: this gateway no longer owns "
            "it ({why}); its link is closed and its state reloads from the "
            "store when it comes back",
            peer_id=peer_id,
            why=why,
            ilm_event="stream_fenced",
        )
        self.drop(peer_id, error)


class GatedHost:
    """
    The delivery host of one peer's deliverer on a gateway with a guard:
    deliveries are allowed only when the node allows them, the guard says
    this gateway may deliver for the peer, and the peer's state is still
    the node's (not replaced by a take-over's restart, nor dropped: a
    delivery of the old state that settles then starts no other);
    everything else is the node's host.
    """

    __slots__ = ("_guard", "_host", "_peer", "_peer_id")

    def __init__(
        self, host: Any, guard: OwnershipGuard, peer_id: PeerId, peer: Any = None
    ) -> None:
        self._host = host
        self._guard = guard
        self._peer_id = peer_id
        self._peer = peer

    @property
    def deliveries_allowed(self) -> bool:
        host, peer_id = self._host, self._peer_id
        return (
            bool(host.deliveries_allowed)
            and (self._peer is None or host.peers.get(peer_id) is self._peer)
            and self._guard.may_deliver(peer_id)
        )

    def delivery_settled(self) -> None:
        self._guard.delivery_settled(self._peer_id)
        self._host.delivery_settled()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


class GatewayStreams:
    """
    The messenger's side of stream ownership: what the guard's callbacks do
    to the node's peers (built by :class:`ilm._link.PeerRouter` when its
    store is shared, ``None`` otherwise: :meth:`for_node`).

    :ivar guard: the :class:`OwnershipGuard`.
    """

    def __init__(self, core: Any, router: Any) -> None:
        self._core = core
        self._router = router
        network = core.network
        dialled: frozenset[PeerId] = frozenset()
        if callable(getattr(network, "hold_dials", None)):
            # The network dials a configured peer only while this gateway
            # owns the peer's stream (the guard tells it).
            network.hold_dials()
            dialled = core.dialled_peers() or frozenset()
        self.guard: OwnershipGuard = OwnershipGuard.for_backend(  # type: ignore[assignment]
            core.backend,
            dialled=dialled,
            dial=self.dial,
            clock=core.clock,
            proceed=router.taken,
            restart=self.restart,
            replay=router.frame_received,
            drop=self.drop,
            wake=lambda peer_id: core.guard(self.wake, peer_id),
            barrier=router.committer.barrier,
            linked=lambda peer_id: peer_id in core.network.connected_peers(),
            initiated=self.initiated,
            delivering=lambda peer_id: (
                peer_id in core.peers and core.peers[peer_id].deliverer.delivering
            ),
            waiting=self.waiting,
            caught_up=lambda peer_id, record: core.guard(
                self.caught_up, peer_id, record
            ),
        )

    @classmethod
    def for_node(cls, core: Any, router: Any) -> GatewayStreams | None:
        """A :class:`GatewayStreams` if the node's store is shared."""
        if not OwnershipGuard.shares(core.backend):
            return None
        return cls(core, router)

    def host(self, peer: Any) -> GatedHost:
        """The delivery host of ``peer``'s deliverer."""
        return GatedHost(self._core, self.guard, peer.peer_id, peer)

    # -- the guard's callbacks -------------------------------------------------

    def restart(self, peer_id: PeerId, taken: StreamTaken) -> None:
        """
        This gateway took ``peer_id``'s stream: its state restarts from what
        the grant read, as after a restart of the node; sends not yet
        committed and receipts waited for carry over.
        """
        core, router = self._core, self._router
        old = core.peers.pop(peer_id, None)
        if old is not None:
            old.cancel_timers()
        record = taken.outbound
        if record is not None:
            peer = router.add_peer(peer_id, record.acked, record.last_position)
            peer.sender.outbox_bytes = record.pending_bytes
        else:
            peer = router.new_peer(peer_id)
        for mark in taken.inbound:
            if mark.retired:
                peer.retired[mark.incarnation] = None
            else:
                peer.add_stream(mark.incarnation, mark.delivered)
        forgotten = peer.forget_retired()
        if forgotten:
            router.forgotten(peer, forgotten)
        if old is not None:
            sender, previous = peer.sender, old.sender
            sender.waiters = previous.waiters
            sender.pending = previous.pending
            sender.pending_deferreds = previous.pending_deferreds
            sender.outbox_count += len(previous.pending)
            # Their bytes count against the outbox limit as their number
            # does, and their age from when they were accepted.
            sender.outbox_bytes += sum(map(len, previous.pending))
            if previous.pending:
                sender.accepted_at = previous.accepted_at
            outboxes = router.committer.outboxes
            if peer_id in outboxes:
                outboxes[peer_id] = sender

    def initiated(self, peer_id: PeerId) -> bool:
        """Whether the link with ``peer_id`` is one this gateway dialled."""
        link = getattr(self._core.network, "link", None)
        connection = link(peer_id) if callable(link) else None
        return bool(getattr(connection, "initiated", False))

    def dial(self, peer_id: PeerId, wanted: bool) -> None:
        """Have the network dial ``peer_id`` (``wanted``) or not."""
        network = self._core.network
        if wanted:
            network.dial(peer_id)
        else:
            network.stop_dialling(peer_id)

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

    def wake(self, peer_id: PeerId) -> None:
        peer = self._core.peers.get(peer_id)
        if peer is not None:
            peer.deliverer.deliver()

    def waiting(self) -> list[PeerId]:
        """
        Peers served elsewhere whose sends from here are not yet done, or
        for which the store held other gateways' messages at the last look
        (the outbox limits count them).
        """
        return [
            peer_id
            for peer_id, peer in self._core.peers.items()
            if peer.link != READY
            and (
                peer.sender.waiters
                or peer.sender.outbox_count
                or peer.sender.others_count
                or peer.sender.others_bytes
            )
        ]

    @staticmethod
    def count_others(sender: Any, record: OutboundRecord) -> None:
        """
        The outbox limits count every gateway's messages: what the shared
        store holds for the peer (``record``) beyond what this gateway
        counts as committed is other gateways', counted as
        ``others_count`` and ``others_bytes`` until the next look.
        """
        pending = sender.pending
        own_count = sender.outbox_count - len(pending)
        own_bytes = sender.outbox_bytes - sum(map(len, pending))
        stored = record.last_position - record.acked
        sender.others_count = max(0, stored - own_count)
        sender.others_bytes = max(0, record.pending_bytes - own_bytes)

    def caught_up(self, peer_id: PeerId, record: OutboundRecord | None) -> None:
        """
        A look at ``peer_id``'s outbound record in the shared store: what
        other gateways appended is transmitted from here (on the owner);
        receipts waited for on a gateway without the peer's link resolve as
        the owner's acknowledgements reach the store.
        """
        peer = self._core.peers.get(peer_id)
        if peer is None or record is None:
            return
        sender = peer.sender
        self.stored_up_to(sender, record.last_position)
        if peer.link == READY:
            self.count_others(sender, record)
            sender.pump()
            return
        sender.outbox_count = max(
            0, min(sender.outbox_count, sender.out.stored - record.acked)
        )
        # What the owner acknowledged no longer weighs here either.
        sender.outbox_bytes = min(
            sender.outbox_bytes, record.pending_bytes + sum(map(len, sender.pending))
        )
        self.count_others(sender, record)
        waiters = sender.waiters
        while waiters and waiters[0][0] <= record.acked:
            _, _, d, receipt = heapq.heappop(waiters)
            d.callback(receipt)
        self._core.check_drained()

    # -- commits -----------------------------------------------------------------

    @staticmethod
    def stored_up_to(sender: Any, last: int) -> None:
        """
        The store holds messages to the peer up to ``last``, some appended
        by other gateways: transmit them too (read from the store).
        """
        out = sender.out
        if last > out.stored:
            if sender.session.link == READY:
                # The owner transmits them (and waits for them at shutdown).
                sender.outbox_count += last - out.stored
            out.stored = last

    def stored_at(self, sender: Any, first: int, result: object) -> int:
        """
        Where a commit stored a sender's new messages: the shared store puts
        them where the outbox ended (others may have appended since this
        gateway last looked); the positions before are others'.
        """
        positions = getattr(result, "positions", None)
        if positions is None or sender.peer_id not in positions:
            return first
        first = positions[sender.peer_id][0]
        self.stored_up_to(sender, first - 1)
        return int(first)

    @staticmethod
    def ahead_of_stream(peer: Any, incarnation: str, position: int) -> bool:
        """
        Whether a durable mark is beyond what ``peer``'s stream of
        ``incarnation`` received: a mark of deliveries made before the peer
        restarted from the shared store (a take-over), which this state
        has not seen again yet; acknowledging it would be an ACK beyond
        what it holds.
        """
        return any(
            stream.incarnation == incarnation and position > stream.received
            for stream in peer.inbound
        )
