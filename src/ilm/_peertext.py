"""
Peer ids as text: one rule for the command line, URLs and HTTP headers.

- an ``int`` id is its decimal digits: ``7``;
- a ``str`` id is percent-encoded (UTF-8; everything but ``A-Z a-z 0-9 _ . -
  ~`` is escaped), so it fits in a URL path segment or a header;
- a ``str`` id made only of ASCII digits is prefixed with ``str:`` so it is
  not read as an ``int``: ``str:7``.

Reading applies the reverse: ``str:`` forces a string (the rest
percent-decoded), ASCII digits are an ``int``, anything else is
percent-decoded to a string.  Every id survives the round trip.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from ilm._message import PeerId, check_peer_id

__all__ = ["peer_id_from_text", "peer_id_to_text"]

_STR_PREFIX = "str:"


def peer_id_to_text(peer_id: PeerId) -> str:
    """
    :return: the text form of a (valid) peer id.
    """
    if type(peer_id) is int:
        return str(peer_id)
    assert isinstance(peer_id, str)
    if peer_id.isascii() and peer_id.isdigit():
        return _STR_PREFIX + peer_id
    return quote(peer_id, safe="", errors="surrogatepass")


def peer_id_from_text(text: str) -> PeerId:
    """
    :return: the peer id ``text`` names.
    :raises ValueError: (:class:`ilm.errors.InvalidPeerId` for an id out of
        range) if it names none: bad percent-encoding, invalid UTF-8, an
        empty or too long string, an ``int`` of 2**63 or more.
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
        raise ValueError(f"{text!r} is not valid percent-encoded UTF-8") from None
