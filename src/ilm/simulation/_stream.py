"""
The simulator's stream network: nodes linked by the real
:class:`ilm.network.StreamNetwork` (its ``ILMProtocol``, the link handshake
with pre-shared keys, keepalives, one link per peer, reconnection through
``ClientService``) over in-memory byte pipes (:class:`Switchboard`) on the
simulation's clock.

Every timer of the stream network, of its ``ClientService`` dialers and of
the pipes runs on that clock, and every random choice (nonces, keys,
reconnection jitter, how bytes are split) comes from the seed, so a seed
replays exactly.

Faults, on top of node crashes and partitions:

- ``abort``: one connection is aborted by one side at a random moment;
  what is in flight is lost, the other side sees a reset;
- ``half_open``: one connection silently stops carrying anything, and
  neither side hears the other close it: each finds out through its own
  keepalive idle timeout (or handshake timeout);
- ``stall``: one direction of a connection stops delivering for a while
  (a slow or stuck reader, a delay); the writer's transport pauses its
  producer once its buffer fills (``link_paused``), and a stall longer than
  the idle timeout kills the link.

A crashed node's connections are aborted (its peers see a reset), or, for
some crashes, vanish silently (the machine died: its peers find out through
their timeouts, or when the restarted node connects again).  A cut
partitions two nodes: their connections are reset and new ones fail until
the partition heals.  TCP neither drops, duplicates nor reorders single
frames, so the per-frame faults of the in-memory network do not apply.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime

from ilm._backoff import Backoff
from ilm._peerid import PeerId
from ilm.network._memory import FaultPolicy
from ilm.network._stream import LinkSettings, StreamNetwork
from ilm.simulation._pipes import Pipe, Switchboard

STREAM_FAULT_RATES: dict[str, tuple[float, ...]] = {
    "abort": (0.0, 0.5, 2.0, 5.0),
    "half_open": (0.0, 0.2, 0.5, 1.0),
    "stall": (0.0, 0.5, 2.0),
}
"""Per fault kind, the rates (per simulated second) a seed draws from."""

FrameCheck = Callable[[PeerId, PeerId, bytes], None]


class _CheckedStreamNetwork(StreamNetwork):
    """
    A :class:`StreamNetwork` that shows the simulator every session frame
    ILM sends on a link, before sending it.
    """

    def __init__(self, model: StreamSimulation, local_id: PeerId, **kwargs: object):
        super().__init__(local_id, **kwargs)  # type: ignore[arg-type]
        self._model = model

    def send_frames(self, peer_id: PeerId, frames: Sequence[bytes]) -> None:
        check = self._model.frame_check
        if check is not None and peer_id in self._links:
            for frame in frames:
                check(self.local_id, peer_id, frame)
        super().send_frames(peer_id, frames)

    def _report(self, event: str, *args: object) -> None:
        if event == "link_paused":
            self._model.stats["link_paused"] += 1
        super()._report(event, *args)


class StreamSimulation:
    """
    A :class:`ilm.simulation.SimulatedNetwork` of real stream networks on
    one :class:`Switchboard`.  Everything about it (latency, buffer size,
    how bytes are split, keepalive and handshake timings, reconnection
    backoff) is drawn from ``rng``.
    """

    name = "stream"
    frame_faults = False
    fault_rates = STREAM_FAULT_RATES

    def __init__(self, clock: IReactorTime, rng: random.Random) -> None:
        self.clock = clock
        latency = rng.choice([0.0002, 0.001, 0.005, 0.02])
        self.split = rng.choice([0.0, 0.3, 0.9])
        self.board = Switchboard(
            clock,
            latency=latency,
            high_water=rng.choice([256, 4096, 65536, 256 * 1024]),
            chunks=self._chunks if self.split else None,
        )
        keepalive = rng.choice([0.05, 0.2, 1.0])
        self.settings = LinkSettings(
            handshake_timeout=max(rng.choice([0.2, 1.0, 5.0]), 40 * latency),
            keepalive_interval=keepalive,
            idle_timeout=keepalive * rng.choice([2, 3, 6]),
            close_grace=rng.choice([0.05, 0.5, 2.0]),
            reconnect=Backoff(
                initial=rng.choice([0.005, 0.02, 0.1]),
                maximum=rng.choice([0.1, 0.5, 2.0]),
            ),
        )
        self.p_silent_crash = rng.choice([0.0, 0.3, 1.0])
        self.random = random.Random(rng.getrandbits(64))
        self.fault_policy: FaultPolicy | None = None
        self.frame_check: FrameCheck | None = None
        self.note: Callable[[str], None] = lambda text: None
        self.stats: Counter[str] = Counter()
        self.node_ids: tuple[PeerId, ...] = ()
        self.networks: dict[PeerId, StreamNetwork] = {}
        self._keys: dict[frozenset[PeerId], bytes] = {}

    def describe(self) -> str:
        """
        The seed's network parameters, for the trace.
        """
        s = self.settings
        return (
            f"stream network: latency {self.board.latency}s, buffer "
            f"{self.board.high_water} B, split {self.split}; keepalive "
            f"{s.keepalive_interval}s idle {s.idle_timeout}s handshake "
            f"{s.handshake_timeout}s grace {s.close_grace}s; reconnect "
            f"{s.reconnect.initial}..{s.reconnect.maximum}s; silent crashes "
            f"{self.p_silent_crash}"
        )

    def attach(
        self,
        node_ids: Sequence[PeerId],
        frame_check: FrameCheck,
        note: Callable[[str], None],
        stats: Counter[str],
    ) -> None:
        """
        The simulator tells the network its nodes, how to check frames, and
        where to note events and count them.
        """
        self.node_ids = tuple(node_ids)
        self.frame_check = frame_check
        self.note = note
        self.stats = stats
        for a in self.node_ids:
            for b in self.node_ids:
                if a < b:  # type: ignore[operator]
                    self._keys[frozenset((a, b))] = self.random.randbytes(32)

    # -- SimulatedNetwork ------------------------------------------------------

    def add_peer(self, peer_id: PeerId) -> StreamNetwork:
        """
        The network of node ``peer_id`` (a new one at each start): it
        listens on its id and dials every other node.
        """
        name = str(peer_id)
        others = [p for p in self.node_ids if p != peer_id]
        own = random.Random(self.random.getrandbits(64))
        network = _CheckedStreamNetwork(
            self,
            peer_id,
            listen=[self.board.server(name)],
            peers={p: self.board.client(str(p), source=name) for p in others},
            keys={p: self._keys[frozenset((peer_id, p))] for p in others},
            settings=self.settings,
            reactor=self.clock,
            random=own.random,
            random_bytes=own.randbytes,
        )
        self.networks[peer_id] = network
        return network

    def crash(self, peer_id: PeerId) -> None:
        """
        Node ``peer_id`` died: its connections are aborted, or (as the seed
        decides) vanish silently.
        """
        network = self.networks.pop(peer_id, None)
        if network is None:
            return
        name = str(peer_id)
        pipes = [pipe for pipe in self.board.pipes if name in pipe.names]
        if pipes and self.random.random() < self.p_silent_crash:
            for pipe in pipes:
                pipe.sever()
            self.stats["crash_silent"] += 1
            self.note(
                f"node {peer_id}'s {len(pipes)} connection(s) vanish silently "
                "(its peers find out by their timeouts)"
            )
        network.abort()

    def cut(self, a: PeerId, b: PeerId) -> None:
        """
        Partition ``a`` and ``b``: their connections are reset and new ones
        fail until :meth:`restore`.
        """
        self.board.partition(str(a), str(b))
        for pipe in self.board.pipes_between(str(a), str(b)):
            pipe.cut()

    def restore(self, a: PeerId, b: PeerId) -> None:
        self.board.heal(str(a), str(b))

    def is_cut(self, a: PeerId, b: PeerId) -> bool:
        return self.board.partitioned(str(a), str(b))

    # -- faults ------------------------------------------------------------------

    def inject(self, kind: str, rng: random.Random) -> str | None:
        """
        Inject one fault of ``kind`` (a key of ``fault_rates``).

        :return: what was done (for the trace), or ``None`` if there was
            nothing to do it to.
        """
        pipes = [pipe for pipe in self.board.pipes if not pipe.severed]
        if not pipes:
            return None
        pipe = rng.choice(pipes)
        where = self._describe(pipe)
        if kind == "abort":
            side = rng.choice(pipe.open_sides())
            lost = pipe.in_flight(0) + pipe.in_flight(1)
            pipe.abort(side)
            return f"abort {where} by {pipe.names[side]} ({lost} B in flight lost)"
        if kind == "half_open":
            pipe.sever()
            return f"{where} goes silent (half-open)"
        if kind == "stall":
            side = rng.randrange(2)
            duration = rng.choice([0.05, 0.3, 1.0, 3.0])
            pipe.stall(side, True)
            self.clock.callLater(duration, pipe.stall, side, False)
            return f"{where}: {pipe.names[side]} stops reading for {duration}s"
        raise ValueError(f"unknown stream fault {kind!r}")

    @staticmethod
    def _describe(pipe: Pipe) -> str:
        client, server = pipe.names
        return f"connection {client}->{server} (port {pipe.ends[0].getHost().port})"

    def _chunks(self, data: bytes) -> list[bytes]:
        """
        Split what is about to be delivered at random points (as TCP
        segments and coalesces writes).
        """
        rng = self.random
        if len(data) < 2 or rng.random() >= self.split:
            return [data]
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 3)))
        return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def stream_network(clock: IReactorTime, rng: random.Random) -> StreamSimulation:
    """
    A ``Scenario(network=...)`` factory: :class:`StreamSimulation`.
    """
    return StreamSimulation(clock, rng)
