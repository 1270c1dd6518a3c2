"""
ILM nodes over stream networks on in-memory pipes and a ``Clock``:
exactly-once in-order delivery in both directions while connections are
cut (losing what is in flight) and nodes crash and restart; and hostile
session-level input from an authenticated peer.
"""

from __future__ import annotations

import os
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM, Config, PeerId
from ilm.network import Backoff, LinkSettings, StreamNetwork
from ilm.testing import ClockTimeout, InMemoryBackend, advance_until

from .stream_chaos import Chaos
from .stream_support import Switchboard
from .test_stream_network import LogCapture, Nodes, authenticate, pair_key

CHAOS_SEED = int(os.environ.get("ILM_CHAOS_SEED", "20261126"))


def memory_chaos(seed: int, duration: float, kill_interval: float) -> Chaos:
    clock = Clock()
    board = Switchboard(clock, latency=0.0005)
    rng = random.Random(seed ^ 0x5EED)
    settings = LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.2))

    def make(node_id: PeerId) -> StreamNetwork:
        other = 2 if node_id == 1 else 1
        return StreamNetwork(
            node_id,
            listen=[board.server(str(node_id))],
            peers={other: board.client(str(other))},
            keys={other: pair_key(1, 2)},
            settings=settings,
            reactor=clock,
            random=rng.random,
            random_bytes=rng.randbytes,
        )

    chaos = Chaos(
        clock, make, seed=seed, duration=duration, kill_interval=kill_interval
    )
    chaos.run()
    try:
        advance_until(clock, chaos.settled, timeout=300)
    except ClockTimeout:
        raise AssertionError(f"did not settle: {chaos.summary()}")
    chaos.check()
    if os.environ.get("ILM_CHAOS_VERBOSE"):
        print(chaos.summary())
    return chaos


class ChaosTests(SynchronousTestCase):
    def test_cuts_and_crashes(self) -> None:
        """
        Over 50 links killed mid-stream and node crashes at random moments, with
        streams in both directions: every accepted message is delivered
        exactly once and in order (seed printed on failure; set
        ILM_CHAOS_SEED to replay).
        """
        for seed in (CHAOS_SEED, CHAOS_SEED + 1):
            chaos = memory_chaos(seed, duration=8.0, kill_interval=0.1)
            self.assertGreaterEqual(chaos.cuts, 50, chaos.summary())
            self.assertGreaterEqual(chaos.crashes, 5, chaos.summary())


class HostileSessionTests(SynchronousTestCase):
    """
    An authenticated peer that breaks ILM's session protocol loses its link
    with a typed reason; the node's other streams go on and nothing is lost.
    """

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.nodes = Nodes()
        clock = self.nodes.clock
        board = self.nodes.board
        self.received: list[bytes] = []
        self.ilms: dict[PeerId, ILM] = {}
        for node_id, dial in ((2, ()), (3, (2,))):
            peers = (1, 3) if node_id == 2 else (2,)
            network = StreamNetwork(
                node_id,
                listen=[board.server(str(node_id))],
                peers={p: board.client(str(p)) for p in dial},
                keys={p: pair_key(node_id, p) for p in peers},
                reactor=clock,
            )
            node = ILM(
                InMemoryBackend(),
                lambda m: self.received.append(m.contents),
                network,
                config=Config(),
                clock=clock,
            )
            node.startService()
            self.ilms[node_id] = node
        self.nodes.settle(1.0)

    def attack(self, *session_frames: bytes) -> None:
        from ilm import _frames
        from ilm._session import Hello

        raw = authenticate(self.nodes, 1, 2, pair_key(1, 2))
        hello = _frames.encode_resume(
            Hello(
                version=1,
                incarnation="ab" * 16,
                window=10,
                window_bytes=10_000,
                first_unacked=1,
                last_position=0,
                known_incarnation=None,
                delivered=0,
            )
        )
        raw.send(*(raw.data(frame) for frame in (hello, *session_frames)))
        sends = [self.ilms[3].send_to(2, b"m%d" % i) for i in range(100)]
        self.nodes.settle(2.0)
        self.assertIsNotNone(raw.lost)
        for d in sends:
            self.successResultOf(d)
        self.assertEqual(self.received, [b"m%d" % i for i in range(100)])
        self.assertEqual(self.ilms[2].connected_peers(), frozenset({3}))

    def violations(self) -> list[str]:
        return [str(e["kind"]) for e in self.logs.named("protocol_violation")]

    def test_ack_for_messages_never_sent(self) -> None:
        """
        An ACK for positions never stored closes the link: AckOutOfRange.
        """
        from ilm import _frames

        self.attack(_frames.encode_ack(5, 5))
        self.assertEqual(self.violations(), ["AckOutOfRange"])
        [closed] = self.logs.named("link_closed")
        self.assertEqual(closed["peer_id"], 1)

    def test_data_out_of_window(self) -> None:
        """
        DATA far beyond the announced window closes the link: OutOfWindow.
        """
        from ilm import _frames

        [frame] = _frames.encode_messages(Config().window + 5000, [b"x"], 1 << 16)
        self.attack(frame)
        self.assertEqual(self.violations(), ["OutOfWindow"])

    def test_garbage_session_frame(self) -> None:
        """
        An undecodable session frame inside a valid link frame closes the
        link: UnknownFrameType.
        """
        self.attack(b"\x7fjunk")
        self.assertEqual(self.violations(), ["UnknownFrameType"])
