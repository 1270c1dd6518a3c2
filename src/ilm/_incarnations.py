"""
What the store learns about a peer's incarnations: the retirements, the
delivery mark and the forgotten incarnations a completed handshake
decided, and the warning when the peer no longer has messages this node's
store does not record as delivered.  :class:`IncarnationRecords` only adds
to the group committer's next batch and logs; :class:`ilm._link.PeerRouter`
calls it.
"""

from __future__ import annotations

from twisted.logger import LogLevel

from ilm._committer import GroupCommitter
from ilm._node import NodeCore, Peer
from ilm._nodelog import log
from ilm._peer import HelloOutcome
from ilm._session import Hello

__all__ = ["IncarnationRecords"]


class IncarnationRecords:
    """
    A peer's incarnations as the store must record them, added to the
    bookkeeping of ``committer``'s next commit.
    """

    def __init__(self, core: NodeCore, committer: GroupCommitter) -> None:
        self._core = core
        self._committer = committer

    def resumed(self, peer: Peer, hello: Hello, outcome: HelloOutcome) -> None:
        """
        The handshake with ``peer`` completed on ``hello`` with ``outcome``:
        its retired incarnations, its delivery mark and its forgotten
        incarnations go to the store; lost messages are reported.
        """
        core = self._core
        pid = peer.peer_id
        incarnation = hello.incarnation
        bookkeeping = self._committer.bookkeeping
        for old in outcome.retired:
            bookkeeping.retired.add((pid, old))
            core.limited(
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
            self.forgotten(peer, outcome.forgotten)
        if outcome.lost is not None and outcome.mark is not None:
            first, last = outcome.lost
            core.limited(
                ("messages_lost", pid),
                LogLevel.critical,
                "peer {peer_id!r} no longer has positions {first}..{last} of its "
                "stream, which this node's store does not record as delivered: "
                "this node's store lost committed data; continuing after them",
                peer_id=pid,
                first=first,
                last=last,
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

    def forgotten(self, peer: Peer, incarnations: list[str]) -> None:
        """
        The session forgot these retired incarnations of ``peer``: so does
        the store, with the next commit.
        """
        committer = self._committer
        bookkeeping = committer.bookkeeping
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
        committer.schedule(self._core.config.delete_delay)
