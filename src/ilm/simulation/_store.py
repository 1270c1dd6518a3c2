"""
A durable in-memory store for the simulator: operations take simulated time,
and a crash loses exactly what a real crash would.

:class:`ilm.backends.InMemoryStorage` holds the *committed* state (what a
restarted node finds); a batch handed to :meth:`SimulatedBackend.commit` is
*uncommitted* until its simulated latency has passed on the clock.  A crash
while a commit is in flight lands the whole batch or none of it (the caller
decides, from the seed), cancels every pending operation and fires no
Deferred: the process is dead.

:class:`MemoryStoreModel` is the simulator's default
:class:`StoreModel`: the seam through which another backend (SQLite, ...)
can be plugged in later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import PeerId
from ilm._store import CommitResult, StoreBatch, StoredState
from ilm.backends._memory import InMemoryBackend, InMemoryStorage
from ilm.errors import StoreError
from ilm.interfaces import IBackend


@runtime_checkable
class CrashableBackend(Protocol):
    """
    What the simulator needs from a backend beyond ``IBackend``: it can be
    crashed, made to fail its commits, and asked what is durably pending.
    """

    commits_fail: bool

    def crash(self, land: bool) -> bool: ...

    def durable_outbox(self) -> dict[PeerId, int]: ...


class StoreListener(Protocol):
    """
    What a simulated store reports to the simulator.
    """

    def opened(self, backend: CrashableBackend, state: StoredState) -> None:
        """
        ``open`` found ``state`` in the store (what ILM is about to get).
        """

    def commit_started(self, backend: CrashableBackend, latency: float) -> None:
        """
        ``commit`` was called; the batch lands after ``latency`` seconds
        unless the node crashes first.  The listener may set
        ``backend.commits_fail``.
        """

    def landed(self, backend: CrashableBackend, batch: StoreBatch) -> None:
        """
        ``batch`` is now durable (its commit finished, or a crash landed it).
        """

    def commit_failed(self, backend: CrashableBackend, reason: Failure) -> None:
        """
        A commit failed and applied nothing.
        """

    def fault_injected(self, backend: CrashableBackend, kind: str) -> None:
        """
        The store was broken in the way ``kind`` says for one commit (a
        commit it made fail on purpose; see ``commits_fail``).
        """

    def contract_broken(self, backend: CrashableBackend, problem: str) -> None:
        """
        ILM used the backend against the ``IBackend`` contract.
        """


class InjectedStoreFailure(StoreError):
    """
    A commit the simulator made fail on purpose.
    """


def _snapshot(batch: StoreBatch) -> StoreBatch:
    """
    Copy a batch, as a real store would serialise it when ``commit`` is
    called: later changes to the caller's objects do not reach the store.
    """
    return StoreBatch(
        messages={
            peer: (first, list(contents))
            for peer, (first, contents) in batch.messages.items()
        },
        acked=dict(batch.acked),
        delivered=dict(batch.delivered),
        retired=set(batch.retired),
        forgotten=set(batch.forgotten),
    )


class ScheduledCalls:
    """
    Operations scheduled on the simulated clock, all cancelled at once when
    the simulated process dies.
    """

    clock: IReactorTime
    _calls: list[IDelayedCall]

    def _later(self, delay: float, function: Callable[[], None]) -> None:
        def run() -> None:
            self._calls.remove(call)
            function()

        call = self.clock.callLater(delay, run)
        self._calls.append(call)

    def _cancel_calls(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []


class SimulatedOperations(ScheduledCalls):
    """
    What the simulator's backends share: operations scheduled on the
    simulated clock, all cancelled at once by a crash, and commits one at a
    time, each reported to the listener as it starts.
    """

    listener: StoreListener
    latency: Callable[[], float]
    commits_fail: bool
    crashed: bool
    in_flight: StoreBatch | None

    def _begin_commit(self, batch: StoreBatch) -> tuple[StoreBatch, float, bool]:
        """
        A commit starts: check that ILM waited for the previous one, keep a
        copy of ``batch`` as the commit in flight and tell the listener
        (which may decide that this commit fails, or arm a crash).

        :return: the copy, the commit's latency and whether it fails.
        """
        backend: CrashableBackend = self  # type: ignore[assignment]
        if self.in_flight is not None:
            self.listener.contract_broken(
                backend, "commit called while the previous commit was in flight"
            )
        batch = _snapshot(batch)
        latency = self.latency()
        self.in_flight = batch
        self.listener.commit_started(backend, latency)
        return batch, latency, self.commits_fail

    def _stop_everything(self) -> StoreBatch | None:
        """
        The process dies: cancel every scheduled operation.

        :return: the batch that was in flight, if any.
        """
        self.crashed = True
        batch, self.in_flight = self.in_flight, None
        self._cancel_calls()
        return batch


@implementer(IBackend)
class SimulatedBackend(SimulatedOperations, InMemoryBackend):
    """
    An :class:`ilm.backends.InMemoryBackend` whose operations take simulated
    time on ``clock`` and which can be crashed.

    :param storage: the committed state; pass the storage of a crashed
        backend to restart from what it made durable.
    :param clock: where operations take their time.
    :param listener: told about commits (see :class:`StoreListener`).
    :param latency: returns the duration of the next operation, in seconds
        (drawn from the simulation's seeded random generator).
    """

    def __init__(
        self,
        storage: InMemoryStorage,
        clock: IReactorTime,
        listener: StoreListener,
        latency: Callable[[], float],
    ) -> None:
        super().__init__(storage)
        self.clock = clock
        self.listener = listener
        self.latency = latency
        self.commits_fail = False
        self.crashed = False
        self.in_flight: StoreBatch | None = None
        self._calls: list[IDelayedCall] = []

    def open(self) -> Deferred[StoredState]:
        self.closed = False
        d: Deferred[StoredState] = Deferred()

        def opened() -> None:
            state = self.storage.state()
            self.listener.opened(self, state)
            d.callback(state)

        self._later(self.latency(), opened)
        return d

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        d: Deferred[CommitResult] = Deferred()
        if self.closed or self.crashed:
            self._later(0, lambda: d.errback(StoreError("the store is closed")))
            return d
        batch, latency, fails = self._begin_commit(batch)

        def finish() -> None:
            self.in_flight = None
            if fails:
                failure = Failure(InjectedStoreFailure("injected commit failure"))
                self.listener.commit_failed(self, failure)
                d.errback(failure)
                return
            try:
                result = self.storage.apply(batch)
            except StoreError:
                failure = Failure()
                self.listener.commit_failed(self, failure)
                d.errback(failure)
                return
            self.listener.landed(self, batch)
            d.callback(result)

        self._later(latency, finish)
        return d

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        d: Deferred[list[bytes]] = Deferred()
        if self.closed or self.crashed:
            self._later(0, lambda: d.errback(StoreError("the store is closed")))
            return d
        try:
            contents = list(self.storage.read(peer_id, after, limit, max_bytes))
        except StoreError as error:
            failure = error
            self._later(self.latency(), lambda: d.errback(failure))
            return d
        self._later(self.latency(), lambda: d.callback(contents))
        return d

    def crash(self, land: bool) -> bool:
        """
        Die at once: cancel every operation in progress and fire nothing.

        :param land: whether a commit in flight lands (whole) or is lost
            (whole).
        :return: whether a commit was in flight.
        """
        batch = self._stop_everything()
        if batch is None:
            return False
        if land and not self.commits_fail:
            try:
                self.storage.apply(batch)
            except StoreError:
                return True
            self.listener.landed(self, batch)
        return True

    def durable_outbox(self) -> dict[PeerId, int]:
        """
        :return: per peer, the number of messages in the committed outbox.
        """
        return {
            peer: box.last - box.acked
            for peer, box in self.storage.outboxes.items()
            if box.last > box.acked
        }


@runtime_checkable
class StoreModel(Protocol):
    """
    How the simulator makes stores and opens backends over them.

    ``new_store`` returns a fresh, empty durable store with the given
    incarnation (what a node that lost its store comes back with);
    ``open_backend`` returns an ``IBackend`` that is also a
    :class:`CrashableBackend` over that durable store, taking its time on
    ``clock`` and reporting to ``listener``.
    """

    def new_store(self, incarnation: str) -> object: ...

    def open_backend(
        self,
        store: object,
        clock: IReactorTime,
        listener: StoreListener,
        latency: Callable[[], float],
    ) -> IBackend: ...


class MemoryStoreModel:
    """
    The default :class:`StoreModel`: :class:`SimulatedBackend` over
    :class:`ilm.backends.InMemoryStorage`.
    """

    name = "memory"

    def new_store(self, incarnation: str) -> InMemoryStorage:
        storage = InMemoryStorage()
        storage.incarnation = incarnation
        return storage

    def open_backend(
        self,
        store: object,
        clock: IReactorTime,
        listener: StoreListener,
        latency: Callable[[], float],
    ) -> SimulatedBackend:
        if not isinstance(store, InMemoryStorage):
            raise TypeError(f"expected an InMemoryStorage, not {type(store).__name__}")
        return SimulatedBackend(store, clock, listener, latency)
