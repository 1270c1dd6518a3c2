"""
Tests for :mod:`ilm._transmitter` on its own: a ``Transmitter`` over a
recording network, a scripted store and a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ilm import _frames
from ilm._config import Config
from ilm._peer import DOWN, READY, PeerSession
from ilm._session import OutboundStream
from ilm._transmitter import Transmitter
from ilm.errors import StoreError


class Host:
    """The node around the transmitter: a clock, and what it logged."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.logged: list[tuple[Any, ...]] = []

    def later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        return self.clock.callLater(delay, function, *args)

    def limited(self, key: Any, level: Any, fmt: str, *args: Any, **kw: Any) -> None:
        self.logged.append((key, kw.get("ilm_event")))

    def unexpected(self, reason: Failure, doing: str) -> None:
        raise AssertionError(f"unexpected while {doing}: {reason}")


class Network:
    """Records the frames sent."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frames(self, peer_id: Any, frames: list[bytes]) -> None:
        self.frames.extend(frames)

    def positions(self) -> list[int]:
        found = []
        for frame in self.frames:
            first, contents = _frames.decode_messages(frame, 1 << 20)
            found.extend(range(first, first + len(contents)))
        return found


class Store:
    """``read_outbound`` answering from a list, or failing as told."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.failures = 0
        self.reads: list[tuple[int, int]] = []

    def read_outbound(
        self, peer_id: Any, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        self.reads.append((after, limit))
        if self.failures:
            self.failures -= 1
            return fail(StoreError("read failed"))
        return succeed(self.messages[after : after + limit])


class TransmitterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.config = Config(window=4)
        self.host = Host(self.clock)
        self.network = Network()

    def build(self, stored: list[bytes], acked: int = 0) -> Transmitter:
        config = self.config
        out = OutboundStream(
            acked,
            len(stored),
            window=config.window,
            window_bytes=config.window_bytes,
            cache_messages=100,
            cache_bytes=1 << 20,
        )
        session = PeerSession(2, out, config)
        self.store = Store(stored)
        transmitter = Transmitter(
            session,
            network=self.network,
            backend=self.store,  # type: ignore[arg-type]
            host=self.host,  # type: ignore[arg-type]
            clock=self.clock,
            config=config,
            frame_target=1024,
        )
        return transmitter

    def ready(self, transmitter: Transmitter) -> None:
        transmitter.session.link = READY
        transmitter.out.ready = True

    def test_nothing_before_ready(self) -> None:
        """
        While the link is not ready, ``pump`` neither reads nor sends.
        """
        transmitter = self.build([b"a", b"b"])
        self.assertEqual(transmitter.session.link, DOWN)
        transmitter.pump()
        self.assertEqual((self.store.reads, self.network.frames), ([], []))

    def test_reads_and_sends_the_window(self) -> None:
        """
        Once ready, it reads the stored messages and sends what the window
        (4 messages) allows, starting the retransmission timer.
        """
        transmitter = self.build([b"m%d" % i for i in range(10)])
        self.ready(transmitter)
        transmitter.pump()
        self.assertEqual(self.store.reads[0][0], 0)
        self.assertEqual(self.network.positions(), [1, 2, 3, 4])
        self.assertIsNotNone(transmitter.retransmit_call)
        self.assertEqual(transmitter.retransmitted, 0)

    def test_retransmits_on_timeout(self) -> None:
        """
        Unacknowledged messages are sent again when the timer expires, and
        counted as retransmitted.
        """
        transmitter = self.build([b"m%d" % i for i in range(3)])
        self.ready(transmitter)
        transmitter.pump()
        self.network.frames.clear()
        self.clock.advance(self.config.retransmit_timeout)
        self.assertEqual(self.network.positions(), [1, 2, 3])
        self.assertEqual(transmitter.retransmitted, 3)

    def test_progress_restarts_the_timer(self) -> None:
        """
        ``progressed`` starts the timer again from the shortest delay, and
        none is left once nothing is in flight.
        """
        transmitter = self.build([b"m%d" % i for i in range(3)])
        self.ready(transmitter)
        transmitter.pump()
        transmitter.out.on_ack(3, 3)
        transmitter.progressed()
        self.assertIsNone(transmitter.retransmit_call)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_read_failure_retried_with_backoff(self) -> None:
        """
        A failed outbox read is logged and retried after the store backoff;
        the messages then go out.
        """
        transmitter = self.build([b"m1", b"m2"])
        self.store.failures = 1
        self.ready(transmitter)
        transmitter.pump()
        self.assertEqual(
            self.host.logged, [(("outbox_read_failed", 2), "outbox_read_failed")]
        )
        self.assertEqual(self.network.frames, [])
        self.assertIsNotNone(transmitter.read_call)
        self.clock.advance(self.config.max_store_retry)
        self.assertEqual(self.network.positions(), [1, 2])

    def test_link_lost(self) -> None:
        """
        ``link_lost`` stops the retransmission timer.
        """
        transmitter = self.build([b"m1"])
        self.ready(transmitter)
        transmitter.pump()
        self.assertIsNotNone(transmitter.retransmit_call)
        transmitter.link_lost()
        self.assertIsNone(transmitter.retransmit_call)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_timers(self) -> None:
        """
        ``cancel_timers`` stops a pending read retry (and the
        retransmission timer).
        """
        transmitter = self.build([b"m1"])
        self.store.failures = 1
        self.ready(transmitter)
        transmitter.pump()
        self.assertIsNotNone(transmitter.read_call)
        transmitter.cancel_timers()
        self.assertIsNone(transmitter.read_call)
        self.assertIsNone(transmitter.retransmit_call)
        self.assertEqual(self.clock.getDelayedCalls(), [])
