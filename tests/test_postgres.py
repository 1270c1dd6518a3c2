"""
The PostgreSQL backend, on a real server: the backend contract every store
passes, its own guarantees (schema versions and migrations, nodes sharing a
schema, the typed error of each fault, retries of serialization failures
and deadlocks, StoreInDoubt when the connection is lost during COMMIT), and
fenced stream ownership between several gateways of one node.

Each test works in a PostgreSQL schema of its own, dropped afterwards.  The
server is ``ILM_TEST_POSTGRES`` (a libpq DSN; by default
``host=127.0.0.1 port=5432 user=postgres dbname=test``); when it cannot be
reached, every test here is skipped, saying why.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from ilm import StoreBatch
from ilm.backends import (
    Fenced,
    IStreamOwnership,
    LeaseHeld,
    PostgresBackend,
    SharedCommitResult,
    _pg_commit,
)
from ilm.backends._postgres import (
    MIGRATIONS,
    SCHEMA_VERSION,
    migrate,
    schema_version,
    store_error,
)
from ilm.errors import (
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreInDoubt,
    StoreLocked,
    StoreReadOnly,
    StoreSchemaTooNew,
)
from ilm.interfaces import IBackend

from . import test_backends
from .test_backends import BackendContract, summary

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None  # type: ignore[assignment]

DSN = os.environ.get(
    "ILM_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)

_unavailable: list[str] = []


def require_postgres() -> None:
    """
    Skip the calling test, saying why, if the test server cannot be reached
    (checked once per run).
    """
    if psycopg is None:
        raise SkipTest("psycopg is not installed (pip install 'ilm[postgres]')")
    if not _unavailable:
        try:
            psycopg.connect(DSN, connect_timeout=3).close()
            _unavailable.append("")
        except psycopg.Error as e:
            _unavailable.append(
                f"PostgreSQL is not reachable at {DSN!r} (set ILM_TEST_POSTGRES): "
                f"{str(e).strip()}"
            )
    if _unavailable[0]:
        raise SkipTest(_unavailable[0])


def admin() -> Any:
    """A new autocommit connection to the test server, for the test's own SQL."""
    return psycopg.connect(DSN, autocommit=True)


class _FromClient(portforward.ProxyServer):
    """The client side of :class:`CommitReplyCutter`."""

    factory: CommitReplyCutter
    commit_forwarded = False

    def dataReceived(self, data: bytes) -> None:
        if self.factory.armed and b"COMMIT\x00" in data:
            self.factory.armed = False
            self.commit_forwarded = True
        super().dataReceived(data)


class _ToServer(portforward.ProxyClient):
    """The server side of :class:`CommitReplyCutter`."""

    def dataReceived(self, data: bytes) -> None:
        client = self.peer
        if isinstance(client, _FromClient) and client.commit_forwarded:
            # The server's answer to COMMIT: the client never gets it.
            client.factory.cut = True
            client.transport.abortConnection()
            self.transport.abortConnection()
            return
        super().dataReceived(data)


class _ToServerFactory(portforward.ProxyClientFactory):
    protocol = _ToServer


class CommitReplyCutter(portforward.ProxyFactory):
    """
    A TCP proxy to PostgreSQL that, once ``armed``, forwards the next
    COMMIT to the server and then cuts the client off instead of relaying
    the answer: the transaction is committed, and the client cannot know.
    ``cut`` records that it happened.
    """

    protocol = _FromClient

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.armed = False
        self.cut = False


_FromClient.clientProtocolFactory = _ToServerFactory


