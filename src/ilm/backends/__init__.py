"""
Backends: where an ILM node keeps what must survive a crash.

- :class:`SQLiteBackend`: one SQLite file; durable; the default.
- :class:`InMemoryBackend` over an :class:`InMemoryStorage`: for tests and
  simulations ("durable" for as long as the storage object lives).
"""

from ilm.backends._memory import InMemoryBackend, InMemoryStorage
from ilm.backends._sqlite import SQLiteBackend

__all__ = ["InMemoryBackend", "InMemoryStorage", "SQLiteBackend"]
