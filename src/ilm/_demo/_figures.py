"""
The figures of a demo run as it goes, for the progress display
(:class:`~ilm._demo._progress.Progress`) and the summary: each stream's
deliveries, rate and pending messages, the faults done of those planned, the
reconnections and the time elapsed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ilm._demo._faults import NodeFaults, streams
from ilm._demo._http import RECEIVER, STREAM, HttpLeg
from ilm._demo._nodes import DemoNode
from ilm._demo._plan import CUT
from ilm._demo._progress import Progress, RateMeter, StreamProgress

__all__ = ["RunFigures"]


class RunFigures:
    """
    :param nodes: the two nodes.
    :param faults: their faults.
    :param leg: the HTTP leg, if the run has one.
    :param messages: messages per stream between the nodes.
    :param started: when the run started (``time.monotonic()``).
    """

    def __init__(
        self,
        nodes: Sequence[DemoNode],
        faults: NodeFaults,
        leg: HttpLeg | None,
        messages: int,
        started: float,
    ) -> None:
        self._nodes = nodes
        self._faults = faults
        self._leg = leg
        self._messages = messages
        self._rates = {node.id: RateMeter() for node in nodes}
        self._started = started

    def seconds(self) -> float:
        """Since the run started."""
        return time.monotonic() - self._started

    def sample(self) -> None:
        """Note each receiver's progress, for its rate over the last second."""
        now = time.monotonic()
        for node in self._nodes:
            self._rates[node.id].sample(now, node.delivered)

    def snapshot(self) -> Progress:
        """The figures to show now."""
        schedule = self._faults.schedule
        rows = [
            StreamProgress(
                f"{sender.name} -> {receiver.name}",
                receiver.delivered,
                self._messages,
                self._rates[receiver.id].rate(),
                sender.pending,
            )
            for sender, receiver in streams(self._nodes)
        ]
        kills = [(n.name, n.kills, schedule.planned(n.name)) for n in self._nodes]
        cuts, cuts_done = schedule.planned(CUT), self._faults.link_cuts
        leg = self._leg
        if leg is not None:
            rows.append(
                StreamProgress(
                    STREAM, leg.delivered, leg.messages, leg.rate(), leg.pending
                )
            )
            leg_cuts, leg_kills = leg.planned()
            cuts += leg_cuts
            cuts_done += leg.cuts
            kills.append((RECEIVER, leg.b.kills, leg_kills))
        return Progress(
            streams=tuple(rows),
            cuts=cuts_done,
            cuts_planned=cuts,
            kills=tuple(kills),
            reconnects=self.reconnects(),
            seconds=self.seconds(),
        )

    def reconnects(self) -> int:
        """
        How many times the link came up again: both nodes count each link
        they see established; a killed process may not have reported its
        last one, so the larger count is the better one.
        """
        nodes = max(0, max((n.total_links for n in self._nodes), default=0) - 1)
        return nodes + (0 if self._leg is None else self._leg.reconnects())
