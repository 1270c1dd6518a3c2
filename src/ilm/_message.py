"""
The message value type (peer ids live in :mod:`ilm._peerid`).
"""

from __future__ import annotations

import attr
from zope.interface import implementer

from ilm._peerid import MAX_INT_ID, MAX_STR_ID_BYTES, PeerId, check_peer_id
from ilm.interfaces import IMessage

__all__ = [
    "MAX_INT_ID",
    "MAX_STR_ID_BYTES",
    "Message",
    "PeerId",
    "check_peer_id",
    "make_message",
]


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


_new = object.__new__
_set_source, _set_destination, _set_id, _set_contents, _set_incarnation = (
    Message.__dict__[field.name].__set__ for field in attr.fields(Message)
)


def make_message(
    source_id: PeerId,
    destination_id: PeerId,
    message_id: int,
    contents: bytes,
    source_incarnation: str,
) -> Message:
    """
    ``Message(source_id, destination_id, message_id, contents,
    source_incarnation)``, made in half the time: the receiving path makes
    one per message, and a frozen attrs class's ``__init__`` sets each field
    through ``object.__setattr__``; this sets the slots directly.  Equal in
    every respect, since ``Message`` has no validators, converters or
    post-init (``tests/test_api.py`` checks).
    """
    message = _new(Message)
    _set_source(message, source_id)
    _set_destination(message, destination_id)
    _set_id(message, message_id)
    _set_contents(message, contents)
    _set_incarnation(message, source_incarnation)
    return message  # type: ignore[no-any-return]
