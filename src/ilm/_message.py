"""
The message value type (peer ids live in :mod:`ilm._peerid`).
"""

from __future__ import annotations

import attr
from zope.interface import implementer

from ilm._peerid import MAX_INT_ID, MAX_STR_ID_BYTES, PeerId, check_peer_id
from ilm.interfaces import IMessage

__all__ = ["MAX_INT_ID", "MAX_STR_ID_BYTES", "Message", "PeerId", "check_peer_id"]


@implementer(IMessage)
@attr.s(frozen=True, slots=True, auto_attribs=True, repr=False)
class Message:
    """
    A message delivered by ILM.

    ``message_id`` is the message's position in the ordered stream from
    ``source_id`` to ``destination_id``; it restarts at 1 when the sender
    loses its store, so ``source_incarnation`` (the sender's store
    incarnation) is part of the message's identity:
    ``(source_id, source_incarnation, message_id)`` is unique.
    """

    source_id: PeerId
    destination_id: PeerId
    message_id: int
    contents: bytes
    source_incarnation: str = ""

    def __repr__(self) -> str:
        shown = self.contents[:32]
        more = "..." if len(self.contents) > 32 else ""
        return (
            f"Message(source_id={self.source_id!r}, "
            f"destination_id={self.destination_id!r}, "
            f"message_id={self.message_id}, contents={shown!r}{more})"
        )
