"""
The PostgreSQL store's SQL: every statement the backend runs, with the
schema name written in (:class:`Statements`), and how node and peer ids
are stored in its columns and carried in notification payloads.
"""

from __future__ import annotations

from ilm._peerid import MAX_INT_ID, PeerId, id_bytes, id_from_bytes, stored_id
from ilm.errors import InvalidPeerId, StoreCorrupt

__all__ = [
    "Statements",
    "any_writer_session_of",
    "decode_hint",
    "decode_id",
    "encode_hint",
    "id_columns",
    "id_value",
    "opening_of",
    "writer_session_of",
]


def id_columns(peer_id: PeerId) -> tuple[int | None, bytes | None]:
    """``(int_id, str_id)`` of a node or peer id."""
    if type(peer_id) is int:
        return peer_id, None
    return None, id_bytes(str(peer_id))


def decode_id(int_id: object, str_id: object) -> PeerId:
    if type(int_id) is int and str_id is None:
        return int_id
    if int_id is None and isinstance(str_id, bytes | bytearray | memoryview):
        try:
            return id_from_bytes(bytes(str_id))
        except InvalidPeerId as e:
            raise StoreCorrupt(f"a stored peer id is not valid: {e}") from None
    raise StoreCorrupt(f"a peer id is stored as neither int nor str: {int_id!r}")


def encode_hint(peer_id: PeerId) -> str:
    """A peer id as a notification payload: ``i<decimal>`` or ``s<hex>``."""
    if type(peer_id) is int:
        return f"i{peer_id}"
    return "s" + id_bytes(str(peer_id)).hex()


def decode_hint(payload: str) -> PeerId | None:
    try:
        if payload[:1] == "i":
            value = int(payload[1:])
            return value if 0 <= value <= MAX_INT_ID else None
        if payload[:1] == "s":
            return id_from_bytes(bytes.fromhex(payload[1:]))
    except ValueError:
        pass
    return None


id_value = stored_id
"""The ``int_id`` or ``str_id`` value of an id (see :func:`by_id`)."""


def by_id(template: str) -> dict[bool, bytes]:
    """
    ``template`` with ``{id}`` as the condition on an id: per "is the id an
    ``int``", ``int_id = %s`` or ``str_id = %s`` (both indexed).
    """
    return {
        True: template.replace("{id}", "int_id = %s").encode(),
        False: template.replace("{id}", "str_id = %s").encode(),
    }


def opening_of(opened_at: str) -> str:
    """
    SQL: the opening a liveness row's ``opened_at`` (an SQL expression)
    stands for, as writer sessions carry it in their names: the
    microseconds since the epoch in 14 hex digits (until the year 4253).
    """
    return f"lpad(to_hex((extract(epoch FROM {opened_at}) * 1000000)::bigint), 14, '0')"


def writer_session_of(opened_at: str, name: str) -> str:
    """
    SQL: the ``application_name`` of the writer sessions of gateway
    ``name`` in the opening ``opened_at`` (both SQL expressions); see
    :func:`ilm.backends._pg_connections.session_name`.
    """
    return f"left('ilm writer ' || {opening_of(opened_at)} || ' ' || {name}, 63)"


def any_writer_session_of(application_name: str, name: str) -> str:
    """
    SQL: whether ``application_name`` names a writer session of gateway
    ``name`` (both SQL expressions) in any opening, whether the current one
    or not: ``ilm writer``, an opening, and the gateway name (its first 37
    characters, what 63 leave).
    """
    return (
        f"{application_name} ~ '^ilm writer [0-9a-f]{{14}} ' "
        f"AND substr({application_name}, 27) = left({name}, 37)"
    )


