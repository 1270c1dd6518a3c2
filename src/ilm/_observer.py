"""
One-shot observers: Deferreds waiting for one event.

Every "wait until X" in ILM (started, drained, settled, the next commit,
shut down) is one :class:`OneShotObserver`: callers take a Deferred with
:meth:`~OneShotObserver.when_fired`, the owner fires them all once with
:meth:`~OneShotObserver.fire`, and a caller that comes later gets the
result at once.  An event that can happen again takes a fresh observer
each time.  A leaf module: it imports nothing from ILM.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

__all__ = ["OneShotObserver"]

_T = TypeVar("_T")


class OneShotObserver(Generic[_T]):
    """
    Deferreds waiting for one event, fired once, in the order they were
    taken.
    """

    __slots__ = ("_fired", "_result", "_waiters")

    def __init__(self) -> None:
        self._waiters: list[Deferred[_T]] = []
        self._fired = False
        self._result: _T | Failure | None = None

    @property
    def fired(self) -> bool:
        """Whether the event has happened."""
        return self._fired

    def __bool__(self) -> bool:
        """Whether anyone waits."""
        return bool(self._waiters)

    def when_fired(self) -> Deferred[_T]:
        """
        :return: a Deferred firing with the event's result (failing with
            its failure), at once if it has happened.
        """
        if self._fired:
            result = self._result
            if isinstance(result, Failure):
                return fail(result)
            return succeed(result)  # type: ignore[arg-type]
        d: Deferred[_T] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result: _T | Failure) -> None:
        """
        The event happened: fire every waiter with ``result`` (a
        ``Failure`` errbacks them).  Only the first call counts.
        """
        if self._fired:
            return
        self._fired = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
