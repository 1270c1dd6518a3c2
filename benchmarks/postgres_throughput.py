"""
Commit throughput of the PostgreSQL backend alone, against raw psycopg
measured in the same run.

For each batch size (1, 16, 256, 1024 messages of 64 bytes by default):

- backend: ``PostgresBackend.commit`` called from the reactor, one commit
  outstanding at a time (as ILM commits), each storing one batch for one
  peer; the latency of a commit is from the call to its Deferred firing.
- executemany: raw psycopg on one connection in this thread: ``BEGIN``,
  one pipelined ``executemany`` inserting the batch into a table of the
  same layout as the backend's outbox, ``COMMIT``.
- unnest: the same with one ``INSERT ... SELECT FROM unnest(bytea[])``
  (the statement the backend uses): what the backend's own bookkeeping,
  locking and thread hops cost on top of its insert.

Each measurement runs for ``--seconds`` and is repeated ``--runs`` times;
the medians are printed, with the backend's ratio to each baseline.  Every
run works in a fresh PostgreSQL schema, dropped afterwards.  The server's
settings (``synchronous_commit``, ``fsync``) are printed with the figures:
with ``synchronous_commit=on`` every commit waits for its WAL flush.

Usage: python benchmarks/postgres_throughput.py [--dsn DSN] [--sizes 1,16]
       [--seconds S] [--runs R] [--message-size B]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.internet import defer, task

from ilm import StoreBatch
from ilm.backends import PostgresBackend

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summarise(
    messages: int, elapsed: float, latencies: list[float]
) -> dict[str, float]:
    return {
        "rate": messages / elapsed,
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "commits": len(latencies),
    }


async def backend_run(
    dsn: str, schema: str, batch: int, payload: bytes, seconds: float
) -> dict[str, float]:
    backend = PostgresBackend(dsn, node_id=1, gateway="bench", schema=schema)
    await backend.open()
    try:
        contents = [payload] * batch
        position = 1
        # One warm-up commit: the peer's rows, prepared statements.
        await backend.commit(StoreBatch(messages={2: (position, contents)}))
        position += batch
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            began = time.perf_counter()
            await backend.commit(StoreBatch(messages={2: (position, contents)}))
            now = time.perf_counter()
            latencies.append(now - began)
            position += batch
            if now >= deadline:
                break
        elapsed = time.perf_counter() - start
    finally:
        await backend.close()
    return summarise(len(latencies) * batch, elapsed, latencies)


def raw_run(
    dsn: str,
    schema: str,
    batch: int,
    payload: bytes,
    seconds: float,
    insert: Callable[[Any, int, list[bytes]], None],
) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
        conn.execute(
            f'CREATE TABLE "{schema}".outbox (node_key integer NOT NULL, '
            f"peer_key bigint NOT NULL, position bigint NOT NULL, "
            f"stored_at timestamptz NOT NULL DEFAULT now(), contents bytea NOT NULL, "
            f"PRIMARY KEY (node_key, peer_key, position))".encode()
        )
        contents = [payload] * batch
        position = 0

        def one() -> None:
            nonlocal position
            with conn.pipeline():
                conn.execute("BEGIN")
                insert(conn, position, contents)
            conn.execute("COMMIT")
            position += batch

        one()
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            began = time.perf_counter()
            one()
            now = time.perf_counter()
            latencies.append(now - began)
            if now >= deadline:
                break
        elapsed = time.perf_counter() - start
    return summarise(len(latencies) * batch, elapsed, latencies)


def executemany(schema: str) -> Callable[[Any, int, list[bytes]], None]:
    statement = (
        f'INSERT INTO "{schema}".outbox (node_key, peer_key, position, contents) '
        f"VALUES (1, 2, %s, %b)"
    ).encode()

    def insert(conn: Any, position: int, contents: list[bytes]) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(
                statement, [(position + i, c) for i, c in enumerate(contents, 1)]
            )

    return insert


def unnest(schema: str) -> Callable[[Any, int, list[bytes]], None]:
    statement = (
        f'INSERT INTO "{schema}".outbox (node_key, peer_key, position, contents) '
        f"SELECT 1, 2, %s::bigint + t.o, t.c "
        f"FROM unnest(%b::bytea[]) WITH ORDINALITY AS t(c, o)"
    ).encode()

    def insert(conn: Any, position: int, contents: list[bytes]) -> None:
        conn.execute(statement, (position, contents))

    return insert


def drop(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


async def main(reactor: Any, options: argparse.Namespace) -> None:
    dsn = options.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = conn.execute(
            "SELECT version(), current_setting('synchronous_commit'), "
            "current_setting('fsync')"
        ).fetchone()
    assert settings is not None
    print(f"server: {settings[0]}")
    print(f"synchronous_commit={settings[1]} fsync={settings[2]}")
    print(
        f"{options.message_size}-byte messages, {options.seconds} s per "
        f"measurement, median of {options.runs} runs; machine: {os.cpu_count()} "
        f"cores (shared)"
    )
    payload = b"x" * options.message_size
    rows = []
    for batch in options.sizes:
        runs: dict[str, list[dict[str, float]]] = {
            "backend": [],
            "executemany": [],
            "unnest": [],
        }
        for _ in range(options.runs):
            schema = f"ilm_bench_{uuid.uuid4().hex[:12]}"
            try:
                runs["backend"].append(
                    await backend_run(dsn, schema, batch, payload, options.seconds)
                )
            finally:
                drop(dsn, schema)
            for name, make in (("executemany", executemany), ("unnest", unnest)):
                schema = f"ilm_bench_{uuid.uuid4().hex[:12]}"
                try:
                    runs[name].append(
                        raw_run(
                            dsn, schema, batch, payload, options.seconds, make(schema)
                        )
                    )
                finally:
                    drop(dsn, schema)
        medians = {
            name: {
                key: statistics.median(r[key] for r in results)
                for key in ("rate", "p50", "p99", "commits")
            }
            for name, results in runs.items()
        }
        rows.append((batch, medians))
        b, e, u = medians["backend"], medians["executemany"], medians["unnest"]
        print(
            f"batch {batch:>5}: backend {b['rate']:>9,.0f} msg/s "
            f"(p50 {b['p50']:.3f} ms, p99 {b['p99']:.3f} ms) | "
            f"executemany {e['rate']:>9,.0f} msg/s "
            f"(p50 {e['p50']:.3f} ms, p99 {e['p99']:.3f} ms) | "
            f"unnest {u['rate']:>9,.0f} msg/s "
            f"(p50 {u['p50']:.3f} ms, p99 {u['p99']:.3f} ms) | "
            f"backend/executemany {b['rate'] / e['rate']:.2f}, "
            f"backend/unnest {b['rate'] / u['rate']:.2f}",
            flush=True,
        )
    print()
    print(
        "| batch | backend msg/s | p50 ms | p99 ms | executemany msg/s | p50 ms "
        "| p99 ms | unnest msg/s | backend / executemany | backend / unnest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, m in rows:
        b, e, u = m["backend"], m["executemany"], m["unnest"]
        print(
            f"| {batch:,} | {b['rate']:,.0f} | {b['p50']:.3f} | {b['p99']:.3f} "
            f"| {e['rate']:,.0f} | {e['p50']:.3f} | {e['p99']:.3f} "
            f"| {u['rate']:,.0f} | {b['rate'] / e['rate']:.2f} "
            f"| {b['rate'] / u['rate']:.2f} |"
        )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("ILM_TEST_POSTGRES", DEFAULT_DSN)
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 256, 1024],
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--message-size", type=int, default=64)
    return parser.parse_args(argv)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parse(sys.argv[1:]))))
