"""
:class:`ConnectionWaiters`: who waits on one connection: for it to become
the link (its dialler), for it to be closed (the network stopping), and
the watcher (``ClientService``'s protocol) told when it is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

__all__ = ["ConnectionWaiters", "chain"]

T = TypeVar("T")


class ConnectionWaiters(Generic[T]):
    """
    :param cancel: what cancelling a wait for the link does (abort the
        connection).
    """

    __slots__ = ("_cancel", "_lost", "_opened", "_watchers", "lost")

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self._opened: list[Deferred[T]] = []
        self._lost: list[Deferred[None]] = []
        self._watchers: list[IProtocol] = []
        self.lost = False

    def when_open(self, opened: T | None) -> Deferred[T]:
        """
        :param opened: the connection if it is the link already.
        """
        if opened is not None:
            return succeed(opened)
        d: Deferred[T] = Deferred(lambda _: self._cancel())
        if self.lost:
            d.errback(Failure(ConnectionDone("connection lost before the link was up")))
            return d
        self._opened.append(d)
        return d

    def when_lost(self) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    def watch(self, watcher: IProtocol) -> None:
        self._watchers.append(watcher)

    def opened(self, connection: T) -> None:
        """
        The connection became the link.
        """
        opened, self._opened = self._opened, []
        for d in opened:
            if not d.called:
                d.callback(connection)

    def connection_lost(
        self, reason: Failure, never_linked: Callable[[], BaseException]
    ) -> None:
        """
        The connection is gone: fail the waits for the link (with
        ``never_linked()``), tell the watchers, fire the waits for the loss.
        """
        self.lost = True
        opened, self._opened = self._opened, []
        if opened:
            failure = Failure(never_linked())
            for d in opened:
                if not d.called:
                    d.errback(failure)
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.connectionLost(reason)
        waiters, self._lost = self._lost, []
        for waiter in waiters:
            waiter.callback(None)


def chain(d: Deferred[None]) -> Deferred[None]:
    """
    :return: a ``Deferred`` firing with ``None`` once ``d`` has fired (at
        once if it has), leaving ``d``'s result to its other callbacks.
    """
    if d.called:
        return succeed(None)
    result: Deferred[None] = Deferred()

    def fire(value: object) -> object:
        result.callback(None)
        return value

    d.addBoth(fire)
    return result
