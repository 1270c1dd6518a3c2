"""
ILM: the service that joins a backend, a delivery target and a network.

The protocol rules live in :mod:`ilm._session` and the frame formats in
:mod:`ilm._frames`; this module drives them: it batches stores into group
commits, transmits what the window allows, delivers in order, and runs the
timers (retransmission, handshake retry, delivery backoff, store backoff).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, overload

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import _frames
from ilm._backoff import Backoff, Retry
from ilm._committer import GroupCommitter, Send
from ilm._config import Config
from ilm._deliverer import PeerDeliverer, one_line
from ilm._delivery import as_delivery
from ilm._logging import EventLimiter
from ilm._ownership_guard import GatedHost, OwnershipGuard
from ilm._peer import CLOSING, DOWN, HELLO_SENT, READY, PeerSession
from ilm._peerid import MAX_INT_ID, PeerId, check_peer_id
from ilm._session import (
    Hello,
    InboundStream,
    OutboundStream,
)
from ilm._status import (
    DELIVERY_SECONDS_BOUNDS,
    LINK_CONNECTING,
    LINK_DOWN,
    LINK_UP,
    HistogramCounter,
    NodeStats,
    PeerStatus,
)
from ilm._store import (
    CommitResult,
    InboundRecord,
    OutboundRecord,
    StoreBatch,
    StoredState,
)
from ilm.errors import (
    FrameTooLarge,
    ILMError,
    InvalidPeerId,
    MalformedFrame,
    MessageTooLarge,
    NotRunning,
    OutboxFull,
    ProtocolViolation,
    SendRefused,
    SendToSelf,
    ShutdownTimeout,
    StoppedBeforeAcknowledged,
    StoreError,
    UnknownPeer,
    WrongSource,
)
from ilm.interfaces import IBackend, IFrameReceiver, IMessage, INetwork

log = Logger(namespace="ilm")

# Messenger states.
_NEW = "new"
_STARTING = "starting"
_RUNNING = "running"
_STOPPING = "stopping"
_STOPPED = "stopped"
_FAILED = "failed"

_FRAME_TARGET = 256 * 1024
_PEERS_SHOWN = 20


class Receipt:
    """
    Proof that ``send_to`` stored a message: from now on ILM owns it.

    ``peer_id`` and ``message_id`` identify the message; ``acknowledged`` is
    a new ``Deferred`` (each time it is read) that fires with this receipt
    once the peer has durably received the message, or fails with
    :class:`ilm.errors.StoppedBeforeAcknowledged` if this node stops first
    (the message stays stored and is sent after the next start).
    """

    __slots__ = ("_ilm", "message_id", "peer_id")

    def __init__(self, ilm: ILM, peer_id: PeerId, message_id: int) -> None:
        self._ilm = ilm
        self.peer_id = peer_id
        self.message_id = message_id

    @property
    def acknowledged(self) -> Deferred[Receipt]:
        return self._ilm._when_acknowledged(self)

    def __repr__(self) -> str:
        return f"Receipt(peer_id={self.peer_id!r}, message_id={self.message_id})"


def _forget_accept_time(peer: _Peer, last: int) -> None:
    """
    The messages up to ``last`` of a commit that failed were not stored:
    their acceptance time goes.
    """
    times = peer.accept_times
    if times and times[-1][0] == last:
        times.pop()


def _ahead_of_stream(peer: _Peer, incarnation: str, position: int) -> bool:
    """
    Whether a durable mark is beyond what ``peer``'s stream of
    ``incarnation`` received: a mark of deliveries made before the peer
    restarted from a shared store (a take-over), which this state has not
    seen again yet; acknowledging it would be an ACK beyond what it holds.
    """
    return any(
        stream.incarnation == incarnation and position > stream.received
        for stream in peer.inbound
    )


class _Abandoned(Exception):
    """
    Unwinds a shutdown in progress when the node is abandoned (crashed).
    """


class _Peer(PeerSession):
    """
    One peer: its pure :class:`PeerSession`, plus what the messenger's I/O
    keeps about it (the outbox waiting for a commit, timers, counters).
    """

    __slots__ = (
        "accept_times",
        "accepted_at",
        "acked_total",
        "deliverer",
        "handshake_call",
        "link_since",
        "lost_reason",
        "outbox_bytes",
        "outbox_count",
        "pending",
        "pending_deferreds",
        "read_call",
        "read_retry",
        "retransmit_call",
        "retransmit_retry",
        "retransmitted",
        "sent_high",
        "sent_total",
        "waiters",
    )

    def __init__(self, peer_id: PeerId, out: OutboundStream, config: Config) -> None:
        super().__init__(peer_id, out, config)
        self.pending: list[bytes] = []
        self.pending_deferreds: list[Deferred[Receipt]] = []
        self.outbox_count = out.stored - out.acked
        self.outbox_bytes = 0
        self.waiters: list[tuple[int, int, Deferred[Receipt], Receipt]] = []
        self.retransmit_call: IDelayedCall | None = None
        self.retransmit_retry = Retry(
            Backoff(
                initial=config.retransmit_timeout,
                maximum=max(config.retransmit_timeout, config.max_retransmit_timeout),
                jitter=0.0,
            )
        )
        self.handshake_call: IDelayedCall | None = None
        self.read_call: IDelayedCall | None = None
        self.read_retry = Retry(
            Backoff(
                initial=config.store_retry,
                maximum=max(config.store_retry, config.max_store_retry),
                jitter=0.0,
            )
        )
        # What peer_status() reports.  Counters since the node started.
        self.link_since: float | None = None
        self.lost_reason: str | None = None
        self.sent_total = 0
        self.acked_total = 0
        self.retransmitted = 0
        # The highest position transmitted since start: a chunk below it
        # is a retransmission.
        self.sent_high = out.acked
        # When the first message of ``pending`` was accepted; per commit,
        # (last position stored, when its first message was accepted).
        self.accepted_at = 0.0
        self.accept_times: deque[tuple[int, float]] = deque()
        # Set by the node once it is built.
        self.deliverer: PeerDeliverer = None  # type: ignore[assignment]

    def take_pending(self) -> tuple[int, list[bytes], list[Deferred[Receipt]]]:
        """
        The messages accepted since the last commit, for the next one.
        """
        first = self.out.stored + 1
        contents, deferreds = self.pending, self.pending_deferreds
        self.pending = []
        self.pending_deferreds = []
        self.sent_total += len(contents)
        self.accept_times.append((first + len(contents) - 1, self.accepted_at))
        return first, contents, deferreds

    def cancel_timers(self) -> None:
        for name in ("retransmit_call", "handshake_call", "read_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self.deliverer.cancel_timers()


@implementer(IFrameReceiver)
class _LinkEvents:
    """
    The :class:`IFrameReceiver` ILM hands to its network; keeps those
    methods off ILM's public surface.
    """

    __slots__ = ("_ilm",)

    def __init__(self, ilm: ILM) -> None:
        self._ilm = ilm

    def link_established(self, peer_id: object) -> None:
        self._ilm._guard(self._ilm._link_established, peer_id)

    def link_lost(self, peer_id: object, reason: object) -> None:
        self._ilm._guard(self._ilm._network_link_lost, peer_id, reason)

    def frame_received(self, peer_id: object, frame: bytes) -> None:
        self._ilm._frame_received(peer_id, frame)

    def link_paused(self, peer_id: object) -> None:
        self._ilm._guard(self._ilm._link_paused, peer_id)

    def link_resumed(self, peer_id: object) -> None:
        self._ilm._guard(self._ilm._link_resumed, peer_id)


class _Host:
    """
    The :class:`DeliveryHost` ILM hands to its deliverers; keeps those
    methods off ILM's public surface.
    """

    __slots__ = ("_ilm",)

    def __init__(self, ilm: ILM) -> None:
        self._ilm = ilm

    @property
    def deliveries_allowed(self) -> bool:
        return self._ilm._deliveries_allowed

    def delivery_settled(self) -> None:
        self._ilm._notify_settled()

    def limited(
        self,
        key: tuple[object, ...],
        level: LogLevel,
        format: str,
        failure: Failure | None = None,
        **fields: Any,
    ) -> None:
        self._ilm._limited(key, level, format, failure, **fields)

    def guard(self, function: Callable[..., object], *args: object) -> None:
        self._ilm._guard(function, *args)

    def unexpected(self, reason: Failure, doing: str) -> None:
        self._ilm._unexpected(reason, doing)


class ILM(Service):
    """
    An ILM node: stores every message handed to :meth:`send_to` until the
    peer has durably received it, and delivers what peers send exactly once
    and in order.

    Also a Twisted ``IService``: nest it in a ``MultiService``;
    ``startService`` opens the backend and starts the network,
    ``stopService`` is :meth:`shutdown` with the configured timeout.

    :param backend: an :class:`ilm.interfaces.IBackend`, or the path
        (``str`` or ``os.PathLike``) of an SQLite store, which means
        ``SQLiteBackend(path)``: the durable default.
    :param delivery: an :class:`ilm.interfaces.ILocalDelivery`, a
        ``DeferredQueue`` or a callable taking one message.
    :param network: an :class:`ilm.interfaces.INetwork`.
    :param config: limits and timings; :class:`ilm.Config` defaults if
        omitted.
    :param clock: the ``IReactorTime`` for timers; the global reactor if
        omitted.
    """

    def __init__(
        self,
        backend: IBackend | str | os.PathLike[str],
        delivery: object,
        network: INetwork,
        *,
        config: Config | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if isinstance(backend, str | os.PathLike):
            from ilm.backends._sqlite import SQLiteBackend

            threads = clock if IReactorThreads.providedBy(clock) else None
            backend = SQLiteBackend(backend, reactor=threads)
        if not IBackend.providedBy(backend):
            raise TypeError(
                f"backend must provide IBackend, not {type(backend).__name__}"
            )
        if not INetwork.providedBy(network):
            raise TypeError(
                f"network must provide INetwork, not {type(network).__name__}"
            )
        if config is None:
            config = Config()
        elif not isinstance(config, Config):
            raise TypeError(
                f"config must be an ilm.Config, not {type(config).__name__}"
            )
        limit = getattr(network, "max_frame_size", None)
        if isinstance(limit, int) and config.max_frame_size > limit:
            raise ValueError(
                f"Config.max_frame_size ({config.max_frame_size}) exceeds what the "
                f"network carries ({limit}): raise the network's limit or lower "
                f"max_frame_size and max_message_size"
            )
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self._backend = backend
        self._delivery = as_delivery(delivery)
        self._network = network
        self._config = config
        self._clock: IReactorTime = clock  # type: ignore[assignment]
        self._local_id: PeerId = check_peer_id(network.local_id)
        can_link = getattr(network, "can_link", None)
        self._can_link: Callable[[PeerId], object] | None = (
            can_link if callable(can_link) else None
        )
        self._incarnation = ""
        self._peers: dict[PeerId, _Peer] = {}
        self._state = _NEW
        self._start_waiters: list[Deferred[None]] = []
        self._start_failure: Failure | None = None
        self._early: list[tuple[PeerId, bytes, Deferred[Receipt]]] = []
        self._committer = GroupCommitter(
            backend,
            self._clock,
            Backoff(
                initial=config.store_retry,
                maximum=max(config.store_retry, config.max_store_retry),
                jitter=0.0,
            ),
            later=self._later,
            may_commit=lambda: self._state in (_RUNNING, _STOPPING),
            drop_unstorable=self._drop_unstorable,
            committed=self._committed,
            failed=self._commit_failed,
            settled=self._check_drained,
            unexpected=self._unexpected,
            shared=OwnershipGuard.shares(backend),
        )
        self._drain_waiters: list[Deferred[None]] = []
        self._next_commit_waiters: list[Deferred[None]] = []
        self._settled_waiters: list[Deferred[None]] = []
        self._deliveries_allowed = True
        self._host = _Host(self)
        # Several gateways of one node sharing the store: who may deliver
        # for which peer (ilm._ownership_guard); None for any other store.
        self._ownership = OwnershipGuard.for_backend(
            backend,
            clock=self._clock,
            proceed=self._link_taken,
            restart=self._restart_peer,
            replay=self._frame_received,
            drop=self._drop_stream,
            wake=lambda peer_id: self._guard(self._wake_peer, peer_id),
            barrier=self._committer.barrier,
            linked=lambda peer_id: peer_id in self._network.connected_peers(),
            delivering=lambda peer_id: (
                peer_id in self._peers and self._peers[peer_id].deliverer.delivering
            ),
            waiting=lambda: [
                p
                for p, peer in self._peers.items()
                if peer.link != READY and (peer.waiters or peer.outbox_count)
            ],
            caught_up=lambda peer_id, record: self._guard(
                self._store_caught_up, peer_id, record
            ),
        )
        self._delivery_backoff = Backoff(
            initial=config.delivery_retry,
            maximum=max(config.delivery_retry, config.max_delivery_retry),
            jitter=0.0,
        )
        self._shutdown_waiters: list[Deferred[None]] | None = None
        self._shutdown_result: Failure | None = None
        self._events = _LinkEvents(self)
        self._backend_open = False
        self._abandoned = False
        self._start_abandoned = False
        self._accepting = False
        self._max_message_size = config.max_message_size
        self._max_outbox_messages = config.max_outbox_messages
        self._max_outbox_bytes = config.max_outbox_bytes
        self._frame_target = min(config.max_frame_size, _FRAME_TARGET)
        self._waiter_order = itertools.count()
        # Events a peer, a failing store or a failing delivery target can make
        # repeat: the first of each kind in full, then summaries.
        self._limiter: EventLimiter | None = EventLimiter(log, self._clock)
        link_error = getattr(network, "link_error", None)
        self._link_error: Callable[[PeerId], object] | None = (
            link_error if callable(link_error) else None
        )
        # What stats() reports: counters since the start, kept plain.
        self._started_at: float | None = None
        self._refused: dict[str, int] = {}
        self._link_ups = 0
        self._link_downs = 0
        self._delivery_seconds = HistogramCounter(DELIVERY_SECONDS_BOUNDS)

    # -- construction and service ----------------------------------------------

    @classmethod
    def create(
        cls,
        backend: IBackend | str | os.PathLike[str],
        delivery: object,
        network: INetwork,
        *,
        config: Config | None = None,
        clock: IReactorTime | None = None,
    ) -> Deferred[ILM]:
        """
        Create an ILM node, load its state from ``backend`` (an
        :class:`ilm.interfaces.IBackend`, or the path of an SQLite store) and
        start it.

        :return: a ``Deferred`` firing with the running :class:`ILM`, or
            failing with the backend's or network's error.
        """
        try:
            ilm = cls(backend, delivery, network, config=config, clock=clock)
        except Exception:
            return fail()
        started = ilm.when_started()
        ilm.startService()
        return started.addCallback(lambda _: ilm)

    def when_started(self) -> Deferred[None]:
        """
        :return: a ``Deferred`` firing once the node is running (its backend
            opened and its network started), or failing with the reason it
            could not start.
        """
        if (
            self._state in (_RUNNING, _STOPPING, _STOPPED)
            and self._start_failure is None
        ):
            return succeed(None)
        if self._start_failure is not None:
            return fail(self._start_failure)
        d: Deferred[None] = Deferred()
        self._start_waiters.append(d)
        return d

    def startService(self) -> None:
        if self._state in (_STOPPED, _FAILED):
            raise NotRunning(
                f"ILM node {self._local_id!r} has {self._state}; a node cannot be "
                f"started again: create a new one"
            )
        if self._state != _NEW:
            return
        Service.startService(self)
        self._state = _STARTING
        d = maybeDeferred(self._backend.open)
        d.addCallback(self._opened)
        d.addCallbacks(self._started, self._start_failed)
        d.addErrback(self._unexpected, "starting")

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.shutdown()

    @property
    def local_id(self) -> PeerId:
        """This node's id (from its network)."""
        return self._local_id

    @property
    def state(self) -> str:
        """
        Where the node is in its life: ``"new"``, ``"starting"``,
        ``"running"``, ``"stopping"``, ``"stopped"`` or ``"failed"``.
        """
        return self._state

    @property
    def incarnation(self) -> str:
        """This node's store incarnation (empty until started)."""
        return self._incarnation

    @property
    def config(self) -> Config:
        """The limits and timings in force."""
        return self._config

    def connected_peers(self) -> frozenset[PeerId]:
        """
        :return: the ids of peers with a link up whose handshake is complete.
        """
        return frozenset(pid for pid, peer in self._peers.items() if peer.link == READY)

    def pending_outbound(self) -> dict[PeerId, int]:
        """
        :return: per peer, how many accepted messages await its
            acknowledgement (peers with none are omitted).
        """
        return {
            pid: peer.outbox_count
            for pid, peer in self._peers.items()
            if peer.outbox_count
        }

    def last_message_id(self, peer_id: PeerId) -> int:
        """
        :return: the highest ``message_id`` stored for ``peer_id`` by this
            store's incarnation (0 if none): the receipts of every message
            up to it have fired, also before a restart.  A sender that
            restarts continues after it without repeating or skipping
            anything it handed over (see ``docs/guide.md``).
        """
        peer = self._peers.get(check_peer_id(peer_id))
        return 0 if peer is None else peer.out.stored

    def receipt(self, peer_id: PeerId, message_id: int) -> Receipt:
        """
        The :class:`Receipt` of a message already stored, for example one
        sent before a restart, whose ``acknowledged`` can be awaited.

        :raises ValueError: if ``message_id`` was never stored for the peer.
        """
        peer_id = check_peer_id(peer_id)
        if not 1 <= message_id <= self.last_message_id(peer_id):
            raise ValueError(
                f"message {message_id} to {peer_id!r} was never stored by this "
                f"node (its last is {self.last_message_id(peer_id)})"
            )
        return Receipt(self, peer_id, message_id)

    @overload
    def peer_status(self) -> Mapping[PeerId, PeerStatus]: ...

    @overload
    def peer_status(self, peer_id: PeerId) -> PeerStatus: ...

    def peer_status(
        self, peer_id: PeerId | None = None
    ) -> Mapping[PeerId, PeerStatus] | PeerStatus:
        """
        What this node knows of its peers, now.

        :param peer_id: one peer, or ``None`` for every peer the node knows:
            those its network dials and those it holds stored or live state
            for.
        :return: a :class:`ilm.PeerStatus`, or a mapping of them by peer id.
        :raises InvalidPeerId: if ``peer_id`` is not a valid peer id.
        :raises UnknownPeer: if the node knows nothing of ``peer_id`` and its
            network can never link to it (or it is this node's own id).
        """
        now = self._clock.seconds()
        if peer_id is None:
            known = set(self._peers)
            known.update(self._dialled_peers() or ())
            known.discard(self._local_id)
            return {
                pid: self._status_of(pid, now)
                for pid in sorted(known, key=lambda p: (type(p) is str, p))
            }
        try:
            pid = check_peer_id(peer_id)
        except TypeError as error:
            raise InvalidPeerId(str(error)) from error
        if pid not in self._peers and (
            pid == self._local_id
            or (pid not in (self._dialled_peers() or ()) and not self._linkable(pid))
        ):
            raise UnknownPeer(f"this node knows nothing of peer {pid!r}")
        return self._status_of(pid, now)

    def _status_of(self, peer_id: PeerId, now: float) -> PeerStatus:
        """
        One peer's :class:`PeerStatus` (a blank one for a peer with no state).
        """
        error = None
        if self._link_error is not None:
            try:
                failure = self._link_error(peer_id)
            except Exception:
                failure = None
            if failure is not None:
                error = str(failure)
        peer = self._peers.get(peer_id)
        if peer is None:
            return PeerStatus(
                peer_id=peer_id,
                link=LINK_DOWN,
                link_since=None,
                last_link_error=error,
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
        unstored = sum(map(len, peer.pending))
        for holder, _first, contents, _deferreds in self._committer.in_commit:
            if holder is peer:
                unstored += sum(map(len, contents))
        stream = peer.current_stream()
        link = peer.link
        deliverer = peer.deliverer
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
            last_link_error=error if error is not None else peer.lost_reason,
            pending=out.stored - out.acked,
            pending_bytes=max(0, peer.outbox_bytes - unstored),
            oldest_pending_age=(
                now - peer.accept_times[0][1] if peer.accept_times else None
            ),
            in_flight=out.sent - out.acked if link == READY else 0,
            last_message_id=out.stored,
            last_acknowledged=out.acked,
            sent=peer.sent_total + len(peer.pending),
            acknowledged=peer.acked_total,
            retransmitted=peer.retransmitted,
            delivered=deliverer.delivered,
            last_delivered=stream.delivered if stream is not None else 0,
            delivery_held=deliverer.held,
            delivery_held_reason=deliverer.held_reason,
            delivery_held_since=deliverer.held_since,
            delivery_retries=deliverer.retry.failures,
            peer_incarnation=(
                peer.seen_incarnation
                if peer.seen_incarnation is not None
                else stream.incarnation
                if stream is not None
                else None
            ),
            incarnations=len(peer.inbound),
        )

    def stats(self) -> NodeStats:
        """
        :return: this node's counters and histograms since it started, as a
            frozen :class:`ilm.NodeStats`.
        """
        peers = self._peers.values()
        committer = self._committer
        return NodeStats(
            started_at=self._started_at,
            state=self._state,
            sent=sum(peer.sent_total + len(peer.pending) for peer in peers),
            stored=committer.stored,
            delivered=sum(peer.deliverer.delivered for peer in peers),
            acknowledged=sum(peer.acked_total for peer in peers),
            retransmitted=sum(peer.retransmitted for peer in peers),
            refused=self._refused,
            delivery_failures=sum(peer.deliverer.failures for peer in peers),
            link_ups=self._link_ups,
            link_downs=self._link_downs,
            commits=committer.commits,
            commit_failures=committer.failures,
            commit_seconds=committer.seconds.snapshot(),
            commit_batch=committer.batch_sizes.snapshot(),
            delivery_seconds=self._delivery_seconds.snapshot(),
            store_in_doubt=committer.in_doubt,
        )

    # -- sending -------------------------------------------------------------

    def send_to(self, peer_id: PeerId, contents: bytes) -> Deferred[Receipt]:
        """
        Send ``contents`` to ``peer_id``.

        :return: a ``Deferred`` that fires with a :class:`Receipt` once the
            message is stored (from then on ILM owns it and will deliver it
            exactly once, in order), or fails with a
            :class:`ilm.errors.SendRefused` subclass (nothing stored) or a
            :class:`ilm.errors.StoreError` (the store failed; nothing stored).
            :class:`ilm.errors.UnknownPeer` (a ``SendRefused``) says the
            network can never link to ``peer_id`` (its optional
            ``can_link`` returned ``False``: a typo, or ``"1"`` for ``1``);
            the network is asked once per peer, at its first send.
        :raises TypeError: if ``peer_id`` is not an ``int``/``str`` or
            ``contents`` is not bytes-like.  Every other refusal is reported
            through the returned ``Deferred``.
        """
        if type(contents) is not bytes:
            if isinstance(contents, bytes | bytearray | memoryview):
                contents = bytes(contents)
            else:
                raise TypeError(
                    f"contents must be bytes, not {type(contents).__name__}"
                )
        if type(peer_id) is not int or not 0 <= peer_id <= MAX_INT_ID:
            try:
                peer_id = check_peer_id(peer_id)
            except SendRefused as refusal:
                return self._refuse(refusal)
        # The common case in one test; every refusal is sorted out in
        # _enqueue.  No _Peer exists for this node's own id.
        peer = self._peers.get(peer_id)
        size = len(contents)
        if (
            self._accepting
            and peer is not None
            and peer.sendable
            and size <= peer.max_message
            and peer.outbox_count < self._max_outbox_messages
            and peer.outbox_bytes + size <= self._max_outbox_bytes
        ):
            return self._append(peer, contents, size)
        return self._enqueue(peer_id, contents)

    def send_raw_message(self, message: IMessage) -> Deferred[Receipt]:
        """
        Send a prepared :class:`ilm.interfaces.IMessage`.

        Its ``source_id`` must be this node's id (else
        :class:`ilm.errors.WrongSource`).  Its ``message_id`` is not used: ILM
        assigns the position in the stream, which the receiver sees as
        ``message_id`` and which the returned :class:`Receipt` carries.
        """
        if not IMessage.providedBy(message):
            raise TypeError(
                f"expected an IMessage provider, not {type(message).__name__}"
            )
        if message.source_id != self._local_id:
            return self._refuse(
                WrongSource(
                    f"message source {message.source_id!r} is not this node "
                    f"({self._local_id!r})"
                )
            )
        return self.send_to(message.destination_id, message.contents)

    def _enqueue(self, peer_id: PeerId, contents: bytes) -> Deferred[Receipt]:
        if not self._accepting:
            state = self._state
            if self._shutdown_waiters is not None:
                return self._refuse(
                    NotRunning(f"ILM node {self._local_id!r} is shutting down")
                )
            if state == _STARTING or state == _NEW:
                if len(self._early) >= self._config.max_outbox_messages:
                    return self._refuse(
                        OutboxFull(
                            peer_id, "messages", self._config.max_outbox_messages
                        )
                    )
                d: Deferred[Receipt] = Deferred()
                self._early.append((peer_id, contents, d))
                return d
            return self._refuse(NotRunning(f"ILM node {self._local_id!r} is {state}"))
        if peer_id == self._local_id:
            return self._refuse(SendToSelf(f"{peer_id!r} is this node's own id"))
        size = len(contents)
        config = self._config
        if size > config.max_message_size:
            return self._refuse(MessageTooLarge(size, config.max_message_size))
        peer = self._peers.get(peer_id)
        if peer is None or not peer.sendable:
            if not self._linkable(peer_id):
                return self._refuse(
                    UnknownPeer(
                        f"the network can never have a link to peer {peer_id!r} "
                        f"(a {type(peer_id).__name__}): no key, certificate pin "
                        f"or certificate authority could authenticate it; "
                        f"check the peer id"
                    )
                )
            if peer is None:
                peer = self._new_peer(peer_id)
            peer.sendable = True
        if size > peer.max_message:
            return self._refuse(
                MessageTooLarge(
                    size,
                    peer.max_message,
                    f"message of {size} bytes exceeds the {peer.max_message} bytes "
                    f"peer {peer_id!r} accepts",
                )
            )
        if peer.outbox_count >= config.max_outbox_messages:
            return self._refuse(
                OutboxFull(peer_id, "messages", config.max_outbox_messages)
            )
        if peer.outbox_bytes + size > config.max_outbox_bytes:
            return self._refuse(OutboxFull(peer_id, "bytes", config.max_outbox_bytes))
        return self._append(peer, contents, size)

    def _refuse(self, refusal: SendRefused) -> Deferred[Receipt]:
        """
        A send refused: counted by reason (``stats().refused``).
        """
        self._count_refusal(refusal)
        return fail(refusal)

    def _count_refusal(self, refusal: SendRefused) -> None:
        reason = refusal.reason
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def _append(self, peer: _Peer, contents: bytes, size: int) -> Deferred[Receipt]:
        """
        Accept a message for the next group commit.
        """
        d: Deferred[Receipt] = Deferred()
        pending = peer.pending
        if not pending:
            self._committer.outboxes[peer.peer_id] = peer
            peer.accepted_at = self._clock.seconds()
        pending.append(contents)
        peer.pending_deferreds.append(d)
        peer.outbox_count += 1
        peer.outbox_bytes += size
        committer = self._committer
        if not committer.asked_now:
            committer.commit_now()
        return d

    def _dialled_peers(self) -> frozenset[PeerId] | None:
        """
        The peers the network dials, if it can tell (its optional
        ``dialled_peers``), for the start line.
        """
        dialled = getattr(self._network, "dialled_peers", None)
        if not callable(dialled):
            return None
        try:
            return frozenset(dialled())
        except Exception:
            return None

    def _linkable(self, peer_id: PeerId) -> bool:
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
            self._limited(
                ("internal_error", "can_link"),
                LogLevel.critical,
                "the network's can_link({peer_id!r}) raised; accepting the send",
                Failure(),
                peer_id=peer_id,
                ilm_event="internal_error",
            )
            return True

    def _new_peer(self, peer_id: PeerId) -> _Peer:
        if peer_id == self._local_id:
            raise ValueError(f"{peer_id!r} is this node's own id")
        config = self._config
        out = OutboundStream(
            0,
            0,
            window=config.window,
            window_bytes=config.window_bytes,
            cache_messages=2 * config.window,
            cache_bytes=2 * config.window_bytes,
        )
        return self._add_peer(peer_id, out)

    def _add_peer(self, peer_id: PeerId, out: OutboundStream) -> _Peer:
        config = self._config
        peer = self._peers[peer_id] = _Peer(peer_id, out, config)
        peer.deliverer = PeerDeliverer(
            peer_id,
            self._local_id,
            target=self._delivery,
            streams=lambda: peer.inbound,
            ready=lambda: peer.link == READY,
            acknowledge=lambda: self._send_ack(peer),
            unstarve=lambda stream: self._unstarve(peer, stream),
            committer=self._committer,
            host=(
                self._host
                if self._ownership is None
                else GatedHost(self._host, self._ownership, peer_id)
            ),
            clock=self._clock,
            later=self._later,
            backoff=self._delivery_backoff,
            ack_delay=config.ack_delay,
            mark_delay=config.mark_delay,
            latency=self._delivery_seconds,
        )
        return peer

    # -- group commit --------------------------------------------------------

    def _drop_unstorable(
        self,
        batch: StoreBatch,
        sends: list[Send],
        problems: dict[PeerId, str],
    ) -> list[Send]:
        """
        Take out of ``batch`` the entries of every peer that no store could
        hold (a position beyond ``2**63 - 1``, which the frame decoders
        already refuse), so that one peer's entries never make the commit
        fail for the others.  The peer's sends in it are refused and its
        link is closed.

        :return: the sends that stay in the batch.
        """
        kept = []
        for entry in sends:
            peer, first, contents, deferreds = entry
            if peer.peer_id not in problems:
                kept.append(entry)
                continue
            _forget_accept_time(peer, first + len(contents) - 1)
            peer.outbox_count -= len(contents)
            peer.outbox_bytes -= sum(map(len, contents))
            refusal = StoreError(
                f"messages to {peer.peer_id!r} cannot be stored: "
                f"{problems[peer.peer_id]} is beyond what a store holds"
            )
            for d in deferreds:
                d.errback(refusal)
        for peer_id, problem in problems.items():
            batch.drop_peer(peer_id)
            self._limited(
                ("store_entry_dropped", peer_id),
                LogLevel.error,
                "dropped the store entries of peer {peer_id!r} before they "
                "reached the store: {problem} cannot be stored",
                peer_id=peer_id,
                problem=problem,
                ilm_event="store_entry_dropped",
            )
            holder = self._peers.get(peer_id)
            if holder is not None and holder.link in (HELLO_SENT, READY):
                self._violation(
                    holder,
                    MalformedFrame(f"{problem}: beyond what a store holds"),
                    logged=True,
                )
        return kept

    def _committed(
        self, result: CommitResult, batch: StoreBatch, sends: list[Send]
    ) -> None:
        peers = self._peers
        if result is not None:
            for peer_id, released in result.released_bytes.items():
                peer = peers.get(peer_id)
                if peer is not None:
                    peer.outbox_bytes -= released
        # A dict, not a set: peers are acknowledged in the batch's order, not
        # in an order that depends on object addresses (runs must replay
        # exactly on a Clock).
        acknowledge: dict[_Peer, None] = {}
        for (peer_id, incarnation), position in batch.delivered.items():
            peer = peers.get(peer_id)
            # (None: a stream this gateway dropped meanwhile.)
            if peer is None or (
                self._ownership is not None
                and _ahead_of_stream(peer, incarnation, position)
            ):
                continue
            if peer.marked(incarnation, position):
                acknowledge[peer] = None
        for peer in acknowledge:
            self._send_ack(peer)
            forgotten = peer.drop_drained_streams()
            if forgotten:
                self._forgotten(peer, forgotten)
        positions = getattr(result, "positions", None)
        for peer, first, contents, deferreds in sends:
            peer_id = peer.peer_id
            if positions is not None and peer_id in positions:
                # A shared store put them where the outbox ended (other
                # gateways may have appended since this one last looked).
                first = positions[peer_id][0]
                self._stored_up_to(peer, first - 1)
            if first == peer.out.stored + 1:
                peer.out.on_stored(first, contents)
            self._pump(peer)
            for offset, d in enumerate(deferreds):
                d.callback(Receipt(self, peer_id, first + offset))

    def _commit_failed(self, reason: Failure, sends: list[Send], delay: float) -> None:
        if self._ownership is not None and self._ownership.commit_failed(reason):
            if not sends:
                return  # the fenced streams were dropped, and that logged
        refused = 0
        for peer, first, contents, deferreds in sends:
            peer.outbox_count -= len(contents)
            peer.outbox_bytes -= sum(map(len, contents))
            refused += len(contents)
            _forget_accept_time(peer, first + len(contents) - 1)
            for d in deferreds:
                d.errback(reason)
        self._limited(
            ("store_commit_failed", type(reason.value).__name__),
            LogLevel.critical,
            "store commit failed: {refused} message(s) refused; acknowledgements "
            "and delivery marks retried in {delay:.2f}s",
            reason,
            refused=refused,
            delay=delay,
            ilm_event="store_commit_failed",
        )

    # -- transmission --------------------------------------------------------

    def _pump(self, peer: _Peer) -> None:
        if peer.link != READY or peer.paused:
            return
        out = peer.out
        first, chunk = out.take()
        if out.held_at and not peer.hold_reported:
            peer.hold_reported = True
            self._limited(
                ("message_too_large_for_peer", peer.peer_id),
                LogLevel.error,
                "message {position} to {peer_id!r} is larger than the {limit} bytes "
                "that peer accepts: its stream waits there until the peer "
                "accepts larger messages",
                position=out.held_at,
                peer_id=peer.peer_id,
                limit=out.max_message,
                ilm_event="message_too_large_for_peer",
            )
        if chunk:
            last = first + len(chunk) - 1
            if first <= peer.sent_high:
                peer.retransmitted += min(last, peer.sent_high) - first + 1
            if last > peer.sent_high:
                peer.sent_high = last
            self._network.send_frames(
                peer.peer_id, _frames.encode_messages(first, chunk, self._frame_target)
            )
            if peer.retransmit_call is None:
                peer.retransmit_call = self._later(
                    peer.retransmit_retry.next_delay, self._retransmit, peer
                )
        if peer.read_call is None:
            request = out.read_request(self._config.read_batch)
            if request is not None:
                after, limit, max_bytes = request
                try:
                    d = self._backend.read_outbound(
                        peer.peer_id, after, limit, max_bytes
                    )
                except Exception:
                    d = fail()
                d.addCallbacks(
                    self._read_done,
                    self._read_failed,
                    callbackArgs=(peer, after, limit),
                    errbackArgs=(peer, after),
                )
                d.addErrback(self._unexpected, "reading the outbox")

    def _read_done(
        self, contents: list[bytes], peer: _Peer, after: int, limit: int
    ) -> None:
        out = peer.out
        out.on_read(after, contents)
        if contents:
            # Only a read that returned something ends the backoff: an
            # outbox that keeps answering nothing (a damaged or tampered
            # store) is asked again ever more slowly.
            peer.read_retry.succeeded()
        if not contents and out.cache_end < out.stored and after >= out.acked:
            self._read_failed(
                Failure(
                    StoreError(
                        f"outbox to {peer.peer_id!r} returned nothing after "
                        f"position {after} though {out.stored} are stored"
                    )
                ),
                peer,
            )
            return
        self._pump(peer)

    def _read_failed(
        self, reason: Failure, peer: _Peer, after: int | None = None
    ) -> None:
        out = peer.out
        out.reading = False
        if after is not None and after < out.acked:
            # An acknowledgement overtook this read (it was committed while
            # the read was in flight, as a store whose reads run apart from
            # its commits allows) and the store refused to read below it.
            # Nothing is wrong with the store: read again from the new point.
            log.debug(
                "outbox read to {peer_id!r} after {after} overtaken by the "
                "acknowledgement of {acked}; reading again",
                peer_id=peer.peer_id,
                after=after,
                acked=out.acked,
            )
            self._pump(peer)
            return
        delay = peer.read_retry.failed()
        self._limited(
            ("outbox_read_failed", peer.peer_id),
            LogLevel.critical,
            "reading the outbox to {peer_id!r} failed; retrying in {delay:.2f}s",
            reason,
            peer_id=peer.peer_id,
            delay=delay,
            ilm_event="outbox_read_failed",
        )
        peer.read_call = self._later(delay, self._read_retry, peer)

    def _read_retry(self, peer: _Peer) -> None:
        peer.read_call = None
        self._pump(peer)

    def _retransmit(self, peer: _Peer) -> None:
        peer.retransmit_call = None
        if peer.link != READY:
            return
        out = peer.out
        if out.retransmit(self._clock.seconds(), self._config.retransmit_timeout):
            log.debug(
                "retransmitting to {peer_id!r} from position {position}",
                peer_id=peer.peer_id,
                position=out.sent + 1,
            )
            peer.retransmit_retry.failed()
            self._pump(peer)
        elif out.outstanding:
            peer.retransmit_call = self._later(
                peer.retransmit_retry.next_delay, self._retransmit, peer
            )

    def _send_ack(self, peer: _Peer) -> None:
        ack = peer.ack()
        if ack is None:
            return
        peer.deliverer.cancel_ack()
        if peer.paused:
            # A peer that does not read gets no pile of ACKs: one, computed
            # afresh, when the link resumes.
            peer.owed_ack = True
            return
        self._network.send_frames(peer.peer_id, [_frames.encode_ack(*ack)])

    def _send_nack(self, peer: _Peer, position: int) -> None:
        if peer.paused:
            peer.owed_nack = position
            return
        self._network.send_frames(peer.peer_id, [_frames.encode_nack(position)])

    # -- link events -----------------------------------------------------------

    def _limited(
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
        limiter = self._limiter
        if limiter is None:
            if failure is not None:
                fields["log_failure"] = failure
            log.emit(level, format, **fields)
        else:
            limiter.emit(key, level, format, failure=failure, **fields)

    def _stop_limiter(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.stop()

    def _guard(self, function: Callable[..., object], *args: object) -> None:
        """
        Run ``function``; log anything it raises instead of letting it reach
        the reactor or the network.
        """
        try:
            function(*args)
        except Exception:
            name = str(getattr(function, "__name__", function))
            self._limited(
                ("internal_error", name),
                LogLevel.critical,
                "internal error in {function}",
                Failure(),
                function=name,
                ilm_event="internal_error",
            )

    def _later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        return self._clock.callLater(delay, self._guard, function, *args)

    def _peer_for_link(self, peer_id: object) -> _Peer | None:
        try:
            pid = check_peer_id(peer_id)
        except (TypeError, ILMError):
            pid = None
        if pid is None or pid == self._local_id:
            self._limited(
                ("internal_error", "invalid peer id"),
                LogLevel.error,
                "network reported a link with an invalid peer id {peer_id} "
                "(a {peer_type})",
                peer_id=str(peer_id),
                peer_type=type(peer_id).__name__,
                ilm_event="internal_error",
            )
            return None
        peer = self._peers.get(pid)
        if peer is None:
            peer = self._new_peer(pid)
        return peer

    def _link_established(self, peer_id: object) -> None:
        if self._state not in (_RUNNING, _STOPPING):
            return
        peer = self._peer_for_link(peer_id)
        if peer is None:
            return
        if self._ownership is not None:
            # Take the peer's stream first; then _link_taken.
            self._ownership.link_established(peer.peer_id)
            return
        self._link_taken(peer.peer_id)

    def _link_taken(self, peer_id: PeerId) -> None:
        peer = self._peers.get(peer_id) or self._new_peer(peer_id)
        if peer.link != DOWN:
            self._link_lost(
                peer.peer_id, Failure(ConnectionError("replaced by a new link"))
            )
        peer.link = HELLO_SENT
        peer.link_since = self._clock.seconds()
        log.debug("link to {peer_id!r} established", peer_id=peer.peer_id)
        self._send_hello(peer, reply_requested=False)

    # -- several gateways (ilm._ownership_guard) ---------------------------------

    def _restart_peer(self, peer_id: PeerId, taken: Any) -> None:
        """
        This gateway took ``peer_id``'s stream: its state restarts from what
        the grant read (``taken``, an ``ilm.backends.StreamTaken``), as after
        a restart of the node; receipts waited for carry over.
        """
        old = self._peers.pop(peer_id, None)
        if old is not None:
            old.cancel_timers()
        self._load_peers(
            () if taken.outbound is None else (taken.outbound,), taken.inbound
        )
        peer = self._peers.get(peer_id) or self._new_peer(peer_id)
        if old is not None:
            peer.waiters = old.waiters
            peer.pending, peer.pending_deferreds = old.pending, old.pending_deferreds
            peer.outbox_count += len(old.pending)
            if peer_id in self._committer.outboxes:
                self._committer.outboxes[peer_id] = peer

    def _drop_stream(self, peer_id: PeerId, reason: Exception) -> None:
        """
        This gateway no longer owns ``peer_id``'s stream: close its link,
        forget its state and its bookkeeping not yet committed.
        """
        peer = self._peers.pop(peer_id, None)
        self._committer.bookkeeping.drop_peer(peer_id)
        if peer is not None:
            peer.cancel_timers()
            if peer.link == READY:
                self._link_downs += 1
            peer.link = CLOSING
        self._network.close_link(peer_id, reason)

    def _stored_up_to(self, peer: _Peer, last: int) -> None:
        """
        The store holds messages to ``peer`` up to ``last``, some appended by
        other gateways: transmit them too (read from the store).
        """
        out = peer.out
        if last > out.stored:
            if peer.link == READY:
                # The owner transmits them (and waits for them at shutdown).
                peer.outbox_count += last - out.stored
            out.stored = last

    def _store_caught_up(self, peer_id: PeerId, record: Any) -> None:
        """
        A look at ``peer_id``'s outbound record in a shared store: messages
        other gateways appended are transmitted from here; receipts waited
        for on a gateway without the peer's link resolve as the owner's
        acknowledgements reach the store.
        """
        peer = self._peers.get(peer_id)
        if peer is None or record is None:
            return
        self._stored_up_to(peer, record.last_position)
        if peer.link == READY:
            self._pump(peer)
            return
        # Another gateway serves the peer: what this one accepted is done
        # once the store records it acknowledged.
        peer.outbox_count = max(
            0, min(peer.outbox_count, peer.out.stored - record.acked)
        )
        waiters = peer.waiters
        while waiters and waiters[0][0] <= record.acked:
            _, _, d, receipt = heapq.heappop(waiters)
            d.callback(receipt)
        self._check_drained()

    def _wake_peer(self, peer_id: PeerId) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.deliverer.deliver()

    def _send_hello(self, peer: _Peer, reply_requested: bool) -> None:
        hello = peer.hello(self._incarnation, reply_requested)
        if peer.paused:
            peer.owed_hello = max(peer.owed_hello, 2 if reply_requested else 1)
        else:
            self._network.send_frames(peer.peer_id, [_frames.encode_resume(hello)])
        if peer.link == HELLO_SENT and peer.handshake_call is None:
            peer.handshake_call = self._later(
                self._config.handshake_retry, self._handshake_retry, peer
            )

    def _handshake_retry(self, peer: _Peer) -> None:
        peer.handshake_call = None
        if peer.link == HELLO_SENT:
            self._send_hello(peer, reply_requested=True)

    def _network_link_lost(self, peer_id: object, reason: object) -> None:
        """The network lost the link (not a link replaced here)."""
        if self._ownership is not None:
            try:
                self._ownership.link_lost(check_peer_id(peer_id))
            except (TypeError, ILMError):
                pass
        self._link_lost(peer_id, reason)

    def _link_lost(self, peer_id: object, reason: object) -> None:
        try:
            pid = check_peer_id(peer_id)
        except (TypeError, ILMError):
            return
        peer = self._peers.get(pid)
        if peer is None or peer.link == DOWN:
            return
        if peer.link == READY:
            self._link_downs += 1
        if peer.link != CLOSING:
            peer.link_since = self._clock.seconds()
            peer.lost_reason = one_line(reason)
        peer.link_lost()
        for name in ("retransmit_call", "handshake_call"):
            call = getattr(peer, name)
            if call is not None:
                if call.active():
                    call.cancel()
                setattr(peer, name, None)
        peer.deliverer.cancel_ack()
        peer.retransmit_retry.succeeded()
        log.debug(
            "link to {peer_id!r} lost: {reason}",
            peer_id=pid,
            reason=(
                reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
            ),
        )

    def _link_paused(self, peer_id: object) -> None:
        peer = self._peers.get(peer_id)  # type: ignore[call-overload]
        if peer is not None:
            peer.paused = True

    def _link_resumed(self, peer_id: object) -> None:
        peer = self._peers.get(peer_id)  # type: ignore[call-overload]
        if peer is not None and peer.paused:
            peer.paused = False
            if peer.owed_hello:
                reply_requested = peer.owed_hello == 2
                peer.owed_hello = 0
                self._send_hello(peer, reply_requested)
            if peer.owed_ack:
                peer.owed_ack = False
                self._send_ack(peer)
            if peer.owed_nack:
                position, peer.owed_nack = peer.owed_nack, 0
                self._send_nack(peer, position)
            self._pump(peer)

    # -- frames --------------------------------------------------------------

    def _frame_received(self, peer_id: object, frame: bytes) -> None:
        try:
            peer = self._peers.get(peer_id)  # type: ignore[call-overload]
        except TypeError:
            self._limited(
                ("internal_error", "invalid peer id"),
                LogLevel.error,
                "network reported a frame from an invalid peer id {peer_id} "
                "(a {peer_type})",
                peer_id=str(peer_id),
                peer_type=type(peer_id).__name__,
                ilm_event="internal_error",
            )
            return
        if peer is None or peer.link == DOWN or peer.link == CLOSING:
            if self._ownership is not None:
                self._ownership.taking(peer_id, frame)  # type: ignore[arg-type]
            return
        try:
            if len(frame) > self._config.max_frame_size:
                raise FrameTooLarge(len(frame), self._config.max_frame_size)
            kind = _frames.frame_type(frame)
            if kind == _frames.MESSAGES:
                if peer.link == READY:
                    first, contents = _frames.decode_messages(
                        frame, self._config.max_message_size
                    )
                    self._on_data(peer, first, contents)
            elif kind == _frames.ACK:
                if peer.link == READY:
                    self._on_ack(peer, *_frames.decode_ack(frame))
            elif kind == _frames.RESUME:
                self._on_hello(peer, _frames.decode_resume(frame))
            elif peer.link == READY:
                expected = _frames.decode_nack(frame)
                if peer.out.on_nack(
                    expected, self._clock.seconds(), self._config.retransmit_timeout
                ):
                    self._pump(peer)
        except ProtocolViolation as violation:
            self._violation(peer, violation)
        except Exception:
            self._limited(
                ("internal_error", "frame", peer.peer_id),
                LogLevel.critical,
                "internal error handling a frame from {peer_id!r}; closing the link",
                Failure(),
                peer_id=peer.peer_id,
                ilm_event="internal_error",
            )
            self._violation(peer, ProtocolViolation("internal error"), logged=True)

    def _violation(
        self, peer: _Peer, violation: ProtocolViolation, logged: bool = False
    ) -> None:
        if not logged:
            self._limited(
                ("protocol_violation", peer.peer_id),
                LogLevel.error,
                "closing link to {peer_id!r}: {kind}: {reason}",
                peer_id=peer.peer_id,
                kind=type(violation).__name__,
                reason=str(violation),
                ilm_event=violation.ilm_event,
            )
        if peer.link == READY:
            self._link_downs += 1
        peer.link = CLOSING
        peer.link_since = self._clock.seconds()
        peer.lost_reason = one_line(violation)
        self._network.close_link(peer.peer_id, violation)

    def _on_hello(self, peer: _Peer, hello: Hello) -> None:
        ready = peer.link == READY
        outcome = peer.on_hello(hello, self._incarnation, self._clock.seconds())
        if ready:
            if outcome.reply:
                self._send_hello(peer, reply_requested=False)
            return
        pid = peer.peer_id
        incarnation = hello.incarnation
        bookkeeping = self._committer.bookkeeping
        for old in outcome.retired:
            bookkeeping.retired.add((pid, old))
            self._limited(
                ("peer_new_incarnation", pid),
                LogLevel.info,
                "peer {peer_id!r} came back with a new store (incarnation "
                "{incarnation}); its old incarnation {old} is retired",
                peer_id=pid,
                incarnation=incarnation,
                old=old,
                ilm_event="peer_new_incarnation",
            )
        if outcome.mark is not None:
            bookkeeping.delivered[(pid, incarnation)] = outcome.mark[1]
        if outcome.forgotten:
            self._forgotten(peer, outcome.forgotten)
        if outcome.lost is not None and outcome.mark is not None:
            first, _last = outcome.lost
            self._limited(
                ("messages_lost", pid),
                LogLevel.critical,
                "peer {peer_id!r} no longer has positions {first}..{last} of its "
                "stream, which this node's store does not record as delivered: "
                "this node's store lost committed data; continuing after them",
                peer_id=pid,
                first=first,
                last=outcome.lost[1],
                ilm_event="messages_lost",
            )
            # The same, unlimited, at debug level: each jump of a stream,
            # for whoever traces one (the fuzz command checks deliveries
            # against it).
            log.debug(
                "stream from {peer_id!r} (incarnation {incarnation}) jumps from "
                "{first} to {position}",
                peer_id=pid,
                incarnation=incarnation,
                first=first,
                position=outcome.mark[1],
                ilm_event="stream_jumped",
            )
        if outcome.jumped is not None:
            peer.deliverer.jumped(outcome.jumped)
        if outcome.mark is not None:
            self._committer.schedule()
        peer.link_since = self._clock.seconds()
        self._link_ups += 1
        if peer.handshake_call is not None:
            if peer.handshake_call.active():
                peer.handshake_call.cancel()
            peer.handshake_call = None
        if outcome.newly_acked:
            self._acknowledged(peer, outcome.newly_acked)
        if outcome.reply:
            self._send_hello(peer, reply_requested=False)
        log.debug(
            "handshake with {peer_id!r} complete: resuming after {position}",
            peer_id=pid,
            position=peer.out.acked,
        )
        self._pump(peer)
        peer.deliverer.deliver()

    def _on_data(self, peer: _Peer, first: int, contents: list[bytes]) -> None:
        stream = peer.inbound[-1]
        accepted, acknowledge_now, nack = stream.on_data(first, contents)
        if accepted:
            peer.deliverer.arrived(stream, accepted)
        if nack:
            self._send_nack(peer, nack)
        if acknowledge_now:
            self._send_ack(peer)
        if accepted:
            peer.deliverer.deliver()

    def _on_ack(self, peer: _Peer, delivered: int, received: int) -> None:
        newly, progress = peer.out.on_ack(delivered, received)
        if newly:
            self._acknowledged(peer, newly)
        if progress:
            peer.retransmit_retry.succeeded()
            call = peer.retransmit_call
            if call is not None:
                if call.active():
                    call.cancel()
                peer.retransmit_call = None
            if peer.out.outstanding:
                peer.retransmit_call = self._later(
                    peer.retransmit_retry.next_delay, self._retransmit, peer
                )
        self._pump(peer)

    def _acknowledged(self, peer: _Peer, newly: int) -> None:
        acked = peer.out.acked
        peer.outbox_count -= newly
        peer.acked_total += newly
        times = peer.accept_times
        while times and times[0][0] <= acked:
            times.popleft()
        self._committer.bookkeeping.acked[peer.peer_id] = acked
        # Deleting acknowledged messages can wait to share a commit: if it is
        # lost in a crash, they are sent again and the peer takes them as
        # duplicates.
        self._committer.schedule(self._config.delete_delay)
        waiters = peer.waiters
        while waiters and waiters[0][0] <= acked:
            _, _, d, receipt = heapq.heappop(waiters)
            d.callback(receipt)
        self._check_drained()

    def _when_acknowledged(self, receipt: Receipt) -> Deferred[Receipt]:
        peer = self._peers.get(receipt.peer_id)
        if peer is None:
            return fail(ValueError(f"no messages were sent to {receipt.peer_id!r}"))
        if receipt.message_id <= peer.out.acked:
            return succeed(receipt)
        if self._state in (_STOPPED, _FAILED):
            return fail(
                StoppedBeforeAcknowledged(
                    receipt.peer_id,
                    receipt.message_id,
                    f"ILM node {self._local_id!r} {self._state}",
                )
            )
        d: Deferred[Receipt] = Deferred()
        heapq.heappush(
            peer.waiters, (receipt.message_id, next(self._waiter_order), d, receipt)
        )
        return d

    # -- delivery ------------------------------------------------------------

    def _unstarve(self, peer: _Peer, stream: InboundStream) -> None:
        position = peer.unstarve(stream)
        if position:
            self._send_nack(peer, position)

    def _forgotten(self, peer: _Peer, incarnations: list[str]) -> None:
        """
        The session forgot these retired incarnations of ``peer``: so does
        the store, with the next commit.
        """
        bookkeeping = self._committer.bookkeeping
        for incarnation in incarnations:
            key = (peer.peer_id, incarnation)
            bookkeeping.retired.discard(key)
            bookkeeping.delivered.pop(key, None)
            bookkeeping.forgotten.add(key)
            log.debug(
                "forgot the retired incarnation {incarnation} of {peer_id!r}",
                peer_id=peer.peer_id,
                incarnation=incarnation,
                ilm_event="incarnation_forgotten",
            )
        self._committer.schedule(self._config.delete_delay)

    # -- start and stop --------------------------------------------------------

    def _opened(self, state: StoredState) -> object:
        self._backend_open = True
        if self._start_abandoned:
            raise NotRunning("shut down before its store had opened")
        self._incarnation = state.incarnation
        ids = [r.peer_id for r in state.outbound] + [r.peer_id for r in state.inbound]
        if self._local_id in ids:
            raise StoreError(
                f"this store holds state for a peer with this node's own id "
                f"{self._local_id!r}: it belongs to another node"
            )
        self._load_peers(state.outbound, state.inbound)
        self._state = _RUNNING
        try:
            return self._network.start(self._events)
        except Exception:
            self._state = _STARTING
            raise

    def _load_peers(
        self,
        outbound: tuple[OutboundRecord, ...],
        inbound: tuple[InboundRecord, ...],
    ) -> None:
        """
        Build the peers of these stored records (at start, or when a
        gateway takes a stream).
        """
        config = self._config
        now = self._clock.seconds()
        for record in outbound:
            out = OutboundStream(
                record.acked,
                record.last_position,
                window=config.window,
                window_bytes=config.window_bytes,
                cache_messages=2 * config.window,
                cache_bytes=2 * config.window_bytes,
            )
            peer = self._add_peer(record.peer_id, out)
            peer.outbox_bytes = record.pending_bytes
            if record.last_position > record.acked:
                peer.accept_times.append((record.last_position, now))
        for mark in inbound:
            peer = self._peers.get(mark.peer_id) or self._new_peer(mark.peer_id)
            if mark.retired:
                peer.retired[mark.incarnation] = None
            else:
                peer.add_stream(mark.incarnation, mark.delivered)
        # In the records' order (a dict, not a set: runs replay exactly).
        loaded = dict.fromkeys(
            [*(r.peer_id for r in outbound), *(r.peer_id for r in inbound)]
        )
        for peer_id in loaded:
            peer = self._peers[peer_id]
            # A store written with a larger limit (or by an older ILM).
            forgotten = peer.forget_retired()
            if forgotten:
                self._forgotten(peer, forgotten)

    def _started(self, _: object) -> None:
        if self._start_abandoned:
            stopping = maybeDeferred(self._network.stop)
            stopping.addErrback(self._unexpected, "stopping a network started too late")
            self._start_failed(
                Failure(NotRunning("shut down before its network had started"))
            )
            return
        if self._state != _RUNNING:
            return
        stored = sorted(self._peers, key=lambda p: (type(p) is str, p))
        dialled = self._dialled_peers()
        log.info(
            "ILM node {local_id!r} running (incarnation {incarnation}): its store "
            "holds state for {stored_count} peer(s)"
            + (" {stored_peers}" if stored else "")
            + ", {pending} message(s) pending"
            + ("; its network dials {dialled_count} peer(s)" if dialled else ""),
            local_id=self._local_id,
            incarnation=self._incarnation,
            stored_count=len(stored),
            stored_peers=stored[:_PEERS_SHOWN],
            pending=sum(peer.outbox_count for peer in self._peers.values()),
            dialled_count=len(dialled) if dialled is not None else None,
            dialled_peers=(
                sorted(dialled, key=lambda p: (type(p) is str, p))[:_PEERS_SHOWN]
                if dialled is not None
                else None
            ),
            ilm_event="started",
        )
        self._accepting = self._shutdown_waiters is None
        self._started_at = self._clock.seconds()
        if self._ownership is not None:
            self._ownership.start()
        # Sends made before the start take their positions before anything a
        # start callback sends.
        early, self._early = self._early, []
        for peer_id, contents, d in early:
            self._enqueue(peer_id, contents).chainDeferred(d)
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _start_failed(self, reason: Failure) -> None:
        if self._state != _STOPPED:
            self._state = _FAILED
        self._start_failure = reason
        self.running = 0
        self._stop_limiter()
        if self._start_abandoned:
            pass
        elif reason.check(StoreError, CannotListenError):
            # Expected (a store locked or unreadable, an address taken):
            # the reason says it all, a traceback would only hide it.
            log.critical(
                "ILM node {local_id!r} failed to start: {error}",
                local_id=self._local_id,
                error=reason.getErrorMessage(),
                error_type=type(reason.value).__name__,
                ilm_event="start_failed",
            )
        else:
            log.failure(
                "ILM node {local_id!r} failed to start",
                reason,
                local_id=self._local_id,
                ilm_event="start_failed",
            )
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.errback(reason)
        early, self._early = self._early, []
        if early:
            refusal = NotRunning(
                f"ILM node {self._local_id!r} did not start: {reason.getErrorMessage()}"
            )
            refusal.__cause__ = reason.value
            for _, _, d in early:
                self._count_refusal(refusal)
                d.errback(refusal)
        if self._backend_open:
            self._backend_open = False
            closing = maybeDeferred(self._backend.close)
            closing.addErrback(self._unexpected, "closing the store after failing")

    def _unexpected(self, reason: Failure, doing: str) -> None:
        log.failure(
            "internal error while {doing}",
            reason,
            doing=doing,
            ilm_event="internal_error",
        )

    def _check_drained(self) -> None:
        if self._drain_waiters and self._is_drained():
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def _is_drained(self) -> bool:
        return all(peer.outbox_count == 0 for peer in self._peers.values())

    def _notify_settled(self) -> None:
        if self._settled_waiters and not any(
            p.deliverer.delivering for p in self._peers.values()
        ):
            waiters, self._settled_waiters = self._settled_waiters, []
            for d in waiters:
                d.callback(None)

    def shutdown(self, timeout: float | None = None) -> Deferred[None]:
        """
        Stop gracefully.

        New sends are refused at once (:class:`ilm.errors.NotRunning`).  ILM
        keeps transmitting until every peer has acknowledged everything it was
        given, or until ``timeout`` seconds (default
        ``config.shutdown_timeout``) have passed; then it closes its links,
        lets deliveries in progress finish and their marks commit, and closes
        its backend.

        :return: a ``Deferred`` firing with ``None`` once everything was
            drained and closed, or failing with
            :class:`ilm.errors.ShutdownTimeout` (listing what is still
            pending, which stays stored) if the timeout expired first.
        """
        if timeout is None:
            timeout = self._config.shutdown_timeout
        if self._shutdown_waiters is not None:
            d: Deferred[None] = Deferred()
            if self._state == _STOPPED:
                return (
                    fail(self._shutdown_result)
                    if self._shutdown_result
                    else succeed(None)
                )
            self._shutdown_waiters.append(d)
            return d
        self._shutdown_waiters = []
        self._accepting = False
        if self._state in (_NEW, _FAILED):
            self._state = _STOPPED
            return succeed(None)
        deadline = self._clock.seconds() + timeout
        result = Deferred.fromCoroutine(self._shutdown(timeout, deadline))
        result.addBoth(self._shutdown_finished)
        return result

    def _shutdown_finished(self, result: object) -> object:
        if isinstance(result, Failure) and result.check(_Abandoned):
            result = Failure(NotRunning(f"ILM node {self._local_id!r} crashed"))
        elif isinstance(result, Failure):
            self._shutdown_result = result
            if not result.check(ShutdownTimeout):
                log.failure("shutdown failed", result, ilm_event="shutdown_failed")
        waiters = self._shutdown_waiters or []
        self._shutdown_waiters = []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
        return result

    async def _shutdown(self, timeout: float, deadline: float) -> None:
        # shutdown() may be called from inside a delivery (a DeferredQueue
        # fires its getter synchronously from put()): let that call stack
        # finish, so the delivery is recorded, before anything else.
        turn: Deferred[None] = Deferred()
        self._clock.callLater(0, turn.callback, None)
        await turn
        if self._abandoned:
            raise _Abandoned()
        if self._state == _STARTING:
            started = await self._within(self.when_started(), deadline, quiet=True)
            if not started:
                # The store or the network is still opening: give up on the
                # start; whatever completes later is closed again at once.
                self._start_abandoned = True
                self._state = _STOPPED
                self.running = 0
                raise ShutdownTimeout(timeout, {})
        if self._state == _FAILED:
            self._state = _STOPPED
            return
        self._state = _STOPPING
        self.running = 0
        early, self._early = self._early, []
        for _, _, d in early:
            self._refuse(NotRunning("ILM is shutting down")).chainDeferred(d)
        drained = True
        if not self._is_drained():
            waiter: Deferred[None] = Deferred()
            self._drain_waiters.append(waiter)
            drained = await self._within(waiter, deadline)
        # Commit outstanding delivery marks while the links are still up, so
        # that their acknowledgements reach the peers before we go.
        idle = await self._within(self._committer.barrier(), deadline)
        drained = drained and idle
        pending = self.pending_outbound()
        grace = max(deadline, self._clock.seconds() + 1.0)
        closed = await self._within(maybeDeferred(self._network.stop), grace)
        for peer_id in list(self._peers):
            self._link_lost(peer_id, Failure(NotRunning("ILM is shutting down")))
        # Let a delivery in progress finish, start no new one, and commit the
        # marks of everything delivered so that it is not delivered again.
        self._deliveries_allowed = False
        for peer in self._peers.values():
            peer.deliverer.stop_retrying()
        settled = await self._within(self._deliveries_settled(), grace)
        committed = await self._within(self._committer.barrier(), grace)
        self._state = _STOPPED
        self._stop_everything()
        try:
            await self._backend.close()
        except Exception:
            log.failure("closing the store failed", ilm_event="store_close_failed")
        log.info(
            "ILM node {local_id!r} stopped",
            local_id=self._local_id,
            ilm_event="stopped",
        )
        if not (drained and closed and settled and committed):
            raise ShutdownTimeout(timeout, pending or self.pending_outbound())

    def _deliveries_settled(self) -> Deferred[None]:
        if not any(peer.deliverer.delivering for peer in self._peers.values()):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled_waiters.append(d)
        return d

    def _stop_everything(self) -> None:
        self._committer.stop()
        if self._ownership is not None:
            self._ownership.stop()
        self._stop_limiter()
        detail = f"ILM node {self._local_id!r} stopped"
        for peer in self._peers.values():
            peer.cancel_timers()
            waiters, peer.waiters = peer.waiters, []
            for _, _, d, receipt in waiters:
                d.errback(
                    StoppedBeforeAcknowledged(
                        receipt.peer_id, receipt.message_id, detail
                    )
                )

    def _abandon(self) -> None:
        """
        Stop dead, as if the process had been killed: cancel every timer,
        start no more I/O, touch neither the backend nor the network.  For
        crash tests and the simulator (see :func:`ilm.testing.crash`).
        """
        self._abandoned = True
        self._state = _STOPPED
        self.running = 0
        self._accepting = False
        self._deliveries_allowed = False
        self._early = []
        for peer in self._peers.values():
            peer.link = DOWN
            peer.cancel_timers()
            peer.waiters = []
        self._committer.stop()
        if self._ownership is not None:
            self._ownership.stop()
        self._stop_limiter()

    async def _within(
        self, d: Deferred[Any], deadline: float, quiet: bool = False
    ) -> bool:
        """
        Wait for ``d`` until ``deadline``; return whether it fired in time.
        A failure of ``d`` counts as fired, and is logged unless ``quiet``.
        """
        outcome: Deferred[bool] = Deferred()
        remaining = max(0.0, deadline - self._clock.seconds())

        def expired() -> None:
            if not outcome.called:
                outcome.callback(False)

        timer = self._clock.callLater(remaining, expired)

        def done(result: object) -> None:
            if isinstance(result, Failure) and not quiet:
                log.failure("error during shutdown", result, ilm_event="shutdown_error")
            if not outcome.called:
                if timer.active():
                    timer.cancel()
                outcome.callback(True)

        d.addBoth(done)
        in_time = await outcome
        if self._abandoned:
            raise _Abandoned()
        return in_time
