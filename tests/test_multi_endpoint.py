"""
Peers with several addresses: a ``StreamNetwork(peers=...)`` entry listing
several endpoints (the gateways of one node), dialled in turn, the next one
after a failed attempt or a lost link; every string checked up front; and
``twistd ilm --peer ID=ENDPOINT`` given several times for one id.
"""

from __future__ import annotations

import os
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm import PeerId
from ilm._backoff import Backoff
from ilm.errors import ConfigurationError
from ilm.network import LinkSettings, StreamNetwork
from ilm.testing import settle

from .stream_support import RecordingReceiver, Switchboard

KEY = b"k" * 32


class Gateways:
    """
    Node 1 dials node 2, whose gateways listen on the switchboard
    addresses ``"gw-a"`` and ``"gw-b"`` (each a StreamNetwork of node 2).
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.board = Switchboard(self.clock, latency=0.001)
        self.random = random.Random(0)
        self.settings = LinkSettings(
            reconnect=Backoff(initial=0.05, maximum=0.2, jitter=0.0)
        )
        self.dialler_receiver = RecordingReceiver()
        self.dialler = StreamNetwork(
            1,
            peers={2: [self.board.client("gw-a"), self.board.client("gw-b")]},
            keys={2: KEY},
            settings=self.settings,
            reactor=self.clock,
            random=self.random.random,
            random_bytes=self.random.randbytes,
        )
        self.gateways: dict[str, StreamNetwork] = {}
        self.receivers: dict[str, RecordingReceiver] = {}

    def start_gateway(self, name: str) -> None:
        network = StreamNetwork(
            2,
            listen=[self.board.server(name)],
            keys={1: KEY},
            settings=self.settings,
            reactor=self.clock,
            random=self.random.random,
            random_bytes=self.random.randbytes,
        )
        receiver = RecordingReceiver()
        network.start(receiver)
        self.gateways[name] = network
        self.receivers[name] = receiver

    def linked_at(self) -> list[str]:
        """The gateways on which a link from node 1 is up now."""
        return [
            name
            for name, network in self.gateways.items()
            if 1 in network.connected_peers()
        ]

    def settle(self, seconds: float = 1.0) -> None:
        settle(self.clock, seconds)


class DialInTurnTests(SynchronousTestCase):
    def test_next_address_after_a_failed_attempt(self) -> None:
        """
        With the first address dead, the dialler reaches the peer at the
        second one.
        """
        gateways = Gateways()
        gateways.start_gateway("gw-b")
        gateways.dialler.start(gateways.dialler_receiver)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-b"])
        self.assertEqual(gateways.dialler.connected_peers(), frozenset({2}))
        self.assertGreaterEqual(gateways.board.attempts.get("gw-a", 0), 1)

    def test_next_address_after_a_lost_link(self) -> None:
        """
        A link lost at one address is dialled again at the next one, even
        when the first is alive (the node's gateways take turns).
        """
        gateways = Gateways()
        gateways.start_gateway("gw-a")
        gateways.start_gateway("gw-b")
        gateways.dialler.start(gateways.dialler_receiver)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-a"])
        gateways.board.cut_all()
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-b"])
        gateways.board.cut_all()
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-a"])
        self.assertEqual(
            gateways.dialler_receiver.kinds(),
            ["established", "lost", "established", "lost", "established"],
        )

    def test_failover_to_the_surviving_gateway(self) -> None:
        """
        The gateway holding the link dies: the dialler links with the other
        one, and back with the first once it alone is alive again.
        """
        gateways = Gateways()
        gateways.start_gateway("gw-a")
        gateways.start_gateway("gw-b")
        gateways.dialler.start(gateways.dialler_receiver)
        gateways.settle()
        gateways.gateways.pop("gw-a").abort()
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-b"])
        gateways.gateways.pop("gw-b").abort()
        gateways.start_gateway("gw-a")
        gateways.settle(2.0)
        self.assertEqual(gateways.linked_at(), ["gw-a"])
        self.assertEqual(gateways.dialler.connected_peers(), frozenset({2}))


class HeldDialsTests(SynchronousTestCase):
    def test_dial_only_when_told(self) -> None:
        """
        After hold_dials, a configured peer is dialled only between dial()
        and stop_dialling(); stopping closes the link this node dialled,
        and a link the peer dialled is left alone.
        """
        gateways = Gateways()
        gateways.start_gateway("gw-a")
        dialler = gateways.dialler
        dialler.hold_dials()
        dialler.start(gateways.dialler_receiver)
        gateways.settle()
        self.assertEqual(gateways.board.attempts.get("gw-a", 0), 0)
        self.assertEqual(gateways.linked_at(), [])
        dialler.dial(2)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-a"])
        dialler.stop_dialling(2)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), [])
        attempts = gateways.board.attempts.get("gw-a", 0)
        gateways.settle(2.0)
        self.assertEqual(gateways.board.attempts.get("gw-a", 0), attempts)
        self.assertEqual(gateways.dialler_receiver.kinds(), ["established", "lost"])
        # Dialling again after stopping links again.
        dialler.dial(2)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-a"])

    def test_not_held_dials_every_peer(self) -> None:
        """Without hold_dials, dial() and stop_dialling() change nothing."""
        gateways = Gateways()
        gateways.start_gateway("gw-a")
        gateways.dialler.start(gateways.dialler_receiver)
        gateways.dialler.stop_dialling(2)
        gateways.settle()
        self.assertEqual(gateways.linked_at(), ["gw-a"])


class ValidationTests(SynchronousTestCase):
    def network(self, addresses: object) -> StreamNetwork:
        return StreamNetwork(
            1,
            peers={2: addresses},  # type: ignore[dict-item]
            keys={2: KEY},
            reactor=Clock(),
        )

    def test_every_string_checked_up_front(self) -> None:
        """
        A bad endpoint anywhere in the list fails when the network is made,
        in one line naming the peer and the string.
        """
        error = self.assertRaises(
            ConfigurationError,
            self.network,
            ["tcp:host=a:port=1", "tcp:host=b:port=notaport"],
        )
        self.assertIn("endpoint of peer 2, 'tcp:host=b:port=notaport'", str(error))
        self.assertNotIn("\n", str(error))

    def test_empty_and_repeated(self) -> None:
        """
        An empty list and a string given twice are refused, naming the peer.
        """
        error = self.assertRaises(ConfigurationError, self.network, [])
        self.assertIn("peer 2 has an empty list of endpoints", str(error))
        error = self.assertRaises(
            ConfigurationError, self.network, ("tcp:host=a:port=1",) * 2
        )
        self.assertIn("'tcp:host=a:port=1', is given twice", str(error))

    def test_one_string_or_several(self) -> None:
        """
        A string, a one-element list and a tuple of several are accepted.
        """
        for addresses in (
            "tcp:host=a:port=1",
            ["tcp:host=a:port=1"],
            ("tcp:host=a:port=1", "unix:/tmp/gw.sock"),
        ):
            self.assertEqual(self.network(addresses).dialled_peers(), {2})


class TwistdPeerTests(SynchronousTestCase):
    def options(self, *arguments: str) -> tuple[dict[PeerId, list[str]], list[str]]:
        """
        The peers that ``twistd ilm --id 2 ... arguments`` would dial, and
        the lines of its usage error.
        """
        from twisted.python import usage

        from ilm._twistd import Options

        keys = self.mktemp()
        with open(keys, "w") as f:
            f.write(f"1 {KEY.hex()}\n")
        os.chmod(keys, 0o600)
        options = Options()
        try:
            options.parseOptions(["--id", "2", "--keys", keys, *arguments])
        except usage.UsageError as e:
            return {}, str(e).splitlines()
        return options["peers"], []

    def test_several_addresses_for_one_peer(self) -> None:
        """
        ``--peer`` given twice for one id lists both addresses, in order.
        """
        peers, problems = self.options(
            "--peer", "1=tcp:host=a:port=1", "--peer", "1=tcp:host=b:port=2"
        )
        self.assertEqual(problems, [])
        self.assertEqual(peers, {1: ["tcp:host=a:port=1", "tcp:host=b:port=2"]})

    def test_bad_second_address(self) -> None:
        """
        A bad second address of a peer is one line naming the peer.
        """
        _, problems = self.options(
            "--peer", "1=tcp:host=a:port=1", "--peer", "1=tcp:host=b:port=x"
        )
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("endpoint of peer 1, 'tcp:host=b:port=x'", problems[0])
