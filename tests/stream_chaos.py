"""
A seeded chaos run of two real ILM nodes over stream networks: streams in
both directions while connections are killed at random moments and nodes
are crashed and restarted, ending with a check that every accepted message
was delivered exactly once and in order.

It runs on any ``IReactorTime``: a ``Clock`` with in-memory pipes, or the
real reactor with TCP, TLS or UNIX sockets.  The caller supplies
``make_network(node_id)``.

Crash semantics: a crashed node's application state is what its store made
durable.  Messages the application took but whose delivery mark had not
been committed when the node died are delivered again after the restart
(the documented at-least-once window); the recorder therefore forgets them
on a crash, as an application keeping its state in the same store would,
and exactly-once is checked against what survives.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ilm import ILM, Config, Message, PeerId, Receipt
from ilm.network import StreamNetwork
from ilm.testing import InMemoryBackend, InMemoryStorage, crash


class _Node:
    def __init__(self, node_id: PeerId) -> None:
        self.node_id = node_id
        self.storage = InMemoryStorage()
        self.received: dict[PeerId, list[bytes]] = {}
        self.accepted: dict[PeerId, list[bytes]] = {}
        self.ilm: ILM | None = None
        self.network: StreamNetwork | None = None
        self.counter = 0
        self.redelivered = 0
        self.on_delivery: Callable[[], None] | None = None

    def deliver(self, message: Message) -> None:
        self.received.setdefault(message.source_id, []).append(message.contents)
        if self.on_delivery is not None:
            self.on_delivery()


class Chaos:
    """
    :param clock: what drives the run (``Clock`` or the reactor).
    :param make_network: builds the network of a node (called again at each
        restart).
    :param seed: everything random derives from it.
    :param duration: how long the chaos lasts (clock seconds).
    :param kill_interval: mean time between two kills.
    :param crash_share: the share of kills that crash a node (the rest
        abort one connection).
    """

    def __init__(
        self,
        clock: IReactorTime,
        make_network: Callable[[PeerId], StreamNetwork],
        *,
        seed: int,
        duration: float,
        kill_interval: float,
        crash_share: float = 0.2,
        send_interval: float = 0.005,
        burst: int = 20,
        config: Config | None = None,
    ) -> None:
        self.clock = clock
        self.make_network = make_network
        self.seed = seed
        self.random = random.Random(seed)
        self.duration = duration
        self.kill_interval = kill_interval
        self.crash_share = crash_share
        self.send_interval = send_interval
        self.burst = burst
        self.config = config or Config(window=64, window_bytes=64 * 1024)
        self.nodes = {1: _Node(1), 2: _Node(2)}
        #: links killed while up (mid-stream), by a kill or with a crash
        self.cuts = 0
        #: connections killed before they became the link (handshaking)
        self.early_cuts = 0
        self.crashes = 0
        self.crashes_by_node = {1: 0, 2: 0}
        self.failed_starts = 0
        self.chaos_over = False
        self.start_time = 0.0
        self._send_call: IDelayedCall | None = None
        self._delivered_waiters: list[Deferred[None]] = []
        for node in self.nodes.values():
            node.on_delivery = self._check_delivered

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """
        Start both nodes and the chaos; it stops by itself after
        ``duration``.  Then wait for :meth:`settled`.
        """
        self.start_time = self.clock.seconds()
        for node in self.nodes.values():
            self._start(node)
        self._send_call = self.clock.callLater(self.send_interval, self._send_tick)
        self.clock.callLater(self._next_kill(), self._kill_tick)

    def _start(self, node: _Node) -> None:
        network = self.make_network(node.node_id)
        ilm = ILM(
            InMemoryBackend(node.storage),
            node.deliver,
            network,
            config=self.config,
            clock=self.clock,
        )
        node.network = network
        node.ilm = ilm
        ilm.startService()
        ilm.when_started().addErrback(self._start_failed, node, ilm)

    def _restart(self, node: _Node) -> None:
        self._start(node)
        self._check_delivered()

    def _start_failed(self, reason: Any, node: _Node, ilm: ILM) -> None:
        # A restarted node could not listen again (its address was taken in
        # between): try again shortly, as a supervisor would.
        self.failed_starts += 1
        if node.ilm is ilm:
            assert node.network is not None
            node.network.abort()
            node.ilm = None
            node.network = None
            self.clock.callLater(0.1, self._restart, node)

    def _next_kill(self) -> float:
        return self.random.expovariate(1.0 / self.kill_interval)

    def _send_tick(self) -> None:
        if self.clock.seconds() - self.start_time >= self.duration:
            return
        for node in self.nodes.values():
            ilm = node.ilm
            if ilm is None:
                continue
            other = 2 if node.node_id == 1 else 1
            for _ in range(self.random.randint(1, self.burst)):
                node.counter += 1
                payload = b"%d->%d #%d " % (node.node_id, other, node.counter)
                payload += b"." * self.random.randint(0, 200)
                d = ilm.send_to(other, payload)
                d.addCallbacks(self._accepted, lambda _: None, (node, other, payload))
        self._send_call = self.clock.callLater(self.send_interval, self._send_tick)

    def _accepted(
        self, receipt: Receipt, node: _Node, other: PeerId, payload: bytes
    ) -> None:
        node.accepted.setdefault(other, []).append(payload)

    def _kill_tick(self) -> None:
        if self.clock.seconds() - self.start_time >= self.duration:
            # The last send tick may fall after this one: no sending once
            # the chaos is over (and no call left behind when the run ends).
            if self._send_call is not None and self._send_call.active():
                self._send_call.cancel()
            self.chaos_over = True
            self._check_delivered()
            return
        spared = [
            node
            for node_id, node in self.nodes.items()
            if not self.crashes_by_node[node_id] and node.ilm is not None
        ]
        if spared and self.clock.seconds() - self.start_time >= self.duration / 2:
            # Each side is restarted from its store at least once a run.
            self._crash(spared[0])
        elif self.random.random() < self.crash_share:
            node = self.nodes[self.random.choice([1, 2])]
            if node.ilm is not None:
                self._crash(node)
        else:
            connections = [
                p
                for node in self.nodes.values()
                if node.network is not None
                for p in node.network.connections()
                if p.transport is not None and p.state != "closed"
            ]
            if connections:
                victim = self.random.choice(connections)
                if victim.state == "open":
                    self.cuts += 1
                else:
                    self.early_cuts += 1
                victim.transport.abortConnection()  # type: ignore[union-attr]
        self.clock.callLater(self._next_kill(), self._kill_tick)

    def _crash(self, node: _Node) -> None:
        assert node.ilm is not None and node.network is not None
        self.crashes += 1
        self.crashes_by_node[node.node_id] += 1
        for protocol in node.network.connections():
            if protocol.state == "open":
                self.cuts += 1
            elif protocol.state != "closed":
                self.early_cuts += 1
        crash(node.ilm)
        closed = node.network.abort()
        node.ilm = None
        node.network = None
        # The application's state is what the store made durable.
        for (peer, _incarnation), record in node.storage.inbound.items():
            received = node.received.get(peer, [])
            if len(received) > record.delivered:
                node.redelivered += len(received) - record.delivered
                del received[record.delivered :]

        def restart(_: object) -> None:
            self.clock.callLater(self.random.uniform(0, 0.05), self._restart, node)

        closed.addCallback(restart)

    # -- checking --------------------------------------------------------------

    def all_delivered(self) -> bool:
        """
        Whether the chaos is over, both nodes run, and each has received as many
        messages as the other had accepted for it.
        """
        if not self.chaos_over or any(n.ilm is None for n in self.nodes.values()):
            return False
        for sender, receiver in ((1, 2), (2, 1)):
            accepted = self.nodes[sender].accepted.get(receiver, [])
            if len(self.nodes[receiver].received.get(sender, [])) != len(accepted):
                return False
        return True

    def when_delivered(self) -> Deferred[None]:
        """
        :return: a ``Deferred`` firing once :meth:`all_delivered` holds.
        """
        d: Deferred[None] = Deferred()
        self._delivered_waiters.append(d)
        self._check_delivered()
        return d

    def _check_delivered(self) -> None:
        if self._delivered_waiters and self.all_delivered():
            waiters, self._delivered_waiters = self._delivered_waiters, []
            for d in waiters:
                d.callback(None)

    def settled(self) -> bool:
        """
        Whether the chaos is over and every accepted message has been
        delivered and acknowledged.
        """
        if not self.chaos_over:
            return False
        for node in self.nodes.values():
            if node.ilm is None or node.ilm.pending_outbound():
                return False
            other = self.nodes[2 if node.node_id == 1 else 1]
            if len(other.received.get(node.node_id, [])) != len(
                node.accepted.get(other.node_id, [])
            ):
                return False
        return True

    def check(self) -> None:
        """
        :raises AssertionError: unless each direction delivered exactly what
            was accepted, once each, in order.
        """
        for sender, receiver in ((1, 2), (2, 1)):
            accepted = self.nodes[sender].accepted.get(receiver, [])
            received = self.nodes[receiver].received.get(sender, [])
            if accepted != received:
                first = next(
                    (
                        i
                        for i, (x, y) in enumerate(
                            zip(accepted, received, strict=False)
                        )
                        if x != y
                    ),
                    min(len(accepted), len(received)),
                )
                raise AssertionError(
                    f"seed {self.seed}: {sender}->{receiver}: {len(accepted)} "
                    f"accepted, {len(received)} received, first difference at "
                    f"index {first}"
                )

    def summary(self) -> str:
        messages = sum(
            len(messages)
            for node in self.nodes.values()
            for messages in node.accepted.values()
        )
        return (
            f"seed {self.seed}: {self.cuts} links killed mid-stream, "
            f"{self.early_cuts} connections killed in the handshake, "
            f"{self.crashes} crashes (node 1: {self.crashes_by_node[1]}, node 2: "
            f"{self.crashes_by_node[2]}), {self.failed_starts} failed restarts, "
            f"{messages} messages"
        )

    def stop(self) -> Deferred[Any]:
        """
        Shut both nodes down; the result is a ``DeferredList`` result (both
        succeed only if every outbox drained).
        """
        waits = []
        for node in self.nodes.values():
            if node.ilm is not None:
                waits.append(node.ilm.shutdown(timeout=10.0))
        return DeferredList(waits, consumeErrors=True)
