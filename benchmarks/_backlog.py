"""
Time to first delivery after a restart with a large backlog: the children
of :mod:`benchmarks.sqlite_backlog` (its ``BUILD`` and ``REOPEN`` scripts,
unchanged), run as roles of the harness.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

from benchmarks._harness import result
from benchmarks.sqlite_backlog import BUILD, REOPEN


def _run(script: str, *args: str) -> None:
    sys.argv = ["-c", *args]
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(script, "<sqlite_backlog>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    lines = [line for line in output.getvalue().splitlines() if line.startswith("{")]
    result(json.loads(lines[-1]))


def build(options: dict[str, Any]) -> None:
    _run(BUILD, options["path"], str(options["backlog"]), str(options["size"]))


def reopen(options: dict[str, Any]) -> None:
    _run(REOPEN, options["path"], str(options["size"]), str(options["drain"]))
