"""
Tests for :mod:`ilm.backends._pg_liveness`, against a real PostgreSQL
server: the gateways' liveness rows, and the ending of a stopped gateway's
writer session when it blocks a live gateway's write.

A gateway stopped between two writes of a pipelined transaction is played
by a session named as its writer connection that sent ``BEGIN`` and an
``UPDATE`` of the ``outbound`` rows in pipeline mode, flushed, with no
sync: the server sees it active, waiting for the rest of the request, as
it sees a process stopped there; no server timeout ends it.  The stopped
gateway's own liveness refreshes are stopped (its process would run none).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor, task
from twisted.logger import Logger

from ilm import StoreBatch
from ilm.backends._pg_schema import MIGRATIONS, migrate, schema_version
from ilm.errors import StoreLocked

from .test_postgres import DSN, PostgresBackend, PostgresCase

LEASE = 1.0


class LivenessCase(PostgresCase):
    timeout = 60

    async def two_gateways(
        self, lock_timeout: float = 4.0
    ) -> tuple[str, PostgresBackend, PostgresBackend]:
        """
        Gateways ``a`` and ``b`` of node 2 on a new schema, ``a`` owning
        the stream of peer 1 (which has a message stored).
        """
        schema = self.new_schema()
        a, _ = await self.opened(
            schema, 2, "a", lease_duration=LEASE, lock_timeout=lock_timeout
        )
        b, _ = await self.opened(schema, 2, "b", lease_duration=LEASE)
        await a.acquire(1)
        await a.commit_shared(StoreBatch(messages={1: (1, [b"first"])}))
        return schema, a, b

    def stopped(self, schema: str, application_name: str) -> Any:
        """
        A session named ``application_name``, stopped mid-pipeline holding
        every ``outbound`` row of ``schema`` locked.
        """
        import psycopg

        conn = psycopg.connect(DSN, autocommit=True, application_name=application_name)
        self.addCleanup(conn.close)
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"BEGIN", None)
        pgconn.send_query_params(
            f'UPDATE "{schema}".outbound SET pending_bytes = pending_bytes'.encode(),
            None,
        )
        pgconn.send_flush_request()
        while pgconn.flush():
            pass
        return conn

    def holding(self, conn: Any) -> bool:
        """Whether ``conn``'s session is there, inside a write transaction."""
        rows = self.sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE pid = %s AND backend_xid IS NOT NULL",
            conn.info.backend_pid,
        )
        return rows == [(1,)]

    async def until_holding(self, conn: Any) -> None:
        deadline = time.monotonic() + 10
        while not self.holding(conn):
            self.assertLess(time.monotonic(), deadline, "the session never locked")
            await task.deferLater(reactor, 0.01, lambda: None)

    def live(self, schema: str, node: int, gateway: str) -> bool:
        rows = self.sql(
            f'SELECT g.expires_at > now() FROM "{schema}".gateway g '
            f'JOIN "{schema}".node n USING (node_key) '
            f"WHERE n.int_id = %s AND g.name = %s",
            node,
            gateway,
        )
        return rows == [(True,)]


class LivenessRowTests(LivenessCase):
    async def test_registered_and_refreshed(self) -> None:
        """
        Opening registers the gateway live for a lease; its refreshes keep
        it live while it owns nothing; a clean close ends it.
        """
        schema = self.new_schema()
        backend, _ = await self.opened(schema, 2, "b", lease_duration=LEASE)
        self.assertTrue(self.live(schema, 2, "b"))
        self.assertEqual(backend.owned(), frozenset())
        await task.deferLater(reactor, 2.5 * LEASE, lambda: None)
        self.assertTrue(self.live(schema, 2, "b"))
        self.assertTrue(backend._liveness.live())
        await backend.close()
        self.assertFalse(self.live(schema, 2, "b"))

    async def test_reopening_registers_again(self) -> None:
        """
        A gateway whose liveness expired (its process stopped: no
        refreshes) is live again once it reopens the store, as it does
        after StoreInDoubt, and not before: it does not count itself live
        past its local deadline.
        """
        schema = self.new_schema()
        backend, _ = await self.opened(schema, 2, "b", lease_duration=LEASE)
        backend._liveness.stop()
        await task.deferLater(reactor, 1.2 * LEASE, lambda: None)
        self.assertFalse(self.live(schema, 2, "b"))
        self.assertFalse(backend._liveness.live())
        await backend.open()
        self.assertTrue(self.live(schema, 2, "b"))
        self.assertTrue(backend._liveness.live())

    def test_migration_from_version_1(self) -> None:
        """
        A version 1 schema with data migrates to version 2 (the gateway
        table) keeping its data.
        """
        schema = self.new_schema()
        self.assertEqual(migrate(self.admin, schema, MIGRATIONS, 1), (0, 1))
        self.sql(
            f'INSERT INTO "{schema}".node (int_id, incarnation) VALUES (2, %s)',
            "d" * 32,
        )
        self.assertEqual(migrate(self.admin, schema), (1, 2))
        self.assertEqual(schema_version(self.admin, schema), 2)
        self.assertEqual(self.sql(f'SELECT count(*) FROM "{schema}".gateway'), [(0,)])
        self.assertEqual(
            self.sql(f'SELECT incarnation FROM "{schema}".node'), [("d" * 32,)]
        )


