"""
Attacks on a real node by a peer that authenticated properly: the node is an
ILM over a ``StreamNetwork`` on loopback TCP with an SQLite store in a real
file; the attacker is a real ``StreamNetwork`` too (so it passes the link
handshake, whatever the link format), whose frame receiver sends
hand-crafted *session* frames with ``send_frames``.  A legitimate peer, a
real ILM node, exchanges messages with the node in both directions before,
during and after each attack.

Each test shows that the attack is refused or bounded (the figures are in
the docstrings and in docs/security.md), that the other peer's messages keep
flowing during and after it, and that nothing accepted is lost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from ilm import ILM, Config, Message, PeerId, _frames
from ilm._session import PROTOCOL_VERSION, Hello
from ilm.backends._sqlite import inspect_store
from ilm.errors import ShutdownTimeout
from ilm.interfaces import IFrameReceiver
from ilm.network import Backoff, LinkSettings, StreamNetwork
from ilm.testing import InMemoryBackend

NODE, LEGIT = 1, 3
FAST = LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.1))


def key(a: PeerId, b: PeerId) -> bytes:
    low, high = sorted((repr(a), repr(b)))
    return (low + "|" + high).encode().ljust(32, b"#")


def incarnation(n: int) -> str:
    return "%032x" % (0xA77AC000 + n)


def rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Events:
    """
    ILM log events (those with an ``ilm_event``) seen during a test, and
    Deferreds that fire when one appears.
    """

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], Deferred[Any]]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if "ilm_event" not in event:
            return
        self.events.append(event)
        for entry in list(self._waiting):
            if entry[0](event):
                self._waiting.remove(entry)
                entry[1].callback(event)

    def named(self, name: str, **fields: object) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["ilm_event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait(self, name: str, **fields: object) -> Deferred[Any]:
        seen = self.named(name, **fields)
        if seen:
            return succeed(seen[0])
        d: Deferred[Any] = Deferred()
        self._waiting.append(
            (
                lambda e: (
                    e["ilm_event"] == name
                    and all(e.get(k) == v for k, v in fields.items())
                ),
                d,
            )
        )
        d.addTimeout(30, reactor)
        return d


class Inbox:
    """
    The node's delivery target: records every message; messages from
    ``hold_from`` are taken but never finished (an asynchronous target
    that hangs), so they stay held.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.hold_from: set[PeerId] = set()
        self.held: list[Deferred[None]] = []
        self._waiters: list[tuple[PeerId, int, Deferred[None]]] = []

    def __call__(self, message: Message) -> Deferred[None] | None:
        if message.source_id in self.hold_from:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        self.messages.append(message)
        for entry in list(self._waiters):
            if len(self.from_peer(entry[0])) >= entry[1]:
                self._waiters.remove(entry)
                entry[2].callback(None)
        return None

    def from_peer(self, peer_id: PeerId) -> list[bytes]:
        return [m.contents for m in self.messages if m.source_id == peer_id]

    def wait_for(self, peer_id: PeerId, count: int) -> Deferred[None]:
        if len(self.from_peer(peer_id)) >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((peer_id, count, d))
        d.addTimeout(30, reactor)
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


