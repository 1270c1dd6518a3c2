"""
A gate between a backend that works on threads (``SQLiteBackend``) and ILM
running on a ``Clock``, so that runs stay deterministic.

The gate is the backend's reactor for thread results: the backend's threads
hand their results to :meth:`Gate.callFromThread`, which only queues them.
:meth:`Gate.wait` blocks until one operation's result is there (running the
queued results in the order they came), so no two operations ever run at
once and none finishes at a moment that depends on thread scheduling.
:meth:`Gate.hold` waits for an operation and keeps its result;
:meth:`Gate.settle` hands the kept results to their callers in the order
the operations were called, between steps of the clock, except those of an
owner that has crashed meanwhile (a dead process hears nothing).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface import implementer

_T = TypeVar("_T")


class GateOwner(Protocol):
    """
    Whoever an operation's result is held for: once ``crashed``, its held
    results are dropped.
    """

    @property
    def crashed(self) -> bool: ...


class GateTimeout(Exception):
    """
    A thread did not hand a result back in time.
    """


@implementer(IReactorFromThreads)
class Gate:
    """
    :param timeout: how long (wall-clock seconds) :meth:`wait` waits for a
        thread before it gives up with :class:`GateTimeout`.
    """

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._results: queue.SimpleQueue[
            tuple[Callable[..., object], tuple[object, ...], dict[str, object]]
        ] = queue.SimpleQueue()
        self._held: list[tuple[list[object], Deferred[Any], GateOwner]] = []

    # -- what the backend sees as its reactor ------------------------------------

    def callFromThread(
        self, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> None:
        """
        Queue a thread's result: it runs in :meth:`wait`, on the caller's
        thread.
        """
        self._results.put((callable, args, kwargs))

    def addSystemEventTrigger(
        self,
        phase: str,
        eventType: str,
        callable: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> object:
        """
        Nothing shuts this "reactor" down: triggers never fire.
        """
        return (phase, eventType, callable)

    def removeSystemEventTrigger(self, triggerID: object) -> None:
        pass

    # -- waiting -----------------------------------------------------------------

    def wait(self, d: Deferred[_T]) -> _T | Failure:
        """
        Block until ``d`` has fired, running the thread results queued
        meanwhile in the order they arrive.

        :return: ``d``'s result, or its :class:`Failure` (handled: ``d`` is
            left holding ``None``).
        :raises GateTimeout: if no thread result comes for ``timeout``
            seconds while ``d`` has not fired.
        """
        box: list[_T | Failure] = []
        d.addBoth(box.append)
        while not box:
            try:
                f, args, kwargs = self._results.get(timeout=self.timeout)
            except queue.Empty:
                raise GateTimeout(
                    f"no result from the backend's threads in {self.timeout} s"
                ) from None
            f(*args, **kwargs)
        return box[0]

    def hold(self, d: Deferred[_T], owner: GateOwner) -> Deferred[_T]:
        """
        Wait for ``d`` now and keep its result for :meth:`settle`.

        :return: a ``Deferred`` that :meth:`settle` fires with ``d``'s
            result, unless ``owner`` has crashed by then.
        """
        outer: Deferred[_T] = Deferred()
        result = self.wait(d)
        boxed: list[object] = [result]
        self._held.append((boxed, outer, owner))
        return outer

    def settle(self) -> bool:
        """
        Hand every held result to its caller, in the order the operations
        were held (results handed over may lead to more operations, whose
        results are handed over too), skipping those whose owner crashed.

        :return: whether anything was held.
        """
        any_held = bool(self._held)
        while self._held:
            held, self._held = self._held, []
            for (result,), outer, owner in held:
                if owner.crashed:
                    continue
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
        return any_held

    @property
    def holding(self) -> int:
        """
        How many results are held.
        """
        return len(self._held)
