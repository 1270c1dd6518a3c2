"""
The stream transport's wire format: pure encoding and decoding, no I/O.

A stream link (TCP, TLS, UNIX socket, any stream endpoint) carries *link
frames*.  Each is a 4-byte big-endian length, then that many bytes: a type
byte, a body and, once a pre-shared-key link is authenticated, a 16-byte
integrity tag.  The length is checked against the limit in force before
anything is buffered, and :class:`FrameParser` parses from one
``bytearray`` so a large frame arriving in many small chunks costs linear
time.

============== =======================================================
type name           body
============== =======================================================
0x01 LINK_HELLO      magic ``b"ILMs"``, version u16, flags u8, nonce 32 B,
                     source id, destination id (initiator to responder)
0x02 LINK_CHALLENGE  nonce 32 B, flags u8 (responder to initiator)
0x03 LINK_PROOF      MAC: 0 or 32 B (initiator to responder)
0x04 LINK_ACCEPT     MAC: 0 or 32 B (responder to initiator)
0x05 LINK_UP         empty: "this connection is the link" (from the node
                     whose id is smaller)
0x06 CARRY           one ILM session frame (at least 1 byte)
0x07 LINK_PING       token u64
0x08 LINK_PONG       token u64 (the LINK_PING's)
============== =======================================================

The link frames' names are distinct from the session frames'
(:mod:`ilm._frames`): a session frame travels inside a CARRY link frame.

The flags byte of LINK_HELLO and LINK_CHALLENGE says whether its sender tags every
frame after the handshake (:data:`FLAG_FRAME_TAGS`); both ends must agree.
The tags are keyed BLAKE2b-128 over an implicit per-direction frame counter,
the type byte and the body, under keys derived from the pre-shared key and
the handshake transcript (:func:`frame_keys`, :class:`FrameSealer`).

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

from ilm._peerid import MAX_INT_ID, PeerId, id_bytes, id_from_bytes
from ilm.errors import (
    FrameAuthenticationFailed,
    FrameTooLarge,
    InvalidPeerId,
    MalformedFrame,
    UnknownFrameType,
    UnsupportedVersion,
)

LINK_VERSION = 2
"""The stream transport's protocol version (2: flags in LINK_CHALLENGE, frame
integrity tags)."""

MAGIC = b"ILMs"
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 16
"""Bytes of the integrity tag at the end of every frame of a tagged link."""
_TAGGED_MINIMUM = 1 + TAG_SIZE
"""A tagged frame's length (type byte, body, tag) with an empty body."""

FLAG_FRAME_TAGS = 0x01
"""LINK_HELLO/LINK_CHALLENGE flag: the sender tags every frame after the handshake."""
_KNOWN_FLAGS = FLAG_FRAME_TAGS

LINK_HELLO = 0x01
LINK_CHALLENGE = 0x02
LINK_PROOF = 0x03
LINK_ACCEPT = 0x04
LINK_UP = 0x05
CARRY = 0x06
LINK_PING = 0x07
LINK_PONG = 0x08

FRAME_NAMES = {
    LINK_HELLO: "LINK_HELLO",
    LINK_CHALLENGE: "LINK_CHALLENGE",
    LINK_PROOF: "LINK_PROOF",
    LINK_ACCEPT: "LINK_ACCEPT",
    LINK_UP: "LINK_UP",
    CARRY: "CARRY",
    LINK_PING: "LINK_PING",
    LINK_PONG: "LINK_PONG",
}

HANDSHAKE_FRAME_LIMIT = 1024
"""Largest link frame accepted before the link is authenticated."""

_PREFIX = struct.Struct(">I")
_HEADER = struct.Struct(">IB")
_HELLO_HEAD = struct.Struct(">4sHB32s")
_TOKEN = struct.Struct(">Q")
_TAGGED = struct.Struct(">QB")
#: The largest body :meth:`FrameOpener.check` joins to its counter and type
#: before hashing (a copy, cheaper than a second ``update`` when small).
_JOINED_BODY = 512
_ID_INT = struct.Struct(">BQ")
_ID_INT_KIND = 0x01
_ID_STR_KIND = 0x02

HEADER_SIZE = _HEADER.size
"""Bytes before a link frame's body: the length prefix and the type byte."""


def frame_limit(max_session_frame: int, tagged: bool = False) -> int:
    """
    :return: the largest link-frame length (type byte and tag included)
        that carries a session frame of ``max_session_frame`` bytes.
    """
    return max_session_frame + 1 + (TAG_SIZE if tagged else 0)


# -- node ids ---------------------------------------------------------------


