"""
The leases of the streams a gateway holds on a shared store, once taken:
renewed, counted against their local deadlines, and given back
(:class:`LeaseKeeper`, a part of
:class:`ilm._ownership_guard.OwnershipGuard`).

Taking a stream (a link's take-over, a dialling claim) and dropping it
(fenced) are the guard's; what happens to the lease in between is here:

- **Renewal**: every third of the lease, one ``renew()``; each stream the
  store reports lost (and not granted again meanwhile) is reported to the
  guard, which drops it.
- **Local deadlines**: a delivery starts only while the backend ``holds``
  the stream and its local deadline is more than a margin away
  (:meth:`LeaseKeeper.may_deliver`); a configured peer is dialled only
  before the deadline (:meth:`LeaseKeeper.live`).  When a delivery window
  opens (a take-over's ``deliver_after`` wait), or a renewal moves the
  deadline, the peer's deliveries are woken.
- **Release**: once a link ended, no delivery is in progress and what was
  pending is committed, the lease is released, unless a new link (or a
  drop and a new grant) came meanwhile.

The guard's per-stream records (:class:`StreamRecord`) are shared: the
guard creates, changes and removes them; the keeper reads them and sets
only the two fields that are its own (``wake_call``,
``release_when_settled``).  docs/scaling.md has the rules and their
failure cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ilm._peerid import PeerId
from ilm.backends._ownership import Renewal

__all__ = ["LeaseKeeper", "StreamRecord"]

log = Logger(namespace="ilm.ownership")


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class StreamRecord:
    """What the guard keeps about one peer's stream on this gateway."""

    #: Raised at every link and drop: a late answer for an older one is moot.
    generation: int = 0
    #: Frames that arrived while the stream was being taken.
    held: list[bytes] | None = None
    #: The link ended: deliver nothing more until a new link takes it.
    leaving: bool = False
    #: The epoch of the last grant (0: none yet).
    epoch: int = 0
    #: The link ended with a delivery in progress: release once it settles.
    release_when_settled: bool = False
    #: The wake-up of the peer's deliveries when its window opens.
    wake_call: IDelayedCall | None = None


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class LeaseKeeper:
    """
    Renews, times and releases the leases of one gateway's streams.

    :ivar ownership: the backend, as :class:`IStreamOwnership`.
    :ivar streams: the guard's records, by peer (read here; see the module
        docstring for the two fields this sets).
    :ivar clock: timers (renewal, wake-ups).
    :ivar monotonic: the backend's local clock of lease deadlines.
    :ivar margin: the fraction of the lease before its local deadline at
        which no new delivery starts.
    :ivar lost: a renewal found a peer's lease lost (no newer grant held):
        the guard drops the stream.
    :ivar renewal_ended: a renewal was answered or failed: ownership may
        have changed for any peer.
    :ivar released: a release of a peer's lease ended (or was found moot):
        ownership of its stream may have changed.
    :ivar wake: the messenger delivers what is queued for a peer.
    :ivar delivering: whether a delivery for a peer is in progress.
    :ivar barrier: fires once what is pending now is committed.
    """

    ownership: Any
    streams: Mapping[PeerId, StreamRecord]
    clock: IReactorTime
    monotonic: Callable[[], float]
    margin: float
    lost: Callable[[PeerId], None]
    renewal_ended: Callable[[], None]
    released: Callable[[PeerId], None]
    wake: Callable[[PeerId], None]
    delivering: Callable[[PeerId], bool]
    barrier: Callable[[], Deferred[None]]
    _renew_call: IDelayedCall | None = attr.ib(default=None, init=False)
    _renewing: bool = attr.ib(default=False, init=False)
    _stopped: bool = attr.ib(default=False, init=False)

    def start(self) -> None:
        """Renew the leases held, every third of the lease."""
        self._stopped = False
        self._schedule_renewal()

    def stop(self) -> None:
        """No more renewals, wake-ups or releases (the store releases on close)."""
        self._stopped = True
        if self._renew_call is not None and self._renew_call.active():
            self._renew_call.cancel()
        self._renew_call = None
        for stream in self.streams.values():
            self.cancel_wake(stream)

    # -- local deadlines ---------------------------------------------------------

    def live(self, peer_id: PeerId) -> bool:
        """
        Whether this gateway owns ``peer_id``'s stream within the local
        deadline of its lease (the condition for dialling it).
        """
        if peer_id not in self.ownership.owned():
            return False
        window = self.ownership.delivery_window(peer_id)
        return window is not None and bool(self.monotonic() < window[1])

    def may_deliver(self, peer_id: PeerId) -> bool:
        """
        :return: whether a delivery for ``peer_id`` may start now: its
            stream is taken and its link here, the backend holds it, and
            the local deadline is more than the margin away.
        """
        stream = self.streams.get(peer_id)
        if stream is None or stream.leaving or stream.held is not None:
            return False
        if not self.ownership.holds(peer_id):
            return False
        window = self.ownership.delivery_window(peer_id)
        if window is None:
            return False
        margin = self.margin * float(self.ownership.lease_duration)
        return bool(self.monotonic() < window[1] - margin)

    def wake_at_window(self, peer_id: PeerId) -> None:
        """
        Wake ``peer_id``'s deliveries when its delivery window opens (now,
        if it is open), unless the deadline is within the margin.
        """
        stream = self.streams.get(peer_id)
        if stream is None or stream.leaving or self._stopped:
            return
        window = self.ownership.delivery_window(peer_id)
        if window is None:
            return
        deliver_from, valid_until = window
        now = self.monotonic()
        if now >= valid_until - self.margin * float(self.ownership.lease_duration):
            return
        self.cancel_wake(stream)
        if deliver_from <= now:
            self.wake(peer_id)
            return
        # A hair late rather than early: holds() must be true by then.
        delay = deliver_from - now + 0.001
        stream.wake_call = self.clock.callLater(delay, self._woken, peer_id)

    def _woken(self, peer_id: PeerId) -> None:
        stream = self.streams.get(peer_id)
        if stream is not None:
            stream.wake_call = None
        self.wake_at_window(peer_id)

    @staticmethod
    def cancel_wake(stream: StreamRecord) -> None:
        """No wake-up for ``stream`` (one may be scheduled again later)."""
        call, stream.wake_call = stream.wake_call, None
        if call is not None and call.active():
            call.cancel()

    # -- renewal -----------------------------------------------------------------

    def _schedule_renewal(self) -> None:
        if self._stopped:
            return
        interval = float(self.ownership.lease_duration) / 3
        self._renew_call = self.clock.callLater(interval, self._renew)

    def _renew(self) -> None:
        self._renew_call = None
        if self._renewing or not self.ownership.owned():
            self._schedule_renewal()
            return
        self._renewing = True
        d: Deferred[Renewal] = self.ownership.renew()
        d.addCallbacks(self._renewed, self._renew_failed)
        d.addErrback(self._unexpected)

    def _renewed(self, renewal: Renewal) -> None:
        self._renewing = False
        owned = self.ownership.owned()
        for peer_id in sorted(renewal.lost, key=repr):
            if peer_id in owned:
                # Taken again meanwhile (a new link): that newer grant
                # stands; the renewal only saw the older one.
                continue
            self.lost(peer_id)
        for peer_id in renewal.renewed:
            self.wake_at_window(peer_id)
        self.renewal_ended()
        self._schedule_renewal()

    def _renew_failed(self, reason: Failure) -> None:
        self._renewing = False
        log.warn(
            "renewing the stream leases failed: {reason}; deliveries stop "
            "when the local deadlines pass",
            reason=reason.getErrorMessage(),
            ilm_event="lease_renewal_failed",
        )
        # Past its local deadline, a stream is no longer dialled from here.
        self.renewal_ended()
        self._schedule_renewal()

    def _unexpected(self, reason: Failure) -> None:
        self._renewing = False
        log.failure(
            "internal error while {doing}",
            reason,
            doing="renewing leases",
            ilm_event="internal_error",
        )

    # -- release -----------------------------------------------------------------

    def release_when_done(self, peer_id: PeerId, stream: StreamRecord) -> None:
        """
        Release ``peer_id``'s lease (its link ended: ``stream`` is leaving)
        once no delivery is in progress and what is pending is committed,
        unless a new link came meanwhile.
        """
        generation = stream.generation
        if peer_id not in self.ownership.owned():
            return
        if self.delivering(peer_id):
            stream.release_when_settled = True
            return

        def release(_: object) -> Deferred[bool] | None:
            current = self.streams.get(peer_id)
            if (
                current is not stream
                or stream.generation != generation
                or not stream.leaving
                or self._stopped
            ):
                # A new link came (or the stream was dropped and taken
                # again) meanwhile: the grant held now is not this one.
                return None
            if self.delivering(peer_id):
                stream.release_when_settled = True
                return None
            return self.ownership.release(peer_id)  # type: ignore[no-any-return]

        def released(result: object) -> object:
            self.released(peer_id)
            return result

        d = self.barrier()
        d.addCallback(release)
        d.addBoth(released)
        d.addErrback(
            lambda reason: log.info(
                "releasing the stream of {peer_id!r} failed: {reason} (its "
                "lease expires instead)",
                peer_id=peer_id,
                reason=reason.getErrorMessage(),
                ilm_event="stream_release_failed",
            )
        )

    def delivery_settled(self, peer_id: PeerId) -> None:
        """
        A delivery for ``peer_id`` ended: a release waiting for it goes on.
        """
        stream = self.streams.get(peer_id)
        if stream is not None and stream.release_when_settled and stream.leaving:
            if not self.delivering(peer_id):
                stream.release_when_settled = False
                self.release_when_done(peer_id, stream)