@implementer(IFrameReceiver)
class Attacker:
    """
    A peer that authenticates properly (a real StreamNetwork with its key)
    and then sends whatever session frames ``on_link`` sends.
    """

    def __init__(
        self, peer_id: PeerId, port: int, on_link: Callable[[Attacker], None]
    ) -> None:
        self.peer_id = peer_id
        self.on_link = on_link
        self.links = 0
        self.lost: list[Failure] = []
        self.data_bytes = 0
        self.frames: list[bytes] = []
        self.hellos = 0
        self._hellos: list[tuple[int, Deferred[None]]] = []
        self._linked: list[Deferred[None]] = []
        self._lost: list[Deferred[None]] = []
        self.network = StreamNetwork(
            peer_id,
            peers={NODE: f"tcp:host=127.0.0.1:port={port}"},
            keys={NODE: key(NODE, peer_id)},
            settings=FAST,
            reactor=reactor,
        )

    def start(self) -> None:
        self.network.start(self)

    def stop(self) -> Deferred[None]:
        return self.network.stop()

    def send(self, *frames: bytes) -> None:
        self.network.send_frames(NODE, list(frames))

    def when_linked(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._linked.append(d)
        d.addTimeout(30, reactor)
        return d

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        d.addTimeout(30, reactor)
        return d

    def link_established(self, peer_id: PeerId) -> None:
        self.links += 1
        self.on_link(self)
        waiting, self._linked = self._linked, []
        for d in waiting:
            d.callback(None)

    def link_lost(self, peer_id: PeerId, reason: Failure) -> None:
        self.lost.append(reason)
        waiting, self._lost = self._lost, []
        for d in waiting:
            d.callback(None)

    def when_hellos(self, count: int) -> Deferred[None]:
        """
        A Deferred firing once ``count`` HELLOs came from the node (its own
        when the link came up, then its answers to HELLOs asking for one:
        proof that it has processed everything sent before them).
        """
        if self.hellos >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._hellos.append((count, d))
        d.addTimeout(30, reactor)
        return d

    def frame_received(self, peer_id: PeerId, frame: bytes) -> None:
        self.frames.append(frame)
        if frame[:1] == bytes([_frames.MESSAGES]):
            self.data_bytes += len(frame)
        elif frame[:1] == bytes([_frames.RESUME]):
            self.hellos += 1
            for entry in list(self._hellos):
                if self.hellos >= entry[0]:
                    self._hellos.remove(entry)
                    entry[1].callback(None)

    def link_paused(self, peer_id: PeerId) -> None:
        pass

    def link_resumed(self, peer_id: PeerId) -> None:
        pass


def hello(
    incarnation_id: str,
    first_unacked: int = 1,
    last_position: int = 0,
    window: int = 4096,
    window_bytes: int = 1 << 22,
    reply_requested: bool = False,
) -> bytes:
    return _frames.encode_resume(
        Hello(
            version=PROTOCOL_VERSION,
            incarnation=incarnation_id,
            window=window,
            window_bytes=window_bytes,
            first_unacked=first_unacked,
            last_position=last_position,
            known_incarnation=None,
            delivered=0,
            reply_requested=reply_requested,
        )
    )


class Chatter:
    """
    The legitimate peer and the node exchanging messages in both directions
    without pause, each side sending the next batch once the previous one
    is acknowledged.
    """

    def __init__(self, node: ILM, legit: ILM, after: Chatter | None = None) -> None:
        self.node = node
        self.legit = legit
        self.acknowledged = {"to node": 0, "to legit": 0}
        # Numbering goes on from an earlier chatter's (after a restart).
        self.sent = dict(after.sent) if after else {"to node": 0, "to legit": 0}
        self.running = True
        self.failures: list[Failure] = []
        self._done = [
            Deferred.fromCoroutine(self._run(legit, NODE, "to node")),
            Deferred.fromCoroutine(self._run(node, LEGIT, "to legit")),
        ]

    async def _run(self, sender: ILM, to: PeerId, name: str) -> None:
        try:
            while self.running:
                receipts = []
                for _ in range(10):
                    receipts.append(
                        await sender.send_to(
                            to, b"%s %d" % (name.encode(), self.sent[name])
                        )
                    )
                    self.sent[name] += 1
                await receipts[-1].acknowledged
                self.acknowledged[name] += len(receipts)
        except Exception:
            self.failures.append(Failure())

    def progress(self) -> tuple[int, int]:
        return self.acknowledged["to node"], self.acknowledged["to legit"]

    async def stop(self) -> None:
        self.running = False
        for d in self._done:
            await d


class AttackCase(TestCase):
    timeout = 120

    config = Config()

    async def start_node(self, path: str, port: int = 0) -> tuple[ILM, StreamNetwork]:
        network = StreamNetwork(
            NODE,
            listen=[f"tcp:{port}:interface=127.0.0.1"],
            keys={p: key(NODE, p) for p in (2, LEGIT, 4, 5, 6)},
            settings=FAST,
            reactor=reactor,
        )
        node = await ILM.create(path, self.inbox, network, config=self.config)
        return node, network

    async def setUp(self) -> None:  # type: ignore[override]
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "node.sqlite")
        self.events = Events(self)
        self.inbox = Inbox()
        self.node, self.node_net = await self.start_node(self.path)
        self.port: int = self.node_net.listening_addresses()[0].port  # type: ignore[attr-defined]
        self.legit_inbox: list[Message] = []
        legit_net = StreamNetwork(
            LEGIT,
            peers={NODE: f"tcp:host=127.0.0.1:port={self.port}"},
            keys={NODE: key(NODE, LEGIT)},
            settings=FAST,
            reactor=reactor,
        )
        self.legit = await ILM.create(
            InMemoryBackend(), self.legit_inbox.append, legit_net
        )
        self.chatter = Chatter(self.node, self.legit)
        self.attackers: list[Attacker] = []

    async def tearDown(self) -> None:  # type: ignore[override]
        await self.chatter.stop()
        self.inbox.hold_from.clear()
        self.inbox.release()
        for attacker in self.attackers:
            await attacker.stop()
        await self.legit.shutdown(10)
        if self.node.state == "running":
            # Messages to an attacker that never acknowledges them stay
            # stored: the shutdown says so, which is not a failure here.
            shutdown = self.node.shutdown(2)
            shutdown.addErrback(lambda f: f.trap(ShutdownTimeout))
            await shutdown

    def attacker(
        self, peer_id: PeerId, on_link: Callable[[Attacker], None]
    ) -> Attacker:
        attacker = Attacker(peer_id, self.port, on_link)
        self.attackers.append(attacker)
        attacker.start()
        return attacker

    async def flowing(self) -> tuple[int, int]:
        """
        Wait until both directions have made progress since this call.
        """
        start = self.chatter.progress()
        while True:
            now = self.chatter.progress()
            if now[0] > start[0] and now[1] > start[1]:
                return now
            waiter = self.inbox.wait_for(LEGIT, len(self.inbox.from_peer(LEGIT)) + 1)
            await waiter

    def assert_exchange_intact(self) -> None:
        """
        The legitimate peer's messages reached the node in order, each
        once, and the node's reached it likewise.
        """
        self.assertEqual(self.chatter.failures, [])
        got = self.inbox.from_peer(LEGIT)
        self.assertEqual(got, [b"to node %d" % i for i in range(len(got))])
        back = [m.contents for m in self.legit_inbox]
        self.assertEqual(back, [b"to legit %d" % i for i in range(len(back))])


