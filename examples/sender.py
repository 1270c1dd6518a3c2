"""
The sending half of the guide's example (docs/guide.md): node 1, with an
SQLite store, sends messages 1 to N to node 2 over TCP and waits until node
2 has them all.

    python examples/sender.py --peer tcp:host=127.0.0.1:port=9002 \\
        --keys sender-keys.txt --count 1000

Kill it at any moment (SIGKILL included) and run it again: it neither loses
nor repeats anything it had handed over to ILM.  The store says how far it
got: ILM numbers the messages to each peer 1, 2, 3, ... in the order
``send_to`` was called, so ``last_message_id(peer)`` is the number of the
last message ILM owns; the sender carries on after it, then waits for the
acknowledgement of everything, including messages sent before a restart.

SIGTERM (or Ctrl-C) stops it cleanly; what it had handed over stays stored
and is sent after the next start.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import task
from twisted.logger import (
    Logger,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

from ilm import ILM
from ilm.errors import NotRunning
from ilm.network import StreamNetwork

RECEIVER = 2
log = Logger(namespace="example.sender")


def read_keys(path: str) -> dict[int | str, bytes]:
    """
    A keys file: one ``PEER_ID HEX_KEY`` per line (digits are integer ids).
    """
    keys: dict[int | str, bytes] = {}
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                peer, key = line.split()
                keys[int(peer) if peer.isdigit() else peer] = bytes.fromhex(key)
    return keys


def start_logging(json_path: str | None) -> None:
    """
    ILM logs with ``twisted.logger``: text on standard error, and every
    event as one JSON object per line in ``json_path`` if given.
    """
    observers = [textFileLogObserver(sys.stderr)]
    if json_path is not None:
        # recordSeparator="": plain JSON lines (the default starts each
        # record with the RFC 7464 separator, \x1e).
        observers.append(jsonFileLogObserver(open(json_path, "a"), recordSeparator=""))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


def payload(number: int) -> bytes:
    """
    The application's message number ``number``.
    """
    return b"message %d" % number


async def main(reactor: object, arguments: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python examples/sender.py")
    parser.add_argument("--peer", default="tcp:host=127.0.0.1:port=9002")
    parser.add_argument("--keys", default="sender-keys.txt")
    parser.add_argument("--store", default="sender.sqlite")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json-log", default=None)
    options = parser.parse_args(arguments)
    start_logging(options.json_log)

    network = StreamNetwork(
        1, peers={RECEIVER: options.peer}, keys=read_keys(options.keys)
    )
    # Node 1 receives nothing in this example; any callable will do.
    node = await ILM.create(options.store, print, network)
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", node.shutdown, 10
    )

    # What the store says: messages 1..done are ILM's already (stored,
    # sent or acknowledged), pending of them not yet acknowledged.
    done = node.last_message_id(RECEIVER)
    pending = node.pending_outbound().get(RECEIVER, 0)
    log.info(
        "{done} message(s) handed over before, {pending} of them not yet "
        "acknowledged; sending {left} more",
        done=done,
        pending=pending,
        left=max(0, options.count - done),
    )
    try:
        for number in range(done + 1, options.count + 1):
            # Stored once this fires: ILM owns the message from then on.
            # Waiting for each keeps the numbering simple: if one send
            # fails, nothing after it was handed over, and the next run
            # carries on after the last one stored.
            receipt = await node.send_to(RECEIVER, payload(number))
            assert receipt.message_id == number, (receipt, number)
        if options.count:
            # Acknowledgement is cumulative: the last message's receipt
            # covers every earlier one, also those sent before a restart.
            await node.receipt(RECEIVER, options.count).acknowledged
    except NotRunning:
        log.info("stopped before every message was acknowledged; run again")
        return
    log.info("all {count} message(s) acknowledged", count=options.count)
    await node.shutdown(10)


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])
