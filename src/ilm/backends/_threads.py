"""
The threads of a store that blocks: one writer and one reader.

A store whose driver blocks (sqlite3, psycopg) runs its writes on one
thread and its reads on another, each a one-thread pool, so that commits
are applied in order and a long commit does not hold up the reads of
messages to transmit.  :class:`StoreThreads` is that pair, and its part in
the reactor's shutdown: a store still open when the reactor stops gets
``stopping`` called, so the threads end and the process can exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["StoreThreads"]

_T = TypeVar("_T")


class StoreThreads:
    """
    A store's writer and reader threads.

    :param reactor: the reactor (for ``deferToThreadPool`` and its shutdown
        trigger); the global one if ``None``, looked up when first needed.
    :param name: names the threads (``ilm-<name>-writer``, ...).
    :param stopping: called if the reactor shuts down while the threads
        run; it must call :meth:`stop`.
    """

    __slots__ = (
        "_name",
        "_reactor",
        "_read_pool",
        "_stopping",
        "_trigger",
        "_write_pool",
    )

    def __init__(self, reactor: Any, name: str, stopping: Callable[[], None]) -> None:
        self._reactor = reactor
        self._name = name
        self._stopping = stopping
        self._write_pool: ThreadPool | None = None
        self._read_pool: ThreadPool | None = None
        self._trigger: object = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def running(self) -> bool:
        return self._write_pool is not None

    def start(self) -> None:
        reactor = self.reactor
        self._write_pool = ThreadPool(1, 1, name=f"ilm-{self._name}-writer")
        self._read_pool = ThreadPool(1, 1, name=f"ilm-{self._name}-reader")
        self._write_pool.start()
        self._read_pool.start()
        self._trigger = reactor.addSystemEventTrigger(
            "during", "shutdown", self._reactor_stopping
        )

    def _reactor_stopping(self) -> None:
        self._trigger = None
        self._stopping()

    def stop(self) -> None:
        """
        Stop both threads (after what they are running) and forget the
        shutdown trigger.
        """
        for pool in (self._write_pool, self._read_pool):
            if pool is not None:
                pool.stop()
        self._write_pool = self._read_pool = None
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # already fired: the reactor is shutting down

    def on_writer(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        """Run ``f(*args)`` on the writer thread."""
        assert self._write_pool is not None
        return deferToThreadPool(self.reactor, self._write_pool, f, *args)

    def on_reader(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        """Run ``f(*args)`` on the reader thread."""
        assert self._read_pool is not None
        return deferToThreadPool(self.reactor, self._read_pool, f, *args)
