"""
``ilm demo``: two ILM nodes as separate processes stream messages to each
other over TCP while their link is cut and each is SIGKILLed and restarted;
beside them, messages go in over HTTP to one ``twistd ilm`` daemon and out
of another through a webhook while the receiving daemon is SIGKILLed and
restarted; at the end, what each application received is verified against
what was accepted.

- :mod:`ilm._demo._driver`: runs the processes, the faults, the progress
  and the verdict, with :mod:`ilm._demo._nodes` (a node across its
  processes), :mod:`ilm._demo._processes` (spawning, stopping and killing
  them), :mod:`ilm._demo._faults` (injecting the faults as they fall due),
  :mod:`ilm._demo._figures` (the figures shown) and
  :mod:`ilm._demo._outcome` (the evidence handed to the verifier).
- :mod:`ilm._demo._node`: one node's process (an ordinary ILM application).
- :mod:`ilm._demo._verify`: the verifier, pure.
- :mod:`ilm._demo._plan`: the seeded fault schedule, pure.
- :mod:`ilm._demo._records`: message contents and delivery records.
- :mod:`ilm._demo._relay`: the TCP relay that cuts the link.
- :mod:`ilm._demo._progress`: the live progress lines.
- :mod:`ilm._demo._http`: the HTTP leg (two daemons, the HTTP sender, the
  webhook receiver).

The verifier knows nothing of how a stream travelled: it takes, per stream,
what the sender's store accepted and what the receiving application
recorded.  The HTTP leg has a sender that posts the numbered messages to a
daemon's API and a webhook receiver that records them the same way.

This module imports nothing heavy: ``ilm --help`` stays fast.
"""

from __future__ import annotations

import argparse

TAMPERING = ("missing", "reorder", "repeat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add the ``ilm demo`` options to ``parser``.
    """
    parser.description = (
        "Run two ILM nodes as separate processes, each with its own SQLite "
        "store, streaming numbered messages to each other over TCP loopback "
        "while their link is cut and each is SIGKILLed and restarted; beside "
        "them, post messages over HTTP to one twistd ilm daemon and receive "
        "them from another through a signed webhook while the receiving "
        "daemon is SIGKILLed and restarted; then check what each application "
        "received against what was accepted. "
        "Exit status: 0 verified, 1 not, 128 + N if stopped by signal N."
    )
    parser.add_argument(
        "--messages",
        type=_positive,
        default=100_000,
        metavar="N",
        help="messages each way (default: 100,000)",
    )
    parser.add_argument(
        "--http-messages",
        type=_positive,
        default=1_000,
        metavar="N",
        help="messages on the HTTP leg: posted to one twistd ilm daemon's "
        "HTTP API, delivered by another to a webhook (default: 1,000)",
    )
    parser.add_argument(
        "--no-http",
        action="store_true",
        help="skip the HTTP leg (no twistd daemons)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="the seed of the fault schedule (default: random, printed)",
    )
    parser.add_argument(
        "--cuts",
        type=_not_negative,
        default=5,
        metavar="N",
        help="link cuts (default: 5)",
    )
    parser.add_argument(
        "--kills",
        type=_not_negative,
        default=2,
        metavar="N",
        help="SIGKILLs of each node (default: 2)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object on stdout, as the last line "
        "(the progress and the table go to stderr)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (stores, records, node logs)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help=argparse.SUPPRESS,
    )
    # Puts one fault into what the verifier is given, to show that it is
    # caught and fails the run (tests/test_demo.py).
    parser.add_argument("--tamper", choices=TAMPERING, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """
    Run the demo with the parsed options.

    :return: the exit status.
    """
    from ilm._demo._driver import run as run_demo

    return run_demo(args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value
