"""
Reading a PostgreSQL store outside a node, for ``ilm inspect
postgresql://...``: every node in the schema (or one), its incarnation,
streams and delivery marks, each stream's lease and each gateway's
liveness row, from one read-only snapshot.  It takes no lock and writes
nothing, so it works while gateways run.  Times are the database's (one
clock for every gateway).
"""

from __future__ import annotations

import math

import attr

from ilm._peerid import PeerId
from ilm._store import InboundRecord, valid_incarnation
from ilm.backends._pg_schema import (
    SCHEMA_VERSION,
    _Conn,
    psycopg,
    quote_schema,
    rollback,
    schema_version,
    store_error,
)
from ilm.backends._pg_sql import Statements, decode_id
from ilm.backends._report import (
    GatewayReport,
    LeaseReport,
    NodeReport,
    OutboxReport,
)
from ilm.errors import StoreCorrupt, StoreError, StoreSchemaTooNew

__all__ = ["PostgresReport", "inspect_postgres"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PostgresReport:
    """
    A read-only snapshot of a PostgreSQL store, for ``ilm inspect``.
    A store of schema version 1 (before gateway liveness rows) reports no
    gateways.

    ``database``: where it is (user, host, port, database; never a
    password); ``database_time``: the database's clock when the snapshot
    was taken (seconds since the epoch), against which ages and lease
    expiries are told.
    """

    database: str
    schema: str
    schema_version: int
    database_time: float
    nodes: tuple[NodeReport, ...]


def _where(conn: _Conn) -> str:
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"


def inspect_postgres(
    dsn: str,
    *,
    schema: str = "ilm",
    node_id: PeerId | None = None,
    connect_timeout: float = 10.0,
) -> PostgresReport:
    """
    Read the ILM store in ``schema`` of the database at ``dsn`` in one
    read-only transaction: every node (or only ``node_id``), each value
    checked as when a gateway opens it.

    :raises StoreError: the database cannot be reached, no ILM store in
        ``schema``, or no node ``node_id`` in it;
        :class:`ilm.errors.StoreCorrupt`: not an ILM schema, a bad row;
        :class:`ilm.errors.StoreSchemaTooNew`: written by a newer ILM.
    """
    if psycopg is None:  # pragma: no cover
        raise StoreError("inspecting PostgreSQL needs psycopg 3: ilm[postgres]")
    place = f"the PostgreSQL schema {schema!r}"
    try:
        sql = Statements(quote_schema(schema))
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, math.ceil(connect_timeout)),
            application_name="ilm inspect",
        )
    except (ValueError, psycopg.Error) as e:
        raise store_error(e, place, "cannot connect to") from e
    database = _where(conn)
    place = f"{place} at {database}"
    try:
        conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        version = schema_version(conn, schema)
        if not version:
            raise StoreError(f"no ILM store in {place}")
        if version > SCHEMA_VERSION:
            raise StoreSchemaTooNew(version, SCHEMA_VERSION)
        row = conn.execute(b"SELECT extract(epoch FROM now())::float8").fetchone()
        now = float(row[0]) if row is not None else 0.0
        nodes = []
        for key, int_id, str_id, incarnation in conn.execute(sql.nodes).fetchall():
            found = decode_id(int_id, str_id)
            if node_id is not None and (type(found), found) != (type(node_id), node_id):
                continue
            if not valid_incarnation(incarnation):
                raise StoreCorrupt(f"node {found!r}: bad incarnation {incarnation!r}")
            nodes.append(_node(conn, sql, key, found, incarnation, version))
        if node_id is not None and not nodes:
            raise StoreError(f"no node {node_id!r} in {place}")
    except StoreError:
        raise
    except Exception as e:
        raise store_error(e, place, "cannot inspect") from e
    finally:
        rollback(conn)
        conn.close()
    return PostgresReport(database, schema, version, now, tuple(nodes))


def _node(
    conn: _Conn,
    sql: Statements,
    key: int,
    node_id: PeerId,
    incarnation: str,
    version: int,
) -> NodeReport:
    """
    One node's streams, marks, leases and (from schema version 2, which
    added them) gateways' liveness rows, in the open snapshot.
    """
    ids = {
        peer_key: decode_id(int_id, str_id)
        for peer_key, int_id, str_id in conn.execute(sql.load_peers, (key,))
    }

    def peer(peer_key: object) -> PeerId:
        if peer_key not in ids:
            raise StoreCorrupt(f"node {node_id!r}: no peer with key {peer_key!r}")
        return ids[peer_key]  # type: ignore[index]

    outbound = []
    for peer_key, acked, last, pending, oldest in conn.execute(
        sql.inspect_outbound, (key,)
    ):
        if not 0 <= acked <= last or pending < 0:
            raise StoreCorrupt(
                f"node {node_id!r}: bad outbound record {(acked, last, pending)!r}"
            )
        outbound.append(OutboxReport(peer(peer_key), acked, last, pending, oldest))
    inbound = [
        InboundRecord(peer(peer_key), peer_incarnation, delivered, retired)
        for peer_key, peer_incarnation, delivered, retired in conn.execute(
            sql.load_inbound, (key,)
        )
    ]
    leases = [
        LeaseReport(peer(peer_key), owner, epoch, expires_at, live)
        for peer_key, owner, epoch, expires_at, live in conn.execute(
            sql.inspect_leases, (key,)
        )
    ]
    gateways = []
    if version >= 2:
        for name, opened_at, expires_at, live in conn.execute(
            sql.inspect_gateways, (key,)
        ):
            if not (math.isfinite(opened_at) and math.isfinite(expires_at)):
                raise StoreCorrupt(
                    f"node {node_id!r}: bad liveness row of gateway {name!r}"
                )
            gateways.append(GatewayReport(name, opened_at, expires_at, live))
    return NodeReport(
        node_id,
        incarnation,
        tuple(outbound),
        tuple(inbound),
        tuple(leases),
        tuple(gateways),
    )
