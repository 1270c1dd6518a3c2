"""
Tests for ilm.simulation.Gate: results of work done on threads are handed
to their callers deterministically, in call order, between clock steps.
"""

from __future__ import annotations

import os
import threading

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ilm import StoreBatch
from ilm.backends import SQLiteBackend
from ilm.simulation import Gate, GateTimeout


class Owner:
    def __init__(self) -> None:
        self.crashed = False


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gate = Gate(timeout=10.0)
        self.pool = ThreadPool(1, 1)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def on_thread(self, value: object) -> Deferred[object]:
        def work() -> object:
            if isinstance(value, Exception):
                raise value
            return (value, threading.current_thread().name)

        return deferToThreadPool(self.gate, self.pool, work)  # type: ignore[arg-type]

    def test_reactor_from_threads(self) -> None:
        """
        The gate is what a thread-using backend needs of its reactor.
        """
        verifyObject(IReactorFromThreads, self.gate)
        trigger = self.gate.addSystemEventTrigger("during", "shutdown", print)
        self.gate.removeSystemEventTrigger(trigger)

    def test_wait(self) -> None:
        """
        ``wait`` blocks until the thread's result has come back and returns
        it (or its Failure); the work really ran on another thread.
        """
        value, thread = self.gate.wait(self.on_thread(1))  # type: ignore[misc]
        self.assertEqual(value, 1)
        self.assertNotEqual(thread, threading.current_thread().name)
        failure = self.gate.wait(self.on_thread(ValueError("no")))
        self.assertIsInstance(failure, Failure)
        self.assertTrue(failure.check(ValueError))  # type: ignore[union-attr]

    def test_wait_times_out(self) -> None:
        """
        A result that never comes ends the wait with GateTimeout.
        """
        self.gate.timeout = 0.05
        self.assertRaises(GateTimeout, self.gate.wait, Deferred())

    def test_hold_and_settle_in_call_order(self) -> None:
        """
        Held results are handed over only by ``settle``, in the order they
        were held, skipping owners that crashed; results handed over may
        lead to more held operations, handed over in the same settle.
        """
        order: list[object] = []
        alive, dead = Owner(), Owner()
        first = self.gate.hold(self.on_thread("a"), alive)
        lost = self.gate.hold(self.on_thread("b"), dead)
        failed = self.gate.hold(self.on_thread(KeyError("c")), alive)

        def more(result: tuple[object, str]) -> None:
            order.append(result[0])
            later = self.gate.hold(succeed("d"), alive)
            later.addCallback(order.append)

        first.addCallback(more)
        failed.addErrback(lambda f: order.append(f.type))
        lost.addBoth(order.append)
        self.assertEqual((order, self.gate.holding), ([], 3))
        dead.crashed = True
        self.assertTrue(self.gate.settle())
        self.assertEqual(order, ["a", KeyError, "d"])
        self.assertNoResult(lost)
        self.assertFalse(self.gate.settle())

    def test_sqlite_backend(self) -> None:
        """
        An SQLiteBackend whose reactor is the gate opens, commits, reads and
        closes with its work on its own threads, each result waited for.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        backend = SQLiteBackend(os.path.join(directory, "s.sqlite"), reactor=self.gate)
        state = self.gate.wait(backend.open())
        self.assertEqual(len(state.incarnation), 32)  # type: ignore[union-attr]
        self.gate.wait(backend.commit(StoreBatch(messages={2: (1, [b"x", b"y"])})))
        self.assertEqual(
            self.gate.wait(backend.read_outbound(2, 0, 10, 1 << 30)), [b"x", b"y"]
        )
        self.assertIsNone(self.gate.wait(backend.close()))
