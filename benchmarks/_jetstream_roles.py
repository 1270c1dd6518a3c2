"""
The NATS JetStream scenario's processes (nats-py): a publisher and a
durable pull consumer, running at the same time.

The consumer creates the stream (file storage, one subject) and a durable
pull consumer with explicit acknowledgements, says READY, then fetches in
batches and acknowledges every message.  The publisher publishes
asynchronously with many publishes in flight (``publish_async``, up to
``window`` unacknowledged) and awaits the acknowledgements in batches.

What JetStream promises, and what is checked: a publish acknowledgement
means the stream stored the message; a consumer with explicit acks gets
every stored message at least once (redelivered if not acknowledged in
time), in stream order apart from redeliveries.  One publisher on one
connection stores messages in publish order.  The consumer checks that
message ``i`` arrives after ``0 .. i-1``: a gap fails the run, a repeat is
counted as a redelivery.  The publisher checks that stream sequence numbers
in the acknowledgements increase by one.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from benchmarks._harness import (
    cpu_seconds,
    now,
    payload,
    peak_rss_mb,
    read_stamp,
    ready,
    result,
    stamped,
)


async def _consume(options: dict[str, Any]) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    messages, mode, size = options["messages"], options["mode"], options.get("size", 64)
    nc = await nats.connect(options["url"], allow_reconnect=False)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=options["stream"],
            subjects=[options["subject"]],
            storage=StorageType.FILE,
        )
    )
    subscription = await js.pull_subscribe(
        options["subject"],
        durable=options["durable"],
        stream=options["stream"],
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1, ack_wait=60
        ),
    )
    ready()
    count = redelivered = 0
    first = cpu_first = 0.0
    sent_at: list[float] = []
    delivered_at: list[float] = []
    error = None
    batch = options.get("batch", 1000)
    while count < messages and error is None:
        try:
            fetched = await subscription.fetch(batch, timeout=5)
        except TimeoutError:
            continue
        for message in fetched:
            # The clock only where it is used (as every receiver here does).
            at = now() if mode != "throughput" or count == 0 else 0.0
            if count == 0:
                first, cpu_first = at, cpu_seconds()
            if mode == "throughput":
                index = int(message.data)
                if message.data != payload(index, size):
                    index = -2
            else:
                index, sent = read_stamp(message.data)
            await message.ack()
            if 0 <= index < count:
                redelivered += 1
                continue
            if index != count:
                error = f"expected message {count}, got {index}: lost or reordered"
                break
            if mode != "throughput":
                sent_at.append(sent)
                delivered_at.append(at)
            count += 1
    last = now()
    figures: dict[str, Any] = {
        "first": first,
        "last": last,
        "receiver_cpu": cpu_seconds() - cpu_first,
        "receiver_rss_mb": peak_rss_mb(),
        "received": count,
        "duplicates": redelivered,
    }
    if error:
        figures["error"] = error
    if mode != "throughput":
        figures["sent_at"] = sent_at
        figures["delivered_at"] = delivered_at
    await nc.flush()
    result(figures)
    await nc.close()


def consumer(options: dict[str, Any]) -> None:
    asyncio.run(_consume(options))


async def _publish(options: dict[str, Any]) -> None:
    import nats

    messages, mode, size = options["messages"], options["mode"], options.get("size", 64)
    window = options.get("window", 4000)
    ack_batch = options.get("ack_batch", 1000)
    subject = options["subject"]
    nc = await nats.connect(options["url"], allow_reconnect=False)
    js = nc.jetstream(publish_async_max_pending=window)
    pending: list[asyncio.Future[Any]] = []
    sequences: list[int] = []

    async def settle(upto: int) -> None:
        # Await the acknowledgements of the oldest ``upto`` publishes.
        done, pending[:upto] = pending[:upto], []
        for ack in await asyncio.gather(*done):
            sequences.append(ack.seq)

    cpu = cpu_seconds()
    start = now()
    if mode == "throughput":
        payloads = [payload(i, size) for i in range(messages)]
        start = now()
        for contents in payloads:
            pending.append(await js.publish_async(subject, contents))
            if len(pending) >= 2 * ack_batch:
                await settle(ack_batch)
    else:
        interval = 1.0 / options["rate"]
        for index in range(messages):
            wait = start + index * interval - now()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(await js.publish_async(subject, stamped(index, size)))
            await nc.flush()
            if len(pending) >= 2 * ack_batch:
                await settle(ack_batch)
    await settle(len(pending))
    done = now()
    in_order = all(b == a + 1 for a, b in itertools.pairwise(sequences))
    figures: dict[str, Any] = {
        "start": start,
        "acked": done,
        "sender_cpu": cpu_seconds() - cpu,
        "sender_rss_mb": peak_rss_mb(),
        "publisher_acks": len(sequences),
    }
    if not in_order or len(sequences) != messages:
        figures["error"] = "publish acknowledgements missing or out of sequence"
    result(figures)
    await nc.close()


def publisher(options: dict[str, Any]) -> None:
    asyncio.run(_publish(options))


async def _delete(url: str, stream: str) -> None:
    nc = await asyncio.wait_for(_connect(url), 5)
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    await nc.close()


async def _connect(url: str) -> Any:
    import nats

    async def quiet(error: Exception) -> None:
        pass

    return await nats.connect(
        url,
        allow_reconnect=False,
        connect_timeout=2,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )


def delete_stream(url: str, stream: str) -> None:
    """Delete ``stream`` (and its consumers) if it exists."""
    try:
        asyncio.run(_delete(url, stream))
    except BaseException:
        pass


def server_version(url: str) -> str | None:
    async def ask() -> str | None:
        nc = await asyncio.wait_for(_connect(url), 5)
        import re

        found = re.search(r"\d+\.\d+\.\d+", str(nc.connected_server_version))
        await nc.close()
        return found.group(0) if found else None

    try:
        return asyncio.run(ask())
    except BaseException:
        return None
