"""
The message value type and peer-id rules.
"""

from __future__ import annotations

import attr
from zope.interface import implementer

from ilm.errors import InvalidPeerId
from ilm.interfaces import IMessage

PeerId = int | str
"""A node id: an ``int`` in ``[0, 2**63)`` or a ``str`` of 1 to 255 UTF-8 bytes."""

MAX_INT_ID = 2**63 - 1
MAX_STR_ID_BYTES = 255


def check_peer_id(peer_id: object) -> PeerId:
    """
    Validate a peer id.

    :raises TypeError: if it is neither ``int`` nor ``str`` (``bool`` is
        refused too).
    :raises InvalidPeerId: if it is out of range.
    """
    if type(peer_id) is int:
        if 0 <= peer_id <= MAX_INT_ID:
            return peer_id
        raise InvalidPeerId(f"integer peer id {peer_id} is outside [0, 2**63)")
    if type(peer_id) is str:
        size = len(peer_id.encode("utf-8", "surrogatepass"))
        if 1 <= size <= MAX_STR_ID_BYTES:
            return peer_id
        raise InvalidPeerId(
            f"string peer id must be 1 to {MAX_STR_ID_BYTES} UTF-8 bytes, not {size}"
        )
    if isinstance(peer_id, int | str) and not isinstance(peer_id, bool):
        # Subclasses of int/str (IntEnum, ...): normalise to the plain value.
        return check_peer_id(int(peer_id) if isinstance(peer_id, int) else str(peer_id))
    raise TypeError(f"peer ids are int or str, not {type(peer_id).__name__}")


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
