"""
The stream network's one logger: every piece of the stream network
(protocol, dialler, refusal log, facade) logs through it, so that an
observer of ``ilm.network.stream`` (the simulator, an operator's filter)
hears all of them.
"""

from __future__ import annotations

from twisted.logger import Logger

__all__ = ["log"]

log = Logger(namespace="ilm.network.stream")
