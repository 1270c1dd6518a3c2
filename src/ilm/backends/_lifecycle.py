"""
What the blocking stores (SQLite, PostgreSQL) do alike around their
threads: opening, closing, refusing work while closed, and the rule after a
commit whose outcome is unknown.

:class:`StoreLifecycle` holds a store's state (closed, open, closing,
broken after :class:`ilm.errors.StoreInDoubt`) over its
:class:`~ilm.backends._threads.StoreThreads`; the backends call it from
their facades.  :func:`checked_run` is the check every outbox read makes of
the rows it found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ilm._peerid import PeerId
from ilm.backends._threads import StoreThreads
from ilm.errors import StoreCorrupt, StoreError, StoreInDoubt

__all__ = ["StoreLifecycle", "check_read_after", "checked_run"]

_T = TypeVar("_T")


class StoreLifecycle:
    """
    The open/closing/closed state of a store on :class:`StoreThreads`, and
    whether a failed ``COMMIT`` left it refusing commits until reopened.

    :param threads: the store's writer and reader threads.
    :param where: names the store in errors and logs.
    :param log: the store's logger (``store_broken`` events).
    :param stopped: called once both threads are stopped (after a close or
        a failed open), for what the store keeps beside its threads.
    """

    __slots__ = ("_log", "_stopped", "broken", "closing", "opened", "threads", "where")

    def __init__(
        self,
        threads: StoreThreads,
        where: str,
        log: Logger,
        stopped: Callable[[], None] = lambda: None,
    ) -> None:
        self.threads = threads
        self.where = where
        self._log = log
        self._stopped = stopped
        self.opened = False
        self.closing: Deferred[None] | None = None
        self.broken: StoreError | None = None

    def unusable(self) -> StoreError | None:
        """The error for work asked of a store that is not open, or ``None``."""
        if not self.opened or self.closing is not None:
            return StoreError(f"{self.where} is closed")
        return None

    def refuse(self) -> Deferred[Any] | None:
        """A failed Deferred if the store is not open (see :meth:`unusable`)."""
        error = self.unusable()
        return None if error is None else fail(error)

    def open(
        self, open_writer: Callable[[], Deferred[_T]], reopen: Callable[[], _T]
    ) -> Deferred[_T]:
        """
        Start the threads and run ``open_writer()`` (which queues the
        opening work); on an open store, run ``reopen`` on the writer
        thread instead.  The caller undoes a failed opening with
        :meth:`undo_open`.
        """
        if self.closing is not None:
            return fail(StoreError(f"{self.where} is closing"))
        if self.opened:
            return self.threads.on_writer(reopen)
        self.threads.start()
        self.opened = True
        return open_writer()

    def stop(self) -> None:
        """Stop the threads at once (the reactor is shutting down)."""
        self.opened = False
        self.threads.stop()
        self._stopped()

    def undo_open(
        self,
        reason: Failure,
        close_writer: Callable[[], None],
        close_reader: Callable[[], None],
    ) -> Deferred[Any]:
        """
        Undo a failed open: close what was opened on both threads, stop
        them, then fail with ``reason``.
        """
        d = self.threads.on_writer(close_writer)
        d.addBoth(lambda _: self.threads.on_reader(close_reader))

        def stopped(_: object) -> Failure:
            self.stop()
            return reason

        return d.addBoth(stopped)

    def close(
        self, close_writer: Callable[[], None], close_reader: Callable[[], None]
    ) -> Deferred[None]:
        """
        Finish what is queued, run ``close_writer`` and ``close_reader`` on
        their threads and stop them; fails with the first error met.  A
        second call waits for the first.
        """
        if self.closing is not None:
            waiter: Deferred[None] = Deferred()

            def done_closing(_: object) -> None:
                waiter.callback(None)

            self.closing.addCallback(done_closing)
            return waiter
        if not self.opened:
            return succeed(None)
        closing = self.closing = Deferred()
        errors: list[Failure] = []
        writer = self.threads.on_writer(close_writer)
        writer.addErrback(errors.append)
        reader = self.threads.on_reader(close_reader)
        reader.addErrback(errors.append)

        def closed(_: object) -> Failure | None:
            self.stop()
            self.closing = None
            closing.callback(None)
            return errors[0] if errors else None

        return DeferredList([writer, reader]).addCallback(closed)

    def check_unbroken(self) -> None:
        """:raises StoreError: if a failed commit left the store in doubt."""
        if self.broken is not None:
            raise self.broken

    def in_doubt(
        self, error: StoreError, stored: str = "committed", **fields: object
    ) -> StoreInDoubt:
        """
        ``COMMIT`` failed: the batch may or may not be applied.  Refuse
        every later commit until reopened (reusing the batch's positions
        could collide with it), log it (``store_broken``, with ``fields``
        besides ``where`` and ``error``), and return the error to raise.
        """
        in_doubt = StoreInDoubt(f"{error}: whether the batch is {stored} is unknown")
        in_doubt.__cause__ = error
        broken = StoreError(
            f"{self.where} is in an unknown state after a failed commit "
            f"({error}); restart the node (or open the backend again)"
        )
        broken.__cause__ = error
        self.broken = broken
        self._log.critical(
            "commit to {where} failed in an unknown state; the store refuses "
            "further commits until reopened: {error}",
            where=self.where,
            error=str(error),
            ilm_event="store_broken",
            **fields,
        )
        return in_doubt


def check_read_after(peer_id: PeerId, after: int, acked: int) -> None:
    """:raises StoreError: for a read from below what is acknowledged."""
    if after < acked:
        raise StoreError(
            f"outbox to {peer_id!r}: read after {after}, below acknowledged {acked}"
        )


_CONTENTS = itemgetter(1)


def checked_run(
    peer_id: PeerId, after: int, rows: Sequence[tuple[int, Any]]
) -> list[bytes]:
    """
    The contents of ``(position, contents)`` rows read after ``after``.

    :raises StoreCorrupt: if the positions are not ``after + 1`` on without
        a gap.
    """
    if rows and (rows[0][0] != after + 1 or rows[-1][0] != after + len(rows)):
        raise StoreCorrupt(
            f"outbox to {peer_id!r} has a gap after position {after}: "
            f"read {rows[0][0]}..{rows[-1][0]} ({len(rows)} rows)"
        )
    contents = list(map(_CONTENTS, rows))
    if contents and type(contents[0]) is not bytes:
        # A driver that gives memoryviews (or bytearrays) for BLOBs.
        contents = [bytes(c) for c in contents]
    return contents
