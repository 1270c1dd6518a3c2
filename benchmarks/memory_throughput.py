"""
One-way throughput of ILM in memory, in one process, against raw Twisted
framing measured in the same run.

ILM: two nodes with in-memory backends on an in-memory network, driven by the
real reactor.  The sender calls ``send_to`` for every message (in bursts of
``--burst`` per reactor turn); the receiver checks that each message arrives
exactly once and in order.  The clock stops when the last message has been
delivered, and again when the sender has the last acknowledgement.

Baseline: the same messages through Twisted's ``Int32StringReceiver`` over an
in-memory transport (``sendString`` on one side, ``dataReceived`` in 64 KiB
chunks on the other): what the reactor-free framing alone costs.

Usage: python benchmarks/memory_throughput.py [--messages N] [--size B] [--runs R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from _oneway import one_way
from ilm.testing import InMemoryBackend


class _Collector(Int32StringReceiver):
    MAX_LENGTH = 1 << 20

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def stringReceived(self, string: bytes) -> None:
        self.received.append(string)


def baseline(messages: int, size: int) -> float:
    """
    :return: messages per second through Int32StringReceiver in memory.
    """
    payloads = [b"%0*d" % (size, i) for i in range(messages)]
    start = time.perf_counter()
    sender = Int32StringReceiver()
    transport = StringTransport()
    sender.makeConnection(transport)
    for p in payloads:
        sender.sendString(p)
    wire = transport.value()
    receiver = _Collector()
    receiver.makeConnection(StringTransport())
    for offset in range(0, len(wire), 65536):
        receiver.dataReceived(wire[offset : offset + 65536])
    elapsed = time.perf_counter() - start
    assert receiver.received == payloads, "baseline lost or reordered messages"
    return messages / elapsed


async def ilm_run(
    reactor: Any, messages: int, size: int, burst: int
) -> tuple[float, float]:
    """
    :return: (messages per second to last delivery, to last acknowledgement).
    """
    payloads = [b"%0*d" % (size, i) for i in range(messages)]
    return await one_way(reactor, InMemoryBackend(), InMemoryBackend(), payloads, burst)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10_000)
    args = parser.parse_args(argv)

    async def run(reactor: Any) -> None:
        rows = []
        for index in range(args.runs):
            raw = baseline(args.messages, args.size)
            delivered, acked = await ilm_run(
                reactor, args.messages, args.size, args.burst
            )
            rows.append((raw, delivered, acked))
            print(
                f"run {index + 1}: ILM {delivered:,.0f} msg/s delivered "
                f"({acked:,.0f} msg/s acknowledged); raw Int32StringReceiver "
                f"{raw:,.0f} msg/s; ratio {delivered / raw:.2f}"
            )
        raw = statistics.median(r[0] for r in rows)
        delivered = statistics.median(r[1] for r in rows)
        acked = statistics.median(r[2] for r in rows)
        print(
            f"median of {args.runs}: {args.messages:,} x {args.size} B one way in "
            f"memory: ILM {delivered:,.0f} msg/s delivered, {acked:,.0f} msg/s "
            f"acknowledged; baseline {raw:,.0f} msg/s; ILM/baseline "
            f"{delivered / raw:.2f}; target 100,000 msg/s: "
            f"{'met' if delivered >= 100_000 else 'NOT met'}"
        )

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