class PositionAttackTests(AttackCase):
    async def test_positions_beyond_2_63(self) -> None:
        """
        One attacker sends the HELLO of a new incarnation with
        first_unacked = 2**63 + 1 (the HELLO that used to halt every
        commit), another a valid HELLO and then DATA at positions 2**63 - 1
        and 2**63: each link is closed with MalformedFrame, while the
        legitimate peer and the node keep exchanging messages during and
        after; no commit fails; the store holds no record of the first
        attacker and only the mark 0 of the second one's valid HELLO; and
        after the node restarts on its SQLite file, nothing
        the legitimate peer sent is delivered again.
        """
        await self.flowing()
        bad_hello = self.attacker(
            2,
            lambda a: a.send(
                hello(incarnation(1), first_unacked=2**63 + 1, last_position=2**63 + 1)
            ),
        )
        bad_data = self.attacker(
            4,
            lambda a: a.send(
                hello(incarnation(2), last_position=10),
                _frames.encode_messages(2**63 - 1, [b"x", b"y"], 1 << 20)[0],
            ),
        )
        for peer_id in (2, 4):
            event = await self.events.wait(
                "protocol_violation", peer_id=peer_id, kind="MalformedFrame"
            )
            self.assertIn("2**63", event["reason"])
        await self.events.wait("link_closed", peer_id=2)
        await self.events.wait("link_closed", peer_id=4)
        for attacker in (bad_hello, bad_data):
            self.assertGreaterEqual(attacker.links, 1)
            if not attacker.lost:
                await attacker.when_lost()
        await self.flowing()
        await self.flowing()
        self.assertEqual(self.events.named("store_commit_failed"), [])
        self.assertEqual(self.events.named("internal_error"), [])
        marks = {
            mark.peer_id: mark.delivered for mark in inspect_store(self.path).inbound
        }
        self.assertNotIn(2, marks)
        self.assertEqual(marks[4], 0)
        # Restart the node on its file: nothing is delivered twice.
        await self.chatter.stop()
        before = self.inbox.from_peer(LEGIT)
        await self.node.shutdown(10)
        self.node, self.node_net = await self.start_node(self.path, self.port)
        self.chatter = Chatter(self.node, self.legit, after=self.chatter)
        await self.flowing()
        self.assert_exchange_intact()
        after = self.inbox.from_peer(LEGIT)
        self.assertEqual(after[: len(before)], before)
        self.assertGreater(len(after), len(before))


