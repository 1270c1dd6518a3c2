"""
Stream ownership in the PostgreSQL store: the leases this gateway holds
(owner, epoch, expiry in database time), taking, renewing and releasing
them, and the local deadlines :meth:`holds` answers from.  Writes run on
the writer thread; the held leases are replaced whole, so the reactor
thread reads them without a lock.  See
:class:`ilm.backends.IStreamOwnership`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attr
from twisted.logger import Logger

from ilm._peerid import PeerId
from ilm._store import InboundRecord, OutboundRecord
from ilm.backends._ownership import LeaseHeld, Renewal, StreamTaken
from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_schema import _Conn
from ilm.errors import StoreCorrupt, StoreError, StoreLocked

__all__ = ["PostgresLeases"]

log = Logger(namespace="ilm.backends.postgres")


@attr.s(slots=True, auto_attribs=True)
class _Held:
    """A lease this backend holds, with its local delivery window."""

    epoch: int
    valid_until: float
    deliver_from: float = 0.0


class PostgresLeases:
    """
    The stream leases one gateway holds in a node's PostgreSQL store.

    :param gateway: the owner name written into the leases it takes.
    :param lease_duration: seconds a lease lasts without renewal.
    :param monotonic: the local clock of lease deadlines.
    """

    def __init__(
        self,
        node: PostgresNode,
        connections: PostgresConnections,
        *,
        gateway: str,
        lease_duration: float,
        monotonic: Callable[[], float],
    ) -> None:
        self.node = node
        self.connections = connections
        self.gateway = gateway
        self.lease_duration = lease_duration
        self._monotonic = monotonic
        # Written by the writer thread only, replaced whole (read by others).
        self._held: dict[PeerId, _Held] = {}

    def holds(self, peer_id: PeerId) -> bool:
        """
        Whether this backend holds ``peer_id``'s stream within its local
        deadline; see :meth:`ilm.backends.IStreamOwnership.holds`.
        """
        held = self._held.get(peer_id)
        if held is None:
            return False
        return held.deliver_from <= self._monotonic() < held.valid_until

    def delivery_window(self, peer_id: PeerId) -> tuple[float, float] | None:
        """
        When this backend may deliver for ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.delivery_window`.
        """
        held = self._held.get(peer_id)
        return None if held is None else (held.deliver_from, held.valid_until)

    def owned(self) -> frozenset[PeerId]:
        """
        The streams this backend holds; see
        :meth:`ilm.backends.IStreamOwnership.owned`.
        """
        return frozenset(self._held)

    def epoch(self, peer_id: PeerId) -> int:
        """
        :return: the epoch this backend's writes for ``peer_id`` carry: its
            grant's, or 0 for a stream it does not hold.
        """
        held = self._held.get(peer_id)
        return 0 if held is None else held.epoch

    def drop(self, streams: Iterable[PeerId]) -> None:
        held = dict(self._held)
        for peer_id in streams:
            held.pop(peer_id, None)
        self._held = held

    def acquire(self, peer_id: PeerId, take_over: bool) -> StreamTaken:
        key = self.node.ensure_keys([peer_id])[peer_id]
        sql = self.node.sql
        node = self.node.key
        mine = self._held.get(peer_id)
        started = [0.0]

        def body(conn: _Conn) -> StreamTaken:
            started[0] = self._monotonic()
            with conn.pipeline():
                self.connections.begin(conn)
                conn.execute(wait_for_lease)
                row = conn.execute(sql.lock_lease, (node, key)).fetchone()
            if row is None:
                raise StoreCorrupt(f"the lease row of {peer_id!r} is missing")
            owner, epoch, remaining = row
            live = owner is not None and remaining > 0
            ours = mine is not None and owner == self.gateway and epoch == mine.epoch
            if live and not ours and not take_over:
                raise LeaseHeld(peer_id, owner, epoch, remaining)
            with conn.pipeline():
                taken = conn.execute(
                    sql.take, (self.gateway, self.lease_duration, node, key)
                )
                out = conn.execute(sql.stream_outbound, (node, key))
                marks = conn.execute(sql.stream_inbound, (node, key))
                (new_epoch,) = taken.fetchone() or (None,)
                out_row = out.fetchone()
                mark_rows = marks.fetchall()
            outbound = None
            if out_row is not None and out_row[0]:
                outbound = OutboundRecord(peer_id, *out_row[1:])
            return StreamTaken(
                peer_id=peer_id,
                epoch=int(new_epoch),
                previous_owner=owner,
                previous_epoch=epoch,
                deliver_after=float(remaining) if live and not ours else 0.0,
                valid_until=started[0] + self.lease_duration,
                outbound=outbound,
                inbound=tuple(
                    InboundRecord(peer_id, incarnation, delivered, retired)
                    for incarnation, delivered, retired in mark_rows
                ),
            )

        def doubt(error: StoreError) -> StoreError:
            return StoreError(f"{error}: whether the stream was taken is unknown")

        # The lease row's lock is held for milliseconds by a live owner's
        # commit.  Waiting past the idle-in-transaction timeout (half a
        # lease) means its holder is stuck where no server timeout ends it
        # (stopped in the middle of a pipeline).
        wait = min(self.connections.lock_timeout, 0.6 * self.lease_duration)
        wait_for_lease = (
            f"SELECT set_config('lock_timeout', '{int(wait * 1000):d}', true)"
        ).encode()
        try:
            for attempt in range(3):
                try:
                    taken = self.connections.interaction(
                        "cannot take a stream in", body, in_doubt=doubt
                    )
                    break
                except StoreLocked:
                    if attempt == 2 or not self._end_expired_holders(peer_id, key):
                        raise
        except StoreError:
            self.drop([peer_id])
            raise
        # Measured after the answer arrived, so never before the previous
        # lease's expiry (which was ``deliver_after`` after the grant began).
        deliver_from = self._monotonic() + taken.deliver_after
        held = _Held(taken.epoch, taken.valid_until, deliver_from)
        self._held = {**self._held, peer_id: held}
        return taken

    def _end_expired_holders(self, peer_id: PeerId, key: int) -> bool:
        """
        Taking ``peer_id``'s stream waited too long for its lease row: if
        the gateway holding the row locked is one whose lease has expired
        (by the database's clock), end its sessions that hold it, so that
        the take-over can go on.

        A gateway stopped in the middle of a transaction (SIGSTOP, a paused
        VM, between two writes of a pipeline) holds its row locks for as
        long as it stays stopped: the server's idle-in-transaction timeout
        covers only a session waiting after a complete request, not one
        waiting for the rest of a pipeline.  Ending its session is safe:
        nothing of its transaction was committed, so nothing it
        acknowledged is lost; if it resumes, its ``COMMIT`` fails
        (``StoreInDoubt``) and it reopens, reading the truth.  Only the
        writer sessions of the expired owner's name (by their
        ``application_name``, in any opening of that name but this
        gateway's own: a stopped earlier process of this gateway's name
        too) inside a transaction are ended.

        :return: whether any session was ended (then try again).
        """
        sql = self.node.sql
        conn = self.connections.writer_conn()
        try:
            rows = conn.execute(
                sql.end_expired_holders,
                (self.node.key, key, self.connections.session_name("writer")),
            ).fetchall()
        except Exception as e:
            log.warn(
                "could not look for the stopped holder of the lease of "
                "{peer_id!r} in {where}: {error}",
                peer_id=peer_id,
                where=self.connections.where,
                error=str(e),
                ilm_event="lease_holder_check_failed",
            )
            return False
        ended = [(pid, owner) for pid, _, owner, signalled in rows if signalled]
        if ended:
            log.warn(
                "ended {count} session(s) of gateway {owner!r} (pids {pids}) "
                "holding the lease row of {peer_id!r} locked after its lease "
                "expired (a gateway stopped in a transaction); taking the "
                "stream again",
                count=len(ended),
                owner=ended[0][1],
                pids=[pid for pid, _ in ended],
                peer_id=peer_id,
                ilm_event="stopped_holder_ended",
            )
        return bool(ended)

    def renew(self) -> Renewal:
        held = self._held
        started = self._monotonic()
        if not held:
            return Renewal(frozenset(), frozenset(), started + self.lease_duration)
        keys = self.node.keys
        by_key = {keys[p]: p for p in held}
        peer_keys = sorted(by_key)
        epochs = [held[by_key[k]].epoch for k in peer_keys]
        sql = self.node.sql

        def body(conn: _Conn) -> set[int]:
            nonlocal started
            started = self._monotonic()
            with conn.pipeline():
                self.connections.begin(conn)
                cursor = conn.execute(
                    sql.renew,
                    (
                        self.lease_duration,
                        peer_keys,
                        epochs,
                        self.node.key,
                        self.gateway,
                    ),
                )
                return {k for (k,) in cursor.fetchall()}

        renewed_keys = self.connections.interaction("cannot renew leases in", body)
        valid_until = started + self.lease_duration
        now = dict(self._held)
        renewed, lost = set(), set()
        for key, peer_id in by_key.items():
            if key in renewed_keys:
                mine = now.get(peer_id)
                if mine is not None and mine.epoch == held[peer_id].epoch:
                    now[peer_id] = _Held(mine.epoch, valid_until, mine.deliver_from)
                renewed.add(peer_id)
            else:
                now.pop(peer_id, None)
                lost.add(peer_id)
        self._held = now
        return Renewal(frozenset(renewed), frozenset(lost), valid_until)

    def release(self, peer_ids: Sequence[PeerId]) -> bool:
        held = self._held
        mine = [p for p in peer_ids if p in held]
        self.drop(peer_ids)
        if not mine:
            return False
        keys = self.node.keys
        pairs = sorted((keys[p], held[p].epoch) for p in mine)
        sql = self.node.sql

        def body(conn: _Conn) -> int:
            with conn.pipeline():
                self.connections.begin(conn)
                cursor = conn.execute(
                    sql.release,
                    (
                        [k for k, _ in pairs],
                        [e for _, e in pairs],
                        self.node.key,
                        self.gateway,
                    ),
                )
                return len(cursor.fetchall())

        return self.connections.interaction("cannot release leases in", body) > 0

    def close(self, release: bool) -> None:
        """
        The store is closing (on the writer thread): release the leases
        held (``release``; else they run out by themselves) and forget them.
        """
        conn = self.connections.writer
        try:
            if release and self._held and conn is not None and not conn.broken:
                try:
                    self.release(list(self._held))
                except StoreError as e:
                    log.warn(
                        "could not release the leases of {where} on closing "
                        "(they expire by themselves): {error}",
                        where=self.connections.where,
                        error=str(e),
                        ilm_event="lease_release_failed",
                    )
        finally:
            self._held = {}