def encode_id(peer_id: PeerId) -> bytes:
    """
    Encode a node id (already validated by ``check_peer_id``).
    """
    if type(peer_id) is int:
        return _ID_INT.pack(_ID_INT_KIND, peer_id)
    raw = id_bytes(str(peer_id))
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
        if value > MAX_INT_ID:
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
            text = id_from_bytes(bytes(data[offset + 2 : end]))
        except InvalidPeerId:
            raise MalformedFrame("string node id is not UTF-8")
        return text, end
    raise MalformedFrame(f"unknown node id kind 0x{kind:02x}")


# -- frames -----------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LinkHello:
    """
    The initiator's first frame: who it claims to be and whom it means to
    reach, and whether it tags its frames (``flags``).
    """

    version: int
    nonce: bytes
    source: PeerId
    destination: PeerId
    flags: int = 0


def encode_frame(kind: int, body: bytes = b"") -> bytes:
    """
    One link frame: length prefix, type byte, body.
    """
    return _HEADER.pack(len(body) + 1, kind) + body


def carry_header(session_frame_size: int) -> bytes:
    """
    The 5 bytes that precede a session frame of ``session_frame_size`` bytes
    in a CARRY link frame (the frame itself follows unchanged, so a sequence
    of frames goes out with one ``writeSequence``).
    """
    return _HEADER.pack(session_frame_size + 1, CARRY)


def encode_hello(hello: LinkHello) -> bytes:
    return encode_frame(
        LINK_HELLO,
        _HELLO_HEAD.pack(MAGIC, hello.version, hello.flags, hello.nonce)
        + encode_id(hello.source)
        + encode_id(hello.destination),
    )


def decode_hello(body: bytes) -> LinkHello:
    """
    :raises MalformedFrame: not an ILM stream, or a bad field.
    :raises UnsupportedVersion: another version of the stream transport.
    """
    if len(body) < _HELLO_HEAD.size:
        raise MalformedFrame(f"LINK_HELLO of {len(body)} bytes is truncated")
    magic, version, flags, nonce = _HELLO_HEAD.unpack_from(body)
    if magic != MAGIC:
        raise MalformedFrame("LINK_HELLO without the ILM stream magic: not an ILM peer")
    if version != LINK_VERSION:
        raise UnsupportedVersion(
            f"peer speaks stream transport version {version}; this node speaks "
            f"{LINK_VERSION}"
        )
    _check_flags(flags, "LINK_HELLO")
    source, offset = decode_id(body, _HELLO_HEAD.size)
    destination, offset = decode_id(body, offset)
    if offset != len(body):
        raise MalformedFrame(f"{len(body) - offset} trailing bytes after LINK_HELLO")
    return LinkHello(version, bytes(nonce), source, destination, flags)


def _check_flags(flags: int, name: str) -> None:
    if flags & ~_KNOWN_FLAGS:
        raise MalformedFrame(f"{name} has unknown flags 0x{flags:02x}")


def encode_challenge(nonce: bytes, flags: int = 0) -> bytes:
    return encode_frame(LINK_CHALLENGE, nonce + bytes((flags,)))


def decode_challenge(body: bytes) -> tuple[bytes, int]:
    """
    :return: ``(nonce, flags)``.
    """
    if len(body) != NONCE_SIZE + 1:
        raise MalformedFrame(
            f"LINK_CHALLENGE of {len(body)} bytes, expected {NONCE_SIZE + 1}"
        )
    flags = body[NONCE_SIZE]
    _check_flags(flags, "LINK_CHALLENGE")
    return bytes(body[:NONCE_SIZE]), flags


def decode_mac(body: bytes, name: str) -> bytes:
    """
    Decode a LINK_PROOF or LINK_ACCEPT body: an empty MAC or one of ``MAC_SIZE`` bytes.
    """
    if len(body) not in (0, MAC_SIZE):
        raise MalformedFrame(f"{name} of {len(body)} bytes, expected 0 or {MAC_SIZE}")
    return bytes(body)


def check_empty(body: bytes, name: str) -> None:
    if body:
        raise MalformedFrame(f"{name} carries {len(body)} unexpected bytes")


def encode_token(token: int) -> bytes:
    """
    The body of a LINK_PING or LINK_PONG.
    """
    return _TOKEN.pack(token)


def encode_ping(token: int) -> bytes:
    return encode_frame(LINK_PING, _TOKEN.pack(token))


def encode_pong(token: int) -> bytes:
    return encode_frame(LINK_PONG, _TOKEN.pack(token))


def decode_token(body: bytes, name: str) -> int:
    if len(body) != _TOKEN.size:
        raise MalformedFrame(f"{name} of {len(body)} bytes, expected {_TOKEN.size}")
    return int(_TOKEN.unpack(body)[0])


def decode_carry(body: bytes) -> bytes:
    if not body:
        raise MalformedFrame("CARRY link frame without a session frame")
    return body


# -- authentication material --------------------------------------------------

