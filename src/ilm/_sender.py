"""
One peer's outbound side: :class:`PeerSender`, and the :class:`Receipt` it
gives for each stored message.

The sender keeps the outbox counters and limits and the messages accepted
since the last group commit, hands stored messages to its
:class:`ilm._transmitter.Transmitter` (which writes MESSAGES frames as the
window allows, reads the store, and retransmits), takes the peer's ACKs
and NACKs, and fires the receipts' ``acknowledged`` waiters.  The
decisions (what an ACK or a NACK acknowledges) are the pure
:class:`ilm._session.OutboundStream`'s.  Per message everything is plain
method calls: an append here, the rest per commit or per frame.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ilm._committer import GroupCommitter
from ilm._config import Config
from ilm._lean_deferred import new_deferred, unobserved
from ilm._peer import PeerSession
from ilm._peerid import PeerId
from ilm._transmitter import Transmitter, TransmitterHost
from ilm.errors import (
    MessageTooLarge,
    OutboxFull,
    SendRefused,
    StoppedBeforeAcknowledged,
)
from ilm.interfaces import IBackend, INetwork

__all__ = ["PeerSender", "Receipt", "ReceiptWaiter", "SenderHost"]

# Ties between waiters on the same position fire in the order they came.
_waiter_order = itertools.count()


class Receipt:
    """
    Proof that ``send_to`` stored a message: from now on ILM owns it.

    ``peer_id`` and ``message_id`` identify the message; ``acknowledged`` is
    a new ``Deferred`` (each time it is read) that fires with this receipt
    once the peer has durably received the message, or fails with
    :class:`ilm.errors.StoppedBeforeAcknowledged` if this node stops first
    (the message stays stored and is sent after the next start).
    """

    __slots__ = ("_sender", "message_id", "peer_id")

    def __init__(self, sender: PeerSender, peer_id: PeerId, message_id: int) -> None:
        self._sender = sender
        self.peer_id = peer_id
        self.message_id = message_id

    @property
    def acknowledged(self) -> Deferred[Receipt]:
        return self._sender.when_acknowledged(self)

    def __repr__(self) -> str:
        return f"Receipt(peer_id={self.peer_id!r}, message_id={self.message_id})"


class ReceiptWaiter(Protocol):
    """What waits for a stored message's receipt: a Deferred, or a batch."""

    def callback(self, result: Receipt) -> object: ...

    def errback(self, fail: Failure | Exception) -> object: ...


class _Receipts:
    """
    The receipts of one ``send_many``, gathered for its one Deferred: it
    stands for each of the batch's messages in the pending list, so that a
    commit hands it one receipt per message, in order, or fails it.
    """

    __slots__ = ("_count", "_d", "_receipts")

    def __init__(self, d: Deferred[list[Receipt]], count: int) -> None:
        self._d = d
        self._count = count
        self._receipts: list[Receipt] = []

    def callback(self, result: Receipt) -> None:
        receipts = self._receipts
        receipts.append(result)
        if len(receipts) == self._count:
            self._d.callback(receipts)

    def stored(self, sender: PeerSender, first: int) -> int:
        """
        All of the batch's messages were stored from position ``first``:
        fire with their receipts.

        :return: how many messages the batch has.
        """
        count = self._count
        peer_id = sender.peer_id
        self._d.callback(
            [Receipt(sender, peer_id, p) for p in range(first, first + count)]
        )
        return count

    def errback(self, fail: Failure | Exception) -> None:
        if not self._d.called:
            self._d.errback(fail)


class SenderHost(TransmitterHost, Protocol):
    """
    What a :class:`PeerSender` needs of the node around it.
    """

    @property
    def ended(self) -> str | None:
        """How the node ended ("ILM node 1 stopped"), or ``None`` (it runs)."""

    def check_drained(self) -> None:
        """Messages were acknowledged: the node may be drained."""


