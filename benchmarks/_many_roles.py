"""
The many-peers scenario's processes: one ILM node under test (an
unmodified ``ILM`` with an ``SQLiteBackend``, ``synchronous=FULL``, on a
``StreamNetwork`` with one pre-shared key per peer), and client processes
each hosting many peers: real ILM nodes (in-memory stores), each with its
own ``StreamNetwork`` and authenticated TCP link, all on one reactor.

The orchestrator tells the clients (on standard input) when to offer load
and the node over which window to measure: ``GO <start> <end>`` and
``WINDOW <start> <end>`` in ``CLOCK_MONOTONIC`` seconds.  Each peer offers
``rate`` messages per second (one timer per client process, every
``tick`` seconds, sends each peer's due messages; the peers are spread over
ten phases of the send interval).  The node checks that
every peer's messages arrive exactly once and in order (message ids
consecutive per peer, payload index matching) and measures, over the
window: messages delivered per second, latency (send time to delivery),
its CPU time, and its RSS.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import resource
import struct
import sys
import threading
from collections import deque
from typing import Any

from zope.interface import implementer

from benchmarks._harness import (
    SIZE,
    cpu_seconds,
    latency_summary,
    now,
    peak_rss_mb,
    ready,
    result,
)
from ilm._frames import MESSAGES
from ilm.interfaces import IFrameReceiver, ILocalDelivery
from ilm.network._wire import CARRY, TAG_SIZE

NODE = 0


_CARRY_HEAD = struct.Struct(">IB")
_TAGGED_EXTRA = 1 + TAG_SIZE
"""A tagged link frame's length beyond its session frame: type byte, tag."""
# A one-message MESSAGES session frame's head: type, lane, first position,
# count, then the message's length (``ilm._frames``' layout, fused).
_ONE_MESSAGE_HEAD = struct.Struct(">BHQII")


def carry_frame(tag: Any, position: int, contents: bytes) -> bytes:
    """
    The tagged CARRY link frame of a MESSAGES session frame holding one
    message, ``contents`` at ``position``: the bytes
    ``ILMProtocol.send_session_frames`` writes for it.

    :param tag: the link's ``FrameSealer.tag`` (which counts the frame).
    """
    frame = _ONE_MESSAGE_HEAD.pack(MESSAGES, 0, position, 1, len(contents)) + contents
    return b"".join(
        (
            _CARRY_HEAD.pack(len(frame) + _TAGGED_EXTRA, CARRY),
            frame,
            tag(CARRY, frame),
        )
    )


