"""
An :class:`ilm.interfaces.IBackend` that keeps a node's state in PostgreSQL,
shared by every gateway process of that node, with leases and fencing
(:class:`ilm.backends.IStreamOwnership`).

- Driver: psycopg 3 (synchronous API) on dedicated Twisted thread pools: one
  writer thread and connection (commits, leases), one reader thread and
  connection (outbox reads), and, if :meth:`PostgresBackend.watch` is used,
  one listening connection read by the reactor (``LISTEN``, hints only).
- Every commit is one ``READ COMMITTED`` transaction in two round trips:
  one pipeline holding every statement (the lease checks under ``FOR
  SHARE``; per peer, one statement that locks the stream's row, moves its
  end and inserts all its new messages from one ``bytea`` array; one per
  acknowledgement; the marks), whose results are checked before the
  second, ``COMMIT``.  The server assigns positions under the row lock, so
  nothing is read before it is written.  Serialization failures and
  deadlocks (SQLSTATE 40001, 40P01) before ``COMMIT`` are retried a
  bounded number of times.  A failure *of* ``COMMIT`` (a lost connection,
  an error) is :class:`ilm.errors.StoreInDoubt`: the backend then refuses
  commits until it is opened again.
- Schema: a PostgreSQL schema (``ilm`` by default) holding versioned
  tables, migrated in one transaction under a transaction-level advisory
  lock.  Several logical nodes may share it: every table is keyed by the
  node first.

:class:`PostgresBackend` is the facade over the parts, each in its own
module: the schema and migrations (``_pg_schema``), the statements
(``_pg_sql``), the connections and interaction wrapper
(``_pg_connections``), the node's rows (``_pg_node``), the commit path
(``_pg_commit``), the leases (``_pg_leases``), the reads (``_pg_reads``),
the append hints (``_pg_listener``), the gateway's liveness and the
ending of stopped gateways' sessions that block its writes
(``_pg_liveness``) and inspection (``_pg_inspect``).

docs/scaling.md explains the design, the failure cases and the figures.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import PeerId, check_peer_id
from ilm._store import CommitResult, OutboundRecord, StoreBatch, StoredState
from ilm.backends._lifecycle import StoreLifecycle
from ilm.backends._ownership import (
    IStreamOwnership,
    Renewal,
    SharedCommitResult,
    StreamTaken,
)
from ilm.backends._pg_commit import PostgresCommitter
from ilm.backends._pg_connections import RETRIED_SQLSTATES, PostgresConnections
from ilm.backends._pg_leases import PostgresLeases
from ilm.backends._pg_listener import HintListener
from ilm.backends._pg_liveness import GatewayLiveness
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_reads import PostgresReads, checked_peer_id, read_problem
from ilm.backends._pg_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    migrate,
    psycopg,
    quote_schema,
    schema_version,
    store_error,
)
from ilm.backends._pg_sql import Statements
from ilm.backends._threads import StoreThreads
from ilm.errors import StoreError
from ilm.interfaces import IBackend

__all__ = [
    "MIGRATIONS",
    "RETRIED_SQLSTATES",
    "SCHEMA_VERSION",
    "PostgresBackend",
    "migrate",
    "schema_version",
    "store_error",
]

log = Logger(namespace="ilm.backends.postgres")


@implementer(IBackend, IStreamOwnership)
class PostgresBackend:
    """
    A node's durable store in PostgreSQL, shareable by several gateway
    processes of that node.

    :param dsn: a libpq connection string (``"host=... dbname=..."``) or URI
        (``"postgresql://user@host/db"``).
    :param node_id: the logical node whose state this is (an ILM node id).
        Several nodes may share one database and schema.
    :param gateway: this process's name among the node's gateways, recorded
        as the owner of the streams it takes (1 to 255 characters; unique per
        live process: opening the store under a name makes an earlier process
        of that name count as stopped, ``ilm.backends._pg_liveness``).
    :param schema: the PostgreSQL schema holding ILM's tables (created if
        missing; default ``"ilm"``).
    :param lease_duration: seconds a stream lease lasts without renewal
        (default 5).
    :param lock_timeout: the longest a transaction waits for a row lock
        (default 10 s); reaching it fails the operation with
        :class:`ilm.errors.StoreLocked`.  A write blocked by a gateway of
        this node stopped inside a transaction is freed within 1.1 leases
        of the stop (``ilm.backends._pg_liveness``): keep this above that.
    :param retries: how many times a transaction is run in all when it
        meets a serialization failure or a deadlock (default 5).
    :param connect_timeout: seconds to establish a connection (default 10).
    :param network_timeout: seconds after which a silent connection (a
        partition, a dead server) is declared lost through TCP keepalives
        and ``tcp_user_timeout`` (default 30), unless the DSN sets them.
    :param prepare_threshold: psycopg's; ``None`` disables server-side
        prepared statements (for a pooler that cannot carry them).
    :param reactor: the reactor running the threads; the global one if
        omitted.
    :param monotonic: the local clock of lease deadlines.
    """

    def __init__(
        self,
        dsn: str,
        *,
        node_id: PeerId,
        gateway: str,
        schema: str = "ilm",
        lease_duration: float = 5.0,
        lock_timeout: float = 10.0,
        retries: int = 5,
        connect_timeout: float = 10.0,
        network_timeout: float = 30.0,
        prepare_threshold: int | None = 5,
        reactor: Any = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if psycopg is None:  # pragma: no cover
            raise ImportError(
                "PostgresBackend needs psycopg 3: pip install 'ilm[postgres]'"
            )
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__name__}")
        self.node_id: PeerId = check_peer_id(node_id)
        if not isinstance(gateway, str) or not 1 <= len(gateway) <= 255:
            raise ValueError(
                f"gateway must be a name of 1 to 255 characters: {gateway!r}"
            )
        if "\x00" in gateway:
            raise ValueError("gateway names cannot hold NUL characters")
        for name, value in (
            ("lease_duration", lease_duration),
            ("lock_timeout", lock_timeout),
            ("connect_timeout", connect_timeout),
            ("network_timeout", network_timeout),
        ):
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if type(retries) is not int or retries < 1:
            raise ValueError(f"retries must be at least 1, not {retries!r}")
        self.gateway = gateway
        self.schema = schema
        self.lease_duration = float(lease_duration)
        self.lock_timeout = float(lock_timeout)
        self.retries = retries
        self.connect_timeout = connect_timeout
        self.network_timeout = network_timeout
        self.prepare_threshold = prepare_threshold
        channel = (
            "ilm_"
            + hashlib.sha256(schema.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        )
        self._threads = StoreThreads(
            reactor, f"postgres {gateway}", self._reactor_stopping
        )
        where = f"the PostgreSQL store {schema!r} of node {self.node_id!r}"
        self._life = StoreLifecycle(self._threads, where, log, self._stopped)
        self._connections = PostgresConnections(
            dsn,
            gateway=gateway,
            where=where,
            threads=self._threads,
            lock_timeout=self.lock_timeout,
            retries=retries,
            connect_timeout=connect_timeout,
            network_timeout=network_timeout,
            prepare_threshold=prepare_threshold,
            # A transaction left open by a stopped gateway blocks take-overs
            # of its streams (their lease rows) for at most half a lease.
            idle_in_transaction=self.lease_duration / 2,
        )
        self._node = PostgresNode(
            self.node_id, schema, Statements(quote_schema(schema)), self._connections
        )
        self._leases = PostgresLeases(
            self._node,
            self._connections,
            gateway=gateway,
            lease_duration=self.lease_duration,
            monotonic=monotonic,
        )
        self._committer = PostgresCommitter(
            self._node,
            self._connections,
            self._leases,
            self._life,
            gateway=gateway,
            channel=channel,
        )
        self._reads = PostgresReads(self._node, self._connections)
        self._liveness = GatewayLiveness(
            self._node,
            self._connections,
            self._threads,
            gateway=gateway,
            lease_duration=self.lease_duration,
            usable=lambda: self._life.unusable() is None,
        )
        self._channel = channel
        self._listener: HintListener | None = None

    def __repr__(self) -> str:
        return (
            f"PostgresBackend(node_id={self.node_id!r}, gateway={self.gateway!r}, "
            f"schema={self.schema!r})"
        )

    @property
    def schema_version(self) -> int:
        """The schema version of the store, once opened."""
        return self._node.schema_version

    @property
    def retried(self) -> int:
        """Transactions run again after a serialization failure or deadlock."""
        return self._connections.retried

    @property
    def reconnected(self) -> int:
        """Transactions run again on a new connection after losing theirs."""
        return self._connections.reconnected

    def _reactor_stopping(self) -> None:
        """
        The reactor is shutting down with the store open: stop the threads
        (else the process could not exit).  What was committed is
        committed; leases run out by themselves.
        """
        self._stop_listener()
        self._liveness.stop()
        self._life.stop()

    def _stopped(self) -> None:
        self._connections.stop()

    # -- IBackend --------------------------------------------------------------

    def open(self) -> Deferred[StoredState]:
        """
        Connect, create or migrate the schema, create the node's record
        (with a fresh incarnation) if it has none, register this gateway
        live (its liveness row, refreshed from then on every third of the
        lease: ``ilm.backends._pg_liveness``), and read the node's state;
        see :meth:`ilm.interfaces.IBackend.open`.  On an open backend, read
        the state again, register this gateway live again, and accept
        commits again after :class:`ilm.errors.StoreInDoubt`.  Fails with
        :class:`ilm.errors.StoreReadOnly`, :class:`~ilm.errors.StoreCorrupt`,
        :class:`~ilm.errors.StoreSchemaTooNew` or another
        :class:`~ilm.errors.StoreError`.
        """

        def open_writer() -> Deferred[StoredState]:
            self._connections.start()
            d = self._threads.on_writer(self._opened, self._node.open)
            return d.addErrback(
                self._life.undo_open, self._close_writer, self._close_reader
            )

        d = self._life.open(open_writer, lambda: self._opened(self._node.reload))
        return d.addCallback(self._watching)

    def _opened(self, read: Callable[[], StoredState]) -> StoredState:
        state = read()
        # Registered live on every opening, and again on reopening (after
        # StoreInDoubt: a gateway resumed after its sessions were ended).
        self._liveness.register()
        self._life.broken = None
        return state

    def _watching(self, state: StoredState) -> StoredState:
        self._liveness.start()
        return state

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        """
        Apply ``batch`` as one transaction; see
        :meth:`ilm.interfaces.IBackend.commit`.  Each peer's new messages
        must start right after its last stored position; bookkeeping entries
        are fenced (:class:`ilm.backends.Fenced`; see
        :class:`ilm.backends.IStreamOwnership`).
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        d = self._threads.on_writer(self._committer.commit, batch, False)
        return d.addCallback(lambda applied: CommitResult(applied[0]))

    def commit_shared(self, batch: StoreBatch) -> Deferred[SharedCommitResult]:
        """
        Apply ``batch`` appending its messages wherever each outbox ends;
        see :meth:`ilm.backends.IStreamOwnership.commit_shared`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        d = self._threads.on_writer(self._committer.commit, batch, True)
        return d.addCallback(lambda applied: SharedCommitResult(*applied))

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int | None = None
    ) -> Deferred[list[bytes]]:
        """
        Read stored messages to ``peer_id`` after position ``after``: at
        most ``limit`` of them and, if ``max_bytes`` is given, stopping
        before their total size would exceed it (but always at least one
        when any is there); see
        :meth:`ilm.interfaces.IBackend.read_outbound`.  Not fenced.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        problem = read_problem(after, limit, max_bytes)
        if problem is not None:
            return fail(StoreError(f"bad read: {problem}"))
        return self._threads.on_reader(
            self._reads.read, peer_id, after, limit, max_bytes
        )

    def close(self) -> Deferred[None]:
        """
        Release the leases this backend holds (so other gateways may take
        the streams at once), finish what is queued and close the
        connections.  Commits and reads after this fail with
        :class:`ilm.errors.StoreError`.
        """
        if self._life.opened and self._life.closing is None:
            self._stop_listener()
            self._liveness.stop()
        return self._life.close(lambda: self._close_writer(True), self._close_reader)

    def _close_writer(self, release: bool = False) -> None:
        try:
            self._leases.close(release)
            if release:
                self._liveness.expire()
        finally:
            self._connections.close_writer()

    def _close_reader(self) -> None:
        self._connections.close_reader()

    # -- IStreamOwnership ------------------------------------------------------

    def acquire(self, peer_id: PeerId, take_over: bool = True) -> Deferred[StreamTaken]:
        """
        Take the stream of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.acquire`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        try:
            peer_id = checked_peer_id(peer_id)
        except StoreError:
            return fail()
        return self._threads.on_writer(self._leases.acquire, peer_id, bool(take_over))

    def renew(self) -> Deferred[Renewal]:
        """
        Extend every lease this backend holds; see
        :meth:`ilm.backends.IStreamOwnership.renew`.
        """
        return self._life.refuse() or self._threads.on_writer(self._leases.renew)

    def release(self, peer_id: PeerId) -> Deferred[bool]:
        """
        Give up the stream of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.release`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        return self._threads.on_writer(self._leases.release, [peer_id])

    def holds(self, peer_id: PeerId) -> bool:
        """
        Whether this backend holds ``peer_id``'s stream within its local
        deadline; see :meth:`ilm.backends.IStreamOwnership.holds`.
        """
        return self._leases.holds(peer_id)

    def delivery_window(self, peer_id: PeerId) -> tuple[float, float] | None:
        """
        When this backend may deliver for ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.delivery_window`.
        """
        return self._leases.delivery_window(peer_id)

    def owned(self) -> frozenset[PeerId]:
        """
        The streams this backend holds; see
        :meth:`ilm.backends.IStreamOwnership.owned`.
        """
        return self._leases.owned()

    def epoch(self, peer_id: PeerId) -> int:
        """
        :return: the epoch this backend's writes for ``peer_id`` carry: its
            grant's, or 0 for a stream it does not hold.
        """
        return self._leases.epoch(peer_id)

    def claimable(
        self, limit: int = 1000, peers: Iterable[PeerId] = ()
    ) -> Deferred[list[PeerId]]:
        """
        Streams with no live lease and messages waiting (or among
        ``peers``); see :meth:`ilm.backends.IStreamOwnership.claimable`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        return self._threads.on_reader(
            self._reads.claimable, int(limit), [check_peer_id(p) for p in peers]
        )

    def outbound_state(self, peer_id: PeerId) -> Deferred[OutboundRecord | None]:
        """
        The committed outbound record of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.outbound_state`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        return self._threads.on_reader(self._reads.outbound_state, peer_id)

    def watch(self, callback: Callable[[PeerId], None]) -> Deferred[None]:
        """
        Call ``callback(peer_id)`` when another gateway appends to a stream
        this one owns; see :meth:`ilm.backends.IStreamOwnership.watch`.
        A lost listening connection is logged and re-established (with
        backoff to 30 s); hints sent meanwhile are lost.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        if self._listener is not None:
            self._listener.callback = callback
            return succeed(None)
        listener = self._listener = HintListener(
            self._connections,
            self._node.key,
            self._channel,
            lambda: self._life.unusable() is None,
            callback,
        )

        def failed(reason: Failure) -> Failure:
            if self._listener is listener:
                self._listener = None
            return reason

        return listener.start().addErrback(failed)

    def _stop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
