"""
The link table: a stream network's connections, its links (one per peer)
and the connections held for a peer, with the link election
(:mod:`ilm.network._election`) applied to them: which connection becomes
the link, which is closed as a duplicate or replaced, what a lost link
changes (``link_lost`` reported, the dialler told), and closing a link
(after a violation, with the refusal policy's hold).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

import ilm.network._election as _election
from ilm._peerid import PeerId
from ilm.errors import ProtocolViolation
from ilm.network._counters import REFUSAL_HOLD, NetworkCounters, refusal_reason
from ilm.network._election import Election, Verdict
from ilm.network._log import internal_error, log
from ilm.network._protocol import ILMProtocol
from ilm.network._refusal import RefusalPolicy
from ilm.network._states import AUTHENTICATED, CLOSED, HANDSHAKING

__all__ = ["LinkTable"]


class LinkTable:
    """
    :param local_id: this node's id.
    :param clock: the network's clock.
    :param counters: the network's counters.
    :param refusal: the refusal policy (a held-off peer is refused).
    :param running: whether the network is running.
    :param report: ``report(event, *args)`` tells the frame receiver.
    :param sync: the dialler should check whether to dial a peer.
    :param linked: a link with a peer is up (its dial errors are over).

    :ivar connections: every connection, in the order they were made (an
        ordered set: stopping closes them in that order, so a run on a
        ``Clock`` replays exactly).
    :ivar links: the link with each peer.
    :ivar held: the connection held for a peer while this node's own dial
        to it is in its handshake.
    """

    def __init__(
        self,
        *,
        local_id: PeerId,
        clock: IReactorTime,
        counters: NetworkCounters,
        refusal: RefusalPolicy[PeerId],
        running: Callable[[], bool],
        report: Callable[..., None],
        sync: Callable[[PeerId], None],
        linked: Callable[[PeerId], None],
    ) -> None:
        self._local_id = local_id
        self._clock = clock
        self._counters = counters
        self._refusal = refusal
        self._running = running
        self._report = report
        self._sync = sync
        self._linked = linked
        self.connections: dict[ILMProtocol, None] = {}
        self.links: dict[PeerId, ILMProtocol] = {}
        self.held: dict[PeerId, ILMProtocol] = {}

    def authenticated(self, connection: ILMProtocol) -> None:
        peer_id = connection.peer_id
        assert peer_id is not None
        log.debug(
            "{direction} connection authenticated as {peer_id!r}",
            direction="outgoing" if connection.initiated else "incoming",
            peer_id=peer_id,
        )
        link = self.links.get(peer_id)
        self._apply(
            connection,
            _election.on_authenticated(
                running=self._running(),
                refused=bool(self._refusal.refused_for(peer_id)),
                decider=_election.decides(self._local_id, peer_id),
                initiated=connection.initiated,
                link_initiated=None if link is None else link.initiated,
                held=peer_id in self.held,
                dialling=self._dialling(peer_id),
            ),
        )

    def link_up_received(self, connection: ILMProtocol) -> None:
        assert connection.peer_id is not None
        self._apply(
            connection,
            _election.on_link_up(
                running=self._running(), linked=connection.peer_id in self.links
            ),
        )

    def detached(self, connection: ILMProtocol, was: str, reason: object) -> None:
        if was == HANDSHAKING and connection.initiated:
            self._clock.callLater(0, self._release_held, connection.destination)
        peer_id = connection.peer_id
        if peer_id is None:
            return
        if self.held.get(peer_id) is connection:
            del self.held[peer_id]
        if self.links.get(peer_id) is connection:
            del self.links[peer_id]
            self._counters.link_lost()
            failure = reason if isinstance(reason, Failure) else Failure(reason)
            log.info(
                "link with {peer_id!r} lost: {reason}",
                peer_id=peer_id,
                reason=failure.getErrorMessage(),
                ilm_event="link_lost",
            )
            self._report("link_lost", peer_id, failure)
            if not connection.initiated:
                self._sync(peer_id)

    def connection_lost(
        self, connection: ILMProtocol, was: str, reason: Failure
    ) -> None:
        self.connections.pop(connection, None)
        if was != CLOSED:
            self.detached(connection, was, reason)

    def _apply(self, connection: ILMProtocol, election: Election) -> None:
        peer_id = connection.peer_id
        assert peer_id is not None
        verdict = election.verdict
        if election.drop_held:
            self._duplicate(self.held.pop(peer_id), connection)
        if verdict is Verdict.WAIT:
            return
        if verdict is Verdict.REFUSE:
            connection.close(ConnectionDone("node stopping"), abort=True)
        elif verdict is Verdict.REFUSE_HELD:
            self._counters.refused(REFUSAL_HOLD)
            log.debug(
                "refusing a connection with {peer_id!r} for now (protocol violation)",
                peer_id=peer_id,
                ilm_event="refusal_hold",
            )
            connection.close(
                ConnectionDone("refused after a protocol violation"), abort=True
            )
        elif verdict is Verdict.DUPLICATE:
            self._duplicate(connection, self.links[peer_id])
        elif verdict is Verdict.HOLD:
            self.held[peer_id] = connection
        else:
            if verdict is Verdict.REPLACE:
                log.info(
                    "a new {direction} connection with {peer_id!r} replaces its link",
                    direction="outgoing" if connection.initiated else "incoming",
                    peer_id=peer_id,
                    ilm_event="link_replaced",
                )
                old = self.links[peer_id]
                old.close(ConnectionDone("replaced by a newer connection"), abort=False)
            self._make_link(connection, election.announce)

    def _dialling(self, peer_id: PeerId) -> bool:
        return any(
            p.initiated and p.destination == peer_id and p.state == HANDSHAKING
            for p in self.connections
        )

    def _duplicate(self, loser: ILMProtocol, winner: ILMProtocol) -> None:
        log.info(
            "closing a duplicate {direction} connection with {peer_id!r}: the "
            "{winner} connection is the link",
            direction="outgoing" if loser.initiated else "incoming",
            peer_id=loser.peer_id,
            winner="outgoing" if winner.initiated else "incoming",
            ilm_event="duplicate_link",
        )
        loser.close(ConnectionDone("duplicate connection"), abort=False)

    def _make_link(self, connection: ILMProtocol, announce: bool) -> None:
        peer_id = connection.peer_id
        assert peer_id is not None
        self.links[peer_id] = connection
        self._counters.link_established()
        self._refusal.link_up(peer_id)
        self._linked(peer_id)
        connection.open(announce)
        log.info(
            "link with {peer_id!r} established ({direction})",
            peer_id=peer_id,
            direction="outgoing" if connection.initiated else "incoming",
            ilm_event="link_established",
        )
        self._report("link_established", peer_id)
        if not connection.initiated:
            self._sync(peer_id)

    def _release_held(self, peer_id: PeerId | None) -> None:
        """
        A dial of this node's to ``peer_id`` ended: unless another is in
        its handshake, the connection held for the peer (if any) is no
        longer held, and becomes the link if it still can.
        """
        try:
            if peer_id is None or peer_id not in self.held or self._dialling(peer_id):
                return
            held = self.held.pop(peer_id)
            if _election.release_held(
                running=self._running(), held_waiting=held.state == AUTHENTICATED
            ):
                self._make_link(held, announce=True)
        except Exception:
            internal_error("releasing a held connection")

    def close_link(self, peer_id: PeerId, reason: Exception) -> None:
        """
        Close the link to ``peer_id`` at once (``link_lost`` is reported
        before this returns); after a :class:`ProtocolViolation`, the peer
        is held off (the refusal policy) and the refusal counted.
        """
        protocol = self.links.get(peer_id)
        if protocol is None:
            return
        hold = 0.0
        if isinstance(reason, ProtocolViolation):
            hold = self._refusal.violation(peer_id)
            self._counters.refused(refusal_reason(reason))
        log.warn(
            "closing the link to {peer_id!r}: {kind}: {reason}; its links are "
            "refused for {hold:.2f}s",
            peer_id=peer_id,
            kind=type(reason).__name__,
            reason=str(reason),
            hold=hold,
            ilm_event="link_closed",
        )
        protocol.close(reason, abort=True)

    def wanted(self, peer_id: PeerId) -> bool:
        """
        Whether to dial ``peer_id``: while running, when there is no link to
        it, or when the link is this node's own connection.
        """
        link = self.links.get(peer_id)
        return self._running() and (link is None or link.initiated)