class PeerSender:
    """
    Sends one peer's stored messages and keeps its outbox.

    :param session: the peer's protocol state (its outbound stream and
        link phase).
    :param frame_target: the size MESSAGES frames are cut to.
    """

    __slots__ = (
        "_clock",
        "_committer",
        "_config",
        "_host",
        "accept_times",
        "accepted_at",
        "acked_total",
        "others_bytes",
        "others_count",
        "out",
        "outbox_bytes",
        "outbox_count",
        "peer_id",
        "pending",
        "pending_deferreds",
        "sent_total",
        "session",
        "transmitter",
        "waiters",
    )

    def __init__(
        self,
        session: PeerSession,
        *,
        network: INetwork,
        backend: IBackend,
        committer: GroupCommitter,
        host: SenderHost,
        clock: IReactorTime,
        config: Config,
        frame_target: int,
    ) -> None:
        self.session = session
        self.peer_id = session.peer_id
        out = self.out = session.out
        self._committer = committer
        self._host = host
        self._clock = clock
        self._config = config
        #: Writes the stored messages to the network, retransmits, reads
        #: the store.
        self.transmitter = Transmitter(
            session,
            network=network,
            backend=backend,
            host=host,
            clock=clock,
            config=config,
            frame_target=frame_target,
        )
        #: Accepted since the last commit, and their send_to Deferreds.
        self.pending: list[bytes] = []
        self.pending_deferreds: list[ReceiptWaiter] = []
        #: Accepted and not acknowledged (the outbox limits count these).
        self.outbox_count = out.stored - out.acked
        self.outbox_bytes = 0
        #: With a store shared by several gateways: what it held for the
        #: peer at the last look beyond this gateway's own counts (other
        #: gateways' messages); the outbox limits count these too.
        self.others_count = 0
        self.others_bytes = 0
        #: (position, order, Deferred, receipt), a heap.
        self.waiters: list[tuple[int, int, Deferred[Receipt], Receipt]] = []
        # What peer_status() reports.  Counters since the node started.
        self.sent_total = 0
        self.acked_total = 0
        # When the first message of ``pending`` was accepted; per commit,
        # (last position stored, when its first message was accepted).
        self.accepted_at = 0.0
        self.accept_times: deque[tuple[int, float]] = deque()

    @property
    def retransmitted(self) -> int:
        """Messages sent again since the node started."""
        return self.transmitter.retransmitted

    # -- accepting and storing -----------------------------------------------

    def refusal(self, count: int, size: int, largest: int) -> SendRefused | None:
        """
        Whether ``count`` more messages of ``size`` bytes together, the
        largest ``largest`` bytes, fit the peer's limits.

        :return: the refusal, or ``None`` if they may be appended.
        """
        limit = self.session.max_message
        if largest > limit:
            return MessageTooLarge(
                largest,
                limit,
                f"message of {largest} bytes exceeds the {limit} bytes "
                f"peer {self.peer_id!r} accepts",
            )
        config = self._config
        if self.outbox_count + self.others_count + count > config.max_outbox_messages:
            return OutboxFull(self.peer_id, "messages", config.max_outbox_messages)
        if self.outbox_bytes + self.others_bytes + size > config.max_outbox_bytes:
            return OutboxFull(self.peer_id, "bytes", config.max_outbox_bytes)
        return None

    def append(self, contents: bytes, size: int) -> Deferred[Receipt]:
        """
        Accept a message (checked against the limits by the caller) for
        the next group commit.
        """
        d: Deferred[Receipt] = new_deferred()
        pending = self.pending
        if not pending:
            self._committer.outboxes[self.peer_id] = self
            self.accepted_at = self._clock.seconds()
        pending.append(contents)
        self.pending_deferreds.append(d)
        self.outbox_count += 1
        self.outbox_bytes += size
        committer = self._committer
        if not committer.asked_now:
            committer.commit_now()
        return d

    def append_many(self, contents: list[bytes], size: int) -> Deferred[list[Receipt]]:
        """
        Accept messages (``size`` bytes together, checked against the
        limits by the caller) for the next group commit, all in it: one
        Deferred fires with their receipts, in order, or fails.
        """
        d: Deferred[list[Receipt]] = Deferred()
        pending = self.pending
        if not pending:
            self._committer.outboxes[self.peer_id] = self
            self.accepted_at = self._clock.seconds()
        count = len(contents)
        pending.extend(contents)
        self.pending_deferreds.extend([_Receipts(d, count)] * count)
        self.outbox_count += count
        self.outbox_bytes += size
        committer = self._committer
        if not committer.asked_now:
            committer.commit_now()
        return d

    def take_pending(self, limit: int) -> tuple[int, list[bytes], list[ReceiptWaiter]]:
        """
        The messages accepted since the last commit, for the next one: the
        first ``limit`` of them, and the rest of a ``send_many`` list that
        ``limit`` would cut (a list is stored in one commit).
        """
        first = self.out.stored + 1
        contents, deferreds = self.pending, self.pending_deferreds
        if len(contents) > limit:
            cut = limit
            last = deferreds[cut - 1]
            while cut < len(deferreds) and deferreds[cut] is last:
                cut += 1
            self.pending = contents[cut:]
            self.pending_deferreds = deferreds[cut:]
            del contents[cut:]
            del deferreds[cut:]
        else:
            self.pending = []
            self.pending_deferreds = []
        self.sent_total += len(contents)
        self.accept_times.append((first + len(contents) - 1, self.accepted_at))
        return first, contents, deferreds

    def stored(self, first: int, contents: list[bytes]) -> None:
        """
        A commit stored ``contents`` from position ``first``: the next
        commit's positions follow them.  :meth:`give_receipts` transmits
        them and gives their receipts.
        """
        if first == self.out.stored + 1:
            # (Else a shared store's peer restarted from a state that
            # already counts them: ilm._ownership_guard.)
            self.out.on_stored(first, contents)

    def give_receipts(self, first: int, deferreds: list[ReceiptWaiter]) -> None:
        """
        Transmit what was stored, and give the receipts of the messages
        stored from ``first`` to what waits for them.
        """
        self.transmitter.pump()
        peer_id = self.peer_id
        offset = 0
        total = len(deferreds)
        while offset < total:
            d = deferreds[offset]
            if type(d) is _Receipts:
                # A send_many's messages are in one commit, side by side.
                offset += d.stored(self, first + offset)
            else:
                # Let go of each Deferred here: one that nobody else holds
                # is freed at once, instead of a commit's worth of them
                # living through collections, and needs no receipt (the
                # application dropped it, and nothing can see it fire).
                deferreds[offset] = None  # type: ignore[call-overload]
                if not unobserved(d):
                    d.callback(Receipt(self, peer_id, first + offset))
                offset += 1

    def refused(
        self,
        first: int,
        contents: list[bytes],
        deferreds: list[ReceiptWaiter],
        reason: Failure | Exception,
    ) -> None:
        """
        A commit did not store ``contents``: they leave the outbox and
        their ``send_to`` Deferreds fail with ``reason``.
        """
        self.outbox_count -= len(contents)
        self.outbox_bytes -= sum(map(len, contents))
        times = self.accept_times
        if times and times[-1][0] == first + len(contents) - 1:
            times.pop()
        for d in deferreds:
            d.errback(reason)

    # -- transmission --------------------------------------------------------

    def pump(self) -> None:
        """
        Transmit what the window allows; read from the store what the
        stream's cache lacks.
        """
        self.transmitter.pump()

    # -- acknowledgements ----------------------------------------------------

    def on_ack(self, delivered: int, received: int) -> None:
        """
        The peer's ACK: ``delivered`` durably received, ``received`` held.
        """
        newly, progress = self.out.on_ack(delivered, received)
        if newly:
            self.acknowledged(newly)
        transmitter = self.transmitter
        if progress:
            transmitter.progressed()
        transmitter.pump()

    def on_nack(self, expected: int) -> None:
        """
        The peer's NACK: it expects ``expected`` next.
        """
        self.transmitter.on_nack(expected)

    def acknowledged(self, newly: int) -> None:
        """
        ``newly`` more messages were acknowledged (by an ACK or a RESUME).
        """
        acked = self.out.acked
        self.outbox_count -= newly
        self.acked_total += newly
        times = self.accept_times
        while times and times[0][0] <= acked:
            times.popleft()
        committer = self._committer
        committer.bookkeeping.acked[self.peer_id] = acked
        # Deleting acknowledged messages can wait to share a commit: if it is
        # lost in a crash, they are sent again and the peer takes them as
        # duplicates.
        committer.schedule(self._config.delete_delay)
        waiters = self.waiters
        while waiters and waiters[0][0] <= acked:
            _, _, d, receipt = heapq.heappop(waiters)
            d.callback(receipt)
        self._host.check_drained()

    def when_acknowledged(self, receipt: Receipt) -> Deferred[Receipt]:
        """
        :return: a Deferred firing with ``receipt`` once its message is
            acknowledged (at once if it is).
        """
        if receipt.message_id <= self.out.acked:
            return succeed(receipt)
        ended = self._host.ended
        if ended is not None:
            return fail(
                StoppedBeforeAcknowledged(receipt.peer_id, receipt.message_id, ended)
            )
        d: Deferred[Receipt] = Deferred()
        heapq.heappush(
            self.waiters, (receipt.message_id, next(_waiter_order), d, receipt)
        )
        return d

    # -- links and stopping --------------------------------------------------

    def link_lost(self) -> None:
        """
        The link went: nothing in flight to time out any more.
        """
        self.transmitter.link_lost()

    def cancel_timers(self) -> None:
        self.transmitter.cancel_timers()

    def stop(self, detail: str) -> None:
        """
        The node stopped: no timers, and the receipts still waiting fail.
        """
        self.cancel_timers()
        waiters, self.waiters = self.waiters, []
        for _, _, d, receipt in waiters:
            d.errback(
                StoppedBeforeAcknowledged(receipt.peer_id, receipt.message_id, detail)
            )
