"""
A node under attack, as its own process (driven by
:mod:`tests.test_network_attacks`): node 2, an ILM node with an in-memory
store on a :class:`ilm.network.StreamNetwork` listening on loopback TCP,
with pre-shared keys for nodes 1 and 3 (:data:`KEYS`).  It sends every
message it is given back to its sender (so a peer can check that it keeps
exchanging messages with the node), and logs every event at info level and
above to ``--log`` as JSON lines (the test measures that log).

``--nofile N`` lowers the process's descriptor limit (``RLIMIT_NOFILE``)
to ``N`` before anything is opened.

The process prints ``READY <port>`` once it listens, and stops cleanly on
SIGTERM.

``--stranger`` runs a stranger instead: for ``--seconds`` it opens TCP
connections to ``--port`` from ``--source`` as fast as it can (in
``--threads`` threads, so that a connection attempt whose SYN was dropped
does not hold the others up) and keeps up to ``--hold`` of them open
(closing the oldest to open more), sending nothing; then it prints
``STRANGER <connections made> <failed attempts>``.

Usage: python tests/attack_node.py --port PORT --log PATH [--nofile N]
       [--handshake-timeout S]
       python tests/attack_node.py --stranger --port PORT --source ADDRESS
       [--seconds S] [--hold N] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import resource
import socket
import sys
import threading
import time
from typing import Any

NODE = 2
KEYS = {
    1: b"attack test key shared by 1 & 2",
    3: b"attack test key shared by 2 & 3",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log")
    parser.add_argument("--nofile", type=int, default=None)
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    parser.add_argument("--stranger", action="store_true")
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--hold", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    return parser.parse_args(argv)


def stranger(options: argparse.Namespace) -> None:
    held: collections.deque[socket.socket] = collections.deque()
    counts = {"made": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + options.seconds

    def connect() -> None:
        while time.monotonic() < deadline:
            s = socket.socket()
            try:
                s.settimeout(1.0)
                s.bind((options.source, 0))
                s.connect(("127.0.0.1", options.port))
            except OSError:
                s.close()
                with lock:
                    counts["failed"] += 1
                continue
            with lock:
                counts["made"] += 1
                held.append(s)
                oldest = held.popleft() if len(held) > options.hold else None
            if oldest is not None:
                oldest.close()

    threads = [threading.Thread(target=connect) for _ in range(options.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for s in held:
        s.close()
    print(f"STRANGER {counts['made']} {counts['failed']}", flush=True)


async def run(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import defer

    from ilm import ILM, Message
    from ilm.network import LinkSettings, StreamNetwork
    from ilm.testing import InMemoryBackend

    network = StreamNetwork(
        NODE,
        listen=[f"tcp:{options.port}:interface=127.0.0.1"],
        keys=KEYS,
        settings=LinkSettings(handshake_timeout=options.handshake_timeout),
        reactor=reactor,
    )
    node: ILM | None = None

    def echo(message: Message) -> None:
        assert node is not None
        node.send_to(message.source_id, message.contents)

    node = await ILM.create(InMemoryBackend(), echo, network)
    print(f"READY {network.listening_addresses()[0].port}", flush=True)
    stopping: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", stopping.callback, None)
    await stopping
    await node.shutdown()


def main(argv: list[str]) -> None:
    options = parse(argv)
    if options.stranger:
        stranger(options)
        return
    if options.nofile is not None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (options.nofile, hard))
    from twisted.internet import defer, task
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        jsonFileLogObserver,
    )

    log_file = open(options.log, "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                jsonFileLogObserver(log_file),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ],
        discardBuffer=True,
        redirectStandardIO=False,
    )
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
