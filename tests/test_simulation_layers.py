"""
Tests for the simulator on real layers: nodes whose stores are SQLite files
(``--store sqlite``), nodes linked by the real stream network over
in-memory pipes (``--network stream``), and both together.

The seed batches are the default suite's share of these layers (60 seeds
on SQLite, 80 on the stream network, 24 with both), each with zero
violations and every fault kind of the layer occurring; the broken variants
show that the simulator catches a wrong store and a wrong network through
these layers.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import ilm.backends._lifecycle
from ilm import CommitResult, PeerId, StoreBatch
from ilm._transmitter import Transmitter
from ilm.backends import SQLiteBackend
from ilm.backends._sqlite import inspect_store
from ilm.errors import (
    StoreError,
    StoreFull,
    StoreInDoubt,
    StoreLocked,
    StoreReadOnly,
)
from ilm.interfaces import IBackend, INetwork
from ilm.network import StreamNetwork
from ilm.network._keepalive import Keepalive
from ilm.simulation import (
    CrashableBackend,
    Scenario,
    SimulatedNetwork,
    StoreModel,
    _runner,
    _sqlite,
    main,
    replay_command,
    run_seed,
    run_seeds,
)
from ilm.simulation._runner import scenario_for, scenario_options
from ilm.simulation._sqlite import SQLiteStoreModel
from ilm.simulation._stream import StreamSimulation, stream_network
from ilm.testing import settle

from .test_simulation import Listener

SQLITE_SEEDS = 60
STREAM_SEEDS = 80
COMBINED_SEEDS = 24


def check(
    case: SynchronousTestCase, seeds: Iterable[int], scenario: Scenario
) -> Counter[str]:
    """
    Run ``seeds``; fail with the violations, trace and replay command of
    the first failures.
    """
    summary = run_seeds(seeds, scenario)
    if not summary.ok:
        case.fail("\n\n".join(_runner.format_failure(f) for f in summary.failures[:3]))
    return summary.stats


def assert_occurred(
    case: SynchronousTestCase, stats: Counter[str], kinds: Iterable[str]
) -> None:
    for kind in kinds:
        case.assertGreater(stats[kind], 0, kind)


def sqlite_scenario(case: SynchronousTestCase, **kwargs: object) -> Scenario:
    """
    A scenario on SQLite files kept in a directory of the test's own.
    """
    directory = case.mktemp()
    os.makedirs(directory)
    return Scenario(store_model=SQLiteStoreModel(directory=directory), **kwargs)  # type: ignore[arg-type]


def store_directories(scenario: Scenario) -> list[str]:
    directory = scenario.store_model.directory  # type: ignore[attr-defined]
    return os.listdir(directory)


# --- the seed batches --------------------------------------------------------------

CORE_KINDS = (
    "fault_crash_at_random",
    "fault_crash_in_commit",
    "fault_crash_after_commit",
    "fault_crash_after_delivery",
    "crash_commit_landed",
    "crash_commit_lost",
    "fault_store_loss",
    "fault_delivery_failure",
    "fault_commit_failure",
    "fault_shutdown",
    "shutdown_clean",
    "shutdown_timed_out",
    "duplicates_receiver_crash",
    "lost_with_sender_store",
    "messages_in_doubt_landed",
)

STREAM_KINDS = (
    "fault_cut",
    "fault_abort",
    "fault_half_open",
    "fault_stall",
    "crash_silent",
    "link_paused",
    "event_link_timeout",
    "event_duplicate_link",
    "event_link_replaced",
)


class SQLiteSeedTests(SynchronousTestCase):
    def _batch(self, seeds: range) -> Counter[str]:
        scenario = sqlite_scenario(self)
        threads = threading.active_count()
        stats = check(self, seeds, scenario)
        # Every store was deleted and every SQLite thread stopped.
        self.assertEqual(store_directories(scenario), [])
        self.assertEqual(threading.active_count(), threads)
        return stats

    def test_seeds_first_half(self) -> None:
        """
        Seeds 0-29 on SQLite files: no violation; crashes inside commits
        land or lose the batch in the file, stores are lost, and injected
        store faults fail commits with the real backend's typed errors.
        """
        stats = self._batch(range(SQLITE_SEEDS // 2))
        assert_occurred(
            self,
            stats,
            (
                *CORE_KINDS,
                "fault_cut",
                "fault_drop",
                "store_fault_full",
                "store_fault_read_only",
                "store_fault_io_error",
                "store_error_StoreReadOnly",
                "store_error_StoreInDoubt",
                "fault_crash_store_broken",
            ),
        )
        self.assertEqual(stats["store_error_InjectedStoreFailure"], 0)

    def test_seeds_second_half(self) -> None:
        """
        Seeds 30-59 on SQLite files: no violation, every fault kind occurs,
        and a send fails with StoreInDoubt (its message in doubt).
        """
        stats = self._batch(range(SQLITE_SEEDS // 2, SQLITE_SEEDS))
        assert_occurred(
            self,
            stats,
            (*CORE_KINDS, "store_error_StoreReadOnly", "messages_store_in_doubt"),
        )


SQLITE_REGRESSION_SEEDS = {
    # seed: what it found (three nodes, --store sqlite)
    57: "an outbox read overtaken by an acknowledgement committed before it "
    "ran was logged as a store failure (outbox_read_failed)",
    73: "a commit whose sync failed was reported as not applied (StoreError); "
    "the send it refused was in the file and delivered after the restart",
    77: "the same, on another schedule",
    # Seeds that find the same bugs again once they are put back, since
    # the next commit starts before the previous one's receipts fire:
    119: "the sync failure reported as not applied, on another schedule",
    1871: "the outbox read overtaken by an acknowledgement, on another schedule",
}


class SQLiteRegressionTests(SynchronousTestCase):
    def test_regression_seeds(self) -> None:
        """
        The seeds that found bugs through the SQLite store pass (each bug
        also has a focused test next to the code it fixed).
        """
        check(self, sorted(SQLITE_REGRESSION_SEEDS), scenario_for(3, "sqlite"))

    def test_regression_seeds_still_find_the_bugs(self) -> None:
        """
        With each bug put back, its seeds fail again: they keep testing what
        they found.  (If a change to the simulator's draws breaks this, find
        the seeds again.)
        """
        scenario = scenario_for(3, "sqlite")
        read_failed = Transmitter._read_failed
        self.patch(
            Transmitter,
            "_read_failed",
            lambda self, reason, after=None: read_failed(self, reason),
        )
        [violation] = run_seed(1871, scenario).violations
        self.assertIn("outbox_read_failed", violation)
        self.assertIn("below acknowledged", violation)
        self.patch(Transmitter, "_read_failed", read_failed)
        self.patch(ilm.backends._lifecycle, "StoreInDoubt", StoreError)
        for seed in (77, 119):
            [violation] = run_seed(seed, scenario).violations
            self.assertIn("was refused although its store holds it", violation)


STREAM_REGRESSION_SEEDS = {
    # seed: what it found (three nodes, --network stream)
    176: "a false alarm of the simulator's own checker: behind a half-open "
    "link, a receiver still acknowledged the stream of a sender that had "
    "restarted with a new store; the check now judges such an ACK against "
    "the incarnation it names",
    577: "the same, on another schedule",
}


class StreamRegressionTests(SynchronousTestCase):
    def test_regression_seeds(self) -> None:
        """
        The seeds that found a problem through the stream network pass.
        """
        check(self, sorted(STREAM_REGRESSION_SEEDS), Scenario(network=stream_network))

    def test_regression_seeds_still_find_it(self) -> None:
        """
        With the ACK check judging every ACK against the sender's current
        incarnation again, the seeds raise the false alarm: they still
        reach an ACK from behind a half-open link.
        """
        from ilm.simulation._ledger import Ledger

        real = Ledger.check_ack

        def current_only(
            ledger: Ledger,
            receiver: PeerId,
            sender: PeerId,
            delivered: int,
            sender_acked: int,
            incarnation: str | None = None,
        ) -> None:
            real(ledger, receiver, sender, delivered, sender_acked, None)

        self.patch(Ledger, "check_ack", current_only)
        for seed in sorted(STREAM_REGRESSION_SEEDS):
            violations = run_seed(seed, Scenario(network=stream_network)).violations
            self.assertTrue(violations, seed)
            self.assertIn("receiver acknowledged", violations[0])


class StreamSeedTests(SynchronousTestCase):
    def _batch(self, seeds: range) -> Counter[str]:
        from twisted.internet import reactor

        before = len(reactor.getDelayedCalls())  # type: ignore[attr-defined]
        stats = check(self, seeds, Scenario(network=stream_network))
        # Every timer (links, keepalives, dialers' ClientService) ran on the
        # simulation's clock, none on the real reactor.
        self.assertEqual(len(reactor.getDelayedCalls()), before)  # type: ignore[attr-defined]
        # A stream neither drops, duplicates nor reorders single frames.
        for kind in ("fault_drop", "fault_duplicate", "fault_delay"):
            self.assertEqual(stats[kind], 0, kind)
        return stats

    def test_seeds_first_half(self) -> None:
        """
        Seeds 0-39 on the stream network: no violation; connections are
        aborted, go half-open and stall, crashed nodes' connections vanish
        silently, links time out, duplicate connections are closed and
        links replaced, and full buffers pause links.
        """
        stats = self._batch(range(STREAM_SEEDS // 2))
        assert_occurred(self, stats, (*CORE_KINDS, *STREAM_KINDS))

    def test_seeds_second_half(self) -> None:
        """
        Seeds 40-79 on the stream network: no violation, every fault kind
        occurs.
        """
        stats = self._batch(range(STREAM_SEEDS // 2, STREAM_SEEDS))
        assert_occurred(self, stats, (*CORE_KINDS, *STREAM_KINDS))


class CombinedSeedTests(SynchronousTestCase):
    def test_sqlite_over_stream(self) -> None:
        """
        Seeds 0-23 with SQLite stores and the stream network: no violation.
        """
        scenario = sqlite_scenario(self, network=stream_network)
        stats = check(self, range(COMBINED_SEEDS), scenario)
        assert_occurred(
            self,
            stats,
            ("fault_crash_in_commit", "fault_abort", "fault_half_open", "restarts"),
        )
        self.assertEqual(store_directories(scenario), [])


# --- replay --------------------------------------------------------------------------


class ReplayTests(SynchronousTestCase):
    def test_same_seed_same_run(self) -> None:
        """
        On SQLite, on the stream network and on both, a seed replays
        exactly in one process: same trace digest and counters.
        """
        for store, network in (
            ("sqlite", "memory"),
            ("memory", "stream"),
            ("sqlite", "stream"),
        ):
            first = run_seed(3, scenario_for(3, store, network))
            second = run_seed(3, scenario_for(3, store, network))
            self.assertEqual(first.digest, second.digest, (store, network))
            self.assertEqual(first.stats, second.stats, (store, network))
            self.assertEqual(first.trace, second.trace, (store, network))
        # The runs were not trivial: they took many steps.
        self.assertGreater(first.stats["steps"], 200)

    def test_replay_in_a_new_process(self) -> None:
        """
        The same seeds run in a fresh process (with another hash seed) give
        the same traces as here, after other seeds ran in this process.
        """
        run_seeds(range(3), scenario_for(3, "sqlite", "stream"))
        here = [
            run_seed(seed, scenario_for(3, store, network)).digest
            for seed, store, network in (
                (9, "sqlite", "memory"),
                (9, "memory", "stream"),
                (10, "sqlite", "stream"),
            )
        ]
        script = (
            "from ilm.simulation._runner import run_seed, scenario_for\n"
            "for seed, store, network in ((9, 'sqlite', 'memory'), "
            "(9, 'memory', 'stream'), (10, 'sqlite', 'stream')):\n"
            "    print(run_seed(seed, scenario_for(3, store, network)).digest)\n"
        )
        env = dict(os.environ, PYTHONHASHSEED="321")
        there = subprocess.run(
            [sys.executable, "-c", script],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.split()
        self.assertEqual(there, here)

    def test_stores_named_in_the_trace_the_same_way(self) -> None:
        """
        A store's temporary directory (different at each run) never reaches
        the trace, not even in the store's error messages: it is named by
        node and generation instead.
        """
        out = io.StringIO()
        scenario = sqlite_scenario(self)
        result = run_seed(5, scenario, trace=out)
        self.assertGreater(result.stats["store_error_StoreReadOnly"], 0)
        trace = out.getvalue()
        self.assertIn("attempt to write a readonly database", trace)
        self.assertRegex(trace, r"cannot commit to <store \d\.\d>/store\.sqlite")
        directory = scenario.store_model.directory  # type: ignore[attr-defined]
        self.assertNotIn(directory, trace)


# --- broken variants ---------------------------------------------------------------


def acknowledge_before_applying(original: object) -> object:
    """
    An SQLite backend that acknowledges each commit at once and applies it
    only when the next commit comes (a write-behind cache that lies).
    """

    def commit(self: SQLiteBackend, batch: StoreBatch) -> Deferred[CommitResult]:
        previous = self.__dict__.pop("_unapplied", None)
        self._unapplied = batch  # type: ignore[attr-defined]
        if previous is None:
            return succeed(CommitResult({}))
        applied = original(self, previous)  # type: ignore[operator]
        return applied.addCallback(lambda _: CommitResult({}))  # type: ignore[no-any-return]

    return commit


def never_notice_silence(self: Keepalive) -> None:
    """
    A keepalive that keeps pinging but never declares a silent link dead.
    """
    return None


class BrokenVariantTests(SynchronousTestCase):
    """
    The simulator catches a wrong store and a wrong network through the
    real layers, and the failure replays.
    """

    def _caught(self, seeds: range, scenario: Scenario) -> None:
        summary = run_seeds(seeds, scenario, stop_after=1)
        self.assertFalse(summary.ok, "the broken variant was not caught")
        [failure] = summary.failures
        again = run_seed(failure.seed, scenario)
        self.assertEqual(again.violations, failure.violations)
        self.assertEqual(again.digest, failure.digest)

    def test_sqlite_acknowledges_before_applying(self) -> None:
        """
        An SQLite backend that acknowledges commits before applying them is
        caught (what ILM was told is stored is not in the file).
        """
        self.patch(
            SQLiteBackend, "commit", acknowledge_before_applying(SQLiteBackend.commit)
        )
        self._caught(range(SQLITE_SEEDS), sqlite_scenario(self))

    def test_stream_never_notices_half_open_links(self) -> None:
        """
        A stream network whose keepalive never declares a silent connection
        dead is caught (a half-open link stalls its streams for good).
        """
        self.patch(Keepalive, "silence", never_notice_silence)
        # A stalled stream is reported once heal_timeout has passed: two
        # simulated minutes are plenty for a sound network to converge.
        scenario = Scenario(network=stream_network, heal_timeout=120.0)
        self._caught(range(STREAM_SEEDS), scenario)


# --- the SQLite store model ----------------------------------------------------------


class SQLiteStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.model = SQLiteStoreModel(directory=directory)
        self.store = self.model.new_store("f" * 32)
        self.addCleanup(self.model.discard, self.store)
        self.clock = Clock()
        self.listener = Listener()
        self.backend = self.open_backend()

    def open_backend(self) -> _sqlite.SimulatedSQLiteBackend:
        backend = self.model.open_backend(
            self.store, self.clock, self.listener, lambda: 0.5
        )
        d = backend.open()
        self.run_for(0.5)
        self.successResultOf(d)
        return backend

    def run_for(self, seconds: float) -> None:
        """
        Advance the clock, then hand finished operations over (as the
        simulator does between steps).
        """
        self.clock.advance(seconds)
        self.backend_settle()

    def backend_settle(self) -> None:
        backend = getattr(self, "backend", None)
        for b in {id(b): b for b in (backend, self.store.backend) if b}.values():
            b.settle()

    def in_file(self) -> tuple[dict[object, tuple[int, int]], dict[object, int]]:
        report = inspect_store(self.store.path)
        return (
            {box.peer_id: (box.acked, box.last_position) for box in report.outbound},
            {mark.peer_id: mark.delivered for mark in report.inbound},
        )

    def test_interfaces(self) -> None:
        """
        The simulated SQLite backend provides IBackend and CrashableBackend
        and its model is a StoreModel; the store's file carries the
        incarnation it was made with.
        """
        verifyObject(IBackend, self.backend)
        self.assertIsInstance(self.backend, CrashableBackend)
        self.assertIsInstance(self.model, StoreModel)
        self.assertIsInstance(self.backend.inner, SQLiteBackend)
        [state] = self.listener.opened_states
        self.assertEqual(state.incarnation, "f" * 32)
        self.assertEqual(inspect_store(self.store.path).incarnation, "f" * 32)

    def test_results_wait_for_settle(self) -> None:
        """
        A commit reaches SQLite after its latency; its result is handed to
        ILM only when the simulator settles, between clock steps.
        """
        d = self.backend.commit(StoreBatch(messages={2: (1, [b"a", b"b"])}))
        self.clock.advance(0.4)
        self.assertEqual(self.in_file(), ({}, {}))
        self.clock.advance(0.1)
        self.assertEqual(self.in_file()[0], {2: (0, 2)})
        self.assertNoResult(d)
        self.backend.settle()
        self.successResultOf(d)
        self.assertEqual(len(self.listener.batches), 1)
        self.assertEqual(self.backend.durable_outbox(), {2: 2})

    def test_crash_lands_whole_batch(self) -> None:
        """
        A crash during a commit that lands it applies the whole batch to
        the file, fires nothing, and releases the store: a restarted node
        opens the same file and finds the batch.
        """
        d = self.backend.commit(
            StoreBatch(messages={2: (1, [b"a"])}, delivered={(3, "e" * 32): 4})
        )
        self.clock.advance(0.2)
        self.assertTrue(self.backend.crash(land=True))
        self.run_for(1)
        self.assertNoResult(d)
        self.assertEqual(self.in_file(), ({2: (0, 1)}, {3: 4}))
        self.open_backend()
        state = self.listener.opened_states[-1]
        self.assertEqual(state.outbound[0].last_position, 1)

    def test_crash_loses_whole_batch(self) -> None:
        """
        A crash during a commit that does not land it never gives the batch
        to SQLite: the file does not have it.
        """
        d = self.backend.commit(StoreBatch(messages={2: (1, [b"a"])}))
        self.clock.advance(0.2)
        self.assertTrue(self.backend.crash(land=False))
        self.run_for(1)
        self.assertNoResult(d)
        self.assertEqual(self.in_file(), ({}, {}))
        self.assertEqual(self.listener.batches, [])
        self.assertFalse(self.backend.crash(land=True))

    def test_crash_releases_the_lock(self) -> None:
        """
        While a backend is open its file is locked; after a crash it is
        not.
        """
        other = SQLiteBackend(self.store.path, reactor=self.backend.gate)
        failure = self.backend.gate.wait(other.open())
        self.assertTrue(failure.check(StoreLocked))  # type: ignore[union-attr]
        self.backend.crash(land=False)
        self.backend.gate.wait(other.open())
        self.backend.gate.wait(other.close())

    def test_read_only_store(self) -> None:
        """
        A commit made while the store is read-only fails with the backend's
        StoreReadOnly and applies nothing; the next commit works.
        """
        self.patch(_sqlite, "STORE_FAULTS", ("read_only",))
        self.listener.fail_next = True
        d = self.backend.commit(StoreBatch(messages={2: (1, [b"a"])}))
        self.run_for(1)
        self.failureResultOf(d, StoreReadOnly)
        self.assertEqual(self.in_file(), ({}, {}))
        self.assertEqual(self.listener.faults, ["read_only"])
        self.assertTrue(self.listener.failures[0].check(StoreReadOnly))
        self.listener.fail_next = False
        d = self.backend.commit(StoreBatch(messages={2: (1, [b"b"])}))
        self.run_for(1)
        self.successResultOf(d)

    def test_full_store(self) -> None:
        """
        A commit that needs room while the store is full fails with the
        backend's StoreFull and applies nothing; the next commit works.
        """
        self.patch(_sqlite, "STORE_FAULTS", ("full",))
        self.listener.fail_next = True
        big = [b"x" * 1000] * 50
        d = self.backend.commit(StoreBatch(messages={2: (1, big)}))
        self.run_for(1)
        self.failureResultOf(d, StoreFull)
        self.assertEqual(self.in_file(), ({}, {}))
        self.listener.fail_next = False
        d = self.backend.commit(StoreBatch(messages={2: (1, big)}))
        self.run_for(1)
        self.successResultOf(d)

    def test_commit_sync_fails(self) -> None:
        """
        A commit whose sync fails (written or not, as the store's seeded
        generator decides) fails with the backend's StoreInDoubt; what was
        written is reported as landed and is in the file; the store then
        refuses all work until reopened.
        """
        self.patch(_sqlite, "STORE_FAULTS", ("io_error",))
        outcomes = set()
        position = 0
        for attempt in range(8):
            self.listener.fail_next = True
            landed = len(self.listener.batches)
            d = self.backend.commit(
                StoreBatch(messages={2: (position + 1, [b"%d" % attempt])})
            )
            self.run_for(1)
            self.failureResultOf(d, StoreInDoubt)
            written = len(self.listener.batches) > landed
            outcomes.add(written)
            position += written
            self.assertEqual(self.in_file()[0].get(2, (0, 0))[1], position)
            self.listener.fail_next = False
            refused = self.backend.commit(
                StoreBatch(messages={2: (position + 1, [b"x"])})
            )
            self.run_for(1)
            self.assertIn("restart", str(self.failureResultOf(refused).value))
            self.backend.crash(land=False)
            self.backend = self.open_backend()
        self.assertEqual(outcomes, {True, False})
        self.assertEqual(self.listener.faults, ["io_error"] * 8)

    def test_reads_run_apart_from_commits(self) -> None:
        """
        A read runs on its own schedule, as on SQLite's reader thread: a
        commit that runs before it is seen, and an acknowledgement that
        runs before it makes a read below it fail, as SQLite does.
        """
        self.backend.commit(StoreBatch(messages={2: (1, [b"a", b"b"])}))
        self.clock.advance(0.1)
        seen = self.backend.read_outbound(2, 0, 10, 1 << 30)  # runs at 0.6
        self.run_for(1)
        self.assertEqual(self.successResultOf(seen), [b"a", b"b"])
        stale = self.backend.read_outbound(2, 0, 10, 1 << 30)
        self.clock.advance(0.1)
        self.backend._writer_free = 0.0
        self.backend.latency = lambda: 0.1
        self.backend.commit(StoreBatch(acked={2: 1}))  # runs before the read
        self.run_for(1)
        self.failureResultOf(stale, StoreError)

    def test_close_after_commit(self) -> None:
        """
        A close called while a commit is in flight runs after it, as on
        SQLite's writer thread.
        """
        commit = self.backend.commit(StoreBatch(messages={2: (1, [b"a"])}))
        self.clock.advance(0.3)
        self.backend.latency = lambda: 0.0
        closed = self.backend.close()
        self.run_for(1)
        self.successResultOf(commit)
        self.successResultOf(closed)
        self.assertEqual(self.in_file()[0], {2: (0, 1)})

    def test_discard_deletes_the_store(self) -> None:
        """
        Discarding a store closes its open backend and deletes its files.
        """
        self.model.discard(self.store)
        self.assertFalse(os.path.exists(self.store.directory))
        self.assertTrue(self.backend.crashed)

    def test_model_refuses_foreign_stores(self) -> None:
        """
        The SQLite store model only opens and discards its own stores.
        """
        self.assertRaises(
            TypeError,
            self.model.open_backend,
            object(),
            self.clock,
            self.listener,
            lambda: 0.0,
        )
        self.assertRaises(TypeError, self.model.discard, object())


# --- the stream network model ---------------------------------------------------------


class StreamSimulationTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        The stream simulation is a SimulatedNetwork whose nodes' networks
        are real StreamNetworks (INetwork providers).
        """
        model = StreamSimulation(Clock(), random.Random(1))
        self.assertIsInstance(model, SimulatedNetwork)
        model.attach((1, 2), lambda *a: None, lambda text: None, Counter())
        network = model.add_peer(1)
        self.assertIsInstance(network, StreamNetwork)
        verifyObject(INetwork, network)
        self.assertIn("stream network", model.describe())

    def test_faults(self) -> None:
        """
        Each stream fault does to one connection what it says; there is
        nothing to do when there is no connection.
        """
        clock = Clock()
        model = StreamSimulation(clock, random.Random(2))
        model.attach((1, 2), lambda *a: None, lambda text: None, Counter())
        rng = random.Random(0)
        self.assertIsNone(model.inject("abort", rng))
        from .stream_support import RecordingReceiver

        receivers = {1: RecordingReceiver(), 2: RecordingReceiver()}
        for peer in (1, 2):
            model.add_peer(peer).start(receivers[peer])
        settle(clock, 1)
        [pipe] = model.board.pipes
        self.assertIn("stops reading", model.inject("stall", rng) or "")
        self.assertTrue(any(pipe.stalled))
        settle(clock, 5)
        self.assertFalse(any(pipe.stalled))
        self.assertIn("half-open", model.inject("half_open", rng) or "")
        self.assertTrue(pipe.severed)
        settle(clock, model.settings.idle_timeout * 2)
        self.assertIn("lost", receivers[1].kinds())
        [pipe] = model.board.pipes
        self.assertIn("abort", model.inject("abort", rng) or "")
        self.assertEqual(model.board.pipes, [])
        model.cut(1, 2)
        self.assertTrue(model.is_cut(2, 1))
        settle(clock, 5)
        self.assertEqual(model.board.pipes, [])
        model.restore(1, 2)
        settle(clock, 5)
        self.assertEqual(len(model.board.pipes), 1)
        self.assertRaises(ValueError, model.inject, "nosuch", rng)


