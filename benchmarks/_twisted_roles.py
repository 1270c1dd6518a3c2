"""
The child processes of the Twisted scenarios: raw ``Int32StringReceiver``
and ILM over the stream network (sender and receiver, two processes), and
ILM in memory in one process (README style and batch style).

Every mode checks what arrives:

- ``throughput``: message ``i`` must be :func:`payload(i) <_harness.payload>`
  and, for ILM, carry ``message_id == i + 1``: every message exactly once,
  in order;
- ``latency`` and ``resume``: messages carry their index and send time;
  indexes must arrive exactly once, in order.

A wrong message fails the run (the child exits without a RESULT) instead of
raising, which ILM would take as a failed delivery and retry.
"""

from __future__ import annotations

import os
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

KEY = b"benchmark pre-shared key 32 byte"


class Arrivals:
    """
    A receiver's side of a run.  ``arrived`` is called once per delivered
    message; ``done`` fires after the last one, or fails at the first wrong
    one.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        from twisted.internet import defer

        self.mode = options["mode"]
        self.messages = options["messages"]
        self.size = options.get("size", 64)
        self.count = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self.sent_at: list[float] = []
        self.delivered_at: list[float] = []
        self.done: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def arrived(self, contents: bytes, message_id: int | None = None) -> None:
        count = self.count
        throughput = self.mode == "throughput"
        # Throughput runs read the clock at the first and the last message
        # only, and build the expected contents inline (payload()): the
        # check costs the receiver as little as it can and misses nothing.
        last = count + 1 == self.messages
        at = now() if not throughput or count == 0 or last else 0.0
        if count == 0:
            self.first = at
            self.cpu_first = cpu_seconds()
        if throughput:
            ok = contents == b"%0*d" % (self.size, count)
        else:
            index, sent = read_stamp(contents)
            ok = index == count
            self.sent_at.append(sent)
            self.delivered_at.append(at)
        if not ok or message_id not in (None, count + 1):
            if not self.done.called:
                self.done.errback(
                    AssertionError(
                        f"message {count + 1}: out of order, repeated or corrupt"
                    )
                )
            return
        self.count = count = count + 1
        if count == self.messages:
            figures: dict[str, Any] = {
                "first": self.first,
                "last": at,
                "receiver_cpu": cpu_seconds() - self.cpu_first,
                "receiver_rss_mb": peak_rss_mb(),
                "received": count,
            }
            if self.mode != "throughput":
                figures["sent_at"] = self.sent_at
                figures["delivered_at"] = self.delivered_at
            self.done.callback(figures)


async def offer(
    reactor: Any, send: Any, options: dict[str, Any], cut: Any = None
) -> tuple[float, list[float]]:
    """
    Call ``send(contents)`` for every message of the run: in bursts of
    ``burst`` per reactor turn (throughput), or at ``rate`` per second
    (latency, resume; ``cut()`` is called at each time of ``cuts``, seconds
    from the start).

    :return: the start time and the times of the cuts.
    """
    from twisted.internet import task

    messages, size = options["messages"], options.get("size", 64)
    start = now()
    cuts_done: list[float] = []
    if options["mode"] == "throughput":
        burst = options.get("burst", 10_000)
        payloads = [payload(i, size) for i in range(messages)]
        start = now()
        for offset in range(0, messages, burst):
            for p in payloads[offset : offset + burst]:
                send(p)
            await task.deferLater(reactor, 0)
        return start, cuts_done
    interval = 1.0 / options["rate"]
    cuts = [start + c for c in options.get("cuts", [])]
    sent = 0
    while sent < messages:
        wait = start + sent * interval - now()
        if wait > 0:
            await task.deferLater(reactor, wait)
        while sent < messages and start + sent * interval <= now():
            if cuts and now() >= cuts[0]:
                cuts.pop(0)
                cuts_done.append(now())
                cut()
            send(stamped(sent, size))
            sent += 1
    return start, cuts_done


async def offer_lists(reactor: Any, send_many: Any, options: dict[str, Any]) -> float:
    """
    Throughput mode in batch style: call ``send_many(list)`` with lists of
    ``batch`` (1,000) messages, ``burst`` (10,000) messages per reactor
    turn, as :func:`offer` sends them one by one.

    :return: the start time.
    """
    from twisted.internet import task

    messages, size = options["messages"], options.get("size", 64)
    chunk = options.get("batch", 1000)
    burst = max(chunk, options.get("burst", 10_000))
    payloads = [payload(i, size) for i in range(messages)]
    start = now()
    for offset in range(0, messages, chunk):
        send_many(payloads[offset : offset + chunk])
        if (offset + chunk) % burst == 0:
            await task.deferLater(reactor, 0)
    return start


# -- raw Int32StringReceiver ---------------------------------------------------


async def raw_receiver(reactor: Any, options: dict[str, Any]) -> None:
    from twisted.internet import defer, endpoints, protocol
    from twisted.protocols.basic import Int32StringReceiver

    arrivals = Arrivals(options)

    class Receiver(Int32StringReceiver):
        MAX_LENGTH = 1 << 20

        def stringReceived(self, string: bytes) -> None:
            arrivals.arrived(string)

    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(protocol.Factory.forProtocol(Receiver))
    ready(port.getHost().port)
    result(await arrivals.done)
    await defer.Deferred()  # until SIGTERM


async def raw_sender(reactor: Any, options: dict[str, Any]) -> None:
    from twisted.internet import endpoints, protocol, task
    from twisted.protocols.basic import Int32StringReceiver

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", options["port"])
    sender = await endpoint.connect(protocol.Factory.forProtocol(Int32StringReceiver))
    sender.transport.setTcpNoDelay(True)  # as ILM's links do
    cpu = cpu_seconds()
    start, _ = await offer(reactor, sender.sendString, options)
    written = now()
    spent = cpu_seconds() - cpu
    # Nothing to wait for (no acknowledgements): let the kernel take the
    # last writes, then stop.
    await task.deferLater(reactor, 0.3)
    result(
        {
            "start": start,
            "acked": written,
            "sender_cpu": spent,
            "sender_rss_mb": peak_rss_mb(),
        }
    )
    sender.transport.loseConnection()


# -- ILM over the stream network ------------------------------------------------


def mac_field() -> str | None:
    """
    The ``LinkSettings`` field that turns the per-frame MAC of PSK links on
    or off (``frame_integrity``, or a field whose name speaks of a MAC), if
    this ILM has one.
    """
    import attr

    from ilm.network import LinkSettings

    fields = attr.fields_dict(LinkSettings)
    if "frame_integrity" in fields:
        return "frame_integrity"
    names = [n for n in fields if "mac" in n.lower().split("_")]
    return names[0] if names else None


def _settings(options: dict[str, Any]) -> Any:
    from ilm.network import LinkSettings

    mac = options.get("mac")
    if mac is None:
        return None
    field = mac_field()
    if field is None:
        raise SystemExit("this ILM has no frame MAC setting")
    return LinkSettings(**{field: mac})


def _backend(options: dict[str, Any], name: str) -> Any:
    if options["backend"] == "memory":
        from ilm.testing import InMemoryBackend

        return InMemoryBackend()
    if options["backend"] == "postgres":
        from ilm.backends import PostgresBackend

        # Each side its own schema (the orchestrator drops them after).
        role = name.split(".")[0]
        return PostgresBackend(
            options["dsn"],
            node_id=1 if role == "sender" else 2,
            gateway=f"bench-{role}",
            schema=options["schemas"][role],
        )
    from ilm import SQLiteBackend

    return SQLiteBackend(os.path.join(options["dir"], name), synchronous="FULL")


async def ilm_receiver(reactor: Any, options: dict[str, Any]) -> None:
    """
    One send_to per message: a callable as delivery target.  Batch style
    (``style="batch"``): a ``BatchQueueDelivery`` read by a consumer loop,
    one ``get`` per list.
    """
    from twisted.internet import defer

    from ilm import ILM, BatchQueueDelivery, Message
    from ilm.network import StreamNetwork

    arrivals = Arrivals(options)
    deliver: Any
    if options.get("style") == "batch":
        queue: defer.DeferredQueue[list[Message]] = defer.DeferredQueue()
        deliver = BatchQueueDelivery(queue)

        async def consume() -> None:
            while not arrivals.done.called:
                for message in await queue.get():
                    arrivals.arrived(message.contents, message.message_id)

        # Ends after the last message (or the first wrong one).
        defer.ensureDeferred(consume())
    else:

        def deliver(message: Message) -> None:
            arrivals.arrived(message.contents, message.message_id)

    network = StreamNetwork(
        2,
        listen=["tcp:0:interface=127.0.0.1"],
        keys={1: KEY},
        settings=_settings(options),
        reactor=reactor,
    )
    await ILM.create(_backend(options, "receiver.sqlite"), deliver, network)
    ready(network.listening_addresses()[0].port)
    result(await arrivals.done)
    # Stay up until the sender has every acknowledgement (SIGTERM).
    await defer.Deferred()


async def ilm_sender(reactor: Any, options: dict[str, Any]) -> None:
    from twisted.internet import task

    from ilm import ILM
    from ilm.network import StreamNetwork

    network = StreamNetwork(
        1,
        peers={2: f"tcp:host=127.0.0.1:port={options['port']}"},
        keys={2: KEY},
        settings=_settings(options),
        reactor=reactor,
    )
    node = await ILM.create(_backend(options, "sender.sqlite"), print, network)
    while 2 not in node.connected_peers():
        await task.deferLater(reactor, 0.001)
    last: Any = None
    batch = options.get("style") == "batch"

    def send(contents: bytes) -> None:
        nonlocal last
        if batch:
            last = node.send_many(2, [contents])
        else:
            last = node.send_to(2, contents)

    def send_many(contents: list[bytes]) -> None:
        nonlocal last
        last = node.send_many(2, contents)

    def cut() -> None:
        from twisted.internet.error import ConnectionDone

        # Abort the TCP connection under the link, as a network failure
        # would; the sender redials with its default backoff.
        network.close_link(2, ConnectionDone("benchmark link cut"))

    cpu = cpu_seconds()
    if batch and options["mode"] == "throughput":
        start = await offer_lists(reactor, send_many, options)
        cuts: list[float] = []
    else:
        start, cuts = await offer(reactor, send, options, cut)
    receipt = await last
    if isinstance(receipt, list):
        receipt = receipt[-1]
    await receipt.acknowledged
    acked = now()
    result(
        {
            "start": start,
            "acked": acked,
            "cuts": cuts,
            "sender_cpu": cpu_seconds() - cpu,
            "sender_rss_mb": peak_rss_mb(),
        }
    )
    await node.shutdown()


# -- ILM in memory, one process ----------------------------------------------------


def batch_api() -> str | None:
    """
    :return: ``None`` if this ILM has ``send_many``, else why the batch-style
        scenario cannot run.
    """
    from ilm import ILM

    return None if hasattr(ILM, "send_many") else "send_many not available"


def _batch_delivery(on_batch: Any) -> Any:
    """
    An ``ilm.interfaces.IBatchDelivery`` target handing each list of
    messages to ``on_batch``, if this ILM has that interface; else ``None``.
    """
    import ilm.interfaces

    interface = getattr(ilm.interfaces, "IBatchDelivery", None)
    if interface is None:
        return None
    from zope.interface import implementer

    @implementer(interface)
    class Batches:
        def deliver(self, message: Any) -> None:
            on_batch([message])

        def deliver_many(self, messages: Any) -> None:
            on_batch(messages)

    return Batches()


async def ilm_inproc(reactor: Any, options: dict[str, Any]) -> None:
    """
    Two ILM nodes with in-memory stores on the in-memory network, one
    process, real reactor.  README style: a ``DeferredQueue`` as delivery
    target, read by a consumer loop, and one ``send_to`` per message.
    Batch style: ``send_many`` per burst, and batch delivery when ILM
    offers it.
    """
    from twisted.internet import defer, task

    from ilm import ILM
    from ilm.testing import InMemoryBackend, InMemoryNetwork

    arrivals = Arrivals(options)
    network = InMemoryNetwork(reactor)
    batch = options.get("style") == "batch"
    consumer: defer.Deferred[None] | None = None
    delivery: Any
    batch_delivery = False
    if batch:

        def on_batch(messages: Any) -> None:
            for message in messages:
                arrivals.arrived(message.contents, message.message_id)

        delivery = _batch_delivery(on_batch)
        batch_delivery = delivery is not None
        if delivery is None:

            def deliver_one(message: Any) -> None:
                arrivals.arrived(message.contents, message.message_id)

            delivery = deliver_one
    else:
        queue: defer.DeferredQueue[Any] = defer.DeferredQueue()
        delivery = queue

        async def consume() -> None:
            while not arrivals.done.called:
                message = await queue.get()
                arrivals.arrived(message.contents, message.message_id)

        consumer = defer.ensureDeferred(consume())
    sender = await ILM.create(InMemoryBackend(), lambda m: None, network.add_peer(1))
    receiver = await ILM.create(InMemoryBackend(), delivery, network.add_peer(2))
    while 2 not in sender.connected_peers():
        await task.deferLater(reactor, 0.001)
    last: Any = None
    cpu = cpu_seconds()
    if batch and options["mode"] == "throughput":
        size = options.get("size", 64)
        chunk = options.get("batch", 1000)
        payloads = [payload(i, size) for i in range(options["messages"])]
        start = now()
        for offset in range(0, len(payloads), chunk):
            last = sender.send_many(2, payloads[offset : offset + chunk])  # type: ignore[attr-defined]
            if (offset // chunk) % 10 == 9:
                await task.deferLater(reactor, 0)
    else:

        def send(contents: bytes) -> None:
            nonlocal last
            last = sender.send_to(2, contents)

        start, _ = await offer(reactor, send, options)
    figures = await arrivals.done
    receipt = await last
    if isinstance(receipt, list):
        receipt = receipt[-1]
    await receipt.acknowledged
    acked = now()
    figures.update(
        {
            "start": start,
            "acked": acked,
            "sender_cpu": cpu_seconds() - cpu,
            "sender_rss_mb": peak_rss_mb(),
            "batch_delivery": batch_delivery,
        }
    )
    # One process: its CPU is counted once, as the sender's.
    figures.pop("receiver_cpu")
    figures.pop("receiver_rss_mb")
    result(figures)
    if consumer is not None:
        consumer.cancel()
    await sender.shutdown()
    await receiver.shutdown()
