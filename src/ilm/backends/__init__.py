"""
Backends: where an ILM node keeps what must survive a crash.
"""

from ilm.backends._memory import InMemoryBackend, InMemoryStorage

__all__ = ["InMemoryBackend", "InMemoryStorage"]
