"""
What you need to test code built on ILM: an in-process network with fault
controls, an in-memory backend, a simple message type, and helpers to run a
``twisted.internet.task.Clock`` until something happens.
"""

from __future__ import annotations

from collections.abc import Callable

import attr
from twisted.internet.task import Clock
from zope.interface import implementer

from ilm._messenger import ILM
from ilm._peerid import PeerId
from ilm.backends._memory import InMemoryBackend, InMemoryStorage
from ilm.interfaces import IMessage
from ilm.network._memory import FaultPolicy, InMemoryNetwork, InMemoryPeerNetwork


@implementer(IMessage)
@attr.s(frozen=True, slots=True, auto_attribs=True)
class TestMessage:
    """
    A plain :class:`ilm.interfaces.IMessage`, for ``send_raw_message`` and
    for tests of delivery code.
    """

    __test__ = False  # not a test case, whatever a collector thinks

    source_id: PeerId
    destination_id: PeerId
    message_id: int = 0
    contents: bytes = b""


class ClockTimeout(AssertionError):
    """
    :func:`advance_until` gave up.
    """


def advance_until(
    clock: Clock,
    predicate: Callable[[], object],
    timeout: float = 60.0,
    max_steps: int = 10_000_000,
) -> float:
    """
    Run ``clock`` from one scheduled call to the next until ``predicate()``
    is true.

    :return: the simulated seconds that passed.
    :raises ClockTimeout: if ``timeout`` simulated seconds pass, or nothing is
        left scheduled, before ``predicate()`` holds.
    """
    start = clock.seconds()
    steps = 0
    while not predicate():
        calls = clock.getDelayedCalls()
        if not calls:
            raise ClockTimeout("nothing scheduled and the condition does not hold")
        next_time = min(call.getTime() for call in calls)
        if next_time - start > timeout:
            raise ClockTimeout(
                f"condition still false after {timeout} simulated seconds"
            )
        clock.advance(max(0.0, next_time - clock.seconds()))
        steps += 1
        if steps > max_steps:
            raise ClockTimeout(f"condition still false after {max_steps} steps")
    return clock.seconds() - start


def crash(node: ILM, network: InMemoryNetwork | None = None) -> None:
    """
    Kill ``node`` as if its process died: it stops at once without draining,
    committing or closing anything, and (if ``network`` is given) vanishes
    from the in-memory network so its peers see the link drop.  What its
    backend had committed is all a restarted node will find.
    """
    if network is not None:
        network.crash(node.local_id)
    node._abandon()


def settle(clock: Clock, seconds: float = 0.0) -> None:
    """
    Run every call due within ``seconds`` from now (including calls they
    schedule in that span), then stop at ``now + seconds``.
    """
    end = clock.seconds() + seconds
    while True:
        due = [
            call.getTime() for call in clock.getDelayedCalls() if call.getTime() <= end
        ]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    if clock.seconds() < end:
        clock.advance(end - clock.seconds())


__all__ = [
    "ClockTimeout",
    "FaultPolicy",
    "InMemoryBackend",
    "InMemoryNetwork",
    "InMemoryPeerNetwork",
    "InMemoryStorage",
    "TestMessage",
    "advance_until",
    "crash",
    "settle",
]
