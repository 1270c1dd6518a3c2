"""
The logger every piece of a node logs through (namespace ``ilm``), in a
leaf module so that each piece can import it and an observer (the
simulator's) can hear them all by replacing one logger's observer.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["NodeLogging", "log"]

log = Logger(namespace="ilm")


class NodeLogging(Protocol):
    """
    The logging a node's pieces ask of the node around them (the hosts of
    ``PeerSender`` and ``PeerDeliverer`` extend it).
    """

    def limited(
        self,
        key: tuple[object, ...],
        level: LogLevel,
        format: str,
        failure: Failure | None = None,
        **fields: Any,
    ) -> None:
        """Log through the node's event limiter."""

    def unexpected(self, reason: Failure, doing: str) -> None:
        """Log an internal error."""
