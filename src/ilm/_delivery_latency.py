"""
The delivery latency of one peer's messages: from the arrival of the frame
that brought a message to its delivery, counted into the node's
``delivery_seconds`` histogram (:class:`ilm._status.HistogramCounter`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ilm._session import InboundStream
from ilm._status import HistogramCounter

__all__ = ["DeliveryLatency"]


class DeliveryLatency:
    """
    What arrived and is not yet delivered, with its arrival time: one entry
    per arrived frame (or run of frames), not per message.

    :param histogram: where latencies are counted.
    """

    __slots__ = ("_clock", "_histogram", "waiting")

    def __init__(self, histogram: HistogramCounter, clock: IReactorTime) -> None:
        self._histogram = histogram
        self._clock = clock
        #: Per arrival: [stream, last position, position counted up to,
        #: arrival time], oldest first.
        self.waiting: deque[list[Any]] = deque()

    def arrived(
        self, stream: InboundStream, last: int, counted: int, at: float
    ) -> None:
        """Positions ``counted + 1 .. last`` of ``stream`` arrived at ``at``."""
        self.waiting.append([stream, last, counted, at])

    def delivered_at_once(self, at: float, count: int) -> None:
        """``count`` messages that arrived at ``at`` were delivered now."""
        self._histogram.observe(self._clock.seconds() - at, count)

    def forget(self, stream: InboundStream) -> None:
        """``stream`` skipped what it queued (the sender lost it)."""
        self.waiting = deque(a for a in self.waiting if a[0] is not stream)

    def observe(self) -> None:
        """
        Count the latency of what was delivered since the last look.
        Frames are delivered in the order they arrived (one incarnation's
        stream after another's), so only the head can have moved.
        """
        waiting = self.waiting
        if not waiting:
            return
        now = self._clock.seconds()
        histogram = self._histogram
        while waiting:
            arrival = waiting[0]
            stream, last, counted, at = arrival
            done = min(stream.delivered, last)
            if done > counted:
                histogram.observe(now - at, done - counted)
                arrival[2] = done
            if done < last:
                return
            waiting.popleft()
