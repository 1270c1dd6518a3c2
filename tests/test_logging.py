"""
Tests for :mod:`ilm._logging`: rate-limited events.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ilm._logging import EventLimiter


def _limiter(**kwargs: Any) -> tuple[EventLimiter, Clock, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    clock = Clock()
    limiter = EventLimiter(Logger(observer=events.append), clock, **kwargs)
    return limiter, clock, events


class EventLimiterTests(SynchronousTestCase):
    def test_first_in_full_then_one_summary(self) -> None:
        """
        The first event of a key is logged with its failure; the next 999
        within the interval become one summary carrying their count, the
        first and last time and the last one's fields.
        """
        limiter, clock, events = _limiter(interval=10.0)
        failure = Failure(ZeroDivisionError("division by zero"))
        self.assertTrue(
            limiter.emit("k", LogLevel.error, "boom {n}", failure=failure, n=0)
        )
        for n in range(1, 1000):
            clock.advance(0.005)
            self.assertFalse(
                limiter.emit("k", LogLevel.error, "boom {n}", failure=failure, n=n)
            )
        self.assertEqual(len(events), 1)
        self.assertIs(events[0]["log_failure"], failure)
        clock.advance(10.0)
        self.assertEqual(len(events), 2)
        summary = events[1]
        self.assertEqual(summary["suppressed"], 999)
        self.assertEqual(summary["n"], 999)
        self.assertNotIn("log_failure", summary)
        self.assertEqual(summary["error"], "division by zero")
        self.assertAlmostEqual(summary["first_suppressed"], 0.005)
        self.assertAlmostEqual(summary["last_suppressed"], 4.995)
        self.assertEqual(summary["log_level"], LogLevel.error)
        self.assertEqual(limiter.suppressed_total, 999)

    def test_event_without_failure_carries_no_failure_key(self) -> None:
        """
        An event emitted without a failure has no ``log_failure`` key at all
        (observers such as trial's and the legacy bridge take the key's
        presence to mean an error with a traceback).
        """
        limiter, _clock, events = _limiter(interval=10.0)
        limiter.emit("k", LogLevel.warn, "plain {n}", n=1)
        self.assertNotIn("log_failure", events[0])
        self.assertEqual(events[0]["n"], 1)
        limiter.stop()

    def test_steady_flood_is_one_line_per_interval(self) -> None:
        """
        A flood lasting ten intervals yields one full event and one summary
        per interval; when it stops, the key is forgotten and its next event
        is logged in full.
        """
        limiter, clock, events = _limiter(interval=1.0)
        for _ in range(10_000):
            limiter.emit("k", LogLevel.warn, "again")
            clock.advance(0.001)
        clock.pump([1.0] * 5)
        self.assertLessEqual(len(events), 1 + 11)
        self.assertEqual(sum(e.get("suppressed", 0) for e in events), 9_999)
        before = len(events)
        self.assertTrue(limiter.emit("k", LogLevel.warn, "again"))
        self.assertEqual(len(events), before + 1)

    def test_event_without_failure_has_no_failure_key(self) -> None:
        """
        An event logged in full without a failure carries no
        ``log_failure`` key at all (observers such as trial's take any
        event with that key for an error, even when it is ``None``).
        """
        limiter, _clock, events = _limiter()
        limiter.emit("k", LogLevel.error, "refused {n}", n=1)
        self.assertEqual(len(events), 1)
        self.assertNotIn("log_failure", events[0])

    def test_keys_are_independent(self) -> None:
        """
        Each key gets its own first event in full.
        """
        limiter, _clock, events = _limiter()
        self.assertTrue(limiter.emit(("refused", "10.0.0.1"), LogLevel.info, "a"))
        self.assertTrue(limiter.emit(("refused", "10.0.0.2"), LogLevel.info, "b"))
        self.assertFalse(limiter.emit(("refused", "10.0.0.1"), LogLevel.info, "a"))
        self.assertEqual([e["log_format"] for e in events], ["a", "b"])

    def test_key_cap_bounds_lines(self) -> None:
        """
        Beyond ``max_keys`` sources, new sources share one overflow key: one
        million events from one million sources log at most
        ``2 * (max_keys + 1)`` lines per interval.
        """
        limiter, clock, events = _limiter(interval=1.0, max_keys=8)
        for n in range(100_000):
            limiter.emit(("refused", n), LogLevel.info, "refused {n}", n=n)
        clock.advance(1.0)
        self.assertLessEqual(len(events), 2 * (8 + 1))
        self.assertTrue(any(e.get("overflow_keys") for e in events))
        self.assertEqual(sum(e.get("suppressed", 0) for e in events) + 9, 100_000)

    def test_stop_flushes_and_leaves_no_timer(self) -> None:
        """
        ``stop`` logs the pending summary and cancels the timer; an idle
        limiter holds no delayed call.
        """
        limiter, clock, events = _limiter()
        limiter.emit("k", LogLevel.info, "x")
        limiter.emit("k", LogLevel.info, "x")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        limiter.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(events[-1]["suppressed"], 1)
        idle, idle_clock, _ = _limiter(interval=1.0)
        idle.emit("k", LogLevel.info, "x")
        idle_clock.advance(1.0)
        idle_clock.advance(1.0)
        self.assertEqual(idle_clock.getDelayedCalls(), [])

    def test_bad_arguments(self) -> None:
        """
        A non-positive interval or key cap is refused.
        """
        clock = Clock()
        self.assertRaises(ValueError, EventLimiter, Logger(), clock, interval=0)
        self.assertRaises(ValueError, EventLimiter, Logger(), clock, max_keys=0)
