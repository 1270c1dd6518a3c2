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
previous fault (:meth:`ilm._demo._faults.NodeFaults.due`); the senders may
not run more than 5 % of the stream past the next fault's threshold (their
*credit*), so every fault falls while messages are in flight, however fast
the streams run, and every planned fault happens before the streams end.

**Pieces.**  :mod:`ilm._demo._nodes` (a node across its processes),
:mod:`ilm._demo._processes` (spawning, stopping and killing any of them),
:mod:`ilm._demo._faults` (when a fault falls due, injecting it),
:mod:`ilm._demo._figures` (the figures the progress display shows) and
:mod:`ilm._demo._outcome` (the evidence handed to the verifier);
:class:`Demo` runs them.

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
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from ilm import Config
from ilm._demo._faults import NodeFaults, streams
from ilm._demo._figures import RunFigures
from ilm._demo._http import HttpLeg
from ilm._demo._nodes import DemoNode, NodeProcess
from ilm._demo._outcome import leg_report, run_summary
from ilm._demo._plan import FaultSchedule, fault_plan
from ilm._demo._processes import kill_now, log_problems_only, stop_processes, tail
from ilm._demo._progress import ProgressView
from ilm._demo._relay import Relay
from ilm._demo._verify import exit_status, summary_json, summary_table

# How long a node may take to stop cleanly at the end before it is killed.
STOP_GRACE = 15.0


