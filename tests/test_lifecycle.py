"""
Tests for :mod:`ilm.backends._lifecycle`: what the blocking stores share
(their open/closed state, the rule after a commit in doubt, the checks of
an outbox read).  Both backends' own tests cover it end to end.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from ilm.backends._lifecycle import StoreLifecycle, check_read_after, checked_run
from ilm.backends._threads import StoreThreads
from ilm.errors import StoreCorrupt, StoreError, StoreInDoubt


class LifecycleTests(SynchronousTestCase):
    def lifecycle(self) -> tuple[StoreLifecycle, list[dict[str, object]]]:
        events: list[dict[str, object]] = []
        threads = StoreThreads(Clock(), "test", lambda: None)
        return StoreLifecycle(
            threads, "the store S", Logger(observer=events.append)
        ), events

    def test_closed_refuses(self) -> None:
        """
        A store never opened refuses work with a StoreError naming it, and
        closing it does nothing (an already fired Deferred).
        """
        life, _ = self.lifecycle()
        self.assertEqual(str(life.unusable()), "the store S is closed")
        refused = life.refuse()
        assert refused is not None
        self.failureResultOf(refused, StoreError)
        self.assertIsNone(self.successResultOf(life.close(lambda: None, lambda: None)))

    def test_in_doubt(self) -> None:
        """
        After a failed COMMIT the store refuses commits until reopened:
        ``in_doubt`` returns a StoreInDoubt saying what is unknown, and logs
        ``store_broken`` (critical) with the fields given.
        """
        life, events = self.lifecycle()
        life.check_unbroken()
        error = life.in_doubt(StoreError("disk I/O error"), "on disk", path="/x")
        self.assertIsInstance(error, StoreInDoubt)
        self.assertIn("whether the batch is on disk is unknown", str(error))
        broken = self.assertRaises(StoreError, life.check_unbroken)
        self.assertIn("restart the node", str(broken))
        [event] = events
        self.assertEqual(
            (event["ilm_event"], event["log_level"], event["path"]),
            ("store_broken", LogLevel.critical, "/x"),
        )

    def test_read_checks(self) -> None:
        """
        A read from below the acknowledged position is refused; a run of
        rows with a gap is StoreCorrupt; a run in order gives its contents.
        """
        self.assertRaises(StoreError, check_read_after, 2, 3, 4)
        check_read_after(2, 4, 4)
        self.assertEqual(checked_run(2, 4, [(5, b"a"), (6, b"b")]), [b"a", b"b"])
        self.assertEqual(checked_run(2, 4, []), [])
        error = self.assertRaises(
            StoreCorrupt, checked_run, 2, 4, [(5, b"a"), (7, b"b")]
        )
        self.assertIn("gap after position 4", str(error))
