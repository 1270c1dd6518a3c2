"""
The liveness of one gateway process in a PostgreSQL store shared by the
gateways of a node, and the rule it serves: a live gateway whose write is
blocked by a gateway that stopped in the middle of a transaction ends that
gateway's session, so that a stopped or frozen process blocks the live
ones for a bounded time.

Why it is needed: a gateway stopped (SIGSTOP, a paused VM, a long GC)
between two writes of a pipelined transaction keeps its row locks, and
the server sees its session *active*, waiting for the rest of the request,
so no server timeout ends it (``idle_in_transaction_session_timeout``
covers only a session idle after a complete request).  A gateway
appending to a stream it does not own holds that stream's ``outbound``
row, and the owner's commits for the stream would fail with
:class:`ilm.errors.StoreLocked` for as long as it stays stopped.

The rule:

- **Liveness rows.**  Each gateway has a row per (node, gateway name) in
  the ``gateway`` table, with an expiry in database time and the gateway's
  current *opening* (``opened_at``).  Opening (and reopening) the store
  registers it for a lease duration in a new opening, always later than
  the previous one of that name, and names the writer sessions after it
  (``application_name`` ``ilm writer <opening> <name>``, the opening as
  14 hex digits); every third of the lease the row is refreshed, whether
  or not the gateway owns any stream, if it still holds that opening.
  The refresh runs on the reader connection, not the writer, so a gateway
  whose writer is itself waiting for a lock still shows as live.  A clean
  close ends it (its opening only).
- **One live process per name.**  A process that opens the store under a
  gateway name takes the name over: from then on the earlier process of
  that name (stopped, or still running by mistake) is not live, whatever
  the row's expiry, because its writer sessions carry an opening that is
  no longer the row's.  The new process logs ``gateway_name_reused`` if
  the earlier one was live; the earlier one, if it runs, finds out at its
  next refresh, logs ``gateway_name_reused`` as an error, stops counting
  itself live and stops refreshing (until it reopens the store).  Its
  writes stay correct (its leases are fenced by their epochs), but its
  sessions may be ended as a stopped gateway's are: give each process its
  own name.
- **The watch.**  Every tenth of the lease, if the writer connection has
  been inside one transaction for longer than a tenth of the lease (a
  live gateway's transaction holds its row locks for the length of a
  commit: milliseconds), the gateway asks the server which sessions block
  its writer (``pg_blocking_pids``) and ends (``pg_terminate_backend``)
  those that are, by their ``application_name``, the writer session of a
  gateway of the same node in an opening that is not live (not its name's
  current one, or one whose row has expired by the database's clock),
  inside a write transaction.  A writer session of a live opening, of
  another node, this gateway's own, or a session named otherwise (a
  reader, an operator) is left alone: the wait goes on, to the lock
  timeout.

The bound: a gateway stopped at time *t* refreshed its row last at or
before *t*, so the row has expired by *t* + lease (or earlier, when a new
process opens the store under its name).  A write it blocks is
freed at the first look after that, and after at least a tenth of the
lease of waiting: at most a lease and a tenth after the stop (5.5 s with
the default 5 s lease, below the default 10 s ``lock_timeout``).

Why it is safe: the session ended had not committed its transaction (it
was blocked mid-transaction), so nothing it wrote is applied and nothing
it acknowledged depends on it.  If the stopped gateway resumes, its
connection is found lost: before ``COMMIT``, the transaction is run again
on a new connection (it can never have committed); during ``COMMIT``, the
commit fails with :class:`ilm.errors.StoreInDoubt` and the store refuses
commits until it is reopened, which reads the truth and registers the
gateway again.  Its leases, which expired with its liveness, are fenced by
their epochs as always.  Ending the session of a gateway that was in fact
running (its refreshes failed, or it had just resumed) costs it that
transaction, never correctness.

This takes nothing from the take-over rule of
:class:`ilm.backends._pg_leases.PostgresLeases` (a take-over blocked for
0.6 of a lease ends the lease holder's writer sessions once its *lease*
has expired): the lease expiry proves that its holder stopped serving the
stream, and both rules end only sessions whose transaction never
committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import attr
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_schema import _Conn, store_error
from ilm.backends._threads import StoreThreads

__all__ = ["GatewayLiveness"]

log = Logger(namespace="ilm.backends.postgres")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Refreshed:
    """
    What a refresh found: when it began (``time.monotonic``), the opening
    it refreshed, whether the row was still that opening's (``refreshed``)
    and, if not, the opening that took its place (``None`` if the row is
    gone).
    """

    started: float
    opened_at: datetime
    refreshed: bool
    other: datetime | None


class GatewayLiveness:
    """
    One gateway's liveness row and its watch over blocked writes.

    :param gateway: this gateway's name.
    :param lease_duration: how long a registration or refresh lasts.
    :param usable: whether the store is open (no work is queued otherwise).
    """

    def __init__(
        self,
        node: PostgresNode,
        connections: PostgresConnections,
        threads: StoreThreads,
        *,
        gateway: str,
        lease_duration: float,
        usable: Callable[[], bool],
    ) -> None:
        self.node = node
        self.connections = connections
        self.threads = threads
        self.gateway = gateway
        self.lease_duration = lease_duration
        self.usable = usable
        self.interval = lease_duration / 10
        """Seconds between two looks (refresh due? writer blocked?)."""
        self.blocked_after = lease_duration / 10
        """A writer transaction longer than this is checked for blockers."""
        self.live_until: float | None = None
        """
        The local deadline of this gateway's liveness (``time.monotonic``,
        measured from before the request that registered or refreshed it),
        ``None`` before the first registration.
        """
        self.opened_at: datetime | None = None
        """This gateway's current opening (``None`` before registering)."""
        self.superseded = False
        """
        Whether another process has opened the store under this gateway's
        name since this one registered (it is not live, and not refreshed,
        until it registers again).
        """
        self.ended = 0
        """Sessions of stopped gateways ended by this one."""
        self._loop: LoopingCall | None = None
        self._refreshing = False
        self._checking = False

    def live(self) -> bool:
        """Whether this gateway's liveness row is live by its local deadline."""
        return self.live_until is not None and time.monotonic() < self.live_until

    # -- on the writer thread ------------------------------------------------------

    def register(self) -> None:
        """
        Record this gateway live for a lease from now, in a new opening,
        and name its writer session after it (on the writer thread, when
        the store is opened or reopened: a gateway resumed after its
        sessions were ended registers again).
        """
        started = time.monotonic()
        conn = self.connections.writer_conn()
        try:
            row = conn.execute(
                self.node.sql.register_gateway,
                {
                    "n": self.node.key,
                    "name": self.gateway,
                    "secs": self.lease_duration,
                },
            ).fetchone()
            assert row is not None
            opened_at, opening, previous, previous_live = row
            self.connections.opening = opening
            conn.execute(
                b"SELECT set_config('application_name', %s, false)",
                (self.connections.session_name("writer"),),
            )
        except Exception as e:
            raise store_error(e, self.connections.where, "cannot register in") from e
        mine, self.opened_at = self.opened_at, opened_at
        self.superseded = False
        self.live_until = started + self.lease_duration
        if previous_live and previous != mine:
            self.threads.reactor.callFromThread(
                log.warn,
                "gateway {gateway!r} opened the store (at {later}) while an "
                "earlier process of that name was live (opened at {earlier}): "
                "that one counts as stopped from now on, and its writer "
                "sessions may be ended when they block a write; give each "
                "process its own name",
                gateway=self.gateway,
                earlier=previous.isoformat(),
                later=opened_at.isoformat(),
                ilm_event="gateway_name_reused",
            )

    def expire(self) -> None:
        """
        The gateway closes (on the writer thread): the liveness of its
        opening ends now (not that of a later process of the same name).
        """
        opened_at, self.opened_at = self.opened_at, None
        self.live_until = None
        conn = self.connections.writer
        if (
            conn is None
            or conn.closed
            or conn.broken
            or not self.node.key
            or opened_at is None
        ):
            return
        try:
            conn.execute(
                self.node.sql.expire_gateway, (self.node.key, self.gateway, opened_at)
            )
        except Exception as e:
            log.info(
                "could not end the liveness of gateway {gateway!r} on closing "
                "(it expires by itself): {error}",
                gateway=self.gateway,
                error=str(e),
                ilm_event="gateway_expire_failed",
            )

    # -- the timer, in the reactor thread -------------------------------------------

    def start(self) -> None:
        """Look every :attr:`interval` seconds (idempotent)."""
        if self._loop is not None:
            return
        loop = self._loop = LoopingCall(self._look)
        loop.clock = self.threads.reactor
        loop.start(self.interval, now=False).addErrback(self._unexpected)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _look(self) -> None:
        if not self.usable():
            return
        now = time.monotonic()
        due = self.live_until is None or (
            now >= self.live_until - self.lease_duration * 2 / 3
        )
        opened_at = self.opened_at
        if (
            due
            and opened_at is not None
            and not self._refreshing
            and not self.superseded
        ):
            self._refreshing = True
            d = self.threads.on_reader(self._refresh, opened_at)
            d.addCallbacks(self._refreshed, self._failed, errbackArgs=("refresh",))
        busy = self.connections.writer_busy_since
        pid = self.connections.writer_pid
        if (
            busy is not None
            and pid is not None
            and now - busy >= self.blocked_after
            and not self._checking
        ):
            self._checking = True
            waited = now - busy
            check = self.threads.on_reader(self._end_stopped_blockers, pid)
            check.addCallbacks(
                self._checked,
                self._failed,
                callbackArgs=(waited,),
                errbackArgs=("check",),
            )

    # -- on the reader thread -------------------------------------------------------

    def _refresh(self, opened_at: datetime) -> _Refreshed:
        """Refresh the liveness row of the opening ``opened_at``, if it is its."""
        started = time.monotonic()
        sql = self.node.sql

        def body(conn: _Conn) -> tuple[bool, datetime | None]:
            refreshed = conn.execute(
                sql.refresh_gateway,
                {
                    "n": self.node.key,
                    "name": self.gateway,
                    "secs": self.lease_duration,
                    "opened": opened_at,
                },
            ).fetchone()
            if refreshed is not None:
                return True, None
            row = conn.execute(sql.gateway_row, (self.node.key, self.gateway))
            other = row.fetchone()
            return False, None if other is None else other[0]

        refreshed, other = self.connections.reading(body)
        return _Refreshed(started, opened_at, refreshed, other)

    def _end_stopped_blockers(self, pid: int) -> list[tuple[int, str]]:
        def body(conn: _Conn) -> list[tuple[int, str]]:
            rows = conn.execute(
                self.node.sql.end_stopped_blockers,
                {
                    "pid": pid,
                    "n": self.node.key,
                    "me": self.connections.session_name("writer"),
                },
            ).fetchall()
            return [(int(p), str(name)) for p, name, signalled in rows if signalled]

        return self.connections.reading(body)

    # -- results, in the reactor thread ----------------------------------------------

    def _refreshed(self, result: _Refreshed) -> None:
        self._refreshing = False
        if result.opened_at != self.opened_at:
            return  # registered again (or closed) meanwhile
        if result.refreshed:
            self.live_until = result.started + self.lease_duration
            return
        self.superseded = True
        self.live_until = None
        log.error(
            "another process opened the store as gateway {gateway!r} (at "
            "{later}) after this one (at {earlier}): this one no longer counts "
            "as live, and its writer sessions may be ended when they block a "
            "write, until it reopens the store; give each process its own name",
            gateway=self.gateway,
            earlier=result.opened_at.isoformat(),
            later=None if result.other is None else result.other.isoformat(),
            ilm_event="gateway_name_reused",
        )

    def _checked(self, ended: list[tuple[int, str]], waited: float) -> None:
        self._checking = False
        if not ended:
            return
        self.ended += len(ended)
        log.warn(
            "ended {count} session(s) of stopped gateway(s) {gateways} (pids "
            "{pids}) that blocked a write of gateway {gateway!r} for {waited:.1f} s "
            "after their liveness expired",
            count=len(ended),
            gateways=sorted({name for _, name in ended}),
            pids=[pid for pid, _ in ended],
            gateway=self.gateway,
            waited=waited,
            ilm_event="stopped_blocker_ended",
        )

    def _failed(self, reason: Failure, what: str) -> None:
        if what == "refresh":
            self._refreshing = False
        else:
            self._checking = False
        limiter = self.connections.limiter
        if limiter is None:
            return
        limiter.emit(
            ("gateway_liveness_failed", what),
            LogLevel.warn,
            "gateway liveness {what} of {gateway!r} failed: {error}",
            what=what,
            gateway=self.gateway,
            error=reason.getErrorMessage(),
            ilm_event="gateway_liveness_failed",
        )

    def _unexpected(self, reason: Failure) -> None:
        self._loop = None
        log.failure(
            "internal error while {doing}",
            reason,
            doing="watching gateway liveness",
            ilm_event="internal_error",
        )
