"""
Tests for :mod:`ilm.backends._pg_inspect` and ``ilm inspect
postgresql://...``, against the real test database (each test in schemas of
its own, dropped afterwards; skipped with the reason if PostgreSQL cannot
be reached).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.threads import deferToThread

from ilm import StoreBatch
from ilm.backends._pg_inspect import PostgresReport, inspect_postgres
from ilm.backends._pg_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from ilm.backends._report import GatewayReport, LeaseReport
from ilm.errors import StoreError

from . import test_cli
from .test_postgres import DSN, PostgresCase

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None  # type: ignore[assignment]

INCARNATION = "d" * 32


def dsn_uri() -> str:
    """The test database as a ``postgresql://`` URI (``ilm inspect`` takes one)."""
    given = psycopg.conninfo.conninfo_to_dict(DSN)
    user = given.get("user", "")
    password = f":{given['password']}" if given.get("password") else ""
    at = f"{user}{password}@" if user else ""
    host = given.get("host", "127.0.0.1")
    port = given.get("port", "5432")
    return f"postgresql://{at}{host}:{port}/{given.get('dbname', '')}"


class InspectTests(PostgresCase):
    async def filled(self, schema: str) -> dict[Any, str]:
        """
        Two nodes in ``schema``, open (as by running gateways): node ``1``
        with pending messages to ``2`` and ``"2"``, a delivery mark, a
        retired incarnation, the stream of ``2`` taken by gateway ``g1``,
        and gateway ``g0`` of node 1 opened and closed (its liveness row
        expired); node ``"two"`` with one message to ``7``.

        :return: each node's incarnation.
        """
        closed, _ = await self.opened(schema, node_id=1, gateway="g0")
        await closed.close()
        one, state_one = await self.opened(schema, node_id=1, gateway="g1")
        two, state_two = await self.opened(schema, node_id="two", gateway="g2")
        await one.commit(
            StoreBatch(messages={2: (1, [b"x" * 10] * 5), "2": (1, [b"y"])})
        )
        await one.acquire(2)
        await one.commit(
            StoreBatch(
                acked={2: 2},
                delivered={(3, INCARNATION): 4},
                retired={(3, "e" * 32)},
            )
        )
        await two.commit(StoreBatch(messages={7: (1, [b"z" * 3])}))
        return {1: state_one.incarnation, "two": state_two.incarnation}

    async def test_report(self) -> None:
        """
        One read-only snapshot of every node in the schema, while their
        gateways hold it open: incarnation, pending counts, bytes and the
        oldest message's time (database time, not after the snapshot's),
        delivery marks with retirement, per stream the lease: owner,
        epoch, expiry and whether it is live, and per gateway its liveness
        row: when it opened, when it expires, whether it is live (a
        gateway closed is not).
        """
        schema = self.new_schema()
        incarnations = await self.filled(schema)
        report = await deferToThread(inspect_postgres, DSN, schema=schema)
        self.assertIsInstance(report, PostgresReport)
        self.assertEqual(report.schema, schema)
        self.assertEqual(report.schema_version, SCHEMA_VERSION)
        self.assertEqual([n.node_id for n in report.nodes], [1, "two"])
        one, two = report.nodes
        self.assertEqual(one.incarnation, incarnations[1])
        self.assertEqual(two.incarnation, incarnations["two"])
        boxes = {box.peer_id: box for box in one.outbound}
        self.assertEqual(set(boxes), {2, "2"})
        self.assertEqual(
            (boxes[2].pending, boxes[2].pending_bytes, boxes[2].acked), (3, 30, 2)
        )
        self.assertEqual((boxes["2"].pending, boxes["2"].pending_bytes), (1, 1))
        for box in boxes.values():
            assert box.oldest_stored_at is not None
            self.assertTrue(0 <= report.database_time - box.oldest_stored_at < 60)
        marks = {(m.peer_id, m.incarnation): m for m in one.inbound}
        self.assertEqual(marks[(3, INCARNATION)].delivered, 4)
        self.assertFalse(marks[(3, INCARNATION)].retired)
        self.assertTrue(marks[(3, "e" * 32)].retired)
        leases = {lease.peer_id: lease for lease in one.leases}
        taken = leases[2]
        self.assertEqual((taken.owner, taken.epoch, taken.live), ("g1", 1, True))
        assert taken.expires_at is not None
        self.assertTrue(0 < taken.expires_at - report.database_time <= 5.0)
        self.assertEqual(leases["2"], LeaseReport("2", None, 0, None, False))
        self.assertEqual(
            [(b.peer_id, b.pending, b.pending_bytes) for b in two.outbound],
            [(7, 1, 3)],
        )
        rows = {
            name: (opened, expires)
            for name, opened, expires in self.sql(
                f"SELECT name, extract(epoch FROM opened_at)::float8, "
                f'extract(epoch FROM expires_at)::float8 FROM "{schema}".gateway'
            )
        }
        self.assertEqual(
            one.gateways,
            (
                GatewayReport("g0", *rows["g0"], live=False),
                GatewayReport("g1", *rows["g1"], live=True),
            ),
        )
        self.assertEqual(two.gateways, (GatewayReport("g2", *rows["g2"], True),))
        closed, live = one.gateways
        self.assertTrue(closed.opened_at <= closed.expires_at <= report.database_time)
        self.assertTrue(closed.expires_at <= live.opened_at <= report.database_time)
        self.assertTrue(0 < live.expires_at - report.database_time <= 5.0)

    async def test_one_node(self) -> None:
        """
        ``node_id`` picks one node (an ``int`` and a ``str`` id are
        different nodes); a node the schema does not hold is a StoreError.
        """
        schema = self.new_schema()
        await self.filled(schema)
        report = await deferToThread(
            inspect_postgres, DSN, schema=schema, node_id="two"
        )
        self.assertEqual([n.node_id for n in report.nodes], ["two"])
        error = await self.assertFailure(
            deferToThread(inspect_postgres, DSN, schema=schema, node_id="1"),
            StoreError,
        )
        self.assertIn("no node '1'", str(error))

    def test_no_store_changes_nothing(self) -> None:
        """
        A schema that does not exist is a StoreError naming it, and is not
        created (the inspection writes nothing); an unreachable server is a
        StoreError saying so.
        """
        schema = self.new_schema()
        error = self.assertRaises(StoreError, inspect_postgres, DSN, schema=schema)
        self.assertIn("no ILM store", str(error))
        self.assertEqual(
            self.sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", schema), []
        )
        unreachable = psycopg.conninfo.make_conninfo(DSN, host="127.0.0.1", port=1)
        error = self.assertRaises(
            StoreError, inspect_postgres, unreachable, connect_timeout=2
        )
        self.assertIn("cannot connect", str(error))

    async def test_version_1_store(self) -> None:
        """
        A store of schema version 1 (no gateway table) is read as before:
        its nodes, with no gateways, in the report, the text and the JSON.
        """
        schema = self.new_schema()
        self.assertEqual(migrate(self.admin, schema, MIGRATIONS, 1), (0, 1))
        self.sql(
            f'INSERT INTO "{schema}".node (int_id, incarnation) VALUES (2, %s)',
            INCARNATION,
        )
        report = await deferToThread(inspect_postgres, DSN, schema=schema)
        self.assertEqual(report.schema_version, 1)
        [node] = report.nodes
        self.assertEqual((node.node_id, node.gateways), (2, ()))
        code, out, err = await deferToThread(
            self.run_cli, dsn_uri(), "--schema", schema
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("  gateways (liveness, database time):\n    none\n", out)
        code, out, err = await deferToThread(
            self.run_cli, dsn_uri(), "--schema", schema, "--json"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["nodes"][0]["gateways"], [])

    run_cli = test_cli.InspectTests.run_cli
    """``ilm inspect ARGS``: exit status, output, errors."""

    async def test_command(self) -> None:
        """
        ``ilm inspect postgresql://... --schema S`` prints, per node, what
        it prints for an SQLite store, the leases and the gateways'
        liveness; ``--json`` the same
        for machines; ``--node`` one node; errors are one line and exit 1;
        ``--node`` on an SQLite path is a usage error (exit 2).
        """
        schema = self.new_schema()
        incarnations = await self.filled(schema)
        uri = dsn_uri()
        code, out, err = await deferToThread(self.run_cli, uri, "--schema", schema)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"schema {schema!r}", out)
        self.assertIn("node 1\n", out)
        self.assertIn(f"  incarnation {incarnations[1]}\n", out)
        self.assertIn("  peer 2: 3 pending (positions 3..5, 30 bytes)", out)
        self.assertIn(f"  peer 3 incarnation {INCARNATION}: delivered up to 4\n", out)
        self.assertRegex(
            out, r"    peer 2: owner 'g1', epoch 1, expires in .* s \(live\)"
        )
        self.assertIn("    peer '2': no owner, epoch 0, never taken (not live)", out)
        self.assertRegex(
            out,
            r"  gateways \(liveness, database time\):\n"
            r"    gateway 'g0': opened [0-9.]+ s ago, expired [0-9.]+ s ago "
            r"\(not live\)\n"
            r"    gateway 'g1': opened [0-9.]+ s ago, expires in [0-9.]+ s \(live\)\n"
            r"node 'two'\n",
        )
        code, out, err = await deferToThread(
            self.run_cli, uri, "--schema", schema, "--json", "--node", "two"
        )
        self.assertEqual((code, err), (0, ""))
        data = json.loads(out)
        self.assertEqual(data["schema"], schema)
        [node] = data["nodes"]
        self.assertEqual(node["node_id"], "two")
        self.assertEqual(node["incarnation"], incarnations["two"])
        [box] = node["outbound"]
        self.assertEqual(
            (box["peer_id"], box["pending"], box["pending_bytes"]), (7, 1, 3)
        )
        self.assertGreaterEqual(box["oldest_pending_age"], 0)
        self.assertEqual(node["inbound"], [])
        [lease] = node["leases"]
        self.assertEqual(
            lease,
            {
                "peer_id": 7,
                "owner": None,
                "epoch": 0,
                "expires_at": None,
                "expires_in": None,
                "live": False,
            },
        )
        [gateway] = node["gateways"]
        self.assertEqual((gateway["name"], gateway["live"]), ("g2", True), gateway)
        self.assertEqual(
            gateway["expires_in"],
            round(gateway["expires_at"] - data["database_time"], 3),
        )
        self.assertTrue(0 < gateway["expires_in"] <= 5.0)
        self.assertEqual(
            gateway["opened_age"],
            round(data["database_time"] - gateway["opened_at"], 3),
        )
        self.assertGreaterEqual(gateway["opened_age"], 0)
        code, out, err = await deferToThread(
            self.run_cli, uri, "--schema", schema, "--node", "str:1"
        )
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("ilm inspect: StoreError: no node '1'"), err)
        code, out, err = self.run_cli("node.sqlite", "--node", "1")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("PostgreSQL", err)
