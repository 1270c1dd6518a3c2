"""
Backends: where an ILM node keeps what must survive a crash.

- :class:`SQLiteBackend`: one SQLite file; durable; the default.
- :class:`PostgresBackend`: PostgreSQL, shareable by several gateway
  processes of one node, with fenced stream ownership
  (:class:`IStreamOwnership`); needs the ``postgres`` extra (psycopg 3).
- :class:`InMemoryBackend` over an :class:`InMemoryStorage`: for tests and
  simulations ("durable" for as long as the storage object lives).
"""

from ilm.backends._memory import InMemoryBackend, InMemoryStorage
from ilm.backends._ownership import (
    Fenced,
    IStreamOwnership,
    LeaseHeld,
    Renewal,
    SharedCommitResult,
    StreamTaken,
)
from ilm.backends._postgres import PostgresBackend
from ilm.backends._sqlite import SQLiteBackend

__all__ = [
    "Fenced",
    "IStreamOwnership",
    "InMemoryBackend",
    "InMemoryStorage",
    "LeaseHeld",
    "PostgresBackend",
    "Renewal",
    "SQLiteBackend",
    "SharedCommitResult",
    "StreamTaken",
]
