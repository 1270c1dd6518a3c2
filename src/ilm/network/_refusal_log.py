"""
The refusal log: every connection a stream network refuses or closes for a
violation is counted (``NetworkStats.refusals``) and logged, through an
:class:`ilm._logging.EventLimiter` keyed by the event and the source host:
the first in full, then one summary per ``LinkSettings.refusal_log_interval``
(strangers can repeat refusals at will; the log stays bounded).  The other
event a peer can repeat at will, ``link_reading_stopped``, goes through the
same limiter.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import LogLevel

from ilm._logging import EventLimiter
from ilm._peerid import PeerId
from ilm.network._counters import NetworkCounters, refusal_reason
from ilm.network._handshake import shown

__all__ = ["RefusalLog", "RefusedConnection"]


class RefusedConnection(Protocol):
    """What the log says about a refused connection."""

    @property
    def initiated(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def peer_id(self) -> PeerId | None: ...
    @property
    def claimed_id(self) -> PeerId | None: ...


class RefusalLog:
    """
    :param limiter: the network's rate limiter (also used for other
        events a peer can repeat at will).
    :param counters: the network's counters.
    """

    def __init__(self, limiter: EventLimiter, counters: NetworkCounters) -> None:
        self.limiter = limiter
        self._counters = counters

    def refused(
        self, connection: RefusedConnection, violation: BaseException, *, log: bool
    ) -> None:
        """
        ``connection`` is refused (or closed) for ``violation``: count it
        under its event's name, and log it (rate-limited) unless ``log`` is
        false (a dialled connection's failure is reported by its dialler).
        """
        event = refusal_reason(violation)
        self._counters.refused(event)
        if not log:
            return
        self.limiter.emit(
            (event, connection.host),
            LogLevel.error,
            "closing {direction} connection from {address} ({who}): {kind}: {reason}",
            direction="outgoing" if connection.initiated else "incoming",
            address=connection.address,
            host=connection.host,
            who=_who(connection),
            kind=type(violation).__name__,
            reason=str(violation),
            peer_id=connection.peer_id,
            claimed_id=connection.claimed_id,
            ilm_event=event,
        )

    def reading_stopped(
        self, peer_id: PeerId | None, unsent: int, unread: int, timeout: float
    ) -> None:
        """
        A link stopped reading from a peer that does not read (logged
        rate-limited per peer: the peer can repeat it at will).
        """
        self.limiter.emit(
            ("link_reading_stopped", peer_id),
            LogLevel.warn,
            "peer {peer_id!r} is not reading ({unsent} bytes written to it and "
            "{unread} received from it since its link paused): this node stops "
            "reading from it until it reads, for at most {timeout} s",
            peer_id=peer_id,
            unsent=unsent,
            unread=unread,
            timeout=timeout,
            ilm_event="link_reading_stopped",
        )


def _who(connection: RefusedConnection) -> str:
    if connection.peer_id is not None:
        return f"peer {connection.peer_id!r}"
    claimed = connection.claimed_id
    if claimed is not None:
        return f"claiming to be {shown(claimed)}, not authenticated"
    return "not authenticated"
