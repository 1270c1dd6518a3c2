"""
The SQLite store's file: the checks made before SQLite touches it (an
existing file must be an ILM store holding only what ILM created), its
creation (private to its owner), and its lock: an exclusive ``flock`` on
``PATH-lock``, one process per store, which the kernel releases when the
process dies; :func:`lock_holder` tells who holds it without taking it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3

import attr

from ilm.backends._sqlite_schema import schema_version, store_error
from ilm.errors import StoreCorrupt, StoreError, StoreLocked, StoreReadOnly

__all__ = [
    "LockHolder",
    "StoreLock",
    "check_directory",
    "check_file",
    "check_untouched",
    "connect",
    "create_private",
    "lock_holder",
    "sync_directory",
]

SQLITE_HEADER = b"SQLite format 3\x00"


def connect(path: str, cached_statements: int = 64) -> sqlite3.Connection:
    """A connection to the store at ``path`` for a store thread (autocommit)."""
    return sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=10.0,
        cached_statements=cached_statements,
    )


class StoreLock:
    """
    An exclusive ``flock`` on ``PATH-lock``: one process (and one backend)
    per store.  The kernel drops it when the process dies.
    """

    def __init__(self, store_path: str) -> None:
        self.path = store_path + "-lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise store_error(e, self.path, "cannot create the lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = b""
            try:
                holder = os.pread(fd, 32, 0).strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" by process {holder.decode()}" if holder.isdigit() else ""
                raise StoreLocked(
                    f"{self.path.removesuffix('-lock')} is already open (locked"
                    f"{who}); a store takes one process and one backend at a time"
                ) from e
            raise store_error(e, self.path, "cannot lock") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except OSError:
            pass  # only informative
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def check_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"cannot open {path}: directory {directory} does not exist")


def check_file(path: str) -> bool:
    """
    Check that ``path`` can be an ILM store before SQLite touches it.

    :return: whether the file exists (with content).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except IsADirectoryError:
        raise StoreCorrupt(f"{path} is a directory, not an ILM store")
    except OSError as e:
        raise store_error(e, path, "cannot read") from e
    if header and header != SQLITE_HEADER:
        raise StoreCorrupt(f"{path} is not an SQLite database (so not an ILM store)")
    if not os.access(directory, os.W_OK):
        raise StoreReadOnly(
            f"cannot open {path}: its directory {directory} is not writable "
            f"(SQLite needs to create its -wal and -shm files there)"
        )
    if header is not None and not os.access(path, os.W_OK):
        raise StoreReadOnly(f"cannot open {path}: the file is read-only")
    return bool(header)


def check_untouched(path: str) -> None:
    """
    Check the existing database at ``path`` without changing anything: read
    its main file alone (``immutable``: no lock, no journal, no WAL or
    shared-memory file is created or read) and refuse it if it is not an
    ILM store, holds objects ILM did not create, or is newer than this ILM.

    What only a write-ahead log holds (the last commits of a node that
    crashed) is not seen here, and the main file alone may not even read
    (a checkpoint that was interrupted): only what the main file shows
    for sure refuses the store here; anything else is left to
    :func:`ilm.backends._sqlite_schema.migrate`, which checks again under
    the lock, before writing.
    """
    from urllib.parse import quote

    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        schema_version(conn, path, complete=False)
    except sqlite3.Error:
        return
    finally:
        conn.close()


def create_private(path: str) -> None:
    """
    Create the (empty) database file readable and writable by its owner
    only; SQLite gives its ``-wal`` and ``-shm`` files the same mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise store_error(e, path, "cannot create") from e
    os.close(fd)


def sync_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LockHolder:
    """
    Whether a live process holds a store (its ``PATH-lock``): ``held`` is
    ``None`` when that cannot be told; ``pid`` is the holder's process id
    when known.
    """

    held: bool | None
    pid: int | None = None


def lock_holder(path: str | os.PathLike[str]) -> LockHolder:
    """
    Tell whether a live process holds the store at ``path``, without taking
    or disturbing its lock (a node may be starting at that moment): on
    Linux from ``/proc/locks``, which names the holding process.  Elsewhere
    the lock is tried, shared and released at once (a node that starts in
    that instant would find the store locked and fail).
    """
    lock = os.fspath(path) + "-lock"
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return LockHolder(False)
    except OSError:
        return LockHolder(None)
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return _probe_lock(lock)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            where = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if where == wanted:
            return LockHolder(True, pid)
    return LockHolder(False)


def _probe_lock(lock: str) -> LockHolder:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return LockHolder(None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return LockHolder(None)
            holder = os.pread(fd, 32, 0).strip()
            return LockHolder(True, int(holder) if holder.isdigit() else None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockHolder(False)
    finally:
        os.close(fd)
