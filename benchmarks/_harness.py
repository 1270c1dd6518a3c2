"""
What every scenario of ``python -m benchmarks`` shares: child processes
(started in their own process group, read line by line with timeouts, and
always stopped), the line protocol between them and the orchestrator, the
clock, percentiles, and resource figures.

A child prints ``READY <text>`` once it is ready to be driven and
``RESULT <json>`` with its figures; anything else it prints is passed through
to the orchestrator's stderr when ``--verbose`` is given.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


if time.get_clock_info("monotonic").implementation == "clock_gettime(CLOCK_MONOTONIC)":
    # The same clock without a Python call around it: a delivery target
    # that times every message reads it a hundred thousand times a second.
    now = time.monotonic


def result(values: dict[str, Any]) -> None:
    """Print a child's figures for the orchestrator."""
    print("RESULT " + json.dumps(values), flush=True)


def ready(text: object = "") -> None:
    print(f"READY {text}", flush=True)


def cpu_seconds() -> float:
    """User plus system CPU of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max in milliseconds."""
    return {
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "p999_ms": percentile(latencies, 0.999) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "samples": len(latencies),
    }


def payload(index: int, size: int = SIZE) -> bytes:
    """Message ``index`` of a throughput run: its number, zero-padded."""
    return b"%0*d" % (size, index)


def stamped(index: int, size: int = SIZE) -> bytes:
    """Message ``index`` of a latency run: its number and the time now."""
    head = b"%016d%.9f" % (index, now())
    return head + b"." * max(0, size - len(head))


def read_stamp(contents: bytes) -> tuple[int, float]:
    """:return: (index, send time) of a :func:`stamped` message."""
    return int(contents[:16]), float(contents[16:].rstrip(b"."))


class ChildFailed(Exception):
    """A child process ended, or said nothing in time, before its result."""


class Child:
    """
    One child process running a role of :mod:`benchmarks._roles`, in its own
    process group (a Ctrl-C at the terminal reaches only the orchestrator,
    which then stops every child itself).
    """

    def __init__(self, role: str, options: dict[str, Any], verbose: bool) -> None:
        env = dict(os.environ)
        paths = [ROOT, os.path.join(ROOT, "src")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.role = role
        self.verbose = verbose
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._roles", role, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        if not verbose:
            threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)
            del self._stderr[:-40]

    def expect(self, prefix: str, timeout: float) -> str:
        """
        :return: the rest of the next line starting with ``prefix``.
        :raises ChildFailed: if the child ends or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(
                    f"{self.role} said no {prefix.strip()} within {timeout:.0f} s"
                    + self._tail()
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                code = self.process.wait()
                raise ChildFailed(
                    f"{self.role} ended (status {code}) without {prefix.strip()}"
                    + self._tail()
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            if self.verbose:
                sys.stderr.write(f"[{self.role}] {line}")

    def result(self, timeout: float) -> dict[str, Any]:
        figures: dict[str, Any] = json.loads(self.expect("RESULT ", timeout))
        return figures

    def tell(self, line: str) -> None:
        """Write a line to the child's standard input."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"{self.role} still running after {timeout:.0f} s")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL after ``grace``."""
        if self.process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the child started is killed with it.
        _signal_group(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _tail(self) -> str:
        if not self._stderr:
            return ""
        return "; its stderr ends:\n" + "".join(self._stderr[-15:])


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Children:
    """
    The children of one scenario: every one started through :meth:`start` is
    stopped when the ``with`` block ends, on success, failure or Ctrl-C.
    """

    profile: str | None = None
    """A directory for the cProfile stats of the ILM processes (--profile)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.started: list[Child] = []

    def start(self, role: str, **options: Any) -> Child:
        if Children.profile:
            options["profile"] = Children.profile
        child = Child(role, options, self.verbose)
        self.started.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for child in reversed(self.started):
            child.stop()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """
    While active, SIGTERM and SIGINT to the orchestrator raise
    ``KeyboardInterrupt`` (also when started with SIGINT ignored, as a
    background job is), so that every ``finally`` runs and no child, store,
    stream or session is left behind.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds of another process (a broker), if it can be read."""
    if pid is None:
        return None
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:
        return None


def listening_pid(port: int, names: Sequence[str]) -> int | None:
    """The process listening on TCP ``port`` (a broker), found with psutil."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN":
                if conn.pid:
                    return int(conn.pid)
    except Exception:
        pass
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in names:
            return int(process.pid)
    return None


def reachable(host: str, port: int, timeout: float = 1.0) -> str | None:
    """:return: ``None`` if a TCP connection succeeds, else why not."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} is not reachable ({e.strerror or e})"