class FlappingTests(AttackCase):
    config = Config(
        window=256,
        window_bytes=1 << 20,
        max_new_incarnations=1000,
        max_retired_incarnations=8,
    )

    async def flap(self, peer_id: PeerId, count: int, payload: int) -> None:
        """
        ``count`` links from ``peer_id``, each presenting a new incarnation
        and sending a full window of ``payload``-byte messages, one after
        the other (each attacker network stopped before the next starts).
        """
        window = self.config.window
        for n in range(count):

            def on_link(a: Attacker, n: int = n) -> None:
                inc = incarnation(100 + n)
                a.send(
                    hello(inc, last_position=window),
                    *_frames.encode_messages(
                        1, [bytes([n % 256]) * payload] * window, 256 * 1024
                    ),
                    hello(inc, last_position=window, reply_requested=True),
                )

            attacker = Attacker(peer_id, self.port, on_link)
            answered = attacker.when_hellos(2)
            attacker.start()
            await answered
            await attacker.stop()

    async def test_flapping_incarnations_stay_bounded(self) -> None:
        """
        An attacker presents 32 incarnations in a row, each sending a full
        window (256 messages of 4 kB, 1 MiB) to a delivery target that never
        finishes its messages: what the node holds from it stays within
        one window and one frame in all (about 2 MiB, not 32 MiB), its
        records in the SQLite store stay within the cap (8 retired, plus the
        current one and the first, still draining), its resident memory
        grows by less than 24 MiB (measured: 1 MiB held, 9 records, +1.6 MB
        of RSS; without the shared budget, 32 MiB held), and the legitimate
        peer's messages keep flowing during and after.
        """
        self.inbox.hold_from.add(5)
        await self.flowing()
        before = rss()
        during = Deferred.fromCoroutine(self.flap(5, 32, 4096))
        await self.flowing()
        await during
        await self.flowing()
        peer = self.node.peer_status(5)
        budget = self.config.window_bytes + self.config.max_frame_size
        self.assertLessEqual(peer.queued_bytes, budget)
        self.assertLessEqual(sum(peer.queued), self.config.window)
        self.assertGreater(peer.queued_bytes, 0)
        records = [m for m in inspect_store(self.path).inbound if m.peer_id == 5]
        self.assertLessEqual(len(records), self.config.max_retired_incarnations + 2)
        self.assertEqual(len(self.events.named("peer_new_incarnation", peer_id=5)), 1)
        grown = rss() - before
        self.assertLess(grown, 24 * 1024 * 1024, grown)
        self.assert_exchange_intact()


class IncarnationLimitTests(AttackCase):
    async def test_new_incarnations_rate_limited(self) -> None:
        """
        With the default limit (4 new incarnations per peer per minute), an
        attacker presenting a new incarnation on every link gets 4 and then
        TooManyIncarnations: its link is closed and the network refuses it
        for a while (link_closed with a hold); the node stores no record
        for the refused incarnations, and the legitimate peer's messages
        keep flowing.
        """
        await self.flowing()
        for n in range(6):
            attacker = Attacker(
                6, self.port, lambda a, n=n: a.send(hello(incarnation(200 + n)))
            )
            linked = attacker.when_linked()
            attacker.start()
            if n < 4:
                await linked
                await self.flowing()
                await attacker.stop()
                continue
            self.attackers.append(attacker)
            event = await self.events.wait("protocol_violation", peer_id=6)
            self.assertEqual(event["kind"], "TooManyIncarnations")
            closed = await self.events.wait("link_closed", peer_id=6)
            self.assertGreater(closed["hold"], 0)
            break
        await self.flowing()
        incarnations = {
            m.incarnation for m in inspect_store(self.path).inbound if m.peer_id == 6
        }
        self.assertEqual(incarnations, {incarnation(200 + n) for n in range(4)})
        self.assert_exchange_intact()


class NackFloodTests(AttackCase):
    config = Config(window=64, window_bytes=256 * 1024)

    async def test_nack_flood_resends_a_bounded_amount(self) -> None:
        """
        An attacker that receives a full window (64 messages of 4 kB) from
        the node, never acknowledges it and answers with 20,000 NACKs for
        its positions (220 kB of NACK frames) makes the node resend at most
        one window per retransmission timeout (1 s) while it lasts
        (measured: 262 kB resent, the one window its first NACK asked for;
        without the rule, 21 MB in 0.13 s); the legitimate peer's messages
        keep flowing.
        """
        for n in range(64):
            await self.node.send_to(6, bytes([n]) * 4096)
        await self.flowing()

        def on_link(a: Attacker) -> None:
            a.send(hello(incarnation(300)))

        attacker = Attacker(6, self.port, on_link)
        self.attackers.append(attacker)
        linked = attacker.when_linked()
        attacker.start()
        await linked
        while attacker.data_bytes < 64 * 4096:
            await self.inbox.wait_for(LEGIT, len(self.inbox.from_peer(LEGIT)) + 1)
        first = attacker.data_bytes
        start = reactor.seconds()
        for burst in range(200):
            attacker.send(
                *[_frames.encode_nack(1 + (burst + i) % 64) for i in range(100)]
            )
            await self.inbox.wait_for(LEGIT, len(self.inbox.from_peer(LEGIT)) + 1)
        await self.flowing()
        elapsed = reactor.seconds() - start
        resent = attacker.data_bytes - first
        window = 64 * (4096 + 4) + 20
        self.assertLessEqual(resent, (elapsed / 1.0 + 2) * window, (resent, elapsed))
        self.assertEqual(self.events.named("internal_error"), [])
        self.assert_exchange_intact()
