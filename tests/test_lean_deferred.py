"""
Tests for :mod:`ilm._lean_deferred`: a ``LeanDeferred`` behaves as a
``Deferred`` in each way Twisted and applications use one, and a pending
``send_to`` costs the garbage collector one tracked object.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ilm import _sender
from ilm._lean_deferred import LeanDeferred, lean_deferreds, new_deferred, unobserved
from tests.support import Cluster


class LeanDeferredTests(SynchronousTestCase):
    """
    ``LeanDeferred`` against the ``Deferred`` API.
    """

    def test_this_twisted(self) -> None:
        """
        The Twisted under test sets only ``_callbacks`` and ``_canceller`` in
        ``Deferred.__init__``, so ``send_to`` uses ``LeanDeferred``.
        """
        self.assertTrue(lean_deferreds())
        self.assertIs(new_deferred, LeanDeferred)

    def test_one_tracked_object(self) -> None:
        """
        A new ``LeanDeferred`` is one object tracked by the collector; adding
        a callback makes its list.
        """
        d: LeanDeferred[int] = LeanDeferred()
        referents = [o for o in gc.get_referents(d) if o is not LeanDeferred]
        self.assertEqual([o for o in referents if gc.is_tracked(o)], [])
        d.addCallback(lambda r: r)
        self.assertEqual(len(d._callbacks), 1)

    def test_no_instance_dict(self) -> None:
        """
        Whether it fired before or after getting a callback, no instance
        gets a dictionary object of its own: in a fresh interpreter, after
        many fired without callbacks, a thousand given a callback first are
        each the Deferred, its list and the callback's entry, and no dict.
        """
        script = textwrap.dedent(
            """
            import gc
            from collections import Counter
            from ilm._lean_deferred import LeanDeferred

            fired = [LeanDeferred() for _ in range(200)]
            for d in fired:
                d.callback(1)
            del fired, d
            gc.collect()
            gc.disable()
            before = Counter(type(o).__name__ for o in gc.get_objects())
            kept = []
            for _ in range(1000):
                d = LeanDeferred()
                d.addErrback(lambda f: f)
                kept.append(d)
            after = Counter(type(o).__name__ for o in gc.get_objects())
            print((after - before).get("dict", 0))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(int(out), 0)

    def test_callbacks_in_order(self) -> None:
        """
        Callbacks and errbacks added before and after firing run in order,
        each with the previous one's result.
        """
        seen: list[object] = []
        d: LeanDeferred[int] = LeanDeferred()
        d.addCallback(lambda r: seen.append(r) or r + 1)
        d.addErrback(lambda f: seen.append("not this"))
        d.addBoth(lambda r: seen.append(r) or r)
        d.callback(1)
        d.addCallback(seen.append)
        self.assertEqual(seen, [1, 2, 2])
        self.assertTrue(d.called)

    def test_fired_without_callbacks(self) -> None:
        """
        Fired before anything was added, it keeps the result for callbacks
        added later.
        """
        d: LeanDeferred[str] = LeanDeferred()
        d.callback("stored")
        self.assertEqual(self.successResultOf(d), "stored")

    def test_fired_as_deferred_is(self) -> None:
        """
        Fired with nothing added, it is left as a plain ``Deferred`` is (the
        same attributes, in the same order), and a second firing raises;
        fired while paused, it keeps the result until unpaused; a failure
        takes ``Deferred``'s way (unhandled-error reporting).
        """
        plain: Deferred[str] = Deferred()
        plain.callback("stored")
        slow: LeanDeferred[str] = LeanDeferred()
        Deferred.callback(slow, "stored")
        lean: LeanDeferred[str] = LeanDeferred()
        lean.callback("stored")
        self.assertEqual(list(vars(lean).items()), list(vars(slow).items()))
        expected = {k: v for k, v in vars(plain).items() if k != "_callbacks"}
        self.assertEqual(vars(lean), expected)
        self.assertRaises(defer.AlreadyCalledError, lean.callback, "again")
        self.assertEqual(self.successResultOf(lean), "stored")

        paused: LeanDeferred[str] = LeanDeferred()
        paused.pause()
        paused.callback("later")
        seen: list[str] = []
        paused.addCallback(seen.append)
        self.assertEqual(seen, [])
        paused.unpause()
        self.assertEqual(seen, ["later"])

        failed: LeanDeferred[str] = LeanDeferred()
        failed.callback(Failure(ValueError("refused")))  # type: ignore[arg-type]
        self.assertIsNotNone(failed._debugInfo)
        self.failureResultOf(failed, ValueError)

    def test_errback(self) -> None:
        """
        A failure reaches the errbacks, and a second firing raises.
        """
        d: LeanDeferred[int] = LeanDeferred()
        d.errback(ValueError("refused"))
        self.failureResultOf(d, ValueError)
        self.assertRaises(defer.AlreadyCalledError, d.callback, 1)

    def test_unhandled_failure_logged(self) -> None:
        """
        A failure nobody handled is logged when the Deferred is collected,
        as with a plain ``Deferred``.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d: LeanDeferred[int] = LeanDeferred()
        d.errback(ValueError("nobody listens"))
        del d
        gc.collect()
        self.assertTrue(
            [
                e
                for e in events
                if "log_failure" in e and e["log_failure"].check(ValueError)
            ]
        )
        self.flushLoggedErrors(ValueError)

    def test_returned_from_a_callback(self) -> None:
        """
        Returned unfired from another Deferred's callback, it pauses that
        chain until it fires (Twisted appends to its list directly).
        """
        lean: LeanDeferred[int] = LeanDeferred()
        outer: Deferred[int] = Deferred()
        outer.addCallback(lambda _: lean)
        seen: list[int] = []
        outer.addCallback(seen.append)
        outer.callback(0)
        self.assertEqual(seen, [])
        lean.callback(7)
        self.assertEqual(seen, [7])

    def test_chain_deferred(self) -> None:
        """
        ``chainDeferred`` both ways.
        """
        lean: LeanDeferred[int] = LeanDeferred()
        plain: Deferred[int] = Deferred()
        lean.chainDeferred(plain)
        lean.callback(3)
        self.assertEqual(self.successResultOf(plain), 3)
        other: LeanDeferred[int] = LeanDeferred()
        first: Deferred[int] = Deferred()
        first.chainDeferred(other)
        first.callback(4)
        self.assertEqual(self.successResultOf(other), 4)

    def test_await_and_inline_callbacks(self) -> None:
        """
        Awaited in a coroutine and yielded in ``inlineCallbacks``.
        """
        awaited: LeanDeferred[int] = LeanDeferred()
        yielded: LeanDeferred[int] = LeanDeferred()

        async def waits() -> int:
            return await awaited + 1

        result = defer.ensureDeferred(waits())

        @defer.inlineCallbacks
        def yields() -> Any:
            value = yield yielded
            return value + 2

        inline = yields()
        awaited.callback(1)
        yielded.callback(1)
        self.assertEqual(self.successResultOf(result), 2)
        self.assertEqual(self.successResultOf(inline), 3)

    def test_cancel(self) -> None:
        """
        Cancelling fails it with ``CancelledError`` (it has no canceller),
        also while an ``inlineCallbacks`` generator waits on it.
        """
        d: LeanDeferred[int] = LeanDeferred()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        lean: LeanDeferred[int] = LeanDeferred()

        @defer.inlineCallbacks
        def waits() -> Any:
            yield lean

        outer = waits()
        outer.cancel()
        self.failureResultOf(outer, CancelledError)

    def test_gather_and_timeout(self) -> None:
        """
        ``gatherResults``, ``DeferredList`` and ``addTimeout``.
        """
        a: LeanDeferred[int] = LeanDeferred()
        b: LeanDeferred[int] = LeanDeferred()
        gathered = defer.gatherResults([a, b])
        listed = defer.DeferredList([a, b])
        a.callback(1)
        b.callback(2)
        self.assertEqual(self.successResultOf(gathered), [1, 2])
        self.assertEqual(self.successResultOf(listed), [(True, 1), (True, 2)])
        clock = Clock()
        late: LeanDeferred[int] = LeanDeferred()
        late.addTimeout(1, clock)
        clock.advance(2)
        self.failureResultOf(late, defer.TimeoutError)

    def test_debug(self) -> None:
        """
        With Deferred debugging on, it records where it was made.
        """
        defer.setDebugging(True)
        self.addCleanup(defer.setDebugging, False)
        d: LeanDeferred[int] = LeanDeferred()
        self.assertIsNotNone(d._debugInfo)
        self.assertIsNotNone(d._debugInfo.creator)  # type: ignore[union-attr]


class PendingSendTests(SynchronousTestCase):
    """
    What a ``send_to`` waiting for its commit costs the collector.
    """

    def test_tracked_objects_per_pending_send(self) -> None:
        """
        A ``send_to`` waiting for its commit adds one object tracked by the
        garbage collector (its Deferred), whether the caller keeps the
        Deferred or not; once committed, nothing stays per message.
        """
        cluster = Cluster()
        sender = cluster.start(1)
        cluster.start(2)
        cluster.clock.advance(0.1)
        self.assertIn(2, sender.connected_peers())
        count = 2000
        payloads = [b"%064d" % i for i in range(count)]
        kept: list[Deferred[Any]] = []
        enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            before = len(gc.get_objects())
            for p in payloads[: count // 2]:
                sender.send_to(2, p)
            for p in payloads[count // 2 :]:
                kept.append(sender.send_to(2, p))
            pending = len(gc.get_objects()) - before
            kept.clear()
            for _ in range(20):
                cluster.clock.advance(0.01)
            delivered = len(cluster.recorders[2].messages)
            cluster.recorders[2].messages.clear()
            after = len(gc.get_objects()) - before
        finally:
            if enabled:
                gc.enable()
        self.assertEqual(sender.peer_status(2).acknowledged, count)
        self.assertEqual(delivered, count)
        self.assertLess(pending, count * 1.05)
        self.assertLess(after, count * 0.05)


class UnobservedTests(SynchronousTestCase):
    """
    A committed send whose Deferred nothing can see any more gets no
    receipt; every other one fires as before.
    """

    def test_unobserved(self) -> None:
        """
        Only a ``LeanDeferred`` with nothing added, no weak reference and no
        reference but the caller's name is unobserved.
        """
        held = [LeanDeferred()]
        d = held.pop()
        self.assertTrue(unobserved(d))
        other = d
        self.assertFalse(unobserved(d))
        del other
        ref = weakref.ref(d)
        self.assertFalse(unobserved(d))
        del ref
        self.assertTrue(unobserved(d))
        plain: Deferred[int] = Deferred()
        self.assertFalse(unobserved(plain))
        d.addCallback(lambda r: r)
        self.assertFalse(unobserved(d))

    def test_dropped_sends_get_no_receipt(self) -> None:
        """
        Of sends whose Deferreds were dropped, kept, given a callback and
        dropped, awaited, or weakly referenced, only the dropped ones make
        no receipt; the others fire with their receipts.
        """
        made: list[int] = []

        class Counted(_sender.Receipt):
            __slots__ = ()

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                made.append(self.message_id)

        self.patch(_sender, "Receipt", Counted)
        cluster = Cluster()
        sender = cluster.start(1)
        cluster.start(2)
        cluster.clock.advance(0.1)
        for i in range(10):
            sender.send_to(2, b"dropped %d" % i)
        kept = sender.send_to(2, b"kept")
        seen: list[int] = []
        sender.send_to(2, b"callback").addCallback(
            lambda receipt: seen.append(receipt.message_id)
        )

        async def wait() -> int:
            receipt = await sender.send_to(2, b"awaited")
            return receipt.message_id

        awaited = defer.ensureDeferred(wait())
        weak = weakref.ref(sender.send_to(2, b"weak"))
        cluster.clock.advance(0.1)
        self.assertEqual(self.successResultOf(kept).message_id, 11)
        self.assertEqual(seen, [12])
        self.assertEqual(self.successResultOf(awaited), 13)
        # The weakly referenced one fired (then went: nothing held it).
        self.assertEqual(made, [11, 12, 13, 14])
        self.assertIsNone(weak())
        self.assertEqual(len(cluster.recorders[2].messages), 14)
