"""
Tests for :mod:`ilm._peerid`: one rule for what a peer id is, and one
encoding of it for the wire, the stores and text.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM
from ilm._peerid import (
    check_peer_id,
    id_bytes,
    id_from_bytes,
    id_order_key,
    peer_id_from_text,
    peer_id_to_text,
)
from ilm.errors import InvalidPeerId
from ilm.network import _wire
from ilm.testing import InMemoryBackend, InMemoryNetwork


class CheckTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """
        Ints in ``[0, 2**63)`` and strings of 1 to 255 UTF-8 bytes are ids;
        int and str subclasses are normalised to the plain value.
        """
        for peer in (0, 2**63 - 1, "a", "é" * 127, "x" * 255):
            self.assertEqual(check_peer_id(peer), peer)
        self.assertIs(type(check_peer_id(type("I", (int,), {})(3))), int)

    def test_invalid(self) -> None:
        """
        Out-of-range ints, empty or too long strings and a string with a
        lone surrogate (which no UTF-8 wire or store can carry) are
        ``InvalidPeerId``; other types are a ``TypeError``.
        """
        for peer in (-1, 2**63, "", "x" * 256, "é" * 128, "node\ud800"):
            self.assertRaises(InvalidPeerId, check_peer_id, peer)
        for peer in (True, 1.0, b"a", None):
            self.assertRaises(TypeError, check_peer_id, peer)

    def test_surrogate_refused_by_send_to(self) -> None:
        """
        A node refuses to send to an id with a lone surrogate at once,
        instead of storing a message that could never be delivered.
        """
        network = InMemoryNetwork()
        node = ILM(InMemoryBackend(), lambda m: None, network.add_peer(1))
        self.failureResultOf(node.send_to("node\ud800", b"x"), InvalidPeerId)


class EncodingTests(SynchronousTestCase):
    def test_bytes_round_trip(self) -> None:
        """
        A string id's bytes decode back to it; bytes that are not valid
        UTF-8 or of a wrong length are refused.
        """
        for peer in ("a", "é", "node 7", "x" * 255):
            self.assertEqual(id_from_bytes(id_bytes(peer)), peer)
        for raw in (b"", b"\xff", b"\xed\xa0\x80", b"x" * 256):
            self.assertRaises(InvalidPeerId, id_from_bytes, raw)

    def test_wire_agrees(self) -> None:
        """
        Every id ``check_peer_id`` accepts survives the link wire format,
        so a node can always complete a handshake with an id it accepted.
        """
        for peer in (0, 2**63 - 1, "a", "é" * 127, "x" * 255):
            encoded = _wire.encode_id(check_peer_id(peer))
            self.assertEqual(_wire.decode_id(encoded, 0), (peer, len(encoded)))

    def test_order(self) -> None:
        """
        Ints come before strings; ints by value, strings by UTF-8 bytes.
        """
        ids = ["b", 10, "é", 2, "ab", "a"]
        self.assertEqual(sorted(ids, key=id_order_key), [2, 10, "a", "ab", "b", "é"])


class TextTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        Every kind of id survives text and back: ints, digit strings,
        strings with spaces, percent signs, slashes, non-ASCII, and a
        string that itself starts with ``str:``; the text is ASCII without
        a slash, fit for a URL path segment or a header.
        """
        for peer in (0, 7, 2**63 - 1, "7", "node a", "50%", "a/b", "é", "str:x"):
            text = peer_id_to_text(peer)
            self.assertTrue(text.isascii())
            self.assertNotIn("/", text)
            self.assertEqual(peer_id_from_text(text), peer)
        self.assertEqual(peer_id_to_text("7"), "str:7")
        self.assertEqual(peer_id_from_text("str:7"), "7")
        self.assertEqual(peer_id_from_text("node%20a"), "node a")

    def test_invalid(self) -> None:
        """
        Out-of-range ints, empty strings and bad percent-encoding are
        refused with ``InvalidPeerId`` (a ``ValueError``).
        """
        for text in (str(2**63), "str:", "%ff", "%ed%a0%80"):
            with self.assertRaises(InvalidPeerId):
                peer_id_from_text(text)
        self.assertTrue(issubclass(InvalidPeerId, ValueError))
