"""
Encoding and decoding of ILM session frames (pure functions, with limits).

A frame is one ``bytes`` value; networks carry frames whole (the stream
transports add a length prefix, see ``docs/protocol.md``).  All integers are
big-endian.  Every frame starts with a type byte:

========  ========  ==========================================================
type      name      body
========  ========  ==========================================================
0x01      RESUME    version u16, incarnation 16 bytes, window u32,
                    window_bytes u32, first_unacked u64, last_position u64,
                    flags u8 (bit 0: known incarnation present, bit 1: reply
                    requested), known_incarnation 16 bytes, delivered u64,
                    max_message_size u32
0x02      MESSAGES  lane u16 (0), first position u64, count u32, then count
                    times: length u32, contents
0x03      ACK       lane u16 (0), delivered u64, received u64
0x04      NACK      lane u16 (0), expected position u64
========  ========  ==========================================================

The names differ from the stream network's link frames (its HELLO and DATA,
``ilm.network._wire``), which carry these frames: RESUME is the session's
hello (called HELLO before; the bytes are the same), MESSAGES its data.

Decoding never trusts a length: every field is checked against the frame's
size and the configured limits, and any inconsistency raises a typed
:class:`ilm.errors.ProtocolViolation`.  Positions travel as unsigned 64-bit
integers but are below ``2**63`` (:data:`MAX_POSITION`) everywhere: stores
keep them as signed 64-bit integers, so a frame carrying a larger one is
malformed.
"""

from __future__ import annotations

import struct

from ilm._session import Hello
from ilm.errors import (
    FrameTooLarge,
    MalformedFrame,
    ProtocolViolation,
    UnexpectedFrame,
    UnknownFrameType,
)

RESUME = 0x01
MESSAGES = 0x02
ACK = 0x03
NACK = 0x04

_RESUME = struct.Struct(">BH16sIIQQB16sQI")
_DATA_HEAD = struct.Struct(">BHQI")
_ACK = struct.Struct(">BHQQ")
_NACK = struct.Struct(">BHQ")
_LEN = struct.Struct(">I")
# A one-message MESSAGES frame's head: type, lane, first position, count,
# the message's length.
_ONE_HEAD = struct.Struct(">BHQII")

_FLAG_KNOWN = 0x01
_FLAG_REPLY = 0x02
_ZERO_INCARNATION = bytes(16)
MAX_POSITION = 2**63 - 1
"""
The highest position there can ever be: stores keep positions as signed
64-bit integers (at a million messages a second, 2**63 lasts 292,000 years).
Every decoder refuses a larger one.
"""

DATA_OVERHEAD = _DATA_HEAD.size
"""Bytes of a MESSAGES frame besides its messages."""
PER_MESSAGE_OVERHEAD = _LEN.size
"""Bytes a MESSAGES frame adds per message besides its contents."""
_ONE_MESSAGE = DATA_OVERHEAD + PER_MESSAGE_OVERHEAD


def incarnation_to_bytes(incarnation: str) -> bytes:
    """
    Convert an incarnation id (32 hex digits) to its 16 wire bytes.
    """
    try:
        raw = bytes.fromhex(incarnation)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"incarnation ids are 32 hex digits, not {incarnation!r}")
    return raw


def encode_resume(hello: Hello) -> bytes:
    flags = (_FLAG_KNOWN if hello.known_incarnation is not None else 0) | (
        _FLAG_REPLY if hello.reply_requested else 0
    )
    known = (
        incarnation_to_bytes(hello.known_incarnation)
        if hello.known_incarnation is not None
        else _ZERO_INCARNATION
    )
    return _RESUME.pack(
        RESUME,
        hello.version,
        incarnation_to_bytes(hello.incarnation),
        hello.window,
        hello.window_bytes,
        hello.first_unacked,
        hello.last_position,
        flags,
        known,
        hello.delivered,
        hello.max_message_size,
    )


