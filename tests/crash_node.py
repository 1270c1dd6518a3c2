"""
One node of the crash test with real processes (driven by
:mod:`tests.crash_soak`): a sender or a receiver, each with its own SQLite
store, linked by a :class:`ilm.network.StreamNetwork` over loopback TCP
with a pre-shared key.  The driver SIGKILLs these processes at random
moments and starts them again on the same store and log.

Each node appends what it did to its own log, one line per event, flushed
at once (a SIGKILL keeps what was written: it stays in the page cache).

Sender (node 1) log::

    start pid PID next N            the process starts; it sends N first
    running incarnation I           its store is open, its incarnation is I
    accepted N position P incarnation I   send_to(2, b"N") fired: stored at P
    outbox-full N                   send_to refused N with OutboxFull
    finishing next N                the stop file appeared: no more sends
    finished                        shutdown drained everything and closed

The sender sends the numbers 1, 2, 3, ... (``contents`` is the number in
ASCII) as fast as ILM accepts them, in bursts; when ``send_to`` refuses with
``OutboxFull`` it waits for its latest receipt's acknowledgement.  On a
restart it goes on after the last number its log says was accepted: a
number that the store accepted but the log did not record before the kill
is sent again, as a new message at a new position (an application-level
resend, not an ILM duplicate).  Once the stop file exists it stops sending
and shuts down, which waits until the receiver has acknowledged everything.

Receiver (node 2) log::

    start pid PID marks I:D,...     its store is open: the delivery marks
                                    ILM resumes from; "marks -" if none
    running                         its store is open and it listens
    delivered I P N                 deliver() got position P of sender
                                    incarnation I, contents N
    address-in-use                  the port was taken: exit status 75
    stopped                         a clean shutdown after SIGTERM

A line that a kill cut short is ended with `` !torn`` by the next process.

Usage: python tests/crash_node.py sender|receiver --store PATH --log PATH
       --port PORT [--stop PATH] [--outbox N] [--burst N] [--window N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

SENDER = 1
RECEIVER = 2
KEY = b"crash test pre-shared key 32 b.."
EXIT_ADDRESS_IN_USE = 75
TORN = "!torn"
TORN_BYTES = TORN.encode("ascii")


class LineLog:
    """
    An append-only log of lines, each flushed to the OS as it is written.
    """

    def __init__(self, path: str) -> None:
        torn = False
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(path, "a", encoding="ascii")
        if torn:
            # The last process died in the middle of a line: mark it torn
            # (the checker counts and skips such lines; a torn number could
            # look like a whole one) and start the next line on its own.
            self.write(" " + TORN)

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def last_accepted(path: str) -> int:
    """
    :return: the number in the last ``accepted`` line of the sender's log at
        ``path`` (0 if none): read backwards from the end, so that a restart
        costs the same however long the log has grown.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        position = f.seek(0, os.SEEK_END)
        data = b""
        while position > 0:
            step = min(65536, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
            # Whatever follows the last newline is a line torn by a kill:
            # not recorded, so its number is sent again.  The first piece
            # may be the end of an earlier line unless the file starts there.
            lines = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]
            for line in reversed(lines if position == 0 else lines[1:]):
                words = line.split()
                # A line a kill cut short is marked torn when the log is
                # reopened; cut after "incarn", it also has six words.
                if (
                    len(words) == 6
                    and words[0] == b"accepted"
                    and words[-1] != TORN_BYTES
                ):
                    return int(words[1])
    return 0


def _settings() -> Any:
    from ilm.network import Backoff, LinkSettings

    # Redial quickly: the peer is back within a second of a kill.
    return LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.2))


def _log_to_stderr() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )


