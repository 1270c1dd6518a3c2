"""
Routing: what the network reports, taken to the right peer's objects.
:class:`PeerRouter` is the node's :class:`ilm.interfaces.IFrameReceiver`.

A link established sends this node's RESUME and starts the handshake
timer; the peer's RESUME goes to its :class:`ilm._peer.PeerSession`, whose
decision is carried out here (retirements and marks for the store,
through :class:`ilm._incarnations.IncarnationRecords`, the sender
resumed, delivery restarted); MESSAGES go to the session's inbound
stream and the :class:`ilm._deliverer.PeerDeliverer`, ACK and NACK to the
:class:`ilm._sender.PeerSender`.  The router also builds each peer's
objects and the group committer, whose outcomes :mod:`ilm._outcomes`
handles.  Everything here is per frame or per link event, never per
message.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import _frames
from ilm._acks import AckPacer, AckSchedule
from ilm._backoff import Backoff
from ilm._committer import GroupCommitter
from ilm._deliverer import PeerDeliverer, one_line
from ilm._incarnations import IncarnationRecords
from ilm._node import NodeCore, Peer
from ilm._nodelog import log
from ilm._outcomes import CommitOutcomes
from ilm._ownership_guard import GatewayStreams, OwnershipGuard
from ilm._peer import CLOSING, DOWN, HELLO_SENT, READY
from ilm._peerid import PeerId, check_peer_id
from ilm._sender import PeerSender
from ilm._session import Hello, InboundStream, OutboundStream
from ilm._status import HistogramCounter
from ilm.errors import (
    FrameTooLarge,
    ILMError,
    ProtocolViolation,
)
from ilm.interfaces import IFrameReceiver, ILocalDelivery

__all__ = ["PeerRouter"]

_FRAME_TARGET = 256 * 1024


@implementer(IFrameReceiver)
class PeerRouter:
    """
    The node's peers and the routing of link events, frames and commit
    outcomes to them.

    :param accepts_links: whether a new link may start a handshake now (the
        node runs or stops).
    :param may_commit: whether a group commit may start now.
    """

    def __init__(
        self,
        core: NodeCore,
        *,
        target: ILocalDelivery,
        accepts_links: Callable[[], bool],
        may_commit: Callable[[], bool],
        delivery_seconds: HistogramCounter,
    ) -> None:
        self._core = core
        config = core.config
        self._config = config
        self._network = core.network
        self._target = target
        self._accepts_links = accepts_links
        self._delivery_seconds = delivery_seconds
        self._frame_target = min(config.max_frame_size, _FRAME_TARGET)
        self._delivery_backoff = Backoff.exact(
            config.delivery_retry, config.max_delivery_retry
        )
        self.peers = core.peers
        #: The paced ACKs this node owes (ilm._acks).
        self.ack_schedule = AckSchedule(
            config.ack_interval, clock=core.clock, later=core.later
        )
        outcomes = CommitOutcomes(core, self)
        shared = OwnershipGuard.shares(core.backend)
        self.committer = GroupCommitter(
            core.backend,
            core.clock,
            Backoff.exact(config.store_retry, config.max_store_retry),
            later=core.later,
            may_commit=may_commit,
            drop_unstorable=outcomes.drop_unstorable,
            committed=outcomes.committed,
            receipts=outcomes.receipts,
            failed=outcomes.failed,
            settled=core.check_drained,
            unexpected=core.unexpected,
            shared=shared,
        )
        #: With a store shared by several gateways: stream ownership
        #: (ilm._ownership_guard); None for any other store.
        self.streams = GatewayStreams.for_node(core, self) if shared else None
        outcomes.streams = self.streams
        #: The store's records of the peers' incarnations (ilm._incarnations).
        self.incarnations = IncarnationRecords(core, self.committer)

    # -- peers -----------------------------------------------------------------

    def new_peer(self, peer_id: PeerId) -> Peer:
        """A peer this node has no state for (yet)."""
        if peer_id == self._core.local_id:
            raise ValueError(f"{peer_id!r} is this node's own id")
        return self.add_peer(peer_id, 0, 0)

    def add_peer(self, peer_id: PeerId, acked: int, stored: int) -> Peer:
        """A peer whose outbound stream stands at ``acked``/``stored``."""
        core, config = self._core, self._config
        out = OutboundStream(
            acked,
            stored,
            window=config.window,
            window_bytes=config.window_bytes,
            cache_messages=2 * config.window,
            cache_bytes=2 * config.window_bytes,
        )
        peer = self.peers[peer_id] = Peer(peer_id, out, config)
        peer.sender = PeerSender(
            peer,
            network=core.network,
            backend=core.backend,
            committer=self.committer,
            host=core,
            clock=core.clock,
            config=config,
            frame_target=self._frame_target,
        )
        peer.deliverer = PeerDeliverer(
            peer_id,
            core.local_id,
            target=self._target,
            streams=lambda: peer.inbound,
            ready=lambda: peer.link == READY,
            acknowledge=lambda: self.send_ack(peer),
            unstarve=lambda stream: self._unstarve(peer, stream),
            committer=self.committer,
            host=core if self.streams is None else self.streams.host(peer),
            clock=core.clock,
            later=core.later,
            backoff=self._delivery_backoff,
            ack_delay=config.ack_delay,
            mark_delay=config.mark_delay,
            latency=self._delivery_seconds,
        )
        peer.acks = AckPacer(
            config.ack_interval,
            clock=core.clock,
            schedule=self.ack_schedule,
            send=lambda: self.send_ack(peer),
        )
        return peer

    # -- IFrameReceiver --------------------------------------------------------

    def link_established(self, peer_id: object) -> None:
        self._core.guard(self._established, peer_id)

    def link_lost(self, peer_id: object, reason: object) -> None:
        if self.streams is not None:
            self._core.guard(self.streams.guard.link_lost, peer_id)
        self._core.guard(self.lost, peer_id, reason)

    def link_paused(self, peer_id: object) -> None:
        self._core.guard(self._paused, peer_id)

    def link_resumed(self, peer_id: object) -> None:
        self._core.guard(self._resumed, peer_id)

    def frame_received(self, peer_id: object, frame: bytes) -> None:
        try:
            peer = self.peers.get(peer_id)  # type: ignore[call-overload]
        except TypeError:
            self._invalid_id(peer_id, "a frame from")
            return
        if peer is None or (link := peer.link) == DOWN or link == CLOSING:
            if self.streams is not None:
                self.streams.guard.taking(peer_id, frame)  # type: ignore[arg-type]
            return
        config = self._config
        try:
            if len(frame) > config.max_frame_size:
                raise FrameTooLarge(len(frame), config.max_frame_size)
            kind = frame[0] if frame else _frames.frame_type(frame)
            if kind == _frames.MESSAGES:
                if link == READY:
                    first, contents = _frames.decode_messages(
                        frame, config.max_message_size
                    )
                    self._on_data(peer, first, contents)
            elif kind == _frames.ACK:
                if link == READY:
                    peer.sender.on_ack(*_frames.decode_ack(frame))
            elif kind == _frames.RESUME:
                self._on_hello(peer, _frames.decode_resume(frame))
            elif _frames.frame_type(frame) == _frames.NACK and peer.link == READY:
                peer.sender.on_nack(_frames.decode_nack(frame))
        except ProtocolViolation as violation:
            self.violation(peer, violation)
        except Exception:
            self._internal_error(peer)

    def frames_received(self, peer_id: object, frames: list[bytes]) -> None:
        """
        The frames of one read from ``peer_id``, in order (the optional
        batch form of :meth:`frame_received`): each is taken as
        :meth:`frame_received` would, except that MESSAGES frames on a ready
        link whose positions continue each other are taken as one run (one
        window check, one round of deliveries, one delivery mark).  Nothing
        after a frame that closed the link is taken.
        """
        try:
            peer = self.peers.get(peer_id)  # type: ignore[call-overload]
        except TypeError:
            peer = None
        if peer is None or peer.link == DOWN or peer.link == CLOSING:
            for frame in frames:
                self.frame_received(peer_id, frame)
            return
        config = self._config
        index = 0
        count = len(frames)
        one_by_one = 0
        while index < count:
            end = index
            if peer.link == READY and index >= one_by_one:
                end, first, contents = _frames.decode_message_run(
                    frames, index, config.max_frame_size, config.max_message_size
                )
            if end > index + 1:
                try:
                    self._on_data(peer, first, contents)
                    index = end
                except ProtocolViolation:
                    # The run breaks the window: refused before anything
                    # was taken.  Frame by frame, those within the window
                    # are taken before the link is closed.
                    one_by_one = end
                except Exception:
                    self._internal_error(peer)
            else:
                self.frame_received(peer_id, frames[index])
                index += 1
            if peer.link == CLOSING or peer.link == DOWN:
                return

    def _internal_error(self, peer: Peer) -> None:
        """Handling a frame from ``peer`` raised: log it, close the link."""
        self._core.limited(
            ("internal_error", "frame", peer.peer_id),
            LogLevel.critical,
            "internal error handling a frame from {peer_id!r}; closing the link",
            Failure(),
            peer_id=peer.peer_id,
            ilm_event="internal_error",
        )
        # This node's fault, not the peer's: not a ProtocolViolation, so
        # the network does not count it against the peer.
        self.violation(peer, ILMError("internal error handling a frame"), logged=True)

    # -- link events -----------------------------------------------------------

    def _invalid_id(self, peer_id: object, what: str) -> None:
        self._core.limited(
            ("internal_error", "invalid peer id"),
            LogLevel.error,
            "network reported " + what + " an invalid peer id {peer_id} "
            "(a {peer_type})",
            peer_id=str(peer_id),
            peer_type=type(peer_id).__name__,
            ilm_event="internal_error",
        )

    def _established(self, peer_id: object) -> None:
        if not self._accepts_links():
            return
        try:
            pid = check_peer_id(peer_id)
        except (TypeError, ILMError):
            pid = None
        if pid is None or pid == self._core.local_id:
            self._invalid_id(peer_id, "a link with")
            return
        if self.streams is not None:
            # Take the peer's stream first; then taken().
            self.streams.guard.link_established(pid)
            return
        self.taken(pid)

    def taken(self, pid: PeerId) -> None:
        """The link with ``pid`` is this node's: its handshake starts."""
        peer = self.peers.get(pid) or self.new_peer(pid)
        if peer.link != DOWN:
            self.lost(pid, Failure(ConnectionError("replaced by a new link")))
        peer.link = HELLO_SENT
        peer.link_since = self._core.clock.seconds()
        log.debug("link to {peer_id!r} established", peer_id=pid)
        self._send_hello(peer, reply_requested=False)

    def _send_hello(self, peer: Peer, reply_requested: bool) -> None:
        hello = peer.hello(self._core.incarnation, reply_requested)
        if peer.paused:
            peer.owed_hello = max(peer.owed_hello, 2 if reply_requested else 1)
        else:
            self._network.send_frames(peer.peer_id, [_frames.encode_resume(hello)])
        if peer.link == HELLO_SENT and peer.handshake_call is None:
            peer.handshake_call = self._core.later(
                self._config.handshake_retry, self._handshake_retry, peer
            )

    def _handshake_retry(self, peer: Peer) -> None:
        peer.handshake_call = None
        if peer.link == HELLO_SENT:
            self._send_hello(peer, reply_requested=True)

    def lost(self, peer_id: object, reason: object) -> None:
        """The link to ``peer_id`` went down (or is taken down)."""
        try:
            pid = check_peer_id(peer_id)
        except (TypeError, ILMError):
            return
        peer = self.peers.get(pid)
        if peer is None or peer.link == DOWN:
            return
        if peer.link == READY:
            self._core.link_downs += 1
        if peer.link != CLOSING:
            peer.link_since = self._core.clock.seconds()
            peer.lost_reason = one_line(reason)
        peer.link_lost()
        peer.cancel_handshake()
        peer.sender.link_lost()
        peer.deliverer.cancel_ack()
        peer.acks.cancel()
        log.debug(
            "link to {peer_id!r} lost: {reason}",
            peer_id=pid,
            reason=(
                reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
            ),
        )

    def _paused(self, peer_id: object) -> None:
        peer = self.peers.get(peer_id)  # type: ignore[call-overload]
        if peer is not None:
            peer.paused = True

    def _resumed(self, peer_id: object) -> None:
        peer = self.peers.get(peer_id)  # type: ignore[call-overload]
        if peer is not None and peer.paused:
            peer.paused = False
            if peer.owed_hello:
                reply_requested = peer.owed_hello == 2
                peer.owed_hello = 0
                self._send_hello(peer, reply_requested)
            if peer.owed_ack:
                peer.owed_ack = False
                self.send_ack(peer)
            if peer.owed_nack:
                position, peer.owed_nack = peer.owed_nack, 0
                self._send_nack(peer, position)
            peer.sender.pump()

    def violation(self, peer: Peer, violation: ILMError, logged: bool = False) -> None:
        """
        Close ``peer``'s link: it broke the protocol (a
        :class:`ProtocolViolation`, which the network counts against it),
        or this node cannot go on with it.
        """
        if not logged:
            self._core.limited(
                ("protocol_violation", peer.peer_id),
                LogLevel.error,
                "closing link to {peer_id!r}: {kind}: {reason}",
                peer_id=peer.peer_id,
                kind=type(violation).__name__,
                reason=str(violation),
                ilm_event=violation.ilm_event,
            )
        if peer.link == READY:
            self._core.link_downs += 1
        peer.link = CLOSING
        peer.link_since = self._core.clock.seconds()
        peer.lost_reason = one_line(violation)
        self._network.close_link(peer.peer_id, violation)

    # -- frames ----------------------------------------------------------------

    def _on_hello(self, peer: Peer, hello: Hello) -> None:
        core = self._core
        ready = peer.link == READY
        outcome = peer.on_hello(hello, core.incarnation, core.clock.seconds())
        if ready:
            if outcome.reply:
                self._send_hello(peer, reply_requested=False)
            return
        self.incarnations.resumed(peer, hello, outcome)
        if outcome.jumped is not None:
            peer.deliverer.jumped(outcome.jumped)
        if outcome.mark is not None:
            self.committer.schedule()
        peer.link_since = core.clock.seconds()
        core.link_ups += 1
        peer.cancel_handshake()
        peer.acks.resumed(peer.inbound[-1])
        if outcome.newly_acked:
            peer.sender.acknowledged(outcome.newly_acked)
        if outcome.reply:
            self._send_hello(peer, reply_requested=False)
        log.debug(
            "handshake with {peer_id!r} complete: resuming after {position}",
            peer_id=peer.peer_id,
            position=peer.out.acked,
        )
        peer.sender.pump()
        peer.deliverer.deliver()

    def _on_data(self, peer: Peer, first: int, contents: list[bytes]) -> None:
        inbound = peer.inbound
        stream = inbound[-1]
        deliverer = peer.deliverer
        if deliverer.take_run(stream, inbound, first, contents):
            # The usual frame (or run of frames of one read): the next
            # messages, delivered straight; nothing to answer.
            return
        accepted, acknowledge_now, nack = stream.on_data(first, contents)
        if accepted:
            deliverer.arrived(stream, accepted)
        if nack:
            self._send_nack(peer, nack)
        if acknowledge_now:
            self.send_ack(peer)
        if accepted:
            deliverer.deliver()

    def send_ack(self, peer: Peer) -> None:
        """Acknowledge what ``peer`` sent, now (latest marks)."""
        ack = peer.ack()
        if ack is None:
            return
        peer.deliverer.cancel_ack()
        peer.acks.sent(peer.inbound[-1])
        if peer.paused:
            # A peer that does not read gets no pile of ACKs: one, computed
            # afresh, when the link resumes.
            peer.owed_ack = True
            return
        self._network.send_frames(peer.peer_id, [_frames.encode_ack(*ack)])

    def _send_nack(self, peer: Peer, position: int) -> None:
        if peer.paused:
            peer.owed_nack = position
            return
        self._network.send_frames(peer.peer_id, [_frames.encode_nack(position)])

    def _unstarve(self, peer: Peer, stream: InboundStream) -> None:
        position = peer.unstarve(stream)
        if position:
            self._send_nack(peer, position)

    def forgotten(self, peer: Peer, incarnations: list[str]) -> None:
        """
        The session forgot these retired incarnations of ``peer``: so does
        the store, with the next commit.
        """
        self.incarnations.forgotten(peer, incarnations)
