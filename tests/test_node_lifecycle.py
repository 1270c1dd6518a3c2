"""
Tests for :mod:`ilm._lifecycle`: a node's life as a typed automat machine
(new, starting, running, stopping, stopped, failed), read through
``ILM.state``, and the machine refusing the transitions it does not list.
"""

from __future__ import annotations

from automat import NoTransition
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM, Config
from ilm._lifecycle import _machine
from ilm._node import NodeCore
from ilm.errors import NotRunning, StoppedBeforeAcknowledged, StoreError
from ilm.network import InMemoryNetwork
from ilm.testing import InMemoryBackend, InMemoryStorage, settle

from .test_messenger import PausedOpen


class MachineTests(SynchronousTestCase):
    def core(self) -> NodeCore:
        clock = Clock()
        network = InMemoryNetwork(clock).add_peer(1)
        return NodeCore(1, Config(), clock, InMemoryBackend(), network)

    def test_full_life(self) -> None:
        """
        new, starting, running, stopping, stopped: each input moves the
        machine one step, and reaching stopped says so to waiting receipts
        (``NodeCore.ended``).
        """
        core = self.core()
        life = _machine(core)
        seen = [life.state()]
        for step in (life.start, life.opened, life.stop, life.stopped):
            step()
            seen.append(life.state())
        self.assertEqual(seen, ["new", "starting", "running", "stopping", "stopped"])
        self.assertEqual(core.ended, "ILM node 1 stopped")

    def test_failed_then_stopped(self) -> None:
        """
        A failed start ends the node ("failed"); a shutdown after it makes
        it stopped.
        """
        core = self.core()
        life = _machine(core)
        life.start()
        life.start_failed()
        self.assertEqual((life.state(), core.ended), ("failed", "ILM node 1 failed"))
        life.stopped()
        self.assertEqual(life.state(), "stopped")

    def test_crash_from_anywhere(self) -> None:
        """
        A crash stops the node from every state, once more included.
        """
        for steps in ((), ("start",), ("start", "opened"), ("start", "start_failed")):
            life = _machine(self.core())
            for step in steps:
                getattr(life, step)()
            life.crash()
            life.crash()
            self.assertEqual(life.state(), "stopped", steps)

    def test_unlisted_transitions_refused(self) -> None:
        """
        An input the machine does not list for a state is a bug, refused
        with NoTransition: no store opened before the start, no drain before
        running, no start after the end.
        """
        life = _machine(self.core())
        self.assertRaises(NoTransition, life.opened)
        self.assertRaises(NoTransition, life.stop)
        life.crash()
        self.assertRaises(NoTransition, life.start)


class NodeStateTests(SynchronousTestCase):
    def test_states_through_the_node(self) -> None:
        """
        ``ILM.state`` follows the machine: new, starting while the store
        opens, running, stopped after a shutdown; a stopped node cannot be
        started again.
        """
        clock = Clock()
        backend = PausedOpen(InMemoryBackend(InMemoryStorage()))
        node = ILM(
            backend,  # type: ignore[arg-type]
            print,
            InMemoryNetwork(clock).add_peer(1),
            clock=clock,
        )
        self.assertEqual(node.state, "new")
        node.startService()
        self.assertEqual(node.state, "starting")
        backend.release()
        self.assertEqual(node.state, "running")
        self.assertEqual(node.stats().state, "running")
        done = node.shutdown()
        settle(clock, 1)
        self.successResultOf(done)
        self.assertEqual(node.state, "stopped")
        self.assertRaises(NotRunning, node.startService)

    def test_failed_start(self) -> None:
        """
        A store that cannot open leaves the node failed; receipts of its
        stored messages cannot be awaited any more.
        """

        class Broken(InMemoryBackend):
            def open(self) -> Deferred[object]:  # type: ignore[override]
                from twisted.internet.defer import fail

                return fail(StoreError("locked"))

        clock = Clock()
        node = ILM(Broken(), print, InMemoryNetwork(clock).add_peer(1), clock=clock)
        started = node.when_started()
        node.startService()
        self.failureResultOf(started, StoreError)
        self.assertEqual(node.state, "failed")
        self.assertFalse(node.running)
        self.failureResultOf(node.send_to(2, b"x"), NotRunning)
        self.successResultOf(node.shutdown())
        self.assertEqual(node.state, "stopped")

    def test_receipt_after_stop(self) -> None:
        """
        A receipt awaited after its node stopped fails with
        StoppedBeforeAcknowledged (the message stays stored).
        """
        clock = Clock()
        node = ILM(
            InMemoryBackend(), print, InMemoryNetwork(clock).add_peer(1), clock=clock
        )
        node.startService()
        sent = node.send_to(2, b"x")
        settle(clock, 0.1)
        receipt = self.successResultOf(sent)
        waiting = receipt.acknowledged
        stopping = node.shutdown(0.5)
        settle(clock, 2)
        self.failureResultOf(waiting, StoppedBeforeAcknowledged)
        self.failureResultOf(receipt.acknowledged, StoppedBeforeAcknowledged)
        stopping.addErrback(lambda f: None)