class PostgresCase(TestCase):
    """
    Gives each test fresh PostgreSQL schemas (dropped in cleanup) and an
    admin connection.
    """

    def setUp(self) -> None:
        require_postgres()
        self.admin = admin()
        self.addCleanup(self.admin.close)

    def new_schema(self) -> str:
        """A schema name of this test's own; dropped when the test ends."""
        name = f"ilm_test_{uuid.uuid4().hex[:16]}"
        self.addCleanup(self.drop_schema, name)
        return name

    def drop_schema(self, name: str) -> None:
        with admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'.encode())

    def backend(
        self, schema: str, node_id: Any = 1, gateway: str = "g1", **kwargs: Any
    ) -> PostgresBackend:
        """
        A backend (not yet open) on ``schema``, closed when the test ends
        (before its schema is dropped).
        """
        backend = PostgresBackend(
            kwargs.pop("dsn", DSN),
            node_id=node_id,
            gateway=gateway,
            schema=schema,
            **kwargs,
        )
        self.addCleanup(backend.close)
        return backend

    async def opened(
        self, schema: str, node_id: Any = 1, gateway: str = "g1", **kwargs: Any
    ) -> tuple[PostgresBackend, Any]:
        backend = self.backend(schema, node_id, gateway, **kwargs)
        return backend, await backend.open()

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run ``query`` on the admin connection; its rows, if any."""
        cursor = self.admin.execute(query.encode(), params or None)
        return cursor.fetchall() if cursor.description else []


class PostgresBackendTests(BackendContract, PostgresCase):
    """
    The backend contract, on PostgreSQL: each store is a fresh schema.
    """

    def new_store(self) -> object:
        return self.new_schema()

    def make_backend(self, store: object) -> IBackend:
        assert isinstance(store, str)
        return PostgresBackend(DSN, node_id=1, gateway="g1", schema=store)

    async def test_differential(self) -> None:
        """
        The seeded random sequence of batches of the SQLite differential
        test (valid and invalid, int and str peers, reopening on the way)
        leaves the PostgreSQL backend in the in-memory backend's state after
        every commit; results, errors and reads agree.  Set ILM_TEST_SEED
        to explore other seeds.
        """
        seed = int(os.environ.get("ILM_TEST_SEED", "20261126"))
        try:
            await test_backends.SQLiteBackendTests._differential(
                self,  # type: ignore[arg-type]
                random.Random(seed),
            )
        except BaseException:
            print(f"\ntest_differential failed with ILM_TEST_SEED={seed}")
            raise


INCARNATION = "c" * 32


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """
    Wait (polling every 5 ms) until ``check()`` is true: for a state of
    the server that nothing notifies us of, such as a backend process
    waiting on a lock.
    """
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.005, lambda: None)


def writer_pid(backend: PostgresBackend) -> int:
    conn = backend._connections.writer
    assert conn is not None
    pid: int = conn.info.backend_pid
    return pid


class SchemaTests(PostgresCase):
    async def test_new_schema(self) -> None:
        """
        Opening an empty database creates the schema at the current version
        with ILM's marker, its tables, and the node's row holding the
        incarnation that open reports.
        """
        schema = self.new_schema()
        backend, state = await self.opened(schema, node_id="node-é")
        self.assertEqual(backend.schema_version, SCHEMA_VERSION)
        self.assertEqual(
            self.sql(f'SELECT application, version FROM "{schema}".ilm_schema'),
            [("ILM1", SCHEMA_VERSION)],
        )
        tables = self.sql(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = %s ORDER BY 1",
            schema,
        )
        self.assertEqual(
            [t for (t,) in tables],
            [
                "gateway",
                "ilm_schema",
                "inbound",
                "lease",
                "node",
                "outbound",
                "outbox",
                "peer",
            ],
        )
        self.assertEqual(
            self.sql(f'SELECT int_id, str_id, incarnation FROM "{schema}".node'),
            [(None, "node-é".encode(), state.incarnation)],
        )

    def test_migration_framework(self) -> None:
        """
        migrate() runs each step from the schema's version to the target in
        one transaction: a failing step leaves the schema exactly at its old
        version; a v1 -> v2 step applies and is recorded, keeping the data.
        """
        require_postgres()
        schema = self.new_schema()
        conn = self.admin
        self.assertEqual(migrate(conn, schema, MIGRATIONS, 1), (0, 1))
        self.sql(
            f'INSERT INTO "{schema}".node (int_id, incarnation) VALUES (1, %s)',
            INCARNATION,
        )

        def broken(conn: Any, s: str) -> None:
            conn.execute(f"ALTER TABLE {s}.outbound ADD COLUMN half integer".encode())
            raise RuntimeError("migration step failed")

        self.assertRaises(
            RuntimeError, migrate, conn, schema, {**MIGRATIONS, 1: broken}, 2
        )
        self.assertEqual(schema_version(conn, schema), 1)
        columns_sql = (
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'outbound'"
        )
        self.assertNotIn(("half",), self.sql(columns_sql, schema))

        def add_priority(conn: Any, s: str) -> None:
            conn.execute(
                f"ALTER TABLE {s}.outbound ADD COLUMN priority integer".encode()
            )

        steps = {**MIGRATIONS, 1: add_priority}
        self.assertEqual(migrate(conn, schema, steps, 2), (1, 2))
        self.assertEqual(schema_version(conn, schema), 2)
        self.assertIn(("priority",), self.sql(columns_sql, schema))
        self.assertEqual(
            self.sql(f'SELECT incarnation FROM "{schema}".node'), [(INCARNATION,)]
        )
        self.assertEqual(migrate(conn, schema, steps, 2), (2, 2))

    async def test_schema_too_new(self) -> None:
        """
        A schema written by a newer ILM is refused with StoreSchemaTooNew
        and left untouched; once back at this version it opens intact.
        """
        schema = self.new_schema()
        backend, _ = await self.opened(schema)
        await backend.commit(StoreBatch(messages={2: (1, [b"kept"])}))
        expected = summary(await backend.open())
        await backend.close()
        self.sql(f'UPDATE "{schema}".ilm_schema SET version = %s', SCHEMA_VERSION + 1)
        error = await self.assertFailure(self.backend(schema).open(), StoreSchemaTooNew)
        self.assertEqual(
            (error.found, error.supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION)
        )
        self.assertEqual(
            self.sql(f'SELECT version FROM "{schema}".ilm_schema'),
            [(SCHEMA_VERSION + 1,)],
        )
        self.sql(f'UPDATE "{schema}".ilm_schema SET version = %s', SCHEMA_VERSION)
        backend, state = await self.opened(schema)
        self.assertEqual(summary(state), expected)
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"kept"])

    async def test_foreign_schema_refused(self) -> None:
        """
        A schema that holds tables but is not ILM's (no ilm_schema table, or
        one with another application's marker) is refused with StoreCorrupt
        and left untouched; a damaged ILM schema (a table dropped) fails the
        commit that needs it with StoreCorrupt.
        """
        schema = self.new_schema()
        self.sql(f'CREATE SCHEMA "{schema}"')
        self.sql(f'CREATE TABLE "{schema}".accounts (id integer)')
        error = await self.assertFailure(self.backend(schema).open(), StoreCorrupt)
        self.assertIn("not an ILM store", str(error))
        self.sql(
            f'CREATE TABLE "{schema}".ilm_schema (application text, version integer)'
        )
        self.sql(f"INSERT INTO \"{schema}\".ilm_schema VALUES ('OTHER', 1)")
        await self.assertFailure(self.backend(schema).open(), StoreCorrupt)
        self.assertEqual(
            self.sql(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = %s",
                schema,
            ),
            [(2,)],
        )
        damaged = self.new_schema()
        backend, _ = await self.opened(damaged)
        self.sql(f'DROP TABLE "{damaged}".outbox')
        await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (1, [b"x"])})), StoreCorrupt
        )

    async def test_concurrent_first_opens(self) -> None:
        """
        Gateways of several nodes opening one empty schema at the same time
        all succeed: the schema is created once, and each node gets one
        incarnation (the same for both gateways of node 1; ``1`` and ``"1"``
        are different nodes).
        """
        schema = self.new_schema()
        backends = [
            self.backend(schema, node_id, gateway)
            for node_id, gateway in [(1, "a"), (1, "b"), (2, "a"), ("1", "a")]
        ]
        states = await defer.gatherResults([b.open() for b in backends])
        incarnations = [s.incarnation for s in states]
        self.assertEqual(incarnations[0], incarnations[1])
        self.assertEqual(len(set(incarnations)), 3)
        self.assertEqual(
            self.sql(f'SELECT count(*) FROM "{schema}".ilm_schema'), [(1,)]
        )

    async def test_nodes_do_not_see_each_other(self) -> None:
        """
        Two logical nodes sharing one schema keep separate outboxes, marks,
        acknowledgements and incarnations, also for the same peer ids.
        """
        schema = self.new_schema()
        one, _ = await self.opened(schema, node_id=1)
        two, _ = await self.opened(schema, node_id=2)
        await one.commit(
            StoreBatch(messages={5: (1, [b"from 1"])}, delivered={(6, INCARNATION): 3})
        )
        await two.commit(StoreBatch(messages={5: (1, [b"from 2", b"more"])}))
        await one.commit(StoreBatch(acked={5: 1}))
        self.assertEqual(await two.read_outbound(5, 0, 10), [b"from 2", b"more"])
        self.assertEqual(await one.read_outbound(5, 1, 10), [])
        state_one, state_two = await one.open(), await two.open()
        self.assertNotEqual(state_one.incarnation, state_two.incarnation)
        self.assertEqual(
            summary(state_one),
            ({(int, 5): (1, 1, 0)}, {(int, 6, INCARNATION): (3, False)}),
        )
        self.assertEqual(summary(state_two), ({(int, 5): (0, 2, 10)}, {}))


class FaultTests(PostgresCase):
    async def test_unreachable(self) -> None:
        """
        A server that cannot be reached fails open with a StoreError saying
        so, and leaves no thread behind; the backend can be opened later.
        """
        dsn = psycopg.conninfo.make_conninfo(DSN, host="127.0.0.1", port=1)
        backend = self.backend(self.new_schema(), dsn=dsn, connect_timeout=2)
        error = await self.assertFailure(backend.open(), StoreError)
        self.assertIn("cannot connect", str(error))
        self.assertFalse(backend._threads.running)
        await self.assertFailure(
            backend.commit(StoreBatch(messages={1: (1, [b"x"])})), StoreError
        )

    async def test_read_only(self) -> None:
        """
        A read-only server or session (SQLSTATE 25006, as on a standby) fails
        open with StoreReadOnly; a commit that meets it fails with
        StoreReadOnly, applies nothing, and the store works again after.
        """
        schema = self.new_schema()
        read_only = psycopg.conninfo.make_conninfo(
            DSN, options="-c default_transaction_read_only=on"
        )
        await self.assertFailure(
            self.backend(schema, dsn=read_only).open(), StoreReadOnly
        )
        backend, _ = await self.opened(schema)
        await self.assertFailure(
            self.backend(schema, gateway="g2", dsn=read_only).open(), StoreReadOnly
        )

        def session(value: str) -> None:
            backend._connections.writer_conn().execute(
                f"SET default_transaction_read_only = {value}".encode()
            )

        await backend._threads.on_writer(session, "on")
        await self.assertFailure(
            backend.commit(
                StoreBatch(messages={2: (1, [b"a"])}, delivered={(3, INCARNATION): 1})
            ),
            StoreReadOnly,
        )
        await backend._threads.on_writer(session, "off")
        self.assertEqual(summary(await backend.open()), ({}, {}))
        await backend.commit(StoreBatch(messages={2: (1, [b"a"])}))
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"a"])

    async def test_disk_full(self) -> None:
        """
        A commit that meets a full disk (SQLSTATE 53100, raised here by a
        trigger) fails with StoreFull and applies nothing of its batch; once
        there is room, the same positions are used.
        """
        schema = self.new_schema()
        backend, _ = await self.opened(schema)
        await backend.commit(StoreBatch(messages={2: (1, [b"one"])}))
        self.sql(
            f'CREATE FUNCTION "{schema}".full() RETURNS trigger LANGUAGE plpgsql '
            f"AS $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left' "
            f"USING ERRCODE = 'disk_full'; END $$"
        )
        self.sql(
            f'CREATE TRIGGER disk_full BEFORE INSERT ON "{schema}".outbox '
            f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".full()'
        )
        batch = StoreBatch(
            messages={2: (2, [b"two"])}, acked={2: 1}, delivered={(3, INCARNATION): 4}
        )
        error = await self.assertFailure(backend.commit(batch), StoreFull)
        self.assertIn("53100", str(error))
        self.assertEqual(summary(await backend.open()), ({(int, 2): (0, 1, 3)}, {}))
        self.sql(f'DROP TRIGGER disk_full ON "{schema}".outbox')
        await backend.commit(batch)
        self.assertEqual(await backend.read_outbound(2, 1, 5), [b"two"])

    def flaky_trigger(self, schema: str, sqlstate: str, failures: int) -> None:
        """
        Make the next ``failures`` statements inserting into the outbox of
        ``schema`` fail with ``sqlstate`` (counted by a sequence, which a
        rollback does not reset).
        """
        self.sql(f'CREATE SEQUENCE "{schema}".failures')
        self.sql(
            f'CREATE FUNCTION "{schema}".flaky() RETURNS trigger LANGUAGE plpgsql '
            f"AS $$ BEGIN IF nextval('\"{schema}\".failures') <= {failures:d} THEN "
            f"RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END IF; "
            f"RETURN NULL; END $$"
        )
        self.sql(
            f'CREATE TRIGGER flaky AFTER INSERT ON "{schema}".outbox '
            f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".flaky()'
        )

    async def test_serialization_failures_and_deadlocks_retried(self) -> None:
        """
        A transaction that meets a serialization failure (40001) or a
        deadlock (40P01) is run again, up to ``retries`` times in all, and
        applies exactly once; when every attempt fails, the commit fails with
        StoreLocked and applies nothing.
        """
        for sqlstate in ("40001", "40P01"):
            schema = self.new_schema()
            backend, _ = await self.opened(schema, retries=3)
            self.flaky_trigger(schema, sqlstate, 2)
            await backend.commit(StoreBatch(messages={2: (1, [b"a", b"b"])}))
            self.assertEqual(backend.retried, 2)
            self.assertEqual(await backend.read_outbound(2, 0, 5), [b"a", b"b"])
            # Now more failures than attempts.
            self.sql(
                f'ALTER SEQUENCE "{schema}".failures MINVALUE -100 RESTART WITH -100'
            )
            error = await self.assertFailure(
                backend.commit(StoreBatch(messages={2: (3, [b"c"])})), StoreLocked
            )
            self.assertIn(sqlstate, str(error))
            self.assertEqual(backend.retried, 4)
            self.assertEqual(summary(await backend.open())[0], {(int, 2): (0, 2, 2)})

    async def test_real_deadlock_retried(self) -> None:
        """
        A real deadlock between a commit and another session (each holding a
        stream row the other wants) is detected by the server, which fails
        the commit's transaction with 40P01; the backend runs it again once
        the other session is done, and it applies once.
        """
        [(superuser,)] = self.sql(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        if not superuser:
            raise SkipTest("setting deadlock_timeout needs a superuser")
        schema = self.new_schema()
        slow = psycopg.conninfo.make_conninfo(DSN, options="-c deadlock_timeout=500")
        backend, _ = await self.opened(schema, dsn=slow)
        await backend.commit(StoreBatch(messages={1: (1, [b"a"]), 2: (1, [b"b"])}))
        keys = dict(
            self.sql(f'SELECT int_id, peer_key FROM "{schema}".peer ORDER BY 2')
        )
        other = admin()
        self.addCleanup(other.close)
        other.execute("BEGIN")
        other.execute("SET LOCAL deadlock_timeout = '60s'")
        lock = f'SELECT 1 FROM "{schema}".outbound WHERE peer_key = %s FOR UPDATE'
        other.execute(lock.encode(), (keys[2],))
        committed = backend.commit(
            StoreBatch(messages={1: (2, [b"a2"]), 2: (2, [b"b2"])})
        )
        pid = writer_pid(backend)
        me = other.info.backend_pid
        await until(
            lambda: (
                self.sql("SELECT %s = ANY(pg_blocking_pids(%s))", me, pid) == [(True,)]
            ),
            "the commit to wait for the other session",
        )
        # This closes the cycle; the commit's session detects it first.
        await deferToThread(other.execute, lock.encode(), (keys[1],))
        other.execute("COMMIT")
        await committed
        self.assertEqual(backend.retried, 1)
        self.assertEqual(await backend.read_outbound(1, 0, 5), [b"a", b"a2"])
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"b", b"b2"])

    async def test_killed_during_commit_is_in_doubt(self) -> None:
        """
        The server process of the writer connection terminated while it
        runs COMMIT (held there by a deferred trigger waiting on a lock the
        test holds): the commit fails with StoreInDoubt; further commits are
        refused (reads go on) until the backend is opened again, which
        reports what is really stored (here: the batch was not committed)
        and accepts commits at those positions.
        """
        schema = self.new_schema()
        backend, _ = await self.opened(schema)
        await backend.commit(StoreBatch(messages={2: (1, [b"one"])}))
        key = random.randrange(2**31)
        self.sql(
            f'CREATE FUNCTION "{schema}".hold() RETURNS trigger LANGUAGE plpgsql '
            f"AS $$ BEGIN PERFORM pg_advisory_xact_lock_shared({key:d}); "
            f"RETURN NULL; END $$"
        )
        self.sql(
            f'CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON "{schema}".outbox '
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            f'EXECUTE FUNCTION "{schema}".hold()'
        )
        self.sql("SELECT pg_advisory_lock(%s)", key)
        self.addCleanup(self.sql, "SELECT pg_advisory_unlock_all()")
        committing = backend.commit(StoreBatch(messages={2: (2, [b"two"])}))
        pid = writer_pid(backend)
        await until(
            lambda: (
                self.sql(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s "
                    "AND query = 'COMMIT' AND wait_event_type = 'Lock'",
                    pid,
                )
                != []
            ),
            "the writer to wait inside COMMIT",
        )
        self.sql("SELECT pg_terminate_backend(%s)", pid)
        error = await self.assertFailure(committing, StoreInDoubt)
        self.assertIsInstance(error, StoreError)
        self.assertIn("unknown", str(error))
        self.sql("SELECT pg_advisory_unlock_all()")
        self.sql(f'DROP TRIGGER hold ON "{schema}".outbox')
        later = await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (2, [b"two"])})), StoreError
        )
        self.assertNotIsInstance(later, StoreInDoubt)
        self.assertIn("restart the node", str(later))
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"one"])
        state = await backend.open()
        self.assertEqual(summary(state)[0], {(int, 2): (0, 1, 3)})
        await backend.commit(StoreBatch(messages={2: (2, [b"two"])}))
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"one", b"two"])

    async def test_commit_reply_lost_is_in_doubt(self) -> None:
        """
        The connection lost after the server committed but before its
        answer arrived (a proxy forwards COMMIT, then cuts the client off
        instead of relaying the reply): the commit fails with StoreInDoubt,
        and the reopened backend reports the batch as stored.
        """
        proxy = await self.proxy()
        backend, _ = await self.opened(self.new_schema(), dsn=proxy.dsn)
        await backend.commit(StoreBatch(messages={2: (1, [b"one"])}))
        proxy.factory.armed = True
        await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (2, [b"two"])})), StoreInDoubt
        )
        self.assertTrue(proxy.factory.cut)
        await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (3, [b"three"])})), StoreError
        )
        state = await backend.open()
        self.assertEqual(summary(state)[0], {(int, 2): (0, 2, 6)})
        await backend.commit(StoreBatch(messages={2: (3, [b"three"])}))
        self.assertEqual(
            await backend.read_outbound(2, 0, 5), [b"one", b"two", b"three"]
        )

    async def proxy(self) -> Any:
        """
        A TCP proxy to the test server (see :class:`CommitReplyCutter`),
        listening on loopback; ``.dsn`` connects through it.
        """
        info = psycopg.conninfo.conninfo_to_dict(DSN)
        host = str(info.get("host") or "")
        if not host or host.startswith("/") or "," in host:
            raise SkipTest(f"the test server is not reached over TCP ({host!r})")
        factory = CommitReplyCutter(host, int(info.get("port") or 5432))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.factory = factory
        port.dsn = psycopg.conninfo.make_conninfo(
            DSN,
            host="127.0.0.1",
            port=port.getHost().port,
            sslmode="disable",
            gssencmode="disable",
        )
        return port

    async def test_connection_lost_between_transactions(self) -> None:
        """
        A connection the server dropped while idle (a restart or failover
        between two transactions) is replaced: the next commit and read run
        on new connections and apply once.
        """
        backend, _ = await self.opened(self.new_schema())
        await backend.commit(StoreBatch(messages={2: (1, [b"one"])}))
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"one"])
        reader = backend._connections.reader
        assert reader is not None
        for pid in (writer_pid(backend), reader.info.backend_pid):
            self.sql("SELECT pg_terminate_backend(%s)", pid)
        await until(
            lambda: (
                not self.sql(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                    [writer_pid(backend), reader.info.backend_pid],
                )
            ),
            "the connections to end",
        )
        await backend.commit(StoreBatch(messages={2: (2, [b"two"])}))
        self.assertEqual(await backend.read_outbound(2, 0, 5), [b"one", b"two"])
        self.assertEqual(backend.reconnected, 2)

    async def test_bad_batches_refused_before_writing(self) -> None:
        """
        Entries no store can hold (invalid peer ids, positions outside
        [0, 2**63), incarnations that are not 32 lowercase hex digits,
        contents that are not bytes) fail the commit with StoreError before
        anything is sent: nothing of the batch is applied.
        """
        backend, _ = await self.opened(self.new_schema())
        good = {7: (1, [b"fine"])}
        bad_batches = [
            StoreBatch(messages={**good, -1: (1, [b"x"])}),
            StoreBatch(messages={**good, 2**63: (1, [b"x"])}),
            StoreBatch(messages={**good, "": (1, [b"x"])}),
            StoreBatch(messages={**good, True: (1, [b"x"])}),
            StoreBatch(messages={**good, 3: (0, [b"x"])}),
            StoreBatch(messages={**good, 3: (2**63 - 1, [b"x", b"y"])}),
            StoreBatch(messages={**good, 3: (1, ["text"])}),  # type: ignore[list-item]
            StoreBatch(messages=good, acked={3: 2**63}),
            StoreBatch(messages=good, acked={3: -1}),
            StoreBatch(messages=good, delivered={(3, "C" * 32): 1}),
            StoreBatch(messages=good, delivered={(3, INCARNATION): 2**63}),
            StoreBatch(messages=good, retired={(3, "x")}),
        ]
        for batch in bad_batches:
            error = await self.assertFailure(backend.commit(batch), StoreError)
            self.assertIn("batch refused", str(error))
        self.assertEqual(summary(await backend.open()), ({}, {}))

    async def test_read_outbound_max_bytes(self) -> None:
        """
        read_outbound stops before the contents would exceed ``max_bytes``,
        returns at least one message when any is there (even a larger one),
        and never more than ``limit``; without ``max_bytes`` only ``limit``
        counts.
        """
        backend, _ = await self.opened(self.new_schema())
        sizes = [10, 20, 30, 40]
        contents = [bytes([i]) * n for i, n in enumerate(sizes)]
        await backend.commit(StoreBatch(messages={2: (1, contents)}))
        cases = [
            ((0, 10, 30), contents[:2]),
            ((0, 10, 29), contents[:1]),
            ((0, 10, 5), contents[:1]),
            ((0, 10, None), contents),
            ((0, 3, 1000), contents[:3]),
            ((2, 10, 69), contents[2:3]),
            ((2, 10, 70), contents[2:]),
            ((4, 10, 70), []),
            ((0, 0, 70), []),
        ]
        for (after, limit, max_bytes), expected in cases:
            read = await backend.read_outbound(2, after, limit, max_bytes)
            self.assertEqual(read, expected, (after, limit, max_bytes))

    async def test_large_batches(self) -> None:
        """
        One commit of 20,000 messages stores them all at consecutive
        positions (sent as arrays, split by size when large) and reads back
        in order; the pending bytes add up.
        """
        self.patch(_pg_commit, "_INSERT_CHUNK_BYTES", 64 * 1000)
        backend, _ = await self.opened(self.new_schema())
        contents = [b"%063d" % i for i in range(20_000)]
        await backend.commit(StoreBatch(messages={9: (1, contents)}))
        read: list[bytes] = []
        while chunk := await backend.read_outbound(9, len(read), 4096):
            read.extend(chunk)
        self.assertEqual(read, contents)
        self.assertEqual(
            summary(await backend.open())[0], {(int, 9): (0, 20_000, 20_000 * 63)}
        )


class ErrorMappingTests(SynchronousTestCase):
    def test_sqlstates(self) -> None:
        """
        psycopg errors map to the StoreError subclass of their SQLSTATE, the
        SQLSTATE is in the message and the original is the cause; an error
        without one (a lost connection) is a plain StoreError.
        """
        if psycopg is None:
            raise SkipTest("psycopg is not installed")
        cases = [
            ("53100", StoreFull),
            ("25006", StoreReadOnly),
            ("42501", StoreReadOnly),
            ("55P03", StoreLocked),
            ("40P01", StoreLocked),
            ("XX001", StoreCorrupt),
            ("42P01", StoreCorrupt),
            ("57P01", StoreError),
            ("08006", StoreError),
            ("23505", StoreError),
        ]
        for sqlstate, kind in cases:
            error = psycopg.errors.lookup(sqlstate)("boom")
            mapped = store_error(error, "the store", "cannot commit to")
            self.assertIs(type(mapped), kind, sqlstate)
            self.assertIs(mapped.__cause__, error)
            self.assertIn(f"SQLSTATE {sqlstate}", str(mapped))
        lost = psycopg.OperationalError("server closed the connection unexpectedly")
        self.assertIs(type(store_error(lost, "x", "cannot commit to")), StoreError)
        locked = StoreLocked("held")
        self.assertIs(store_error(locked, "x", "cannot open"), locked)


class OwnershipTests(PostgresCase):
    """
    Several gateways (PostgresBackend instances) of one node sharing a
    schema: leases, epochs, fencing, appends from any gateway.
    """

    def setUp(self) -> None:
        super().setUp()
        self.now = 1000.0
        self.schema = self.new_schema()

    def clock(self) -> float:
        """The gateways' shared local monotonic clock, moved by the test."""
        return self.now

    async def gateways(self, *names: str, **kwargs: Any) -> list[PostgresBackend]:
        backends = [
            self.backend(self.schema, 1, name, monotonic=self.clock, **kwargs)
            for name in names
        ]
        await defer.gatherResults([b.open() for b in backends])
        return backends

    def lease(self, peer_id: int) -> tuple[Any, ...]:
        """``(owner, epoch, live)`` of the lease of node 1's stream to ``peer_id``."""
        s = self.schema
        (row,) = self.sql(
            f'SELECT l.owner, l.epoch, l.expires_at > now() FROM "{s}".lease l '
            f'JOIN "{s}".peer p USING (node_key, peer_key) WHERE p.int_id = %s',
            peer_id,
        )
        return row

    def expire(self, peer_id: int = 5) -> None:
        """
        Make the lease of ``peer_id`` run out now in the store's time (what
        the passing of ``lease_duration`` would do).
        """
        self.sql(
            f'UPDATE "{self.schema}".lease l SET expires_at = now() - interval '
            f"'1 second' FROM \"{self.schema}\".peer p WHERE p.node_key = l.node_key "
            f"AND p.peer_key = l.peer_key AND p.int_id = %s",
            peer_id,
        )

    async def test_provides_interfaces(self) -> None:
        """
        PostgresBackend provides IBackend and IStreamOwnership.
        """
        (a,) = await self.gateways("a")
        verifyObject(IBackend, a)
        verifyObject(IStreamOwnership, a)

    async def test_take_over_fences_the_deposed_owner(self) -> None:
        """
        A take-over raises the epoch and returns the stream's durable state
        as of the take-over; the deposed gateway's next commit touching that
        stream fails with Fenced (naming the new epoch and owner) and writes
        nothing, not even its entries for other streams; it stays fenced;
        the new owner's writes apply.
        """
        a, b = await self.gateways("a", "b")
        taken = await a.acquire(5)
        self.assertEqual(
            (taken.epoch, taken.previous_owner, taken.previous_epoch), (1, None, 0)
        )
        self.assertEqual(taken.deliver_after, 0)
        self.assertEqual(taken.valid_until, self.now + a.lease_duration)
        self.assertTrue(a.holds(5))
        await a.commit(
            StoreBatch(
                messages={5: (1, [b"a", b"b", b"c"])}, delivered={(5, INCARNATION): 4}
            )
        )
        taken = await b.acquire(5)
        self.assertEqual(
            (taken.epoch, taken.previous_owner, taken.previous_epoch), (2, "a", 1)
        )
        self.assertGreater(taken.deliver_after, 0)
        self.assertLessEqual(taken.deliver_after, a.lease_duration)
        # b delivers only once a's lease would have run out.
        self.assertFalse(b.holds(5))
        self.now += taken.deliver_after
        self.assertTrue(b.holds(5))
        self.assertEqual((taken.outbound.acked, taken.outbound.last_position), (0, 3))
        self.assertEqual(
            [(r.incarnation, r.delivered) for r in taken.inbound], [(INCARNATION, 4)]
        )
        self.assertEqual(self.lease(5), ("b", 2, True))
        deposed = StoreBatch(
            messages={6: (1, [b"elsewhere"])},
            acked={5: 2},
            delivered={(5, INCARNATION): 9},
        )
        error = await self.assertFailure(a.commit(deposed), Fenced)
        self.assertEqual(error.streams, {5: (2, "b")})
        self.assertIsInstance(error, StoreError)
        self.assertFalse(a.holds(5))
        self.assertEqual(a.owned(), frozenset())
        await self.assertFailure(
            a.commit(StoreBatch(delivered={(5, INCARNATION): 9})), Fenced
        )
        self.assertEqual(
            summary(await b.open()),
            ({(int, 5): (0, 3, 3)}, {(int, 5, INCARNATION): (4, False)}),
        )
        result = await b.commit(
            StoreBatch(acked={5: 2}, delivered={(5, INCARNATION): 9})
        )
        self.assertEqual(result.released_bytes, {5: 2})

    async def test_delivery_windows_do_not_overlap(self) -> None:
        """
        On a real monotonic clock, a take-over's delivery window opens no
        earlier than the deposed gateway's closes, as that gateway counts
        it without having heard of the take-over; a take-over of a released
        stream may deliver at once.
        """
        a = self.backend(self.schema, 1, "a")
        b = self.backend(self.schema, 1, "b")
        await defer.gatherResults([a.open(), b.open()])
        await a.acquire(5)
        await b.acquire(5)
        a_window, b_window = a.delivery_window(5), b.delivery_window(5)
        assert a_window is not None and b_window is not None
        self.assertGreaterEqual(b_window[0], a_window[1])
        self.assertTrue(a.holds(5))
        self.assertFalse(b.holds(5))
        await b.release(5)
        self.assertIsNone(b.delivery_window(5))
        await a.acquire(5, take_over=False)
        self.assertTrue(a.holds(5))

    async def test_appends_from_every_gateway_stay_dense(self) -> None:
        """
        Both gateways append to one stream at the same time (the owner and
        another): the store gives each commit a run of positions, the runs
        never overlap and leave no gap, and each position holds what its
        commit appended.  A commit with a stale first position fails.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        rng = random.Random(16)
        sent: list[tuple[PostgresBackend, list[bytes]]] = []
        for i in range(40):
            gateway = (a, b)[i % 2]
            sent.append(
                (
                    gateway,
                    [
                        b"%s %d %d" % (gateway.gateway.encode(), i, j)
                        for j in range(rng.randint(1, 5))
                    ],
                )
            )
        results = await defer.gatherResults(
            [g.commit_shared(StoreBatch(messages={5: (1, c)})) for g, c in sent]
        )
        stored: dict[int, bytes] = {}
        for result, (_, contents) in zip(results, sent, strict=True):
            self.assertIsInstance(result, SharedCommitResult)
            first, last = result.positions[5]
            self.assertEqual(last - first + 1, len(contents))
            for position, item in zip(range(first, last + 1), contents, strict=True):
                self.assertNotIn(position, stored)
                stored[position] = item
        total = sum(len(c) for _, c in sent)
        self.assertEqual(sorted(stored), list(range(1, total + 1)))
        read = await a.read_outbound(5, 0, total + 10)
        self.assertEqual(read, [stored[p] for p in range(1, total + 1)])
        await self.assertFailure(
            b.commit(StoreBatch(messages={5: (total, [b"stale"])})), StoreError
        )

    async def test_paused_gateway_is_fenced(self) -> None:
        """
        A gateway that stops past its lease (as under SIGSTOP or a long
        pause: it renews nothing) loses the stream to another gateway, which
        may take it without the peer's link because the lease expired; when
        the first resumes, its local deadline has passed (so it delivers
        nothing), its renewal reports the stream lost, and its commits are
        fenced.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        await a.commit(StoreBatch(messages={5: (1, [b"x"])}))
        await self.assertFailure(b.acquire(5, take_over=False), LeaseHeld)
        self.now += 3 * a.lease_duration
        self.expire(5)
        taken = await b.acquire(5, take_over=False)
        self.assertEqual((taken.epoch, taken.previous_owner), (2, "a"))
        self.assertEqual(taken.deliver_after, 0)
        self.assertFalse(a.holds(5))
        renewal = await a.renew()
        self.assertEqual((renewal.renewed, renewal.lost), (frozenset(), {5}))
        await self.assertFailure(
            a.commit(StoreBatch(acked={5: 1}, delivered={(5, INCARNATION): 1})),
            Fenced,
        )
        self.assertEqual(self.lease(5), ("b", 2, True))
        await b.commit(StoreBatch(acked={5: 1}))

    async def test_live_lease_refuses_a_claim(self) -> None:
        """
        acquire without take_over fails with LeaseHeld (naming the owner and
        its epoch, changing nothing) while another gateway's lease is live;
        after that gateway releases the stream it succeeds at once, with no
        delivery wait; release reports whether the stream was still held.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        error = await self.assertFailure(b.acquire(5, take_over=False), LeaseHeld)
        self.assertEqual((error.peer_id, error.owner, error.epoch), (5, "a", 1))
        self.assertGreater(error.remaining, 0)
        await a.commit(StoreBatch(delivered={(5, INCARNATION): 1}))
        self.assertTrue(await a.release(5))
        self.assertFalse(await a.release(5))
        self.assertEqual(self.lease(5), (None, 1, False))
        taken = await b.acquire(5, take_over=False)
        self.assertEqual(
            (taken.epoch, taken.previous_owner, taken.deliver_after), (2, None, 0)
        )
        await self.assertFailure(
            a.commit(StoreBatch(delivered={(5, INCARNATION): 2})), Fenced
        )

    async def test_concurrent_take_overs_leave_one_owner(self) -> None:
        """
        Gateways racing to claim a free stream: exactly one wins, the others
        get LeaseHeld.  Gateways racing to take it over (links arriving on
        each): every take-over gets its own epoch, the store ends with the
        highest as owner, and only that gateway can still write.  Repeated
        over several rounds.
        """
        gateways = await self.gateways("a", "b", "c", "d")
        for _ in range(3):
            # The stream is free: never taken, or released by its owner.
            await defer.gatherResults([g.release(5) for g in gateways])
            outcomes = await defer.DeferredList(
                [g.acquire(5, take_over=False) for g in gateways], consumeErrors=True
            )
            winners = [g for g, (ok, _) in zip(gateways, outcomes, strict=True) if ok]
            self.assertEqual(len(winners), 1, outcomes)
            for ok, value in outcomes:
                if not ok:
                    value.trap(LeaseHeld)
            takes = await defer.gatherResults([g.acquire(5) for g in gateways])
            epochs = [t.epoch for t in takes]
            self.assertEqual(len(set(epochs)), len(gateways))
            owner = gateways[epochs.index(max(epochs))]
            self.assertEqual(self.lease(5)[:2], (owner.gateway, max(epochs)))
            writes = await defer.DeferredList(
                [
                    g.commit(StoreBatch(delivered={(5, INCARNATION): max(epochs)}))
                    for g in gateways
                ],
                consumeErrors=True,
            )
            for g, (ok, value) in zip(gateways, writes, strict=True):
                self.assertEqual(ok, g is owner)
                if not ok:
                    value.trap(Fenced)
            self.assertEqual(
                {g.gateway for g in gateways if 5 in g.owned()}, {owner.gateway}
            )

    async def test_renew(self) -> None:
        """
        renew extends every lease still held (moving the local deadline and
        the expiry in the store) and reports the ones taken over meanwhile
        as lost, dropping them.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        await a.acquire(6)
        (before,) = self.sql(f'SELECT max(expires_at) FROM "{self.schema}".lease')
        self.now += 3
        self.assertTrue(a.holds(5))
        renewal = await a.renew()
        self.assertEqual(renewal.renewed, {5, 6})
        self.assertEqual(renewal.valid_until, self.now + a.lease_duration)
        (after,) = self.sql(f'SELECT max(expires_at) FROM "{self.schema}".lease')
        self.assertGreater(after, before)
        self.now += 4
        self.assertTrue(a.holds(5))
        await b.acquire(6)
        renewal = await a.renew()
        self.assertEqual((renewal.renewed, renewal.lost), ({5}, {6}))
        self.assertEqual(a.owned(), {5})
        self.now += a.lease_duration
        self.assertFalse(a.holds(5))

    async def test_claimable(self) -> None:
        """
        claimable lists the streams with messages waiting and no live lease
        (never taken, released or expired), not those owned or drained.
        """
        a, b = await self.gateways("a", "b")
        await a.commit(
            StoreBatch(messages={5: (1, [b"x"]), 6: (1, [b"y"]), 7: (1, [b"z"])})
        )
        await a.commit(StoreBatch(acked={7: 1}))
        self.assertEqual(await b.claimable(), [5, 6])
        await a.acquire(5)
        self.assertEqual(await b.claimable(), [6])
        self.assertEqual(await b.claimable(limit=0), [])
        self.expire(5)
        self.assertEqual(await b.claimable(), [5, 6])
        await b.acquire(6, take_over=False)
        await b.release(6)
        self.assertEqual(await a.claimable(), [5, 6])

    async def test_claimable_lists_dialled_peers(self) -> None:
        """
        claimable(peers=...) also lists those peers with no live lease and
        nothing waiting (a gateway keeps a link to the peers it dials), int
        and str ids alike; not when their lease is live.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        await a.acquire("five")
        await a.acquire(8)
        await a.release(5)
        await a.release("five")
        self.assertEqual(await b.claimable(), [])
        self.assertEqual(await b.claimable(peers=[5, "five", 8, 9]), [5, "five"])
        await b.acquire("five", take_over=False)
        self.assertEqual(await a.claimable(peers=[5, "five"]), [5])

    async def test_close_releases_leases(self) -> None:
        """
        Closing a backend releases its leases: another gateway takes the
        stream at once, with no delivery wait.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        await a.close()
        self.assertEqual(self.lease(5), (None, 1, False))
        taken = await b.acquire(5, take_over=False)
        self.assertEqual((taken.epoch, taken.deliver_after), (2, 0))

    async def test_append_hints(self) -> None:
        """
        The owner of a stream hears (LISTEN/NOTIFY) that another gateway
        appended to it; after its listening connection is killed, it listens
        again and hears later appends.
        """
        a, b = await self.gateways("a", "b")
        await a.acquire(5)
        heard: list[Any] = []
        waiting: list[defer.Deferred[None]] = []

        def hint(peer_id: Any) -> None:
            heard.append(peer_id)
            while waiting:
                waiting.pop().callback(None)

        await a.watch(hint)

        async def append_and_hear() -> None:
            d: defer.Deferred[None] = defer.Deferred()
            waiting.append(d)
            await b.commit_shared(StoreBatch(messages={5: (1, [b"m"])}))
            await d.addTimeout(10, reactor)

        await append_and_hear()
        self.assertEqual(heard, [5])
        listener = a._listener
        assert listener is not None and listener.conn is not None
        self.sql("SELECT pg_terminate_backend(%s)", listener.conn.info.backend_pid)
        await until(lambda: listener.conn is None, "the listener to notice")
        await until(lambda: listener.conn is not None, "the listener to come back")
        await append_and_hear()
        self.assertEqual(heard, [5, 5])
