"""
The PostgreSQL store's connections, each used only on its own thread of
:class:`ilm.backends._threads.StoreThreads`, and the interaction wrapper
that runs a transaction on them.

- The writer connection (commits, leases) runs :meth:`interaction`: a
  ``READ COMMITTED`` transaction retried on a serialization failure or a
  deadlock (SQLSTATE 40001, 40P01), a lost ``COMMIT`` handed to the caller
  (it is :class:`ilm.errors.StoreInDoubt` for a commit).
- The reader connection (outbox reads) runs :meth:`reading`: one
  read-only snapshot.
- A connection found lost before its transaction could commit is replaced
  and the transaction run once more.

Each connection is named (``application_name``) after the gateway: the
writer ``ilm writer <opening> <gateway>``, where ``<opening>`` is the
gateway's current opening of the store (:data:`UNREGISTERED` before its
first registration), so that other gateways can tell the writer sessions
of a stopped process from those of a live one of the same name
(:mod:`ilm.backends._pg_liveness`); the others ``ilm <role> <gateway>``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.logger import Logger, LogLevel

from ilm._logging import EventLimiter
from ilm.backends._pg_schema import _Conn, psycopg, rollback, store_error
from ilm.backends._threads import StoreThreads
from ilm.errors import StoreError

__all__ = [
    "RETRIED_SQLSTATES",
    "UNREGISTERED",
    "PostgresConnections",
    "session_name",
]

log = Logger(namespace="ilm.backends.postgres")

_T = TypeVar("_T")

RETRIED_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure and deadlock: the transaction is run again."""

UNREGISTERED = "0" * 14
"""The opening in a writer session's name before the gateway registered."""


def session_name(role: str, gateway: str, opening: str) -> str:
    """
    The ``application_name`` of a ``role`` connection of ``gateway``: for
    the writer, ``ilm writer <opening> <gateway>`` (``opening``: 14 hex
    digits, see :attr:`ilm.backends._pg_sql.Statements.register_gateway`),
    else ``ilm <role> <gateway>``; at most 63 characters (the server keeps
    63 bytes), so a long gateway name is cut, never the opening.
    """
    if role == "writer":
        return f"ilm writer {opening} {gateway}"[:63]
    return f"ilm {role} {gateway}"[:63]


