"""
The ``LISTEN`` connection of a PostgreSQL store: append hints from other
gateways, read by the reactor (no thread).  Hints only: polling covers
whatever a lost connection misses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import PeerId
from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_schema import _Conn, psycopg, quote_schema, store_error
from ilm.backends._pg_sql import decode_hint

__all__ = ["HintListener"]

log = Logger(namespace="ilm.backends.postgres")


@implementer(IReadDescriptor)
class HintListener:
    """
    The ``LISTEN`` connection of a PostgreSQL store: read by the reactor
    (no thread), it turns notifications of appends into
    ``callback(peer_id)`` calls.  Connection and ``LISTEN`` happen on the
    reader thread; a lost connection is re-established with backoff.

    :param node_key: the node whose hints are heard (others sharing the
        schema are ignored).
    :param channel: the notification channel.
    :param usable: whether the store is still open (else no reconnecting).
    """

    def __init__(
        self,
        connections: PostgresConnections,
        node_key: int,
        channel: str,
        usable: Callable[[], bool],
        callback: Callable[[PeerId], None],
    ) -> None:
        self.connections = connections
        self.channel = channel
        self.usable = usable
        self.callback = callback
        self.conn: _Conn | None = None
        # A duplicate of the connection's socket, watched by the reactor:
        # libpq closes its own descriptor as soon as it sees the connection
        # fail, and the reactor must still be able to unregister ours.
        self.fd = -1
        self.stopped = False
        self.retry = 0.5
        self.pending: Any = None
        self.prefix = f"{node_key}:"

    def start(self) -> Deferred[None]:
        connections = self.connections

        def connect() -> _Conn:
            conn = connections.connect("listener")
            try:
                conn.execute(f"LISTEN {quote_schema(self.channel)}".encode())
            except BaseException as e:
                conn.close()
                raise store_error(e, connections.where, "cannot listen to") from e
            return conn

        def listening(conn: _Conn) -> None:
            if self.stopped:
                conn.close()
                return
            self.conn = conn
            self.fd = os.dup(conn.pgconn.socket)
            self.retry = 0.5
            connections.threads.reactor.addReader(self)

        return connections.threads.on_reader(connect).addCallback(listening)

    def stop(self) -> None:
        self.stopped = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        conn, self.conn = self.conn, None
        if conn is not None:
            self.connections.threads.reactor.removeReader(self)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        conn.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "ilm-postgres-listener"

    def doRead(self) -> Failure | None:
        conn = self.conn
        if conn is None:
            return None
        try:
            conn.pgconn.consume_input()
            hints = []
            while (notice := conn.pgconn.notifies()) is not None:
                hints.append(notice.extra.decode("utf-8", "replace"))
        except psycopg.Error:
            return Failure()
        for payload in hints:
            if not payload.startswith(self.prefix):
                continue  # another node sharing the schema
            peer_id = decode_hint(payload[len(self.prefix) :])
            if peer_id is None:
                continue
            try:
                self.callback(peer_id)
            except Exception:
                log.failure(
                    "an append hint's callback failed", ilm_event="internal_error"
                )
        return None

    def connectionLost(self, reason: Failure) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self._close(conn)
        if self.stopped:
            return
        connections = self.connections
        limiter = connections.limiter
        if limiter is not None:
            limiter.emit(
                "listener_lost",
                LogLevel.warn,
                "lost the PostgreSQL connection listening for append hints of "
                "{where}; reconnecting in {delay} s (polling covers meanwhile): "
                "{error}",
                where=connections.where,
                delay=self.retry,
                error=reason.getErrorMessage(),
                ilm_event="listener_lost",
            )
        delay, self.retry = self.retry, min(self.retry * 2, 30.0)

        def again() -> None:
            self.pending = None
            if self.stopped or not self.usable():
                return
            self.start().addErrback(self.connectionLost)

        self.pending = connections.threads.reactor.callLater(delay, again)
