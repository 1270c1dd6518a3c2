"""
The states of one stream connection (:class:`ilm.network.ILMProtocol`)::

    handshaking --authenticated--> authenticated --chosen as the link--> open
         |                               |                                |
         +-------------------------------+--------------------------------+
                      closed (refused, replaced, lost, stopping)

``authenticated``: the link handshake is done; the connection waits for
the peer's LINK_UP (the peer decides) or is held by this node (it decides,
and its own dial to the peer is still in its handshake).  Only an ``open``
connection carries session frames.
"""

from __future__ import annotations

__all__ = ["AUTHENTICATED", "CLOSED", "HANDSHAKING", "OPEN"]

HANDSHAKING = "handshaking"
AUTHENTICATED = "authenticated"
OPEN = "open"
CLOSED = "closed"
