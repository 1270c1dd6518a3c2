"""
One-way throughput of ILM on SQLite stores (synchronous=FULL), in one
process, against raw sqlite3 measured in the same run.

ILM: two nodes, each with an SQLiteBackend on its own file, on the in-memory
network, driven by the real reactor.  The sender calls ``send_to`` for every
message (in bursts of ``--burst`` per reactor turn); the receiver checks
that each message arrives exactly once and in order.  The clock stops when
the last message has been delivered, and again when the sender has the
last acknowledgement.  The sender's commit sizes are recorded.

Baseline: raw sqlite3 inserting the same rows (same table layout: peer,
position, time, contents; one ``executemany`` binding position and contents)
with the same grouping (one transaction per commit the ILM sender made) into
a WAL file with the same ``synchronous``: the cost of just getting the
messages durably on disk, with nothing read back, deleted, delivered or
acknowledged.

Usage: python benchmarks/sqlite_throughput.py [--messages N] [--size B]
       [--runs R] [--synchronous FULL|NORMAL] [--dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from _oneway import one_way
from ilm import SQLiteBackend, StoreBatch
from ilm.interfaces import IBackend


@implementer(IBackend)
class CommitSizes:
    """
    Pass-through backend that records how many messages each commit stored.
    """

    def __init__(self, inner: SQLiteBackend) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def open(self) -> Any:
        return self.inner.open()

    def commit(self, batch: StoreBatch) -> Any:
        stored = sum(len(contents) for _, contents in batch.messages.values())
        if stored:
            self.sizes.append(stored)
        return self.inner.commit(batch)

    def read_outbound(
        self, peer_id: Any, after: int, limit: int, max_bytes: int
    ) -> Any:
        return self.inner.read_outbound(peer_id, after, limit, max_bytes)

    def close(self) -> Any:
        return self.inner.close()


def remove_store(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-lock"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def baseline(path: str, payloads: list[bytes], sizes: list[int], sync: str) -> float:
    """
    :return: rows per second inserted by raw sqlite3 with the given grouping.
    """
    remove_store(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute(
        "CREATE TABLE outbox (peer_key INTEGER NOT NULL, position INTEGER NOT "
        "NULL, stored_at INTEGER NOT NULL, contents BLOB NOT NULL, PRIMARY KEY "
        "(peer_key, position)) WITHOUT ROWID"
    )
    start = time.perf_counter()
    position = 0
    for size in sizes:
        conn.execute("BEGIN IMMEDIATE")
        now = int(time.time() * 1000)
        conn.executemany(
            f"INSERT INTO outbox VALUES (1, ?, {now}, ?)",
            zip(itertools.count(position + 1), payloads[position : position + size]),
        )
        conn.execute("COMMIT")
        position += size
    elapsed = time.perf_counter() - start
    conn.close()
    remove_store(path)
    assert position == len(payloads)
    return len(payloads) / elapsed


def commit_latency(path: str, sync: str, commits: int = 300) -> float:
    """
    :return: the median seconds one single-row commit takes with raw
        sqlite3 (WAL, the given ``synchronous``): what an fsync costs here.
    """
    remove_store(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE t (position INTEGER PRIMARY KEY, contents BLOB)")
    times = []
    for position in range(commits):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?)", (position, b"x" * 64))
        conn.execute("COMMIT")
        times.append(time.perf_counter() - start)
    conn.close()
    remove_store(path)
    return statistics.median(times)


async def ilm_run(
    reactor: Any, directory: str, payloads: list[bytes], burst: int, sync: str
) -> tuple[float, float, list[int]]:
    """
    :return: (messages per second to last delivery, to last acknowledgement,
        the sender's commit sizes).
    """
    paths = [os.path.join(directory, f"node{i}.sqlite") for i in (1, 2)]
    for path in paths:
        remove_store(path)
    backend = CommitSizes(SQLiteBackend(paths[0], synchronous=sync, reactor=reactor))
    delivered, acknowledged = await one_way(
        reactor,
        backend,
        SQLiteBackend(paths[1], synchronous=sync, reactor=reactor),
        payloads,
        burst,
    )
    for path in paths:
        remove_store(path)
    return delivered, acknowledged, backend.sizes


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument(
        "--dir", default=None, help="where the store files go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    payloads = [b"%0*d" % (args.size, i) for i in range(args.messages)]

    async def run(reactor: Any) -> None:
        rows = []
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            probe = os.path.join(directory, "latency.sqlite")
            full = commit_latency(probe, "FULL")
            normal = commit_latency(probe, "NORMAL")
            print(
                f"one-row commit, raw sqlite3 WAL: synchronous=FULL "
                f"{full * 1000:.3f} ms, NORMAL {normal * 1000:.3f} ms (median "
                f"of 300): about {1 / full:,.0f} commits/s with an fsync each",
                flush=True,
            )
            for index in range(args.runs):
                delivered, acked, sizes = await ilm_run(
                    reactor, directory, payloads, args.burst, args.synchronous
                )
                raw = baseline(
                    os.path.join(directory, "baseline.sqlite"),
                    payloads,
                    sizes,
                    args.synchronous,
                )
                rows.append((raw, delivered, acked, len(sizes)))
                print(
                    f"run {index + 1}: ILM {delivered:,.0f} msg/s delivered "
                    f"({acked:,.0f} msg/s acknowledged) in {len(sizes):,} sender "
                    f"commits (median {statistics.median(sizes):,.0f} messages, "
                    f"largest {max(sizes):,}); raw sqlite3 with the same commits "
                    f"{raw:,.0f} msg/s; ratio {delivered / raw:.2f}",
                    flush=True,
                )
        raw = statistics.median(r[0] for r in rows)
        delivered = statistics.median(r[1] for r in rows)
        acked = statistics.median(r[2] for r in rows)
        commits = statistics.median(r[3] for r in rows)
        print(
            f"median of {args.runs}: {args.messages:,} x {args.size} B one way, "
            f"SQLite synchronous={args.synchronous}: ILM {delivered:,.0f} msg/s "
            f"delivered, {acked:,.0f} msg/s acknowledged ({commits:,.0f} sender "
            f"commits); baseline {raw:,.0f} msg/s; ILM/baseline "
            f"{delivered / raw:.2f}; target 50,000 msg/s: "
            f"{'met' if delivered >= 50_000 else 'NOT met'}"
        )

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
