"""
Prometheus metrics of a node, in the text exposition format.

:class:`NodeCollector` reads the node's public snapshots
(``ILM.stats()``, ``ILM.peer_status()`` and, where the network has one,
``stats()``) at scrape time: nothing is counted twice and nothing costs
anything between scrapes.  It lives in a registry of its own
(:func:`node_registry`), never in ``prometheus_client``'s global one, so
several nodes in one process (or an application's own metrics) do not
collide.  :class:`MetricsResource` serves it on ``twisted.web``; the daemon
serves it with ``--metrics ENDPOINT``.

Per-peer series (label ``peer``) are off by default: with thousands of
peers they would multiply the series a Prometheus server holds.  Turn them
on with ``per_peer=True`` (``--metrics-per-peer``).

Every metric is listed, with its meaning, in ``docs/daemon.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from ilm._logging import EventLimiter
from ilm._peerid import peer_id_to_text
from ilm._status import LINK_UP, Histogram, NetworkStats, NodeStats, PeerStatus

__all__ = ["MetricsResource", "NodeCollector", "node_registry"]

log = Logger(namespace="ilm.metrics")

_PREFIX = "ilm_"


def _histogram(name: str, doc: str, histogram: Histogram | None) -> Metric:
    family = HistogramMetricFamily(_PREFIX + name, doc)
    if histogram is None:
        return family
    family.add_metric(
        [],
        [
            ("+Inf" if bound == float("inf") else repr(float(bound)), count)
            for bound, count in histogram.buckets
        ],
        histogram.sum,
    )
    return family


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(_PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(_PREFIX + name, doc, value=value)


def _by_label(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[str, float],
) -> Metric:
    family = kind(_PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class NodeCollector:
    """
    A ``prometheus_client`` collector over one node's snapshots.

    :param node: the :class:`ilm.ILM` node.
    :param clock: the node's clock (for ages).
    :param network: the node's network; its ``stats()`` (if it has one)
        adds link, connection and refusal metrics.
    :param per_peer: also export one series per peer (label ``peer``).
    :param version: ILM's version, for ``ilm_node_info``.
    """

    def __init__(
        self,
        node: Any,
        clock: IReactorTime,
        network: object = None,
        *,
        per_peer: bool = False,
        version: str = "",
    ) -> None:
        self._node = node
        self._clock = clock
        self._network = network
        self._per_peer = per_peer
        self._version = version

    def collect(self) -> Iterator[Metric]:
        """
        Every metric, read from the node now.
        """
        node = self._node
        now = self._clock.seconds()
        stats: NodeStats = node.stats()
        peers: Mapping[Any, PeerStatus] = node.peer_status()
        info = GaugeMetricFamily(
            _PREFIX + "node_info",
            "The node: its id, incarnation and ILM version (value 1).",
            labels=["id", "incarnation", "version"],
        )
        info.add_metric(
            [peer_id_to_text(node.local_id), str(node.incarnation), self._version], 1
        )
        yield info
        yield _gauge("node_running", "1 while the node runs.", stats.state == "running")
        if stats.started_at is not None:
            yield _gauge(
                "node_start_time_seconds",
                "When the node started (Unix time).",
                stats.started_at,
            )
        yield _gauge(
            "store_in_doubt",
            "1 when the store refuses commits after a failure that may have "
            "half-written (restart the node).",
            stats.store_in_doubt,
        )
        yield _counter("messages_sent", "Messages accepted for sending.", stats.sent)
        yield _counter("messages_stored", "Messages made durable.", stats.stored)
        yield _counter(
            "messages_delivered",
            "Messages delivered to the local application.",
            stats.delivered,
        )
        yield _counter(
            "messages_acknowledged",
            "Sent messages acknowledged by their peers.",
            stats.acknowledged,
        )
        yield _counter(
            "messages_retransmitted", "Messages sent again.", stats.retransmitted
        )
        yield _by_label(
            CounterMetricFamily,
            "messages_refused",
            "Sends refused, by reason.",
            "reason",
            stats.refused,
        )
        yield _counter(
            "delivery_failures",
            "Failed local delivery attempts (each is retried).",
            stats.delivery_failures,
        )
        yield _counter("commits", "Store commits.", stats.commits)
        yield _counter(
            "commit_failures", "Failed store commits.", stats.commit_failures
        )
        yield _counter(
            "link_ups", "Links to peers that completed the handshake.", stats.link_ups
        )
        yield _counter("link_downs", "Links to peers lost.", stats.link_downs)
        yield _histogram(
            "commit_seconds", "Store commit latency.", stats.commit_seconds
        )
        yield _histogram(
            "commit_batch_size",
            "Messages and bookkeeping entries per store commit.",
            stats.commit_batch,
        )
        yield _histogram(
            "delivery_seconds",
            "From a message's arrival to its settled local delivery.",
            stats.delivery_seconds,
        )
        yield from self._peer_totals(peers, now)
        network_stats = getattr(self._network, "stats", None)
        if network_stats is not None:
            yield from self._network_metrics(network_stats())
        if self._per_peer:
            yield from self._per_peer_metrics(peers, now)

    def _peer_totals(
        self, peers: Mapping[Any, PeerStatus], now: float
    ) -> Iterator[Metric]:
        statuses = peers.values()
        yield _gauge(
            "pending_messages",
            "Messages stored and not yet acknowledged, all peers.",
            sum(s.pending for s in statuses),
        )
        yield _gauge(
            "pending_bytes",
            "Bytes of those messages.",
            sum(s.pending_bytes for s in statuses),
        )
        yield _gauge(
            "oldest_pending_age_seconds",
            "Age of the oldest pending message, all peers (0: none).",
            max((s.oldest_pending_age or 0.0 for s in statuses), default=0.0),
        )
        yield _gauge("peers", "Peers this node knows.", len(peers))
        yield _gauge(
            "peers_linked",
            "Peers with a link up.",
            sum(1 for s in statuses if s.link == LINK_UP),
        )
        held = [s for s in statuses if s.delivery_held]
        yield _gauge(
            "delivery_held_peers",
            "Peers whose delivery is held behind a failed delivery.",
            len(held),
        )
        yield _gauge(
            "delivery_held_seconds",
            "The longest current delivery hold, all peers (0: none).",
            max((_held_for(s, now) for s in held), default=0.0),
        )

    def _network_metrics(self, stats: NetworkStats) -> Iterator[Metric]:
        yield _gauge("connections", "Transport connections open.", stats.connections)
        yield _gauge("links", "Authenticated links up.", stats.links)
        yield _counter(
            "links_established",
            "Links authenticated by the network.",
            stats.links_established,
        )
        yield _counter("links_lost", "Links lost.", stats.links_lost)
        yield _by_label(
            CounterMetricFamily,
            "link_refusals",
            "Connections or links refused, by reason.",
            "reason",
            stats.refusals,
        )
        yield _by_label(
            CounterMetricFamily,
            "dial_failures",
            "Failed dials to peers, by reason.",
            "reason",
            stats.dial_failures,
        )

    def _per_peer_metrics(
        self, peers: Mapping[Any, PeerStatus], now: float
    ) -> Iterator[Metric]:
        rows = sorted((peer_id_to_text(p), s) for p, s in peers.items())
        for counter, name, doc, value in _PER_PEER:
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            family = kind(_PREFIX + name, doc, labels=["peer"])
            for label, status in rows:
                family.add_metric([label], value(status, now))
            yield family


_PeerValue = Callable[[PeerStatus, float], float]

# (counter?, name, help, value of one peer's status at a time)
_PER_PEER: tuple[tuple[bool, str, str, _PeerValue], ...] = (
    (False, "peer_link_up", "1 while the link is up.", lambda s, _: s.link == LINK_UP),
    (False, "peer_pending_messages", "Messages pending.", lambda s, _: s.pending),
    (False, "peer_pending_bytes", "Bytes pending.", lambda s, _: s.pending_bytes),
    (
        False,
        "peer_oldest_pending_age_seconds",
        "Age of the oldest pending message (0: none).",
        lambda s, _: s.oldest_pending_age or 0.0,
    ),
    (False, "peer_in_flight", "Messages in flight.", lambda s, _: s.in_flight),
    (
        False,
        "peer_delivery_held_seconds",
        "How long delivery has been held (0: not held).",
        lambda s, now: _held_for(s, now),
    ),
    (True, "peer_messages_sent", "Messages accepted.", lambda s, _: s.sent),
    (
        True,
        "peer_messages_acknowledged",
        "Messages acknowledged.",
        lambda s, _: s.acknowledged,
    ),
    (
        True,
        "peer_messages_retransmitted",
        "Messages sent again.",
        lambda s, _: s.retransmitted,
    ),
    (
        True,
        "peer_messages_delivered",
        "Messages from the peer delivered locally.",
        lambda s, _: s.delivered,
    ),
)


def _held_for(status: PeerStatus, now: float) -> float:
    if not status.delivery_held or status.delivery_held_since is None:
        return 0.0
    return max(0.0, now - status.delivery_held_since)


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """
    A registry of its own holding ``collector`` (and nothing of
    ``prometheus_client``'s process-wide defaults).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return registry


class MetricsResource(Resource):
    """
    ``GET /metrics``: the registry in Prometheus text format.  A failure
    while collecting answers 500 and is logged (at most a few lines a
    minute), never raised into the reactor.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self._registry = registry
        self._errors = EventLimiter(log, clock)

    def stop(self) -> None:
        """
        Log what the rate limit held back, and cancel its timer.
        """
        self._errors.stop()

    def render_GET(self, request: Request) -> bytes:
        if request.path not in (b"/metrics", b"/metrics/"):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found: metrics are at /metrics\n"
        try:
            body = generate_latest(self._registry)
        except Exception:
            self._errors.emit(
                "metrics_error",
                LogLevel.error,
                "collecting metrics failed",
                failure=Failure(),
                ilm_event="metrics_error",
            )
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"collecting metrics failed: see the node's log\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return body
