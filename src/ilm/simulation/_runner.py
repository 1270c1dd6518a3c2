"""
Run seeds, sum their results up, and the ``python -m ilm.simulation``
command.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import IO

import attr

from ilm.simulation._sqlite import SQLiteStoreModel
from ilm.simulation._store import MemoryStoreModel, StoreModel
from ilm.simulation._stream import StreamSimulation, stream_network
from ilm.simulation._world import Scenario, SimulatedNetwork, World, memory_network

STORES: dict[str, Callable[[], StoreModel]] = {
    "memory": MemoryStoreModel,
    "sqlite": SQLiteStoreModel,
}
"""The stores ``--store`` names: each makes a :class:`StoreModel`."""

NETWORKS: dict[str, Callable[..., SimulatedNetwork]] = {
    "memory": memory_network,
    "stream": stream_network,
}
"""The networks ``--network`` names: ``Scenario(network=...)`` factories."""


def scenario_for(
    nodes: int = 3, store: str = "memory", network: str = "memory"
) -> Scenario:
    """
    The scenario the command line runs: ``nodes`` nodes on the named store
    and network (keys of :data:`STORES` and :data:`NETWORKS`).
    """
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}: use one of {sorted(STORES)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}: use one of {sorted(NETWORKS)}")
    return Scenario(nodes=nodes, store_model=STORES[store](), network=NETWORKS[network])


def scenario_options(scenario: Scenario) -> tuple[str, ...]:
    """
    The command-line options (beyond ``--nodes``) that select
    ``scenario``'s store and network, when they are ones the command line
    knows and not the defaults.
    """
    options: list[str] = []
    store = getattr(scenario.store_model, "name", None)
    if store in STORES and store != "memory":
        options += ["--store", store]
    for name, factory in NETWORKS.items():
        if scenario.network is factory and name != "memory":
            options += ["--network", name]
    return tuple(options)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SeedResult:
    """
    The outcome of one seed.

    - ``violations``: every broken invariant (empty when the seed passed).
    - ``stats``: counters (messages, faults injected by kind, duplicates in
      the allowed windows, ...).
    - ``trace``: the last lines of the run's trace.
    - ``digest``: a hash of the whole trace; a replay of the same seed and
      scenario gives the same digest.
    """

    seed: int
    nodes: int
    violations: tuple[str, ...]
    stats: Counter[str]
    trace: tuple[str, ...]
    digest: str
    options: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations


def run_seed(
    seed: int, scenario: Scenario | None = None, *, trace: IO[str] | None = None
) -> SeedResult:
    """
    Simulate one seed.

    :param scenario: what to simulate (the default :class:`Scenario` if
        omitted).
    :param trace: if given, every event of the run is written to it as it
        happens (for debugging a replay).
    """
    if scenario is None:
        scenario = Scenario()
    world = World(seed, scenario, trace=trace)
    world.run()
    return SeedResult(
        seed=seed,
        nodes=scenario.nodes,
        violations=tuple(world.violations),
        stats=world.stats,
        trace=tuple(world.trace_tail),
        digest=world.digest,
        options=scenario_options(scenario),
    )


@attr.s(slots=True, auto_attribs=True)
class Summary:
    """
    The outcome of many seeds: how many ran, the failed ones, the summed
    counters and the wall time.
    """

    seeds: int = 0
    failures: list[SeedResult] = attr.ib(factory=list)
    stats: Counter[str] = attr.ib(factory=Counter)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def run_seeds(
    seeds: Iterable[int],
    scenario: Scenario | None = None,
    *,
    on_result: Callable[[SeedResult], None] | None = None,
    stop_after: int | None = None,
) -> Summary:
    """
    Simulate every seed in ``seeds``.

    :param on_result: called with each :class:`SeedResult` as it completes.
    :param stop_after: stop once this many seeds have failed.
    """
    summary = Summary()
    started = time.perf_counter()
    for seed in seeds:
        result = run_seed(seed, scenario)
        summary.seeds += 1
        summary.stats.update(result.stats)
        if not result.ok:
            summary.failures.append(result)
        if on_result is not None:
            on_result(result)
        if stop_after is not None and len(summary.failures) >= stop_after:
            break
    summary.wall_seconds = time.perf_counter() - started
    return summary


def replay_command(seed: int, nodes: int, options: Sequence[str] = ()) -> str:
    """
    The command that replays one seed with its full trace.

    :param options: the options selecting the store and network
        (:func:`scenario_options`).
    """
    extra = "".join(f" {option}" for option in options)
    return (
        f"python -m ilm.simulation --seeds 1 --start {seed} --nodes {nodes}"
        f"{extra} --verbose"
    )


def format_failure(result: SeedResult, tail: int = 60) -> str:
    """
    What to print about a failed seed: the violations, the end of its trace
    and the command that replays it.
    """
    lines = [f"seed {result.seed} FAILED:"]
    lines += [f"  {v}" for v in result.violations]
    lines.append(f"  last {min(tail, len(result.trace))} trace lines:")
    lines += [f"    {line}" for line in result.trace[-tail:]]
    lines.append(
        f"  replay: {replay_command(result.seed, result.nodes, result.options)}"
    )
    return "\n".join(lines)


def frame_faults(scenario: Scenario) -> bool:
    """
    Whether ``scenario``'s network has the per-frame faults (drop,
    duplicate, delay): a stream network has not (a stream loses, repeats or
    reorders no single frame).
    """
    network: object = StreamSimulation if scenario.network is stream_network else None
    return bool(getattr(network, "frame_faults", True))


def format_summary(
    summary: Summary,
    first_seed: int,
    nodes: int,
    options: Sequence[str] = (),
    *,
    frame_faults: bool = True,
) -> str:
    """
    The summary printed at the end of a run of seeds.

    :param options: the store and network options of the run, if any.
    :param frame_faults: whether the network had per-frame faults (drop,
        duplicate, delay); the summary leaves them out otherwise.
    """
    s = summary.stats
    duplicates = s["duplicates_receiver_crash"] + s["duplicates_receiver_store_loss"]
    last = first_seed + summary.seeds - 1
    rate = summary.seeds / summary.wall_seconds if summary.wall_seconds else 0.0
    return "\n".join(
        [
            f"seeds       {summary.seeds} ({first_seed}..{last}), {nodes} nodes, "
            f"{len(summary.failures)} failed"
            + (f" ({' '.join(options)})" if options else ""),
            f"messages    sent {s['messages_sent']}, accepted "
            f"{s['messages_accepted']}, refused {s['messages_refused']}, in "
            f"doubt after a crash {s['messages_in_doubt_landed']} stored + "
            f"{s['messages_in_doubt_lost']} not stored"
            + (
                f" ({s['messages_store_in_doubt']} of them failed with StoreInDoubt)"
                if s["messages_store_in_doubt"]
                else ""
            ),
            f"delivered   {s['messages_delivered']} messages in "
            f"{s['deliveries']} deliveries",
            f"duplicates  {duplicates} inside the at-least-once windows "
            f"(receiver crash "
            f"{s['duplicates_receiver_crash']}, receiver store loss "
            f"{s['duplicates_receiver_store_loss']})",
            f"lost        {s['lost_with_sender_store']} by design, with their "
            f"sender's deleted store ({s['lost_with_sender_store_accepted']} of "
            f"them accepted)",
            f"faults      cut {s['fault_cut']}, "
            + (
                f"drop {s['fault_drop']}, duplicate {s['fault_duplicate']}, delay "
                f"{s['fault_delay']}, "
                if frame_faults
                else ""
            )
            + "crash "
            f"{s['fault_crash']} (at random {s['fault_crash_at_random']}, in commit "
            f"{s['fault_crash_in_commit']}, after commit "
            f"{s['fault_crash_after_commit']}, after delivery "
            f"{s['fault_crash_after_delivery']}"
            + (
                f", restarted by a supervisor after store_broken "
                f"{s['fault_crash_store_broken']}"
                if s["fault_crash_store_broken"]
                else ""
            )
            + "; commit in flight landed "
            f"{s['crash_commit_landed']}, lost {s['crash_commit_lost']}), store "
            f"loss {s['fault_store_loss']}, delivery failure "
            f"{s['fault_delivery_failure']} ({s['delivery_refusals']} refusals), "
            f"commit failure {s['fault_commit_failure']}, shutdown "
            f"{s['fault_shutdown']} ({s['shutdown_clean']} clean, "
            f"{s['shutdown_timed_out']} timed out)",
            *_layer_lines(s),
            f"restarts    {s['restarts']}",
            f"simulated   {s['sim_seconds']} s in {s['steps']} steps",
            f"wall time   {summary.wall_seconds:.1f} s ({rate:.1f} seeds/s)",
            f"violations  {sum(len(f.violations) for f in summary.failures)}",
        ]
    )


def _layer_lines(s: Counter[str]) -> list[str]:
    """
    The summary lines about the stream network and the stores' errors, when
    they have anything to say.
    """
    lines = []
    if s["fault_abort"] or s["fault_half_open"] or s["fault_stall"]:
        lines.append(
            f"stream      connections aborted {s['fault_abort']}, half-open "
            f"{s['fault_half_open']}, stalled {s['fault_stall']}; crashes whose "
            f"connections vanished silently {s['crash_silent']}; link timeouts "
            f"{s['event_link_timeout']}, links established "
            f"{s['event_link_established']}, duplicate connections closed "
            f"{s['event_duplicate_link']}, links replaced "
            f"{s['event_link_replaced']}, paused by a full buffer {s['link_paused']}"
        )
    errors = sorted(
        (k.removeprefix("store_error_"), v)
        for k, v in s.items()
        if k.startswith("store_error_") and v
    )
    if errors:
        faults = sorted(
            (k.removeprefix("store_fault_"), v)
            for k, v in s.items()
            if k.startswith("store_fault_") and v
        )
        lines.append(
            "store       failed commits: "
            + ", ".join(f"{name} {count}" for name, count in errors)
            + (
                "; commits made while the store was "
                + ", ".join(f"{name} {count}" for name, count in faults)
                if faults
                else ""
            )
        )
    return lines


class _Progress:
    """
    A progress bar on a plain text stream.
    """

    def __init__(self, stream: IO[str], total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.failed = 0
        self.started = time.perf_counter()
        self.last = 0.0
        self.tty = stream.isatty()
        self.last_decile = -1

    def update(self, result: SeedResult) -> None:
        self.done += 1
        self.failed += not result.ok
        now = time.perf_counter()
        if self.tty:
            if now - self.last < 0.2 and self.done < self.total:
                return
            self.last = now
            self.stream.write("\r" + self._bar(now))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            decile = self.done * 10 // self.total
            if decile == self.last_decile and self.done < self.total:
                return
            self.last_decile = decile
            self.stream.write(self._bar(now) + "\n")
        self.stream.flush()

    def interrupt(self) -> None:
        if self.tty:
            self.stream.write("\n")

    def _bar(self, now: float) -> str:
        width = 30
        filled = width * self.done // self.total
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"seeds, {self.failed} failed, {elapsed:.0f}s elapsed, ~{left:.0f}s left"
        )


def main(
    argv: Sequence[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    ``python -m ilm.simulation``: run seeds, print a summary, and for each
    failed seed its violations and the command that replays it.

    :return: the exit status: 0 when every seed passed, 1 otherwise.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m ilm.simulation",
        description="Run ILM nodes through seeded fault schedules and check "
        "exactly-once, in-order delivery.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--nodes", type=int, default=3, help="ILM nodes per seed")
    parser.add_argument(
        "--store",
        choices=sorted(STORES),
        default="memory",
        help="the nodes' store: the simulated in-memory store (default) or "
        "real SQLite files",
    )
    parser.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        default="memory",
        help="what links the nodes: the in-memory network (default) or the "
        "real stream network over in-memory pipes",
    )
    parser.add_argument(
        "--gateways",
        type=int,
        default=0,
        help="the multi-gateway mode: a remote node streaming to one node "
        "served by this many gateway processes over one store that enforces "
        "epochs (take-overs, gateway-store partitions, deposed gateways)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="write every event of each seed (use it to replay one seed)",
    )
    # argparse writes help and usage errors to sys.stdout and sys.stderr:
    # send them where this run's output goes.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        args = parser.parse_args(argv)
        if args.seeds < 1:
            parser.error("--seeds must be at least 1")
        if args.gateways:
            from ilm.simulation._gateways import run_gateway_seeds

            return run_gateway_seeds(
                args.start, args.seeds, args.gateways, out, args.verbose
            )
        try:
            scenario = scenario_for(args.nodes, args.store, args.network)
        except ValueError as error:
            parser.error(str(error))
    progress = None if args.verbose else _Progress(err, args.seeds)
    summary = Summary()
    started = time.perf_counter()
    try:
        for seed in range(args.start, args.start + args.seeds):
            if args.verbose:
                out.write(f"--- seed {seed}\n")
            result = run_seed(seed, scenario, trace=out if args.verbose else None)
            summary.seeds += 1
            summary.stats.update(result.stats)
            if not result.ok:
                summary.failures.append(result)
                if progress is not None and progress.tty:
                    err.write("\n")
                out.write(format_failure(result) + "\n")
            if progress is not None:
                progress.update(result)
    except KeyboardInterrupt:
        if progress is not None:
            progress.interrupt()
        out.write("interrupted\n")
    summary.wall_seconds = time.perf_counter() - started
    options = scenario_options(scenario)
    out.write(
        format_summary(
            summary,
            args.start,
            args.nodes,
            options,
            frame_faults=frame_faults(scenario),
        )
        + "\n"
    )
    if summary.failures:
        out.write("failed seeds: " + " ".join(str(f.seed) for f in summary.failures))
        out.write("\n")
        return 1
    return 0
