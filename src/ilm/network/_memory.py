"""
An in-process network of ILM nodes, with controls for tests: cut and restore
links, drop, duplicate or delay frames, and crash nodes.

Frames are delivered through the clock (never synchronously from
``send_frames``), in order per direction unless a fault policy delays some of
them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._backoff import Backoff
from ilm._peerid import PeerId, check_peer_id
from ilm._status import NetworkStats
from ilm.interfaces import IFrameReceiver, INetwork
from ilm.network._counters import NetworkCounters, refusal_reason
from ilm.network._refusal import RefusalPolicy

log = Logger(namespace="ilm.network.memory")

FaultPolicy = Callable[[PeerId, PeerId, bytes], Sequence[float]]
"""
``policy(source, destination, frame)`` returns one extra delay (seconds) per
copy of the frame to deliver: ``()`` drops it, ``(0.0,)`` delivers it
normally, ``(0.0, 0.0)`` duplicates it, ``(0.5,)`` delays it (which may
reorder it after later frames).
"""


class _Link:
    __slots__ = (
        "alive",
        "announced",
        "calls",
        "ends",
        "generation",
        "queues",
        "started",
    )

    def __init__(self, a: PeerId, b: PeerId, generation: int, started: float) -> None:
        self.ends = (a, b)
        self.started = started
        self.alive = True
        self.announced = False
        self.generation = generation
        self.queues: dict[PeerId, list[tuple[float, int, bytes]]] = {a: [], b: []}
        self.calls: dict[PeerId, IDelayedCall | None] = {a: None, b: None}

    def other(self, end: PeerId) -> PeerId:
        a, b = self.ends
        return b if end == a else a


def _key(a: PeerId, b: PeerId) -> frozenset[PeerId]:
    return frozenset((a, b))


class InMemoryNetwork:
    """
    A network of in-process nodes.  ``add_peer(id)`` returns the
    :class:`ilm.interfaces.INetwork` of the node with that id; every two
    started nodes are linked unless the link is cut.

    :param clock: the ``IReactorTime`` that carries frames; the global
        reactor if omitted.
    :param latency: seconds each frame takes.
    :param reconnect_delay: seconds before a link closed by a node (for a
        protocol violation) comes back, as a real network's reconnection
        would; doubled for each such close in a row (up to 30 s), counted
        afresh once a link has stayed up for a minute.
    :param max_frame_size: frames larger than this close the link (``None``:
        no limit).
    """

    def __init__(
        self,
        clock: IReactorTime | None = None,
        *,
        latency: float = 0.0,
        reconnect_delay: float = 0.05,
        max_frame_size: int | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.latency = latency
        self.reconnect_delay = reconnect_delay
        self.max_frame_size = max_frame_size
        self.fault_policy: FaultPolicy | None = None
        self._nodes: dict[PeerId, InMemoryPeerNetwork] = {}
        self._links: dict[frozenset[PeerId], _Link] = {}
        self._cut: set[frozenset[PeerId]] = set()
        self._drop: dict[tuple[PeerId, PeerId], int] = {}
        self._duplicate: dict[tuple[PeerId, PeerId], int] = {}
        self._order = itertools.count()
        # A link closed by a node comes back after the hold of the refusal
        # policy both networks share (no jitter: a seeded run replays).
        self._refusal: RefusalPolicy[frozenset[PeerId]] = RefusalPolicy(
            Backoff(initial=reconnect_delay, factor=2.0, maximum=30.0, jitter=0.0),
            60.0,
            clock.seconds,
        )
        self._generations = itertools.count(1)
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_duplicated = 0
        self._counters = NetworkCounters()

    # -- nodes ---------------------------------------------------------------

    def add_peer(self, peer_id: PeerId) -> InMemoryPeerNetwork:
        """
        Add a node (or a restarted node, after :meth:`crash`).

        :return: the node's network.
        :raises ValueError: if a node with that id is running.
        """
        peer_id = check_peer_id(peer_id)
        existing = self._nodes.get(peer_id)
        if existing is not None and existing.receiver is not None:
            raise ValueError(f"node {peer_id!r} is already running on this network")
        node = InMemoryPeerNetwork(self, peer_id)
        self._nodes[peer_id] = node
        return node

    def crash(self, peer_id: PeerId) -> None:
        """
        Take a node off the network at once, as if its process died: its
        links drop (its peers see ``link_lost``), frames in flight to and from
        it are lost, and it is told nothing more.
        """
        node = self._nodes.get(peer_id)
        if node is None:
            return
        node.receiver = None
        for key in [key for key in self._links if peer_id in key]:
            self._break(key, Failure(ConnectionLost("peer crashed")))

    # -- link controls ---------------------------------------------------------

    def cut(self, a: PeerId, b: PeerId) -> None:
        """
        Cut the link between ``a`` and ``b``: frames in flight are lost, both
        sides see ``link_lost`` now, and the link stays down until
        :meth:`restore`.
        """
        key = _key(a, b)
        self._cut.add(key)
        if key in self._links:
            self._break(key, Failure(ConnectionLost("link cut")))

    def restore(self, a: PeerId, b: PeerId) -> None:
        """
        Let the link between ``a`` and ``b`` come back.
        """
        self._cut.discard(_key(a, b))
        self._connect(a, b)

    def is_cut(self, a: PeerId, b: PeerId) -> bool:
        return _key(a, b) in self._cut

    def drop_next(self, source: PeerId, destination: PeerId, count: int = 1) -> None:
        """
        Silently lose the next ``count`` frames from ``source`` to
        ``destination`` (the link stays up).
        """
        self._drop[(source, destination)] = (
            self._drop.get((source, destination), 0) + count
        )

    def duplicate_next(
        self, source: PeerId, destination: PeerId, count: int = 1
    ) -> None:
        """
        Deliver each of the next ``count`` frames from ``source`` to
        ``destination`` twice.
        """
        key = (source, destination)
        self._duplicate[key] = self._duplicate.get(key, 0) + count

    def linked(self, a: PeerId, b: PeerId) -> bool:
        """
        Whether a link between ``a`` and ``b`` is up.
        """
        link = self._links.get(_key(a, b))
        return link is not None and link.alive

    def stats(self) -> NetworkStats:
        """
        :return: the whole network's counters since it was created: links
            (both ``connections`` and ``links``) up now, links established
            and lost, and links closed by a node, by reason (the error's
            ``ilm_event``, as a stream network counts its refusals).  Each
            node's own view is :meth:`InMemoryPeerNetwork.stats`.
        """
        up = sum(1 for link in self._links.values() if link.alive)
        return self._counters.snapshot(up, up)

    def in_flight(self) -> int:
        """
        The number of frames sent and not yet delivered.
        """
        return sum(
            len(q) for link in self._links.values() for q in link.queues.values()
        )

    # -- internals -----------------------------------------------------------

    def _started(self, node: InMemoryPeerNetwork) -> None:
        for other in list(self._nodes.values()):
            if other is not node and other.receiver is not None:
                self._connect(node.local_id, other.local_id)

    def _stopped(self, node: InMemoryPeerNetwork) -> None:
        # A clean close, like TCP's: what the node already sent is delivered
        # first; what was on its way to it is lost with the link.
        for key in [key for key in self._links if node.local_id in key]:
            link = self._links[key]
            other = link.other(node.local_id)
            self._drain(link, node.local_id, other, everything=True)
            self._break(key, Failure(ConnectionDone("node stopped")))

    def _connect(self, a: PeerId, b: PeerId) -> None:
        key = _key(a, b)
        if a == b or key in self._cut or key in self._links:
            return
        node_a = self._nodes.get(a)
        node_b = self._nodes.get(b)
        if (
            node_a is None
            or node_b is None
            or node_a.receiver is None
            or node_b.receiver is None
        ):
            return
        link = self._links[key] = _Link(
            a, b, next(self._generations), self.clock.seconds()
        )
        self._refusal.link_up(key)
        self.clock.callLater(0, self._announce, key, link)

    def _announce(self, key: frozenset[PeerId], link: _Link) -> None:
        if self._links.get(key) is not link or not link.alive:
            return
        a, b = link.ends
        link.announced = True
        self._counters.link_established()
        for end in (a, b):
            node = self._nodes.get(end)
            if node is not None:
                node.counters.link_established()
            if node is not None and node.receiver is not None:
                node.receiver.link_established(link.other(end))

    def _break(self, key: frozenset[PeerId], reason: Failure) -> None:
        """
        Take a link down and tell both ends that are still running.
        """
        link = self._links.pop(key, None)
        if link is None:
            return
        link.alive = False
        for end, call in link.calls.items():
            if call is not None and call.active():
                call.cancel()
            link.calls[end] = None
        if link.announced:
            self._counters.link_lost()
        for end in link.ends:
            node = self._nodes.get(end)
            if node is not None and link.announced:
                node.counters.link_lost()
            if node is not None and node.receiver is not None:
                node.receiver.link_lost(link.other(end), reason)

    def _close(self, closer: PeerId, peer: PeerId, reason: Exception) -> None:
        key = _key(closer, peer)
        link = self._links.get(key)
        if link is None:
            return
        link.alive = False
        reason_name = refusal_reason(reason)
        self._counters.refused(reason_name)
        node = self._nodes.get(closer)
        if node is not None:
            node.counters.refused(reason_name)
        delay = self._refusal.violation(key)

        def later() -> None:
            if self._links.get(key) is link:
                self._break(key, Failure(reason))
                self.clock.callLater(delay, self._connect, closer, peer)

        self.clock.callLater(0, later)

    def _transmit(
        self, source: PeerId, destination: PeerId, frames: Iterable[bytes]
    ) -> None:
        link = self._links.get(_key(source, destination))
        if link is None or not link.alive:
            return
        now = self.clock.seconds()
        queue = link.queues[destination]
        policy = self.fault_policy
        direction = (source, destination)
        for frame in frames:
            self.frames_sent += 1
            if self.max_frame_size is not None and len(frame) > self.max_frame_size:
                from ilm.errors import FrameTooLarge

                self._close(
                    destination, source, FrameTooLarge(len(frame), self.max_frame_size)
                )
                return
            delays: Sequence[float] = (0.0,)
            if self._drop and self._drop.get(direction):
                self._drop[direction] -= 1
                delays = ()
            elif self._duplicate and self._duplicate.get(direction):
                self._duplicate[direction] -= 1
                delays = (0.0, 0.0)
            elif policy is not None:
                delays = policy(source, destination, frame)
            if not delays:
                self.frames_dropped += 1
            elif len(delays) > 1:
                self.frames_duplicated += len(delays) - 1
            for extra in delays:
                heapq.heappush(
                    queue, (now + self.latency + extra, next(self._order), frame)
                )
        self._schedule(link, source, destination)

    def _schedule(self, link: _Link, source: PeerId, destination: PeerId) -> None:
        queue = link.queues[destination]
        if not queue or link.calls[destination] is not None:
            return
        delay = max(0.0, queue[0][0] - self.clock.seconds())
        link.calls[destination] = self.clock.callLater(
            delay, self._drain, link, source, destination
        )

    def _drain(
        self, link: _Link, source: PeerId, destination: PeerId, everything: bool = False
    ) -> None:
        call = link.calls[destination]
        if call is not None and call.active():
            call.cancel()
        link.calls[destination] = None
        if not link.alive:
            return
        node = self._nodes.get(destination)
        receiver = node.receiver if node is not None else None
        queue = link.queues[destination]
        now = float("inf") if everything else self.clock.seconds()
        many = getattr(receiver, "frames_received", None)
        if many is not None and len(queue) > 1 and link.alive:
            # What is due arrives together, as a stream network's read
            # would hand it over.
            frames = []
            while queue and queue[0][0] <= now:
                frames.append(heapq.heappop(queue)[2])
            if len(frames) > 1:
                many(source, frames)
            elif frames:
                receiver.frame_received(source, frames[0])  # type: ignore[union-attr]
        while queue and queue[0][0] <= now and link.alive and receiver is not None:
            _, _, frame = heapq.heappop(queue)
            receiver.frame_received(source, frame)
        if link.alive:
            self._schedule(link, source, destination)


@implementer(INetwork)
class InMemoryPeerNetwork:
    """
    One node's view of an :class:`InMemoryNetwork`.
    """

    def __init__(self, network: InMemoryNetwork, local_id: PeerId) -> None:
        self.network = network
        self.local_id = local_id
        self.receiver: IFrameReceiver | None = None
        self.counters = NetworkCounters()

    def start(self, receiver: IFrameReceiver) -> Deferred[None]:
        if self.network._nodes.get(self.local_id) is not self:
            raise RuntimeError(f"node {self.local_id!r} was replaced on its network")
        self.receiver = receiver
        self.network._started(self)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if self.receiver is not None:
            self.network._stopped(self)
            self.receiver = None
        return succeed(None)

    @property
    def max_frame_size(self) -> int | None:
        """The network's frame size limit, if any."""
        return self.network.max_frame_size

    def connected_peers(self) -> frozenset[PeerId]:
        return frozenset(
            peer
            for peer in self.network._nodes
            if peer != self.local_id and self.network.linked(self.local_id, peer)
        )

    def stats(self) -> NetworkStats:
        """
        :return: this node's counters on the network since it was added:
            its links up now (as both ``connections`` and ``links``), its
            links established and lost, and the links it closed, by reason
            (the error's ``ilm_event``).
        """
        up = len(self.connected_peers())
        return self.counters.snapshot(up, up)

    def send_frames(self, peer_id: PeerId, frames: Iterable[bytes]) -> None:
        if self.receiver is not None:
            self.network._transmit(self.local_id, peer_id, frames)

    def close_link(self, peer_id: PeerId, reason: Exception) -> None:
        log.info(
            "node {local_id!r} closes its link to {peer_id!r}: {reason}",
            local_id=self.local_id,
            peer_id=peer_id,
            reason=reason,
        )
        self.network._close(self.local_id, peer_id, reason)

    def __repr__(self) -> str:
        return f"<InMemoryPeerNetwork {self.local_id!r}>"
