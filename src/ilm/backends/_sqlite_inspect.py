"""
Reading and repairing an SQLite store outside a node: :func:`inspect_store`
(``ilm inspect PATH``: read-only, no lock, so it works on the store of a
running node) and :func:`reincarnate_store` (``ilm reincarnate PATH``).
"""

from __future__ import annotations

import os
import sqlite3
import uuid

import attr

from ilm._store import InboundRecord
from ilm.backends._report import OutboxReport
from ilm.backends._sqlite_file import (
    SQLITE_HEADER,
    LockHolder,
    StoreLock,
    check_file,
    check_untouched,
    lock_holder,
)
from ilm.backends._sqlite_schema import load, log, schema_version, store_error
from ilm.errors import StoreCorrupt, StoreError

__all__ = ["OutboxReport", "StoreReport", "inspect_store", "reincarnate_store"]


def _connected(path: str, uri: str | None = None) -> sqlite3.Connection:
    """A connection to the store at ``path``, or through ``uri`` if given."""
    try:
        return sqlite3.connect(
            path if uri is None else uri,
            uri=uri is not None,
            isolation_level=None,
            timeout=10.0,
        )
    except sqlite3.Error as e:
        raise store_error(e, path, "cannot open") from e


def _ilm_version(conn: sqlite3.Connection, path: str) -> int:
    """The schema version of an ILM store; an empty database is refused."""
    version = schema_version(conn, path)
    if version == 0:
        raise StoreError(f"{path} is an empty database, not yet an ILM store")
    return version


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StoreReport:
    """
    A read-only snapshot of a store, for ``ilm inspect``.
    """

    path: str
    schema_version: int
    incarnation: str
    outbound: tuple[OutboxReport, ...]
    inbound: tuple[InboundRecord, ...]
    holder: LockHolder = attr.ib(factory=lambda: LockHolder(None))


def inspect_store(path: str | os.PathLike[str]) -> StoreReport:
    """
    Read a store without locking it or changing it (it may belong to a
    running node): one consistent snapshot, every value checked as when a
    node opens it, and whether a live process holds it.

    :raises StoreError: no store at ``path``;
        :class:`ilm.errors.StoreCorrupt`: not an ILM store, objects ILM did
        not create, a bad row;
        :class:`ilm.errors.StoreSchemaTooNew`: written by a newer ILM.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise StoreError(f"no ILM store at {path}")
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise StoreCorrupt(f"{path} is not an SQLite database, not an ILM store")
    holder = lock_holder(path)
    if not holder.held:
        # Nobody writes it: check the main file alone first, so that a
        # foreign database is not touched (a read-only connection to a WAL
        # database may create its -shm file).
        check_untouched(path)
    from urllib.parse import quote

    conn = _connected(path, "file:" + quote(os.path.abspath(path)) + "?mode=ro")
    try:
        conn.execute("BEGIN")
        version = _ilm_version(conn, path)
        loaded = load(conn, path, oldest=True, version=version)
        conn.execute("COMMIT")
    except BaseException as e:
        raise store_error(e, path, "cannot inspect") from e
    finally:
        conn.close()
    outbound = []
    for record in loaded.state.outbound:
        stamp = loaded.oldest.get(loaded.keys[record.peer_id])
        outbound.append(
            OutboxReport(
                record.peer_id,
                record.acked,
                record.last_position,
                record.pending_bytes,
                None if stamp is None else stamp / 1000,
            )
        )
    return StoreReport(
        path,
        version,
        loaded.state.incarnation,
        tuple(outbound),
        loaded.state.inbound,
        holder,
    )


def reincarnate_store(path: str | os.PathLike[str]) -> tuple[str, str]:
    """
    Give the store at ``path`` a new incarnation, as a store restored from a
    backup needs (docs/durability.md): peers then take its outbox for a new
    stream instead of positions they have already delivered.  Takes the
    store's lock (so it refuses a store a live process holds, with
    :class:`ilm.errors.StoreLocked`), checks the store as opening does, and
    commits the change durably.

    :return: ``(old incarnation, new incarnation)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise StoreError(f"no ILM store at {path}")
    if not check_file(path):
        raise StoreError(f"no ILM store at {path}")
    check_untouched(path)
    lock = StoreLock(path)
    lock.acquire()
    try:
        conn = _connected(path)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            version = _ilm_version(conn, path)
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = load(conn, path, version=version).state.incarnation
                new = uuid.uuid4().hex
                conn.execute(
                    "UPDATE ilm_meta SET value = ? WHERE key = 'incarnation'", (new,)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException as e:
            raise store_error(e, path, "cannot reincarnate") from e
        finally:
            conn.close()
    finally:
        lock.release()
    log.warn(
        "store {path} reincarnated: incarnation {old} replaced by {new}",
        path=path,
        old=old,
        new=new,
        ilm_event="store_reincarnated",
    )
    return old, new
