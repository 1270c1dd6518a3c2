"""
The stream network's one logger: every piece of the stream network
(protocol, dialler, refusal log, facade) logs through it, so that an
observer of ``ilm.network.stream`` (the simulator, an operator's filter)
hears all of them.  :func:`internal_error` is the one event for a bug
caught where it would otherwise reach the reactor.
"""

from __future__ import annotations

from twisted.logger import Logger

__all__ = ["internal_error", "log"]

log = Logger(namespace="ilm.network.stream")


def internal_error(doing: str) -> None:
    """
    Log the exception being handled as an internal error of the stream
    network, caught while ``doing`` (``"releasing a held connection"``).
    """
    log.failure("internal error while {doing}", doing=doing, ilm_event="internal_error")
