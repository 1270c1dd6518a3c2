"""
Ownership of a node's streams when several gateway processes of one logical
node share one store: leases, epochs and fencing.

A *stream* here is everything a node keeps about one peer: the outbox to it
and the delivery marks of every incarnation of it.  Exactly one gateway at a
time may transmit and deliver for a stream: its *owner*.  Ownership is a
lease row per stream in the shared store, holding the owner's name, an
*epoch* (raised by one at every take-over) and an expiry in the store's
time.  Every write a gateway makes for a stream it owns (acknowledgement
deletions, delivery marks, retirements) checks, inside the same
transaction, that the stream's epoch is still the one it was granted; a
gateway deposed by a take-over therefore fails its next such write with
:class:`Fenced`, and writes nothing.  Appending new outbound messages is
open to every gateway: positions are assigned by the store under a row
lock, so they stay dense and ordered whoever appends.

No clock decides what may be written: the epoch does.  The expiry only
decides who may take a stream nobody is serving (a peer that is offline),
and, with the local deadline of :class:`StreamTaken`, keeps two gateways
from delivering for one stream at the same time (docs/scaling.md).

This module holds the contract (:class:`IStreamOwnership`), its value types
and its errors; :class:`ilm.backends.PostgresBackend` provides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import attr
from zope.interface import Attribute, Interface

from ilm._peerid import PeerId
from ilm._store import CommitResult, InboundRecord, OutboundRecord
from ilm.errors import StoreError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ilm._store import StoreBatch


# -- errors ---------------------------------------------------------------------


class Fenced(StoreError):
    """
    A write for one or more streams was refused because this gateway no
    longer owns them: another gateway took them over (their epoch moved on)
    or they were released.  Nothing of the failed operation was applied.

    What to do: drop each stream in :attr:`streams` at once (close its link,
    forget its in-memory state; it is now served elsewhere), then retry the
    rest of the batch without their entries.  A stream comes back only
    through a new :meth:`IStreamOwnership.acquire`.

    :ivar streams: per peer id, ``(epoch, owner)`` as the store holds them
        now (``owner`` is ``None`` for a released stream).
    """

    def __init__(self, streams: Mapping[PeerId, tuple[int, str | None]]) -> None:
        shown = ", ".join(
            f"{peer_id!r} (epoch {epoch}, owner {owner!r})"
            for peer_id, (epoch, owner) in list(streams.items())[:5]
        )
        more = f" and {len(streams) - 5} more" if len(streams) > 5 else ""
        super().__init__(
            f"fenced: this gateway no longer owns the stream(s) of {shown}{more}; "
            f"nothing was written"
        )
        self.streams = dict(streams)


class LeaseHeld(StoreError):
    """
    :meth:`IStreamOwnership.acquire` without ``take_over`` found the stream
    owned by another gateway whose lease has not expired.  Nothing changed.

    :ivar peer_id: the stream's peer.
    :ivar owner: the gateway holding it.
    :ivar epoch: its epoch.
    :ivar remaining: seconds of its lease left, in the store's time.
    """

    def __init__(self, peer_id: PeerId, owner: str, epoch: int, remaining: float):
        super().__init__(
            f"the stream of {peer_id!r} is owned by gateway {owner!r} "
            f"(epoch {epoch}) for {remaining:.3f} s more"
        )
        self.peer_id = peer_id
        self.owner = owner
        self.epoch = epoch
        self.remaining = remaining


# -- values -----------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StreamTaken:
    """
    What :meth:`IStreamOwnership.acquire` returns: the grant, and the
    durable state of the stream as of the take-over (read in the
    transaction that raised the epoch, so no write of a previous owner can
    land after it).

    - ``epoch``: this grant's epoch; every fenced write checks it.
    - ``previous_owner`` / ``previous_epoch``: who held the stream before
      (``None`` / 0 when nobody ever did).
    - ``deliver_after``: seconds to wait before delivering anything of this
      stream: what was left of another gateway's unexpired lease when this
      one took over (0 when the stream was free, expired, released, or
      already held by this very backend).  A deposed owner that is still
      running stops delivering when its own local deadline passes, which is
      before that lease expires; waiting this long keeps two gateways from
      delivering for one stream at the same time.  Transmitting, receiving
      and storing need no wait (fencing protects the store).
      :meth:`IStreamOwnership.holds` stays false until the wait is over
      (counted from when the answer arrived, so it can only err late).
    - ``valid_until``: the local deadline of this grant (on the backend's
      monotonic clock): the lease as this process may count on it, measured
      from before the request was sent, so never later than the expiry the
      store recorded (given clocks that run at the same rate).  Deliver only
      before it; :meth:`IStreamOwnership.renew` moves it on.
    - ``outbound``: the outbound stream's record (``None`` if no message or
      acknowledgement was ever stored for this peer).
    - ``inbound``: the delivery marks of every incarnation of the peer.
    """

    peer_id: PeerId
    epoch: int
    previous_owner: str | None
    previous_epoch: int
    deliver_after: float
    valid_until: float
    outbound: OutboundRecord | None
    inbound: tuple[InboundRecord, ...]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Renewal:
    """
    What :meth:`IStreamOwnership.renew` returns.

    - ``renewed``: the streams whose leases were extended; their local
      deadline is now ``valid_until``.
    - ``lost``: the streams this gateway held but no longer owns (taken over
      or released meanwhile): drop them, as for :class:`Fenced`.
    """

    renewed: frozenset[PeerId]
    lost: frozenset[PeerId]
    valid_until: float


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SharedCommitResult(CommitResult):
    """
    What :meth:`IStreamOwnership.commit_shared` returns: the bytes freed per
    peer (as :class:`ilm.CommitResult`) and, per peer that got new messages,
    ``(first, last)``: the positions the store gave them.
    """

    positions: dict[PeerId, tuple[int, int]] = attr.ib(factory=dict)


# -- the contract ------------------------------------------------------------------


class IStreamOwnership(Interface):
    """
    Leases and fencing for a store shared by several gateways of one node.

    Rules:

    - A gateway takes a stream with :meth:`acquire` when that peer's
      authenticated link arrives on it (``take_over=True``: whoever held it
      is deposed), or, for a peer that is offline, only when nobody's lease
      is live (``take_over=False``: :meth:`claimable` lists such streams).
    - Every write for a stream's bookkeeping (``acked``, ``delivered``,
      ``retired`` entries of a batch) checks the stream's epoch in the same
      transaction as the write: the epoch this backend was granted, or 0 for
      a stream it never acquired.  A stream nobody ever acquired has epoch
      0, so a single gateway that never calls :meth:`acquire` works as with
      any other backend.  A mismatch fails the whole commit with
      :class:`Fenced`, which lists every mismatched stream; nothing is
      written.
    - Appending messages (``messages`` entries) is open to every gateway
      and is not fenced.
    - Only the owner transmits and delivers; it delivers only while
      :meth:`holds` is true (after a take-over's ``deliver_after`` wait,
      before its local deadline).
    - Leases last :attr:`lease_duration` seconds of the store's time from
      the transaction that granted or renewed them; :meth:`renew` extends
      every lease this backend holds (call it every third of the duration).
    """

    gateway = Attribute("This gateway's name (``str``), recorded as owner.")
    lease_duration = Attribute("Seconds a lease lasts without renewal (``float``).")

    def acquire(peer_id: PeerId, take_over: bool = True) -> Deferred[StreamTaken]:
        """
        Take the stream of ``peer_id``: raise its epoch, record this gateway
        as owner until now + :attr:`lease_duration`, and read the stream's
        durable state in the same transaction.

        :param take_over: ``True`` (the peer's link arrived here): take it
            whoever holds it.  ``False``: only if no other gateway's lease
            is live, else fail with :class:`LeaseHeld`.
        :return: a ``Deferred`` firing with a :class:`StreamTaken`, or
            failing with :class:`LeaseHeld` or another
            :class:`ilm.errors.StoreError` (then this backend does not hold
            the stream, whatever the store says: its writes stay fenced).
        """

    def renew() -> Deferred[Renewal]:
        """
        Extend every lease this backend holds, in one transaction, each only
        if its epoch and owner are still this backend's.

        :return: a ``Deferred`` firing with a :class:`Renewal`.  On failure
            (a :class:`ilm.errors.StoreError`) nothing is known to be
            extended: the local deadlines stay where they were.
        """

    def release(peer_id: PeerId) -> Deferred[bool]:
        """
        Give up the stream of ``peer_id`` (its link is gone and nothing of
        it is being delivered): the lease ends now, so another gateway may
        take it at once without waiting; the epoch stays.  This backend's
        later writes for it are fenced.

        :return: a ``Deferred`` firing with whether this backend still held
            it (``False``: it had already lost it, or never held it).
        """

    def holds(peer_id: PeerId) -> bool:
        """
        :return: whether this backend holds the stream of ``peer_id``, its
            ``deliver_after`` wait is over and its local deadline has not
            passed: the condition for delivering.  (It may still have been
            deposed: the next fenced write says so.)
        """

    def delivery_window(peer_id: PeerId) -> tuple[float, float] | None:
        """
        :return: ``(deliver_from, valid_until)`` on the backend's monotonic
            clock: when :meth:`holds` turns true (after a take-over's
            ``deliver_after``) and when it turns false unless renewed; or
            ``None`` if this backend does not hold the stream.
        """

    def owned() -> frozenset[PeerId]:
        """
        :return: the streams this backend holds (deadline passed or not).
        """

    def claimable(
        limit: int = 1000, peers: Iterable[PeerId] = ()
    ) -> Deferred[list[PeerId]]:
        """
        :param peers: peers to list whenever their stream has no live
            lease, messages waiting or not (the peers a gateway dials,
            whose link is kept up even when idle).  Only streams the store
            has rows for are listed (any ``acquire`` or message makes
            them).
        :return: a ``Deferred`` firing with up to ``limit`` peers whose
            stream has no live lease (never owned, released, or expired)
            and messages waiting (or is among ``peers``): the peers some
            gateway should take (with ``acquire(peer_id,
            take_over=False)``) and dial.
        """

    def commit_shared(batch: StoreBatch) -> Deferred[SharedCommitResult]:
        """
        Apply ``batch`` as :meth:`ilm.interfaces.IBackend.commit` does, with
        one difference: the first position of each ``messages`` entry is not
        checked; the messages are appended at the end of the peer's outbox as
        the store holds it when this transaction locks it (other gateways
        may have appended since this one last looked), and the result says
        where they went.  Bookkeeping entries are fenced as above.
        """

    def outbound_state(peer_id: PeerId) -> Deferred[OutboundRecord | None]:
        """
        :return: a ``Deferred`` firing with the outbound record of
            ``peer_id`` as now committed (not fenced: any gateway may look),
            or ``None`` if there is none.  What an owner polls to learn of
            messages other gateways appended.
        """

    def watch(callback: Callable[[PeerId], None]) -> Deferred[None]:
        """
        Ask the store to call ``callback(peer_id)`` (in the reactor thread)
        soon after another gateway appends messages for a stream this
        gateway owns.  A hint only, to cut the polling delay: hints may be
        lost (a lost connection), so the owner still polls.

        :return: a ``Deferred`` that fires once listening.
        """


__all__ = [
    "Fenced",
    "IStreamOwnership",
    "LeaseHeld",
    "Renewal",
    "SharedCommitResult",
    "StreamTaken",
]
