"""
Group commit: the one caller of ``IBackend.commit``.

Sends accepted by ``send_to`` and the node's bookkeeping (acknowledged
positions, delivery marks, retired and forgotten incarnations) wait here
for the next commit.  Requests give a deadline; whatever is pending when
the earliest comes goes into one batch (up to :data:`COMMIT_MESSAGES` of
each peer's messages; the rest goes into the next), one commit runs at a
time, a failed commit's bookkeeping is merged into the next batch and
retried after a backoff, and a barrier waits for everything pending now to
be durable.  Per message, only a list append happens here (in the sender);
everything else is per commit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ilm._backoff import Backoff, Retry
from ilm._observer import OneShotObserver
from ilm._peerid import PeerId
from ilm._status import COMMIT_BATCH_BOUNDS, COMMIT_SECONDS_BOUNDS, HistogramCounter
from ilm._store import CommitResult, StoreBatch, batch_problems
from ilm.errors import StoreError, StoreInDoubt
from ilm.interfaces import IBackend

__all__ = ["GroupCommitter", "Outbox", "Send"]


class Outbox(Protocol):
    """
    What the committer needs of one peer's outbox.
    """

    peer_id: PeerId

    def take_pending(self, limit: int) -> tuple[int, list[bytes], list[Any]]:
        """
        :return: the messages accepted since the last call (about ``limit``
            at most: the rest stay pending), the position the first takes,
            and per message what waits for its receipt (the committer only
            hands them back).
        """

    @property
    def pending(self) -> list[bytes]:
        """What was accepted and not yet taken."""


#: About the most messages of one peer a commit takes; the rest go into the
#: next commit, which starts as soon as this one is done.  A backlog is
#: committed in steps, so that the first of it is transmitted while the
#: rest is being written.
COMMIT_MESSAGES = 16384

#: One peer's messages in a batch: (outbox, first position, contents,
#: per message what waits for its receipt).
Send = tuple[Any, int, list[bytes], list[Any]]

#: A commit started and not yet attached to: (its Deferred, batch, sends,
#: the barrier it fires).
_Started = tuple[Deferred[CommitResult], StoreBatch, list[Send], OneShotObserver[None]]


class GroupCommitter:
    """
    Batches sends and bookkeeping into commits of ``backend``.

    :param later: schedules a call (``IReactorTime.callLater`` that logs
        what the call raises).
    :param may_commit: whether a commit may start now (the node runs).
    :param drop_unstorable: takes the sends of peers whose entries no store
        can hold out of a batch (``(batch, sends, problems) -> sends``).
    :param committed: after a commit succeeded (``(result, batch, sends)``):
        counts what it stored, and returns the sends with the positions they
        took.
    :param receipts: then, once the next commit has started, gives those
        sends' receipts and transmits them (``(sends)``).
    :param failed: after a commit failed, to refuse its sends
        (``(reason, sends, delay)``).
    :param settled: last, after every commit's outcome was handled.
    :param shared: commit with ``commit_shared`` (a store shared by several
        gateways, ``ilm.backends.IStreamOwnership``): the store gives the
        new messages their positions, reported in the result.
    """

    def __init__(
        self,
        backend: IBackend,
        clock: IReactorTime,
        backoff: Backoff,
        *,
        later: Callable[..., IDelayedCall],
        may_commit: Callable[[], bool],
        drop_unstorable: Callable[
            [StoreBatch, list[Send], dict[PeerId, str]], list[Send]
        ],
        committed: Callable[[CommitResult, StoreBatch, list[Send]], list[Send]],
        receipts: Callable[[list[Send]], None],
        failed: Callable[[Failure, list[Send], float], None],
        settled: Callable[[], None],
        unexpected: Callable[[Failure, str], None],
        shared: bool = False,
    ) -> None:
        self._backend = backend
        self._commit: Callable[[StoreBatch], Deferred[CommitResult]] = (
            backend.commit_shared if shared else backend.commit  # type: ignore[attr-defined]
        )
        self._shared = shared
        self._clock = clock
        self._retry = Retry(backoff)
        self._later = later
        self._may_commit = may_commit
        self._drop_unstorable = drop_unstorable
        self._committed = committed
        self._receipts = receipts
        self._failed = failed
        self._settled = settled
        self._unexpected = unexpected
        #: Bookkeeping for the next commit; callers add to it directly.
        self.bookkeeping = StoreBatch()
        #: Outboxes with pending sends, in the order they got them.
        self.outboxes: dict[PeerId, Outbox] = {}
        #: Whether a send asked for a commit "now" since the last one began.
        self.asked_now = False
        self.committing = False
        #: The sends of the commit in flight.
        self.in_commit: list[Send] = []
        #: How many delivery marks the last commit to start carried (what
        #: the deliverers space marks' commits by).
        self.last_marks = 0
        self._call: IDelayedCall | None = None
        # The earliest moment some pending work asked to be committed by.
        self._due = math.inf
        # After a failed commit, no commit starts before this moment.
        self._retry_at = 0.0
        self._next_commit: OneShotObserver[None] = OneShotObserver()
        # Whether a commit's outcome is being handled (_done).
        self._in_done = False
        self._started_at = 0.0
        # What stats() reports.
        self.commits = 0
        self.failures = 0
        self.stored = 0
        self.in_doubt = False
        self.seconds = HistogramCounter(COMMIT_SECONDS_BOUNDS)
        self.batch_sizes = HistogramCounter(COMMIT_BATCH_BOUNDS)

    def commit_now(self) -> None:
        """
        A send was accepted: commit as soon as possible (per message: one
        attribute test once the first send asked).
        """
        if not self.asked_now:
            self.asked_now = True
            self.schedule(0)

    def schedule(self, delay: float = 0) -> None:
        """
        Ask for a commit within ``delay`` seconds.  Requests share commits:
        whatever is pending when the earliest deadline comes goes into one
        batch, and while a commit runs, the next waits for it to finish.
        """
        now = self._clock.seconds()
        due = now + delay
        if due < self._retry_at:
            due = self._retry_at
            delay = due - now
        if due >= self._due:
            return
        self._due = due
        if self.committing:
            return
        call = self._call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = self._later(delay, self._flush)

    def barrier(self) -> Deferred[None]:
        """
        :return: a Deferred that fires once a commit that starts after this
            call has succeeded (so everything pending now is durable; a failed
            commit's bookkeeping is retried and waited for), or at once if
            nothing is pending.  It does not wait for work that arrives
            later, so a busy node still gets there.
        """
        if not self.committing and not self.bookkeeping and not self.outboxes:
            return succeed(None)
        d = self._next_commit.when_fired()
        self.schedule(0)
        return d

    def stop(self) -> None:
        """
        Start no more commits (the one in flight completes).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule_pending(self) -> None:
        """
        After a commit: schedule the next one for the earliest deadline asked
        for while it ran.
        """
        due = self._due
        if due == math.inf:
            return
        self._due = math.inf
        self.schedule(max(0.0, due - self._clock.seconds()))

    def _flush(self) -> None:
        self._call = None
        started = self._start()
        if started is not None:
            self._attach(*started)

    def _start(self) -> _Started | None:
        """
        Start a commit of what is pending (its Deferred has no callbacks
        yet: :meth:`_attach` adds them), or ``None`` if none starts.
        """
        self._due = math.inf
        self.asked_now = False
        if self.committing or not self._may_commit():
            return None
        batch = self.bookkeeping
        self.bookkeeping = StoreBatch()
        sends: list[Send] = []
        left: dict[PeerId, Outbox] = {}
        for peer_id, outbox in self.outboxes.items():
            first, contents, deferreds = outbox.take_pending(COMMIT_MESSAGES)
            batch.messages[peer_id] = (first, contents)
            sends.append((outbox, first, contents, deferreds))
            if outbox.pending:
                left[peer_id] = outbox
        self.outboxes = left
        self.last_marks = len(batch.delivered)
        problems = batch_problems(batch, positions=not self._shared)
        if problems:
            sends = self._drop_unstorable(batch, sends, problems)
        if left:
            # The barrier's waiters wait for a commit that takes the rest.
            barrier: OneShotObserver[None] = OneShotObserver()
        else:
            barrier, self._next_commit = self._next_commit, OneShotObserver()
        if not batch:
            barrier.fire(None)
            if left:
                self.commit_now()
            return None
        self.committing = True
        if left:
            # The next commit starts as soon as this one is done.
            self.commit_now()
        self.in_commit = sends
        self._started_at = self._clock.seconds()
        self.batch_sizes.observe(
            sum(len(contents) for _, _, contents, _ in sends)
            + len(batch.acked)
            + len(batch.delivered)
            + len(batch.retired)
            + len(batch.forgotten)
        )
        try:
            d = self._commit(batch)
        except Exception:
            d = fail()
        return d, batch, sends, barrier

    def _attach(
        self,
        d: Deferred[CommitResult],
        batch: StoreBatch,
        sends: list[Send],
        barrier: OneShotObserver[None],
    ) -> None:
        d.addCallbacks(
            self._done,
            self._commit_failed,
            callbackArgs=(batch, sends, barrier),
            errbackArgs=(batch, sends, barrier),
        )
        d.addErrback(self._unexpected, "processing a commit")

    def _done(
        self,
        result: CommitResult,
        batch: StoreBatch,
        sends: list[Send],
        barrier: OneShotObserver[None],
    ) -> None:
        self.committing = False
        self.in_commit = []
        self.commits += 1
        self.in_doubt = False
        self.seconds.observe(self._clock.seconds() - self._started_at)
        self._retry.succeeded()
        self._retry_at = 0.0
        for _, _, contents, _ in sends:
            self.stored += len(contents)
        # The next commit starts before this one's receipts are given and
        # its messages transmitted, so that the store writes while the
        # reactor thread does that.  Its Deferred gets its callbacks last:
        # a store that commits at once (in memory) then still gives the
        # receipts in order, and one commit at a time starts this way.
        nested = self._in_done
        self._in_done = True
        started = None
        try:
            stored = self._committed(result, batch, sends)
            if not nested and self._due <= self._clock.seconds():
                if self._call is not None and self._call.active():
                    self._call.cancel()
                self._call = None
                started = self._start()
            else:
                self._schedule_pending()
            self._receipts(stored)
            barrier.fire(None)
            self._settled()
        finally:
            if started is not None:
                self._attach(*started)
            self._in_done = nested

    def _commit_failed(
        self,
        reason: Failure,
        batch: StoreBatch,
        sends: list[Send],
        barrier: OneShotObserver[None],
    ) -> None:
        self.committing = False
        self.in_commit = []
        self.failures += 1
        self.seconds.observe(self._clock.seconds() - self._started_at)
        if reason.check(StoreInDoubt):
            self.in_doubt = True
        # What the barrier's waiters waited for is retried: they wait for
        # the retry, before those who came during the failed commit.
        later, self._next_commit = self._next_commit, barrier
        if later:
            barrier.when_fired().addCallback(lambda _: later.fire(None))
        if not reason.check(StoreError):
            error = StoreError(f"store commit failed: {reason.getErrorMessage()}")
            error.__cause__ = reason.value
            reason = Failure(error)
        delay = self._retry.failed()
        self._retry_at = self._clock.seconds() + delay
        # The bookkeeping is retried: merged back before ``failed`` runs, so
        # that it may take out what must not be retried (a fenced stream's).
        self.bookkeeping.merge_bookkeeping(batch)
        self._failed(reason, sends, delay)
        self._schedule_pending()
        if self.bookkeeping or self._next_commit:
            self.schedule(delay)
        self._settled()