_MAC_LABEL = b"ILM stream link authentication\x00"
INITIATOR_ROLE = b"initiator"
RESPONDER_ROLE = b"responder"


_FRAME_KEY_LABEL = b"ILM stream frame key\x00"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Transcript:
    """
    What one link handshake agreed on, in the open: the version, each
    side's flags and fresh nonce, and both ids.  Key proofs and frame keys
    are computed over it.
    """

    version: int
    initiator_flags: int
    responder_flags: int
    initiator_nonce: bytes
    responder_nonce: bytes
    initiator: PeerId
    responder: PeerId

    def encode(self) -> bytes:
        return b"".join(
            (
                struct.pack(
                    ">HBB", self.version, self.initiator_flags, self.responder_flags
                ),
                self.initiator_nonce,
                self.responder_nonce,
                encode_id(self.initiator),
                encode_id(self.responder),
            )
        )


def link_mac(key: bytes, role: bytes, transcript: Transcript) -> bytes:
    """
    HMAC-SHA256 proof of holding ``key`` for one link handshake.

    It covers the role (so a proof cannot be reflected back), the version
    and both sides' flags (so neither can be changed on the way), both
    fresh nonces (so it cannot be replayed on another link) and both ids
    (so it cannot be presented for another pair of nodes).
    """
    message = _MAC_LABEL + role + b"\x00" + transcript.encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def frame_keys(key: bytes, transcript: Transcript) -> tuple[bytes, bytes]:
    """
    The two keys of a tagged link's frames, derived from the pre-shared
    ``key`` and the handshake: ``HMAC-SHA256(key, "ILM stream frame key\\0"
    || role || "\\0" || transcript)`` for each role.  They differ from the
    handshake's proofs (another label), from one link to the next (fresh
    nonces) and between the two directions (the role).

    :return: ``(key of the initiator's frames, key of the responder's)``.
    """
    encoded = transcript.encode()
    return (
        hmac.digest(
            key, _FRAME_KEY_LABEL + INITIATOR_ROLE + b"\x00" + encoded, "sha256"
        ),
        hmac.digest(
            key, _FRAME_KEY_LABEL + RESPONDER_ROLE + b"\x00" + encoded, "sha256"
        ),
    )


class FrameSealer:
    """
    Tags the frames one side of a link sends: each frame's tag is keyed
    BLAKE2b (16 bytes) over the frame's number in this direction (a u64
    counting from 0, never sent), its type byte and its body.  A frame
    altered, dropped, replayed, reordered or injected on the way therefore
    fails its check at :class:`FrameOpener`.
    """

    __slots__ = ("_base", "_counter")

    def __init__(self, key: bytes) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=TAG_SIZE)
        self._counter = 0

    def tag(self, kind: int, body: bytes) -> bytes:
        """
        :return: the tag of the next frame, which must be sent next.
        """
        counter = self._counter
        self._counter = counter + 1
        h = self._base.copy()
        h.update(_TAGGED.pack(counter, kind))
        h.update(body)
        return h.digest()

    def seal(self, kind: int, body: bytes = b"") -> bytes:
        """
        :return: the whole link frame, tagged.
        """
        return (
            _HEADER.pack(len(body) + 1 + TAG_SIZE, kind) + body + self.tag(kind, body)
        )

    def carry_parts(self, session_frame: bytes) -> tuple[bytes, bytes, bytes]:
        """
        :return: a tagged CARRY link frame in three parts (header, the
            session frame unchanged, tag) for ``writeSequence``.
        """
        return (
            _HEADER.pack(len(session_frame) + 1 + TAG_SIZE, CARRY),
            session_frame,
            self.tag(CARRY, session_frame),
        )


class FrameOpener:
    """
    Checks the tags of the frames one side of a link receives (the
    counterpart of the peer's :class:`FrameSealer`).
    """

    __slots__ = ("_base", "_counter")

    def __init__(self, key: bytes) -> None:
        # FrameParser.frames_of does what check does, inline, with these.
        self._base = hashlib.blake2b(key=key, digest_size=TAG_SIZE)
        self._counter = 0

    @property
    def frames(self) -> int:
        """How many frames have passed the check."""
        return self._counter

    def check(
        self,
        kind: int,
        body: bytes | bytearray | memoryview,
        tag: bytes | bytearray | memoryview,
    ) -> None:
        """
        :raises FrameAuthenticationFailed: ``tag`` is not the tag of the
            next frame with this type and body.
        """
        counter = self._counter
        h = self._base.copy()
        if len(body) <= _JOINED_BODY:
            # One update instead of two: what a small frame costs most.
            h.update(_TAGGED.pack(counter, kind) + body)
        else:
            h.update(_TAGGED.pack(counter, kind))
            h.update(body)
        if not hmac.compare_digest(h.digest(), tag):
            raise FrameAuthenticationFailed(
                f"{FRAME_NAMES.get(kind, hex(kind))} frame number {counter} from the "
                f"peer failed its integrity check: it was altered, dropped, "
                f"replayed, reordered or injected on the way"
            )
        self._counter = counter + 1


