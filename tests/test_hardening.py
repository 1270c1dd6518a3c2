"""
The messenger against a peer, a store or a delivery target that keeps going
wrong, on a ``Clock``: what reaches the store is checked per peer, failed
commits back off whatever asks for the next one, and what can repeat is
logged at a bounded rate.  (The same attacks against a real node over TCP
with an SQLite store are in ``tests/test_attacks.py``.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM, Config, StoreBatch, _frames
from ilm._session import PROTOCOL_VERSION, Hello
from ilm.backends import InMemoryBackend
from ilm.errors import StoreError, StoreFull
from ilm.testing import InMemoryStorage, crash, settle

from .support import Cluster, numbered
from .test_messenger import Events, ScriptedNetwork, WrappedBackend


class ReadCounting(WrappedBackend):
    """
    A backend wrapper counting outbox reads and the bytes they return;
    while ``empty`` is set, every read returns nothing (as a tampered store
    would).
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self.reads = 0
        self.bytes_read = 0
        self.largest_read = 0
        self.empty = False

    def read_outbound(
        self, peer_id: object, after: int, limit: int, max_bytes: int
    ) -> Deferred[object]:
        self.reads += 1
        if self.empty:
            return succeed([])

        def count(contents: list[bytes]) -> list[bytes]:
            size = sum(map(len, contents))
            self.bytes_read += size
            self.largest_read = max(self.largest_read, size)
            return contents

        return (
            super().read_outbound(peer_id, after, limit, max_bytes).addCallback(count)
        )


class CountingCommits(WrappedBackend):
    """
    A backend wrapper that counts commits and fails them while ``failing``
    is set (with ``error``).
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self.commits = 0
        self.failed = 0
        self.failing = False
        self.error: Exception = StoreFull("injected: the disk is full")

    def commit(self, batch: StoreBatch) -> Deferred[object]:
        self.commits += 1
        if self.failing:
            self.failed += 1
            return fail(self.error)
        return super().commit(batch)


class Lines:
    """
    Count the log events of ILM's loggers (the ``ilm`` namespaces), as the
    lines a log file would get.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("ilm"):
            self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("ilm_event") == name]

    def lines(self) -> int:
        """Lines in a text log: one per event, plus its traceback's."""
        total = 0
        for event in self.events:
            total += 1
            failure = event.get("log_failure")
            if failure is not None:
                total += failure.getTraceback().count("\n")
        return total


def occurrences(events: list[dict[str, Any]]) -> int:
    """
    How many times something happened, from the events logged in full and
    the rate-limited summaries of the others.
    """
    return sum(e["suppressed"] if "suppressed" in e else 1 for e in events)


class StoreEntryTests(SynchronousTestCase):
    def test_unstorable_entry_is_dropped_and_its_link_closed(self) -> None:
        """
        A batch entry no store can hold (a delivery mark beyond 2**63 - 1,
        put there by hand since the frame decoders refuse such positions)
        is taken out of the batch before it reaches the store: that peer's
        link is closed with MalformedFrame, the commit goes through for the
        other peers, no commit fails, and the stream to the closed peer
        resumes once its link is back.
        """
        c = Cluster()
        events = Events(self)
        node = c.start(1)
        c.start(2)
        c.start(3)
        c.run_until(lambda: node.connected_peers() == {2, 3})
        peer2_incarnation = c.nodes[2].incarnation
        node._committer.bookkeeping.delivered[(2, peer2_incarnation)] = 2**63 + 1
        sent = [node.send_to(3, p) for p in numbered(5)]
        c.clock.advance(0)
        for d in sent:
            self.successResultOf(d)
        self.assertEqual(events.named("store_commit_failed"), [])
        [dropped] = events.named("store_entry_dropped")
        self.assertEqual(dropped["peer_id"], 2)
        self.assertNotIn(2, node.connected_peers())
        marks = {key: record.delivered for key, record in c.storages[1].inbound.items()}
        self.assertNotIn(2**63 + 1, marks.values())
        node.send_to(2, b"to two")
        c.run_until(lambda: not node.pending_outbound())
        self.assertEqual(c.received(3, 1), numbered(5))
        self.assertEqual(c.received(2, 1), [b"to two"])


