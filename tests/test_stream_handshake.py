"""
The link handshake as a pure state machine: mutual pre-shared-key
authentication, certificate identities, and every way it refuses a peer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm import PeerId
from ilm.errors import (
    AuthenticationFailed,
    ConfigurationError,
    FrameIntegrityMismatch,
    MalformedFrame,
    ProtocolViolation,
    SpoofedPeer,
    UnexpectedFrame,
    UnsupportedVersion,
)
from ilm.network import PreSharedKeys, StreamNetwork, _wire
from ilm.network._handshake import KeySearchBudget, LinkHandshake

AB = b"a" * 16 + b"b" * 16
AC = b"a" * 16 + b"c" * 16
BC = b"b" * 16 + b"c" * 16


def counter_bytes() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: bytes([next(counter) % 256]) * n


def no_certificate() -> PeerId:
    raise AssertionError("no certificate expected")


def frames_of(wire: list[bytes]) -> list[tuple[int, bytes]]:
    parser = _wire.FrameParser(1 << 16)
    for chunk in wire:
        parser.feed(chunk)
    out = []
    while (frame := parser.next_frame()) is not None:
        out.append(frame)
    return out


def exchange(
    initiator: LinkHandshake,
    responder: LinkHandshake,
    initiator_cert: Callable[[], PeerId] = no_certificate,
    responder_cert: Callable[[], PeerId] = no_certificate,
) -> list[tuple[int, bytes]]:
    """
    Run the handshake to completion; return every frame exchanged.
    """
    transcript = []
    responder.start()
    to_responder = frames_of(initiator.start())
    while to_responder:
        to_initiator = []
        for kind, body in to_responder:
            transcript.append((kind, body))
            to_initiator += frames_of(responder.receive(kind, body, responder_cert))
        to_responder = []
        for kind, body in to_initiator:
            transcript.append((kind, body))
            to_responder += frames_of(initiator.receive(kind, body, initiator_cert))
    return transcript


def node(
    local: PeerId,
    destination: PeerId | None,
    keys: dict[PeerId, bytes] | None,
    certificates: bool = False,
    frame_integrity: bool = True,
) -> LinkHandshake:
    return LinkHandshake(
        local,
        destination,
        keys=PreSharedKeys(keys) if keys is not None else None,
        certificates=certificates,
        frame_integrity=frame_integrity,
        random_bytes=counter_bytes(),
    )


class PreSharedKeyTests(SynchronousTestCase):
    def test_mutual_success(self) -> None:
        """
        Two nodes sharing a key authenticate each other in four frames; each
        learns the other's id.
        """
        a = node(1, 2, {2: AB})
        b = node(2, None, {1: AB, 3: BC})
        transcript = exchange(a, b)
        self.assertEqual(
            [kind for kind, _ in transcript],
            [
                _wire.LINK_HELLO,
                _wire.LINK_CHALLENGE,
                _wire.LINK_PROOF,
                _wire.LINK_ACCEPT,
            ],
        )
        self.assertTrue(a.done and b.done)
        self.assertEqual((a.peer_id, b.peer_id), (2, 1))

    def test_wrong_key(self) -> None:
        """
        A proof made with the wrong key fails with AuthenticationFailed, and
        the responder answers nothing to it.
        """
        a = node(1, 2, {2: AC})
        b = node(2, None, {1: AB})
        b.start()
        [(kind, body)] = frames_of(a.start())
        [(kind, body)] = frames_of(b.receive(kind, body, no_certificate))
        [(kind, body)] = frames_of(a.receive(kind, body, no_certificate))
        self.assertRaises(AuthenticationFailed, b.receive, kind, body, no_certificate)
        self.assertFalse(b.done)

    def test_unknown_peer_indistinguishable(self) -> None:
        """
        A peer whose id is not configured gets the same CHALLENGE as a known
        one (so it cannot probe which ids exist) and fails at its proof.
        """
        b = node(2, None, {1: AB})
        b.start()
        stranger = node(9, 2, {2: b"z" * 32})
        [(kind, body)] = frames_of(stranger.start())
        challenge = frames_of(b.receive(kind, body, no_certificate))
        self.assertEqual([k for k, _ in challenge], [_wire.LINK_CHALLENGE])
        [(kind, body)] = frames_of(stranger.receive(*challenge[0], no_certificate))
        error = self.assertRaises(
            AuthenticationFailed, b.receive, kind, body, no_certificate
        )
        self.assertIn("not configured", str(error))

    def test_spoofed_with_own_key(self) -> None:
        """
        Node 3 claiming to be node 1, proving with its own key (shared with
        the responder), is SpoofedPeer naming both ids.
        """
        b = node(2, None, {1: AB, 3: BC})
        b.start()
        liar = LinkHandshake(
            1, 2, keys=PreSharedKeys({2: BC}), certificates=False, random_bytes=bytes
        )
        [(kind, body)] = frames_of(liar.start())
        [(kind, body)] = frames_of(b.receive(kind, body, no_certificate))
        [(kind, body)] = frames_of(liar.receive(kind, body, no_certificate))
        error = self.assertRaises(SpoofedPeer, b.receive, kind, body, no_certificate)
        self.assertIn("claims to be 1", str(error))
        self.assertIn("key of 3", str(error))

    def test_replay_fails(self) -> None:
        """
        A proof recorded from one handshake does not pass on another: the
        responder's nonce differs.
        """
        a = node(1, 2, {2: AB})
        b = node(2, None, {1: AB})
        transcript = exchange(a, b)
        hello, proof = transcript[0], transcript[2]
        replayed = LinkHandshake(
            2,
            None,
            keys=PreSharedKeys({1: AB}),
            certificates=False,
            random_bytes=lambda n: b"\x99" * n,
        )
        replayed.start()
        replayed.receive(*hello, no_certificate)
        self.assertRaises(
            AuthenticationFailed, replayed.receive, *proof, no_certificate
        )

    def test_reflection_fails(self) -> None:
        """
        The responder's ACCEPT MAC, presented back as an initiator's PROOF on
        a link with the same nonces, does not verify: the roles differ.
        """
        nonces = [bytes([1]) * 32, bytes([2]) * 32]
        a = LinkHandshake(
            1,
            2,
            keys=PreSharedKeys({2: AB}),
            certificates=False,
            random_bytes=lambda n: nonces[0],
        )
        b = LinkHandshake(
            2,
            None,
            keys=PreSharedKeys({1: AB}),
            certificates=False,
            random_bytes=lambda n: nonces[1],
        )
        transcript = exchange(a, b)
        accept_mac = transcript[3][1]
        victim = LinkHandshake(
            2,
            None,
            keys=PreSharedKeys({1: AB}),
            certificates=False,
            random_bytes=lambda n: nonces[1],
        )
        victim.start()
        victim.receive(*transcript[0], no_certificate)
        self.assertRaises(
            AuthenticationFailed,
            victim.receive,
            _wire.LINK_PROOF,
            accept_mac,
            no_certificate,
        )

    def test_impostor_responder(self) -> None:
        """
        A responder that does not hold the key (it accepts anything and
        answers with a made-up MAC) fails the initiator's check.
        """
        a = node(1, 2, {2: AB})
        impostor = node(2, None, {1: AC})
        impostor.start()
        [(kind, body)] = frames_of(a.start())
        [(kind, body)] = frames_of(impostor.receive(kind, body, no_certificate))
        a.receive(kind, body, no_certificate)
        self.assertRaises(
            AuthenticationFailed,
            a.receive,
            _wire.LINK_ACCEPT,
            b"\x00" * 32,
            no_certificate,
        )

    def test_wrong_destination_and_self(self) -> None:
        """
        A HELLO addressed to another node, or claiming the responder's own
        id, gets the same CHALLENGE as a correct one (a stranger cannot probe
        for the responder's id), and is refused as AuthenticationFailed at
        the proof.
        """
        for source, destination in ((1, 3), (2, 2), (1, 2)):
            b = node(2, None, {1: AB})
            b.start()
            hello = _wire.encode_hello(
                _wire.LinkHello(_wire.LINK_VERSION, b"n" * 32, source, destination)
            )
            [(kind, body)] = frames_of([hello])
            [reply] = frames_of(b.receive(kind, body, no_certificate))
            self.assertEqual(reply[0], _wire.LINK_CHALLENGE)
            if (source, destination) == (1, 2):
                continue  # the correct HELLO, for comparison
            proof = frames_of(
                [_wire.encode_frame(_wire.LINK_PROOF, b"m" * _wire.MAC_SIZE)]
            )
            [(kind, body)] = proof
            self.assertRaises(
                AuthenticationFailed, b.receive, kind, body, no_certificate
            )

    def test_wrong_version(self) -> None:
        """
        A HELLO of another stream-transport version is UnsupportedVersion.
        """
        b = node(2, None, {1: AB})
        b.start()
        hello = frames_of(
            [_wire.encode_hello(_wire.LinkHello(_wire.LINK_VERSION, b"n" * 32, 1, 2))]
        )[0][1]
        bad = hello[:4] + b"\x00\x07" + hello[6:]
        self.assertRaises(
            UnsupportedVersion, b.receive, _wire.LINK_HELLO, bad, no_certificate
        )

    def test_out_of_order(self) -> None:
        """
        Frames out of order (a PROOF first, a second HELLO, DATA) are
        UnexpectedFrame; a malformed CHALLENGE is MalformedFrame.
        """
        b = node(2, None, {1: AB})
        b.start()
        self.assertRaises(
            UnexpectedFrame, b.receive, _wire.LINK_PROOF, b"", no_certificate
        )
        self.assertRaises(UnexpectedFrame, b.receive, _wire.CARRY, b"x", no_certificate)
        a = node(1, 2, {2: AB})
        a.start()
        self.assertRaises(
            UnexpectedFrame, a.receive, _wire.LINK_HELLO, b"", no_certificate
        )
        self.assertRaises(
            MalformedFrame, a.receive, _wire.LINK_CHALLENGE, b"x", no_certificate
        )

    def test_frame_keys(self) -> None:
        """
        After a pre-shared-key handshake both sides hold the same two frame
        keys, each side sending under the key the other receives under;
        with frame integrity off on both sides there are none.
        """
        a, b = node(1, 2, {2: AB}), node(2, None, {1: AB})
        self.assertIsNone(a.frame_keys)
        exchange(a, b)
        a_keys, b_keys = a.frame_keys, b.frame_keys
        assert a_keys is not None and b_keys is not None
        self.assertEqual(a_keys, (b_keys[1], b_keys[0]))
        self.assertNotEqual(a_keys[0], a_keys[1])
        a = node(1, 2, {2: AB}, frame_integrity=False)
        b = node(2, None, {1: AB}, frame_integrity=False)
        exchange(a, b)
        self.assertTrue(a.done and b.done)
        self.assertEqual((a.frame_keys, b.frame_keys), (None, None))

    def test_frame_integrity_mismatch(self) -> None:
        """
        When one side tags frames and the other does not, neither links:
        the initiator still sends its proof and then refuses
        (``refusal``), and the responder, having checked that proof,
        refuses with FrameIntegrityMismatch naming the peer.  Either way
        round.
        """
        for initiator_tags in (True, False):
            a = node(1, 2, {2: AB}, frame_integrity=initiator_tags)
            b = node(2, None, {1: AB}, frame_integrity=not initiator_tags)
            b.start()
            [(kind, body)] = frames_of(a.start())
            [(kind, body)] = frames_of(b.receive(kind, body, no_certificate))
            [(kind, body)] = frames_of(a.receive(kind, body, no_certificate))
            self.assertEqual(kind, _wire.LINK_PROOF)
            self.assertIsInstance(a.refusal, FrameIntegrityMismatch)
            error = self.assertRaises(
                FrameIntegrityMismatch, b.receive, kind, body, no_certificate
            )
            self.assertIn("peer 1", str(error))
            self.assertFalse(a.done or b.done)

    def test_flags_changed_on_the_way(self) -> None:
        """
        Flags changed on the way (to make a side believe the other does not
        tag frames) break the proofs: the responder refuses with
        AuthenticationFailed, whichever flags it then saw.
        """
        a, b = node(1, 2, {2: AB}), node(2, None, {1: AB})
        b.start()
        [(kind, body)] = frames_of(a.start())
        hello = _wire.decode_hello(body)
        altered = attr.evolve(hello, flags=0)
        [(kind, body)] = frames_of([_wire.encode_hello(altered)])
        [(kind, body)] = frames_of(b.receive(kind, body, no_certificate))
        nonce, _flags = _wire.decode_challenge(body)
        [(kind, body)] = frames_of(
            a.receive(
                _wire.LINK_CHALLENGE,
                nonce + bytes([_wire.FLAG_FRAME_TAGS]),
                no_certificate,
            )
        )
        self.assertIsNone(a.refusal)
        self.assertRaises(AuthenticationFailed, b.receive, kind, body, no_certificate)

    def test_spoofer_search_is_budgeted(self) -> None:
        """
        Naming the real author of a failed proof costs one HMAC per key: a
        node with 256 keys spends at most its budget (512 trials a second
        here) on it, and past that reports AuthenticationFailed without
        searching; the budget refills with time.  With more than 256 keys
        there is no search at all.
        """
        now = [0.0]
        budget = KeySearchBudget(512, lambda: now[0])
        keys = {n: n.to_bytes(2, "big") * 16 for n in range(1, 257)}

        def attempt(keys: dict[PeerId, bytes]) -> ProtocolViolation:
            b = LinkHandshake(
                1000,
                None,
                keys=PreSharedKeys(keys),
                certificates=False,
                key_search=budget.take,
            )
            b.start()
            liar = LinkHandshake(
                1, 1000, keys=PreSharedKeys({1000: keys[3]}), certificates=False
            )
            [(kind, body)] = frames_of(liar.start())
            [(kind, body)] = frames_of(b.receive(kind, body, no_certificate))
            [(kind, body)] = frames_of(liar.receive(kind, body, no_certificate))
            return self.assertRaises(
                ProtocolViolation, b.receive, kind, body, no_certificate
            )

        outcomes = [type(attempt(keys)) for _ in range(5)]
        self.assertEqual(outcomes, [SpoofedPeer] * 2 + [AuthenticationFailed] * 3)
        self.assertEqual((budget.spent, budget.skipped), (512, 3))
        now[0] = 0.5
        self.assertIsInstance(attempt(keys), SpoofedPeer)
        self.assertEqual(budget.spent, 768)
        now[0] = 10.0
        many = {**keys, 257: b"\x01\x02" * 16}
        self.assertIs(type(attempt(many)), AuthenticationFailed)
        self.assertEqual(budget.spent, 768)

    def test_initiator_without_key(self) -> None:
        """
        Dialling a peer for which no key is configured fails at once.
        """
        a = node(1, 5, {2: AB})
        self.assertRaises(AuthenticationFailed, a.start)

    def test_keys_validated(self) -> None:
        """
        Keys shorter than 16 bytes, non-bytes keys and invalid ids are
        refused.
        """
        self.assertRaises(ValueError, PreSharedKeys, {1: b"short"})
        self.assertRaises(ValueError, PreSharedKeys, {1: "a" * 32})
        self.assertRaises(TypeError, PreSharedKeys, {1.5: AB})
        self.assertRaises(
            ValueError, LinkHandshake, 1, 2, keys=None, certificates=False
        )

    def test_same_key_for_two_peers_refused(self) -> None:
        """
        One key value configured for two peers is a ConfigurationError that
        names both peers and not the key (one of them could otherwise be
        authenticated as the other); the same key under one peer is fine.
        """
        key = b"shared by mistake, 32 bytes long"
        with self.assertRaises(ConfigurationError) as caught:
            PreSharedKeys({2: key, 5: b"another key of 32 bytes, unique!", 3: key})
        message = str(caught.exception)
        self.assertIn("peers 2 and 3", message)
        self.assertNotIn(key.decode(), message)
        self.assertNotIn(key.hex(), message)
        self.assertEqual(PreSharedKeys({2: key}).peers(), frozenset({2}))
        with self.assertRaises(ConfigurationError):
            StreamNetwork(1, keys={"a": key, "b": key}, reactor=Clock())


class CertificateTests(SynchronousTestCase):
    def test_certificates_only(self) -> None:
        """
        With certificates and no keys, identities come from the certificate
        callbacks and the MACs are empty.
        """
        a = node(1, 2, None, certificates=True)
        b = node(2, None, None, certificates=True)
        transcript = exchange(a, b, initiator_cert=lambda: 2, responder_cert=lambda: 1)
        self.assertEqual((a.peer_id, b.peer_id), (2, 1))
        self.assertEqual([body for kind, body in transcript[2:]], [b"", b""])

    def test_spoofed_by_certificate(self) -> None:
        """
        A claimed id that differs from the certificate's is SpoofedPeer, on
        either side.
        """
        b = node(2, None, None, certificates=True)
        a = node(1, 2, None, certificates=True)
        self.assertRaises(SpoofedPeer, exchange, a, b, lambda: 2, lambda: 3)
        b = node(2, None, None, certificates=True)
        a = node(1, 2, None, certificates=True)
        self.assertRaises(SpoofedPeer, exchange, a, b, lambda: 4, lambda: 1)

    def test_certificate_refused(self) -> None:
        """
        A certificate that proves nothing stops the handshake with the
        callback's AuthenticationFailed.
        """

        def refuse() -> PeerId:
            raise AuthenticationFailed("certificate not pinned")

        b = node(2, None, None, certificates=True)
        a = node(1, 2, None, certificates=True)
        self.assertRaises(AuthenticationFailed, exchange, a, b, lambda: 2, refuse)

    def test_both_methods(self) -> None:
        """
        With certificates and keys, both must pass: a good certificate with
        the wrong key fails.
        """
        a = node(1, 2, {2: AB}, certificates=True)
        b = node(2, None, {1: AB}, certificates=True)
        exchange(a, b, lambda: 2, lambda: 1)
        self.assertTrue(a.done and b.done)
        a = node(1, 2, {2: AC}, certificates=True)
        b = node(2, None, {1: AB}, certificates=True)
        self.assertRaises(AuthenticationFailed, exchange, a, b, lambda: 2, lambda: 1)

    def test_mixed_methods_refused(self) -> None:
        """
        A peer that sends a key proof to a node that uses none (or none to a
        node that needs one) fails.
        """
        a = node(1, 2, {2: AB}, certificates=True)
        b = node(2, None, None, certificates=True)
        self.assertRaises(AuthenticationFailed, exchange, a, b, lambda: 2, lambda: 1)
        a = node(1, 2, None, certificates=True)
        b = node(2, None, {1: AB}, certificates=True)
        self.assertRaises(AuthenticationFailed, exchange, a, b, lambda: 2, lambda: 1)