class StoppedAppenderTests(LivenessCase):
    """
    Gateway ``b`` (not the owner) stopped mid-pipeline while appending to
    the stream of peer 1 holds its ``outbound`` row; the owner ``a``
    commits for that stream.
    """

    async def test_owner_commit_ends_the_stopped_writer(self) -> None:
        """
        With b's liveness refreshes stopped at the moment b's writer
        stopped, a's commit for the stream (an append and an
        acknowledgement) succeeds within a lease and a tenth of b's stop
        (not StoreLocked after the 4 s lock timeout, as without the
        rule), and b's stopped session is gone.
        """
        schema, a, b = await self.two_gateways()
        b._liveness.stop()
        stopped_at = time.monotonic()
        stopped = self.stopped(schema, "ilm writer b")
        await self.until_holding(stopped)
        result = await a.commit_shared(
            StoreBatch(messages={1: (0, [b"second"])}, acked={1: 1})
        )
        blocked = time.monotonic() - stopped_at
        Logger().info(
            "the owner's commit ended {blocked:.2f} s after the stop", blocked=blocked
        )
        self.assertEqual(result.positions, {1: (2, 2)})
        self.assertLess(blocked, 1.1 * LEASE + 0.5)
        self.assertFalse(self.holding(stopped))
        self.assertEqual(a._liveness.ended, 1)
        self.assertEqual(await a.read_outbound(1, 1, 10), [b"second"])
        self.assertTrue(self.live(schema, 2, "a"))

    async def test_live_blocker_is_left(self) -> None:
        """
        While b is live (its refreshes go on), its session holding the row
        is not ended: a's commit fails with StoreLocked after its lock
        timeout, as before, and the session stays.
        """
        schema, a, _b = await self.two_gateways(lock_timeout=2.0)
        stopped = self.stopped(schema, "ilm writer b")
        await self.until_holding(stopped)
        began = time.monotonic()
        with self.assertRaises(StoreLocked):
            await a.commit_shared(StoreBatch(messages={1: (0, [b"second"])}))
        self.assertGreater(time.monotonic() - began, 1.5)
        self.assertTrue(self.holding(stopped))
        self.assertEqual(a._liveness.ended, 0)

    async def test_other_sessions_are_left(self) -> None:
        """
        Sessions that are not the writer of a stopped gateway of this node
        are left alone, even with b's liveness expired: one named as b's
        reader, and one named as the writer of gateway ``c``, whose
        liveness expired but as a gateway of another node (3).
        """
        schema, a, b = await self.two_gateways(lock_timeout=2.0)
        c, _ = await self.opened(schema, 3, "c", lease_duration=LEASE)
        for backend in (b, c):
            backend._liveness.stop()
        for name in ("ilm reader b", "ilm writer c"):
            stopped = self.stopped(schema, name)
            await self.until_holding(stopped)
            while self.live(schema, 2, "b") or self.live(schema, 3, "c"):
                await task.deferLater(reactor, 0.05, lambda: None)
            with self.assertRaises(StoreLocked):
                await a.commit_shared(StoreBatch(messages={1: (0, [b"second"])}))
            self.assertTrue(self.holding(stopped), name)
            stopped.close()
        self.assertEqual(a._liveness.ended, 0)
