"""
The stream transport's wire format: pure encoding and decoding, no I/O.

A stream link (TCP, TLS, UNIX socket, any stream endpoint) carries *link
frames*.  Each is a 4-byte big-endian length, then that many bytes: a type
byte and a body.  The length is checked against the limit in force before
anything is buffered, and :class:`FrameParser` parses from one ``bytearray``
so a large frame arriving in many small chunks costs linear time.

==== ========= ============================================================
type name      body
==== ========= ============================================================
0x01 HELLO     magic ``b"ILMs"``, version u16, flags u8 (0), nonce 32 B,
               source id, destination id (initiator to responder)
0x02 CHALLENGE nonce 32 B (responder to initiator)
0x03 PROOF     MAC: 0 or 32 B (initiator to responder)
0x04 ACCEPT    MAC: 0 or 32 B (responder to initiator)
0x05 LINK_UP   empty: "this connection is the link" (from the node whose
               id is smaller)
0x06 DATA      one ILM session frame (at least 1 byte)
0x07 PING      token u64
0x08 PONG      token u64 (the PING's)
==== ========= ============================================================

A node id is encoded as a kind byte then the value: ``0x01`` and a u64 for
an ``int`` (below 2**63), ``0x02``, a u8 length (1 to 255) and UTF-8 bytes
for a ``str``.  ``docs/protocol.md`` ("Stream transport") is the
specification.

Every decoder raises a typed :class:`ilm.errors.ProtocolViolation` for bad
input and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import attr

from ilm._message import PeerId
from ilm.errors import (
    FrameTooLarge,
    MalformedFrame,
    UnknownFrameType,
    UnsupportedVersion,
)

LINK_VERSION = 1
"""The stream transport's protocol version."""

MAGIC = b"ILMs"
NONCE_SIZE = 32
MAC_SIZE = 32

HELLO = 0x01
CHALLENGE = 0x02
PROOF = 0x03
ACCEPT = 0x04
LINK_UP = 0x05
DATA = 0x06
PING = 0x07
PONG = 0x08

FRAME_NAMES = {
    HELLO: "HELLO",
    CHALLENGE: "CHALLENGE",
    PROOF: "PROOF",
    ACCEPT: "ACCEPT",
    LINK_UP: "LINK_UP",
    DATA: "DATA",
    PING: "PING",
    PONG: "PONG",
}

HANDSHAKE_FRAME_LIMIT = 1024
"""Largest link frame accepted before the link is authenticated."""

_PREFIX = struct.Struct(">I")
_HEADER = struct.Struct(">IB")
_HELLO_HEAD = struct.Struct(">4sHB32s")
_TOKEN = struct.Struct(">Q")
_ID_INT = struct.Struct(">BQ")
_ID_INT_KIND = 0x01
_ID_STR_KIND = 0x02
_MAX_INT_ID = 2**63 - 1

HEADER_SIZE = _HEADER.size
"""Bytes before a link frame's body: the length prefix and the type byte."""


def frame_limit(max_session_frame: int) -> int:
    """
    :return: the largest link-frame length (type byte included) that carries
        a session frame of ``max_session_frame`` bytes.
    """
    return max_session_frame + 1


# -- node ids ---------------------------------------------------------------


def encode_id(peer_id: PeerId) -> bytes:
    """
    Encode a node id (already validated by ``check_peer_id``).
    """
    if type(peer_id) is int:
        return _ID_INT.pack(_ID_INT_KIND, peer_id)
    raw = str(peer_id).encode("utf-8", "surrogatepass")
    return bytes((_ID_STR_KIND, len(raw))) + raw


