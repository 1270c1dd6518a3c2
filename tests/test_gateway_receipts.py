"""
Receipts across a take-over: a gateway that takes a peer's stream again
restarts the peer's state from the grant (``GatewayStreams.restart``); the
receipts it gave before still fire once the message is acknowledged.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM
from ilm._store import OutboundRecord
from ilm.network import InMemoryNetwork
from ilm.simulation._gateways import GatewayBackend, SharedStore
from ilm.testing import settle


class TakeOverReceiptTests(SynchronousTestCase):
    def gateway(self) -> tuple[Clock, GatewayBackend, ILM]:
        """
        Gateway "a" of node 1 on a simulated shared store, started.
        """
        clock = Clock()
        store = SharedStore(clock, lease_duration=1.0)
        backend = GatewayBackend(store, "a", lambda: 0.01, lambda: True)
        network = InMemoryNetwork(clock).add_peer(1)
        node = ILM(backend, lambda message: None, network, clock=clock)
        node.startService()
        settle(clock, 0.1)
        return clock, backend, node

    def test_receipt_given_before_a_take_over(self) -> None:
        """
        A receipt given before the peer restarted from a grant still fires
        once the shared store records its message acknowledged (by the
        gateway that serves the peer), and nothing is left pending.
        """
        clock, backend, node = self.gateway()
        sent = node.send_to(2, b"x")
        settle(clock, 0.1)
        receipt = self.successResultOf(sent)
        taken = backend.acquire(2)
        settle(clock, 0.1)
        streams = node._router.streams
        assert streams is not None
        streams.restart(2, self.successResultOf(taken))
        acknowledged = receipt.acknowledged
        self.assertNoResult(acknowledged)
        streams.caught_up(2, OutboundRecord(2, 1, 1, 0))
        self.assertIs(self.successResultOf(acknowledged), receipt)
        self.assertEqual(node.pending_outbound(), {})

    def test_uncommitted_sends_keep_their_bytes(self) -> None:
        """
        Sends not yet committed when the stream is taken again carry over
        with their size (the outbox byte limit keeps counting them) and
        their acceptance time.
        """
        clock, backend, node = self.gateway()
        first = node.send_to(2, b"x")
        settle(clock, 0.1)
        self.successResultOf(first)
        acquiring = backend.acquire(2)
        settle(clock, 0.1)
        taken = self.successResultOf(acquiring)
        clock.advance(0.5)
        before = node._core.peers[2].sender
        sent = node.send_to(2, b"y" * 1000)
        self.assertEqual(len(before.pending), 1)
        accepted_at = before.accepted_at
        streams = node._router.streams
        assert streams is not None
        streams.restart(2, taken)
        after = node._core.peers[2].sender
        self.assertIsNot(after, before)
        self.assertEqual(after.pending, [b"y" * 1000])
        self.assertGreaterEqual(after.outbox_bytes, 1000)
        self.assertEqual(after.accepted_at, accepted_at)
        settle(clock, 0.1)
        self.assertEqual(self.successResultOf(sent).message_id, 2)
