"""
One process draining a backlog of large messages from an SQLite store, for
``tests/test_large_messages.py`` (run apart so that its peak resident
memory is its own).

``python -m tests.large_backlog DIRECTORY COUNT SIZE`` sends COUNT messages
of SIZE bytes from a sender with an SQLite store in DIRECTORY to a receiver
over an in-memory network while the link between them is cut (the backlog
builds in the sender's store), then restores the link and waits until the
receiver has every message and the sender every acknowledgement.  It prints
one line of JSON: the bytes the sender read back from its store, the bytes
delivered, the peak resident memory (``ru_maxrss``) once both nodes run
(before any message), before the link came back and at the end, and the
seconds the drain took.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

from twisted.internet import defer, task

from ilm import ILM, Config, Message, SQLiteBackend
from ilm.network import InMemoryNetwork
from ilm.testing import InMemoryBackend


class CountingReads:
    """
    The sender's SQLite backend, counting the bytes its outbox reads return.
    """

    def __init__(self, inner: SQLiteBackend) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.reads = 0

    def open(self) -> Any:
        return self.inner.open()

    def commit(self, batch: Any) -> Any:
        return self.inner.commit(batch)

    def read_outbound(
        self, peer_id: Any, after: int, limit: int, max_bytes: int
    ) -> Any:
        def count(contents: list[bytes]) -> list[bytes]:
            self.reads += 1
            self.bytes_read += sum(map(len, contents))
            return contents

        return self.inner.read_outbound(peer_id, after, limit, max_bytes).addCallback(
            count
        )

    def close(self) -> Any:
        return self.inner.close()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def run(reactor: Any, directory: str, count: int, size: int) -> dict[str, Any]:
    from zope.interface import directlyProvides

    from ilm.interfaces import IBackend

    network = InMemoryNetwork(reactor)
    backend = CountingReads(SQLiteBackend(os.path.join(directory, "sender.sqlite")))
    directlyProvides(backend, IBackend)
    delivered = {"bytes": 0, "count": 0}
    done: defer.Deferred[None] = defer.Deferred()

    def deliver(message: Message) -> None:
        delivered["bytes"] += len(message.contents)
        delivered["count"] += 1
        if delivered["count"] == count:
            done.callback(None)

    config = Config()
    sender = await ILM.create(
        backend, lambda m: None, network.add_peer(1), config=config
    )
    receiver = await ILM.create(InMemoryBackend(), deliver, network.add_peer(2))
    baseline = peak_rss()
    network.cut(1, 2)
    last = None
    for start in range(0, count, 4):
        # A few at a time, as an application that waits for its receipts:
        # what piles up is in the store, not in memory.
        receipts = [
            await sender.send_to(2, bytes([n % 256]) * size)
            for n in range(start, min(start + 4, count))
        ]
        last = receipts[-1]
    before = peak_rss()
    began = time.monotonic()
    network.restore(1, 2)
    await done
    assert last is not None
    await last.acknowledged
    drained = time.monotonic() - began
    await sender.shutdown(30)
    await receiver.shutdown(30)
    return {
        "bytes_read": backend.bytes_read,
        "reads": backend.reads,
        "bytes_delivered": delivered["bytes"],
        "messages": delivered["count"],
        "baseline_rss": baseline,
        "peak_rss_before_drain": before,
        "peak_rss": peak_rss(),
        "drain_seconds": round(drained, 3),
    }


def main() -> None:
    directory, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    async def go(reactor: Any) -> None:
        result = await run(reactor, directory, count, size)
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
