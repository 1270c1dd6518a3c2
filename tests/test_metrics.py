"""
The Prometheus metrics: scraped over a real port with treq and parsed with
``prometheus_client``'s own parser, so the text is valid exposition format
and every value is read from the node's public snapshots.
"""

from __future__ import annotations

from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from ilm import ILM, Config
from ilm._metrics import MetricsResource, NodeCollector, node_registry
from ilm.errors import ShutdownTimeout
from ilm.testing import InMemoryBackend, InMemoryNetwork


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a scrape, by name and sorted labels.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.network = InMemoryNetwork(reactor)
        self.received: list[Any] = []
        self.node = yield ILM.create(
            InMemoryBackend(), lambda m: None, self.network.add_peer(1)
        )
        self.peer = yield ILM.create(
            InMemoryBackend(),
            self.received.append,
            self.network.add_peer(2),
            config=Config(max_outbox_messages=1000),
        )
        self.addCleanup(self._stop)

    @inlineCallbacks
    def _stop(self) -> Any:
        for node in (self.node, self.peer):
            if node.state not in ("stopped", "failed"):
                try:
                    yield node.shutdown(0.5)
                except ShutdownTimeout:
                    pass  # messages to absent peers stay stored

    @inlineCallbacks
    def serve(self, node: ILM, network: Any, per_peer: bool = False) -> Any:
        collector = NodeCollector(
            node, reactor, network, per_peer=per_peer, version="9.9"
        )
        resource = MetricsResource(node_registry(collector), reactor)
        self.addCleanup(resource.stop)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(resource)
        )
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def scrape(self, base: str, path: str = "/metrics") -> Any:
        response = yield treq.get(base + path, persistent=False)
        body = yield response.text()
        return response.code, response.headers, body

    @inlineCallbacks
    def test_counts_after_traffic(self) -> Any:
        """
        After 5 messages are acknowledged, the sender's counters say 5 sent,
        stored and acknowledged, nothing pending, one peer linked; the
        receiver's say 5 delivered; the text is Prometheus' own format.
        """
        base = yield self.serve(self.node, None)
        receiver = yield self.serve(self.peer, None)
        for i in range(5):
            receipt = yield self.node.send_to(2, b"x" * (i + 1))
        yield receipt.acknowledged
        code, headers, body = yield self.scrape(base)
        self.assertEqual(code, 200)
        self.assertIn(b"text/plain", headers.getRawHeaders(b"content-type")[0])
        found = samples(body)
        self.assertEqual(found[("ilm_messages_sent_total", ())], 5)
        self.assertEqual(found[("ilm_messages_stored_total", ())], 5)
        self.assertEqual(found[("ilm_messages_acknowledged_total", ())], 5)
        self.assertEqual(found[("ilm_pending_messages", ())], 0)
        self.assertEqual(found[("ilm_peers_linked", ())], 1)
        self.assertEqual(found[("ilm_node_running", ())], 1)
        self.assertEqual(found[("ilm_store_in_doubt", ())], 0)
        info = [k for k in found if k[0] == "ilm_node_info"]
        self.assertEqual(
            dict(info[0][1]),
            {"id": "1", "incarnation": self.node.incarnation, "version": "9.9"},
        )
        # Histograms: the commit count matches the commits counter.
        self.assertEqual(
            found[("ilm_commit_seconds_count", ())], found[("ilm_commits_total", ())]
        )
        self.assertGreater(found[("ilm_commit_seconds_count", ())], 0)
        self.assertEqual(
            found[("ilm_commit_seconds_bucket", (("le", "+Inf"),))],
            found[("ilm_commit_seconds_count", ())],
        )
        # No per-peer series unless asked for.
        self.assertFalse([k for k in found if k[0].startswith("ilm_peer_")])
        _, _, body = yield self.scrape(receiver)
        found = samples(body)
        self.assertEqual(found[("ilm_messages_delivered_total", ())], 5)
        self.assertEqual(found[("ilm_delivery_seconds_count", ())], 5)

    @inlineCallbacks
    def test_pending_and_refused(self) -> Any:
        """
        With the peer away, messages sent to it are pending (count, bytes,
        age); a refused send is counted under its reason.
        """
        yield self.peer.shutdown(1)
        base = yield self.serve(self.node, None, per_peer=True)
        for body in (b"abc", b"defgh"):
            yield self.node.send_to(2, body)
        yield self.assertFailure(self.node.send_to(1, b"self"), Exception)
        _, _, body = yield self.scrape(base)
        found = samples(body)
        self.assertEqual(found[("ilm_pending_messages", ())], 2)
        self.assertEqual(found[("ilm_pending_bytes", ())], 8)
        self.assertGreaterEqual(found[("ilm_oldest_pending_age_seconds", ())], 0)
        self.assertEqual(
            found[("ilm_messages_refused_total", (("reason", "send_to_self"),))], 1
        )
        # Per-peer series, labelled with the peer's URL text form.
        self.assertEqual(found[("ilm_peer_pending_messages", (("peer", "2"),))], 2)
        self.assertEqual(found[("ilm_peer_link_up", (("peer", "2"),))], 0)
        self.assertEqual(found[("ilm_peer_messages_sent_total", (("peer", "2"),))], 2)

    @inlineCallbacks
    def test_network_counters(self) -> Any:
        """
        The network's own counters (links, refusals by reason) appear when
        the network has ``stats()``.
        """
        network = self.network.add_peer(3)
        base = yield self.serve(self.node, network)
        _, _, body = yield self.scrape(base)
        found = samples(body)
        stats = network.stats()
        self.assertEqual(found[("ilm_links", ())], stats.links)
        self.assertEqual(
            found[("ilm_links_established_total", ())], stats.links_established
        )
        self.assertIn(("ilm_connections", ()), found)

    @inlineCallbacks
    def test_other_paths_and_failures(self) -> Any:
        """
        Only ``/metrics`` is served; a collector that fails answers 500 and
        is logged as ``metrics_error``, not raised into the reactor.
        """
        base = yield self.serve(self.node, None)
        code, _, _ = yield self.scrape(base, "/other")
        self.assertEqual(code, 404)

        class Broken:
            def stats(self) -> Any:
                raise RuntimeError("boom")

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        broken = yield self.serve(self.node, Broken())
        code, _, body = yield self.scrape(broken)
        self.assertEqual(code, 500)
        self.assertIn("see the node's log", body)
        [logged] = [e for e in events if e.get("ilm_event") == "metrics_error"]
        self.assertEqual(logged["log_failure"].getErrorMessage(), "boom")
        self.flushLoggedErrors(RuntimeError)
