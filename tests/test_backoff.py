"""
Tests for :mod:`ilm._backoff`: the one backoff every retry uses.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ilm._backoff import Backoff, Retry


class BackoffTests(SynchronousTestCase):
    def test_grows_to_the_maximum(self) -> None:
        """
        Attempt ``n`` waits ``initial * factor**(n-1)``, capped at
        ``maximum``, also for attempts so many that the power overflows.
        """
        backoff = Backoff(initial=0.1, factor=2.0, maximum=1.0, jitter=0.0)
        self.assertEqual(
            [backoff.delay(n) for n in range(1, 7)], [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        )
        self.assertEqual(backoff.delay(10_000), 1.0)

    def test_jitter_shortens(self) -> None:
        """
        The jitter takes up to its fraction off the delay.
        """
        backoff = Backoff(initial=1.0, maximum=1.0, jitter=0.5)
        self.assertEqual(backoff.delay(1, 0.0), 1.0)
        self.assertEqual(backoff.delay(1, 0.999), 1.0 - 0.5 * 0.999)

    def test_bad_values(self) -> None:
        """
        Non-positive values, a factor below 1 and a jitter outside [0, 1)
        are refused.
        """
        for kwargs in (
            {"initial": 0},
            {"maximum": -1},
            {"factor": 0.5},
            {"jitter": 1.0},
            {"jitter": -0.1},
        ):
            self.assertRaises(ValueError, Backoff, **kwargs)

    def test_exact(self) -> None:
        """
        ``Backoff.exact`` doubles without jitter, and a maximum below the
        initial delay means the initial delay every time.
        """
        self.assertEqual(
            [Backoff.exact(0.5, 3.0).delay(n, 0.99) for n in (1, 2, 3, 4)],
            [0.5, 1.0, 2.0, 3.0],
        )
        self.assertEqual(Backoff.exact(2.0, 1.0).delay(5), 2.0)


class RetryTests(SynchronousTestCase):
    def test_counts_failures_and_starts_over(self) -> None:
        """
        Each failure waits longer; a success starts over from the initial
        delay; ``next_delay`` tells the next wait without counting.
        """
        retry = Retry(Backoff(initial=0.1, factor=2.0, maximum=0.3, jitter=0.0))
        self.assertEqual(retry.next_delay, 0.1)
        self.assertEqual([retry.failed() for _ in range(4)], [0.1, 0.2, 0.3, 0.3])
        self.assertEqual(retry.failures, 4)
        retry.succeeded()
        self.assertEqual(retry.failed(), 0.1)

    def test_jitter_from_the_given_source(self) -> None:
        """
        With a random source, the jitter comes from it.
        """
        retry = Retry(Backoff(initial=1.0, maximum=1.0, jitter=0.5), lambda: 1.0 - 1e-9)
        self.assertAlmostEqual(retry.failed(), 0.5, places=6)
