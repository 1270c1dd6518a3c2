"""
The values exchanged between ILM and an :class:`ilm.interfaces.IBackend`.
"""

from __future__ import annotations

import attr

from ilm._message import PeerId


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OutboundRecord:
    """
    The durable state of the stream from this node to one peer.

    ``acked``: every position up to and including it has been acknowledged by
    the peer and is no longer in the outbox.  ``last_position``: the highest
    position ever stored (equal to ``acked`` when the outbox is empty).
    ``pending_bytes``: total size of the contents still in the outbox.
    """

    peer_id: PeerId
    acked: int
    last_position: int
    pending_bytes: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class InboundRecord:
    """
    The delivery mark of the stream from one incarnation of a peer to this
    node: every position up to and including ``delivered`` has been handed to
    the application.  ``retired`` records that the peer has since come back
    with a newer incarnation; a retired incarnation is refused if it shows up
    again.
    """

    peer_id: PeerId
    incarnation: str
    delivered: int
    retired: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StoredState:
    """
    Everything ILM needs to resume after a restart, except the outbox
    contents (which are streamed with ``read_outbound``).
    """

    incarnation: str
    outbound: tuple[OutboundRecord, ...] = ()
    inbound: tuple[InboundRecord, ...] = ()


@attr.s(slots=True, auto_attribs=True)
class StoreBatch:
    """
    One atomic set of changes, built by ILM and applied by a backend's
    ``commit``.

    - ``messages``: per peer, ``(first_position, [contents, ...])``: new
      outbound messages at consecutive positions starting at
      ``first_position`` (always one past the peer's current
      ``last_position``).
    - ``acked``: per peer, a position: delete every outbound message up to
      and including it and record it as the peer's ``acked``.
    - ``delivered``: per ``(peer_id, incarnation)``, a delivery mark to create
      or raise.
    - ``retired``: ``(peer_id, incarnation)`` pairs to mark retired (creating
      the record if needed).
    """

    messages: dict[PeerId, tuple[int, list[bytes]]] = attr.ib(factory=dict)
    acked: dict[PeerId, int] = attr.ib(factory=dict)
    delivered: dict[tuple[PeerId, str], int] = attr.ib(factory=dict)
    retired: set[tuple[PeerId, str]] = attr.ib(factory=set)

    def __bool__(self) -> bool:
        return bool(self.messages or self.acked or self.delivered or self.retired)

    def merge_bookkeeping(self, other: StoreBatch) -> None:
        """
        Fold the acknowledgements, marks and retirements of ``other`` (an
        earlier batch that failed) into this one, keeping the highest
        position of each.
        """
        for peer_id, position in other.acked.items():
            if position > self.acked.get(peer_id, -1):
                self.acked[peer_id] = position
        for key, position in other.delivered.items():
            if position > self.delivered.get(key, -1):
                self.delivered[key] = position
        self.retired |= other.retired


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CommitResult:
    """
    What a commit freed: per peer, the number of content bytes deleted from
    the outbox by the batch's ``acked`` entries.
    """

    released_bytes: dict[PeerId, int] = attr.ib(factory=dict)
