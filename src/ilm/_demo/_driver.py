"""
The driver of ``ilm demo``: runs two ILM nodes as separate processes, cuts
their link and SIGKILLs them while they stream to each other, shows the
progress, and verifies at the end what each application received.

**Processes.**  Each node (:mod:`ilm._demo._node`) is its own OS process
with its own SQLite store in a temporary directory, listening on an
ephemeral loopback port.  Each dials the other through a :class:`Relay` in
this process (the peer's fixed address, whatever port the peer's current
process listens on); links are authenticated with a pre-shared key
generated for the run.  A node reports its figures on its stdout, one JSON
line at a time; the driver hands it credit on its stdin.

**Faults.**  :func:`ilm._demo._plan.fault_plan` draws, from the seed, when
the link is cut (every relayed connection aborted, both sides) and when each
node is SIGKILLed; a killed node is restarted at once on the same store and
record file.  A fault happens once one stream has delivered its threshold,
both nodes run and are linked again, and the streams have moved since the
previous fault (:meth:`Demo.fault_due`); the senders may not run more than
5 % of the stream past the next fault's threshold (their *credit*), so every
fault falls while messages are in flight, however fast the streams run, and
every planned fault happens before the streams end.

**What is counted, and how a kill cannot fool it.**  What each receiving
application got is read at the end from its record file (a record per
delivery, written before ``deliver`` returns, so a kill keeps every record of
a finished delivery).  What each sender's store accepted is not what the
driver heard the sender say: the sender may have had messages stored whose
acceptance it never reported (or never even saw: ``send_to``'s Deferred had
not fired) when it was killed.  Instead, the count is the store's own:
every process reports ``ILM.last_message_id(peer)`` when it starts and when
it stops, so the restarted sender's report includes whatever its killed
predecessor had stored, and the last process's report on a clean shutdown
is the final figure.  The sender numbers messages by their position (it
resumes at ``last_message_id`` + 1), so "accepted" is exactly the numbers
1..``last_message_id``, and the verifier (:mod:`ilm._demo._verify`) checks
each delivery against that.

**Latency** is from ``send_to`` to delivery, both read from CLOCK_MONOTONIC
(``time.monotonic_ns``), which all processes on a machine share; a message
stored before a kill and delivered after it counts the outage too.

**Clean-up.**  Every node process is stopped (SIGTERM at the end, SIGKILL on
SIGINT or SIGTERM of the driver, or if a node does not stop within its
grace), the relays are closed and the temporary directory removed, also
when the run fails.  If the driver itself is SIGKILLed, the nodes see their
stdin close, stop, and remove the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from ilm import Config
from ilm._demo._http import RECEIVER, HttpLeg
from ilm._demo._plan import CUT, Fault, credit, fault_plan
from ilm._demo._progress import Progress, ProgressView, StreamProgress
from ilm._demo._records import parse_records
from ilm._demo._relay import Relay
from ilm._demo._verify import (
    ReceiverLife,
    StreamEvidence,
    Summary,
    exit_status,
    summarize,
    summary_json,
    summary_table,
)

# How long a node may take to stop cleanly at the end before it is killed.
STOP_GRACE = 15.0


class _NodeProtocol(ProcessProtocol):
    """
    One process of a node: its reports in, its stderr to a file.
    """

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.pid = 0
        self.ended: Deferred[None] = Deferred()
        self.alive = True
        self.status: int | None = None  # the exit status (None: a signal)
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                self.node.driver.node_noise(self.node, line)
                continue
            self.node.driver.reported(self.node, self, report)

    def errReceived(self, data: bytes) -> None:
        try:
            with open(self.node.stderr, "ab") as f:
                f.write(data)
        except OSError:
            sys.stderr.buffer.write(data)  # its directory is gone already

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        self.status = getattr(reason.value, "exitCode", None)
        self.node.driver.ended(self.node, self, reason)
        self.ended.callback(None)

    def send(self, line: str) -> None:
        if self.alive and self.transport is not None:
            self.transport.write(line.encode() + b"\n")

    def signal(self, name: str) -> None:
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except OSError:
                pass  # it has just exited


class _Node:
    """
    One node across its processes, and what it reported.
    """

    def __init__(
        self, driver: Demo, node_id: int, peer: int, directory: str, relay: Relay
    ) -> None:
        self.driver = driver
        self.id = node_id
        self.peer = peer
        self.name = f"node {node_id}"
        self.relay = relay  # in front of this node
        self.store = os.path.join(directory, f"node{node_id}.sqlite")
        self.records = os.path.join(directory, f"node{node_id}.records")
        self.stderr = os.path.join(directory, f"node{node_id}.stderr")
        self.process: _NodeProtocol | None = None
        self.pids: list[tuple[int, bool]] = []  # each process: pid, killed
        self.killing = False
        self.kills = 0
        self.ready = False
        self.linked = False
        self.links_before = 0  # links counted by earlier processes
        self.links = 0
        self.sent = 0
        self.accepted = 0
        self.pending = 0
        self.delivered = 0  # the highest number of the peer's stream delivered
        self.error: str | None = None

    def update(self, report: dict[str, Any]) -> None:
        self.sent = max(self.sent, int(report.get("sent", 0)))
        self.accepted = max(self.accepted, int(report.get("accepted", 0)))
        self.sent = max(self.sent, self.accepted)
        if "pending" in report:
            self.pending = int(report["pending"])
        self.delivered = max(self.delivered, int(report.get("delivered", 0)))
        if "linked" in report:
            self.linked = bool(report["linked"])
        self.links = max(self.links, int(report.get("links", 0)))

    @property
    def total_links(self) -> int:
        return self.links_before + self.links


class Demo:
    """
    One run of the demo (see the module docstring).

    :param reactor: the reactor (processes, TCP, time).
    :param options: the parsed ``ilm demo`` options.
    :param out: where the progress and the summary go.
    :param json_out: where the JSON summary goes (with ``--json``).
    """

    def __init__(
        self,
        reactor: Any,
        options: argparse.Namespace,
        out: TextIO,
        json_out: TextIO,
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.json_out = json_out
        self.messages: int = options.messages
        self.seed: int = (
            options.seed
            if options.seed is not None
            else int.from_bytes(os.urandom(4), "big")
        )
        self.window = Config().window
        self.directory: str | None = None
        self.relays: list[Relay] = []
        self.nodes: list[_Node] = []
        self.plan: tuple[Fault, ...] = ()
        self.pending_faults: list[Fault] = []
        self.link_cuts = 0
        self.failures: list[str] = []
        self.signalled: int | None = None
        self.progress: ProgressView | None = None
        self.http: HttpLeg | None = None
        self._finished: Deferred[None] = Deferred()
        self._done = False
        self._stopping = False
        self._started = time.monotonic()
        self._last_progress = time.monotonic()
        self._figures: tuple[int, ...] = ()
        self._at_fault: dict[int, int] = {}
        self._links_at_fault: dict[int, int] = {1: 0, 2: 0}
        self._rates: dict[int, deque[tuple[float, int]]] = {}

    # -- the run ---------------------------------------------------------------

    async def run(self) -> int:
        """
        Run the demo.

        :return: the exit status: 0 if verified, 1 if not, 128 + the signal
            number if interrupted.
        """
        options = self.options
        self.directory = tempfile.mkdtemp(prefix="ilm-demo-")
        key_file = os.path.join(self.directory, "psk")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        self.relays = [Relay(self.reactor), Relay(self.reactor)]
        self.nodes = [
            _Node(self, 1, 2, self.directory, self.relays[0]),
            _Node(self, 2, 1, self.directory, self.relays[1]),
        ]
        self.plan = fault_plan(
            self.seed,
            self.messages,
            options.cuts,
            options.kills,
            tuple(node.name for node in self.nodes),
        )
        self.pending_faults = list(self.plan)
        self.progress = ProgressView(
            self.out,
            self.snapshot,
            terminal=self.out.isatty(),
            clock=self.reactor,
        )
        kills = options.kills
        self.progress.event(
            f"ILM demo: 2 nodes as separate processes, each with its own SQLite "
            f"store (in {self.directory}), linked over TCP loopback through a "
            f"relay (ports {self.relays[0].port} and {self.relays[1].port}), "
            f"authenticated with a generated pre-shared key.\n"
            f"Streaming {self.messages:,} numbered, checksummed messages each way; "
            f"{options.cuts} link cuts and {kills} SIGKILL{'s' if kills != 1 else ''} "
            f"of each node on the way (seed {self.seed}: --seed {self.seed} "
            f"replays this schedule)."
        )
        if not options.no_http:
            self.http = HttpLeg(
                self,
                self.reactor,
                self.directory,
                messages=options.http_messages,
                seed=self.seed,
                cuts=min(1, options.cuts),
                kills=min(1, options.kills),
            )
            self.progress.event(self.http.describe())
        for node in self.nodes:
            self.spawn(node, key_file)
        self._key_file = key_file
        if self.http is not None:
            leg = Deferred.fromCoroutine(self.http.start())
            leg.addErrback(self._http_failed)
        self.progress.start()
        watchdog = LoopingCall(self._watch)
        watchdog.clock = self.reactor
        watchdog.start(0.1, now=False)
        try:
            await self._finished
        finally:
            watchdog.stop()
            self.progress.stop()
        await self.stop_nodes(kill=self.signalled is not None)
        if self.signalled is not None:
            self.remove_directory()
            self.out.write(
                f"interrupted by signal {self.signalled}: node processes stopped, "
                "temporary files removed\n"
            )
            return 128 + self.signalled
        summary = self.summary()
        self.remove_directory()
        self.out.write("\n" + summary_table(summary) + "\n")
        self.out.flush()
        if options.json:
            data = summary_json(summary)
            data["http"] = None if self.http is None else self.http.report()
            self.json_out.write(json.dumps(data) + "\n")
            self.json_out.flush()
        return exit_status(summary)

    def spawn(self, node: _Node, key_file: str | None = None) -> None:
        key_file = key_file or self._key_file
        peer_relay = self.relays[node.peer - 1]
        arguments = [
            sys.executable,
            "-m",
            "ilm._demo._node",
            "--id",
            str(node.id),
            "--peer",
            str(node.peer),
            "--store",
            node.store,
            "--records",
            node.records,
            "--key-file",
            key_file,
            "--dial",
            f"tcp:host=127.0.0.1:port={peer_relay.port}",
            "--messages",
            str(self.messages),
            "--credit",
            str(self.credit()),
            "--directory",
            self.directory or "",
        ]
        protocol = _NodeProtocol(node)
        node.process = protocol
        node.ready = False
        node.linked = False
        transport = self.reactor.spawnProcess(
            protocol,
            sys.executable,
            arguments,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        protocol.pid = transport.pid
        node.pids.append((protocol.pid, False))

    def credit(self) -> int:
        return credit(self.messages, tuple(self.pending_faults))

    # -- what the nodes say ----------------------------------------------------

    def reported(
        self, node: _Node, process: _NodeProtocol, report: dict[str, Any]
    ) -> None:
        if process is not node.process or node.killing:
            return
        event = report.get("event")
        if event == "ready":
            node.ready = True
            node.relay.target = int(report["port"])
            self.window = int(report.get("window", self.window))
            process.send(f"credit {self.credit()}")
            if len(node.pids) > 1:
                stored = int(report["accepted"])
                self.event(
                    f"{node.name} is back (pid {process.pid}): its store holds "
                    f"{stored:,} messages for node {node.peer} (the killed process "
                    f"had reported {node.accepted:,}); it goes on from "
                    f"{stored + 1:,}"
                )
        elif event == "error":
            node.error = str(report.get("message"))
            self.finish(f"{node.name} failed: {node.error}")
        node.update(report)
        self.evaluate()

    def node_noise(self, node: _Node, line: bytes) -> None:
        with open(node.stderr, "ab") as f:
            f.write(b"stdout: " + line + b"\n")

    def ended(self, node: _Node, process: _NodeProtocol, reason: Failure) -> None:
        if process is not node.process:
            return
        node.ready = node.linked = False
        node.relay.target = None
        if node.killing:
            node.killing = False
            node.links_before += node.links
            node.links = 0
            if not self._done:
                self.spawn(node)
            return
        if self._stopping or self._done:
            return
        how = reason.value if process.status is None else f"status {process.status}"
        self.finish(
            f"{node.name} (pid {process.pid}) exited on its own ({how}); "
            f"its log: {_tail(node.stderr)}"
        )

    # -- deciding --------------------------------------------------------------

    def streams(self) -> list[tuple[_Node, _Node]]:
        """Each stream's (sender, receiver)."""
        one, two = self.nodes
        return [(one, two), (two, one)]

    def evaluate(self) -> None:
        if self._done:
            return
        figures = tuple(
            value
            for node in self.nodes
            for value in (node.accepted, node.delivered, node.total_links)
        ) + (() if self.http is None else self.http.figures())
        if figures != self._figures:
            self._figures = figures
            self._last_progress = time.monotonic()
        if self.pending_faults:
            fault = self.pending_faults[0]
            if self.fault_due(fault):
                self.inject(fault)
            return
        if (self.http is None or self.http.done()) and all(
            self.linked_again(sender)
            and sender.accepted == self.messages
            and sender.pending == 0
            and receiver.delivered >= self.messages
            for sender, receiver in self.streams()
        ):
            self.finish(None)

    def _http_failed(self, reason: Failure) -> None:
        self.finish(
            f"HTTP leg: {type(reason.value).__name__}: {reason.getErrorMessage()}"
        )

    def linked_again(self, node: _Node) -> bool:
        """
        Whether ``node`` runs and is linked, by a link made since the
        previous fault (a status report made before the node noticed a cut
        may still say linked, but not with a new link counted).
        """
        return (
            node.process is not None
            and not node.killing
            and node.ready
            and node.linked
            and node.total_links > self._links_at_fault[node.id]
        )

    def fault_due(self, fault: Fault) -> bool:
        """
        Whether ``fault`` happens now: both nodes run and are linked (as
        they reported since the previous fault), one of the streams has
        reached the fault's threshold, and each stream has moved since the
        previous fault unless its credit or its end holds it.  Firing as
        soon as the first stream reaches the threshold finds both streams
        with messages in flight: the other has not got there yet, and this
        one may still run ``lead`` messages further.
        """
        if not all(self.linked_again(node) for node in self.nodes):
            return False
        if not any(relay.linked() for relay in self.relays):
            return False
        receivers = [receiver for _, receiver in self.streams()]
        if max(r.delivered for r in receivers) < min(fault.at, self.messages):
            return False
        limit = self.credit()
        for receiver in receivers:
            moved = receiver.delivered > self._at_fault.get(receiver.id, -1)
            if not (moved or receiver.delivered >= limit):
                return False
        return True

    def inject(self, fault: Fault) -> None:
        self.pending_faults.pop(0)
        for node in self.nodes:
            self._at_fault[node.id] = node.delivered
            self._links_at_fault[node.id] = node.total_links
            # Seen linked again only in a report made after the fault.
            node.linked = False
        delivered = ", ".join(
            f"{receiver.delivered:,} to {receiver.name}"
            for _, receiver in self.streams()
        )
        if fault.kind == CUT:
            aborted = sum(relay.cut() for relay in self.relays)
            self.link_cuts += 1
            self.event(
                f"link cut {self.link_cuts}: aborted {aborted} TCP connection(s) "
                f"(delivered so far: {delivered})"
            )
        else:
            [node] = [n for n in self.nodes if n.name == fault.kind]
            assert node.process is not None
            node.killing = True
            node.ready = False
            node.relay.target = None
            node.kills += 1
            pid, _ = node.pids[-1]
            node.pids[-1] = (pid, True)
            node.process.signal("KILL")
            self.event(
                f"SIGKILL {node.name} (pid {pid}) and restart it on its store "
                f"(delivered so far: {delivered})"
            )
        credit_now = self.credit()
        for node in self.nodes:
            if node.process is not None and not node.killing and node.ready:
                node.process.send(f"credit {credit_now}")

    def _watch(self) -> None:
        self._sample()
        idle = time.monotonic() - self._last_progress
        if idle > self.options.stall_timeout and not self._done:
            waiting = (
                f"waiting for {self.pending_faults[0]}"
                if self.pending_faults
                else "waiting for the streams to finish"
            )
            leg = self.http
            self.finish(
                f"stalled: nothing moved for {idle:.0f} s ({waiting}); "
                + "; ".join(
                    f"{n.name}: ready {n.ready}, linked {n.linked}, accepted "
                    f"{n.accepted:,}, pending {n.pending:,}, delivered "
                    f"{n.delivered:,}; log: {_tail(n.stderr)}"
                    for n in self.nodes
                )
                + (
                    ""
                    if leg is None
                    else f"; HTTP leg: faults left {leg.pending_faults}, daemon B "
                    f"running {leg.b.running}, linked {leg.linked}, accepted "
                    f"{leg.accepted:,}, pending {leg.pending:,}, at the webhook "
                    f"{leg.delivered:,}; logs: {_tail(leg.a.log_path)} / "
                    f"{_tail(leg.b.log_path)}"
                )
            )

    def finish(self, failure: str | None) -> None:
        """
        End the run (``failure``: why, if it failed).
        """
        if failure is not None:
            self.failures.append(failure)
        if not self._done:
            self._done = True
            self._finished.callback(None)

    def interrupt(self, signum: int) -> None:
        """
        SIGINT or SIGTERM: kill the nodes and end the run.
        """
        if self.signalled is None:
            self.signalled = signum
        for node in self.nodes:
            if node.process is not None:
                node.process.signal("KILL")
        if self.http is not None:
            self.http.kill_all()
        self.finish(None)

    # -- showing ---------------------------------------------------------------

    def event(self, text: str) -> None:
        if self.progress is not None:
            elapsed = time.monotonic() - self._started
            self.progress.event(f"[{elapsed:5.1f} s] {text}")

    def _sample(self) -> None:
        """
        Note each receiver's progress, for its rate over the last second.
        """
        now = time.monotonic()
        for node in self.nodes:
            samples = self._rates.setdefault(node.id, deque())
            samples.append((now, node.delivered))
            while len(samples) > 2 and now - samples[1][0] >= 1.0:
                samples.popleft()

    def _rate(self, node: _Node) -> float:
        samples = self._rates.get(node.id)
        if not samples:
            return 0.0
        (t0, d0), (t1, d1) = samples[0], samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> Progress:
        planned = {node.name: 0 for node in self.nodes}
        cuts = 0
        for fault in self.plan:
            if fault.kind == CUT:
                cuts += 1
            else:
                planned[fault.kind] += 1
        streams = [
            StreamProgress(
                f"{sender.name} -> {receiver.name}",
                receiver.delivered,
                self.messages,
                self._rate(receiver),
                sender.pending,
            )
            for sender, receiver in self.streams()
        ]
        kills = [(n.name, n.kills, planned[n.name]) for n in self.nodes]
        cuts_done = self.link_cuts
        leg = self.http
        if leg is not None:
            streams.append(
                StreamProgress(
                    "HTTP -> A -> B -> webhook",
                    leg.delivered,
                    leg.messages,
                    leg.rate(),
                    leg.pending,
                )
            )
            leg_cuts, leg_kills = leg.planned()
            cuts += leg_cuts
            cuts_done += leg.cuts
            kills.append((RECEIVER, leg.b.kills, leg_kills))
        return Progress(
            streams=tuple(streams),
            cuts=cuts_done,
            cuts_planned=cuts,
            kills=tuple(kills),
            reconnects=self.reconnects(),
            seconds=time.monotonic() - self._started,
        )

    def reconnects(self) -> int:
        """
        How many times the link came up again: both nodes count each link
        they see established; a killed process may not have reported its
        last one, so the larger count is the better one.
        """
        nodes = max(0, max((n.total_links for n in self.nodes), default=0) - 1)
        return nodes + (0 if self.http is None else self.http.reconnects())

    # -- ending ----------------------------------------------------------------

    async def stop_nodes(self, kill: bool) -> None:
        """
        Stop every node process: SIGTERM (a clean shutdown; SIGKILL after
        :data:`STOP_GRACE` seconds), or SIGKILL at once.
        """
        self._stopping = True
        stopping = []
        for node in self.nodes:
            process = node.process
            if process is None or not process.alive:
                continue
            process.signal("KILL" if kill else "TERM")
            stopping.append((node, process))
        leg: Deferred[list[str]] | None = None
        if self.http is not None:
            leg = Deferred.fromCoroutine(self.http.stop(kill, STOP_GRACE))
        timer = self.reactor.callLater(STOP_GRACE, self._kill_all)
        for _, process in stopping:
            await process.ended
        if timer.active():
            timer.cancel()
        for relay in self.relays:
            await relay.close()
        if leg is not None:
            self.failures.extend(await leg)
        if kill:
            return
        for node, process in stopping:
            if process.status != 0:
                how = "killed" if process.status is None else f"status {process.status}"
                self.failures.append(
                    f"{node.name} did not stop cleanly ({how}); "
                    f"its log: {_tail(node.stderr)}"
                )

    def _kill_all(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.signal("KILL")

    def evidence(self) -> list[StreamEvidence]:
        """
        What each stream's applications did: the receiver's records, the
        sender's store's count of accepted messages.
        """
        streams = []
        for sender, receiver in self.streams():
            try:
                with open(receiver.records, "rb") as f:
                    processes = parse_records(f.read())
            except FileNotFoundError:
                processes = []
            lives = []
            spawned = iter(receiver.pids)
            for process in processes:
                killed = False
                for pid, was_killed in spawned:
                    if pid == process.pid:
                        killed = was_killed
                        break
                lives.append(ReceiverLife(process.deliveries, killed))
            streams.append(
                StreamEvidence(
                    f"{sender.name} -> {receiver.name}",
                    sent=sender.sent,
                    accepted=sender.accepted,
                    lives=tuple(lives),
                )
            )
        if self.http is not None:
            streams.append(self.http.evidence())
        if self.options.tamper:
            streams[0] = tampered(streams[0], self.options.tamper)
        return streams

    def summary(self) -> Summary:
        failures = list(self.failures)
        for sender, _ in self.streams():
            if not failures and sender.accepted < self.messages:
                failures.append(
                    f"{sender.name} stored only {sender.accepted:,} of "
                    f"{self.messages:,} messages"
                )
        kills = {node.name: node.kills for node in self.nodes}
        link_cuts = self.link_cuts
        logs = [node.stderr for node in self.nodes]
        notes = []
        leg = self.http
        if leg is not None:
            if not failures and leg.accepted < leg.messages:
                failures.append(
                    f"daemon A stored only {leg.accepted:,} of {leg.messages:,} "
                    "messages posted to it"
                )
            failures.extend(leg.problems())
            kills[RECEIVER] = leg.b.kills
            link_cuts += leg.cuts
            logs.extend(leg.logs())
            notes.append(
                f"HTTP -> A -> B -> webhook: in over HTTP (POST "
                f"/v1/peers/B/messages to daemon A, an Idempotency-Key each: "
                f"{leg.report()['answered_202']:,} answered 202, "
                f"{leg.report()['post_retries']:,} retried), out over a webhook "
                f"(daemon B, {leg.receiver.requests:,} signed requests, "
                f"{leg.receiver.bad_signatures:,} bad signatures); link cuts "
                f"{leg.cuts}, SIGKILLs of daemon B {leg.b.kills}"
            )
        return summarize(
            self.evidence(),
            window=self.window,
            link_cuts=link_cuts,
            kills=kills,
            reconnects=self.reconnects(),
            seconds=time.monotonic() - self._started,
            seed=self.seed,
            failures=failures,
            node_errors=[line for path in logs for line in _errors(path)],
            notes=notes,
        )

    def cleanup(self) -> None:
        """
        After the reactor stopped: kill any node process left, remove the
        temporary directory (unless ``--keep``).
        """
        for node in self.nodes:
            process = node.process
            if process is not None and process.alive and process.pid:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                    os.waitpid(process.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        if self.http is not None:
            self.http.kill_now()
        self.remove_directory()

    def remove_directory(self) -> None:
        """
        Remove the temporary directory (unless ``--keep``), once.
        """
        directory, self.directory = self.directory, None
        if directory is None:
            return
        if self.options.keep:
            self.out.write(f"kept the stores, records and node logs in {directory}\n")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def tampered(evidence: StreamEvidence, kind: str) -> StreamEvidence:
    """
    ``evidence`` with one fault put in, to show that the verifier catches it
    and the demo fails (``--tamper``, for tests): ``missing`` drops every
    delivery of one number, ``reorder`` swaps two deliveries, ``repeat``
    delivers one number twice in a row in the same process.
    """
    lives = list(evidence.lives)
    index = max(range(len(lives)), key=lambda i: len(lives[i].deliveries))
    life = lives[index]
    deliveries = list(life.deliveries)
    middle = len(deliveries) // 2
    if kind == "missing":
        number = deliveries[middle][1]
        for i, other in enumerate(lives):
            lives[i] = ReceiverLife(
                tuple(d for d in other.deliveries if d[1] != number), other.killed
            )
        return StreamEvidence(
            evidence.name, evidence.sent, evidence.accepted, tuple(lives)
        )
    if kind == "reorder":
        deliveries[middle], deliveries[middle + 1] = (
            deliveries[middle + 1],
            deliveries[middle],
        )
    elif kind == "repeat":
        deliveries.insert(middle + 1, deliveries[middle])
    else:
        raise ValueError(f"unknown tampering {kind!r}")
    lives[index] = ReceiverLife(tuple(deliveries), life.killed)
    return StreamEvidence(evidence.name, evidence.sent, evidence.accepted, tuple(lives))


def _read(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _tail(path: str, lines: int = 5) -> str:
    return " | ".join(_read(path)[-lines:]) or "(empty)"


_PROBLEMS = ("#error]", "#critical]", "Traceback", "Unhandled")


def _errors(path: str) -> list[str]:
    return [line for line in _read(path) if any(p in line for p in _PROBLEMS)]


def run(options: argparse.Namespace) -> int:
    """
    Run ``ilm demo`` on the global reactor.

    :return: the exit status.
    """
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Only what went wrong: the progress and the summary are the output.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )
    out = sys.stderr if options.json else sys.stdout
    demo = Demo(reactor, options, out, sys.stdout)
    status = [1]

    def handle(signum: int, frame: object) -> None:
        if demo.signalled is not None:
            # A second signal: stop waiting for anything.
            demo.cleanup()
            os._exit(128 + signum)
        reactor.callFromThread(demo.interrupt, signum)  # type: ignore[attr-defined]

    def started() -> None:
        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)
        d = Deferred.fromCoroutine(demo.run())

        def done(code: int) -> None:
            status[0] = code

        def failed(reason: Failure) -> None:
            sys.stderr.write("ilm demo: internal error\n" + reason.getTraceback())

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    try:
        reactor.run()  # type: ignore[attr-defined]
    finally:
        demo.cleanup()
    return status[0]
