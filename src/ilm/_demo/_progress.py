"""
The demo's live progress, Twisted-native: a ``LoopingCall`` on the reactor
redraws a few lines; nothing else runs.

Why no progress library: the demo ships inside ``ilm`` itself, so a
progress library would become an install requirement of ILM for everyone,
for a few lines of output.  And none fits a single-threaded Twisted program
without care: rich's live display refreshes from a thread of its own by
default (and redirects stdout while it is live), tqdm starts a monitor
thread, and enlighten installs a process-wide SIGWINCH handler.  What the demo
needs is small: a handful of lines redrawn a few times a second with two
ANSI escapes (cursor up, clear to the end), and plain lines when the output
is not a terminal.  A ``LoopingCall`` does that in the reactor's own turn,
with no thread and no dependency, and runs in tests on a ``Clock``.

- On a terminal: one line per stream (a bar, delivered of total, rate,
  pending), one line of faults (link cuts, kills, reconnects, elapsed),
  redrawn every 0.1 s; events (a cut, a kill) print above them and stay.
- Otherwise (a pipe, a file, CI): events as they happen, and every second
  one plain line with the same figures.
"""

from __future__ import annotations

import shutil
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attr
from twisted.internet.task import LoopingCall

_BAR = 24


class RateMeter:
    """
    A count's rate over about the last second, from samples taken a few
    times a second.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, count: int) -> None:
        """The count is ``count`` at ``now`` (seconds)."""
        samples = self._samples
        samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= 1.0:
            samples.popleft()

    def rate(self) -> float:
        """Per second, over the samples kept (0 before two)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StreamProgress:
    """
    One stream's figures: ``delivered`` (the highest number delivered),
    of ``total``; ``rate`` in messages per second; ``pending`` at the sender
    (stored, not yet acknowledged).
    """

    name: str
    delivered: int
    total: int
    rate: float
    pending: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Progress:
    """
    Everything a progress line shows.
    """

    streams: tuple[StreamProgress, ...]
    cuts: int
    cuts_planned: int
    kills: tuple[tuple[str, int, int], ...]  # node, done, planned
    reconnects: int
    seconds: float


def bar(fraction: float, width: int = _BAR) -> str:
    """
    :return: a bar ``width`` characters wide, ``fraction`` of it full.
    """
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "#" * full + "." * (width - full)


def _faults(progress: Progress) -> str:
    kills = ", ".join(
        f"{node} {done}/{planned}" for node, done, planned in progress.kills
    )
    return (
        f"link cuts {progress.cuts}/{progress.cuts_planned}  kills {kills}  "
        f"reconnects {progress.reconnects}  {progress.seconds:.1f} s"
    )


def terminal_lines(progress: Progress) -> list[str]:
    """
    :return: the lines redrawn on a terminal.
    """
    lines = []
    for s in progress.streams:
        fraction = s.delivered / s.total if s.total else 1.0
        lines.append(
            f"{s.name}  [{bar(fraction)}] {s.delivered:>9,}/{s.total:,} "
            f"{fraction:4.0%}  {s.rate:>8,.0f} msg/s  pending {s.pending:>6,}"
        )
    lines.append(_faults(progress))
    return lines


def plain_line(progress: Progress) -> str:
    """
    :return: the periodic line written when the output is not a terminal.
    """
    streams = "  ".join(
        f"{s.name}: {s.delivered:,}/{s.total:,} ({s.rate:,.0f} msg/s, "
        f"pending {s.pending:,})"
        for s in progress.streams
    )
    return f"progress: {streams}  {_faults(progress)}"


class ProgressView:
    """
    Shows :class:`Progress` on ``out`` while the demo runs.

    :param snapshot: returns the figures to show now.
    :param terminal: redraw in place (a terminal) or write plain lines.
    :param clock: the reactor (``IReactorTime``).
    """

    def __init__(
        self,
        out: TextIO,
        snapshot: Callable[[], Progress],
        *,
        terminal: bool,
        clock: Any,
        plain_interval: float = 1.0,
    ) -> None:
        self._out = out
        self._snapshot = snapshot
        self._terminal = terminal
        self._drawn = 0
        self._call = LoopingCall(self.refresh)
        self._call.clock = clock
        self._interval = 0.1 if terminal else plain_interval

    def start(self) -> None:
        self._call.start(self._interval, now=False)

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    def _erase(self) -> None:
        if self._drawn:
            # To the start of the first line drawn, clearing to the end.
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self, lines: Sequence[str]) -> None:
        width = self._width()
        for line in lines:
            self._out.write(line[:width] + "\n")
        self._drawn = len(lines)

    def refresh(self) -> None:
        progress = self._snapshot()
        if self._terminal:
            self._erase()
            self._draw(terminal_lines(progress))
        else:
            self._out.write(plain_line(progress) + "\n")
        self._out.flush()

    def event(self, text: str) -> None:
        """
        Show an event (a cut, a kill) on a line of its own that stays.
        """
        if self._terminal:
            self._erase()
            self._out.write(text + "\n")
            self._draw(terminal_lines(self._snapshot()))
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def stop(self) -> None:
        """
        Stop redrawing; the last lines drawn stay on screen.
        """
        if self._call.running:
            self._call.stop()
        if self._terminal:
            self._erase()
            self._draw(terminal_lines(self._snapshot()))
            self._drawn = 0
            self._out.flush()
