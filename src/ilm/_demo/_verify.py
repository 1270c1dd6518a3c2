"""
The demo's verifier: what each receiving application was delivered, checked
against what each sender's store accepted.  Pure: records in, a
:class:`Summary` out; no processes, files or clocks.

A stream (one direction) carries the numbers 1, 2, 3, ...: the sending
application hands number *n* to ``send_to`` only after *n* - 1, and resumes
after a restart from ``ILM.last_message_id`` + 1, so number *n* is stored at
position (``message_id``) *n*, and the numbers 1..``accepted`` are exactly
what the sender's store accepted.  Each delivery the receiving application
recorded is checked, in the order it was recorded:

- **corrupt**: its contents failed their checksum, or its number is not its
  position (the sender repeated or skipped a number);
- **out of order**: a number delivered for the first time after a higher
  one;
- **repeat inside the window**: a number delivered again, at the start of a
  receiver process that follows a SIGKILL of the previous one, in one
  ascending contiguous run of at most ``window`` numbers ending no higher
  than the highest delivered before: the documented at-least-once window
  (docs/protocol.md, "Durability: what is durable when": deliveries after
  the start of the receiver's last durable commit, never more than the
  flow-control window);
- **repeat outside the window**: any other repeat (inside one process, after
  a clean restart, not contiguous, or reaching back further than the
  window);
- **missing**: a number 1..``accepted`` never delivered;
- **never accepted**: a number delivered beyond ``accepted``;
- **webhook-id mismatch** (only for a stream whose deliveries carry an
  identifier, such as the webhook leg's ``webhook-id``): a repeat that does
  not carry the identifier of its number's first delivery, or two numbers
  with the same identifier: a receiver de-duplicating on it would be fooled.

The run passes when there is nothing missing, out of order, repeated outside
the window, corrupt, never accepted or with a mismatched identifier, and
the driver reported no failure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attr

# How many examples of each kind of problem a stream keeps for the report.
_EXAMPLES = 3


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ReceiverLife:
    """
    One receiver process's deliveries of one stream, in the order it
    recorded them: ``(position, number, sent_ns, received_ns)``, ``number``
    ``None`` where the contents failed their checksum.  ``killed``: the
    process ended with a SIGKILL (so the next one may repeat the window).
    ``ids``: empty, or each delivery's identifier (a webhook's
    ``webhook-id``), which must be the same for every delivery of a number
    and differ between numbers.
    """

    deliveries: Sequence[tuple[int, int | None, int, int]]
    killed: bool = False
    ids: Sequence[str] = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StreamEvidence:
    """
    What one direction's applications did.

    - ``name``: for people (``"node 1 -> node 2"``).
    - ``sent``: the highest number the sender handed to ``send_to``.
    - ``accepted``: the sender's ``ILM.last_message_id`` for the receiver,
      read from its store: the numbers 1..``accepted`` were accepted.
    - ``lives``: the receiver's processes, in order.
    """

    name: str
    sent: int
    accepted: int
    lives: Sequence[ReceiverLife]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StreamResult:
    """
    The verdict on one stream (see the module docstring for each count).
    ``latencies_ns`` (sorted) are send to first delivery;
    ``first_sent_ns`` / ``last_received_ns`` bound the stream in time
    (0 if nothing was delivered).  ``problems`` describes a few of each
    kind of problem.  ``checks_ids``: the deliveries carried identifiers
    (``id_mismatches`` counts the wrong ones).
    """

    name: str
    sent: int
    accepted: int
    delivered: int
    deliveries: int
    missing: int
    out_of_order: int
    repeats: int
    repeats_outside_window: int
    largest_repeat_run: int
    corrupt: int
    never_accepted: int
    latencies_ns: tuple[int, ...]
    first_sent_ns: int
    last_received_ns: int
    problems: tuple[str, ...]
    id_mismatches: int = 0
    checks_ids: bool = False

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.out_of_order
            or self.repeats_outside_window
            or self.corrupt
            or self.never_accepted
            or self.id_mismatches
        )

    @property
    def seconds(self) -> float:
        return max(0, self.last_received_ns - self.first_sent_ns) / 1e9

    @property
    def msgs_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


def verify_stream(evidence: StreamEvidence, window: int) -> StreamResult:
    """
    Check one stream's deliveries against what its sender accepted.

    :param window: the receiver's flow-control window (``Config.window``):
        the most one at-least-once run may repeat.
    """
    accepted = evidence.accepted
    seen: set[int] = set()
    highest = 0
    deliveries = out_of_order = repeats = outside = corrupt = mismatches = 0
    first_ids: dict[int, str] = {}
    id_numbers: dict[str, int] = {}
    checks_ids = False
    largest_run = 0
    latencies: list[int] = []
    first_sent = last_received = 0
    problems: dict[str, list[str]] = {}

    def note(kind: str, text: str) -> None:
        examples = problems.setdefault(kind, [])
        if len(examples) < _EXAMPLES:
            examples.append(text)

    previous_killed = False
    for index, life in enumerate(evidence.lives, 1):
        # A process that follows a SIGKILL may begin by delivering again a
        # run of what its predecessor delivered after its last durable mark.
        repeating = previous_killed
        run_next: int | None = None
        run = 0
        ids = life.ids or ()
        if ids:
            checks_ids = True
        for i, (position, number, sent_ns, received_ns) in enumerate(life.deliveries):
            deliveries += 1
            if number is None or number != position:
                corrupt += 1
                what = "failed its checksum" if number is None else f"held {number}"
                note("corrupt", f"position {position} {what}")
                continue
            if i < len(ids):
                identity = ids[i]
                first = first_ids.setdefault(number, identity)
                owner = id_numbers.setdefault(identity, number)
                if first != identity or owner != number:
                    mismatches += 1
                    note(
                        "webhook-id mismatch",
                        f"{number} delivered with {identity}"
                        + (
                            f", first delivered with {first}"
                            if first != identity
                            else f", the id of {owner}"
                        ),
                    )
            if number not in seen:
                seen.add(number)
                latencies.append(received_ns - sent_ns)
                if first_sent == 0 or sent_ns < first_sent:
                    first_sent = sent_ns
                last_received = max(last_received, received_ns)
                if number < highest:
                    out_of_order += 1
                    note("out of order", f"{number} delivered after {highest}")
                highest = max(highest, number)
                repeating = False
                continue
            if repeating and (
                number == run_next
                if run_next is not None
                else highest - window < number <= highest
            ):
                repeats += 1
                run += 1
                largest_run = max(largest_run, run)
                run_next = number + 1
                continue
            outside += 1
            repeating = False
            note(
                "repeat outside the window",
                f"{number} delivered again by receiver process {index}"
                + ("" if previous_killed else " (no kill before it)"),
            )
        previous_killed = life.killed

    delivered = sum(1 for number in seen if number <= accepted)
    never_accepted = len(seen) - delivered
    missing = accepted - delivered
    if missing:
        absent = (n for n in range(1, accepted + 1) if n not in seen)
        for number in absent:
            note("missing", f"{number} accepted, never delivered")
            if len(problems["missing"]) >= _EXAMPLES:
                break
    if never_accepted:
        for number in sorted(n for n in seen if n > accepted)[:_EXAMPLES]:
            note("never accepted", f"{number} delivered, only {accepted} accepted")
    latencies.sort()
    return StreamResult(
        name=evidence.name,
        sent=evidence.sent,
        accepted=accepted,
        delivered=delivered,
        deliveries=deliveries,
        missing=missing,
        out_of_order=out_of_order,
        repeats=repeats,
        repeats_outside_window=outside,
        largest_repeat_run=largest_run,
        corrupt=corrupt,
        never_accepted=never_accepted,
        latencies_ns=tuple(latencies),
        first_sent_ns=first_sent,
        last_received_ns=last_received,
        id_mismatches=mismatches,
        checks_ids=checks_ids,
        problems=tuple(
            f"{evidence.name}: {kind}: {text}"
            for kind, texts in problems.items()
            for text in texts
        ),
    )


def percentile(values: Sequence[int], fraction: float) -> int:
    """
    :return: the nearest-rank percentile of sorted ``values`` (0 if empty).
    """
    if not values:
        return 0
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Summary:
    """
    The verdict on a whole demo run.

    - ``streams``: per direction.
    - ``window``: the at-least-once window the repeats were checked against.
    - ``link_cuts``, ``kills`` (per node name), ``reconnects``: what the
      driver did and saw.
    - ``seconds``: the run's wall time, start to verdict.
    - ``failures``: what went wrong besides the deliveries (a node that died
      on its own, a stall, an interruption).
    - ``notes``: lines the table shows before the verdict (how a stream
      travelled).
    """

    streams: tuple[StreamResult, ...]
    window: int
    link_cuts: int
    kills: Mapping[str, int]
    reconnects: int
    seconds: float
    seed: int | None = None
    failures: tuple[str, ...] = ()
    node_errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def total(self, name: str) -> int:
        result: int = sum(getattr(stream, name) for stream in self.streams)
        return result

    @property
    def ok(self) -> bool:
        return not self.failures and all(stream.ok for stream in self.streams)

    @property
    def latencies_ns(self) -> list[int]:
        return sorted(n for stream in self.streams for n in stream.latencies_ns)

    @property
    def streaming_seconds(self) -> float:
        """From the first send to the last delivery, over every stream."""
        firsts = [s.first_sent_ns for s in self.streams if s.delivered]
        lasts = [s.last_received_ns for s in self.streams if s.delivered]
        if not firsts:
            return 0.0
        return max(0, max(lasts) - min(firsts)) / 1e9

    @property
    def msgs_per_s(self) -> float:
        seconds = self.streaming_seconds
        return self.total("delivered") / seconds if seconds else 0.0

    def problems(self) -> list[str]:
        return [*self.failures, *(p for s in self.streams for p in s.problems)]


def summarize(
    streams: Sequence[StreamEvidence],
    *,
    window: int,
    link_cuts: int,
    kills: Mapping[str, int],
    reconnects: int,
    seconds: float,
    seed: int | None = None,
    failures: Sequence[str] = (),
    node_errors: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Summary:
    """
    Verify every stream and gather the run's figures into a :class:`Summary`.
    """
    return Summary(
        streams=tuple(verify_stream(evidence, window) for evidence in streams),
        window=window,
        link_cuts=link_cuts,
        kills=dict(kills),
        reconnects=reconnects,
        seconds=seconds,
        seed=seed,
        failures=tuple(failures),
        node_errors=tuple(node_errors),
        notes=tuple(notes),
    )


def exit_status(summary: Summary) -> int:
    """
    :return: the demo's exit status: 0 if the run passed, else 1.
    """
    return 0 if summary.ok else 1


def _ms(nanoseconds: int) -> float:
    return round(nanoseconds / 1e6, 3)


def summary_json(summary: Summary) -> dict[str, Any]:
    """
    The summary as JSON-ready data: the totals (``sent``, ``accepted``,
    ``delivered``, ``missing``, ``out_of_order``, ``repeats``,
    ``repeats_outside_window``, ``link_cuts``, ``kills``, ``reconnects``,
    ``msgs_per_s``, ``p50_ms``, ``p99_ms``, ``seconds``), then the rest:
    the verdict, the window, kills per node, and each stream's figures.
    """
    latencies = summary.latencies_ns

    def stream(s: StreamResult) -> dict[str, Any]:
        return {
            "name": s.name,
            "sent": s.sent,
            "accepted": s.accepted,
            "delivered": s.delivered,
            "deliveries": s.deliveries,
            "missing": s.missing,
            "out_of_order": s.out_of_order,
            "repeats": s.repeats,
            "repeats_outside_window": s.repeats_outside_window,
            "largest_repeat_run": s.largest_repeat_run,
            "corrupt": s.corrupt,
            "never_accepted": s.never_accepted,
            "id_mismatches": s.id_mismatches,
            "msgs_per_s": round(s.msgs_per_s, 1),
            "p50_ms": _ms(percentile(s.latencies_ns, 0.5)),
            "p99_ms": _ms(percentile(s.latencies_ns, 0.99)),
        }

    return {
        "sent": summary.total("sent"),
        "accepted": summary.total("accepted"),
        "delivered": summary.total("delivered"),
        "missing": summary.total("missing"),
        "out_of_order": summary.total("out_of_order"),
        "repeats": summary.total("repeats"),
        "repeats_outside_window": summary.total("repeats_outside_window"),
        "link_cuts": summary.link_cuts,
        "kills": sum(summary.kills.values()),
        "reconnects": summary.reconnects,
        "msgs_per_s": round(summary.msgs_per_s, 1),
        "p50_ms": _ms(percentile(latencies, 0.5)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "seconds": round(summary.seconds, 3),
        "ok": summary.ok,
        "window": summary.window,
        "corrupt": summary.total("corrupt"),
        "never_accepted": summary.total("never_accepted"),
        "id_mismatches": summary.total("id_mismatches"),
        "kills_by_node": dict(summary.kills),
        "seed": summary.seed,
        "failures": list(summary.failures),
        "problems": summary.problems(),
        "node_errors": list(summary.node_errors),
        "streams": [stream(s) for s in summary.streams],
    }


def summary_table(summary: Summary) -> str:
    """
    The summary for people: a table with a column per stream and a total,
    the run's events, and the verdict with any problems.
    """
    streams = summary.streams

    def latency(values: Sequence[int]) -> str:
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        return f"{p50 / 1e6:,.1f} / {p99 / 1e6:,.1f}"

    def count(name: str) -> list[str]:
        return [f"{getattr(s, name):,}" for s in streams] + [f"{summary.total(name):,}"]

    rows = [
        ("", [s.name for s in streams] + ["total"]),
        ("sent (handed to send_to)", count("sent")),
        ("accepted (stored by the sender)", count("accepted")),
        ("delivered (distinct)", count("delivered")),
        ("missing", count("missing")),
        ("out of order", count("out_of_order")),
        (f"repeats inside the window (<= {summary.window:,})", count("repeats")),
        ("repeats outside the window", count("repeats_outside_window")),
        ("corrupt", count("corrupt")),
        ("delivered but never accepted", count("never_accepted")),
        *(
            [
                (
                    "repeats with another webhook-id",
                    [f"{s.id_mismatches:,}" if s.checks_ids else "-" for s in streams]
                    + [f"{summary.total('id_mismatches'):,}"],
                )
            ]
            if any(s.checks_ids for s in streams)
            else []
        ),
        (
            "throughput (msg/s)",
            [f"{s.msgs_per_s:,.0f}" for s in streams] + [f"{summary.msgs_per_s:,.0f}"],
        ),
        (
            "latency p50 / p99 (ms)",
            [latency(s.latencies_ns) for s in streams]
            + [latency(summary.latencies_ns)],
        ),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [
        max(len(cells[column]) for _, cells in rows) + 3
        for column in range(len(streams) + 1)
    ]
    lines = [
        label.ljust(label_width)
        + "".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        for label, cells in rows
    ]
    kills = ", ".join(f"{name} {n}" for name, n in summary.kills.items())
    lines.append(
        f"link cuts {summary.link_cuts}, SIGKILLs {sum(summary.kills.values())} "
        f"({kills}), reconnects {summary.reconnects}, "
        f"elapsed {summary.seconds:.1f} s"
        + ("" if summary.seed is None else f", seed {summary.seed}")
    )
    lines.extend(summary.notes)
    for error in summary.node_errors:
        lines.append(f"node log: {error}")
    if summary.ok:
        lines.append(
            "VERIFIED: every accepted message was delivered, in order; the only "
            "repeats were inside the at-least-once window."
        )
    else:
        lines.append("FAILED:")
        lines.extend(f"  {problem}" for problem in summary.problems())
    return "\n".join(lines)