def decode_id(data: bytes, offset: int) -> tuple[PeerId, int]:
    """
    :return: ``(node id, offset after it)``.
    :raises MalformedFrame: for a truncated or invalid id.
    """
    if offset >= len(data):
        raise MalformedFrame("node id missing")
    kind = data[offset]
    if kind == _ID_INT_KIND:
        if offset + _ID_INT.size > len(data):
            raise MalformedFrame("integer node id truncated")
        _, value = _ID_INT.unpack_from(data, offset)
        if value > _MAX_INT_ID:
            raise MalformedFrame(f"integer node id {value} is not below 2**63")
        return int(value), offset + _ID_INT.size
    if kind == _ID_STR_KIND:
        if offset + 2 > len(data):
            raise MalformedFrame("string node id truncated")
        size = data[offset + 1]
        end = offset + 2 + size
        if size == 0 or end > len(data):
            raise MalformedFrame(
                f"string node id of {size} bytes is empty or truncated"
            )
        try:
            text = bytes(data[offset + 2 : end]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFrame("string node id is not UTF-8")
        return text, end
    raise MalformedFrame(f"unknown node id kind 0x{kind:02x}")


def id_order_key(peer_id: PeerId) -> tuple[int, int | bytes]:
    """
    A total order over node ids: every ``int`` before every ``str``; ints by
    value, strings by their UTF-8 bytes.
    """
    if type(peer_id) is int:
        return (0, peer_id)
    return (1, str(peer_id).encode("utf-8", "surrogatepass"))


# -- frames -----------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LinkHello:
    """
    The initiator's first frame: who it claims to be and whom it means to
    reach.
    """

    version: int
    nonce: bytes
    source: PeerId
    destination: PeerId


def encode_frame(kind: int, body: bytes = b"") -> bytes:
    """
    One link frame: length prefix, type byte, body.
    """
    return _HEADER.pack(len(body) + 1, kind) + body


def data_header(session_frame_size: int) -> bytes:
    """
    The 5 bytes that precede a session frame of ``session_frame_size`` bytes
    in a DATA link frame (the frame itself follows unchanged, so a sequence
    of frames goes out with one ``writeSequence``).
    """
    return _HEADER.pack(session_frame_size + 1, DATA)


def encode_hello(hello: LinkHello) -> bytes:
    return encode_frame(
        HELLO,
        _HELLO_HEAD.pack(MAGIC, hello.version, 0, hello.nonce)
        + encode_id(hello.source)
        + encode_id(hello.destination),
    )


def decode_hello(body: bytes) -> LinkHello:
    """
    :raises MalformedFrame: not an ILM stream, or a bad field.
    :raises UnsupportedVersion: another version of the stream transport.
    """
    if len(body) < _HELLO_HEAD.size:
        raise MalformedFrame(f"HELLO of {len(body)} bytes is truncated")
    magic, version, flags, nonce = _HELLO_HEAD.unpack_from(body)
    if magic != MAGIC:
        raise MalformedFrame("HELLO without the ILM stream magic: not an ILM peer")
    if version != LINK_VERSION:
        raise UnsupportedVersion(
            f"peer speaks stream transport version {version}; this node speaks "
            f"{LINK_VERSION}"
        )
    if flags:
        raise MalformedFrame(f"HELLO has unknown flags 0x{flags:02x}")
    source, offset = decode_id(body, _HELLO_HEAD.size)
    destination, offset = decode_id(body, offset)
    if offset != len(body):
        raise MalformedFrame(f"{len(body) - offset} trailing bytes after HELLO")
    return LinkHello(version, bytes(nonce), source, destination)


def encode_challenge(nonce: bytes) -> bytes:
    return encode_frame(CHALLENGE, nonce)


def decode_challenge(body: bytes) -> bytes:
    if len(body) != NONCE_SIZE:
        raise MalformedFrame(f"CHALLENGE of {len(body)} bytes, expected {NONCE_SIZE}")
    return bytes(body)


def decode_mac(body: bytes, name: str) -> bytes:
    """
    Decode a PROOF or ACCEPT body: an empty MAC or one of ``MAC_SIZE`` bytes.
    """
    if len(body) not in (0, MAC_SIZE):
        raise MalformedFrame(f"{name} of {len(body)} bytes, expected 0 or {MAC_SIZE}")
    return bytes(body)


def check_empty(body: bytes, name: str) -> None:
    if body:
        raise MalformedFrame(f"{name} carries {len(body)} unexpected bytes")


def encode_ping(token: int) -> bytes:
    return encode_frame(PING, _TOKEN.pack(token))


def encode_pong(token: int) -> bytes:
    return encode_frame(PONG, _TOKEN.pack(token))


def decode_token(body: bytes, name: str) -> int:
    if len(body) != _TOKEN.size:
        raise MalformedFrame(f"{name} of {len(body)} bytes, expected {_TOKEN.size}")
    return int(_TOKEN.unpack(body)[0])


def decode_data(body: bytes) -> bytes:
    if not body:
        raise MalformedFrame("DATA link frame without a session frame")
    return body


# -- authentication material --------------------------------------------------

_MAC_LABEL = b"ILM stream link authentication\x00"
INITIATOR_ROLE = b"initiator"
RESPONDER_ROLE = b"responder"


def link_mac(
    key: bytes,
    role: bytes,
    version: int,
    initiator_nonce: bytes,
    responder_nonce: bytes,
    initiator: PeerId,
    responder: PeerId,
) -> bytes:
    """
    HMAC-SHA256 proof of holding ``key`` for one link handshake.

    It covers the role (so a proof cannot be reflected back), the version,
    both fresh nonces (so it cannot be replayed on another link) and both ids
    (so it cannot be presented for another pair of nodes).
    """
    message = b"".join(
        (
            _MAC_LABEL,
            role,
            b"\x00",
            struct.pack(">H", version),
            initiator_nonce,
            responder_nonce,
            encode_id(initiator),
            encode_id(responder),
        )
    )
    return hmac.new(key, message, hashlib.sha256).digest()


# -- parsing ----------------------------------------------------------------


class FrameParser:
    """
    Split a byte stream into link frames.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it
    returns ``None``.  ``limit`` is the largest frame length accepted (type
    byte included); it may be raised once the link is authenticated.  A
    length over it raises :class:`FrameTooLarge` as soon as the 4-byte prefix
    is seen, before any of the body is buffered.
    """

    __slots__ = ("_buffer", "_offset", "limit")

    def __init__(self, limit: int = HANDSHAKE_FRAME_LIMIT) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self.limit = limit

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        if self._offset:
            # Drop what was parsed: one move per chunk, of the unparsed tail.
            del buffer[: self._offset]
            self._offset = 0
        buffer += data

    def buffered(self) -> int:
        """
        :return: how many bytes are held, not yet returned as a frame.
        """
        return len(self._buffer) - self._offset

    def next_frame(self) -> tuple[int, bytes] | None:
        """
        :return: ``(type, body)`` of the next complete frame, or ``None``
            until more bytes arrive.
        :raises FrameTooLarge: the length prefix exceeds :attr:`limit`.
        :raises MalformedFrame: a zero length.
        :raises UnknownFrameType: a type this version does not know.
        """
        buffer = self._buffer
        offset = self._offset
        available = len(buffer) - offset
        if available < 4:
            return None
        (length,) = _PREFIX.unpack_from(buffer, offset)
        if length > self.limit:
            raise FrameTooLarge(length, self.limit)
        if length == 0:
            raise MalformedFrame("link frame of length 0")
        if available < 4 + length:
            return None
        kind = buffer[offset + 4]
        if kind not in FRAME_NAMES:
            raise UnknownFrameType(f"unknown link frame type 0x{kind:02x}")
        end = offset + 4 + length
        body = bytes(buffer[offset + 5 : end])
        self._offset = end
        return kind, body
