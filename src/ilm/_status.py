"""
Public snapshots of a node's state: what an operator, a status API, a
metrics exporter, the simulator and the tests read instead of private state.

Every record here is a frozen value built on demand (``ILM.peer_status()``,
``ILM.stats()``, ``StreamNetwork.stats()``): reading one never changes the
node, and holding one never pins the node's memory.  Times are the node
clock's seconds (``IReactorTime.seconds()``: wall-clock time under a real
reactor); ages are seconds.  Counters count from the node's start: they
are not persisted, as Prometheus counters are not.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from types import MappingProxyType

from attrs import field, frozen

from ilm._peerid import PeerId

__all__ = [
    "LINK_CONNECTING",
    "LINK_DOWN",
    "LINK_UP",
    "Histogram",
    "NetworkStats",
    "NodeStats",
    "PeerStatus",
]

#: The link to the peer carries traffic (the session handshake is done).
LINK_UP = "up"
#: A transport link exists, the session handshake (hello) is not done yet.
LINK_CONNECTING = "connecting"
#: No link.
LINK_DOWN = "down"


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    """
    A read-only copy of a reason-to-count mapping.
    """
    return MappingProxyType(dict(counts))


@frozen
class Histogram:
    """
    A cumulative histogram, in the shape Prometheus exposes.

    :ivar buckets: ``(upper_bound, cumulative_count)`` pairs in increasing
        bound order; the last bound is ``float("inf")`` and its count equals
        :attr:`count`.
    :ivar sum: the sum of every observed value.
    :ivar count: how many values were observed.
    """

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


@frozen
class PeerStatus:
    """
    One peer as this node sees it, at one instant.

    :ivar peer_id: the peer.
    :ivar link: :data:`LINK_UP`, :data:`LINK_CONNECTING` or :data:`LINK_DOWN`.
    :ivar link_since: when :attr:`link` last changed (``None``: never, the
        link has been down since the node started).
    :ivar last_link_error: why the last attempt to reach the peer or the last
        link failed, in one line (``None``: no failure recorded).
    :ivar pending: messages to the peer stored and not yet acknowledged.
    :ivar pending_bytes: their contents' total size.
    :ivar oldest_pending_age: seconds since the oldest pending message was
        accepted by ``send_to`` in this process (``None``: nothing pending;
        for messages left from before a restart: since the restart).
    :ivar in_flight: pending messages sent on the current link.
    :ivar last_message_id: the id of the last message accepted for the peer
        (``0``: none yet).
    :ivar last_acknowledged: the highest message id the peer acknowledged as
        durably received (``0``: none).
    :ivar sent: messages accepted for the peer since start.
    :ivar acknowledged: messages the peer acknowledged since start.
    :ivar retransmitted: messages sent again since start.
    :ivar delivered: messages from the peer delivered to the local
        application since start.
    :ivar last_delivered: the message id of the last message from the peer's
        current incarnation delivered locally (``0``: none).
    :ivar delivery_held: whether delivery of the peer's messages is held
        behind a failed delivery.
    :ivar delivery_held_reason: the failure holding it, in one line.
    :ivar delivery_held_since: when the hold began.
    :ivar delivery_retries: failed delivery attempts of the message at the
        head of the hold (``0`` when not held).
    :ivar peer_incarnation: the peer's current incarnation as last seen in a
        hello (``None``: never seen).
    :ivar incarnations: the peer's incarnations this node still holds state
        for (received, not yet all delivered or retired).
    :ivar link_incarnation: the peer's incarnation on the current link, once
        its handshake is done (``None``: no link up).
    :ivar cached: messages to the peer held in memory (sent and not
        acknowledged, or read from the store to be sent): at most twice the
        window.
    :ivar cached_bytes: their contents' total size.
    :ivar queued: per incarnation of the peer this node holds a stream for,
        oldest first, the messages received and not yet delivered.
    :ivar queued_bytes: the total size of those messages, across all the
        peer's incarnations: at most ``window_bytes`` plus one frame.
    """

    peer_id: PeerId
    link: str
    link_since: float | None
    last_link_error: str | None
    pending: int
    pending_bytes: int
    oldest_pending_age: float | None
    in_flight: int
    last_message_id: int
    last_acknowledged: int
    sent: int
    acknowledged: int
    retransmitted: int
    delivered: int
    last_delivered: int
    delivery_held: bool
    delivery_held_reason: str | None
    delivery_held_since: float | None
    delivery_retries: int
    peer_incarnation: str | None
    incarnations: int
    link_incarnation: str | None = None
    cached: int = 0
    cached_bytes: int = 0
    queued: tuple[int, ...] = ()
    queued_bytes: int = 0


@frozen
class NodeStats:
    """
    A node's counters and histograms since it started.

    :ivar started_at: when the node started (``None``: not started).
    :ivar state: the lifecycle state (``ILM.state``).
    :ivar sent: messages accepted by ``send_to``/``send_raw_message``.
    :ivar stored: messages made durable in the store.
    :ivar delivered: messages delivered to the local application.
    :ivar acknowledged: sent messages acknowledged by their peers.
    :ivar retransmitted: messages sent again (resume, NACK, timeout).
    :ivar refused: refused sends by reason (the ``SendRefused`` subclass's
        ``reason`` attribute, e.g. ``"outbox_full"``).
    :ivar delivery_failures: failed local delivery attempts.
    :ivar link_ups: links that completed the session handshake.
    :ivar link_downs: links lost after completing it.
    :ivar commits: store commits that succeeded.
    :ivar commit_failures: store commits that failed.
    :ivar commit_seconds: commit latency.
    :ivar commit_batch: messages plus bookkeeping entries per commit.
    :ivar delivery_seconds: from arrival to settled local delivery.
    :ivar store_in_doubt: whether the store refuses commits after a failure
        that may have half-written (``StoreInDoubt``).
    """

    started_at: float | None
    state: str
    sent: int
    stored: int
    delivered: int
    acknowledged: int
    retransmitted: int
    refused: Mapping[str, int] = field(converter=_frozen_counts)
    delivery_failures: int = 0
    link_ups: int = 0
    link_downs: int = 0
    commits: int = 0
    commit_failures: int = 0
    commit_seconds: Histogram | None = None
    commit_batch: Histogram | None = None
    delivery_seconds: Histogram | None = None
    store_in_doubt: bool = False


@frozen
class NetworkStats:
    """
    A stream network's counters since it started listening.

    :ivar connections: transport connections open now (authenticated or not).
    :ivar links: authenticated links up now.
    :ivar links_established: links authenticated since start.
    :ivar links_lost: links lost since start.
    :ivar refusals: connections or links refused, by reason (the same reason
        names as the ``link_refused`` log event).
    :ivar dial_failures: failed dials, by reason (``DialFailure.reason``).
    """

    connections: int
    links: int
    links_established: int
    links_lost: int
    refusals: Mapping[str, int] = field(converter=_frozen_counts)
    dial_failures: Mapping[str, int] = field(converter=_frozen_counts)


#: Commit latency bounds, in seconds.
COMMIT_SECONDS_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Entries per commit: powers of two up to 4096.
COMMIT_BATCH_BOUNDS = tuple(float(2**i) for i in range(13))
#: From arrival to settled delivery, in seconds (a held delivery waits long).
DELIVERY_SECONDS_BOUNDS = (*COMMIT_SECONDS_BOUNDS, 30.0, 60.0, 300.0)


class HistogramCounter:
    """
    What a :class:`Histogram` is built from: one count per bucket, kept
    plain so that an observation costs a bisection and two additions.
    """

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """
        Count ``value`` ``times`` times.
        """
        self._counts[bisect_left(self._bounds, value)] += times
        self.sum += value * times
        self.count += times

    def snapshot(self) -> Histogram:
        """
        :return: the cumulative :class:`Histogram` of what was observed.
        """
        buckets = []
        total = 0
        for bound, count in zip((*self._bounds, math.inf), self._counts, strict=True):
            total += count
            buckets.append((bound, total))
        return Histogram(tuple(buckets), self.sum, self.count)
