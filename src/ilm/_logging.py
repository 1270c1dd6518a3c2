"""
Rate-limited log events: the first of a kind in full, then summaries.

A peer, a stranger or a failing disk can make the same thing go wrong
thousands of times a second.  Logging each occurrence would turn the log into
the attack (or fill the disk the store needs), so events that can repeat at a
rate someone else controls go through an :class:`EventLimiter`:

- the first event of a *key* (say ``("auth_refused", "203.0.113.7")``) is
  logged at once, in full, with its traceback if it has one;
- further events of that key within the same *interval* are only counted;
- when the interval ends, one summary event carries the count, the time of
  the first and last suppressed occurrence and the fields of the last one;
- a key quiet for a whole interval is forgotten, so its next event is logged
  in full again.

At most ``max_keys`` keys are tracked at once; events of further keys share
one overflow key, so the number of lines per interval is bounded whatever
the number of sources: at most ``2 * (max_keys + 1)`` per interval.

The limiter keeps one timer while it has suppressed events to summarise and
none when idle; :meth:`EventLimiter.stop` flushes and cancels it (a node
calls it when it stops, so no delayed call is left behind).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["EventLimiter"]

_OVERFLOW = ("ilm.log_overflow",)


class _Tally:
    __slots__ = ("count", "first", "format", "last", "level", "seen", "values")

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.seen = True
        self.level = LogLevel.info
        self.format = ""
        self.values: dict[str, Any] = {}


class EventLimiter:
    """
    Log events of each key at most once per ``interval`` seconds in full,
    summarising the rest.

    :param logger: where the events go.
    :param clock: the ``IReactorTime`` whose ``seconds()`` stamps events and
        whose ``callLater`` ends intervals.
    :param interval: seconds over which repeats of one key are summarised.
    :param max_keys: how many keys are tracked at once (the rest share one).
    """

    def __init__(
        self,
        logger: Logger,
        clock: IReactorTime,
        *,
        interval: float = 60.0,
        max_keys: int = 64,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self._log = logger
        self._clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._keys: dict[Hashable, _Tally] = {}
        self._call: IDelayedCall | None = None
        self.suppressed_total = 0
        """How many events were counted instead of logged, in all."""

    def emit(
        self,
        key: Hashable,
        level: LogLevel,
        format: str,
        *,
        failure: Failure | None = None,
        **fields: Any,
    ) -> bool:
        """
        Log an event now, or count it if ``key`` was logged within the
        current interval.

        :param key: what makes two events "the same" (an event name, plus
            a peer id or a source address).
        :param failure: a ``Failure`` to log with the event (its traceback
            appears only on the events logged in full).
        :return: whether the event was logged in full.
        """
        tally = self._keys.get(key)
        if tally is None and len(self._keys) >= self.max_keys:
            key = _OVERFLOW
            tally = self._keys.get(key)
        if tally is None:
            self._keys[key] = _Tally()
            self._schedule()
            if failure is not None:
                fields["log_failure"] = failure
            self._log.emit(level, format, **fields)
            return True
        now = self._clock.seconds()
        if not tally.count:
            tally.first = now
        tally.count += 1
        tally.last = now
        tally.seen = True
        tally.level = level
        tally.format = format
        if failure is not None:
            fields["error"] = failure.getErrorMessage()
        tally.values = fields
        self.suppressed_total += 1
        return False

    def flush(self) -> None:
        """
        Log the summary of every key with suppressed events now, and forget
        keys that were quiet for a whole interval.
        """
        for key, tally in list(self._keys.items()):
            if tally.count:
                self._summarise(key, tally)
            elif not tally.seen:
                del self._keys[key]
                continue
            tally.seen = False

    def stop(self) -> None:
        """
        Summarise what is pending, forget every key and cancel the timer.
        """
        for key, tally in list(self._keys.items()):
            if tally.count:
                self._summarise(key, tally)
        self._keys.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _summarise(self, key: Hashable, tally: _Tally) -> None:
        values = dict(tally.values)
        values.update(
            suppressed=tally.count,
            first_suppressed=tally.first,
            last_suppressed=tally.last,
            interval=self.interval,
        )
        if key == _OVERFLOW:
            values["overflow_keys"] = True
        self._log.emit(
            tally.level,
            "{suppressed} similar event(s) not logged in the last {interval:.0f} s; "
            "the last: " + tally.format,
            **values,
        )
        tally.count = 0

    def _schedule(self) -> None:
        if self._call is None or not self._call.active():
            self._call = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        try:
            self.flush()
        except Exception:
            self._log.failure(
                "summarising rate-limited events failed", ilm_event="internal_error"
            )
            self._keys.clear()
        if self._keys:
            self._schedule()
