"""
ILM over the stream network between two OS processes on TCP loopback, one
way, against raw Twisted framing measured in the same run.

Throughput: the sender calls ``send_to`` for ``--messages`` messages of
``--size`` bytes (in bursts of ``--burst`` per reactor turn); the clock runs
from the first ``send_to`` to the last delivery at the receiver (both
processes read the same monotonic clock), and to the last acknowledgement at
the sender.  The receiver checks that every message arrives exactly once and
in order.

Latency: the sender offers ``--rate`` messages per second for
``--seconds``; each payload carries the time of its ``send_to`` call, and
the receiver records delivery time minus that.  p50, p99 and max are
reported.

Baseline: the same messages between the same kind of two processes over
TCP loopback with Twisted's ``Int32StringReceiver`` (``sendString`` /
``stringReceived``): what the reactor, the socket and the framing alone
cost.  No storage, no acknowledgement, no authentication.

ILM runs with pre-shared-key authentication and the backend of
``--backend``: ``memory`` (``InMemoryBackend``) or ``sqlite``
(``ilm.backends.SQLiteBackend(path)``, in a temporary directory, when that
backend is installed).  Its link frames carry integrity tags
(``LinkSettings.frame_integrity``) unless ``--frame-integrity off``, which
turns them off on both nodes.

Usage: python benchmarks/stream_network.py [--mode throughput|latency|both]
       [--backend memory|sqlite] [--runs 3] [--messages 200000] [--size 64]
       [--rate 1000] [--seconds 5] [--frame-integrity on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

KEY = b"benchmark pre-shared key 32 byte"
_STAMP = struct.Struct(">d")


def _now() -> float:
    # CLOCK_MONOTONIC: one clock for every process on the machine.
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _result(values: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(values), flush=True)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50": _percentile(latencies, 0.50),
        "p99": _percentile(latencies, 0.99),
        "max": max(latencies),
        "count": len(latencies),
    }


def _payloads(count: int, size: int) -> list[bytes]:
    return [b"%0*d" % (size, i) for i in range(count)]


def _stamped(size: int) -> bytes:
    return _STAMP.pack(_now()) + b"." * max(0, size - _STAMP.size)


# -- ILM processes ------------------------------------------------------------


def _backend(kind: str, directory: str) -> Any:
    if kind == "memory":
        from ilm.testing import InMemoryBackend

        return InMemoryBackend()
    from ilm.backends import SQLiteBackend

    return SQLiteBackend(os.path.join(directory, "ilm.sqlite"))


class _Arrivals:
    """
    A receiver's side of a run: checks each message in throughput mode
    (exactly once, in order), records latencies in latency mode, and prints
    the RESULT after the last one.  A wrong message fails ``done`` (the
    process then ends without a RESULT) instead of raising, which ILM would
    take as a failed delivery and retry.
    """

    def __init__(self, options: argparse.Namespace, cpu: bool) -> None:
        from twisted.internet import defer

        self.options = options
        self.throughput = options.mode == "throughput"
        self.expected = (
            _payloads(options.messages, options.size) if self.throughput else []
        )
        self.latencies: list[float] = []
        self.count = 0
        self.cpu = cpu
        self.cpu_start = 0.0
        self.done: defer.Deferred[None] = defer.Deferred()

    def arrived(self, contents: bytes, position: int | None = None) -> None:
        now = _now()
        count = self.count
        if count == 0:
            self.cpu_start = time.process_time()
        if self.throughput:
            if contents != self.expected[count] or position not in (None, count + 1):
                if not self.done.called:
                    self.done.errback(
                        AssertionError(f"out of order or corrupt at {count + 1}")
                    )
                return
        else:
            self.latencies.append(now - _STAMP.unpack_from(contents)[0])
        self.count = count = count + 1
        if count == self.options.messages:
            if not self.throughput:
                _result(_latency_summary(self.latencies))
            elif self.cpu:
                _result(
                    {"last": now, "receiver_cpu": time.process_time() - self.cpu_start}
                )
            else:
                _result({"last": now})
            self.done.callback(None)


def _settings(options: argparse.Namespace) -> Any:
    from ilm.network import LinkSettings

    return LinkSettings(frame_integrity=options.frame_integrity == "on")


async def ilm_receiver(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import defer

    from ilm import ILM, Message
    from ilm.network import StreamNetwork

    arrivals = _Arrivals(options, cpu=True)

    def deliver(message: Message) -> None:
        arrivals.arrived(message.contents, message.message_id)

    with tempfile.TemporaryDirectory() as directory:
        network = StreamNetwork(
            2,
            listen=["tcp:0:interface=127.0.0.1"],
            keys={1: KEY},
            settings=_settings(options),
            reactor=reactor,
        )
        node = await ILM.create(_backend(options.backend, directory), deliver, network)
        print(f"READY {network.listening_addresses()[0].port}", flush=True)
        await arrivals.done
        # Stay up until the sender has every acknowledgement (SIGTERM).
        await defer.Deferred()
        await node.shutdown()


async def ilm_sender(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import task

    from ilm import ILM
    from ilm.network import StreamNetwork

    with tempfile.TemporaryDirectory() as directory:
        network = StreamNetwork(
            1,
            peers={2: f"tcp:host=127.0.0.1:port={options.port}"},
            keys={2: KEY},
            settings=_settings(options),
            reactor=reactor,
        )
        node = await ILM.create(_backend(options.backend, directory), print, network)
        while 2 not in node.connected_peers():
            await task.deferLater(reactor, 0.001)
        last: Any = None
        cpu = time.process_time()
        if options.mode == "throughput":
            payloads = _payloads(options.messages, options.size)
            start = _now()
            for offset in range(0, options.messages, options.burst):
                for p in payloads[offset : offset + options.burst]:
                    last = node.send_to(2, p)
                await task.deferLater(reactor, 0)
        else:
            start = _now()
            interval = 1.0 / options.rate
            sent = 0
            while sent < options.messages:
                due = start + sent * interval
                wait = due - _now()
                if wait > 0:
                    await task.deferLater(reactor, wait)
                while sent < options.messages and start + sent * interval <= _now():
                    last = node.send_to(2, _stamped(options.size))
                    sent += 1
        receipt = await last
        await receipt.acknowledged
        acked = _now()
        _result(
            {"start": start, "acked": acked, "sender_cpu": time.process_time() - cpu}
        )
        await node.shutdown()


# -- raw baseline processes ------------------------------------------------------


async def raw_receiver(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import defer, endpoints, protocol
    from twisted.protocols.basic import Int32StringReceiver

    arrivals = _Arrivals(options, cpu=False)

    class Receiver(Int32StringReceiver):
        MAX_LENGTH = 1 << 20

        def stringReceived(self, string: bytes) -> None:
            arrivals.arrived(string)

    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(protocol.Factory.forProtocol(Receiver))
    print(f"READY {port.getHost().port}", flush=True)
    await arrivals.done
    await defer.Deferred()


async def raw_sender(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import endpoints, protocol, task
    from twisted.protocols.basic import Int32StringReceiver

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", options.port)
    sender = await endpoint.connect(protocol.Factory.forProtocol(Int32StringReceiver))
    sender.transport.setTcpNoDelay(True)  # as ILM's links do
    if options.mode == "throughput":
        payloads = _payloads(options.messages, options.size)
        start = _now()
        for offset in range(0, options.messages, options.burst):
            for p in payloads[offset : offset + options.burst]:
                sender.sendString(p)
            await task.deferLater(reactor, 0)
    else:
        start = _now()
        interval = 1.0 / options.rate
        sent = 0
        while sent < options.messages:
            wait = start + sent * interval - _now()
            if wait > 0:
                await task.deferLater(reactor, wait)
            while sent < options.messages and start + sent * interval <= _now():
                sender.sendString(_stamped(options.size))
                sent += 1
    _result({"start": start, "acked": None})
    # Let the kernel take the last writes before the process exits.
    await task.deferLater(reactor, 0.5)
    sender.transport.loseConnection()


ROLES = {
    "ilm-receiver": ilm_receiver,
    "ilm-sender": ilm_sender,
    "raw-receiver": raw_receiver,
    "raw-sender": raw_sender,
}


def run_role(options: argparse.Namespace) -> None:
    from twisted.internet import defer, task

    task.react(
        lambda reactor: defer.ensureDeferred(ROLES[options.role](reactor, options))
    )


# -- orchestration ------------------------------------------------------------------


def _spawn(
    role: str, options: argparse.Namespace, port: int | None = None
) -> subprocess.Popen[str]:
    arguments = [
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        role,
        "--mode",
        options.mode_now,
        "--backend",
        options.backend,
        "--messages",
        str(options.count_now),
        "--size",
        str(options.size),
        "--burst",
        str(options.burst),
        "--rate",
        str(options.rate),
        "--frame-integrity",
        options.frame_integrity,
    ]
    if port is not None:
        arguments += ["--port", str(port)]
    return subprocess.Popen(arguments, stdout=subprocess.PIPE, text=True)


def _read(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"process {process.args[3]} ended without {prefix.strip()}")


def one_run(kind: str, options: argparse.Namespace) -> dict[str, Any]:
    """
    Run one receiver and one sender process; return their merged results.
    """
    receiver = _spawn(f"{kind}-receiver", options)
    try:
        port = int(_read(receiver, "READY "))
        sender = _spawn(f"{kind}-sender", options, port)
        try:
            sent = json.loads(_read(sender, "RESULT "))
            received = json.loads(_read(receiver, "RESULT "))
            sender.wait(timeout=120)
        finally:
            if sender.poll() is None:
                sender.kill()
    finally:
        receiver.send_signal(signal.SIGTERM)
        try:
            receiver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            receiver.kill()
    return {**sent, **received}


def throughput(options: argparse.Namespace) -> None:
    options.mode_now, options.count_now = "throughput", options.messages
    rows = []
    for index in range(options.runs):
        raw = one_run("raw", options)
        ilm = one_run("ilm", options)
        raw_rate = options.messages / (raw["last"] - raw["start"])
        delivered = options.messages / (ilm["last"] - ilm["start"])
        acknowledged = options.messages / (ilm["acked"] - ilm["start"])
        rows.append((raw_rate, delivered, acknowledged))
        elapsed = ilm["acked"] - ilm["start"]
        print(
            f"run {index + 1}: ILM {delivered:,.0f} msg/s delivered "
            f"({acknowledged:,.0f} msg/s acknowledged; CPU busy: sender "
            f"{ilm['sender_cpu'] / elapsed:.0%}, receiver "
            f"{ilm['receiver_cpu'] / elapsed:.0%}); raw Int32StringReceiver "
            f"{raw_rate:,.0f} msg/s; ratio {delivered / raw_rate:.2f}",
            flush=True,
        )
    raw_rate = statistics.median(r[0] for r in rows)
    delivered = statistics.median(r[1] for r in rows)
    acknowledged = statistics.median(r[2] for r in rows)
    target = 150_000 if options.backend == "memory" else 50_000
    print(
        f"throughput, median of {options.runs}: {options.messages:,} x "
        f"{options.size} B one way, two processes, TCP loopback, {options.backend} "
        f"backend, frame integrity {options.frame_integrity}: ILM "
        f"{delivered:,.0f} msg/s delivered, {acknowledged:,.0f} msg/s "
        f"acknowledged; baseline {raw_rate:,.0f} msg/s; ILM/baseline "
        f"{delivered / raw_rate:.2f}; target {target:,} msg/s: "
        f"{'met' if delivered >= target else 'NOT met'}"
    )


def sqlite_commit_latency(count: int, rate: float, size: int) -> dict[str, float]:
    """
    The storage baseline for the SQLite latency run: one single-row
    transaction per message, at the same rate, in a WAL file with
    ``synchronous=FULL`` (what any program making each message durable in
    SQLite on this disk waits for), measured as commit durations.
    """
    import sqlite3

    with tempfile.TemporaryDirectory() as directory:
        conn = sqlite3.connect(os.path.join(directory, "baseline.sqlite"))
        conn.isolation_level = None
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        payload = b"x" * size
        durations = []
        start = time.perf_counter()
        for key in range(count):
            due = start + key / rate
            while (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            began = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (?, ?)", (key, payload))
            conn.execute("COMMIT")
            durations.append(time.perf_counter() - began)
        conn.close()
    return _latency_summary(durations)


def latency(options: argparse.Namespace) -> None:
    options.mode_now = "latency"
    options.count_now = int(options.rate * options.seconds)
    rows = []
    disks = []
    for index in range(options.runs):
        raw = one_run("raw", options)
        ilm = one_run("ilm", options)
        rows.append((raw, ilm))
        disk = ""
        if options.backend == "sqlite":
            commits = sqlite_commit_latency(
                options.count_now, options.rate, options.size
            )
            disks.append(commits)
            disk = (
                f"; one SQLite FULL commit per message: p50 "
                f"{commits['p50'] * 1e3:.3f} ms, p99 {commits['p99'] * 1e3:.3f} ms"
            )
        print(
            f"run {index + 1}: ILM p50 {ilm['p50'] * 1e3:.3f} ms, p99 "
            f"{ilm['p99'] * 1e3:.3f} ms, max {ilm['max'] * 1e3:.1f} ms; raw "
            f"Int32StringReceiver p50 {raw['p50'] * 1e3:.3f} ms, p99 "
            f"{raw['p99'] * 1e3:.3f} ms{disk}",
            flush=True,
        )
    if disks:
        print(
            f"storage baseline, median of {options.runs}: one SQLite FULL commit "
            f"per message at {options.rate:,.0f}/s: p50 "
            f"{statistics.median(d['p50'] for d in disks) * 1e3:.3f} ms, p99 "
            f"{statistics.median(d['p99'] for d in disks) * 1e3:.3f} ms (a floor "
            f"for ILM's p99: a message is sent only once its commit is durable)"
        )
    p50 = statistics.median(r[1]["p50"] for r in rows)
    p99 = statistics.median(r[1]["p99"] for r in rows)
    raw50 = statistics.median(r[0]["p50"] for r in rows)
    raw99 = statistics.median(r[0]["p99"] for r in rows)
    if options.backend == "memory":
        targets, met = "targets p50 < 1 ms, p99 < 5 ms", p50 < 1e-3 and p99 < 5e-3
    else:
        targets, met = "target p99 < 5 ms", p99 < 5e-3
    print(
        f"latency, median of {options.runs}: {options.count_now:,} x "
        f"{options.size} B at {options.rate:,.0f} msg/s, {options.backend} backend, "
        f"frame integrity {options.frame_integrity}, "
        f"send_to to delivery: ILM p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms; "
        f"baseline p50 {raw50 * 1e3:.3f} ms, p99 {raw99 * 1e3:.3f} ms; ILM/baseline "
        f"p50 {p50 / raw50:.1f}x, p99 {p99 / raw99:.1f}x; {targets}: "
        f"{'met' if met else 'NOT met'}"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=["throughput", "latency", "both"], default="both"
    )
    parser.add_argument("--backend", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--frame-integrity", choices=["on", "off"], default="on")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.role is not None:
        run_role(options)
        return
    if options.mode in ("throughput", "both"):
        throughput(options)
    if options.mode in ("latency", "both"):
        latency(options)


if __name__ == "__main__":
    main(sys.argv[1:])