async def run_sender(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet import task
    from twisted.python.failure import Failure

    from ilm import ILM, Config, Receipt
    from ilm.backends import SQLiteBackend
    from ilm.errors import OutboxFull
    from ilm.network import StreamNetwork

    log = LineLog(options.log)
    number = last_accepted(options.log) + 1
    log.write(f"start pid {os.getpid()} next {number}")
    network = StreamNetwork(
        SENDER,
        peers={RECEIVER: f"tcp:host=127.0.0.1:port={options.port}"},
        keys={RECEIVER: KEY},
        settings=_settings(),
        reactor=reactor,
    )
    node = await ILM.create(
        SQLiteBackend(options.store, reactor=reactor),
        lambda message: None,
        network,
        config=Config(max_outbox_messages=options.outbox, window=options.window),
        clock=reactor,
    )
    incarnation = node.incarnation
    log.write(f"running incarnation {incarnation}")

    def accepted(receipt: Receipt, number: int) -> Receipt:
        log.write(
            f"accepted {number} position {receipt.message_id} incarnation {incarnation}"
        )
        return receipt

    refused: list[object] = []

    def full(reason: Failure) -> None:
        refused.append(reason.trap(OutboxFull))

    latest: Receipt | None = None
    while not os.path.exists(options.stop):
        refused.clear()
        last = None
        for _ in range(options.burst):
            d = node.send_to(RECEIVER, b"%d" % number)
            d.addErrback(full)
            if refused:
                # Refused at once: nothing was stored, and every later send
                # would be refused too until acknowledgements free room.
                break
            d.addCallback(accepted, number)
            last = d
            number += 1
        if last is not None:
            latest = await last
        if refused:
            log.write(f"outbox-full {number}")
            if latest is not None:
                await latest.acknowledged
            else:
                # Restarted with a full outbox: no receipt of this process
                # to wait on yet.
                await task.deferLater(reactor, 0.05)
    log.write(f"finishing next {number}")
    await node.shutdown(timeout=options.drain_timeout)
    log.write("finished")


async def run_receiver(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.error import CannotListenError
    from zope.interface import implementer

    from ilm import (
        ILM,
        CommitResult,
        Config,
        Message,
        PeerId,
        StoreBatch,
        StoredState,
    )
    from ilm.backends import SQLiteBackend
    from ilm.interfaces import IBackend
    from ilm.network import StreamNetwork

    log = LineLog(options.log)

    @implementer(IBackend)
    class MarkLoggingBackend:
        """
        The SQLite store, logging the delivery marks ILM resumes from as it
        opens (before any delivery can happen).
        """

        def __init__(self, backend: SQLiteBackend) -> None:
            self._backend = backend

        def open(self) -> Deferred[StoredState]:
            return self._backend.open().addCallback(self._opened)

        def _opened(self, state: StoredState) -> StoredState:
            marks = [
                f"{record.incarnation}:{record.delivered}"
                for record in state.inbound
                if record.peer_id == SENDER and not record.retired
            ]
            log.write(f"start pid {os.getpid()} marks {','.join(marks) or '-'}")
            return state

        def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
            return self._backend.commit(batch)

        def read_outbound(
            self, peer_id: PeerId, after: int, limit: int, max_bytes: int
        ) -> Deferred[list[bytes]]:
            return self._backend.read_outbound(peer_id, after, limit, max_bytes)

        def close(self) -> Deferred[None]:
            return self._backend.close()

    def deliver(message: Message) -> None:
        if message.source_id != SENDER:
            raise AssertionError(f"message from unexpected node {message!r}")
        log.write(
            f"delivered {message.source_incarnation} {message.message_id} "
            f"{int(message.contents)}"
        )

    network = StreamNetwork(
        RECEIVER,
        listen=[f"tcp:{options.port}:interface=127.0.0.1"],
        keys={SENDER: KEY},
        settings=_settings(),
        reactor=reactor,
    )
    try:
        node = await ILM.create(
            MarkLoggingBackend(SQLiteBackend(options.store, reactor=reactor)),
            deliver,
            network,
            config=Config(window=options.window),
            clock=reactor,
        )
    except CannotListenError:
        log.write("address-in-use")
        raise SystemExit(EXIT_ADDRESS_IN_USE) from None

    async def stop() -> None:
        await node.shutdown()
        log.write("stopped")

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(stop())
    )
    log.write("running")
    await Deferred()  # until SIGTERM (or SIGKILL)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["sender", "receiver"])
    parser.add_argument("--store", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stop", help="sender: stop sending once this file exists")
    parser.add_argument("--outbox", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=1_000)
    parser.add_argument("--window", type=int, help="default: Config().window")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    options = parser.parse_args(argv)
    if options.window is None:
        from ilm import Config

        options.window = Config().window
    if options.role == "sender" and options.stop is None:
        parser.error("the sender needs --stop")
    _log_to_stderr()
    from twisted.internet import defer, task

    run = run_sender if options.role == "sender" else run_receiver
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
