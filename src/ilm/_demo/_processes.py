"""
What the demo's driver does with the processes it runs (the two nodes, the
HTTP leg's daemons), whatever runs in them: spawn one (:class:`Supervised`,
which keeps each process's pid and whether it was SIGKILLed), watch it end
(:class:`ChildProcess`), stop them all at the end with a grace
(:func:`stop_processes`), kill what is left once the reactor stopped
(:func:`kill_now`), and read their logs (:func:`tail`, :func:`log_errors`).
Every process of the demo, the driver's included, logs the same way
(:func:`log_problems_only`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = [
    "ChildProcess",
    "Supervised",
    "kill_now",
    "log_errors",
    "log_problems_only",
    "stop_processes",
    "tail",
]


class ChildProcess(ProcessProtocol):
    """
    One process the driver runs: whether it is alive, how it ended.

    :ivar status: its exit status (``None``: a signal ended it).
    :ivar signalled: the signal that ended it, if one did.
    :ivar ended: fires once it has ended.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.alive = True
        self.status: int | None = None
        self.signalled: int | None = None
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        self.status = getattr(reason.value, "exitCode", None)
        self.signalled = getattr(reason.value, "signal", None)
        self.process_ended(reason)
        self.ended.callback(None)

    def process_ended(self, reason: Failure) -> None:
        """The process ended (:attr:`status` is set): tell its owner."""

    def signal(self, name: str) -> None:
        """Send it signal ``name`` (``"KILL"``, ``"TERM"``) if it is alive."""
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except OSError:
                pass  # it has just exited


class Supervised:
    """
    One program across the processes that run it in turn (a killed one is
    restarted on the same files).

    :ivar process: the current process (``None``: not started yet).
    :ivar pids: each process's pid, and whether it was SIGKILLed.
    :ivar killing: the current process is being SIGKILLed, to be restarted.
    :ivar kills: how many processes were SIGKILLed.
    """

    def __init__(self) -> None:
        self.process: ChildProcess | None = None
        self.pids: list[tuple[int, bool]] = []
        self.killing = False
        self.kills = 0

    def start(
        self,
        reactor: Any,
        process: ChildProcess,
        arguments: list[str],
        path: str | None = None,
    ) -> None:
        """
        Run ``arguments`` (after the Python interpreter) as ``process``,
        with its standard input open (its end tells it the driver is gone).
        """
        self.process = process
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, *arguments],
            env=dict(os.environ),
            path=path,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        process.pid = transport.pid
        self.pids.append((process.pid, False))

    def kill(self) -> int:
        """
        SIGKILL the current process, to be restarted when it has ended.

        :return: its pid.
        """
        process = self.process
        assert process is not None
        self.killing = True
        self.kills += 1
        pid, _ = self.pids[-1]
        self.pids[-1] = (pid, True)
        process.signal("KILL")
        return pid


_Program = TypeVar("_Program", bound=Supervised)


async def stop_processes(
    reactor: Any, programs: Iterable[_Program], kill: bool, grace: float
) -> list[tuple[_Program, ChildProcess]]:
    """
    Stop the programs' live processes: SIGTERM (SIGKILL after ``grace``
    seconds), or SIGKILL at once; wait until they have ended.

    :return: each program stopped, with its process.
    """
    stopping = []
    for program in programs:
        process = program.process
        if process is not None and process.alive:
            process.signal("KILL" if kill else "TERM")
            stopping.append((program, process))

    def kill_all() -> None:
        for _, process in stopping:
            process.signal("KILL")

    timer = reactor.callLater(grace, kill_all)
    for _, process in stopping:
        await process.ended
    if timer.active():
        timer.cancel()
    return stopping


def kill_now(programs: Iterable[Supervised]) -> None:
    """
    After the reactor stopped: SIGKILL (and reap) any process left.
    """
    for program in programs:
        process = program.process
        if process is not None and process.alive and process.pid:
            try:
                os.kill(process.pid, signal.SIGKILL)
                os.waitpid(process.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _read(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def tail(path: str, lines: int = 5) -> str:
    """The last ``lines`` lines of the log ``path``, on one line."""
    return " | ".join(_read(path)[-lines:]) or "(empty)"


_PROBLEMS = ("#error]", "#critical]", "Traceback", "Unhandled")


def log_errors(path: str) -> list[str]:
    """The lines of the log ``path`` that say something went wrong."""
    return [line for line in _read(path) if any(p in line for p in _PROBLEMS)]


def log_problems_only(*observers: Any) -> None:
    """
    Begin logging as every process of the demo does: warnings and worse as
    text on standard error (the rest of the output is the demo's own), and
    every event to ``observers`` too.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate]),
            *observers,
        ],
        redirectStandardIO=False,
    )
