"""
What a group commit's outcome means for the peers: :class:`CommitOutcomes`.

A commit that succeeded hands its stored sends to their
:class:`ilm._sender.PeerSender` (which transmits them and gives their
receipts) and turns the delivery marks it made durable into ACKs (paced
by each peer's :class:`ilm._acks.AckPacer`); one that
failed refuses its sends; entries no store could hold are taken out of a
batch before it reaches the store, and their peer's link is closed.  These
are the :class:`ilm._committer.GroupCommitter`'s callbacks, per commit.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ilm._committer import Send
from ilm._node import NodeCore, Peer
from ilm._ownership_guard import GatewayStreams
from ilm._peer import HELLO_SENT, READY
from ilm._peerid import PeerId
from ilm._store import CommitResult, StoreBatch
from ilm.errors import ILMError, MalformedFrame, StoreError

__all__ = ["CommitOutcomes", "Links"]


class Links(Protocol):
    """What the outcomes need of the link routing."""

    def send_ack(self, peer: Peer) -> None:
        """Acknowledge what ``peer`` sent, now."""

    def violation(self, peer: Peer, violation: ILMError, logged: bool = False) -> None:
        """Close ``peer``'s link."""

    def forgotten(self, peer: Peer, incarnations: list[str]) -> None:
        """Forget retired incarnations of ``peer`` in the store too."""


class CommitOutcomes:
    """
    The group committer's callbacks.
    """

    def __init__(self, core: NodeCore, router: Links) -> None:
        self._core = core
        self._router = router
        #: Stream ownership, with a store shared by several gateways.
        self.streams: GatewayStreams | None = None

    def drop_unstorable(
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
            sender, first, contents, deferreds = entry
            peer_id = sender.peer_id
            if peer_id not in problems:
                kept.append(entry)
                continue
            sender.refused(
                first,
                contents,
                deferreds,
                StoreError(
                    f"messages to {peer_id!r} cannot be stored: "
                    f"{problems[peer_id]} is beyond what a store holds"
                ),
            )
        for peer_id, problem in problems.items():
            batch.drop_peer(peer_id)
            self._core.limited(
                ("store_entry_dropped", peer_id),
                LogLevel.error,
                "dropped the store entries of peer {peer_id!r} before they "
                "reached the store: {problem} cannot be stored",
                peer_id=peer_id,
                problem=problem,
                ilm_event="store_entry_dropped",
            )
            holder = self._core.peers.get(peer_id)
            if holder is not None and holder.link in (HELLO_SENT, READY):
                self._router.violation(
                    holder,
                    MalformedFrame(f"{problem}: beyond what a store holds"),
                    logged=True,
                )
        return kept

    def committed(
        self, result: CommitResult, batch: StoreBatch, sends: list[Send]
    ) -> list[Send]:
        peers = self._core.peers
        if result is not None:
            for peer_id, released in result.released_bytes.items():
                holder = peers.get(peer_id)
                if holder is not None:
                    holder.sender.outbox_bytes -= released
        # A dict, not a set: peers are acknowledged in the batch's order, not
        # in an order that depends on object addresses (runs must replay
        # exactly on a Clock).
        acknowledge: dict[Peer, None] = {}
        streams = self.streams
        for (peer_id, incarnation), position in batch.delivered.items():
            peer = peers.get(peer_id)
            # (None: a stream this gateway dropped meanwhile.)
            if peer is None or (
                streams is not None
                and streams.ahead_of_stream(peer, incarnation, position)
            ):
                continue
            if peer.marked(incarnation, position):
                acknowledge[peer] = None
        for peer in acknowledge:
            if peer.ack() is not None:
                # Now, or paced (ilm._acks): the sender's window decides.
                out = peer.out
                peer.acks.committed(
                    peer.inbound[-1], out.send_window, out.send_window_bytes
                )
            forgotten = peer.drop_drained_streams()
            if forgotten:
                self._router.forgotten(peer, forgotten)
        stored: list[Send] = []
        for sender, first, contents, deferreds in sends:
            if streams is not None:
                first = streams.stored_at(sender, first, result)
            sender.stored(first, contents)
            stored.append((sender, first, contents, deferreds))
        return stored

    @staticmethod
    def receipts(sends: list[Send]) -> None:
        for sender, first, _, deferreds in sends:
            sender.give_receipts(first, deferreds)

    def failed(self, reason: Failure, sends: list[Send], delay: float) -> None:
        if self.streams is not None and self.streams.guard.commit_failed(reason):
            if not sends:
                return  # the fenced streams were dropped, and that logged
        refused = 0
        for sender, first, contents, deferreds in sends:
            refused += len(contents)
            sender.refused(first, contents, deferreds, reason)
        self._core.limited(
            ("store_commit_failed", type(reason.value).__name__),
            LogLevel.critical,
            "store commit failed: {refused} message(s) refused; acknowledgements "
            "and delivery marks retried in {delay:.2f}s",
            reason,
            refused=refused,
            delay=delay,
            ilm_event="store_commit_failed",
        )
