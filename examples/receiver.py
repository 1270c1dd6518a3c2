"""
The receiving half of the guide's example (docs/guide.md): node 2, with an
SQLite store, listens on TCP and applies every message it receives to the
application's own SQLite database, exactly once.

    python examples/receiver.py --listen tcp:9002 --keys receiver-keys.txt

ILM delivers every message at least once, and exactly once except in one
window: a process killed after the application took a message but before
ILM recorded it gets the message again after its restart.  The application
closes that window itself: it records ``(source_id, source_incarnation,
message_id)`` in the same transaction as the message's effect, and ignores
a message whose triple it has already recorded.

SIGTERM (or Ctrl-C) stops the node cleanly; SIGKILL loses nothing.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from twisted.internet import defer, task
from twisted.logger import (
    Logger,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

from ilm import ILM
from ilm.interfaces import ILocalDelivery, IMessage
from ilm.network import StreamNetwork

SENDER = 1
log = Logger(namespace="example.receiver")


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


@implementer(ILocalDelivery)
class Application:
    """
    The application: it stores each message in its own SQLite database.

    The primary key ``(source, incarnation, message_id)`` is the
    de-duplication: a message delivered again after a crash (the
    at-least-once window) is ignored, in the same transaction that would
    have applied it.
    """

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS messages (source TEXT, incarnation TEXT, "
            "message_id INTEGER, contents BLOB, "
            "PRIMARY KEY (source, incarnation, message_id))"
        )

    def deliver(self, message: IMessage) -> None:
        # Returning normally tells ILM the message is taken; raising would
        # make ILM deliver it again later, holding this sender's stream.
        # repr() keeps the id 1 and the id "1" apart in a TEXT column.
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)",
            (
                repr(message.source_id),
                message.source_incarnation,  # type: ignore[attr-defined]
                message.message_id,
                message.contents,
            ),
        )
        if cursor.rowcount == 0:
            log.info(
                "message {message_id} from {source!r} was already applied: ignored",
                message_id=message.message_id,
                source=message.source_id,
            )


async def main(reactor: object, arguments: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python examples/receiver.py")
    parser.add_argument("--listen", default="tcp:9002:interface=127.0.0.1")
    parser.add_argument("--keys", default="receiver-keys.txt")
    parser.add_argument("--store", default="receiver.sqlite")
    parser.add_argument("--database", default="application.sqlite")
    parser.add_argument("--json-log", default=None)
    options = parser.parse_args(arguments)
    start_logging(options.json_log)

    application = Application(options.database)
    network = StreamNetwork(2, listen=[options.listen], keys=read_keys(options.keys))
    node = await ILM.create(options.store, application, network)
    # SIGTERM and SIGINT stop the reactor; before it stops, the node stops
    # accepting, lets a delivery in progress finish and its mark commit,
    # closes its links and its store.
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", node.shutdown, 10
    )
    await defer.Deferred()  # run until stopped


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])
