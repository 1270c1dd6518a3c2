"""
The records ``ilm inspect`` shows, whichever the store: per stream, what
is pending to a peer (:class:`OutboxReport`) and who owns it
(:class:`LeaseReport`, PostgreSQL only); per node (:class:`NodeReport`),
its incarnation, its streams and, PostgreSQL only, the liveness of each of
its gateways (:class:`GatewayReport`).  The delivery marks are
:class:`ilm.InboundRecord` values.
"""

from __future__ import annotations

import attr

from ilm._peerid import PeerId
from ilm._store import InboundRecord

__all__ = ["GatewayReport", "LeaseReport", "NodeReport", "OutboxReport"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OutboxReport:
    """
    The outbound stream to one peer, as ``ilm inspect`` shows it.

    ``oldest_stored_at``: when (seconds since the epoch) the oldest pending
    message was committed; ``None`` when nothing is pending.
    """

    peer_id: PeerId
    acked: int
    last_position: int
    pending_bytes: int
    oldest_stored_at: float | None

    @property
    def pending(self) -> int:
        return self.last_position - self.acked


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LeaseReport:
    """
    The lease of one stream in a shared store, in database time.

    ``owner``: the gateway that took it last (``None`` once released or
    never taken); ``epoch``: how many times it was taken; ``expires_at``:
    seconds since the epoch, ``None`` if never taken; ``live``: whether it
    had an owner and had not expired when the snapshot was read.
    """

    peer_id: PeerId
    owner: str | None
    epoch: int
    expires_at: float | None
    live: bool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GatewayReport:
    """
    The liveness row of one gateway of a node in a shared store, in
    database time (seconds since the epoch).

    ``name``: the gateway's name; ``opened_at``: when it last opened the
    store (which names its writer sessions:
    :mod:`ilm.backends._pg_liveness`); ``expires_at``: until when it
    counts as running, unless refreshed; ``live``: whether it had not
    expired when the snapshot was read.
    """

    name: str
    opened_at: float
    expires_at: float
    live: bool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NodeReport:
    """
    One logical node of a store, as ``ilm inspect`` shows it; ``leases``
    and ``gateways`` are a shared (PostgreSQL) store's, by stream and by
    gateway name.
    """

    node_id: PeerId
    incarnation: str
    outbound: tuple[OutboxReport, ...]
    inbound: tuple[InboundRecord, ...]
    leases: tuple[LeaseReport, ...] = ()
    gateways: tuple[GatewayReport, ...] = ()
