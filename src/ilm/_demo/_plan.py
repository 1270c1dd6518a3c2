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
