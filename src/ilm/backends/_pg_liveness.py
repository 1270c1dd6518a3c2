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
  the ``gateway`` table, with an expiry in database time.  Opening (and
  reopening) the store registers it for a lease duration; every third of
  the lease it is refreshed, whether or not the gateway owns any stream.
  The refresh runs on the reader connection, not the writer, so a gateway
  whose writer is itself waiting for a lock still shows as live.  A clean
  close ends it.
- **The watch.**  Every tenth of the lease, if the writer connection has
  been inside one transaction for longer than a tenth of the lease (a
  live gateway's transaction holds its row locks for the length of a
  commit: milliseconds), the gateway asks the server which sessions block
  its writer (``pg_blocking_pids``) and ends (``pg_terminate_backend``)
  those that are, by their ``application_name`` (``ilm writer <name>``),
  the writer session of a gateway of the same node whose liveness row has
  expired by the database's clock, inside a write transaction.  A session
  of a live gateway, of another node, of this gateway, or named otherwise
  (a reader, an operator) is left alone: the wait goes on, to the lock
  timeout.

The bound: a gateway stopped at time *t* refreshed its row last at or
before *t*, so the row has expired by *t* + lease.  A write it blocks is
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

from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_schema import _Conn, store_error
from ilm.backends._threads import StoreThreads

__all__ = ["GatewayLiveness"]

log = Logger(namespace="ilm.backends.postgres")


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
        Record this gateway live for a lease from now (on the writer
        thread, when the store is opened or reopened: a gateway resumed
        after its sessions were ended registers again).
        """
        started = time.monotonic()
        conn = self.connections.writer_conn()
        try:
            conn.execute(
                self.node.sql.register_gateway,
                (self.node.key, self.gateway, self.lease_duration),
            )
        except Exception as e:
            raise store_error(e, self.connections.where, "cannot register in") from e
        self.live_until = started + self.lease_duration

    def expire(self) -> None:
        """The gateway closes (on the writer thread): its liveness ends now."""
        self.live_until = None
        conn = self.connections.writer
        if conn is None or conn.closed or conn.broken or not self.node.key:
            return
        try:
            conn.execute(self.node.sql.expire_gateway, (self.node.key, self.gateway))
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
        if due and not self._refreshing:
            self._refreshing = True
            d = self.threads.on_reader(self._refresh)
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

    def _refresh(self) -> float:
        started = time.monotonic()

        def body(conn: _Conn) -> None:
            conn.execute(
                self.node.sql.refresh_gateway,
                (self.node.key, self.gateway, self.lease_duration),
            )

        self.connections.reading(body)
        return started

    def _end_stopped_blockers(self, pid: int) -> list[tuple[int, str]]:
        def body(conn: _Conn) -> list[tuple[int, str]]:
            rows = conn.execute(
                self.node.sql.end_stopped_blockers,
                {"pid": pid, "n": self.node.key, "me": self.gateway},
            ).fetchall()
            return [(int(p), str(name)) for p, name, signalled in rows if signalled]

        return self.connections.reading(body)

    # -- results, in the reactor thread ----------------------------------------------

    def _refreshed(self, started: float) -> None:
        self._refreshing = False
        self.live_until = started + self.lease_duration

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