def encode_messages(first: int, contents: list[bytes], target_size: int) -> list[bytes]:
    """
    Encode messages at consecutive positions from ``first`` into MESSAGES frames
    of at most ``target_size`` bytes each (a single larger message gets a
    frame of its own).
    """
    frames = []
    pack_head = _DATA_HEAD.pack
    pack_len = _LEN.pack
    count = len(contents)
    start = 0
    while start < count:
        size = DATA_OVERHEAD
        parts = [b""]
        append = parts.append
        stop = start
        while stop < count:
            item = contents[stop]
            item_size = len(item) + 4
            if size + item_size > target_size and stop > start:
                break
            size += item_size
            append(pack_len(len(item)))
            append(item)
            stop += 1
        parts[0] = pack_head(MESSAGES, 0, first + start, stop - start)
        frames.append(b"".join(parts))
        start = stop
    return frames


def encode_ack(delivered: int, received: int) -> bytes:
    return _ACK.pack(ACK, 0, delivered, received)


def encode_nack(expected: int) -> bytes:
    return _NACK.pack(NACK, 0, expected)


def check_size(frame: bytes, max_frame_size: int) -> None:
    """
    :raises FrameTooLarge: if ``frame`` is over the limit.
    """
    if len(frame) > max_frame_size:
        raise FrameTooLarge(len(frame), max_frame_size)


def frame_type(frame: bytes) -> int:
    """
    :return: the type byte of ``frame``.
    :raises MalformedFrame: for an empty frame.
    :raises UnknownFrameType: for a type this version does not know.
    """
    if not frame:
        raise MalformedFrame("empty frame")
    kind = frame[0]
    if kind not in (RESUME, MESSAGES, ACK, NACK):
        raise UnknownFrameType(f"unknown frame type 0x{kind:02x}")
    return kind


def _check_lane(lane: int) -> None:
    if lane != 0:
        raise UnexpectedFrame(f"lane {lane} is not supported (only lane 0)")


def decode_resume(frame: bytes) -> Hello:
    if len(frame) != _RESUME.size:
        raise MalformedFrame(
            f"RESUME frame of {len(frame)} bytes, expected {_RESUME.size}"
        )
    (
        _,
        version,
        incarnation,
        window,
        window_bytes,
        first_unacked,
        last_position,
        flags,
        known,
        delivered,
        max_message_size,
    ) = _RESUME.unpack(frame)
    if flags & ~(_FLAG_KNOWN | _FLAG_REPLY):
        raise MalformedFrame(f"RESUME has unknown flags 0x{flags:02x}")
    if last_position > MAX_POSITION or delivered > MAX_POSITION:
        raise MalformedFrame(
            f"RESUME position beyond 2**63 - 1: last {last_position}, "
            f"delivered {delivered}"
        )
    if first_unacked < 1 or last_position < first_unacked - 1:
        raise MalformedFrame(
            f"RESUME positions inconsistent: first unacked {first_unacked}, "
            f"last {last_position}"
        )
    if window < 1 or window_bytes < 1:
        raise MalformedFrame("RESUME announces an empty window")
    if max_message_size < 1:
        raise MalformedFrame("RESUME announces a zero message size limit")
    has_known = bool(flags & _FLAG_KNOWN)
    if not has_known and delivered:
        raise MalformedFrame("RESUME carries a delivery mark without an incarnation")
    return Hello(
        version=version,
        incarnation=incarnation.hex(),
        window=window,
        window_bytes=window_bytes,
        first_unacked=first_unacked,
        last_position=last_position,
        known_incarnation=known.hex() if has_known else None,
        delivered=delivered,
        reply_requested=bool(flags & _FLAG_REPLY),
        max_message_size=max_message_size,
    )


def _one_message(frame: bytes, size: int, max_message_size: int) -> int:
    """
    The usual MESSAGES frame of a peer sending at its own pace, well
    formed: one message, on lane 0, its contents ``frame[_ONE_MESSAGE:]``.

    :return: its position, or 0 if ``frame`` (of ``size`` bytes) is not
        such a frame (then the general decoding decides).
    """
    if size < _ONE_MESSAGE:
        return 0
    _, lane, position, count, length = _ONE_HEAD.unpack_from(frame)
    if (
        count == 1
        and lane == 0
        and length == size - _ONE_MESSAGE
        and length <= max_message_size
        and 1 <= position <= MAX_POSITION
    ):
        return position  # type: ignore[no-any-return]
    return 0