class CommitBackoffTests(SynchronousTestCase):
    def test_failing_store_is_retried_at_the_backoff_rate(self) -> None:
        """
        While every commit fails, new work (delivery marks of a peer that
        keeps sending, acknowledgements, sends of the application) never
        starts a commit before the backoff has passed: over 60 s, the number
        of commits attempted is that of the backoff (0.1 s doubling to
        10 s), not one per new mark.  Sends made meanwhile fail with the
        store's error; once the store works again, everything goes through.
        """
        c = Cluster()
        backend = CountingCommits(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        node = c.start(1, backend)
        peer = c.start(2)
        c.run_until(lambda: node.connected_peers())
        self.flushLoggedErrors(StoreFull)
        backend.failing = True
        backend.commits = 0
        start = c.clock.seconds()
        tick = 0
        while c.clock.seconds() - start < 60:
            peer.send_to(1, b"in %d" % tick)
            d = node.send_to(2, b"out %d" % tick)
            d.addErrback(lambda f: f.trap(StoreFull))
            tick += 1
            c.clock.advance(0.05)
        self.assertGreater(tick, 1000)
        # 0.1 + 0.2 + ... + 6.4 = 12.7 s, then one every 10 s.
        self.assertLessEqual(backend.commits, 14)
        self.assertGreaterEqual(backend.commits, 10)
        backend.failing = False
        c.run_until(
            lambda: not node.pending_outbound() and not peer.pending_outbound(),
            timeout=120,
        )
        delivered = c.received(1, 2)
        self.assertEqual(delivered, [b"in %d" % i for i in range(tick)])
        self.flushLoggedErrors(StoreFull)


class LogFloodTests(SynchronousTestCase):
    def test_failing_delivery_target_logs_at_a_bounded_rate(self) -> None:
        """
        A delivery target that fails every attempt for ten minutes (retried
        with backoff up to 30 s, so about 30 attempts, and far more with a
        short maximum) logs its first failure with a traceback and then one
        summary a minute: at most 11 delivery_failed events and one
        traceback.
        """
        c = Cluster(Config(delivery_retry=0.01, max_delivery_retry=0.05))
        lines = Lines(self)
        sender = c.start(1)
        c.start(2)
        c.recorders[2].fail_from[1] = 10**9
        sender.send_to(2, b"never taken")
        settle(c.clock, 600)
        self.assertGreater(c.recorders[2].attempts, 10_000)
        self.assertLessEqual(len(lines.named("delivery_failed")), 11)
        c.recorders[2].fail_from[1] = 0
        settle(c.clock, 61)
        self.assertEqual(c.received(2, 1), [b"never taken"])
        failures = lines.named("delivery_failed")
        self.assertLessEqual(len(failures), 11)
        self.assertEqual(sum(1 for e in failures if "log_failure" in e), 1)
        self.assertEqual(
            occurrences(failures),
            c.recorders[2].attempts - 1,
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertLess(lines.lines(), 60)

    def test_full_store_logs_at_a_bounded_rate(self) -> None:
        """
        A full store with an application that keeps sending (1,980 sends
        refused with StoreFull over about 100 s): the commits follow the
        backoff and their failures are logged once in full, then as one
        summary a minute: a handful of lines, not one traceback per refused
        send.
        """
        c = Cluster()
        lines = Lines(self)
        backend = CountingCommits(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        node = c.start(1, backend)
        c.start(2)
        c.run_until(lambda: node.connected_peers())
        backend.failing = True
        refusals: list[object] = []
        while len(refusals) < 1980:
            for _ in range(20):
                node.send_to(2, b"x").addErrback(refusals.append)
            c.clock.advance(1.0)
        for failure in refusals:
            failure.trap(StoreFull)  # type: ignore[attr-defined]
        backend.failing = False
        settle(c.clock, 61)
        commits = lines.named("store_commit_failed")
        self.assertEqual(sum(1 for e in commits if "log_failure" in e), 1)
        self.assertLessEqual(len(commits), 4)
        self.assertEqual(
            occurrences(commits),
            backend.failed,
        )
        self.assertLess(lines.lines(), 40)
        self.assertEqual(len(self.flushLoggedErrors(StoreFull)), 1)
        self.flushLoggedErrors(StoreError)


class OutboxReadTests(SynchronousTestCase):
    def test_large_backlog_is_read_once(self) -> None:
        """
        A backlog of 200 messages of 100 kB (20 MB) drained after a restart,
        with a 256 kB window: every message is read from the store exactly
        once (bytes read = bytes delivered), no read returns more than the
        cache has room for (2 x window_bytes + one message), and the cache
        never holds more than that.
        """
        window_bytes = 256 * 1024
        c = Cluster(Config(window=4096, window_bytes=window_bytes))
        node = c.start(1)
        payloads = [bytes([i % 251]) * 100_000 for i in range(200)]
        for payload in payloads:
            node.send_to(2, payload)
        c.clock.advance(0)
        c.crash(1)
        reads = ReadCounting(InMemoryBackend(c.storages[1]))
        node = c.start(1, reads)
        c.start(2)
        peak = [0]

        def drained() -> bool:
            peak[0] = max(peak[0], node.peer_status(2).cached_bytes)
            return not node.pending_outbound()

        c.run_until(drained)
        self.assertEqual(c.received(2, 1), payloads)
        self.assertEqual(reads.bytes_read, sum(map(len, payloads)))
        self.assertLessEqual(reads.largest_read, 2 * window_bytes + 100_000)
        self.assertLessEqual(peak[0], 2 * window_bytes + 100_000)

    def test_empty_reads_keep_backing_off(self) -> None:
        """
        An outbox that answers every read with nothing while its state says
        messages are pending is read again with a doubling delay (0.1 s up
        to 10 s: about 10 reads in a minute, not hundreds); the failure is
        logged once in full and then summarised.
        """
        c = Cluster()
        events = Events(self)
        node = c.start(1)
        for p in numbered(10):
            node.send_to(2, p)
        c.clock.advance(0)
        c.crash(1)
        reads = ReadCounting(InMemoryBackend(c.storages[1]))
        reads.empty = True
        node = c.start(1, reads)
        c.start(2)
        settle(c.clock, 60)
        self.assertLessEqual(reads.reads, 12)
        self.assertGreaterEqual(reads.reads, 8)
        logged = events.named("outbox_read_failed")
        self.assertEqual(sum(1 for e in logged if "log_failure" in e), 1)
        reads.empty = False
        settle(c.clock, 11)
        self.assertEqual(c.received(2, 1), numbered(10))
        self.flushLoggedErrors(StoreError)


class FakePeer:
    """
    Drives one peer of a node by hand over a :class:`ScriptedNetwork`: a
    link per incarnation, HELLO and DATA frames as the peer would send them.
    """

    def __init__(self, network: ScriptedNetwork, peer_id: object) -> None:
        self.network = network
        self.peer_id = peer_id

    def connect(self, incarnation: str, first_unacked: int = 1) -> None:
        if self.peer_id in self.network.links:
            self.disconnect()
        self.network.establish(self.peer_id)
        hello = Hello(
            version=PROTOCOL_VERSION,
            incarnation=incarnation,
            window=4096,
            window_bytes=1 << 22,
            first_unacked=first_unacked,
            last_position=first_unacked + 10_000,
            known_incarnation=None,
            delivered=0,
        )
        self.network.receive(self.peer_id, _frames.encode_resume(hello))

    def disconnect(self) -> None:
        assert self.network.receiver is not None
        self.network.links.discard(self.peer_id)
        self.network.receiver.link_lost(self.peer_id, Failure(ConnectionDone()))

    def data(self, first: int, contents: list[bytes]) -> None:
        for frame in _frames.encode_messages(first, contents, 256 * 1024):
            self.network.receive(self.peer_id, frame)


def incarnation(n: int) -> str:
    return "%032x" % (n + 1)


class IncarnationTests(SynchronousTestCase):
    def node(
        self, config: Config, storage: InMemoryStorage | None = None
    ) -> tuple[Any, ScriptedNetwork, Clock, InMemoryStorage, list[Any]]:
        clock = Clock()
        storage = storage if storage is not None else InMemoryStorage()
        network = ScriptedNetwork(1)
        taken: list[Any] = []
        hold: list[Deferred[None]] = []

        def deliver(message: Any) -> Deferred[None] | None:
            if message.source_id == 2:
                # Peer 2's messages are never taken (an asynchronous target
                # that hangs): everything it sends stays held.
                d: Deferred[None] = Deferred()
                hold.append(d)
                return d
            taken.append(message)
            return None

        node = ILM(
            InMemoryBackend(storage), deliver, network, config=config, clock=clock
        )
        node.startService()
        clock.advance(0)
        self.addCleanup(lambda: [d.callback(None) for d in hold if not d.called])
        return node, network, clock, storage, taken

    def test_held_data_bounded_across_incarnations(self) -> None:
        """
        A peer flapping through 40 incarnations, each sending a full window
        (64 messages of 16 kB) to a delivery target that never finishes:
        what the node holds from that peer stays within one window and one
        frame in all (not one window per incarnation), and another peer's
        messages are delivered meanwhile.
        """
        config = Config(
            window=64,
            window_bytes=1 << 20,
            max_frame_size=(1 << 20) + 4096,
            max_message_size=1 << 20,
            max_new_incarnations=1000,
        )
        node, network, clock, _storage, taken = self.node(config)
        attacker, other = FakePeer(network, 2), FakePeer(network, 3)
        other.connect(incarnation(999))
        budget = config.window_bytes + config.max_frame_size
        for n in range(40):
            attacker.connect(incarnation(n))
            attacker.data(1, [bytes([n]) * 16_000 for _ in range(64)])
            clock.advance(0.01)
            held = node.peer_status(2)
            self.assertLessEqual(held.queued_bytes, budget)
            self.assertLessEqual(sum(held.queued), config.window)
            other.data(n + 1, [b"other %d" % n])
            clock.advance(0.01)
        self.assertEqual(
            [m.contents for m in taken], [b"other %d" % n for n in range(40)]
        )
        streams = node._peers[2].inbound
        self.assertEqual(
            sum(len(s.queue) for s in streams), node._peers[2].held.messages
        )
        self.assertEqual(sum(s.held_bytes for s in streams), node._peers[2].held.bytes)

    def test_new_incarnations_are_rate_limited(self) -> None:
        """
        A peer may start at most max_new_incarnations new incarnations per
        new_incarnation_period: the next one is refused with
        TooManyIncarnations (its link closed, a protocol_violation logged,
        no record stored for it); once the period has passed, a new one is
        accepted again.  A known incarnation reconnecting is not counted.
        """
        events = Events(self)
        config = Config(max_new_incarnations=3, new_incarnation_period=60.0)
        _node, network, clock, storage, _ = self.node(config)
        attacker = FakePeer(network, 2)
        for n in range(3):
            attacker.connect(incarnation(n))
            clock.advance(1)
            self.assertIn(2, network.links)
        attacker.connect(incarnation(2))
        clock.advance(1)
        self.assertIn(2, network.links)
        attacker.connect(incarnation(3))
        clock.advance(1)
        self.assertNotIn(2, network.links)
        [violation] = events.named("protocol_violation")
        self.assertEqual(violation["kind"], "TooManyIncarnations")
        self.assertNotIn((2, incarnation(3)), storage.inbound)
        clock.advance(60)
        attacker.connect(incarnation(3))
        clock.advance(1)
        self.assertIn(2, network.links)
        self.assertIn((2, incarnation(3)), storage.inbound)

    def test_retired_records_are_capped(self) -> None:
        """
        Beyond max_retired_incarnations, the oldest retired incarnations of
        a peer are forgotten, in memory and in the store: its records stay
        at most the cap plus its current one, also after a restart.  The
        rule's cost: a forgotten incarnation that comes back is accepted as
        a new one, while one still remembered is refused (StaleIncarnation).
        """
        events = Events(self)
        config = Config(max_new_incarnations=1000, max_retired_incarnations=4)
        node, network, clock, storage, _ = self.node(config)
        attacker = FakePeer(network, 2)
        for n in range(30):
            attacker.connect(incarnation(n))
            clock.advance(1)
            records = [key for key in storage.inbound if key[0] == 2]
            self.assertLessEqual(len(records), 5)
        retired = [k[1] for k, r in storage.inbound.items() if k[0] == 2 and r.retired]
        self.assertEqual(retired, [incarnation(n) for n in range(25, 29)])
        self.assertEqual(list(node._peers[2].retired), retired)
        attacker.connect(incarnation(27))
        clock.advance(1)
        self.assertNotIn(2, network.links)
        self.assertEqual(
            [e["kind"] for e in events.named("protocol_violation")],
            ["StaleIncarnation"],
        )
        attacker.connect(incarnation(3))
        clock.advance(1)
        self.assertIn(2, network.links)
        crash(node)
        node, network, clock, storage, _ = self.node(config, storage)
        self.assertEqual(
            list(node._peers[2].retired),
            [incarnation(n) for n in (26, 27, 28, 29)],
        )

    def test_restarted_peer_waits_for_its_old_stream(self) -> None:
        """
        A peer that lost its store comes back while its old incarnation's
        messages still wait for a slow delivery target: the new stream's
        data that does not fit in what the peer may hold is dropped, and is
        asked for again (NACK) once the old stream has drained; every
        message of both incarnations is delivered, the old ones first.
        """
        clock = Clock()
        network = ScriptedNetwork(1)
        pending: list[Deferred[None]] = []
        taken: list[bytes] = []

        def deliver(message: Any) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: taken.append(message.contents))
            pending.append(d)
            return d

        config = Config(
            window=8, window_bytes=1000, max_frame_size=2000, max_message_size=1000
        )
        node = ILM(InMemoryBackend(), deliver, network, config=config, clock=clock)
        node.startService()
        clock.advance(0)
        peer = FakePeer(network, 2)
        peer.connect(incarnation(1))
        old = [b"old %d" % i + b"." * 100 for i in range(8)]
        peer.data(1, old)
        clock.advance(0)
        peer.connect(incarnation(2))
        new = [b"new %d" % i + b"." * 100 for i in range(8)]
        network.sent.clear()
        peer.data(1, new)
        clock.advance(0)
        self.assertEqual(node._peers[2].inbound[-1].received, 0)
        while len(taken) < 8:
            pending[len(taken)].callback(None)
            clock.advance(0)
        nacks = [_frames.decode_nack(f) for f in network.sent if f[0] == _frames.NACK]
        self.assertEqual(nacks, [1])
        peer.data(1, new)
        clock.advance(0)
        while len(taken) < 16:
            pending[len(taken)].callback(None)
            clock.advance(0)
        self.assertEqual(taken, old + new)


class PausedLinkTests(SynchronousTestCase):
    def test_paused_link_owes_one_reply_of_each_kind(self) -> None:
        """
        While a peer does not read (its link is paused), whatever it sends
        makes the node write nothing: duplicate DATA (each would draw an
        ACK), HELLOs asking for a reply, gaps (NACKs) and new data whose
        marks commit.  On resume it gets one HELLO, one ACK (with the marks
        as they are then) and one NACK (the latest position), then the
        stream goes on.
        """
        clock = Clock()
        network = ScriptedNetwork(1)
        taken: list[bytes] = []
        node = ILM(
            InMemoryBackend(),
            lambda m: taken.append(m.contents),
            network,
            config=Config(),
            clock=clock,
        )
        node.startService()
        clock.advance(0)
        peer = FakePeer(network, 2)
        peer.connect(incarnation(7))
        peer.data(1, [b"1", b"2", b"3"])
        clock.advance(1)
        assert network.receiver is not None
        network.receiver.link_paused(2)
        before = len(network.sent)
        hello = Hello(
            version=PROTOCOL_VERSION,
            incarnation=incarnation(7),
            window=4096,
            window_bytes=1 << 22,
            first_unacked=1,
            last_position=10_001,
            known_incarnation=None,
            delivered=0,
            reply_requested=True,
        )
        for _ in range(200):
            peer.data(1, [b"1", b"2", b"3"])
            network.receive(2, _frames.encode_resume(hello))
            clock.advance(0.01)
        received = 3
        for _ in range(18):
            # A gap (a NACK for received + 1), then the data that fills it.
            peer.data(received + 2, [b"%d" % (received + 2)])
            peer.data(received + 1, [b"%d" % (received + 1), b"%d" % (received + 2)])
            received += 2
            clock.advance(0.01)
        peer.data(received + 2, [b"%d" % (received + 2)])
        clock.advance(1)
        self.assertEqual(len(network.sent), before)
        self.assertEqual(len(taken), 39)
        network.receiver.link_resumed(2)
        replies = network.sent[before:]
        self.assertEqual(
            [frame[0] for frame in replies],
            [_frames.RESUME, _frames.ACK, _frames.NACK],
        )
        self.assertFalse(_frames.decode_resume(replies[0]).reply_requested)
        self.assertEqual(_frames.decode_ack(replies[1]), (39, 39))
        self.assertEqual(_frames.decode_nack(replies[2]), 40)
        peer.data(40, [b"40", b"41"])
        clock.advance(1)
        self.assertEqual(taken[-1], b"41")
        self.assertEqual(_frames.decode_ack(network.sent[-1]), (41, 41))


class NackFloodTests(SynchronousTestCase):
    def test_nack_flood_resends_at_most_once_per_timeout(self) -> None:
        """
        A peer that answers a 64 kB window with 10,000 NACKs over 10 s (for
        every position of the window, 110 kB of NACK frames) gets at most
        one go-back per retransmission timeout: about 11 windows resent in
        all (before: one window per NACK, 640 MB).
        """
        clock = Clock()
        network = ScriptedNetwork(1)
        config = Config(window=64, window_bytes=64 * 1024, retransmit_timeout=1.0)
        node = ILM(
            InMemoryBackend(), lambda m: None, network, config=config, clock=clock
        )
        node.startService()
        clock.advance(0)
        for n in range(64):
            node.send_to(2, bytes([n]) * 1000)
        clock.advance(0)
        peer = FakePeer(network, 2)
        peer.connect(incarnation(1))
        clock.advance(0)

        def data_bytes() -> int:
            return sum(len(f) for f in network.sent if f[0] == _frames.MESSAGES)

        first = data_bytes()
        self.assertGreater(first, 64_000)
        nacks = 0
        for step in range(10_000):
            network.receive(2, _frames.encode_nack(1 + step % 64))
            nacks += 1
            clock.advance(0.001)
        resent = data_bytes() - first
        self.assertEqual(nacks * len(_frames.encode_nack(1)), 110_000)
        self.assertLessEqual(resent, 11 * 64 * 1100)
        self.assertGreater(resent, 0)
