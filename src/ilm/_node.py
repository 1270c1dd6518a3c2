"""
What the pieces of one ILM node share: :class:`NodeCore`, and one peer's
objects: :class:`Peer`.

The core is to the node what ClientService's ``_Core`` is to its machine:
the collaborators (config, clock, store, network, group committer), the
peers by id, the event limiter every piece logs through, and the two
"wait until" events of a stop (every outbox drained, every delivery
settled).  It is the :class:`ilm._deliverer.DeliveryHost` and the
:class:`ilm._sender.SenderHost` of every peer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ilm._acks import AckPacer
from ilm._config import Config
from ilm._deliverer import PeerDeliverer
from ilm._logging import EventLimiter
from ilm._nodelog import log
from ilm._observer import OneShotObserver
from ilm._peer import PeerSession
from ilm._peerid import PeerId
from ilm._sender import PeerSender
from ilm._session import OutboundStream
from ilm.interfaces import IBackend, INetwork

__all__ = ["NodeCore", "Peer"]


def _optional(network: INetwork, name: str) -> Callable[..., Any] | None:
    method = getattr(network, name, None)
    return method if callable(method) else None


class Peer(PeerSession):
    """
    One peer: its pure :class:`PeerSession`, its sender, deliverer and
    ACK pacer, and what the link routing keeps about it (the handshake
    timer, when the link last changed and why it went).
    """

    __slots__ = (
        "acks",
        "deliverer",
        "handshake_call",
        "link_since",
        "lost_reason",
        "sender",
    )

    def __init__(self, peer_id: PeerId, out: OutboundStream, config: Config) -> None:
        super().__init__(peer_id, out, config)
        self.handshake_call: IDelayedCall | None = None
        self.link_since: float | None = None
        self.lost_reason: str | None = None
        # Set by whoever builds the peer, right after.
        self.sender: PeerSender = None  # type: ignore[assignment]
        self.deliverer: PeerDeliverer = None  # type: ignore[assignment]
        self.acks: AckPacer = None  # type: ignore[assignment]

    def cancel_handshake(self) -> None:
        call, self.handshake_call = self.handshake_call, None
        if call is not None and call.active():
            call.cancel()

    def cancel_timers(self) -> None:
        self.cancel_handshake()
        self.sender.cancel_timers()
        self.deliverer.cancel_timers()
        self.acks.cancel()


class NodeCore:
    """
    The state and collaborators every piece of one node shares.
    """

    def __init__(
        self,
        local_id: PeerId,
        config: Config,
        clock: IReactorTime,
        backend: IBackend,
        network: INetwork,
    ) -> None:
        self.local_id = local_id
        self.config = config
        self.clock = clock
        self.backend = backend
        self.network = network
        self.incarnation = ""
        self.peers: dict[PeerId, Peer] = {}
        # The network's optional methods (see INetwork's notes).
        self._dialled_peers = _optional(network, "dialled_peers")
        self._can_link = _optional(network, "can_link")
        self._link_error = _optional(network, "link_error")
        #: How the node ended ("stopped", "failed"): receipts no longer wait.
        self.ended: str | None = None
        #: Whether a new delivery may start (not once the node stops).
        self.deliveries_allowed = True
        #: Fired once no peer has a message awaiting acknowledgement.
        self.drained: OneShotObserver[None] = OneShotObserver()
        #: Fired once no delivery is in progress.
        self.settled: OneShotObserver[None] = OneShotObserver()
        # Events a peer, a failing store or a failing delivery target can make
        # repeat: the first of each kind in full, then summaries.
        self.limiter: EventLimiter | None = EventLimiter(log, clock)
        # What stats() reports: counters since the start, kept plain.
        self.refused: dict[str, int] = {}
        self.link_ups = 0
        self.link_downs = 0

    # -- logging and timers ----------------------------------------------------

    def limited(
        self,
        key: tuple[object, ...],
        level: LogLevel,
        format: str,
        failure: Failure | None = None,
        **fields: Any,
    ) -> None:
        """
        Log an event that someone else can make repeat (a peer, the store,
        the delivery target) through the node's :class:`EventLimiter`: the
        first of each ``key`` in full, then a summary per minute.
        """
        limiter = self.limiter
        if limiter is None:
            if failure is not None:
                fields["log_failure"] = failure
            log.emit(level, format, **fields)
        else:
            limiter.emit(key, level, format, failure=failure, **fields)

    def stop_limiter(self) -> None:
        limiter, self.limiter = self.limiter, None
        if limiter is not None:
            limiter.stop()

    def guard(self, function: Callable[..., object], *args: object) -> None:
        """
        Run ``function``; log anything it raises instead of letting it reach
        the reactor or the network.
        """
        try:
            function(*args)
        except Exception:
            name = str(getattr(function, "__name__", function))
            self.limited(
                ("internal_error", name),
                LogLevel.critical,
                "internal error in {function}",
                Failure(),
                function=name,
                ilm_event="internal_error",
            )

    def later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        """Call ``function`` after ``delay`` seconds, logging what it raises."""
        return self.clock.callLater(delay, self.guard, function, *args)

    def unexpected(self, reason: Failure, doing: str) -> None:
        log.failure(
            "internal error while {doing}",
            reason,
            doing=doing,
            ilm_event="internal_error",
        )

    # -- what the network can tell ------------------------------------------------

    def dialled_peers(self) -> frozenset[PeerId] | None:
        """
        The peers the network dials, if it can tell (its optional
        ``dialled_peers``).
        """
        dialled = self._dialled_peers
        if dialled is None:
            return None
        try:
            return frozenset(dialled())
        except Exception:
            return None

    def linkable(self, peer_id: PeerId) -> bool:
        """
        Whether the network could ever link to ``peer_id`` (its optional
        ``can_link``; a network without it can link to anyone).
        """
        can_link = self._can_link
        if can_link is None:
            return True
        try:
            return bool(can_link(peer_id))
        except Exception:
            self.limited(
                ("internal_error", "can_link"),
                LogLevel.critical,
                "the network's can_link({peer_id!r}) raised; accepting the send",
                Failure(),
                peer_id=peer_id,
                ilm_event="internal_error",
            )
            return True

    def link_error(self, peer_id: PeerId) -> str | None:
        """
        Why the network last failed to reach ``peer_id``, if it says (its
        optional ``link_error``).
        """
        link_error = self._link_error
        if link_error is None:
            return None
        try:
            failure = link_error(peer_id)
        except Exception:
            return None
        return None if failure is None else str(failure)

    # -- the events a stop waits for -------------------------------------------

    def is_drained(self) -> bool:
        return all(peer.sender.outbox_count == 0 for peer in self.peers.values())

    def check_drained(self) -> None:
        if self.drained and self.is_drained():
            drained, self.drained = self.drained, OneShotObserver()
            drained.fire(None)

    def delivering(self) -> bool:
        return any(peer.deliverer.delivering for peer in self.peers.values())

    def delivery_settled(self) -> None:
        if self.settled and not self.delivering():
            settled, self.settled = self.settled, OneShotObserver()
            settled.fire(None)

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