# --- the command line ----------------------------------------------------------------


class CommandLineTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def test_layers(self) -> None:
        """
        ``--store sqlite --network stream`` runs the seeds on both layers;
        the summary names them and counts the stream faults and the store
        errors.
        """
        status, out, _ = self.run_main(
            "--seeds", "2", "--store", "sqlite", "--network", "stream"
        )
        self.assertEqual(status, 0, out)
        self.assertIn(
            "seeds       2 (0..1), 3 nodes, 0 failed (--store sqlite --network stream)",
            out,
        )
        self.assertIn("stream      connections aborted", out)

    def test_failure_replays_with_its_layers(self) -> None:
        """
        The replay command of a failed seed names its store and network, and
        running it reproduces the failure.
        """
        self.patch(
            SQLiteBackend, "commit", acknowledge_before_applying(SQLiteBackend.commit)
        )
        status, out, _ = self.run_main(
            "--seeds", "2", "--store", "sqlite", "--network", "stream"
        )
        self.assertEqual(status, 1)
        first = next(line for line in out.splitlines() if "replay:" in line)
        command = first.split("replay: ", 1)[1]
        seed = int(command.split("--start ")[1].split()[0])
        self.assertEqual(
            command,
            replay_command(seed, 3, ("--store", "sqlite", "--network", "stream")),
        )
        status, replayed, _ = self.run_main(*command.split()[3:])
        self.assertEqual(status, 1)
        self.assertIn(f"seed {seed} FAILED", replayed)

    def test_options(self) -> None:
        """
        Unknown stores and networks are refused; the default scenario needs
        no options to replay.
        """
        self.assertRaises(SystemExit, self.run_main, "--store", "postgres")
        self.assertRaises(SystemExit, self.run_main, "--network", "udp")
        self.assertEqual(scenario_options(Scenario()), ())
        self.assertEqual(
            scenario_options(scenario_for(4, "memory", "stream")),
            ("--network", "stream"),
        )
        self.assertRaises(ValueError, scenario_for, 3, "nosuch")
