"""
The values exchanged between ILM and an :class:`ilm.interfaces.IBackend`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attr

from ilm._peerid import PeerId, check_peer_id
from ilm.errors import ILMError, StoreError

MAX_POSITION = 2**63 - 1
"""
The highest position a store holds (positions are signed 64-bit integers in
SQLite; see ``docs/protocol.md``).
"""

_INCARNATION = re.compile(r"[0-9a-f]{32}")


def valid_incarnation(incarnation: object) -> bool:
    """
    Whether ``incarnation`` is an incarnation id: 32 lowercase hex digits.
    """
    return type(incarnation) is str and _INCARNATION.fullmatch(incarnation) is not None


def within_bytes(contents: list[bytes], max_bytes: int) -> list[bytes]:
    """
    The longest prefix of ``contents`` holding at most ``max_bytes`` bytes,
    and at least its first item whatever its size: what
    ``IBackend.read_outbound`` returns of what it found.
    """
    total = 0
    count = 0
    for item in contents:
        total += len(item)
        if total > max_bytes and count:
            return contents[:count]
        count += 1
    return contents


def retirement_order(key: tuple[PeerId, str]) -> tuple[bool, str, str]:
    """
    The order in which backends retire the records of one batch (a set's
    own order is arbitrary, and runs must replay exactly).
    """
    peer_id, incarnation = key
    return (type(peer_id) is str, str(peer_id), incarnation)


def _position(value: object, low: int = 0) -> bool:
    return type(value) is int and low <= value <= MAX_POSITION


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
    contents (which are streamed with ``read_outbound``).  ``inbound`` lists
    each peer's retired incarnations in the order they were retired.
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
      the record if needed).  A backend remembers the order of retirements
      (:class:`StoredState` returns them in that order).
    - ``forgotten``: ``(peer_id, incarnation)`` records to delete (old
      retired incarnations beyond ``Config.max_retired_incarnations``).
      They are deleted *before* the batch's marks and retirements apply, so
      an incarnation forgotten and seen again as a new stream in one batch
      ends up with its new record.
    """

    messages: dict[PeerId, tuple[int, list[bytes]]] = attr.ib(factory=dict)
    acked: dict[PeerId, int] = attr.ib(factory=dict)
    delivered: dict[tuple[PeerId, str], int] = attr.ib(factory=dict)
    retired: set[tuple[PeerId, str]] = attr.ib(factory=set)
    forgotten: set[tuple[PeerId, str]] = attr.ib(factory=set)

    def __bool__(self) -> bool:
        return bool(
            self.messages
            or self.acked
            or self.delivered
            or self.retired
            or self.forgotten
        )

    def merge_bookkeeping(self, other: StoreBatch) -> None:
        """
        Fold the acknowledgements, marks, retirements and forgotten records
        of ``other`` (an earlier batch that failed) into this one, keeping
        the highest position of each.  What this batch forgets overrides
        ``other``'s marks and retirements of the same record.
        """
        for peer_id, position in other.acked.items():
            if position > self.acked.get(peer_id, -1):
                self.acked[peer_id] = position
        forgotten = self.forgotten
        for key, position in other.delivered.items():
            if key not in forgotten and position > self.delivered.get(key, -1):
                self.delivered[key] = position
        self.retired |= other.retired - forgotten
        self.forgotten |= other.forgotten

    def drop_peer(self, peer_id: PeerId) -> None:
        """
        Remove every entry of ``peer_id`` from this batch.
        """
        self.messages.pop(peer_id, None)
        self.acked.pop(peer_id, None)
        for key in [key for key in self.delivered if key[0] == peer_id]:
            del self.delivered[key]
        self.retired = {key for key in self.retired if key[0] != peer_id}
        self.forgotten = {key for key in self.forgotten if key[0] != peer_id}


def batch_problems(batch: StoreBatch, *, positions: bool = True) -> dict[PeerId, str]:
    """
    Find the entries of ``batch`` that no store can hold, whatever it
    already holds: an invalid peer id, a position outside ``[0, 2**63)``
    (messages from position 1), an incarnation that is not 32 lowercase hex
    digits.  The work is per entry, not per message.

    :param positions: whether the ``messages`` entries' first positions are
        to be checked (a store that assigns positions itself, such as a
        store shared by several gateways, ignores them).

    :return: per peer (an invalid id as it was given), what is wrong with
        its entries; empty when the batch is sound.
    """
    problems: dict[PeerId, str] = {}

    def peer_ok(peer_id: object) -> bool:
        try:
            return check_peer_id(peer_id) == peer_id
        except (TypeError, ILMError):
            problems[peer_id] = f"invalid peer id {peer_id!r}"  # type: ignore[index]
            return False

    for peer_id, (first, contents) in batch.messages.items():
        if (
            peer_ok(peer_id)
            and positions
            and not (_position(first, 1) and first + len(contents) - 1 <= MAX_POSITION)
        ):
            problems[peer_id] = (
                f"messages at positions {first}..{first + len(contents) - 1}"
            )
    for peer_id, position in batch.acked.items():
        if peer_ok(peer_id) and not _position(position):
            problems[peer_id] = f"acknowledgement of position {position}"
    for (peer_id, incarnation), position in batch.delivered.items():
        if not peer_ok(peer_id):
            continue
        if not valid_incarnation(incarnation):
            problems[peer_id] = f"delivery mark for incarnation {incarnation!r}"
        elif not _position(position):
            problems[peer_id] = f"delivery mark at position {position}"
    for peer_id, incarnation in batch.retired | batch.forgotten:
        if peer_ok(peer_id) and not valid_incarnation(incarnation):
            problems[peer_id] = f"record of incarnation {incarnation!r}"
    return problems


def check_batch(batch: StoreBatch, last_position: Callable[[PeerId], int]) -> None:
    """
    What every backend checks before it writes anything of a batch: every
    entry can be stored (:func:`batch_problems`), each peer's new messages
    start right after its ``last_position(peer_id)``, and no acknowledgement
    goes beyond what is stored.

    :raises StoreError: naming the first entry that fails; the backend then
        applies nothing.
    """
    problems = batch_problems(batch)
    if problems:
        peer_id, problem = next(iter(problems.items()))
        raise StoreError(
            f"batch refused: {problem} for peer {peer_id!r} cannot be stored"
        )
    for peer_id, (first, _contents) in batch.messages.items():
        last = last_position(peer_id)
        if first != last + 1:
            raise StoreError(
                f"outbox to {peer_id!r}: batch starts at {first}, store ends at {last}"
            )
    for peer_id, position in batch.acked.items():
        last = last_position(peer_id)
        added = len(batch.messages.get(peer_id, (0, []))[1])
        if position > last + added:
            raise StoreError(
                f"outbox to {peer_id!r}: acknowledgement {position} beyond {last}"
            )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CommitResult:
    """
    What a commit freed: per peer, the number of content bytes deleted from
    the outbox by the batch's ``acked`` entries.
    """

    released_bytes: dict[PeerId, int] = attr.ib(factory=dict)
