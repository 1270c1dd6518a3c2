"""
One node of ``ilm demo``, run as its own process by the driver
(:mod:`ilm._demo._driver`) and restarted by it after each SIGKILL::

    python -m ilm._demo._node --id 1 --peer 2 --store PATH --records PATH
        --key-file PATH --dial tcp:host=127.0.0.1:port=P --messages N --credit C

The node is an ordinary ILM application: an :class:`ilm.ILM` with an
:class:`ilm.SQLiteBackend` store, on an :class:`ilm.network.StreamNetwork`
that listens on an ephemeral loopback port and dials its peer (through the
driver's relay), authenticated with the pre-shared key in ``--key-file``.

- Its sender (:class:`DemoSender`) hands the numbers 1..N to ``send_to``,
  each in a checksummed message stamped with ``time.monotonic_ns()``.
- Its delivery target (:class:`DeliveryRecorder`) checks each message and
  appends a record of it to the ``--records`` file before returning.

It talks to the driver through its standard streams:

- stdout, one JSON object per line: ``{"event": "ready", ...}`` once its
  store is open and it listens (with its ``port``, its ``pid`` and what the
  store says was ``accepted``); ``{"event": "status", ...}`` every 50 ms and
  at once when a link comes up (``sent``, ``accepted``, ``pending``,
  ``delivered``, ``linked``, ``links``); ``{"event": "error", ...}`` before
  exiting with status 1; ``{"event": "stopped", ...}`` after a clean
  shutdown.
- stdin: ``credit N`` lines (the sender may go up to number N); end of file
  means the driver is gone (killed before it could clean up): the node
  stops at once and removes the run's ``--directory``.
- stderr: ILM's log, warnings and worse.
- SIGTERM: a clean shutdown (``ILM.shutdown``), then exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import ILogObserver
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import ILM, Message, Receipt
from ilm._demo._processes import log_problems_only
from ilm._demo._records import RecordWriter, decode, encode

STATUS_INTERVAL = 0.05


class PositionMismatch(Exception):
    """
    ILM stored a number at another position than the sender expected: the
    sender would repeat or skip numbers.
    """


class DemoSender:
    """
    Hands the numbers 1..``messages`` to ``node.send_to(peer, ...)``, in
    order, restart-safe.

    **Restart safety.**  ILM stores messages to a peer at consecutive
    positions 1, 2, 3, ... in the order ``send_to`` is called, so the sender
    hands number *n* over only right after *n* - 1, and every number is stored
    at the position equal to it (checked on each receipt).  After a SIGKILL,
    the restarted process starts from ``node.last_message_id(peer)``: the
    highest position the store holds, which counts every message the store
    accepted, including those whose ``send_to`` Deferred had not fired yet
    (or whose acceptance nobody heard of) when the process died.  So it goes
    on with exactly the first number the store does not hold: nothing
    accepted is sent twice, nothing is skipped.  A number handed to
    ``send_to`` but not stored when the process died is simply sent again,
    as the same number at the same position.

    **Flow control.**  At most ``in_flight`` messages await the peer's
    acknowledgement (``node.receipt(peer, id).acknowledged``, which also
    works for messages stored before a restart); ``send_to`` is called in
    bursts of ``burst``, each awaited until stored.  The driver limits how
    far the sender may go with :meth:`set_credit`.

    :param now_ns: the clock stamped into each message: CLOCK_MONOTONIC,
        which every process on the machine shares.
    """

    def __init__(
        self,
        node: ILM,
        peer: int,
        messages: int,
        credit: int,
        *,
        burst: int = 512,
        in_flight: int = 8192,
        now_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._node = node
        self._peer = peer
        self._messages = messages
        self._credit = credit
        self._burst = burst
        self._in_flight = in_flight
        self._now_ns = now_ns
        self._credit_waiter: Deferred[None] | None = None
        self.sent = node.last_message_id(peer)

    @property
    def accepted(self) -> int:
        """The highest number the store holds."""
        return self._node.last_message_id(self._peer)

    def set_credit(self, credit: int) -> None:
        """
        Let the sender go up to number ``credit``.
        """
        self._credit = max(self._credit, credit)
        waiter, self._credit_waiter = self._credit_waiter, None
        if waiter is not None:
            waiter.callback(None)

    @staticmethod
    def _stored(receipt: Receipt, number: int) -> Receipt:
        if receipt.message_id != number:
            raise PositionMismatch(
                f"number {number} was stored at position {receipt.message_id}"
            )
        return receipt

    async def run(self) -> None:
        """
        Send until every number is stored.

        :raises PositionMismatch: if a number was stored at another position.
        :raises ilm.errors.ILMError: if ``send_to`` failed.
        """
        node, peer = self._node, self._peer
        self.sent = node.last_message_id(peer)
        while self.sent < self._messages:
            limit = min(self._credit, self._messages)
            if self.sent >= limit:
                self._credit_waiter = Deferred()
                await self._credit_waiter
                continue
            oldest = self.sent - self._in_flight
            if oldest >= 1:
                await node.receipt(peer, oldest).acknowledged
            burst: list[Deferred[Receipt]] = []
            for _ in range(min(self._burst, limit - self.sent)):
                number = self.sent + 1
                d = node.send_to(peer, encode(number, self._now_ns()))
                self.sent = number
                burst.append(d.addCallback(self._stored, number))
            # Wait until the burst is stored (every Deferred's failure is
            # consumed here, and the first one raised).
            for ok, result in await DeferredList(burst, consumeErrors=True):
                if not ok:
                    assert isinstance(result, Failure)
                    result.raiseException()


class DeliveryRecorder:
    """
    The receiving application: checks each message (checksum, sender) and
    appends a record of it to the record file before returning, so that what
    the file says was received is what ILM saw delivered.

    ``delivered`` is the highest number delivered (by this process or, as
    its record file says, an earlier one); ``deliveries`` counts this
    process's deliveries.
    """

    def __init__(
        self,
        records: RecordWriter,
        peer: int,
        now_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._records = records
        self._peer = peer
        self._now_ns = now_ns
        self.delivered = records.highest
        self.deliveries = 0

    def __call__(self, message: Message) -> None:
        received_ns = self._now_ns()
        decoded = decode(message.contents) if message.source_id == self._peer else None
        if decoded is None:
            self._records.delivered(message.message_id, None, 0, received_ns)
        else:
            number, sent_ns = decoded
            self._records.delivered(message.message_id, number, sent_ns, received_ns)
            self.delivered = max(self.delivered, number)
        self.deliveries += 1


def _report(event: str, **fields: object) -> None:
    line = json.dumps({"event": event, **fields}) + "\n"
    try:
        os.write(1, line.encode())
    except OSError:
        pass  # the driver is gone: stdin's end tells the node to stop


@implementer(ILogObserver)
class _LinkCounter:
    """
    Counts the links this node's network reports established (its
    ``link_established`` log events), and asks for a status report at once.
    """

    def __init__(self, reactor: Any, report: Callable[[], None]) -> None:
        self.links = 0
        self._reactor = reactor
        self._report = report

    def __call__(self, event: dict[str, object]) -> None:
        if event.get("ilm_event") == "link_established":
            self.links += 1
            self._reactor.callLater(0, self._report)


class NodeProcess:
    """
    The node's process: starts ILM, runs the sender, reports to the driver.
    """

    def __init__(self, reactor: Any, options: argparse.Namespace) -> None:
        self.reactor = reactor
        self.options = options
        self.exit_code = 0
        self.node: ILM | None = None
        self.sender: DemoSender | None = None
        self.recorder: DeliveryRecorder | None = None
        self.records: RecordWriter | None = None
        self.links = _LinkCounter(reactor, self.status)
        self._status_call: Any = None
        self._stopping = False
        self._orphaned = False

    def begin_logging(self) -> None:
        log_problems_only(self.links)

    def start(self) -> None:
        self.begin_logging()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        d = Deferred.fromCoroutine(self.run())
        d.addErrback(self.failed)

    async def run(self) -> None:
        from twisted.internet import stdio
        from twisted.internet.task import LoopingCall

        from ilm import Config, SQLiteBackend
        from ilm.network import Backoff, LinkSettings, StreamNetwork

        options, reactor = self.options, self.reactor
        with open(options.key_file, "rb") as f:
            key = bytes.fromhex(f.read().decode().strip())
        self.records = RecordWriter(options.records, os.getpid(), time.monotonic_ns())
        self.recorder = DeliveryRecorder(self.records, options.peer)
        network = StreamNetwork(
            options.id,
            listen=["tcp:0:interface=127.0.0.1"],
            peers={options.peer: options.dial},
            keys={options.peer: key},
            # Redial at once: the peer is back within a second of a kill.
            settings=LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.2)),
            reactor=reactor,
        )
        node = await ILM.create(
            SQLiteBackend(options.store, reactor=reactor),
            self.recorder,
            network,
            config=Config(),
            clock=reactor,
        )
        self.node = node
        if self._stopping:
            return
        self.sender = DemoSender(node, options.peer, options.messages, options.credit)
        [address] = network.listening_addresses()
        _report(
            "ready",
            pid=os.getpid(),
            port=address.port,  # type: ignore[attr-defined]
            incarnation=node.incarnation,
            accepted=self.sender.accepted,
            window=node.config.window,
        )
        stdio.StandardIO(_DriverCommands(self), reactor=reactor)
        self._status_call = LoopingCall(self.status)
        self._status_call.clock = reactor
        self._status_call.start(STATUS_INTERVAL)
        try:
            await self.sender.run()
        except Exception:
            if self._stopping:
                return
            raise
        self.status()

    def status(self, event: str = "status") -> None:
        node, sender, recorder = self.node, self.sender, self.recorder
        if node is None or sender is None or recorder is None:
            return
        _report(
            event,
            sent=sender.sent,
            accepted=sender.accepted,
            pending=node.pending_outbound().get(self.options.peer, 0),
            delivered=recorder.delivered,
            deliveries=recorder.deliveries,
            linked=self.options.peer in node.connected_peers(),
            links=self.links.links,
        )

    def failed(self, reason: Failure) -> None:
        error = type(reason.value).__name__
        _report("error", message=f"{error}: {reason.getErrorMessage()}")
        sys.stderr.write(reason.getTraceback())
        self.exit_code = 1
        if not self._stopping:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self._status_call is not None and self._status_call.running:
            self._status_call.stop()
        try:
            if self.node is not None:
                if self._orphaned:
                    # Without the driver the peer is gone too: nothing to
                    # drain, and nobody to tell.
                    await self.node.shutdown(timeout=0.5)
                else:
                    await self.node.shutdown(timeout=self.options.shutdown_timeout)
                    self.status("stopped")
        except Exception:
            self.exit_code = 1
            if not self._orphaned:
                Failure().printTraceback(sys.stderr)
        finally:
            if self.records is not None:
                self.records.close()
            if self._orphaned and self.options.directory:
                # The driver was killed before it could remove its directory.
                shutil.rmtree(self.options.directory, ignore_errors=True)

    def stop(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    def command(self, line: str) -> None:
        words = line.split()
        if len(words) == 2 and words[0] == "credit" and words[1].isdigit():
            if self.sender is not None:
                self.sender.set_credit(int(words[1]))
        else:
            sys.stderr.write(f"ignored a command from the driver: {line!r}\n")

    def driver_gone(self) -> None:
        if not self._stopping:
            self._orphaned = True
            self.reactor.stop()


class _DriverCommands(LineOnlyReceiver):
    """
    The driver's commands on stdin; its end means the driver is gone.
    """

    delimiter = b"\n"

    def __init__(self, process: NodeProcess) -> None:
        self.process = process

    def lineReceived(self, line: bytes) -> None:
        self.process.command(line.decode("ascii", "replace"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.process.driver_gone()


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ilm._demo._node")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--peer", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--dial", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--credit", type=int, required=True)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    parser.add_argument(
        "--directory", help="the run's directory, removed if the driver dies"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor

    process = NodeProcess(reactor, options)
    reactor.callWhenRunning(process.start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return process.exit_code


if __name__ == "__main__":
    sys.exit(main())
