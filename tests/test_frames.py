"""
Tests for ilm._frames: encoding, decoding and hostile input.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ilm import _frames
from ilm._session import PROTOCOL_VERSION, Hello
from ilm.errors import (
    FrameTooLarge,
    MalformedFrame,
    ProtocolViolation,
    UnexpectedFrame,
    UnknownFrameType,
)

INC = "0123456789abcdef" * 2


def decode_any(frame: bytes, max_message: int = 1 << 20) -> object:
    kind = _frames.frame_type(frame)
    if kind == _frames.RESUME:
        return _frames.decode_resume(frame)
    if kind == _frames.MESSAGES:
        return _frames.decode_messages(frame, max_message)
    if kind == _frames.ACK:
        return _frames.decode_ack(frame)
    return _frames.decode_nack(frame)


class RoundTripTests(SynchronousTestCase):
    def test_hello(self) -> None:
        """
        HELLO frames round-trip, with and without a known incarnation.
        """
        for known, delivered, reply in ((None, 0, False), (INC[::-1], 77, True)):
            hello = Hello(
                PROTOCOL_VERSION, INC, 64, 1 << 20, 5, 90, known, delivered, reply, 4096
            )
            self.assertEqual(_frames.decode_resume(_frames.encode_resume(hello)), hello)

    def test_data(self) -> None:
        """
        DATA frames round-trip, including empty messages.
        """
        contents = [b"", b"a", b"x" * 1000]
        [frame] = _frames.encode_messages(2**40, contents, 1 << 20)
        self.assertEqual(_frames.decode_messages(frame, 1000), (2**40, contents))

    def test_data_split(self) -> None:
        """
        encode_data splits at the target size, and a message larger than the
        target gets a frame of its own.
        """
        contents = [b"x" * 30] * 10 + [b"y" * 500] + [b"z"]
        frames = _frames.encode_messages(7, contents, 100)
        decoded: list[bytes] = []
        position = 7
        for frame in frames:
            first, part = _frames.decode_messages(frame, 1000)
            self.assertEqual(first, position)
            position += len(part)
            decoded += part
            if len(part) > 1:
                self.assertLessEqual(len(frame), 100)
        self.assertEqual(decoded, contents)

    def test_ack_nack(self) -> None:
        """
        ACK and NACK frames round-trip.
        """
        self.assertEqual(_frames.decode_ack(_frames.encode_ack(3, 9)), (3, 9))
        self.assertEqual(_frames.decode_nack(_frames.encode_nack(2**62)), 2**62)

    @given(
        first=st.integers(1, 2**63 - 30),
        contents=st.lists(st.binary(max_size=50), min_size=1, max_size=30),
    )
    def test_data_property(self, first: int, contents: list[bytes]) -> None:
        """
        Any batch of messages survives encoding and decoding.
        """
        decoded: list[bytes] = []
        for frame in _frames.encode_messages(first, contents, 200):
            decoded += _frames.decode_messages(frame, 50)[1]
        self.assertEqual(decoded, contents)


class HostileTests(SynchronousTestCase):
    def test_empty_and_unknown(self) -> None:
        """
        Empty frames and unknown types raise typed errors.
        """
        self.assertRaises(MalformedFrame, _frames.frame_type, b"")
        self.assertRaises(UnknownFrameType, _frames.frame_type, b"\x7fabc")

    def test_truncated_and_trailing(self) -> None:
        """
        Every truncation of a valid frame and any trailing byte is refused.
        """
        hello = _frames.encode_resume(Hello(PROTOCOL_VERSION, INC, 1, 1, 1, 0, None, 0))
        [data] = _frames.encode_messages(1, [b"abc", b"defg"], 1000)
        for frame in (hello, data, _frames.encode_ack(1, 1), _frames.encode_nack(1)):
            for cut in range(1, len(frame)):
                self.assertRaises(MalformedFrame, decode_any, frame[:cut])
            self.assertRaises(MalformedFrame, decode_any, frame + b"\x00")

    def test_one_message_frames(self) -> None:
        """
        A frame of one message (decoded by its own short path) is refused
        exactly as the general decoder refuses it: truncated, trailing
        bytes, a length that lies either way, a message over the limit, an
        unknown lane, position 0; at the limit it decodes.
        """
        [frame] = _frames.encode_messages(5, [b"abcd"], 1000)
        self.assertEqual(_frames.decode_messages(frame, 4), (5, [b"abcd"]))
        for cut in range(1, len(frame)):
            self.assertRaises(MalformedFrame, decode_any, frame[:cut])
        self.assertRaises(MalformedFrame, decode_any, frame + b"\x00")
        head = struct.Struct(">BHQI")
        for length in (3, 5, 2**32 - 1):
            lying = (
                head.pack(_frames.MESSAGES, 0, 5, 1)
                + struct.pack(">I", length)
                + b"abcd"
            )
            self.assertRaises(MalformedFrame, _frames.decode_messages, lying, 1000)
        self.assertRaises(MalformedFrame, _frames.decode_messages, frame, 3)
        other_lane = head.pack(_frames.MESSAGES, 1, 5, 1) + frame[15:]
        self.assertRaises(UnexpectedFrame, _frames.decode_messages, other_lane, 1000)
        zero = head.pack(_frames.MESSAGES, 0, 0, 1) + frame[15:]
        self.assertRaises(MalformedFrame, _frames.decode_messages, zero, 1000)

    def test_lying_lengths(self) -> None:
        """
        A count or a length that does not fit the frame is refused without
        reading past the end; so is a message over the size limit.
        """
        head = struct.pack(">BHQI", _frames.MESSAGES, 0, 1, 2**32 - 1)
        self.assertRaises(
            MalformedFrame, _frames.decode_messages, head + b"\x00" * 8, 100
        )
        frame = (
            struct.pack(">BHQI", _frames.MESSAGES, 0, 1, 1)
            + struct.pack(">I", 2**31)
            + b"x"
        )
        self.assertRaises(MalformedFrame, _frames.decode_messages, frame, 100)
        [big] = _frames.encode_messages(1, [b"x" * 101], 1000)
        self.assertRaises(MalformedFrame, _frames.decode_messages, big, 100)

    def test_bad_fields(self) -> None:
        """
        Zero positions, inconsistent HELLO positions, unknown flags, empty
        windows, ACKs below their own delivery point and unknown lanes are
        refused.
        """
        self.assertRaises(
            MalformedFrame,
            _frames.decode_messages,
            struct.pack(">BHQI", _frames.MESSAGES, 0, 0, 1) + b"\x00" * 4,
            10,
        )
        self.assertRaises(
            MalformedFrame,
            _frames.decode_messages,
            struct.pack(">BHQI", _frames.MESSAGES, 0, 2**64 - 1, 2) + b"\x00" * 8,
            10,
        )
        self.assertRaises(
            UnexpectedFrame,
            _frames.decode_messages,
            struct.pack(">BHQI", _frames.MESSAGES, 1, 1, 1) + b"\x00" * 4,
            10,
        )
        self.assertRaises(MalformedFrame, _frames.decode_ack, _frames.encode_ack(5, 4))
        self.assertRaises(MalformedFrame, _frames.decode_nack, _frames.encode_nack(0))
        raw = bytes.fromhex(INC)
        pack = struct.Struct(">BH16sIIQQB16sQI").pack
        _frames.decode_resume(pack(1, 1, raw, 1, 1, 1, 0, 0, bytes(16), 0, 1))
        bad = [
            pack(1, 1, raw, 1, 1, 0, 0, 0, bytes(16), 0, 1),  # first_unacked 0
            pack(1, 1, raw, 1, 1, 5, 2, 0, bytes(16), 0, 1),  # last below first - 1
            pack(1, 1, raw, 1, 1, 1, 0, 0x80, bytes(16), 0, 1),  # unknown flag
            pack(1, 1, raw, 0, 1, 1, 0, 0, bytes(16), 0, 1),  # empty window
            pack(1, 1, raw, 1, 1, 1, 0, 0, bytes(16), 3, 1),  # mark, no incarnation
            pack(1, 1, raw, 1, 1, 1, 0, 0, bytes(16), 0, 0),  # no message fits
        ]
        for frame in bad:
            self.assertRaises(MalformedFrame, _frames.decode_resume, frame)

    def test_positions_below_2_63(self) -> None:
        """
        Every position a frame carries is below 2**63 (what a store's signed
        64-bit integers hold): 2**63 - 1 decodes, and 2**63 or more in a
        HELLO (last position, first unacknowledged, mark), DATA (its last
        position), ACK or NACK is a MalformedFrame.
        """
        top = _frames.MAX_POSITION
        self.assertEqual(top, 2**63 - 1)
        raw = bytes.fromhex(INC)
        pack = struct.Struct(">BH16sIIQQB16sQI").pack
        hello = _frames.decode_resume(
            pack(1, 1, raw, 1, 1, top + 1, top, 1, raw, top, 1)
        )
        self.assertEqual((hello.first_unacked, hello.delivered), (top + 1, top))
        for fields in (
            (2**63 + 1, 2**63 + 1, 0, bytes(16), 0),  # the HELLO of issue 10.1
            (1, top + 1, 0, bytes(16), 0),
            (1, 2**64 - 1, 0, bytes(16), 0),
            (1, 5, 1, raw, top + 1),
        ):
            first_unacked, last, flags, known, delivered = fields
            frame = pack(
                1, 1, raw, 1, 1, first_unacked, last, flags, known, delivered, 1
            )
            self.assertRaises(MalformedFrame, _frames.decode_resume, frame)
        data = struct.Struct(">BHQI")
        self.assertEqual(
            _frames.decode_messages(
                data.pack(_frames.MESSAGES, 0, top, 1) + bytes(4), 10
            ),
            (top, [b""]),
        )
        for first, count in ((top, 2), (top + 1, 1), (2**64 - 1, 1)):
            frame = data.pack(_frames.MESSAGES, 0, first, count) + bytes(4 * count)
            self.assertRaises(MalformedFrame, _frames.decode_messages, frame, 10)
        self.assertEqual(_frames.decode_ack(_frames.encode_ack(top, top)), (top, top))
        self.assertRaises(
            MalformedFrame, _frames.decode_ack, _frames.encode_ack(0, top + 1)
        )
        self.assertRaises(
            MalformedFrame, _frames.decode_ack, _frames.encode_ack(top + 1, top + 1)
        )
        self.assertEqual(_frames.decode_nack(_frames.encode_nack(top)), top)
        self.assertRaises(
            MalformedFrame, _frames.decode_nack, _frames.encode_nack(top + 1)
        )

    def test_size_limit(self) -> None:
        """
        check_size refuses frames over the limit.
        """
        _frames.check_size(b"x" * 10, 10)
        error = self.assertRaises(FrameTooLarge, _frames.check_size, b"x" * 11, 10)
        self.assertEqual((error.size, error.limit), (11, 10))

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=200))
    def test_fuzz(self, frame: bytes) -> None:
        """
        Arbitrary bytes either decode or raise a ProtocolViolation, never
        anything else.
        """
        try:
            decode_any(frame, 100)
        except ProtocolViolation:
            pass

    @settings(max_examples=1000, deadline=None)
    @given(
        st.sampled_from([_frames.RESUME, _frames.MESSAGES, _frames.ACK, _frames.NACK]),
        st.binary(max_size=120),
    )
    def test_fuzz_typed(self, kind: int, body: bytes) -> None:
        """
        Arbitrary bodies behind each valid type byte either decode or raise a
        ProtocolViolation.
        """
        try:
            decode_any(bytes([kind]) + body, 100)
        except ProtocolViolation:
            pass


def one(position: int, contents: bytes) -> bytes:
    """A MESSAGES frame holding one message."""
    [frame] = _frames.encode_messages(position, [contents], 1 << 20)
    return frame


class MessageRunTests(SynchronousTestCase):
    def test_consecutive_frames_one_run(self) -> None:
        """
        One-message frames at consecutive positions, and a frame of several
        messages continuing them, decode as one run from ``start``.
        """
        [several] = _frames.encode_messages(8, [b"h", b"i"], 1 << 20)
        frames = [_frames.encode_ack(1, 1), one(5, b"e"), one(6, b"f"), one(7, b"g")]
        frames.append(several)
        self.assertEqual(
            _frames.decode_message_run(frames, 1, 1 << 20, 1000),
            (5, 5, [b"e", b"f", b"g", b"h", b"i"]),
        )

    def test_stops_before_what_it_cannot_take(self) -> None:
        """
        The run stops before a gap in positions, a frame of another type, a
        frame over the frame limit and a malformed frame (left to
        ``decode_messages``' typed errors); ``end == start`` when the first
        frame is one of the last four.
        """
        head = [one(1, b"a"), one(2, b"b")]
        malformed = one(3, b"c")[:-1]
        cases = {
            "gap": one(4, b"d"),
            "other type": _frames.encode_nack(3),
            "too large": one(3, b"c" * 200),
            "malformed": malformed,
            "message too large": one(3, b"c" * 60),
        }
        for name, stop in cases.items():
            self.assertEqual(
                _frames.decode_message_run([*head, stop, one(3, b"c")], 0, 100, 50),
                (2, 1, [b"a", b"b"]),
                name,
            )
            if name != "gap":
                self.assertEqual(
                    _frames.decode_message_run([stop], 0, 100, 50)[0], 0, name
                )
        self.assertRaises(MalformedFrame, _frames.decode_messages, malformed, 50)

    @given(
        st.lists(
            st.tuples(st.integers(1, 6), st.lists(st.binary(max_size=8), max_size=3)),
            max_size=8,
        )
    )
    def test_same_as_decoding_each(self, spec: list[tuple[int, list[bytes]]]) -> None:
        """
        Whatever the frames, the run is what decoding each frame from the
        start gives, as long as each continues the one before.
        """
        frames = [
            _frames.encode_messages(p, c, 1 << 20)[0] if c else one(p, b"")
            for p, c in spec
        ]
        end, first, contents = _frames.decode_message_run(frames, 0, 1 << 20, 100)
        expected: list[bytes] = []
        taken = 0
        for frame in frames:
            position, more = _frames.decode_messages(frame, 100)
            if expected and position != first + len(expected):
                break
            if not expected and taken == 0:
                self.assertEqual(position, first)
            expected += more
            taken += 1
        self.assertEqual((end, contents), (taken, expected))
