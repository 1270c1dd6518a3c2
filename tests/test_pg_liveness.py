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
from datetime import timedelta
from typing import Any

from twisted.internet import reactor, task
from twisted.logger import Logger, LogLevel, globalLogPublisher

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

    async def until_ended(self, backend: PostgresBackend, count: int = 1) -> None:
        """
        Wait until ``backend``'s watch has counted ``count`` sessions
        ended: the blocked write it freed may finish first (the answer to
        the check and the end of the write come from two threads).
        """
        deadline = time.monotonic() + 10
        while backend._liveness.ended < count:
            self.assertLess(time.monotonic(), deadline, "no session counted ended")
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(backend._liveness.ended, count)

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
        stopped = self.stopped(schema, b._connections.session_name("writer"))
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
        await self.until_ended(a)
        self.assertEqual(await a.read_outbound(1, 1, 10), [b"second"])
        self.assertTrue(self.live(schema, 2, "a"))

    async def test_live_blocker_is_left(self) -> None:
        """
        While b is live (its refreshes go on), its session holding the row
        is not ended: a's commit fails with StoreLocked after its lock
        timeout, as before, and the session stays.
        """
        schema, a, b = await self.two_gateways(lock_timeout=2.0)
        stopped = self.stopped(schema, b._connections.session_name("writer"))
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
        names = (
            b._connections.session_name("reader"),
            c._connections.session_name("writer"),
        )
        self.assertEqual(names[0], "ilm reader b")
        for name in names:
            stopped = self.stopped(schema, name)
            await self.until_holding(stopped)
            while self.live(schema, 2, "b") or self.live(schema, 3, "c"):
                await task.deferLater(reactor, 0.05, lambda: None)
            with self.assertRaises(StoreLocked):
                await a.commit_shared(StoreBatch(messages={1: (0, [b"second"])}))
            self.assertTrue(self.holding(stopped), name)
            stopped.close()
        self.assertEqual(a._liveness.ended, 0)


class NameReusedTests(LivenessCase):
    """
    A new process opens the store under the gateway name of an earlier
    one (``b``): the earlier one, stopped or running, no longer counts as
    live, so its writer session blocking a write is ended even though the
    name's liveness row is live (the new process refreshes it).
    """

    def events(self, name: str) -> list[dict[str, Any]]:
        """The events named ``name`` logged from now on."""
        seen: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("ilm_event") == name:
                seen.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    async def stopped_and_replaced(
        self, schema: str, b: PostgresBackend, **kwargs: Any
    ) -> tuple[Any, PostgresBackend]:
        """
        ``b`` stopped mid-pipeline holding the ``outbound`` rows (its
        refreshes stopped), then a new process opening the store as ``b``.

        :return: the stopped session and the new backend.
        """
        b._liveness.stop()
        stopped = self.stopped(schema, b._connections.session_name("writer"))
        await self.until_holding(stopped)
        new, _ = await self.opened(schema, 2, "b", lease_duration=LEASE, **kwargs)
        self.assertTrue(self.live(schema, 2, "b"))
        self.assertNotEqual(
            new._connections.session_name("writer"),
            b._connections.session_name("writer"),
        )
        return stopped, new

    async def test_owner_commit_ends_the_earlier_process(self) -> None:
        """
        The owner's commit blocked by the stopped earlier ``b`` succeeds
        (the earlier opening stopped being live when the new one
        registered), though the row of ``b`` is live and stays so: without
        the rule it would fail with StoreLocked after its 4 s lock
        timeout, again for as long as the earlier ``b`` stays stopped.
        The stopped session is gone; the new ``b`` is left alone.
        """
        schema, a, b = await self.two_gateways()
        stopped, new = await self.stopped_and_replaced(schema, b)
        began = time.monotonic()
        result = await a.commit_shared(
            StoreBatch(messages={1: (0, [b"second"])}, acked={1: 1})
        )
        self.assertEqual(result.positions, {1: (2, 2)})
        self.assertLess(time.monotonic() - began, 2.0)
        self.assertFalse(self.holding(stopped))
        await self.until_ended(a)
        self.assertTrue(self.live(schema, 2, "b"))
        await new.commit_shared(StoreBatch(messages={1: (0, [b"third"])}))
        self.assertEqual(new._liveness.ended, 0)

    async def test_new_process_ends_its_predecessor(self) -> None:
        """
        The new ``b``'s own append, blocked by the stopped earlier ``b``
        (same gateway name, another opening), is freed by its watch, not
        StoreLocked after its 4 s lock timeout.
        """
        schema, _a, b = await self.two_gateways()
        stopped, new = await self.stopped_and_replaced(schema, b, lock_timeout=4.0)
        began = time.monotonic()
        result = await new.commit_shared(StoreBatch(messages={1: (0, [b"second"])}))
        self.assertEqual(result.positions, {1: (2, 2)})
        self.assertLess(time.monotonic() - began, 2.0)
        self.assertFalse(self.holding(stopped))
        await self.until_ended(new)

    async def test_running_predecessor_is_told(self) -> None:
        """
        Opening under the name of a live process logs
        ``gateway_name_reused``; that process, running, finds out at its
        next refresh: it logs the event as an error, no longer counts
        itself live nor refreshes (it would every second), and closing it
        does not end the new process's liveness.
        """
        schema = self.new_schema()
        reused = self.events("gateway_name_reused")
        old, _ = await self.opened(schema, 2, "b", lease_duration=3 * LEASE)
        new, _ = await self.opened(schema, 2, "b", lease_duration=LEASE)
        self.assertEqual([e["log_level"] for e in reused], [LogLevel.warn])
        while not old._liveness.superseded:
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            [e["log_level"] for e in reused], [LogLevel.warn, LogLevel.error]
        )
        await task.deferLater(reactor, 1.5 * LEASE, lambda: None)
        self.assertEqual(len(reused), 2)
        self.assertFalse(old._liveness.live())
        self.assertTrue(new._liveness.live())
        await old.close()
        self.assertTrue(self.live(schema, 2, "b"))

    async def test_each_opening_is_later(self) -> None:
        """
        Each registration of a name is a later opening than the one
        before, even when the clocks say otherwise (here: a row opened an
        hour ahead); reopening renames the writer session after it.
        """
        schema = self.new_schema()
        b, _ = await self.opened(schema, 2, "b", lease_duration=LEASE)
        first = b._liveness.opened_at
        self.sql(
            f"UPDATE \"{schema}\".gateway SET opened_at = now() + interval '1 hour'"
        )
        [(ahead,)] = self.sql(f'SELECT opened_at FROM "{schema}".gateway')
        await b.open()
        assert first is not None and b._liveness.opened_at is not None
        self.assertEqual(b._liveness.opened_at - ahead, timedelta(microseconds=1))
        name = b._connections.session_name("writer")
        self.assertEqual(
            name,
            f"ilm writer {round(b._liveness.opened_at.timestamp() * 1e6):014x} b",
        )
        self.assertEqual(
            self.sql(
                "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                b._connections.writer_pid,
            ),
            [(name,)],
        )
