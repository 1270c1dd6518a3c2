"""
One peer's outbound side: :class:`PeerSender`, and the :class:`Receipt` it
gives for each stored message.

The sender keeps the outbox counters and limits, the messages accepted
since the last group commit, reads what the window allows from
``IBackend.read_outbound``, writes MESSAGES frames with
``INetwork.send_frames``, runs the retransmission timer and the read retry
(each with the shared :class:`ilm._backoff.Backoff`), and fires the
receipts' ``acknowledged`` waiters.  The decisions (what to send, what an
ACK or a NACK acknowledges, when to retransmit) are the pure
:class:`ilm._session.OutboundStream`'s.  Per message everything is plain
method calls: an append here, the rest per commit or per frame.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ilm import _frames
from ilm._backoff import Backoff, Retry
from ilm._committer import GroupCommitter
from ilm._config import Config
from ilm._lean_deferred import new_deferred
from ilm._nodelog import NodeLogging, log
from ilm._peer import READY, PeerSession
from ilm._peerid import PeerId
from ilm.errors import (
    MessageTooLarge,
    OutboxFull,
    SendRefused,
    StoppedBeforeAcknowledged,
    StoreError,
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


class SenderHost(NodeLogging, Protocol):
    """
    What a :class:`PeerSender` needs of the node around it.
    """

    @property
    def ended(self) -> str | None:
        """How the node ended ("ILM node 1 stopped"), or ``None`` (it runs)."""

    def later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        """Call ``function`` after ``delay`` seconds, logging what it raises."""

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
        "_backend",
        "_clock",
        "_committer",
        "_config",
        "_frame_target",
        "_host",
        "_network",
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
        "read_call",
        "read_retry",
        "retransmit_call",
        "retransmit_retry",
        "retransmitted",
        "sent_high",
        "sent_total",
        "session",
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
        self._network = network
        self._backend = backend
        self._committer = committer
        self._host = host
        self._clock = clock
        self._config = config
        self._frame_target = frame_target
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
        self.retransmit_call: IDelayedCall | None = None
        self.retransmit_retry = Retry(
            Backoff.exact(config.retransmit_timeout, config.max_retransmit_timeout)
        )
        self.read_call: IDelayedCall | None = None
        self.read_retry = Retry(
            Backoff.exact(config.store_retry, config.max_store_retry)
        )
        # What peer_status() reports.  Counters since the node started.
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

    def stored(
        self, first: int, contents: list[bytes], deferreds: list[ReceiptWaiter]
    ) -> None:
        """
        A commit stored ``contents`` from position ``first``: transmit them,
        give their receipts.
        """
        if first == self.out.stored + 1:
            # (Else a shared store's peer restarted from a state that
            # already counts them: ilm._ownership_guard.)
            self.out.on_stored(first, contents)
        self.pump()
        peer_id = self.peer_id
        offset = 0
        total = len(deferreds)
        while offset < total:
            d = deferreds[offset]
            if type(d) is _Receipts:
                # A send_many's messages are in one commit, side by side.
                offset += d.stored(self, first + offset)
            else:
                # Let go of each Deferred once fired: one that nobody else
                # holds is freed at once with its receipt, instead of a
                # commit's worth of them living through collections.
                deferreds[offset] = None  # type: ignore[call-overload]
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
        session = self.session
        if session.link != READY or session.paused:
            return
        out = self.out
        first, chunk = out.take()
        if out.held_at and not session.hold_reported:
            session.hold_reported = True
            self._host.limited(
                ("message_too_large_for_peer", self.peer_id),
                LogLevel.error,
                "message {position} to {peer_id!r} is larger than the {limit} bytes "
                "that peer accepts: its stream waits there until the peer "
                "accepts larger messages",
                position=out.held_at,
                peer_id=self.peer_id,
                limit=out.max_message,
                ilm_event="message_too_large_for_peer",
            )
        if chunk:
            last = first + len(chunk) - 1
            if first <= self.sent_high:
                self.retransmitted += min(last, self.sent_high) - first + 1
            if last > self.sent_high:
                self.sent_high = last
            self._network.send_frames(
                self.peer_id,
                _frames.encode_messages(first, chunk, self._frame_target),
            )
            if self.retransmit_call is None:
                self.retransmit_call = self._host.later(
                    self.retransmit_retry.next_delay, self._retransmit
                )
        if self.read_call is None:
            request = out.read_request(self._config.read_batch)
            if request is not None:
                after, limit, max_bytes = request
                try:
                    d = self._backend.read_outbound(
                        self.peer_id, after, limit, max_bytes
                    )
                except Exception:
                    d = fail()
                d.addCallbacks(
                    self._read_done,
                    self._read_failed,
                    callbackArgs=(after,),
                    errbackArgs=(after,),
                )
                d.addErrback(self._host.unexpected, "reading the outbox")

    def _read_done(self, contents: list[bytes], after: int) -> None:
        out = self.out
        out.on_read(after, contents)
        if contents:
            # Only a read that returned something ends the backoff: an
            # outbox that keeps answering nothing (a damaged or tampered
            # store) is asked again ever more slowly.
            self.read_retry.succeeded()
        if not contents and out.cache_end < out.stored and after >= out.acked:
            self._read_failed(
                Failure(
                    StoreError(
                        f"outbox to {self.peer_id!r} returned nothing after "
                        f"position {after} though {out.stored} are stored"
                    )
                ),
            )
            return
        self.pump()

    def _read_failed(self, reason: Failure, after: int | None = None) -> None:
        out = self.out
        out.reading = False
        if after is not None and after < out.acked:
            # An acknowledgement overtook this read (it was committed while
            # the read was in flight, as a store whose reads run apart from
            # its commits allows) and the store refused to read below it.
            # Nothing is wrong with the store: read again from the new point.
            log.debug(
                "outbox read to {peer_id!r} after {after} overtaken by the "
                "acknowledgement of {acked}; reading again",
                peer_id=self.peer_id,
                after=after,
                acked=out.acked,
            )
            self.pump()
            return
        delay = self.read_retry.failed()
        self._host.limited(
            ("outbox_read_failed", self.peer_id),
            LogLevel.critical,
            "reading the outbox to {peer_id!r} failed; retrying in {delay:.2f}s",
            reason,
            peer_id=self.peer_id,
            delay=delay,
            ilm_event="outbox_read_failed",
        )
        self.read_call = self._host.later(delay, self._read_retry)

    def _read_retry(self) -> None:
        self.read_call = None
        self.pump()

    def _retransmit(self) -> None:
        self.retransmit_call = None
        if self.session.link != READY:
            return
        out = self.out
        if out.retransmit(self._clock.seconds(), self._config.retransmit_timeout):
            log.debug(
                "retransmitting to {peer_id!r} from position {position}",
                peer_id=self.peer_id,
                position=out.sent + 1,
            )
            self.retransmit_retry.failed()
            self.pump()
        elif out.outstanding:
            self.retransmit_call = self._host.later(
                self.retransmit_retry.next_delay, self._retransmit
            )

    # -- acknowledgements ----------------------------------------------------

    def on_ack(self, delivered: int, received: int) -> None:
        """
        The peer's ACK: ``delivered`` durably received, ``received`` held.
        """
        newly, progress = self.out.on_ack(delivered, received)
        if newly:
            self.acknowledged(newly)
        if progress:
            self.retransmit_retry.succeeded()
            call = self.retransmit_call
            if call is not None:
                if call.active():
                    call.cancel()
                self.retransmit_call = None
            if self.out.outstanding:
                self.retransmit_call = self._host.later(
                    self.retransmit_retry.next_delay, self._retransmit
                )
        self.pump()

    def on_nack(self, expected: int) -> None:
        """
        The peer's NACK: it expects ``expected`` next.
        """
        if self.out.on_nack(
            expected, self._clock.seconds(), self._config.retransmit_timeout
        ):
            self.pump()

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
        call, self.retransmit_call = self.retransmit_call, None
        if call is not None and call.active():
            call.cancel()
        self.retransmit_retry.succeeded()

    def cancel_timers(self) -> None:
        for call in (self.retransmit_call, self.read_call):
            if call is not None and call.active():
                call.cancel()
        self.retransmit_call = self.read_call = None

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