class PostgresConnections:
    """
    The writer and reader connections of one PostgreSQL store.

    :param dsn: libpq's connection string or URI.
    :param gateway: names the connections (``application_name``).
    :param where: names the store in errors.
    :param threads: the store's threads (logging retries goes through the
        reactor's).
    """

    def __init__(
        self,
        dsn: str,
        *,
        gateway: str,
        where: str,
        threads: StoreThreads,
        lock_timeout: float,
        retries: int,
        connect_timeout: float,
        network_timeout: float,
        prepare_threshold: int | None,
        idle_in_transaction: float = 2.5,
    ) -> None:
        self.dsn = dsn
        self.idle_in_transaction = idle_in_transaction
        self.gateway = gateway
        self.where = where
        self.threads = threads
        self.lock_timeout = lock_timeout
        self.retries = retries
        self.connect_timeout = connect_timeout
        self.network_timeout = network_timeout
        self.prepare_threshold = prepare_threshold
        self.writer: _Conn | None = None
        self.reader: _Conn | None = None
        self.limiter: EventLimiter | None = None
        self.retried = 0
        """Transactions run again after a serialization failure or deadlock."""
        self.reconnected = 0
        """Transactions run again on a new connection after losing theirs."""
        self.opening = UNREGISTERED
        """
        This gateway's current opening of the store, as its writer sessions
        carry it (set by :meth:`ilm.backends._pg_liveness.GatewayLiveness.register`).
        """
        self.writer_pid: int | None = None
        """The server process of the writer connection (``None``: none yet)."""
        self.writer_busy_since: float | None = None
        """
        When (``time.monotonic()``) the transaction running on the writer
        connection began, ``None`` between transactions: set on the writer
        thread, read by the liveness watch (a lock wait shows as a long one).
        """

    def start(self) -> None:
        """The threads started: log through the reactor from now on."""
        self.limiter = EventLimiter(log, self.threads.reactor)

    def stop(self) -> None:
        if self.limiter is not None:
            self.limiter.stop()
            self.limiter = None

    def connect(self, role: str) -> _Conn:
        """A new autocommit connection, with keepalives unless the DSN sets them."""
        options: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(self.connect_timeout)),
            "application_name": self.session_name(role),
        }
        given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        timeout = self.network_timeout
        for key, value in (
            ("keepalives", 1),
            ("keepalives_idle", max(1, int(timeout / 3))),
            ("keepalives_interval", max(1, int(timeout / 9))),
            ("keepalives_count", 3),
            ("tcp_user_timeout", int(timeout * 1000)),
        ):
            if key not in given:
                options[key] = value
        try:
            conn = psycopg.connect(self.dsn, **options)
        except psycopg.Error as e:
            raise store_error(e, self.where, "cannot connect to") from e
        conn.prepare_threshold = self.prepare_threshold
        return conn

    def session_name(self, role: str) -> str:
        """The ``application_name`` of this gateway's ``role`` connections now."""
        return session_name(role, self.gateway, self.opening)

    def _replaced(self, conn: _Conn | None, role: str) -> _Conn:
        """``conn`` if it is usable, else a new connection."""
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        if conn is not None:
            conn.close()
        return self.connect(role)

    def writer_conn(self) -> _Conn:
        """The writer connection (on the writer thread), replaced if lost."""
        conn = self.writer
        self.writer = None
        conn = self.writer = self._replaced(conn, "writer")
        self.writer_pid = conn.info.backend_pid
        return conn

    def reader_conn(self) -> _Conn:
        """The reader connection (on the reader thread), replaced if lost."""
        conn = self.reader
        self.reader = None
        conn = self.reader = self._replaced(conn, "reader")
        return conn

    def close_writer(self) -> None:
        conn, self.writer = self.writer, None
        if conn is not None:
            conn.close()

    def close_reader(self) -> None:
        conn, self.reader = self.reader, None
        if conn is not None:
            conn.close()

    def begin(self, conn: _Conn) -> None:
        """
        Begin a write transaction, with the store's lock timeout, and an
        idle-in-transaction timeout: a gateway stopped in the middle of a
        transaction (SIGSTOP, a VM paused) has its session ended by the
        server after ``idle_in_transaction`` seconds, so the row locks it
        holds do not block another gateway's take-over for longer (its
        ``COMMIT``, if it ever comes, then fails: ``StoreInDoubt``).
        """
        conn.execute(b"BEGIN ISOLATION LEVEL READ COMMITTED")
        conn.execute(
            (
                f"SELECT set_config('lock_timeout', "
                f"'{int(self.lock_timeout * 1000):d}', true), "
                f"set_config('idle_in_transaction_session_timeout', "
                f"'{max(1, int(self.idle_in_transaction * 1000)):d}', true)"
            ).encode()
        )

    def _retrying(self, doing: str, sqlstate: str, attempt: int) -> None:
        """Count and log (rate-limited, in the reactor thread) one retry."""
        self.retried += 1
        limiter = self.limiter
        if limiter is None:
            return
        self.threads.reactor.callFromThread(
            limiter.emit,
            ("store_retried", sqlstate),
            LogLevel.info,
            "PostgreSQL transaction ({doing}) met SQLSTATE {sqlstate}; "
            "running it again (attempt {attempt})",
            doing=doing,
            sqlstate=sqlstate,
            attempt=attempt,
            ilm_event="store_retried",
        )

    def interaction(
        self,
        doing: str,
        body: Callable[[_Conn], _T],
        *,
        in_doubt: Callable[[StoreError], StoreError] | None = None,
    ) -> _T:
        """
        Run ``body(conn)`` in a transaction on the writer connection and
        commit it: the interaction wrapper.  ``body`` begins the
        transaction and does everything but ``COMMIT``.  A serialization
        failure or deadlock before ``COMMIT`` rolls back and runs ``body``
        again, at most :attr:`retries` times in all, after a short random
        pause; any other error rolls back and is raised as a
        :class:`ilm.errors.StoreError`.  A failure of ``COMMIT`` itself is
        never retried: it goes to ``in_doubt(error)``, which returns the
        error to raise.

        A connection found lost before ``COMMIT`` was sent (the server
        restarted or failed over since the last transaction, a pooler
        dropped it) is replaced and ``body`` run once more: the lost
        transaction can never commit, so nothing can be applied twice.
        """
        self.writer_busy_since = time.monotonic()
        try:
            return self._interaction(doing, body, in_doubt)
        finally:
            self.writer_busy_since = None

    def _interaction(
        self,
        doing: str,
        body: Callable[[_Conn], _T],
        in_doubt: Callable[[StoreError], StoreError] | None,
    ) -> _T:
        attempt = 0
        reconnected = False
        while True:
            attempt += 1
            conn = self.writer_conn()
            try:
                result = body(conn)
            except StoreError:
                rollback(conn)
                raise
            except Exception as e:
                lost = conn.broken
                rollback(conn)
                sqlstate = getattr(e, "sqlstate", None)
                if sqlstate in RETRIED_SQLSTATES and attempt < self.retries:
                    assert isinstance(sqlstate, str)
                    self._retrying(doing, sqlstate, attempt + 1)
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                if lost and not reconnected:
                    reconnected = True
                    self.reconnected += 1
                    continue
                raise store_error(e, self.where, doing) from e
            try:
                conn.execute(b"COMMIT", prepare=False)
            except Exception as e:
                rollback(conn)
                error = store_error(e, self.where, doing)
                if in_doubt is not None:
                    raise in_doubt(error) from e
                raise error from e
            return result

    def reading(self, body: Callable[[_Conn], _T]) -> _T:
        """
        Run ``body(conn)`` on the reader connection (read-only, one
        snapshot), replacing the connection once if it is found lost.
        """
        reconnected = False
        while True:
            conn = self.reader_conn()
            try:
                return body(conn)
            except StoreError:
                raise
            except Exception as e:
                if conn.broken and not reconnected:
                    reconnected = True
                    self.reconnected += 1
                    continue
                raise store_error(e, self.where, "cannot read from") from e
            finally:
                rollback(conn)
