"""
The summary and the manners of ``python -m ilm.simulation``: what is lost
by design is labelled as such, fault kinds that cannot happen on the chosen
network are left out, and usage errors go to the streams ``main`` is
given.
"""

from __future__ import annotations

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from ilm.simulation import Scenario
from ilm.simulation._runner import frame_faults, main, scenario_for


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def line(summary: str, label: str) -> str:
    [found] = [text for text in summary.splitlines() if text.startswith(label)]
    return found


class SummaryTests(SynchronousTestCase):
    def test_loss_by_design_labelled(self) -> None:
        """
        Messages that went with a deleted store are counted as lost by
        design, naming the deleted store.
        """
        status, out, _ = run("--seeds", "8")
        self.assertEqual(status, 0, out)
        lost = line(out, "lost ")
        self.assertRegex(
            lost,
            r"^lost        \d+ by design, with their sender's deleted store "
            r"\(\d+ of them accepted\)$",
        )

    def test_fault_kinds_of_the_network(self) -> None:
        """
        On the in-memory network the summary counts dropped, duplicated and
        delayed frames; on the stream network, which has no such faults,
        it leaves them out.
        """
        self.assertTrue(frame_faults(Scenario()))
        self.assertFalse(frame_faults(scenario_for(3, "memory", "stream")))
        _, memory, _ = run("--seeds", "3")
        self.assertRegex(
            line(memory, "faults"), r"^faults      cut \d+, drop \d+, duplicate \d+"
        )
        status, stream, _ = run("--seeds", "3", "--network", "stream")
        self.assertEqual(status, 0, stream)
        faults = line(stream, "faults")
        self.assertRegex(faults, r"^faults      cut \d+, crash \d+")
        for kind in ("drop", "duplicate", "delay "):
            self.assertNotIn(kind, faults)

    def test_usage_errors_on_the_given_stream(self) -> None:
        """
        A usage error is written to the error stream ``main`` was given,
        not to the process's, and exits with status 2.
        """
        leaked = io.StringIO()
        self.patch(sys, "stderr", leaked)
        for arguments, message in [
            (["--seeds", "0"], "--seeds must be at least 1"),
            (["--nodes", "1"], "nodes must be between 2 and 64"),
            (["--network", "udp"], "invalid choice: 'udp'"),
        ]:
            err = io.StringIO()
            error = self.assertRaises(SystemExit, main, arguments, io.StringIO(), err)
            self.assertEqual(error.code, 2)
            self.assertIn(message, err.getvalue())
            self.assertIn("usage: python -m ilm.simulation", err.getvalue())
        self.assertEqual(leaked.getvalue(), "")
