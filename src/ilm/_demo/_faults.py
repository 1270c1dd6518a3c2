"""
The faults of the streams between the demo's two nodes, as the run goes:
when the next one falls due (:meth:`NodeFaults.due`), and injecting it
(:meth:`NodeFaults.inject`: abort every relayed connection, or SIGKILL a
node to be restarted on its store).  The schedule itself is pure
(:mod:`ilm._demo._plan`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ilm._demo._nodes import DemoNode
from ilm._demo._plan import CUT, Fault, FaultSchedule
from ilm._demo._relay import Relay

__all__ = ["NodeFaults", "streams"]


def streams(nodes: Sequence[DemoNode]) -> list[tuple[DemoNode, DemoNode]]:
    """Each stream's (sender, receiver) between the two nodes."""
    one, two = nodes
    return [(one, two), (two, one)]


class NodeFaults:
    """
    :param schedule: the faults planned for the nodes' streams.
    :param nodes: the two nodes.
    :param relays: the relays in front of them.

    :ivar link_cuts: link cuts injected so far.
    """

    def __init__(
        self,
        schedule: FaultSchedule,
        nodes: Sequence[DemoNode],
        relays: Sequence[Relay],
    ) -> None:
        self.schedule = schedule
        self._nodes = nodes
        self._relays = relays
        self.link_cuts = 0
        self._at_fault: dict[int, int] = {}
        self._links_at_fault: dict[int, int] = {node.id: 0 for node in nodes}

    def linked_again(self, node: DemoNode) -> bool:
        """
        Whether ``node`` runs and is linked, by a link made since the
        previous fault (a status report made before the node noticed a cut
        may still say linked, but not with a new link counted).
        """
        return (
            node.process is not None
            and not node.killing
            and node.ready
            and node.linked
            and node.total_links > self._links_at_fault[node.id]
        )

    def due(self, fault: Fault) -> bool:
        """
        Whether ``fault`` happens now: both nodes run and are linked (as
        they reported since the previous fault), one of the streams has
        reached the fault's threshold, and each stream has moved since the
        previous fault unless its credit or its end holds it.  Firing as
        soon as the first stream reaches the threshold finds both streams
        with messages in flight: the other has not got there yet, and this
        one may still run ``lead`` messages further.
        """
        if not all(self.linked_again(node) for node in self._nodes):
            return False
        if not any(relay.linked() for relay in self._relays):
            return False
        receivers = [receiver for _, receiver in streams(self._nodes)]
        if not self.schedule.reached(max(r.delivered for r in receivers), fault):
            return False
        limit = self.schedule.credit()
        for receiver in receivers:
            moved = receiver.delivered > self._at_fault.get(receiver.id, -1)
            if not (moved or receiver.delivered >= limit):
                return False
        return True

    def inject(self, fault: Fault) -> str:
        """
        ``fault`` happens now: cut the link, or SIGKILL the node it names.

        :return: what happened, for the progress display.
        """
        self.schedule.take()
        for node in self._nodes:
            self._at_fault[node.id] = node.delivered
            self._links_at_fault[node.id] = node.total_links
            # Seen linked again only in a report made after the fault.
            node.linked = False
        delivered = ", ".join(
            f"{receiver.delivered:,} to {receiver.name}"
            for _, receiver in streams(self._nodes)
        )
        if fault.kind == CUT:
            aborted = sum(relay.cut() for relay in self._relays)
            self.link_cuts += 1
            return (
                f"link cut {self.link_cuts}: aborted {aborted} TCP connection(s) "
                f"(delivered so far: {delivered})"
            )
        [node] = [n for n in self._nodes if n.name == fault.kind]
        node.ready = False
        node.relay.target = None
        pid = node.kill()
        return (
            f"SIGKILL {node.name} (pid {pid}) and restart it on its store "
            f"(delivered so far: {delivered})"
        )
