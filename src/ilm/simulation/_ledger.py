"""
The simulator's record of what happened, and the invariants checked against
it as the simulation runs.

A *stream* is one ordered pair: (sender, sender's store generation) →
receiver.  A node's store generation counts how many times it lost its
store; each generation is one incarnation.  For every stream the ledger
keeps what the sender's store made durable (position by position), what the
receiver's store made durable (its delivery mark), and what the receiver's
application took, and checks each new fact against the others:

- a delivered message is the one the sender durably stored at that position
  (nothing undurable, nothing misplaced);
- deliveries follow positions 1, 2, 3, ... with no gap and no reordering;
  a position is delivered again only inside an at-least-once window
  (``docs/protocol.md``, "Durability"): after a receiver crash, the
  positions delivered since its last durable mark; after a receiver lost its
  store, the positions delivered but not yet durably acknowledged by the
  sender.  Each window allows each position once more, and is counted;
- a delivery mark never exceeds what the application took, and the sender
  never acknowledges beyond the receiver's durable mark;
- a node that opens its store finds exactly what landed in it: its
  incarnation, per peer the outbox's acknowledged and last positions and
  its pending bytes, and its delivery marks;
- at the end, every durably stored message is delivered, except those whose
  sender lost its store before they were acknowledged (counted apart).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from ilm._peerid import PeerId
from ilm._store import StoreBatch, StoredState

StreamKey = tuple[PeerId, int, PeerId]

# Status of a message handed to send_to.
SENT = 0
ACCEPTED = 1
REFUSED = 2


class Origin:
    """
    One message handed to ``send_to``, found again by its (unique) contents.
    """

    __slots__ = ("generation", "landed", "receiver", "sender", "serial", "status")

    def __init__(
        self, sender: PeerId, generation: int, receiver: PeerId, serial: int
    ) -> None:
        self.sender = sender
        self.generation = generation
        self.receiver = receiver
        self.serial = serial
        self.status = SENT
        self.landed = False


class Stream:
    """
    What the ledger knows about one stream.
    """

    __slots__ = (
        "accepted",
        "crash_window",
        "cursor",
        "high",
        "key",
        "loss_window",
        "mark",
        "max_mark",
        "rewind_allowed",
        "sender_acked",
        "sender_lost",
        "stored",
    )

    def __init__(self, key: StreamKey) -> None:
        self.key = key
        # Contents durably stored by the sender, position p at index p - 1.
        self.stored: list[bytes] = []
        # Positions whose send_to fired with a receipt.
        self.accepted: set[int] = set()
        # The sender's durable acknowledgement point.
        self.sender_acked = 0
        # Highest position the receiver's application took, and the position
        # of the latest delivery (lower than ``high`` while repeating).
        self.high = 0
        self.cursor = 0
        # The receiver's durable mark in its current store, and the highest
        # mark any of its stores ever made durable.
        self.mark = 0
        self.max_mark = 0
        # Positions that may be delivered once more, and why.
        self.crash_window: Counter[int] = Counter()
        self.loss_window: Counter[int] = Counter()
        # The receiver restarted: its next delivery may go back.
        self.rewind_allowed = False
        # The sender lost this generation's store.
        self.sender_lost = False

    def __repr__(self) -> str:
        sender, generation, receiver = self.key
        return f"{sender}(gen {generation})->{receiver}"


class Ledger:
    """
    The record and the invariants.

    :param violation: called with a description of every broken invariant.
    :param stats: counters this ledger adds to.
    """

    def __init__(self, violation: Callable[[str], None], stats: Counter[str]) -> None:
        self._violation = violation
        self.stats = stats
        self.streams: dict[StreamKey, Stream] = {}
        self.origins: dict[bytes, Origin] = {}
        self._generations: dict[tuple[PeerId, str], int] = {}
        self.current: dict[PeerId, int] = {}

    # -- records ---------------------------------------------------------------

    def stream(self, key: StreamKey) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = Stream(key)
            stream.sender_lost = key[1] < self.current.get(key[0], key[1])
        return stream

    def streams_to(self, receiver: PeerId) -> Iterator[Stream]:
        return (s for s in self.streams.values() if s.key[2] == receiver)

    def new_store(self, node: PeerId, generation: int, incarnation: str) -> None:
        """
        ``node`` runs on a new store (generation ``generation``).
        """
        self._generations[(node, incarnation)] = generation
        self.current[node] = generation

    def sent(
        self,
        sender: PeerId,
        generation: int,
        receiver: PeerId,
        contents: bytes,
        serial: int,
    ) -> None:
        self.origins[contents] = Origin(sender, generation, receiver, serial)
        self.stats["messages_sent"] += 1

    # -- facts from the stores -------------------------------------------------

    def landed(self, node: PeerId, generation: int, batch: StoreBatch) -> None:
        """
        ``batch`` became durable in ``node``'s store of ``generation``.
        """
        for peer, (first, contents) in batch.messages.items():
            stream = self.stream((node, generation, peer))
            if first != len(stream.stored) + 1:
                self._violation(
                    f"{stream}: store appended at position {first} after "
                    f"{len(stream.stored)}"
                )
            for item in contents:
                origin = self.origins.get(item)
                if origin is None:
                    self._violation(f"{stream}: stored contents never sent")
                    continue
                if origin.status == REFUSED:
                    self._violation(
                        f"{stream}: message #{origin.serial} stored after its "
                        "send_to was refused"
                    )
                origin.landed = True
            stream.stored.extend(contents)
        for peer, position in batch.acked.items():
            stream = self.stream((node, generation, peer))
            if position > stream.max_mark:
                self._violation(
                    f"{stream}: sender durably acknowledged {position}, beyond "
                    f"the receiver's durable mark {stream.max_mark}"
                )
            stream.sender_acked = max(stream.sender_acked, position)
        for (peer, incarnation), mark in batch.delivered.items():
            peer_generation = self._generations.get((peer, incarnation))
            if peer_generation is None:
                self._violation(
                    f"node {node} stored a mark for unknown incarnation "
                    f"{incarnation} of {peer}"
                )
                continue
            stream = self.stream((peer, peer_generation, node))
            if mark > stream.high:
                self._violation(
                    f"{stream}: receiver stored mark {mark} but its application "
                    f"took only up to {stream.high}"
                )
            if mark > len(stream.stored):
                self._violation(
                    f"{stream}: receiver stored mark {mark} beyond what the "
                    f"sender stored ({len(stream.stored)})"
                )
            stream.mark = max(stream.mark, mark)
            stream.max_mark = max(stream.max_mark, mark)

    def opened(self, node: PeerId, generation: int, state: StoredState) -> None:
        """
        ``node`` opened its store of ``generation`` and found ``state``:
        it must be exactly what landed in that store.
        """
        where = f"node {node} opened its store and found"
        if self._generations.get((node, state.incarnation)) != generation:
            self._violation(f"{where} incarnation {state.incarnation}, not its own")
            return
        outboxes = set()
        for record in state.outbound:
            peer = record.peer_id
            outboxes.add(peer)
            stream = self.streams.get((node, generation, peer))
            stored = stream.stored if stream is not None else []
            acked = stream.sender_acked if stream is not None else 0
            if (record.acked, record.last_position) != (acked, len(stored)):
                self._violation(
                    f"{where} its outbox to {peer} acknowledged up to "
                    f"{record.acked} and ending at {record.last_position}; what "
                    f"landed says {acked} and {len(stored)}"
                )
            elif record.pending_bytes != sum(map(len, stored[acked:])):
                self._violation(
                    f"{where} {record.pending_bytes} bytes pending to {peer}; "
                    f"what landed holds {sum(map(len, stored[acked:]))}"
                )
        for (sender, sender_generation, peer), stream in self.streams.items():
            if (sender, sender_generation) == (node, generation) and (
                len(stream.stored) and peer not in outboxes
            ):
                self._violation(f"{where} no outbox to {peer}; {stream} landed")
        marks = set()
        for mark in state.inbound:
            peer_generation = self._generations.get((mark.peer_id, mark.incarnation))
            if peer_generation is None:
                self._violation(
                    f"{where} a mark for unknown incarnation {mark.incarnation} "
                    f"of {mark.peer_id}"
                )
                continue
            stream = self.streams.get((mark.peer_id, peer_generation, node))
            expected = stream.mark if stream is not None else 0
            marks.add((mark.peer_id, peer_generation))
            if mark.delivered != expected:
                self._violation(
                    f"{where} delivery mark {mark.delivered} for {stream}; the "
                    f"marks that landed say {expected}"
                )
        for stream in self.streams_to(node):
            if stream.mark and (stream.key[0], stream.key[1]) not in marks:
                self._violation(
                    f"{where} no delivery mark for {stream}; {stream.mark} landed"
                )

    # -- facts from the senders ------------------------------------------------

    def accepted(self, contents: bytes, position: int) -> None:
        """
        ``send_to`` fired with a receipt for ``position``.
        """
        origin = self.origins[contents]
        origin.status = ACCEPTED
        stream = self.stream((origin.sender, origin.generation, origin.receiver))
        if not (
            0 < position <= len(stream.stored)
            and stream.stored[position - 1] == contents
        ):
            self._violation(
                f"{stream}: send_to of #{origin.serial} reported position "
                f"{position}, which is not where the store holds it"
            )
        stream.accepted.add(position)
        self.stats["messages_accepted"] += 1

    def in_doubt(self, contents: bytes) -> None:
        """
        ``send_to`` failed with ``StoreInDoubt``: the message may or may not
        be stored (counted with the sends whose node crashed).
        """
        self.stats["messages_store_in_doubt"] += 1

    def refused(self, contents: bytes) -> None:
        origin = self.origins[contents]
        if origin.landed:
            self._violation(
                f"message #{origin.serial} was refused although its store holds it"
            )
        origin.status = REFUSED
        self.stats["messages_refused"] += 1

    def check_data(
        self, sender: PeerId, receiver: PeerId, first: int, contents: list[bytes]
    ) -> None:
        """
        ``sender`` transmits ``contents`` at positions ``first, ...``: they
        must be durable in its store, at those positions.
        """
        stream = self.streams.get((sender, self.current[sender], receiver))
        stored = stream.stored if stream is not None else []
        last = first + len(contents) - 1
        if last > len(stored) or stored[first - 1 : last] != contents:
            self._violation(
                f"{sender}->{receiver}: transmitted positions {first}..{last} "
                f"that are not durably stored there ({len(stored)} stored)"
            )

    def check_ack(
        self,
        receiver: PeerId,
        sender: PeerId,
        delivered: int,
        sender_acked: int,
        incarnation: str | None = None,
    ) -> None:
        """
        ``receiver`` acknowledges ``delivered`` to ``sender`` (whose current
        acknowledgement point is ``sender_acked``): it must not exceed the
        receiver's durable mark.

        :param incarnation: the sender's incarnation whose stream the
            receiver acknowledges (``None``: the sender's current one).  A
            receiver that has not yet heard that the sender restarted with
            a new store (its link to the sender is half-open) acknowledges
            the old incarnation's stream; what the sender acknowledged in
            that store is then what counts.
        """
        generation = self.current[sender]
        if incarnation is not None:
            generation = self._generations.get((sender, incarnation), generation)
        stream = self.streams.get((sender, generation, receiver))
        if generation != self.current[sender]:
            sender_acked = stream.sender_acked if stream is not None else 0
        mark = stream.mark if stream is not None else 0
        if delivered > max(mark, sender_acked):
            self._violation(
                f"{sender}->{receiver}: receiver acknowledged {delivered} but "
                f"its durable mark is {mark}"
            )

    # -- facts from the receivers ----------------------------------------------

    def delivered(
        self, receiver: PeerId, source: object, position: int, contents: bytes
    ) -> None:
        """
        ``receiver``'s application took the message at ``position`` from
        ``source``.
        """
        self.stats["deliveries"] += 1
        origin = self.origins.get(contents)
        if origin is None:
            self._violation(f"node {receiver} was delivered contents never sent")
            return
        if origin.receiver != receiver or origin.sender != source:
            self._violation(
                f"message #{origin.serial} from {origin.sender} to "
                f"{origin.receiver} was delivered to {receiver} as from {source!r}"
            )
            return
        stream = self.stream((origin.sender, origin.generation, receiver))
        if not (0 < position <= len(stream.stored)) or (
            stream.stored[position - 1] != contents
        ):
            self._violation(
                f"{stream}: message #{origin.serial} delivered at position "
                f"{position}, which the sender's store does not hold there"
            )
            return
        if position != stream.cursor + 1:
            if not (stream.rewind_allowed and position <= stream.cursor):
                self._violation(
                    f"{stream}: position {position} delivered after "
                    f"{stream.cursor} (out of order)"
                )
        stream.rewind_allowed = False
        stream.cursor = position
        if position == stream.high + 1:
            stream.high = position
            self.stats["messages_delivered"] += 1
        elif position <= stream.high:
            if stream.crash_window[position] > 0:
                stream.crash_window[position] -= 1
                self.stats["duplicates_receiver_crash"] += 1
            elif stream.loss_window[position] > 0:
                stream.loss_window[position] -= 1
                self.stats["duplicates_receiver_store_loss"] += 1
            else:
                self._violation(
                    f"{stream}: position {position} delivered again outside the "
                    "at-least-once windows"
                )
        else:
            self._violation(
                f"{stream}: position {position} delivered but "
                f"{stream.high + 1}..{position - 1} never were (skipped)"
            )

    # -- crashes and store loss ------------------------------------------------

    def receiver_crashed(self, node: PeerId) -> None:
        """
        ``node`` died: what it delivered after its durable marks may come
        again.
        """
        for stream in self.streams_to(node):
            # The restarted node resumes after its durable mark, or after the
            # sender's acknowledgement point if it has no mark any more; each
            # position up to what it had taken may come once more.  A later
            # crash starts a new window (what was already repeated is then
            # below the new point, or inside the new window).
            low = max(stream.mark, stream.sender_acked)
            stream.crash_window = Counter(range(low + 1, stream.high + 1))
            stream.loss_window.clear()
            stream.rewind_allowed = True

    def lost_store(self, node: PeerId, generation: int) -> None:
        """
        ``node`` (already crashed) lost its store of ``generation``.

        As a receiver, it forgets its marks: what it delivered and the sender
        has not durably acknowledged may come again.  As a sender, its
        unacknowledged messages are gone with its store.
        """
        for stream in self.streams_to(node):
            stream.loss_window = Counter(
                range(stream.sender_acked + 1, stream.mark + 1)
            )
            stream.mark = 0
        for stream in self.streams.values():
            if stream.key[0] == node and stream.key[1] == generation:
                stream.sender_lost = True

    def check_clean_stop(self, node: PeerId) -> None:
        """
        ``node`` stopped cleanly: everything it delivered since it started
        is durably marked, so none of it will be delivered again.  (What an
        earlier crash left unmarked and has not come again yet still may.)
        """
        for stream in self.streams_to(node):
            if stream.rewind_allowed:
                continue  # nothing delivered since the restart
            low = max(stream.mark, stream.sender_acked)
            if stream.cursor > low:
                self._violation(
                    f"{stream}: a clean shutdown left positions {low + 1}.."
                    f"{stream.cursor} delivered but not durably marked"
                )

    # -- the end ---------------------------------------------------------------

    def expected(self, receiver: PeerId) -> list[bytes]:
        """
        The contents ``receiver`` must have been delivered once the faults
        stopped: everything durably stored for it, except what was lost with
        its sender's store.
        """
        result: list[bytes] = []
        for stream in self.streams_to(receiver):
            if stream.sender_lost:
                result.extend(stream.stored[: stream.high])
            else:
                result.extend(stream.stored)
        return result

    def undelivered(self) -> int:
        """
        Durably stored messages of live streams not yet delivered.
        """
        return sum(
            len(s.stored) - s.high for s in self.streams.values() if not s.sender_lost
        )

    def finish(self) -> None:
        """
        The final checks, once the faults stopped and everything settled.
        """
        stats = self.stats
        for stream in self.streams.values():
            missing = range(stream.high + 1, len(stream.stored) + 1)
            if stream.sender_lost:
                stats["lost_with_sender_store"] += len(missing)
                stats["lost_with_sender_store_accepted"] += sum(
                    1 for p in missing if p in stream.accepted
                )
                continue
            if missing:
                accepted = sum(1 for p in missing if p in stream.accepted)
                self._violation(
                    f"{stream}: positions {missing.start}..{missing.stop - 1} "
                    f"were stored ({accepted} of them accepted) but never "
                    "delivered"
                )
            if stream.mark != len(stream.stored):
                self._violation(
                    f"{stream}: receiver's durable mark is {stream.mark}, not "
                    f"{len(stream.stored)}"
                )
        for origin in self.origins.values():
            if origin.status == SENT:
                stats[
                    "messages_in_doubt_landed"
                    if origin.landed
                    else "messages_in_doubt_lost"
                ] += 1
