"""
In-order delivery of one peer's messages to the local application.

A :class:`PeerDeliverer` hands the messages its peer's inbound streams
queue (oldest incarnation first) to the node's ``ILocalDelivery``, one at a
time and in order; a failed delivery holds the line and is retried with
the shared :class:`ilm._backoff.Backoff`.  What was delivered becomes a
delivery mark in the next group commit; the acknowledgement of marks that
wait for a commit is delayed by the ack timer.  What a delivery's return
value means is :func:`ilm._delivery.delivery_outcome`'s one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ilm._backoff import Backoff
from ilm._committer import GroupCommitter
from ilm._delivery import QueueDelivery, delivery_outcome
from ilm._delivery_hold import MAX_RETRY_AFTER, DeliveryHold, one_line
from ilm._delivery_latency import DeliveryLatency
from ilm._message import Message, make_message
from ilm._nodelog import NodeLogging
from ilm._peerid import PeerId
from ilm._session import InboundStream
from ilm._status import HistogramCounter
from ilm.interfaces import IBatchDelivery, ILocalDelivery

#: The most messages handed to a ``DeferredQueue`` in one run
#: (:meth:`ilm._delivery.QueueDelivery.put_run`): what a consumer may find
#: queued at once, where one ``put`` per message would leave none.
QUEUE_RUN = 64

#: How long a delivery mark may wait for its commit, per peer whose marks
#: the last commit carried, when that is longer than ``Config.mark_delay``.
#: A commit costs the reactor a few microseconds per peer it carries marks
#: for (the marks, the acknowledgement decision): spacing commits by this
#: much per such peer keeps that a few per cent of the reactor's time
#: however many peers are busy (after a commit for 1,000 peers the next
#: may wait 0.1 s), while a few busy peers still commit every
#: ``mark_delay``.
MARK_DELAY_PER_PEER = 0.0001

__all__ = [
    "MARK_DELAY_PER_PEER",
    "MAX_RETRY_AFTER",
    "DeliveryHost",
    "PeerDeliverer",
    "one_line",
]


class DeliveryHost(NodeLogging, Protocol):
    """
    What a :class:`PeerDeliverer` needs of the node around it.
    """

    @property
    def deliveries_allowed(self) -> bool:
        """Whether a new delivery may start (not while the node stops)."""

    def delivery_settled(self) -> None:
        """A delivery that was in progress settled."""

    def guard(self, function: Callable[..., object], *args: object) -> None:
        """Run ``function``, logging what it raises."""


class PeerDeliverer:
    """
    Delivers one peer's queued messages in order.

    :param streams: the peer's inbound streams, oldest first (read afresh
        each time: the session replaces the list).
    :param ready: whether the link to the peer is up (the session
        handshake done).
    :param acknowledge: sends an acknowledgement now.
    :param unstarve: asks the peer to send again what a starved stream
        dropped (``(stream)``).
    """

    __slots__ = (
        "_ack_delay",
        "_acknowledge",
        "_clock",
        "_committer",
        "_deliver_many",
        "_host",
        "_later",
        "_local_id",
        "_mark_delay",
        "_put_run",
        "_ready",
        "_streams",
        "_target",
        "_unstarve",
        "ack_call",
        "delivered",
        "delivering",
        "hold",
        "in_loop",
        "latency",
        "peer_id",
    )

    def __init__(
        self,
        peer_id: PeerId,
        local_id: PeerId,
        *,
        target: ILocalDelivery,
        streams: Callable[[], list[InboundStream]],
        ready: Callable[[], bool],
        acknowledge: Callable[[], None],
        unstarve: Callable[[InboundStream], None],
        committer: GroupCommitter,
        host: DeliveryHost,
        clock: IReactorTime,
        later: Callable[..., IDelayedCall],
        backoff: Backoff,
        ack_delay: float,
        mark_delay: float,
        latency: HistogramCounter,
    ) -> None:
        self.peer_id = peer_id
        self._local_id = local_id
        self._target = target
        self._streams = streams
        self._ready = ready
        self._acknowledge = acknowledge
        self._unstarve = unstarve
        self._committer = committer
        self._host = host
        self._clock = clock
        self._later = later
        self._ack_delay = ack_delay
        self._mark_delay = mark_delay
        #: Deliveries held behind a failed one (ilm._delivery_hold).
        self.hold = DeliveryHold(
            peer_id,
            clock=clock,
            later=later,
            log=host,
            backoff=backoff,
            retry_now=self.deliver,
            allowed=lambda: host.deliveries_allowed,
        )
        self._deliver_many: Callable[[list[Message]], object] | None = (
            target.deliver_many if IBatchDelivery.providedBy(target) else None  # type: ignore[attr-defined]
        )
        self._put_run: Callable[[Sequence[Message]], int] | None = (
            target.put_run
            if isinstance(target, QueueDelivery) and target.runs()
            else None
        )
        self.delivering = False
        self.in_loop = False
        self.ack_call: IDelayedCall | None = None
        #: Messages delivered since start.
        self.delivered = 0
        #: What arrived and waits for delivery, for the latency histogram.
        self.latency = DeliveryLatency(latency, clock)

    @property
    def held(self) -> bool:
        """Whether delivery is held behind a failed delivery."""
        return self.hold.retry.failures > 0

    def arrived(self, stream: InboundStream, accepted: int) -> None:
        """
        ``accepted`` new messages were queued on ``stream``.
        """
        last = stream.received
        self.latency.arrived(stream, last, last - accepted, self._clock.seconds())

    def take_run(
        self,
        stream: InboundStream,
        streams: list[InboundStream],
        first: int,
        contents: list[bytes],
    ) -> bool:
        """
        New messages arrived for ``stream``, the last of ``streams`` (the
        peer's inbound streams): ``contents`` at positions ``first`` on, one
        message or the run of one read.  In the usual case of a peer sending
        at its own pace (they are the next messages and fit where
        :meth:`InboundStream.on_data` would queue them, nothing is queued or
        in progress, the target takes one message at a time) they are
        delivered straight from the read, in one line: their latency as one
        observation, one mark for the next commit.  From the first that does
        not go straight through (the target failed, or returned a
        ``Deferred``), the rest is queued and the general path goes on.

        :return: ``False`` when that is not the case: nothing was done, and
            the caller queues them (``on_data``), then :meth:`arrived` and
            :meth:`deliver`.
        """
        if (
            len(streams) != 1
            or self.delivering
            or self.hold.call is not None
            or self.hold.retry.failures
            or self.latency.waiting
            or self._deliver_many is not None
            or self._put_run is not None
            or not self._host.deliveries_allowed
        ):
            return False
        size = stream.fits_run(first, contents)
        if size < 0:
            return False
        at = self._clock.seconds()
        deliver = self._target.deliver
        peer_id = self.peer_id
        local_id = self._local_id
        incarnation = stream.incarnation
        position = first
        pending: Deferred[Any] | None = None
        failure: Failure | None = None
        self.in_loop = True
        try:
            for item in contents:
                try:
                    result = deliver(
                        make_message(peer_id, local_id, position, item, incarnation)
                    )
                    if result is not None:
                        pending = delivery_outcome(result)
                except Exception:
                    failure = Failure()
                    break
                if pending is not None:
                    break
                position += 1
            count = len(contents)
            done = position - first
            if done == count:
                stream.passed(count, size)
            else:
                # Failed, or delivered once a Deferred fires: what went
                # before is taken, the rest is queued as on_data queues it.
                stream.passed(done, sum(map(len, contents[:done])))
                stream.on_data(position, contents[done:])
                if failure is not None:
                    self.hold.failed(failure, position)
                elif pending is not None:
                    self.delivering = True
                    pending.addBoth(self._settled, stream, position, 1).addErrback(
                        self._host.unexpected, "settling a delivery"
                    )
        finally:
            self.in_loop = False
        self.delivered += done
        if done < count:
            # The general path counts the run's latency; it delivers the
            # rest at once if the Deferred had already fired.
            self.latency.arrived(stream, first + count - 1, first - 1, at)
            if self.delivering or self.hold.call is not None:
                self._after()
            else:
                self.deliver()
            return True
        self.latency.delivered_at_once(at, count)
        committer = self._committer
        marks = committer.bookkeeping.delivered
        key = (peer_id, incarnation)
        position -= 1
        if marks.get(key, -1) < position:
            marks[key] = position
            committer.schedule(self._mark_wait(committer))
        if stream.starved:
            self._unstarve(stream)
        return True

    def jumped(self, stream: InboundStream) -> None:
        """
        ``stream`` skipped what it queued (the sender lost it).
        """
        self.latency.forget(stream)

    def deliver(self) -> None:
        """
        Deliver what is queued, in order, until a delivery is in progress,
        fails, or nothing is left.
        """
        if self.delivering or self.hold.call is not None:
            return
        if not self._host.deliveries_allowed:
            self._after()
            return
        deliver = self._target.deliver
        local_id = self._local_id
        peer_id = self.peer_id
        self.in_loop = True
        try:
            if self._deliver_many is not None:
                self._deliver_lists(self._deliver_many)
                return
            if self._put_run is not None:
                self._deliver_runs(self._put_run)
                return
            for stream in self._streams():
                queue = stream.queue
                while queue:
                    message = make_message(
                        peer_id,
                        local_id,
                        stream.delivered + 1,
                        queue[0],
                        stream.incarnation,
                    )
                    try:
                        pending = delivery_outcome(deliver(message))
                    except Exception:
                        self.hold.failed(Failure(), message.message_id)
                        return
                    if pending is not None:
                        self.delivering = True
                        pending.addBoth(
                            self._settled, stream, message.message_id, 1
                        ).addErrback(self._host.unexpected, "settling a delivery")
                        if self.delivering or self.hold.call is not None:
                            return
                        continue
                    stream.pop_delivered()
                    self.delivered += 1
                    if self.hold.retry.failures:
                        self.hold.release()
        finally:
            self.in_loop = False
            self._after()

    def _deliver_lists(self, deliver_many: Callable[[list[Message]], object]) -> None:
        """
        :meth:`deliver` for an :class:`ilm.interfaces.IBatchDelivery`
        target: everything queued from one stream in one call.
        """
        local_id = self._local_id
        peer_id = self.peer_id
        for stream in self._streams():
            while stream.queue:
                first = stream.delivered + 1
                incarnation = stream.incarnation
                messages = [
                    make_message(peer_id, local_id, first + i, contents, incarnation)
                    for i, contents in enumerate(stream.queue)
                ]
                try:
                    pending = delivery_outcome(deliver_many(messages))
                except Exception:
                    self.hold.failed(Failure(), first)
                    return
                if pending is not None:
                    self.delivering = True
                    pending.addBoth(
                        self._settled, stream, first, len(messages)
                    ).addErrback(self._host.unexpected, "settling a delivery")
                    if self.delivering or self.hold.call is not None:
                        return
                    continue
                self._taken(stream, len(messages))

    def _deliver_runs(self, put_run: Callable[[Sequence[Message]], int]) -> None:
        """
        :meth:`deliver` for a ``DeferredQueue`` target: runs of up to
        :data:`QUEUE_RUN` messages at a time, as one ``put`` per message
        would have queued them.
        """
        local_id = self._local_id
        peer_id = self.peer_id
        for stream in self._streams():
            queue = stream.queue
            while queue:
                first = stream.delivered + 1
                incarnation = stream.incarnation
                messages = [
                    make_message(peer_id, local_id, first + i, contents, incarnation)
                    for i, contents in enumerate(islice(queue, QUEUE_RUN))
                ]
                try:
                    taken = put_run(messages)
                except Exception:
                    self.hold.failed(Failure(), first)
                    return
                self._taken(stream, taken)

    def _taken(self, stream: InboundStream, count: int) -> None:
        """
        The first ``count`` messages queued on ``stream`` were delivered.
        """
        stream.pop_delivered(count)
        self.delivered += count
        if self.hold.retry.failures:
            self.hold.release()

    def _settled(
        self, result: object, stream: InboundStream, first: int, count: int
    ) -> None:
        """
        The delivery of ``count`` messages from ``first`` on settled (one
        for ``deliver``, a list for ``deliver_many``).
        """
        self.delivering = False
        if isinstance(result, Failure):
            self.hold.failed(result, first)
        elif stream.delivered + 1 == first and len(stream.queue) >= count:
            self._taken(stream, count)
        if not self.in_loop:
            self._host.guard(self.deliver)
            self._host.delivery_settled()

    def stop_retrying(self) -> None:
        """
        Start no new delivery (the node stops): cancel the retry timer.
        """
        self.hold.stop()

    def cancel_ack(self) -> None:
        """
        An acknowledgement goes out now (or the link went): no delayed one.
        """
        call, self.ack_call = self.ack_call, None
        if call is not None and call.active():
            call.cancel()

    def cancel_timers(self) -> None:
        self.stop_retrying()
        self.cancel_ack()

    def _after(self) -> None:
        """
        After a round of deliveries: count their latency, record their marks
        for the next commit, start the ack timer, ask again for what a
        starved stream dropped.
        """
        self.latency.observe()
        streams = self._streams()
        marks = False
        delivered = self._committer.bookkeeping.delivered
        for stream in streams:
            if stream.delivered > stream.marked:
                key = (self.peer_id, stream.incarnation)
                if delivered.get(key, -1) < stream.delivered:
                    delivered[key] = stream.delivered
                    marks = True
        if marks:
            self._committer.schedule(self._mark_wait(self._committer))
        if not streams:
            return
        current = streams[-1]
        if current.queue and self.ack_call is None and self._ready():
            self.ack_call = self._later(self._ack_delay, self._delayed_ack)
        if current.starved:
            self._unstarve(current)

    def _mark_wait(self, committer: GroupCommitter) -> float:
        """
        How long a new delivery mark may wait for its commit:
        ``mark_delay``, or :data:`MARK_DELAY_PER_PEER` per peer whose marks
        the last commit carried, whichever is longer.
        """
        spaced = committer.last_marks * MARK_DELAY_PER_PEER
        return spaced if spaced > self._mark_delay else self._mark_delay

    def _delayed_ack(self) -> None:
        self.ack_call = None
        self._acknowledge()