class Statements:
    """The statements, with the schema name written in."""

    def __init__(self, s: str) -> None:
        self.insert_node = (
            f"INSERT INTO {s}.node (int_id, str_id, incarnation) VALUES (%s, %s, %s) "
            f"ON CONFLICT DO NOTHING"
        ).encode()
        self.select_node = by_id(
            f"SELECT node_key, incarnation FROM {s}.node WHERE {{id}}"
        )
        self.insert_peer = (
            f"INSERT INTO {s}.peer (node_key, int_id, str_id) VALUES (%s, %s, %s) "
            f"ON CONFLICT DO NOTHING RETURNING peer_key"
        ).encode()
        self.select_peer = by_id(
            f"SELECT peer_key FROM {s}.peer WHERE node_key = %s AND {{id}}"
        )
        self.insert_stream_rows = [
            (
                f"INSERT INTO {s}.lease (node_key, peer_key, owner, epoch, expires_at) "
                f"VALUES (%s, %s, NULL, 0, '-infinity') ON CONFLICT DO NOTHING"
            ).encode(),
            (
                f"INSERT INTO {s}.outbound (node_key, peer_key, recorded, acked, "
                f"last_position, pending_bytes) VALUES (%s, %s, false, 0, 0, 0) "
                f"ON CONFLICT DO NOTHING"
            ).encode(),
        ]
        self.lock_leases = (
            f"SELECT peer_key, epoch, owner FROM {s}.lease "
            f"WHERE node_key = %s AND peer_key = ANY(%s::bigint[]) "
            f"ORDER BY peer_key FOR SHARE"
        ).encode()
        self.append = (
            f"WITH grown AS (UPDATE {s}.outbound SET recorded = true, "
            f"last_position = last_position + %(count)s, "
            f"pending_bytes = pending_bytes + %(bytes)s "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s "
            f"RETURNING last_position - %(count)s AS base), "
            f"stored AS (INSERT INTO {s}.outbox "
            f"(node_key, peer_key, position, contents) "
            f"SELECT %(n)s, %(k)s, grown.base + t.o, t.c FROM grown, "
            f"unnest(%(contents)b::bytea[]) WITH ORDINALITY AS t(c, o)), "
            f"hint AS (SELECT pg_notify(%(channel)s, %(hint)s) FROM {s}.lease "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s AND owner IS NOT NULL "
            f"AND owner <> %(gateway)s AND expires_at > now()) "
            f"SELECT base, (SELECT count(*) FROM hint) FROM grown"
        ).encode()
        """
        Appends a run of messages to a peer's outbox where it ends: the
        ``UPDATE`` locks the stream's row (so appends from every gateway
        queue up), moves its end and returns where it was, which the
        ``INSERT`` uses; one statement, whatever the number of messages.
        If another gateway owns the stream, it is notified (at commit).
        """
        self.acknowledge = (
            f"WITH prev AS (SELECT acked, last_position FROM {s}.outbound "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s FOR UPDATE), "
            f"freed AS (DELETE FROM {s}.outbox b USING prev "
            f"WHERE b.node_key = %(n)s AND b.peer_key = %(k)s "
            f"AND b.position > prev.acked AND b.position <= %(new)s "
            f"RETURNING octet_length(b.contents) AS size), "
            f"total AS (SELECT coalesce(sum(size), 0)::bigint AS bytes FROM freed), "
            f"saved AS (UPDATE {s}.outbound o SET recorded = true, "
            f"acked = greatest(o.acked, %(new)s), "
            f"pending_bytes = o.pending_bytes - total.bytes FROM total "
            f"WHERE o.node_key = %(n)s AND o.peer_key = %(k)s "
            f"AND (NOT o.recorded OR o.acked < %(new)s)) "
            f"SELECT prev.acked, prev.last_position, total.bytes FROM prev, total"
        ).encode()
        """
        Records an acknowledgement: deletes the messages it covers (from the
        old acknowledged point on, so the scan skips what earlier deletions
        left for vacuum) and returns the stream's previous ``acked`` and
        ``last_position`` (to check the acknowledgement against) and the
        bytes freed.
        """
        self.mark = (
            f"INSERT INTO {s}.inbound AS i (node_key, peer_key, incarnation, "
            f"delivered, retired) VALUES (%s, %s, %s, %s, false) "
            f"ON CONFLICT (node_key, peer_key, incarnation) DO UPDATE "
            f"SET delivered = excluded.delivered WHERE i.delivered < excluded.delivered"
        ).encode()
        self.retire = (
            f"INSERT INTO {s}.inbound AS i (node_key, peer_key, incarnation, "
            f"delivered, retired, retired_seq) "
            f"VALUES (%s, %s, %s, 0, true, nextval('{s}.retirement')) "
            f"ON CONFLICT (node_key, peer_key, incarnation) DO UPDATE "
            f"SET retired = true, retired_seq = excluded.retired_seq "
            f"WHERE NOT i.retired"
        ).encode()
        """Retires an incarnation; ``retired_seq`` keeps the order."""
        self.forget = (
            f"DELETE FROM {s}.inbound "
            f"WHERE node_key = %s AND peer_key = %s AND incarnation = %s"
        ).encode()
        self.lock_lease = (
            f"SELECT owner, epoch, "
            f"CASE WHEN expires_at > now() "
            f"THEN extract(epoch FROM expires_at - now())::float8 ELSE 0.0 END "
            f"FROM {s}.lease WHERE node_key = %s AND peer_key = %s FOR UPDATE"
        ).encode()
        self.end_expired_holders = (
            f"SELECT a.pid, a.application_name, l.owner, "
            f"pg_terminate_backend(a.pid) FROM {s}.lease l "
            f"JOIN pg_stat_activity a ON a.datname = current_database() "
            f"AND {any_writer_session_of('a.application_name', 'l.owner')} "
            f"WHERE l.node_key = %s AND l.peer_key = %s AND l.owner IS NOT NULL "
            f"AND a.application_name <> %s AND l.expires_at <= now() "
            f"AND a.pid <> pg_backend_pid() AND a.backend_xid IS NOT NULL "
            f"AND (a.backend_xid = l.xmax OR NOT EXISTS (SELECT 1 FROM "
            f"pg_stat_activity x WHERE x.backend_xid = l.xmax))"
        ).encode()
        """
        Ends the sessions of a gateway whose lease on a stream has expired
        (by the database's clock) and that hold the stream's lease row
        locked inside a transaction: a writer connection of that gateway
        name in any opening (by its ``application_name``) but the caller's
        own (whose ``application_name`` is given) with a transaction id,
        the one whose transaction locked the row when the row names a live
        one (else, several holders sharing the lock, any such writer of
        that gateway).  Returns the sessions signalled.
        """
        self.register_gateway = (
            f"WITH prev AS (SELECT opened_at, expires_at > now() AS live "
            f"FROM {s}.gateway WHERE node_key = %(n)s AND name = %(name)s) "
            f"INSERT INTO {s}.gateway AS g (node_key, name, expires_at, opened_at) "
            f"VALUES (%(n)s, %(name)s, now() + make_interval(secs => %(secs)s), "
            f"clock_timestamp()) "
            f"ON CONFLICT (node_key, name) DO UPDATE "
            f"SET expires_at = excluded.expires_at, opened_at = "
            f"greatest(excluded.opened_at, g.opened_at + interval '1 microsecond') "
            f"RETURNING g.opened_at, {opening_of('g.opened_at')}, "
            f"(SELECT opened_at FROM prev), (SELECT live FROM prev)"
        ).encode()
        """
        Records a gateway live for the given seconds, in a new opening:
        ``opened_at`` is now, and always later than the previous opening of
        that name (the row locked, it is at least a microsecond past the
        previous one), so each opening of a (node, gateway name) has its
        own.  Returns it, as a datetime and as its opening
        (:func:`opening_of`), and the previous row's ``opened_at`` and
        whether it was live (``NULL``: no previous row).
        """
        self.refresh_gateway = (
            f"INSERT INTO {s}.gateway AS g (node_key, name, expires_at, opened_at) "
            f"VALUES (%(n)s, %(name)s, now() + make_interval(secs => %(secs)s), "
            f"%(opened)s) ON CONFLICT (node_key, name) DO UPDATE "
            f"SET expires_at = excluded.expires_at "
            f"WHERE g.opened_at = excluded.opened_at RETURNING true"
        ).encode()
        """
        Records a gateway live for the given seconds more, if the row is
        still its opening's (``opened``); no row returned: another process
        has opened the store under that name since.
        """
        self.gateway_row = (
            f"SELECT opened_at, expires_at > now() FROM {s}.gateway "
            f"WHERE node_key = %s AND name = %s"
        ).encode()
        self.expire_gateway = (
            f"UPDATE {s}.gateway SET expires_at = now() "
            f"WHERE node_key = %s AND name = %s AND opened_at = %s "
            f"AND expires_at > now()"
        ).encode()
        """A gateway closing: its opening's liveness ends now (not a later one's)."""
        self.end_stopped_blockers = (
            f"SELECT a.pid, min(g.name), pg_terminate_backend(a.pid) "
            f"FROM unnest(pg_blocking_pids(%(pid)s)) AS b(pid) "
            f"JOIN pg_stat_activity a ON a.pid = b.pid "
            f"JOIN {s}.gateway g ON g.node_key = %(n)s "
            f"AND {any_writer_session_of('a.application_name', 'g.name')} "
            f"WHERE a.application_name <> %(me)s AND a.backend_xid IS NOT NULL "
            f"AND a.pid <> pg_backend_pid() "
            f"AND NOT EXISTS (SELECT 1 FROM {s}.gateway l "
            f"WHERE l.node_key = %(n)s AND l.expires_at > now() "
            f"AND {writer_session_of('l.opened_at', 'l.name')} = a.application_name) "
            f"GROUP BY a.pid"
        ).encode()
        """
        Ends the sessions that block the session ``pid`` (this gateway's
        writer) and are, by their ``application_name``, the writer session
        of a gateway of this node in an opening that is not live: not its
        name's current opening (another process opened the store under
        that name since), or one whose liveness row has expired (by the
        database's clock); inside a write transaction.  The writer sessions
        of a live opening, and those named ``me`` (this gateway's own), are
        left alone.  Returns the sessions signalled.
        """
        self.take = (
            f"UPDATE {s}.lease SET owner = %s, epoch = epoch + 1, "
            f"expires_at = now() + make_interval(secs => %s), acquired_at = now() "
            f"WHERE node_key = %s AND peer_key = %s RETURNING epoch"
        ).encode()
        self.stream_outbound = (
            f"SELECT recorded, acked, last_position, pending_bytes FROM {s}.outbound "
            f"WHERE node_key = %s AND peer_key = %s"
        ).encode()
        self.stream_inbound = (
            f"SELECT incarnation, delivered, retired FROM {s}.inbound "
            f"WHERE node_key = %s AND peer_key = %s "
            f"ORDER BY retired DESC, retired_seq, incarnation"
        ).encode()
        self.renew = (
            f"UPDATE {s}.lease l SET expires_at = now() + make_interval(secs => %s) "
            f"FROM unnest(%s::bigint[], %s::bigint[]) AS h(k, e) "
            f"WHERE l.node_key = %s AND l.peer_key = h.k AND l.epoch = h.e "
            f"AND l.owner = %s RETURNING l.peer_key"
        ).encode()
        self.release = (
            f"UPDATE {s}.lease l SET owner = NULL, expires_at = now() "
            f"FROM unnest(%s::bigint[], %s::bigint[]) AS h(k, e) "
            f"WHERE l.node_key = %s AND l.peer_key = h.k AND l.epoch = h.e "
            f"AND l.owner = %s RETURNING l.peer_key"
        ).encode()
        self.claimable = (
            f"SELECT p.int_id, p.str_id FROM {s}.lease l "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"JOIN {s}.peer p USING (node_key, peer_key) "
            f"WHERE l.node_key = %s AND (l.owner IS NULL OR l.expires_at <= now()) "
            f"AND (o.last_position > o.acked OR p.int_id = ANY(%s::bigint[]) "
            f"OR p.str_id = ANY(%s::bytea[])) ORDER BY l.peer_key LIMIT %s"
        ).encode()
        """
        The streams with no live lease that have messages waiting, or are
        among the given peers (by ``int_id`` and by ``str_id``).
        """
        self.load_peers = (
            f"SELECT peer_key, int_id, str_id FROM {s}.peer WHERE node_key = %s"
        ).encode()
        self.load_outbound = (
            f"SELECT o.peer_key, o.acked, o.last_position, o.pending_bytes, "
            f"(SELECT position FROM {s}.outbox b WHERE b.node_key = o.node_key "
            f"AND b.peer_key = o.peer_key AND b.position > o.acked "
            f"ORDER BY position LIMIT 1), "
            f"(SELECT position FROM {s}.outbox b WHERE b.node_key = o.node_key "
            f"AND b.peer_key = o.peer_key ORDER BY position DESC LIMIT 1) "
            f"FROM {s}.outbound o WHERE o.node_key = %s AND o.recorded "
            f"ORDER BY o.peer_key"
        ).encode()
        self.load_inbound = (
            f"SELECT peer_key, incarnation, delivered, retired FROM {s}.inbound "
            f"WHERE node_key = %s "
            f"ORDER BY peer_key, retired DESC, retired_seq, incarnation"
        ).encode()
        self.read_acked = by_id(
            f"SELECT o.peer_key, o.acked FROM {s}.peer p "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"WHERE p.node_key = %s AND p.{{id}} AND o.recorded"
        )
        self.read_outbox = (
            f"SELECT position, contents FROM {s}.outbox WHERE node_key = %s "
            f"AND peer_key = %s AND position > %s ORDER BY position LIMIT %s"
        ).encode()
        self.read_outbox_bytes = (
            f"SELECT position, contents FROM ("
            f"SELECT position, contents, row_number() OVER w AS n, "
            f"sum(octet_length(contents)) OVER w AS total FROM {s}.outbox "
            f"WHERE node_key = %s AND peer_key = %s AND position > %s "
            f"WINDOW w AS (ORDER BY position ROWS UNBOUNDED PRECEDING) "
            f"ORDER BY position LIMIT %s) r "
            f"WHERE n = 1 OR total <= %s ORDER BY position"
        ).encode()
        self.nodes = (
            f"SELECT node_key, int_id, str_id, incarnation FROM {s}.node "
            f"ORDER BY node_key"
        ).encode()
        self.inspect_outbound = (
            f"SELECT o.peer_key, o.acked, o.last_position, o.pending_bytes, "
            f"(SELECT extract(epoch FROM b.stored_at)::float8 FROM {s}.outbox b "
            f"WHERE b.node_key = o.node_key AND b.peer_key = o.peer_key "
            f"AND b.position > o.acked ORDER BY position LIMIT 1) "
            f"FROM {s}.outbound o WHERE o.node_key = %s AND o.recorded "
            f"ORDER BY o.peer_key"
        ).encode()
        """Each recorded stream, with when its oldest pending message was stored."""
        self.inspect_leases = (
            f"SELECT peer_key, owner, epoch, "
            f"CASE WHEN isfinite(expires_at) "
            f"THEN extract(epoch FROM expires_at)::float8 END, "
            f"owner IS NOT NULL AND expires_at > now() "
            f"FROM {s}.lease WHERE node_key = %s ORDER BY peer_key"
        ).encode()
        self.inspect_gateways = (
            f"SELECT name, extract(epoch FROM opened_at)::float8, "
            f"extract(epoch FROM expires_at)::float8, expires_at > now() "
            f"FROM {s}.gateway WHERE node_key = %s ORDER BY name"
        ).encode()
        """Each gateway's liveness row (schema version 2 on)."""
        self.outbound_of = by_id(
            f"SELECT o.acked, o.last_position, o.pending_bytes FROM {s}.peer p "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"WHERE p.node_key = %s AND p.{{id}} AND o.recorded"
        )
