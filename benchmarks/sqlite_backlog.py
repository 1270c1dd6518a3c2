"""
Reopening an SQLite store with a large backlog: time to the first delivery
and peak memory of the process that reopens it.

A store is built holding ``--backlog`` (1,000,000) pending messages of
``--size`` (64) bytes to peer 2.  Then, ``--runs`` times, a fresh Python
process opens it with ``ILM.create(path, ...)`` next to a receiver node
(in-memory store) on the in-memory network, and reports:

- the seconds from calling ``ILM.create`` to the first message delivered
  (the store opened, the handshake done, the first outbox batch read and
  sent), checking that it is message 1 with the right contents;
- its peak RSS (``ru_maxrss``) at that moment, and again after ``--drain``
  more messages were delivered in order (memory follows the window, not the
  backlog).

Baseline, in a fresh process of the same kind each run: import the same
modules, open the file with raw sqlite3 and read its first outbox row;
its time and peak RSS are what any process reading the store pays.

Targets: first delivery in under 2 s, peak RSS under 200 MB.

Usage: python benchmarks/sqlite_backlog.py [--backlog N] [--size B]
       [--runs R] [--drain N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

REOPEN = r"""
import json, resource, sys, time
start = time.perf_counter()
from twisted.internet import defer, task
from ilm import ILM, Config
from ilm.backends import InMemoryBackend
from ilm.errors import ShutdownTimeout
from ilm.network import InMemoryNetwork

path, size, drain = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
imported = time.perf_counter()

def contents(position):
    return b"%0*d" % (size, position)

async def main(reactor):
    network = InMemoryNetwork(reactor)
    first = defer.Deferred()
    drained = defer.Deferred()
    count = 0

    def deliver(message):
        nonlocal count
        count += 1
        if message.message_id != count or message.contents != contents(count):
            # Fail the run (raising would only make ILM retry the delivery).
            for d in (first, drained):
                if not d.called:
                    d.errback(AssertionError(f"out of order or corrupt at {count}"))
            return
        if count == 1:
            first.callback(time.perf_counter())
        if count == 1 + drain:
            drained.callback(time.perf_counter())

    t0 = time.perf_counter()
    sender = await ILM.create(path, lambda m: None, network.add_peer(1))
    opened = time.perf_counter()
    pending = sender.pending_outbound().get(2, 0)
    receiver = await ILM.create(InMemoryBackend(), deliver, network.add_peer(2))
    t1 = await first
    rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t2 = await drained if drain else t1
    rss_drained = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "import": imported - start,
        "open": opened - t0,
        "first": t1 - t0,
        "drain_rate": drain / (t2 - t1) if drain else 0.0,
        "rss_first_mb": rss_first / 1024,
        "rss_drained_mb": rss_drained / 1024,
        "pending_at_start": pending,
    }), flush=True)
    # The backlog stays stored: stop without waiting for it to drain.
    for node in (sender, receiver):
        try:
            await node.shutdown(timeout=0.5)
        except ShutdownTimeout:
            pass

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

BASELINE = r"""
import json, resource, sqlite3, sys, time
start = time.perf_counter()
from twisted.internet import defer, task
from ilm import ILM, Config
from ilm.backends import InMemoryBackend
from ilm.network import InMemoryNetwork

imported = time.perf_counter()
t0 = time.perf_counter()
conn = sqlite3.connect(sys.argv[1])
row = conn.execute(
    "SELECT position, contents FROM outbox ORDER BY peer_key, position LIMIT 1"
).fetchone()
t1 = time.perf_counter()
assert row[0] == 1, row
print(json.dumps({
    "import": imported - start,
    "first": t1 - t0,
    "rss_first_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


BUILD = r"""
import json, sys, time
from twisted.internet import defer, task
from ilm import SQLiteBackend, StoreBatch

path, backlog, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main(reactor):
    start = time.perf_counter()
    backend = SQLiteBackend(path, reactor=reactor)
    await backend.open()
    step = 50_000
    for first in range(1, backlog + 1, step):
        last = min(backlog, first + step - 1)
        contents = [b"%0*d" % (size, p) for p in range(first, last + 1)]
        await backend.commit(StoreBatch(messages={2: (first, contents)}))
    await backend.close()
    print(json.dumps({"seconds": time.perf_counter() - start}))

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def run_child(script: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src)
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drain", type=int, default=100_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "backlog.sqlite")
        # The build runs in a child too (task.react ends its process), and
        # the measured processes start cold.
        built = run_child(BUILD, path, str(args.backlog), str(args.size))
        seconds = built["seconds"]
        size_mb = (
            sum(
                os.path.getsize(path + s)
                for s in ("", "-wal")
                if os.path.exists(path + s)
            )
            / 2**20
        )
        print(
            f"built a store of {args.backlog:,} pending {args.size}-byte messages "
            f"in {seconds:.1f} s ({size_mb:,.0f} MB on disk)",
            flush=True,
        )
        rows = []
        for index in range(args.runs):
            # Each run starts from a copy of the full backlog (a run
            # delivers, and so deletes, part of it).
            copy = os.path.join(directory, f"run{index}.sqlite")
            shutil.copyfile(path, copy)
            base = run_child(BASELINE, copy)
            ilm = run_child(REOPEN, copy, str(args.size), str(args.drain))
            for suffix in ("", "-wal", "-shm", "-lock"):
                if os.path.exists(copy + suffix):
                    os.remove(copy + suffix)
            rows.append((ilm, base))
            print(
                f"run {index + 1}: ILM.create to first delivery {ilm['first']:.3f} s "
                f"(store open {ilm['open']:.3f} s, {ilm['pending_at_start']:,} "
                f"pending), peak RSS {ilm['rss_first_mb']:.0f} MB at first "
                f"delivery, {ilm['rss_drained_mb']:.0f} MB after "
                f"{args.drain:,} more ({ilm['drain_rate']:,.0f} msg/s); baseline "
                f"(raw sqlite3 first row) {base['first']:.3f} s, peak RSS "
                f"{base['rss_first_mb']:.0f} MB",
                flush=True,
            )
    first = statistics.median(r[0]["first"] for r in rows)
    rss = statistics.median(r[0]["rss_drained_mb"] for r in rows)
    base_first = statistics.median(r[1]["first"] for r in rows)
    base_rss = statistics.median(r[1]["rss_first_mb"] for r in rows)
    print(
        f"median of {args.runs}: {args.backlog:,} pending, first delivery "
        f"{first:.3f} s after ILM.create (baseline {base_first:.3f} s, ratio "
        f"{first / base_first:.0f}); peak RSS {rss:.0f} MB (baseline "
        f"{base_rss:.0f} MB, ratio {rss / base_rss:.2f}); targets < 2 s: "
        f"{'met' if first < 2 else 'NOT met'}, < 200 MB: "
        f"{'met' if rss < 200 else 'NOT met'}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
