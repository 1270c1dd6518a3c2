"""
The stream transport's wire format: encoding, decoding, limits, and a
property-based fuzz of the frame decoder.
"""

from __future__ import annotations

import re
import struct

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ilm._peerid import id_order_key
from ilm.errors import (
    FrameAuthenticationFailed,
    FrameTooLarge,
    MalformedFrame,
    ProtocolViolation,
    UnknownFrameType,
    UnsupportedVersion,
)
from ilm.network import _wire
from ilm.network._wire import FrameParser, LinkHello

NONCE = bytes(range(32))


def parse_all(data: bytes, limit: int = 1 << 20) -> list[tuple[int, bytes]]:
    parser = FrameParser(limit)
    parser.feed(data)
    frames = []
    while (frame := parser.next_frame()) is not None:
        frames.append(frame)
    return frames


class IdTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        Int and str ids survive encoding, including the extremes.
        """
        for peer_id in (0, 1, 2**63 - 1, "a", "é" * 127, "x" * 255):
            raw = _wire.encode_id(peer_id)
            self.assertEqual(_wire.decode_id(raw + b"tail", 0), (peer_id, len(raw)))

    def test_invalid(self) -> None:
        """
        Truncated ids, unknown kinds, ints at 2**63, empty or non-UTF-8
        strings are MalformedFrame.
        """
        for raw in (
            b"",
            b"\x01\x00",
            b"\x01" + struct.pack(">Q", 2**63),
            b"\x02\x00",
            b"\x02\x05abc",
            b"\x02\x01\xff",
            b"\x03",
        ):
            self.assertRaises(MalformedFrame, _wire.decode_id, raw, 0)

    def test_total_order(self) -> None:
        """
        Every int sorts before every str; ints by value, strs by UTF-8 bytes.
        """
        ids: list[int | str] = ["b", 10, "a", 2, "é", "ab"]
        self.assertEqual(sorted(ids, key=id_order_key), [2, 10, "a", "ab", "b", "é"])


class FrameTests(SynchronousTestCase):
    def test_hello_round_trip(self) -> None:
        """
        A HELLO decodes to what was encoded.
        """
        hello = LinkHello(_wire.LINK_VERSION, NONCE, "alice", 7)
        [(kind, body)] = parse_all(_wire.encode_hello(hello))
        self.assertEqual(kind, _wire.LINK_HELLO)
        self.assertEqual(_wire.decode_hello(body), hello)

    def test_hello_rejections(self) -> None:
        """
        A wrong magic or unknown flags, a truncated body or trailing bytes
        are MalformedFrame; another version (version 1 among them, which
        had no frame tags) is UnsupportedVersion.
        """
        hello = LinkHello(_wire.LINK_VERSION, NONCE, 1, 2, _wire.FLAG_FRAME_TAGS)
        body = parse_all(_wire.encode_hello(hello))[0][1]
        self.assertEqual(_wire.decode_hello(body), hello)
        self.assertRaises(MalformedFrame, _wire.decode_hello, b"XXXX" + body[4:])
        self.assertRaises(MalformedFrame, _wire.decode_hello, body[:20])
        self.assertRaises(MalformedFrame, _wire.decode_hello, body + b"\x00")
        self.assertRaises(
            MalformedFrame, _wire.decode_hello, body[:6] + b"\x02" + body[7:]
        )
        for version in (1, 3):
            error = self.assertRaises(
                UnsupportedVersion,
                _wire.decode_hello,
                body[:4] + struct.pack(">H", version) + body[6:],
            )
            self.assertIn(f"version {version}", str(error))

    def test_fixed_bodies(self) -> None:
        """
        CHALLENGE, PROOF/ACCEPT, LINK_UP, PING/PONG and DATA check their
        sizes.
        """
        self.assertEqual(_wire.decode_challenge(NONCE + b"\x01"), (NONCE, 1))
        self.assertEqual(_wire.decode_challenge(NONCE + b"\x00"), (NONCE, 0))
        self.assertRaises(MalformedFrame, _wire.decode_challenge, NONCE)
        self.assertRaises(MalformedFrame, _wire.decode_challenge, NONCE + b"\x04")
        self.assertEqual(_wire.decode_mac(b"", "PROOF"), b"")
        self.assertEqual(_wire.decode_mac(NONCE, "PROOF"), NONCE)
        self.assertRaises(MalformedFrame, _wire.decode_mac, b"x", "PROOF")
        self.assertRaises(MalformedFrame, _wire.check_empty, b"x", "LINK_UP")
        [(kind, body)] = parse_all(_wire.encode_ping(2**64 - 1))
        self.assertEqual(
            (kind, _wire.decode_token(body, "LINK_PING")), (_wire.LINK_PING, 2**64 - 1)
        )
        self.assertRaises(MalformedFrame, _wire.decode_token, b"1234567", "PONG")
        self.assertRaises(MalformedFrame, _wire.decode_carry, b"")

    def test_data_header(self) -> None:
        """
        A DATA header followed by a session frame is one DATA link frame.
        """
        wire = _wire.carry_header(3) + b"abc" + _wire.carry_header(1) + b"z"
        self.assertEqual(parse_all(wire), [(_wire.CARRY, b"abc"), (_wire.CARRY, b"z")])

    def test_mac_binds_everything(self) -> None:
        """
        Changing the key, role, version, either side's flags, either nonce
        or either id changes the MAC.
        """
        transcript = _wire.Transcript(2, 1, 1, NONCE, NONCE[::-1], 1, 2)
        base = _wire.link_mac(b"k" * 32, _wire.INITIATOR_ROLE, transcript)
        self.assertNotEqual(
            _wire.link_mac(b"j" * 32, _wire.INITIATOR_ROLE, transcript), base
        )
        self.assertNotEqual(
            _wire.link_mac(b"k" * 32, _wire.RESPONDER_ROLE, transcript), base
        )
        changes: list[dict[str, object]] = [
            {"version": 3},
            {"initiator_flags": 0},
            {"responder_flags": 0},
            {"initiator_nonce": NONCE[::-1]},
            {"responder_nonce": NONCE},
            {"initiator": 2, "responder": 1},
            {"initiator": "1"},
        ]
        for change in changes:
            variant = attr.evolve(transcript, **change)  # type: ignore[misc]
            self.assertNotEqual(
                _wire.link_mac(b"k" * 32, _wire.INITIATOR_ROLE, variant), base, change
            )

    def test_frame_keys(self) -> None:
        """
        A link's two frame keys differ from each other, from the key and
        the handshake's proofs, and from one link (nonces) to the next.
        """
        transcript = _wire.Transcript(2, 1, 1, NONCE, NONCE[::-1], 1, 2)
        key = b"k" * 32
        keys = _wire.frame_keys(key, transcript)
        proofs = {
            _wire.link_mac(key, role, transcript)
            for role in (_wire.INITIATOR_ROLE, _wire.RESPONDER_ROLE)
        }
        self.assertEqual(len({*keys, key, *proofs}), 5)
        other = _wire.frame_keys(key, attr.evolve(transcript, responder_nonce=NONCE))
        self.assertFalse(set(keys) & set(other))

    def test_tagged_frames(self) -> None:
        """
        Tagged frames pass the check in order and lose their tag; a frame
        with any byte changed is refused (or, its length grown, never
        completes); one replayed, skipped, swapped with the next, or tagged
        under the other direction's key fails with
        FrameAuthenticationFailed; so does a frame too short for a tag.
        """
        send, receive = _wire.frame_keys(
            b"k" * 32, _wire.Transcript(2, 1, 1, NONCE, NONCE[::-1], 1, 2)
        )
        sealer = _wire.FrameSealer(send)
        wire = [
            sealer.seal(_wire.LINK_PING, b"12345678"),
            b"".join(sealer.carry_parts(b"session frame")),
            sealer.seal(_wire.LINK_UP),
        ]

        def parse(frames: list[bytes], key: bytes = send) -> list[tuple[int, bytes]]:
            parser = FrameParser(1 << 16)
            parser.opener = _wire.FrameOpener(key)
            parser.feed(b"".join(frames))
            out = []
            while (frame := parser.next_frame()) is not None:
                out.append(frame)
            return out

        self.assertEqual(
            parse(wire),
            [(_wire.LINK_PING, b"12345678"), (_wire.CARRY, b"session frame"), (5, b"")],
        )
        for position in range(len(wire[1])):
            altered = bytearray(wire[1])
            altered[position] ^= 0x40
            try:
                parsed = parse([wire[0], bytes(altered), wire[2]])
            except (FrameAuthenticationFailed, FrameTooLarge, MalformedFrame):
                continue
            # A longer length prefix: the frame never completes.
            self.assertEqual(parsed, [(_wire.LINK_PING, b"12345678")], position)
        bad = {
            "replayed": [wire[0], wire[0]],
            "skipped": [wire[0], wire[2]],
            "swapped": [wire[1], wire[0]],
            "too short": [b"\x00\x00\x00\x02\x07\x00"],
        }
        for frames in bad.values():
            self.assertRaises(FrameAuthenticationFailed, parse, frames)
        self.assertRaises(FrameAuthenticationFailed, parse, wire, receive)


class ParserTests(SynchronousTestCase):
    def test_chunked(self) -> None:
        """
        Frames split at every possible byte boundary parse the same.
        """
        wire = (
            _wire.encode_ping(5)
            + _wire.carry_header(10)
            + b"0123456789"
            + _wire.encode_frame(_wire.LINK_UP)
        )
        expected = parse_all(wire)
        for cut in range(len(wire) + 1):
            parser = FrameParser(1000)
            frames = []
            for chunk in (wire[:cut], wire[cut:]):
                parser.feed(chunk)
                while (frame := parser.next_frame()) is not None:
                    frames.append(frame)
            self.assertEqual(frames, expected)
            self.assertEqual(parser.buffered(), 0)

    def test_whole_and_split_chunks(self) -> None:
        """
        Chunks that hold whole frames, then a frame split over three chunks
        (one of them a ``bytearray``, one a ``memoryview``), then whole
        frames again, all parse, in order, and nothing stays buffered.
        """
        frames = [_wire.carry_header(3) + b"%03d" % i for i in range(6)]
        split = frames[3]
        chunks: list[bytes | bytearray | memoryview] = [
            frames[0] + frames[1],
            frames[2] + split[:2],
            bytearray(split[2:6]),
            memoryview(split[6:]),
            frames[4],
            frames[5],
        ]
        parser = FrameParser(1000)
        parsed = []
        for chunk in chunks:
            parser.feed(chunk)  # type: ignore[arg-type]
            while (frame := parser.next_frame()) is not None:
                parsed.append(frame)
        self.assertEqual(parsed, [(6, b"%03d" % i) for i in range(6)])
        self.assertTrue(all(type(body) is bytes for _, body in parsed))
        self.assertEqual(parser.buffered(), 0)

    def test_limit_checked_on_prefix(self) -> None:
        """
        A length over the limit is refused as soon as its 4-byte prefix
        arrives: nothing of the body needs to be buffered.
        """
        parser = FrameParser(1024)
        parser.feed(struct.pack(">I", 1025))
        error = self.assertRaises(FrameTooLarge, parser.next_frame)
        self.assertEqual((error.size, error.limit), (1025, 1024))
        parser = FrameParser(1024)
        parser.feed(struct.pack(">I", 2**32 - 1))
        self.assertRaises(FrameTooLarge, parser.next_frame)

    def test_limit_exact(self) -> None:
        """
        A frame exactly at the limit is accepted.
        """
        body = b"x" * 99
        self.assertEqual(
            parse_all(_wire.carry_header(99) + body, limit=100), [(6, body)]
        )

    def test_zero_length_and_unknown_type(self) -> None:
        """
        A zero length is MalformedFrame; an unknown type byte is
        UnknownFrameType.
        """
        self.assertRaises(MalformedFrame, parse_all, b"\x00\x00\x00\x00")
        self.assertRaises(UnknownFrameType, parse_all, b"\x00\x00\x00\x01\x99")
        self.assertRaises(UnknownFrameType, parse_all, b"\x00\x00\x00\x01\x00")

    def test_large_frame_in_small_chunks(self) -> None:
        """
        A frame at the default limit (1 MiB + 4 KiB) fed 1 KiB at a time is
        parsed once complete, and the buffer holds no more than it.
        """
        size = 1024 * 1024 + 4096
        wire = _wire.carry_header(size) + b"y" * size
        parser = FrameParser(_wire.frame_limit(size))
        for offset in range(0, len(wire), 1024):
            self.assertIsNone(parser.next_frame())
            parser.feed(wire[offset : offset + 1024])
        frame = parser.next_frame()
        assert frame is not None
        self.assertEqual(len(frame[1]), size)
        self.assertEqual(parser.buffered(), 0)


class FramesOfTests(SynchronousTestCase):
    """
    ``FrameParser.frames_of``, the data path's loop: the same frames as
    ``next_frame``, and nothing lost before a frame that fails.
    """

    def setUp(self) -> None:
        self.key, _ = _wire.frame_keys(
            b"k" * 32, _wire.Transcript(2, 1, 1, NONCE, NONCE[::-1], 1, 2)
        )
        self.sealer = _wire.FrameSealer(self.key)

    def carry(self, body: bytes) -> bytes:
        return b"".join(self.sealer.carry_parts(body))

    def parser(self) -> FrameParser:
        parser = FrameParser(1 << 16)
        parser.opener = _wire.FrameOpener(self.key)
        return parser

    def test_same_frames_at_every_cut(self) -> None:
        """
        CARRY frames, link frames between them and an empty CARRY frame, fed
        in two chunks cut at every byte: ``frames_of`` gives the CARRY
        bodies in order and stops at each other frame, as ``next_frame``
        does frame by frame.
        """
        wire = b"".join(
            [
                self.carry(b"one"),
                self.carry(b"two"),
                self.sealer.seal(_wire.LINK_PING, b"12345678"),
                self.carry(b"three"),
                self.sealer.seal(_wire.CARRY),
                self.carry(b"four" * 50),
            ]
        )
        expected = [
            (_wire.CARRY, b"one"),
            (_wire.CARRY, b"two"),
            (_wire.LINK_PING, b"12345678"),
            (_wire.CARRY, b"three"),
            (_wire.CARRY, b""),
            (_wire.CARRY, b"four" * 50),
        ]
        for cut in range(len(wire) + 1):
            parser = self.parser()
            parsed: list[tuple[int, bytes]] = []
            for chunk in (wire[:cut], bytearray(wire[cut:])):
                parser.feed(chunk)  # type: ignore[arg-type]
                while True:
                    bodies: list[bytes] = []
                    other = parser.frames_of(_wire.CARRY, bodies)
                    self.assertTrue(all(type(b) is bytes for b in bodies))
                    parsed += [(_wire.CARRY, body) for body in bodies]
                    if other is None:
                        break
                    parsed.append(other)
            self.assertEqual(parsed, expected, cut)
            self.assertEqual(parser.buffered(), 0)

    def test_failed_frame_after_good_ones(self) -> None:
        """
        A frame whose tag fails raises FrameAuthenticationFailed after the
        frames before it were appended.
        """
        good = [self.carry(b"a"), self.carry(b"b")]
        altered = bytearray(self.carry(b"c"))
        altered[6] ^= 1
        parser = self.parser()
        parser.feed(b"".join(good) + bytes(altered) + self.carry(b"d"))
        bodies: list[bytes] = []
        self.assertRaises(
            FrameAuthenticationFailed, parser.frames_of, _wire.CARRY, bodies
        )
        self.assertEqual(bodies, [b"a", b"b"])

    def test_limits_and_untagged(self) -> None:
        """
        A length over the limit raises FrameTooLarge from ``frames_of`` as
        from ``next_frame``; a parser without an opener (before the link is
        authenticated) gives the same frames through ``next_frame``.
        """
        parser = self.parser()
        parser.limit = 20
        parser.feed(self.carry(b"x" * 10))
        self.assertRaises(FrameTooLarge, parser.frames_of, _wire.CARRY, [])
        plain = FrameParser(1000)
        plain.feed(_wire.carry_header(3) + b"abc" + _wire.encode_ping(5))
        bodies: list[bytes] = []
        other = plain.frames_of(_wire.CARRY, bodies)
        self.assertEqual(bodies, [b"abc"])
        self.assertEqual(other, parse_all(_wire.encode_ping(5))[0])


def decode_everything(data: bytes, cuts: list[int], limit: int) -> int:
    """
    Feed ``data`` in pieces and decode every frame body by its type; return
    how many frames came out.  Only ProtocolViolation may escape.
    """
    parser = FrameParser(limit)
    count = 0
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        parser.feed(data[start:cut])
        start = max(start, cut)
        while (frame := parser.next_frame()) is not None:
            kind, body = frame
            count += 1
            decode_body(kind, body)
    return count


def decode_body(kind: int, body: bytes) -> None:
    if kind == _wire.LINK_HELLO:
        _wire.decode_hello(body)
    elif kind == _wire.LINK_CHALLENGE:
        _wire.decode_challenge(body)
    elif kind in (_wire.LINK_PROOF, _wire.LINK_ACCEPT):
        _wire.decode_mac(body, "MAC")
    elif kind == _wire.LINK_UP:
        _wire.check_empty(body, "LINK_UP")
    elif kind in (_wire.LINK_PING, _wire.LINK_PONG):
        _wire.decode_token(body, "LINK_PING")
    else:
        _wire.decode_carry(body)


valid_frames = st.one_of(
    st.builds(
        lambda n, s, d: _wire.encode_hello(LinkHello(_wire.LINK_VERSION, n, s, d)),
        st.binary(min_size=32, max_size=32),
        st.one_of(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=20)),
        st.one_of(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=20)),
    ),
    st.builds(
        _wire.encode_challenge,
        st.binary(min_size=32, max_size=32),
        st.sampled_from([0, _wire.FLAG_FRAME_TAGS]),
    ),
    st.builds(_wire.encode_ping, st.integers(0, 2**64 - 1)),
    st.builds(lambda b: _wire.carry_header(len(b)) + b, st.binary(min_size=1)),
)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
    def test_arbitrary_bytes(self, data: bytes, cuts: list[int]) -> None:
        """
        Arbitrary bytes, cut anywhere, either decode or raise a
        ProtocolViolation: never another exception.
        """
        try:
            decode_everything(data, cuts, 200)
        except ProtocolViolation:
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(valid_frames, min_size=1, max_size=5),
        st.lists(st.integers(0, 2000), max_size=6),
        st.integers(0, 2000),
        st.integers(0, 255),
    )
    def test_mutated_valid_frames(
        self, frames: list[bytes], cuts: list[int], position: int, value: int
    ) -> None:
        """
        Valid frames round-trip whatever the chunking; with one byte changed
        they still either decode or raise a ProtocolViolation.
        """
        data = b"".join(frames)
        self.assertEqual(decode_everything(data, cuts, 1 << 16), len(frames))
        mutated = bytearray(data)
        mutated[position % len(data)] = value
        try:
            decode_everything(bytes(mutated), cuts, 1 << 16)
        except ProtocolViolation:
            pass


class FuzzCommandTests(SynchronousTestCase):
    def fuzz(self, *arguments: str) -> tuple[int, str]:
        import contextlib
        import io

        from ilm.network import fuzz

        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = fuzz.main(list(arguments))
        return status, output.getvalue()

    def test_short_run(self) -> None:
        """
        The fuzz command runs the requested number of inputs through the
        decoders, a responder protocol and, as an authenticated peer, a
        running ILM node, and reports the counts.
        """
        status, output = self.fuzz(
            "--inputs", "3000", "--seed", "7", "--protocol-share", "0.5",
            "--session-share", "0.5", "--store", "memory",
        )  # fmt: skip
        self.assertEqual(status, 0, output)
        self.assertIn("3,000 inputs fuzzed (seed 7)", output)
        match = re.search(r"\(([\d,]+) links, ([\d,]+) messages delivered", output)
        assert match is not None, output
        links, delivered = (int(g.replace(",", "")) for g in match.groups())
        self.assertGreater(links, 1000)
        self.assertGreater(delivered, 100)

    def test_catches_a_session_bug(self) -> None:
        """
        A bug behind an authenticated link (here: the node delivering a
        message again when a duplicate DATA frame arrives) fails the run,
        with the seed and the input.
        """
        from ilm._session import InboundStream

        real = InboundStream.on_data

        def on_data(
            stream: InboundStream, first: int, contents: list[bytes]
        ) -> tuple[int, bool, int]:
            if not stream.queue and first <= stream.delivered:
                # Forget what was delivered: the duplicate is taken again.
                stream.delivered = first - 1
            return real(stream, first, contents)

        self.patch(InboundStream, "on_data", on_data)
        status, output = self.fuzz(
            "--inputs", "20000", "--seed", "7", "--protocol-share", "0",
            "--session-share", "1",
        )  # fmt: skip
        self.assertEqual(status, 1, output)
        self.assertIn("FAILED on input", output)
        self.assertIn("(seed 7)", output)
        self.assertIn("delivered position", output)