def decode_messages(frame: bytes, max_message_size: int) -> tuple[int, list[bytes]]:
    """
    :return: ``(first_position, [contents, ...])``.
    """
    size = len(frame)
    first = _one_message(frame, size, max_message_size)
    if first:
        return first, [frame[_ONE_MESSAGE:]]
    if size < DATA_OVERHEAD:
        raise MalformedFrame(f"MESSAGES frame of {size} bytes is truncated")
    _, lane, first, count = _DATA_HEAD.unpack_from(frame)
    _check_lane(lane)
    if first < 1 or count < 1:
        raise MalformedFrame(
            f"MESSAGES frame with first position {first}, count {count}"
        )
    if count > (size - DATA_OVERHEAD) // 4:
        raise MalformedFrame(f"MESSAGES frame claims {count} messages in {size} bytes")
    if first + count - 1 > MAX_POSITION:
        raise MalformedFrame(
            f"MESSAGES positions {first}..{first + count - 1} go beyond 2**63 - 1"
        )
    contents: list[bytes] = []
    append = contents.append
    unpack = _LEN.unpack_from
    offset = DATA_OVERHEAD
    for _ in range(count):
        if offset + 4 > size:
            raise MalformedFrame("MESSAGES frame truncated in a length field")
        (length,) = unpack(frame, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise MalformedFrame("MESSAGES frame truncated in a message")
        if length > max_message_size:
            raise MalformedFrame(
                f"message of {length} bytes exceeds the limit of {max_message_size}"
            )
        append(frame[offset:end])
        offset = end
    if offset != size:
        raise MalformedFrame(
            f"{size - offset} trailing bytes after the messages of a MESSAGES frame"
        )
    return first, contents


def decode_message_run(
    frames: list[bytes], start: int, max_frame_size: int, max_message_size: int
) -> tuple[int, int, list[bytes]]:
    """
    Decode, as one, the MESSAGES frames of ``frames`` from ``start`` on
    whose positions continue each other (what a peer sending at its own
    pace puts in one read: one message per frame).

    :return: ``(end, first_position, contents)``: ``frames[start:end]``
        were taken.  The run stops before the first frame that is not a
        MESSAGES frame, is larger than ``max_frame_size``, is malformed or
        does not continue the run; ``end == start`` when that is
        ``frames[start]``.  Such a frame is left to :func:`decode_messages`
        and its typed errors.
    """
    end = start
    first = 0
    contents: list[bytes] = []
    append = contents.append
    for index in range(start, len(frames)):
        frame = frames[index]
        size = len(frame)
        if not frame or frame[0] != MESSAGES or size > max_frame_size:
            break
        position = _one_message(frame, size, max_message_size)
        if position:
            # The usual frame, without a list of its own.
            if not contents:
                first = position
            elif position != first + len(contents):
                break
            append(frame[_ONE_MESSAGE:])
            end = index + 1
            continue
        try:
            position, more = decode_messages(frame, max_message_size)
        except ProtocolViolation:
            break
        if not contents:
            first = position
        elif position != first + len(contents):
            break
        contents += more
        end = index + 1
    return end, first, contents


def decode_ack(frame: bytes) -> tuple[int, int]:
    """
    :return: ``(delivered, received)``.
    """
    if len(frame) != _ACK.size:
        raise MalformedFrame(f"ACK frame of {len(frame)} bytes, expected {_ACK.size}")
    _, lane, delivered, received = _ACK.unpack(frame)
    _check_lane(lane)
    if received < delivered:
        raise MalformedFrame(f"ACK received {received} below delivered {delivered}")
    if received > MAX_POSITION:
        raise MalformedFrame(f"ACK position {received} beyond 2**63 - 1")
    return delivered, received


def decode_nack(frame: bytes) -> int:
    """
    :return: the expected position.
    """
    if len(frame) != _NACK.size:
        raise MalformedFrame(f"NACK frame of {len(frame)} bytes, expected {_NACK.size}")
    _, lane, expected = _NACK.unpack(frame)
    _check_lane(lane)
    if expected < 1:
        raise MalformedFrame("NACK for position 0")
    if expected > MAX_POSITION:
        raise MalformedFrame(f"NACK for position {expected}, beyond 2**63 - 1")
    return int(expected)
