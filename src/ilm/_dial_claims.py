"""
Which configured peers a gateway on a shared store dials: only those whose
stream it owns (:class:`DialClaims`, driven by
:class:`ilm._ownership_guard.OwnershipGuard`), and the two rules that
follow for their links: a link this gateway dialled does not take the
stream from a live lease elsewhere (:meth:`DialClaims.takes_over`), and a
dialled peer's lease outlives its link (:meth:`DialClaims.keeps`).

Two gateways dialling one peer would take its stream from each other at
every link (a link arriving takes the stream, raising the epoch).  So a
gateway dials a configured peer only while it owns the peer's stream, and
only the lease decides who that is for a peer that is offline: every
``interval`` seconds (and at start, for every configured peer) the
gateway asks the store which streams have no live lease
(``claimable``: messages waiting, or one of the configured peers) and
tries to take each of its configured peers listed there with
``acquire(peer_id, take_over=False)``; a live lease elsewhere
(``LeaseHeld``) leaves the peer to its owner.  The stream lost (taken
over by a link arriving at another gateway, fenced, released, not
renewed), the gateway stops dialling it.  docs/scaling.md has the rule and
its failure cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ilm._peerid import PeerId
from ilm.backends._ownership import LeaseHeld, StreamTaken

__all__ = ["DialClaims"]

log = Logger(namespace="ilm.ownership")


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class DialClaims:
    """
    Claims the streams of a gateway's configured peers that nobody serves,
    and keeps the network dialling exactly the configured peers whose
    stream this gateway owns.

    :ivar peers: the configured peers (those the network would dial).
    :ivar owned: the streams this gateway owns now.
    :ivar live: whether this gateway owns a peer's stream within the local
        deadline of its lease (a gateway whose renewals fail stops dialling
        when the deadline passes, before another may claim the stream).
    :ivar initiated: whether the link with a peer is one this gateway
        dialled.
    :ivar claimable: the store's ``claimable(peers=...)``.
    :ivar acquire: the store's ``acquire(peer_id, take_over=False)``.
    :ivar claiming: a claim of a peer's stream begins (the guard returns a
        token for :attr:`claimed`, or ``None``: a link is taking the
        stream, no claim).
    :ivar claimed: the claim was granted: the peer's state restarts from
        the grant.
    :ivar dial: ``dial(peer_id, True)`` starts dialling a peer,
        ``dial(peer_id, False)`` stops.
    :ivar interval: seconds between two looks at ``claimable``.
    """

    peers: frozenset[PeerId]
    owned: Callable[[], frozenset[PeerId]]
    live: Callable[[PeerId], bool]
    initiated: Callable[[PeerId], bool]
    claimable: Callable[[Iterable[PeerId]], Deferred[list[PeerId]]]
    acquire: Callable[[PeerId], Deferred[StreamTaken]]
    claiming: Callable[[PeerId], int | None]
    claimed: Callable[[PeerId, int, StreamTaken], None]
    dial: Callable[[PeerId, bool], None]
    clock: IReactorTime
    interval: float = 1.0
    _dialling: set[PeerId] = attr.ib(factory=set, init=False)
    _claims: set[PeerId] = attr.ib(factory=set, init=False)
    _call: IDelayedCall | None = attr.ib(default=None, init=False)
    _looking: bool = attr.ib(default=False, init=False)
    _stopped: bool = attr.ib(default=True, init=False)

    def start(self) -> None:
        """
        Try to claim every configured peer now (a stream the store has no
        row for yet is not listed by ``claimable``); then look every
        :attr:`interval`.
        """
        if not self.peers:
            return
        self._stopped = False
        for peer_id in sorted(self.peers, key=repr):
            self._claim(peer_id)
        self._schedule()

    def stop(self, tell: bool = True) -> None:
        """
        No more claims or dialling (the network is told so, if ``tell``).
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not tell:
            self._dialling.clear()
            return
        for peer_id in sorted(self._dialling, key=repr):
            self.sync(peer_id)

    def sync(self, peer_id: PeerId) -> None:
        """
        Ownership of ``peer_id``'s stream may have changed: dial it exactly
        while it is owned here.
        """
        wanted = not self._stopped and peer_id in self.peers and self.live(peer_id)
        if wanted == (peer_id in self._dialling):
            return
        if wanted:
            self._dialling.add(peer_id)
            log.info(
                "dialling {peer_id!r}: this gateway owns its stream",
                peer_id=peer_id,
                ilm_event="dial_claimed",
            )
        else:
            self._dialling.discard(peer_id)
            log.info(
                "no longer dialling {peer_id!r}: this gateway does not own its stream",
                peer_id=peer_id,
                ilm_event="dial_released",
            )
        self.dial(peer_id, wanted)

    def dialling(self) -> frozenset[PeerId]:
        """The configured peers the network is told to dial now."""
        return frozenset(self._dialling)

    def takes_over(self, peer_id: PeerId) -> bool:
        """
        Whether a link with ``peer_id`` that just arrived takes its stream
        whoever holds it (``acquire(peer_id, take_over=True)``).

        A link the peer dialled does: the peer chose this gateway.  A link
        this gateway dialled only keeps the stream it owns: if another
        gateway's lease is live (a link the peer dialled reached it
        meanwhile), the grant is refused, the link closed and the dialling
        stops, so that two gateways never take a stream from each other at
        every link.
        """
        return not (peer_id in self.peers and self.initiated(peer_id))

    def keeps(self, peer_id: PeerId) -> bool:
        """
        Whether the lease of ``peer_id``'s stream is kept when its link
        ends: yes for a configured peer whose stream this gateway owns (it
        keeps dialling it until it loses the lease: only the lease decides
        who redials a peer that is offline).
        """
        return peer_id in self.peers and peer_id in self.owned()

    def look(self) -> None:
        """
        Look at ``claimable`` now (a hint that a stream may have become
        claimable), unless a look is in progress.
        """
        if self._stopped or self._looking:
            return
        self._looking = True
        d = self.claimable(self.peers)
        d.addCallbacks(self._listed, self._not_listed)
        d.addErrback(
            lambda reason: log.failure(
                "internal error while {doing}",
                reason,
                doing="claiming streams",
                ilm_event="internal_error",
            )
        )

    def _schedule(self) -> None:
        if not self._stopped:
            self._call = self.clock.callLater(self.interval, self._tick)

    def sync_all(self) -> None:
        """Ownership may have changed for any peer (a renewal ran)."""
        for peer_id in sorted(self.peers, key=repr):
            self.sync(peer_id)

    def _tick(self) -> None:
        self._call = None
        self.sync_all()
        self.look()
        self._schedule()

    def _listed(self, peers: list[PeerId]) -> None:
        self._looking = False
        owned = self.owned()
        for peer_id in peers:
            if peer_id in self.peers and peer_id not in owned:
                self._claim(peer_id)

    def _not_listed(self, reason: Failure) -> None:
        self._looking = False
        log.info(
            "cannot list the claimable streams: {reason}; trying again in {interval} s",
            reason=reason.getErrorMessage(),
            interval=self.interval,
            ilm_event="claimable_failed",
        )

    def _claim(self, peer_id: PeerId) -> None:
        """
        Take ``peer_id``'s stream if nobody's lease is live, without a link;
        then dial it (the link, once up, takes the stream as any link
        does).  A live lease elsewhere leaves it to its owner.
        """
        if self._stopped or peer_id in self._claims or peer_id in self.owned():
            return
        token = self.claiming(peer_id)
        if token is None:
            return
        self._claims.add(peer_id)

        def claimed(taken: StreamTaken) -> None:
            log.info(
                "claimed the stream of {peer_id!r} (epoch {epoch}, from "
                "{previous_owner}): nobody served it; dialling it",
                peer_id=peer_id,
                epoch=taken.epoch,
                previous_owner=taken.previous_owner or "nobody",
                ilm_event="stream_claimed",
            )
            self.claimed(peer_id, token, taken)

        def not_claimed(reason: Failure) -> None:
            if reason.check(LeaseHeld):
                log.debug(
                    "the stream of {peer_id!r} is served elsewhere: {reason}",
                    peer_id=peer_id,
                    reason=reason.getErrorMessage(),
                    ilm_event="stream_claim_refused",
                )
            else:
                log.info(
                    "could not claim the stream of {peer_id!r}: {reason}",
                    peer_id=peer_id,
                    reason=reason.getErrorMessage(),
                    ilm_event="stream_claim_failed",
                )

        def done(_: object) -> None:
            self._claims.discard(peer_id)
            self.sync(peer_id)

        d = self.acquire(peer_id)
        d.addCallbacks(claimed, not_claimed)
        d.addErrback(
            lambda reason: log.failure(
                "internal error while {doing}",
                reason,
                doing="claiming a stream",
                ilm_event="internal_error",
            )
        )
        d.addBoth(done)
