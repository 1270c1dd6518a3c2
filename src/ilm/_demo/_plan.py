"""
The demo's fault schedule: which link cuts and SIGKILLs happen, and at what
point of the streams.  Pure and seeded: the same seed, message count and
fault counts give the same schedule.

Each fault has a threshold: it happens once one of the streams has delivered
that many messages (and the nodes are up, linked, and the streams have moved
since the previous fault).  Thresholds are spread at random over
5 % to 90 % of the stream.  To make sure a fault happens while messages are
in flight, and before the streams end however fast they run, the senders may
run only ``lead`` messages past the next fault's threshold until it has
happened (:func:`credit`).
"""

from __future__ import annotations

import random

import attr

CUT = "cut"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Fault:
    """
    One scheduled fault: ``kind`` is :data:`CUT` (abort the link's TCP
    connections) or the name of the node to SIGKILL and restart; ``at`` is
    the threshold, in messages delivered on a stream.
    """

    kind: str
    at: int


def fault_plan(
    seed: int, messages: int, cuts: int, kills: int, nodes: tuple[str, ...]
) -> tuple[Fault, ...]:
    """
    :param messages: messages per stream.
    :param cuts: link cuts.
    :param kills: SIGKILLs of each node.
    :param nodes: the nodes' names.
    :return: the faults, in the order they happen.
    """
    rng = random.Random(seed)
    kinds = [CUT] * cuts + [node for node in nodes for _ in range(kills)]
    rng.shuffle(kinds)
    thresholds = sorted(max(1, int(messages * rng.uniform(0.05, 0.9))) for _ in kinds)
    return tuple(Fault(kind, at) for kind, at in zip(kinds, thresholds, strict=True))


def lead(messages: int) -> int:
    """
    :return: how far past the next fault's threshold the senders may run
        (5 % of the stream, at least one message).
    """
    return max(1, messages // 20)


def credit(messages: int, pending: tuple[Fault, ...]) -> int:
    """
    :param pending: the faults that have not happened yet, in order.
    :return: the highest number a sender may hand to ``send_to`` now.
    """
    if not pending:
        return messages
    return min(messages, pending[0].at + lead(messages))


class FaultSchedule:
    """
    The faults of one stream (or pair of streams) as a run goes: which
    are still to happen, the senders' credit, and where the streams stood
    at the previous fault.

    :param plan: the faults, in order (:func:`fault_plan`).
    :param messages: messages per stream.

    :ivar pending: the faults still to happen, in order.
    """

    def __init__(self, plan: tuple[Fault, ...], messages: int) -> None:
        self.plan = plan
        self.pending = list(plan)
        self._messages = messages

    def next(self) -> Fault | None:
        """The next fault to happen (``None``: they all happened)."""
        return self.pending[0] if self.pending else None

    def take(self) -> Fault:
        """The next fault happens now: it is no longer pending."""
        return self.pending.pop(0)

    def credit(self) -> int:
        """The highest number a sender may send now (:func:`credit`)."""
        return credit(self._messages, tuple(self.pending))

    def reached(self, delivered: int, fault: Fault) -> bool:
        """Whether a stream that delivered ``delivered`` reached ``fault``."""
        return delivered >= min(fault.at, self._messages)

    def planned(self, kind: str) -> int:
        """How many faults of ``kind`` (:data:`CUT`, or a name) are planned."""
        return sum(1 for fault in self.plan if fault.kind == kind)
