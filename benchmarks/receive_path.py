"""
CPU per socket read on a node's receive path, for a node with many peers:
what ILM spends between the bytes of one read and their delivery.

One ILM node (in-memory store) on a ``StreamNetwork`` with ``--peers``
authenticated links over Twisted's in-memory transports
(``twisted.test.iosim``: the real handshake, pre-shared keys and per-frame
tags, no sockets).  Each peer is a lean peer of the many-peers benchmark
(``benchmarks/_many_roles.py``): its reads carry 1, 2, 4 or 8 tagged
MESSAGES frames of one 64-byte message each, at consecutive positions, as
a peer sending at its own pace puts them in one read.  Every read of every
peer goes through ``ILMProtocol.dataReceived``, in rounds of one read per
peer; the clock is read around each round, and the node's timers (ACKs,
commits) run between rounds, outside it.  The node's delivery target checks
that each peer's messages arrive exactly once and in order.

What this leaves out is the same for any Twisted protocol: the reactor's
dispatch of each ``epoll`` event and the ``recv`` system call (about 10 µs
a read on the many-peers machine; ``docs/benchmarks.md``).  The baseline,
measured in the same run, is Twisted's ``Int32StringReceiver`` taking the
same bytes (one ``stringReceived`` per frame, which does nothing): the cost
of framing alone.

Usage: python benchmarks/receive_path.py [--peers N] [--rounds R] [--runs K]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.protocols.basic import Int32StringReceiver
from twisted.test.iosim import FakeTransport, connect

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._many_roles import NODE, LeanPeer, carry_frame, key, stamp
from ilm import ILM, Message
from ilm.network import ILMFactory, StreamNetwork
from ilm.testing import InMemoryBackend

FRAMES_PER_READ = (1, 2, 4, 8)


class _Peer(LeanPeer):
    """A lean peer on an in-memory transport: it keeps only the link's tag."""

    def _attach(self) -> None:
        self._tag = self.network.link(NODE)._writer.sealer.tag


class _Framing(Int32StringReceiver):
    MAX_LENGTH = 1 << 20

    def stringReceived(self, string: bytes) -> None:
        pass


class Bench:
    """One node and ``peers`` linked lean peers, on one ``Clock``."""

    def __init__(self, peers: int) -> None:
        self.clock = clock = Clock()
        self.expected = [0] * (peers + 1)
        self.errors: list[str] = []
        expected = self.expected

        def deliver(message: Message) -> None:
            source = message.source_id
            if message.message_id != expected[source] + 1:
                self.errors.append(f"peer {source}: {message.message_id}")
            expected[source] = message.message_id

        network = StreamNetwork(
            NODE, keys={i: key(i) for i in range(1, peers + 1)}, reactor=clock
        )
        self.node = ILM(InMemoryBackend(), deliver, network, clock=clock)
        self.node.startService()
        clock.advance(0)
        self.links: list[tuple[_Peer, Any]] = []
        for peer_id in range(1, peers + 1):
            peer_network = StreamNetwork(
                peer_id, keys={NODE: key(peer_id)}, reactor=clock
            )
            peer = _Peer(peer_network)
            peer_network.start(peer)
            address = IPv4Address("TCP", "127.0.0.1", 10_000 + peer_id)
            client = ILMFactory(peer_network, NODE).buildProtocol(address)
            server = ILMFactory(network, None).buildProtocol(address)
            pump = connect(
                server,
                FakeTransport(server, isServer=True, peerAddress=address),
                client,
                FakeTransport(client, isServer=False, peerAddress=address),
                greet=False,
                clock=clock,
            )
            for _ in range(20):
                pump.pump()
                clock.advance(0)
            if peer._tag is None:
                raise SystemExit(f"peer {peer_id} did not link")
            self.links.append((peer, server))

    def reads(self, frames: int) -> list[tuple[Any, bytes]]:
        """The next read of every peer: ``frames`` frames each."""
        reads = []
        for peer, server in self.links:
            parts = []
            for _ in range(frames):
                peer.sent += 1
                parts.append(carry_frame(peer._tag, peer.sent, stamp(peer.sent - 1)))
            reads.append((server, b"".join(parts)))
        return reads

    def round(self, frames: int) -> tuple[float, list[tuple[Any, bytes]]]:
        """
        :return: seconds for one read of every peer through ILM, and the
            reads.
        """
        reads = self.reads(frames)
        start = time.perf_counter()
        for server, data in reads:
            server.dataReceived(data)
        elapsed = time.perf_counter() - start
        self.clock.advance(0.002)
        for _, server in self.links:
            server.transport.stream.clear()  # the node's ACKs: not read here
        return elapsed, reads

    def delivered(self) -> int:
        return sum(self.expected)


def framing(reads: list[tuple[Any, bytes]]) -> float:
    """:return: seconds for Int32StringReceiver to take the same reads."""
    receivers = []
    for _ in reads:
        receiver = _Framing()
        receiver.makeConnection(None)  # type: ignore[arg-type]
        receivers.append(receiver)
    start = time.perf_counter()
    for receiver, (_, data) in zip(receivers, reads, strict=True):
        receiver.dataReceived(data)
    return time.perf_counter() - start


def run(peers: int, rounds: int) -> dict[int, tuple[float, float]]:
    """
    :return: per frames-per-read: (median µs per read through ILM, median
        µs per read through the framing baseline).
    """
    bench = Bench(peers)
    figures = {}
    sent = 0
    for frames in FRAMES_PER_READ:
        ilm, raw = [], []
        gc.collect()
        for _ in range(rounds):
            seconds, reads = bench.round(frames)
            ilm.append(seconds / peers * 1e6)
            raw.append(framing(reads) / peers * 1e6)
            sent += frames * peers
        # The first rounds warm caches up.
        figures[frames] = (statistics.median(ilm[2:]), statistics.median(raw[2:]))
    if bench.errors or bench.delivered() != sent:
        raise SystemExit(f"delivered {bench.delivered()} of {sent}: {bench.errors[:3]}")
    return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    results = []
    for index in range(args.runs):
        figures = run(args.peers, args.rounds)
        results.append(figures)
        print(
            f"run {index + 1}: "
            + ", ".join(
                f"{k} frames {ilm:.2f} µs (framing {raw:.2f})"
                for k, (ilm, raw) in figures.items()
            )
        )
    print(f"median of {args.runs} runs, {args.peers:,} peers, µs of CPU per read:")
    print("| frames per read | ILM | framing alone | ILM / framing | ILM per message |")
    print("|---|---|---|---|---|")
    medians = {}
    for k in FRAMES_PER_READ:
        ilm = statistics.median(r[k][0] for r in results)
        raw = statistics.median(r[k][1] for r in results)
        medians[k] = ilm
        print(f"| {k} | {ilm:.2f} | {raw:.2f} | {ilm / raw:.1f} | {ilm / k:.2f} |")
    # Least squares over 2, 4 and 8 frames (one frame takes the one-frame
    # path): the cost of a read and of each frame in it.
    xs = [2, 4, 8]
    ys = [medians[x] for x in xs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    print(
        f"fit over 2-8 frames: {my - slope * mx:.2f} µs per read "
        f"+ {slope:.2f} µs per frame"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
