"""
The refusal policy both networks share: after a node closes a link for a
protocol violation, links with that peer are refused for a while (the
*hold*), growing with each violation in a row, and counted afresh once a
link has stayed up for ``reset`` seconds.

A peer refused for good (a stale incarnation, a regressed store) is thus
retried slowly, with one error each time, instead of every few
milliseconds.  :class:`ilm.network.StreamNetwork` neither dials nor accepts
a held peer (``LinkSettings.refusal``, ``refusal_reset``);
:class:`ilm.network.InMemoryNetwork` brings the link back once the hold has
passed (``reconnect_delay`` doubling to 30 s, reset after a minute).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ilm._backoff import Backoff

__all__ = ["RefusalPolicy"]

K = TypeVar("K", bound=Hashable)


class RefusalPolicy(Generic[K]):
    """
    Violations in a row and hold times, per key (a peer id, or a pair of
    them for the in-memory network).

    :param backoff: the hold after the ``n``-th violation in a row is
        ``backoff.delay(n, uniform())``.
    :param reset: a link that stayed up this long (seconds) starts the
        count again.
    :param seconds: the clock.
    :param uniform: random numbers in [0, 1) for the backoff's jitter.
    """

    def __init__(
        self,
        backoff: Backoff,
        reset: float,
        seconds: Callable[[], float],
        uniform: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._backoff = backoff
        self._reset = reset
        self._seconds = seconds
        self._uniform = uniform
        self._in_a_row: dict[K, int] = {}
        self._until: dict[K, float] = {}
        self._linked_at: dict[K, float] = {}

    def link_up(self, key: K) -> None:
        """
        A link with ``key`` came up now.
        """
        self._linked_at[key] = self._seconds()

    def violation(self, key: K) -> float:
        """
        A link with ``key`` is closed now for a violation.

        :return: how long links with ``key`` are refused from now.
        """
        now = self._seconds()
        count = self._in_a_row.get(key, 0) + 1
        if now - self._linked_at.get(key, now) >= self._reset:
            count = 1
        self._in_a_row[key] = count
        hold = self._backoff.delay(count, self._uniform())
        self._until[key] = now + hold
        return hold

    def refused_for(self, key: K) -> float:
        """
        :return: how long links with ``key`` are still refused (0 if not).
        """
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._seconds()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left