# -- parsing ----------------------------------------------------------------


class FrameParser:
    """
    Split a byte stream into link frames.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it
    returns ``None``.  ``limit`` is the largest frame length accepted (type
    byte and tag included); it may be raised once the link is
    authenticated.  A length over it raises :class:`FrameTooLarge` as soon
    as the 4-byte prefix is seen, before any of the body is buffered.

    Once :attr:`opener` is set (a :class:`FrameOpener`), every frame must
    end with its tag, which is checked (and removed) before the frame's
    type is even looked at.
    """

    __slots__ = ("_buffer", "_offset", "limit", "opener")

    def __init__(self, limit: int = HANDSHAKE_FRAME_LIMIT) -> None:
        #: What was fed and not yet parsed from :attr:`_offset` on: the last
        #: chunk itself while whole frames arrive, a ``bytearray`` once a
        #: frame spans chunks.
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        self.limit = limit
        self.opener: FrameOpener | None = None

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        offset = self._offset
        if offset == len(buffer) and type(data) is bytes:
            # Everything held was parsed (the usual case: whole frames per
            # read): parse the new chunk where it is, without a copy.
            self._buffer = data
            self._offset = 0
            return
        if not isinstance(buffer, bytearray):
            # A frame continues in a later chunk: from now on a bytearray,
            # so that many small chunks of a large frame cost linear time.
            self._buffer = buffer = bytearray(buffer[offset:])
        elif offset:
            # Drop what was parsed: one move per chunk, of the unparsed tail.
            del buffer[:offset]
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
        :raises FrameAuthenticationFailed: a tagged frame failed its check.
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
        end = offset + 4 + length
        opener = self.opener
        if opener is not None:
            if length < 1 + TAG_SIZE:
                raise FrameAuthenticationFailed(
                    f"link frame of length {length} is too short for its tag"
                )
            end -= TAG_SIZE
            body = bytes(buffer[offset + 5 : end])
            opener.check(kind, body, buffer[end : end + TAG_SIZE])
        else:
            body = bytes(buffer[offset + 5 : end])
        if kind not in FRAME_NAMES:
            raise UnknownFrameType(f"unknown link frame type 0x{kind:02x}")
        self._offset = offset + 4 + length
        return kind, body

    def frames_of(self, kind: int, frames: list[bytes]) -> tuple[int, bytes] | None:
        """
        :meth:`next_frame` in a loop, for the data path: append the bodies
        of the complete frames of type ``kind`` (checked, with non-empty
        bodies) to ``frames``, up to the first frame of another type or with
        an empty body.  A tagged frame of that type that is whole, within
        the limit and small (the usual one: one message) is taken here in
        one step, its tag checked inline as :meth:`FrameOpener.check` checks
        it; anything else goes through :meth:`next_frame`.

        :return: that frame, as :meth:`next_frame` returns it, or ``None``
            once every complete frame was taken.
        :raises: what :meth:`next_frame` raises, for the first frame that
            fails its checks (the frames before it are in ``frames``).
        """
        append = frames.append
        opener = self.opener
        limit = self.limit
        buffer = self._buffer
        size = len(buffer)
        offset = self._offset
        unpack = _PREFIX.unpack_from
        if opener is not None:
            # FrameOpener.check, inline: what each frame of a read costs.
            base = opener._base
            head = _TAGGED.pack
            compare_digest = hmac.compare_digest
        while True:
            if size - offset < 4:
                # Everything whole was taken (the usual end of a read).
                return None
            (length,) = unpack(buffer, offset)
            end = offset + 4 + length
            if (
                opener is not None
                and _TAGGED_MINIMUM < length <= _JOINED_BODY
                and length <= limit
                and end <= size
                and buffer[offset + 4] == kind
            ):
                end -= TAG_SIZE
                body = buffer[offset + 5 : end]
                if not isinstance(body, bytes):
                    body = bytes(body)
                h = base.copy()
                h.update(head(opener._counter, kind) + body)
                tag = buffer[end : end + TAG_SIZE]
                if compare_digest(h.digest(), tag):
                    opener._counter += 1
                else:
                    # Raises FrameAuthenticationFailed, with its message.
                    opener.check(kind, body, tag)
                offset = self._offset = end + TAG_SIZE
                append(body)
                continue
            frame = self.next_frame()
            if frame is None or frame[0] != kind or not frame[1]:
                return frame
            append(frame[1])
            offset = self._offset
