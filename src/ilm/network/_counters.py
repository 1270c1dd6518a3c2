"""
What a network counts for :class:`ilm._status.NetworkStats`: links up and
down, refusals by reason and failed dials by reason, since the network
started.  Both networks count at the points where they already decide and
log; :meth:`NetworkCounters.snapshot` turns the counts into the frozen record.

A refusal's reason is the name of the log event that reports it: the
``ilm_event`` class attribute of the error (``"authentication_failed"``,
``"link_timeout"``, ``"connection_limit"``, ...; see :func:`refusal_reason`),
or :data:`REFUSAL_HOLD` for a connection refused because its peer is held
off after a violation.
"""

from __future__ import annotations

from collections import Counter

import attr

from ilm._status import NetworkStats

__all__ = ["REFUSAL_HOLD", "NetworkCounters", "refusal_reason"]

#: A connection from or to a peer refused because a protocol violation
#: closed its last link and the refusal's hold time has not passed.
REFUSAL_HOLD = "refusal_hold"

#: The reason of a refusal whose error names no event of its own.
_DEFAULT_REASON = "link_protocol_violation"


def refusal_reason(error: BaseException) -> str:
    """
    :return: the reason under which a connection closed for ``error`` is
        counted: the error's ``ilm_event`` (the log event's name).
    """
    reason = getattr(type(error), "ilm_event", None)
    if not isinstance(reason, str) or reason == "protocol_violation":
        # The base class's event is the messenger's; the network logs a
        # link-level violation under its own name.
        return _DEFAULT_REASON
    return reason


@attr.s(slots=True, auto_attribs=True)
class NetworkCounters:
    """
    A network's counters since it started (not persisted).
    """

    links_established: int = 0
    links_lost: int = 0
    refusals: Counter[str] = attr.ib(factory=Counter)
    dial_failures: Counter[str] = attr.ib(factory=Counter)

    def link_established(self) -> None:
        self.links_established += 1

    def link_lost(self) -> None:
        self.links_lost += 1

    def refused(self, reason: str) -> None:
        """
        A connection or link was refused for ``reason``.
        """
        self.refusals[reason] += 1

    def dial_failed(self, reason: str) -> None:
        """
        An attempt to reach a peer failed for ``reason``
        (``DialFailure.reason``).
        """
        self.dial_failures[reason] += 1

    def snapshot(self, connections: int, links: int) -> NetworkStats:
        """
        :return: the counts as a frozen record, with the ``connections``
            and ``links`` open now.
        """
        return NetworkStats(
            connections=connections,
            links=links,
            links_established=self.links_established,
            links_lost=self.links_lost,
            refusals=self.refusals,
            dial_failures=self.dial_failures,
        )