@implementer(IFrameReceiver)
class LeanPeer:
    """
    A load-generating peer that speaks ILM's session protocol itself over a
    real :class:`ilm.network.StreamNetwork` link (pre-shared-key
    authentication and per-frame integrity tags, TCP, keepalives and
    reconnection all ILM's own): it sends its RESUME hello, one MESSAGES
    frame per message at consecutive positions, keeps what is not yet
    acknowledged, reads the node's ACKs (and NACKs) to stay within the
    node's window, and after a lost link resumes where the node's hello
    says and sends the rest again.  It stores nothing and keeps no
    Deferreds or receipts: only what the wire needs, so that one client
    process can offer far more messages per second than as many full ILM
    nodes.  The node it talks to cannot tell it from an ILM node.

    On the data path (:meth:`send`) it writes each tagged CARRY frame
    straight to its socket when the link's transport holds nothing
    unwritten (else through the transport, behind what it holds, so the
    frames stay in the order of their tags): the bytes are those
    ``ILMProtocol.send_session_frames`` writes, without the two ``epoll``
    changes and the reactor turn a buffered Twisted write costs per
    message.

    The session frames are encoded with ILM's own codec (``ilm._frames``)
    and tagged with the link's own ``FrameSealer`` (neither is public).
    """

    def __init__(self, network: Any) -> None:
        import uuid

        from ilm import _frames
        from ilm._session import PROTOCOL_VERSION, Hello

        self.network = network
        self.frames = _frames
        self.incarnation = uuid.uuid4().hex
        self._hello = Hello
        self._version = PROTOCOL_VERSION
        self.up = False
        self.sent = 0
        self.acked = 0
        self.window = 0
        self.held = 0
        self.acks = 0
        self.links = 0
        self.resumes = 0
        self.resent = 0
        #: Contents of positions ``acked + 1 .. sent``, oldest first.
        self.unacked: deque[bytes] = deque()
        self._transport: Any = None
        self._socket: Any = None
        self._tag: Any = None
        self._writer: Any = None

    def hello(self) -> bytes:
        return self.frames.encode_resume(
            self._hello(
                version=self._version,
                incarnation=self.incarnation,
                window=4096,
                window_bytes=4 * 1024 * 1024,
                first_unacked=self.acked + 1,
                last_position=self.sent,
                known_incarnation=None,
                delivered=0,
            )
        )

    def link_established(self, peer_id: Any) -> None:
        self.links += 1
        self.network.send_frames(NODE, [self.hello()])

    def link_lost(self, peer_id: Any, reason: Any) -> None:
        self.up = False
        self._transport = self._socket = self._tag = self._writer = None

    def frame_received(self, peer_id: Any, frame: bytes) -> None:
        frames = self.frames
        kind = frames.frame_type(frame)
        if kind == frames.ACK:
            self.acks += 1
            self._acknowledged(frames.decode_ack(frame)[0])
        elif kind == frames.RESUME:
            hello = frames.decode_resume(frame)
            self.window = hello.window
            if hello.reply_requested:
                self.network.send_frames(NODE, [self.hello()])
            if hello.known_incarnation == self.incarnation:
                self._acknowledged(hello.delivered)
            if not self.up:
                self.up = True
                self._attach()
                # Whatever was sent and not acknowledged goes again.
                self._resend(self.acked + 1)
        elif kind == frames.NACK:
            self._resend(frames.decode_nack(frame))
        else:
            raise SystemExit(f"unexpected frame type {kind} from the node")

    def _acknowledged(self, position: int) -> None:
        if position > self.sent:
            raise SystemExit(f"the node acknowledged {position} of {self.sent}")
        unacked = self.unacked
        for _ in range(position - self.acked):
            unacked.popleft()
        if position > self.acked:
            self.acked = position

    def _resend(self, position: int) -> None:
        if position <= self.acked or position > self.sent:
            return
        contents = list(self.unacked)[position - self.acked - 1 :]
        self.resumes += 1
        self.resent += len(contents)
        self.network.send_frames(
            NODE, self.frames.encode_messages(position, contents, 64 * 1024)
        )

    def _attach(self) -> None:
        """The link is open: keep what the data path writes with."""
        protocol = self.network.link(NODE)
        transport = protocol.transport
        writer = protocol._writer
        self._transport = transport
        self._writer = writer
        self._tag = writer.sealer.tag
        self._socket = transport.getHandle()

    def link_paused(self, peer_id: Any) -> None:
        pass

    def link_resumed(self, peer_id: Any) -> None:
        pass

    def send(self, contents: bytes) -> None:
        """Send ``contents`` at the next position."""
        sent = self.sent
        if self._tag is None or sent - self.acked >= self.window:
            # Counted apart: the node holds the peer back (never, at 100
            # msg/s and a 4,096-message window, unless it stops acking).
            self.held += 1
            return
        sent += 1
        self.sent = sent
        self.unacked.append(contents)
        data = carry_frame(self._tag, sent, contents)
        self._writer.sent = True
        transport = self._transport
        if transport._tempDataLen or transport.dataBuffer:
            transport.write(data)
            return
        try:
            written = self._socket.send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            # The transport finds out and reports the lost link.
            written = 0
        if written < len(data):
            transport.write(data[written:])


_STAMP = struct.Struct(">Qd")
_PADDING = b"." * (SIZE - _STAMP.size)


def stamp(index: int) -> bytes:
    """
    A 64-byte message: its index (per peer, from 0) and the time now, in
    binary (the node reads them back with one ``unpack``, its cheapest
    part of the measurement).
    """
    return _STAMP.pack(index, now()) + _PADDING


