"""
The ``ilm`` command (also ``python -m ilm``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task


def _demo(args: argparse.Namespace) -> int:
    from ilm._demo import main

    def run(reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(main(reactor))

    task.react(run)
    return 0  # pragma: no cover (react exits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ilm",
        description="Intersession Layer Messaging for Twisted.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser("demo", help="run the two-node demo")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
