"""
Backoff: how long to wait before trying again, after ``n`` failures in a
row.  Every retry in ILM uses it: reconnection and refusals in the stream
network, and the messenger's commit, read, retransmission and delivery
retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr

__all__ = ["Backoff", "Retry"]


def _positive(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Backoff:
    """
    Delays that grow with failures: attempt ``n`` (1, 2, ...) waits
    ``min(initial * factor ** (n - 1), maximum)``, less a random fraction of
    up to ``jitter`` of it (so peers that lost a link together do not redial
    in lockstep).  The defaults are the stream network's reconnection: 25 to
    50 ms after a link drops, never more than 5 s (``ClientService``'s own
    default waits at least a second, which is slow for a link that merely
    dropped).
    """

    initial: float = attr.ib(default=0.05, validator=_positive)
    factor: float = attr.ib(default=2.0, validator=_positive)
    maximum: float = attr.ib(default=5.0, validator=_positive)
    jitter: float = 0.5

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter!r}")
        if self.factor < 1:
            raise ValueError(f"factor must be at least 1, not {self.factor!r}")

    @classmethod
    def exact(cls, initial: float, maximum: float) -> Backoff:
        """
        Doubling from ``initial`` up to ``maximum`` (never below
        ``initial``), with no jitter: the messenger's retries (commit,
        outbox read, retransmission, delivery), which must replay exactly on
        a ``Clock``.
        """
        return cls(initial=initial, maximum=max(initial, maximum), jitter=0.0)

    def delay(self, attempt: int, uniform: float = 0.0) -> float:
        """
        :param attempt: the number of failed attempts in a row (from 1).
        :param uniform: a random number in [0, 1) (for the jitter).
        """
        try:
            base = min(self.initial * self.factor ** max(0, attempt - 1), self.maximum)
        except OverflowError:
            base = self.maximum
        return base * (1.0 - self.jitter * uniform)


class Retry:
    """
    The failures in a row of one thing that is retried: :meth:`failed`
    counts one and says how long to wait; :meth:`succeeded` starts over.

    :param backoff: the delays.
    :param uniform: random numbers in [0, 1) for the jitter (none if
        omitted: the same delays every time, as the messenger's retries on a
        ``Clock`` need to replay exactly).
    """

    __slots__ = ("_uniform", "backoff", "failures")

    def __init__(
        self, backoff: Backoff, uniform: Callable[[], float] | None = None
    ) -> None:
        self.backoff = backoff
        self.failures = 0
        self._uniform = uniform

    def failed(self) -> float:
        """
        One more failure: :return: the seconds to wait before the next try.
        """
        self.failures += 1
        uniform = self._uniform() if self._uniform is not None else 0.0
        return self.backoff.delay(self.failures, uniform)

    @property
    def next_delay(self) -> float:
        """The wait after one more failure, without counting it (no jitter)."""
        return self.backoff.delay(self.failures + 1)

    def succeeded(self) -> None:
        """The thing worked: the next failure waits the initial delay again."""
        self.failures = 0