def key(peer_id: int) -> bytes:
    return hashlib.sha256(b"ilm benchmark peer %d" % peer_id).digest()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def schedstat() -> tuple[float, float]:
    """
    Seconds this process has run on a CPU, and has waited runnable for one
    (``/proc/self/schedstat``; zeros where the kernel does not say).
    """
    try:
        with open("/proc/self/schedstat") as f:
            ran, waited = f.read().split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def system_seconds() -> float:
    """CPU seconds this process spent in the kernel so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class GarbagePauses:
    """The cyclic garbage collector's pauses between start and stop."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.longest = 0.0
        self._began = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._event)

    def stop(self) -> None:
        gc.callbacks.remove(self._event)

    def _event(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = now()
            return
        pause = now() - self._began
        self.count += 1
        self.total += pause
        self.longest = max(self.longest, pause)


def _commands(reactor: Any, handle: Any) -> None:
    """Read command lines from stdin in a thread; run ``handle`` on each."""

    def read() -> None:
        for line in sys.stdin:
            reactor.callFromThread(handle, line.split())

    threading.Thread(target=read, daemon=True).start()


async def many_node(reactor: Any, options: dict[str, Any]) -> None:
    from twisted.internet import defer

    from ilm import ILM, Message, SQLiteBackend
    from ilm.network import StreamNetwork

    peers = options["peers"]
    # Per peer id (1 to peers): the last message id delivered.
    expected = [0] * (peers + 1)
    window: list[float] = [math.inf, -math.inf]
    latencies: list[float] = []
    state: dict[str, Any] = {"error": None}
    finished: defer.Deferred[None] = defer.Deferred()

    unpack_stamp = _STAMP.unpack_from
    clock = now

    def check(message: Message) -> None:
        # Per message: one clock read, one unpack, one list update.
        at = clock()
        source = message.source_id
        index, sent = unpack_stamp(message.contents)
        position = expected[source]
        if message.message_id != position + 1 or index != position:
            if state["error"] is None:
                state["error"] = (
                    f"peer {source}: message {message.message_id} (index {index}) "
                    f"after {position}: out of order, repeated or lost"
                )
            return
        expected[source] = position + 1
        if window[0] <= at <= window[1]:
            latencies.append(at - sent)

    @implementer(ILocalDelivery)
    class Target:
        """The node's application: ``deliver`` checks and times each message."""

        deliver = staticmethod(check)

    network = StreamNetwork(
        NODE,
        listen=["tcp:0:interface=127.0.0.1"],
        keys={i: key(i) for i in range(1, peers + 1)},
        reactor=reactor,
    )
    node = await ILM.create(
        SQLiteBackend(
            os.path.join(options["dir"], "node.sqlite"),
            synchronous="FULL",
            reactor=reactor,
        ),
        Target(),
        network,
    )
    marks: dict[str, float] = {}
    pauses = GarbagePauses()

    def mark_start() -> None:
        pauses.start()
        marks["cpu0"] = cpu_seconds()
        marks["sys0"] = system_seconds()
        marks["wait0"] = schedstat()[1]
        marks["busy0"], marks["ticks0"] = machine_ticks()
        marks["links0"] = len(node.connected_peers())
        marks["commits0"] = node.stats().commits

    def mark_end() -> None:
        marks["cpu1"] = cpu_seconds()
        marks["sys1"] = system_seconds()
        marks["wait1"] = schedstat()[1]
        marks["busy1"], marks["ticks1"] = machine_ticks()
        marks["rss"] = current_rss_mb()
        marks["links1"] = len(node.connected_peers())
        marks["commits1"] = node.stats().commits
        pauses.stop()
        finished.callback(None)

    def command(words: list[str]) -> None:
        if words and words[0] == "WINDOW":
            start, end = float(words[1]), float(words[2])
            window[:] = [start, end]
            reactor.callLater(max(0, start - now()), mark_start)
            reactor.callLater(max(0, end - now()), mark_end)

    _commands(reactor, command)
    ready(network.listening_addresses()[0].port)
    await finished
    seconds = window[1] - window[0]
    figures: dict[str, Any] = {
        "peers": peers,
        "links_at_start": marks["links0"],
        "links_at_end": marks["links1"],
        "delivered_per_s": len(latencies) / seconds,
        "delivered_total": sum(expected),
        "cpu_s": marks["cpu1"] - marks["cpu0"],
        "cpu_system_s": marks["sys1"] - marks["sys0"],
        "commits_per_s": (marks["commits1"] - marks["commits0"]) / seconds,
        "cpu_fraction": (marks["cpu1"] - marks["cpu0"]) / seconds,
        "rss_mb": marks["rss"],
        # Starved or not: how long the node waited, runnable, for a CPU, and
        # how busy the whole machine was (2 cores = 100 %).
        "cpu_wait_fraction": (marks["wait1"] - marks["wait0"]) / seconds,
        "machine_busy": (marks["busy1"] - marks["busy0"])
        / max(1, marks["ticks1"] - marks["ticks0"]),
        "peak_rss_mb": peak_rss_mb(),
        # The cyclic garbage collector's pauses in the window: how many,
        # their total and the longest, in milliseconds.
        "gc_collections": pauses.count,
        "gc_ms": pauses.total * 1e3,
        "gc_max_ms": pauses.longest * 1e3,
    }
    if latencies:
        figures.update(latency_summary(latencies))
    if state["error"]:
        figures["error"] = state["error"]
    result(figures)
    await defer.Deferred()  # until SIGTERM


async def many_clients(reactor: Any, options: dict[str, Any]) -> None:
    from twisted.internet import defer, task

    from ilm import ILM
    from ilm.network import StreamNetwork
    from ilm.testing import InMemoryBackend

    first, count = options["first"], options["count"]
    rate, tick = options.get("rate", 100.0), options.get("tick", 0.001)
    endpoint = f"tcp:host=127.0.0.1:port={options['port']}"
    lean = options.get("lean", False)
    nodes: list[Any] = []
    for peer_id in range(first, first + count):
        network = StreamNetwork(
            peer_id, peers={NODE: endpoint}, keys={NODE: key(peer_id)}, reactor=reactor
        )
        if lean:
            peer = LeanPeer(network)
            await network.start(peer)
            nodes.append(peer)
        else:
            nodes.append(await ILM.create(InMemoryBackend(), lambda m: None, network))

    def linked(node: Any) -> bool:
        return bool(node.up) if lean else NODE in node.connected_peers()

    deadline = now() + options.get("connect_timeout", 120)
    while not all(linked(n) for n in nodes):
        if now() > deadline:
            up = sum(linked(n) for n in nodes)
            raise SystemExit(f"only {up} of {count} peers linked")
        await task.deferLater(reactor, 0.05)
    go: defer.Deferred[tuple[float, float]] = defer.Deferred()

    def command(words: list[str]) -> None:
        if words and words[0] == "GO" and not go.called:
            go.callback((float(words[1]), float(words[2])))

    _commands(reactor, command)
    ready(count)
    start, end = await go
    wait = start - now()
    if wait > 0:
        await task.deferLater(reactor, wait)
    # Peers are spread over ``phases`` groups, each offset by a fraction of
    # the send interval, so that the load arrives smoothly rather than in
    # one burst of every peer per interval.
    phases = options.get("phases", 10)
    groups = [nodes[g::phases] for g in range(phases)]
    sent = [0] * phases
    refused: list[object] = []
    late = 0
    cpu = cpu_seconds()
    system = system_seconds()
    while (at := now()) < end:
        for group, members in enumerate(groups):
            due = int((at - start) * rate - group / phases) + 1
            if due - sent[group] > 2:
                late += 1
            while sent[group] < due:
                contents = stamp(sent[group])
                for node in members:
                    if lean:
                        node.send(contents)
                    else:
                        node.send_to(NODE, contents).addErrback(refused.append)
                sent[group] += 1
        wait = at + tick - now()
        await task.deferLater(reactor, max(0.0, wait))
    spent = cpu_seconds() - cpu
    system = system_seconds() - system
    result(
        {
            "sent": sum(n * len(m) for n, m in zip(sent, groups, strict=True)),
            "offered_per_s": sum(n * len(m) for n, m in zip(sent, groups, strict=True))
            / (end - start),
            "refused": len(refused) + sum(getattr(n, "held", 0) for n in nodes),
            "late_ticks": late,
            "acks": sum(getattr(n, "acks", 0) for n in nodes),
            "resent": sum(getattr(n, "resent", 0) for n in nodes),
            "cpu_s": spent,
            "cpu_system_s": system,
            "rss_mb": current_rss_mb(),
        }
    )
    await defer.Deferred()  # until SIGTERM
