"""
ILM: the service that joins a backend, a delivery target and a network.

:class:`ILM` is the facade: the constructor's checks, the public API, and
the wiring of the node's pieces, each in its own module:

- :mod:`ilm._node`: what the pieces share (:class:`~ilm._node.NodeCore`) and
  one peer's objects;
- :mod:`ilm._peer`: one peer's protocol state and decisions, pure;
- :mod:`ilm._sender`: one peer's outbox, transmission, retransmission and
  receipts;
- :mod:`ilm._deliverer`: in-order delivery of one peer's messages;
- :mod:`ilm._committer`: the group commit, the only caller of
  ``IBackend.commit``;
- :mod:`ilm._link`: link events and frames routed to the peer's objects;
- :mod:`ilm._outcomes`: what a commit's outcome means for the peers;
- :mod:`ilm._lifecycle`: start and stop, a typed state machine;
- :mod:`ilm._admission`: whether a send may go ahead;
- :mod:`ilm._snapshot`: the ``peer_status()`` and ``stats()`` snapshots.

``docs/architecture.md`` draws who calls whom.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import overload

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime

from ilm._admission import Admission, as_bytes_list
from ilm._config import Config
from ilm._delivery import as_delivery
from ilm._lifecycle import RUNNING, STOPPING, NodeLife
from ilm._link import PeerRouter
from ilm._node import NodeCore
from ilm._peer import READY
from ilm._peerid import MAX_INT_ID, PeerId, check_peer_id
from ilm._sender import Receipt
from ilm._snapshot import node_stats, peer_status
from ilm._status import DELIVERY_SECONDS_BOUNDS, HistogramCounter, NodeStats, PeerStatus
from ilm.errors import (
    InvalidPeerId,
    SendRefused,
    UnknownPeer,
    WrongSource,
)
from ilm.interfaces import IBackend, IMessage, INetwork

__all__ = ["ILM", "Receipt"]


class ILM(Service):
    """
    An ILM node: stores every message handed to :meth:`send_to` (or, a
    list at a time, all or nothing, to :meth:`send_many`) until the peer
    has durably received it, and delivers what peers send exactly once and
    in order.

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
        self._network = network
        self._config = config
        self._clock: IReactorTime = clock  # type: ignore[assignment]
        self._local_id: PeerId = check_peer_id(network.local_id)
        core = self._core = NodeCore(
            self._local_id, config, self._clock, backend, network
        )
        self._delivery_seconds = HistogramCounter(DELIVERY_SECONDS_BOUNDS)
        self._router = PeerRouter(
            core,
            target=as_delivery(delivery),
            accepts_links=lambda: self._life.state in (RUNNING, STOPPING),
            may_commit=lambda: self._life.may_commit(),
            delivery_seconds=self._delivery_seconds,
        )
        self._committer = self._router.committer
        self._life = NodeLife(core, self._router, service=self)
        self._admission = Admission(core, self._router, self._life)
        self._peers = core.peers
        self._max_outbox_messages = config.max_outbox_messages
        self._max_outbox_bytes = config.max_outbox_bytes

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
        return self._life.when_started()

    def startService(self) -> None:
        if self._life.startable():
            Service.startService(self)
            self._life.start()

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
        return self._life.state

    @property
    def incarnation(self) -> str:
        """This node's store incarnation (empty until started)."""
        return self._core.incarnation

    @property
    def config(self) -> Config:
        """The limits and timings in force."""
        return self._config

    @property
    def _state(self) -> str:
        return self._life.state

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
        return self._life.pending()

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
        return Receipt(self._peers[peer_id].sender, peer_id, message_id)

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
            known.update(self._core.dialled_peers() or ())
            known.discard(self._local_id)
            return {
                pid: peer_status(self._core, self._committer, pid, now)
                for pid in sorted(known, key=lambda p: (type(p) is str, p))
            }
        try:
            pid = check_peer_id(peer_id)
        except TypeError as error:
            raise InvalidPeerId(str(error)) from error
        core = self._core
        if pid not in self._peers and (
            pid == self._local_id
            or (pid not in (core.dialled_peers() or ()) and not core.linkable(pid))
        ):
            raise UnknownPeer(f"this node knows nothing of peer {pid!r}")
        return peer_status(self._core, self._committer, pid, now)

    def stats(self) -> NodeStats:
        """
        :return: this node's counters and histograms since it started, as a
            frozen :class:`ilm.NodeStats`.
        """
        life = self._life
        return node_stats(
            self._core,
            self._committer,
            life.state,
            life.started_at,
            self._delivery_seconds,
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
                return self._admission.refuse(refusal)
        # The common case in one test; every refusal is sorted out in
        # _enqueue.  No peer exists for this node's own id.
        peer = self._peers.get(peer_id)
        size = len(contents)
        if (
            self._life.accepting
            and peer is not None
            and peer.sendable
            and size <= peer.max_message
        ):
            sender = peer.sender
            if (
                sender.outbox_count + sender.others_count < self._max_outbox_messages
                and sender.outbox_bytes + sender.others_bytes + size
                <= self._max_outbox_bytes
            ):
                return sender.append(contents, size)
        return self._enqueue(peer_id, contents)

    def send_many(
        self, peer_id: PeerId, contents: Iterable[bytes]
    ) -> Deferred[list[Receipt]]:
        r"""
        Send several messages to ``peer_id``, in order, all or none: one
        admission check for the whole list (a refusal refuses every
        message, and counts once in ``stats().refused``), one share of one
        group commit.

        :return: a ``Deferred`` that fires with their :class:`Receipt`\ s,
            in order (consecutive ``message_id``\ s), once all are stored, or
            fails as :meth:`send_to`'s does with nothing stored.  An empty
            list gives an empty list.
        :raises TypeError: if ``peer_id`` is not an ``int``/``str``, or
            ``contents`` is not an iterable of bytes-like objects.
        """
        messages = as_bytes_list(contents)
        try:
            peer_id = check_peer_id(peer_id)
        except SendRefused as refusal:
            return self._admission.refuse(refusal)
        if not messages:
            return succeed([])
        if not self._life.accepting:
            return self._admission.not_accepting(
                peer_id, len(messages), lambda: self.send_many(peer_id, messages)
            )
        size = sum(map(len, messages))
        admitted = self._admission.admit(
            peer_id, len(messages), size, max(map(len, messages))
        )
        if isinstance(admitted, SendRefused):
            return self._admission.refuse(admitted)
        return admitted.append_many(messages, size)

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
            return self._admission.refuse(
                WrongSource(
                    f"message source {message.source_id!r} is not this node "
                    f"({self._local_id!r})"
                )
            )
        return self.send_to(message.destination_id, message.contents)

    def _enqueue(self, peer_id: PeerId, contents: bytes) -> Deferred[Receipt]:
        """
        ``send_to``'s slow path: the node not running yet, a new peer, or a
        refusal.
        """
        if not self._life.accepting:
            return self._admission.not_accepting(
                peer_id, 1, lambda: self._enqueue(peer_id, contents)
            )
        size = len(contents)
        admitted = self._admission.admit(peer_id, 1, size, size)
        if isinstance(admitted, SendRefused):
            return self._admission.refuse(admitted)
        return admitted.append(contents, size)

    # -- stop ------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> Deferred[None]:
        """
        Stop gracefully.

        New sends are refused at once (:class:`ilm.errors.NotRunning`).  ILM
        keeps transmitting until every peer has acknowledged everything it was
        given, or until ``timeout`` seconds (default
        ``config.shutdown_timeout``) have passed; then it closes its links,
        lets deliveries in progress finish and their marks commit, and closes
        its backend (given at least 5 s for that, and not waited for beyond:
        ``store_close_timeout`` is logged).

        :return: a ``Deferred`` firing with ``None`` once everything was
            drained and closed, or failing with
            :class:`ilm.errors.ShutdownTimeout` (listing what is still
            pending, which stays stored) if the timeout expired first, or
            the backend did not close in time.
        """
        if timeout is None:
            timeout = self._config.shutdown_timeout
        return self._life.shutdown(timeout)

    def _abandon(self) -> None:
        """
        Stop dead, as if the process had been killed (see
        :func:`ilm.testing.crash`).
        """
        self._life.abandon()