class Demo:
    """
    One run of the demo (see the module docstring): it starts the nodes
    (:mod:`ilm._demo._nodes`) and the HTTP leg (:mod:`ilm._demo._http`),
    injects the faults as they fall due, shows the progress, and stops
    everything for the verdict (:mod:`ilm._demo._outcome`).

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
        self.nodes: list[DemoNode] = []
        self.faults = FaultSchedule((), self.messages)
        self.injector = NodeFaults(self.faults, (), ())
        self.failures: list[str] = []
        self.signalled: int | None = None
        self.progress: ProgressView | None = None
        self.http: HttpLeg | None = None
        self._key_file = ""
        self._finished: Deferred[None] = Deferred()
        self._done = False
        self._stopping = False
        self._started = time.monotonic()
        self._last_progress = time.monotonic()
        self._figures: tuple[int, ...] = ()

    # -- the run ---------------------------------------------------------------

    async def run(self) -> int:
        """
        Run the demo.

        :return: the exit status: 0 if verified, 1 if not, 128 + the signal
            number if interrupted.
        """
        options = self.options
        self.directory = tempfile.mkdtemp(prefix="ilm-demo-")
        self._key_file = os.path.join(self.directory, "psk")
        fd = os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        self.relays = [Relay(self.reactor), Relay(self.reactor)]
        self.nodes = [
            DemoNode(self, 1, 2, self.directory, self.relays[0]),
            DemoNode(self, 2, 1, self.directory, self.relays[1]),
        ]
        plan = fault_plan(
            self.seed,
            self.messages,
            options.cuts,
            options.kills,
            tuple(node.name for node in self.nodes),
        )
        self.faults = FaultSchedule(plan, self.messages)
        self.injector = NodeFaults(self.faults, self.nodes, self.relays)
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
        self.figures = RunFigures(
            self.nodes, self.injector, self.http, self.messages, self._started
        )
        self.progress = ProgressView(
            self.out,
            self.figures.snapshot,
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
        if self.http is not None:
            self.progress.event(self.http.describe())
        for node in self.nodes:
            self.spawn(node)
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
        summary = run_summary(
            streams(self.nodes),
            self.http,
            messages=self.messages,
            failures=self.failures,
            link_cuts=self.injector.link_cuts,
            window=self.window,
            reconnects=self.figures.reconnects(),
            seconds=self.figures.seconds(),
            seed=self.seed,
            tamper=options.tamper,
        )
        self.remove_directory()
        self.out.write("\n" + summary_table(summary) + "\n")
        self.out.flush()
        if options.json:
            data = summary_json(summary)
            data["http"] = None if self.http is None else leg_report(self.http)
            self.json_out.write(json.dumps(data) + "\n")
            self.json_out.flush()
        return exit_status(summary)

    def spawn(self, node: DemoNode) -> None:
        node.spawn(
            self.reactor,
            key_file=self._key_file,
            peer_port=self.relays[node.peer - 1].port,
            messages=self.messages,
            credit=self.faults.credit(),
            directory=self.directory or "",
        )

    # -- what the nodes say ----------------------------------------------------

    def reported(
        self, node: DemoNode, process: NodeProcess, report: dict[str, Any]
    ) -> None:
        if process is not node.process or node.killing:
            return
        event = report.get("event")
        if event == "ready":
            node.ready = True
            node.relay.target = int(report["port"])
            self.window = int(report.get("window", self.window))
            process.send(f"credit {self.faults.credit()}")
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

    def ended(self, node: DemoNode, process: NodeProcess, reason: Failure) -> None:
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
            f"its log: {tail(node.stderr)}"
        )

    # -- deciding --------------------------------------------------------------

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
        fault = self.faults.next()
        if fault is not None:
            if self.injector.due(fault):
                self.event(self.injector.inject(fault))
                credit_now = self.faults.credit()
                for node in self.nodes:
                    if node.process is not None and not node.killing and node.ready:
                        node.process.send(f"credit {credit_now}")
            return
        if (self.http is None or self.http.done()) and all(
            self.injector.linked_again(sender)
            and sender.accepted == self.messages
            and sender.pending == 0
            and receiver.delivered >= self.messages
            for sender, receiver in streams(self.nodes)
        ):
            self.finish(None)

    def _http_failed(self, reason: Failure) -> None:
        self.finish(
            f"HTTP leg: {type(reason.value).__name__}: {reason.getErrorMessage()}"
        )

    def _watch(self) -> None:
        self.figures.sample()
        idle = time.monotonic() - self._last_progress
        if idle > self.options.stall_timeout and not self._done:
            fault = self.faults.next()
            waiting = (
                f"waiting for {fault}"
                if fault is not None
                else "waiting for the streams to finish"
            )
            self.finish(
                f"stalled: nothing moved for {idle:.0f} s ({waiting}); "
                + "; ".join(
                    f"{n.name}: ready {n.ready}, linked {n.linked}, accepted "
                    f"{n.accepted:,}, pending {n.pending:,}, delivered "
                    f"{n.delivered:,}; log: {tail(n.stderr)}"
                    for n in self.nodes
                )
                + ("" if self.http is None else f"; {self.http.stalled()}")
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

    # -- ending ----------------------------------------------------------------

    async def stop_nodes(self, kill: bool) -> None:
        """
        Stop every node process: SIGTERM (a clean shutdown; SIGKILL after
        :data:`STOP_GRACE` seconds), or SIGKILL at once.
        """
        self._stopping = True
        nodes = Deferred.fromCoroutine(
            stop_processes(self.reactor, self.nodes, kill, STOP_GRACE)
        )
        leg: Deferred[list[str]] | None = None
        if self.http is not None:
            leg = Deferred.fromCoroutine(self.http.stop(kill, STOP_GRACE))
        stopped = await nodes
        for relay in self.relays:
            await relay.close()
        if leg is not None:
            self.failures.extend(await leg)
        if kill:
            return
        for node, process in stopped:
            if process.status != 0:
                how = "killed" if process.status is None else f"status {process.status}"
                self.failures.append(
                    f"{node.name} did not stop cleanly ({how}); "
                    f"its log: {tail(node.stderr)}"
                )

    def cleanup(self) -> None:
        """
        After the reactor stopped: kill any node process left, remove the
        temporary directory (unless ``--keep``).
        """
        kill_now(self.nodes)
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


def run(options: argparse.Namespace) -> int:
    """
    Run ``ilm demo`` on the global reactor.

    :return: the exit status.
    """
    from twisted.internet import reactor

    # Only what went wrong: the progress and the summary are the output.
    log_problems_only()
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
