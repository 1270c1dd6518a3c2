"""
Peer ids: what a valid one is, and its one encoding for the wire, the store
and text (command line, URLs, HTTP headers).

A peer id is an ``int`` in ``[0, 2**63)`` or a ``str`` of 1 to 255 bytes of
UTF-8 (strict UTF-8: a lone surrogate is not an id, since no peer could ever
send it on the wire).  Every layer validates with :func:`check_peer_id` and
turns a ``str`` id into bytes with :func:`id_bytes` and back with
:func:`id_from_bytes`; so an id accepted anywhere is accepted everywhere.

As text (:func:`peer_id_to_text`, :func:`peer_id_from_text`):

- an ``int`` id is its decimal digits: ``7``;
- a ``str`` id is percent-encoded (UTF-8; everything but ``A-Z a-z 0-9 _ .
  - ~`` is escaped), so it fits a URL path segment or a header;
- a ``str`` id made only of ASCII digits is prefixed with ``str:`` so it is
  not read as an ``int``: ``str:7``.

Reading applies the reverse: ``str:`` forces a string (the rest
percent-decoded), ASCII digits are an ``int``, anything else is
percent-decoded to a string.  Every id survives the round trip.

This module imports nothing of ILM but its errors: every layer may use it.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from ilm.errors import InvalidPeerId

__all__ = [
    "MAX_INT_ID",
    "MAX_STR_ID_BYTES",
    "PeerId",
    "check_peer_id",
    "id_bytes",
    "id_from_bytes",
    "id_order_key",
    "peer_id_from_text",
    "peer_id_to_text",
    "stored_id",
]

PeerId = int | str
"""A node id: an ``int`` in ``[0, 2**63)`` or a ``str`` of 1 to 255 UTF-8 bytes."""

MAX_INT_ID = 2**63 - 1
MAX_STR_ID_BYTES = 255

_STR_PREFIX = "str:"


def check_peer_id(peer_id: object) -> PeerId:
    """
    Validate a peer id.

    :raises TypeError: if it is neither ``int`` nor ``str`` (``bool`` is
        refused too).
    :raises InvalidPeerId: if it is out of range, or a ``str`` that is not
        valid UTF-8 (a lone surrogate).
    """
    if type(peer_id) is int:
        if 0 <= peer_id <= MAX_INT_ID:
            return peer_id
        raise InvalidPeerId(f"integer peer id {peer_id} is outside [0, 2**63)")
    if type(peer_id) is str:
        id_bytes(peer_id)
        return peer_id
    if isinstance(peer_id, int | str) and not isinstance(peer_id, bool):
        # Subclasses of int/str (IntEnum, ...): normalise to the plain value.
        return check_peer_id(int(peer_id) if isinstance(peer_id, int) else str(peer_id))
    raise TypeError(f"peer ids are int or str, not {type(peer_id).__name__}")


def id_bytes(peer_id: str) -> bytes:
    """
    The UTF-8 bytes of a ``str`` peer id, as the wire and the stores carry
    them.

    :raises InvalidPeerId: if it is not 1 to 255 bytes of valid UTF-8.
    """
    try:
        raw = peer_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPeerId(
            f"string peer id {peer_id!r} is not valid UTF-8 (a lone surrogate)"
        ) from None
    if not 1 <= len(raw) <= MAX_STR_ID_BYTES:
        raise InvalidPeerId(
            f"string peer id must be 1 to {MAX_STR_ID_BYTES} UTF-8 bytes, "
            f"not {len(raw)}"
        )
    return raw


def id_from_bytes(raw: bytes) -> str:
    """
    The ``str`` peer id whose UTF-8 bytes are ``raw``.

    :raises InvalidPeerId: if they are not 1 to 255 bytes of valid UTF-8.
    """
    if not 1 <= len(raw) <= MAX_STR_ID_BYTES:
        raise InvalidPeerId(
            f"string peer id must be 1 to {MAX_STR_ID_BYTES} UTF-8 bytes, "
            f"not {len(raw)}"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPeerId(f"string peer id {raw!r} is not valid UTF-8") from None


def stored_id(peer_id: PeerId) -> int | bytes:
    """
    A (valid) peer id as a store's column holds it: the ``int`` itself, or
    the UTF-8 bytes of a ``str`` (so ``1`` and ``"1"`` stay different).
    """
    if type(peer_id) is int:
        return peer_id
    return id_bytes(str(peer_id))


def id_order_key(peer_id: PeerId) -> tuple[int, int | bytes]:
    """
    A total order over peer ids, the same on every node: every ``int``
    before every ``str``; ints by value, strings by their UTF-8 bytes.
    """
    if type(peer_id) is int:
        return (0, peer_id)
    return (1, str(peer_id).encode("utf-8"))


def peer_id_to_text(peer_id: PeerId) -> str:
    """
    :return: the text form of a (valid) peer id.
    """
    if type(peer_id) is int:
        return str(peer_id)
    assert isinstance(peer_id, str)
    if peer_id.isascii() and peer_id.isdigit():
        return _STR_PREFIX + peer_id
    return quote(peer_id, safe="")


def peer_id_from_text(text: str) -> PeerId:
    """
    :return: the peer id ``text`` names.
    :raises InvalidPeerId: (a ``ValueError``) if it names none: bad
        percent-encoding, invalid UTF-8, an empty or too long string, an
        ``int`` of 2**63 or more.
    """
    value: object
    if text.startswith(_STR_PREFIX):
        value = _decode(text[len(_STR_PREFIX) :])
    elif text.isascii() and text.isdigit():
        value = int(text)
    else:
        value = _decode(text)
    return check_peer_id(value)


def _decode(text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPeerId(f"{text!r} is not valid percent-encoded UTF-8") from None
