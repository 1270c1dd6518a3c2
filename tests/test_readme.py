"""
The README's Basic Example is examples/basic.py, verbatim, and runs in a
fresh interpreter; the quick start runs the demo and the test suite.  (The
demo itself is tested in tests/test_demo.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


class ReadmeTests(SynchronousTestCase):
    def test_basic_example(self) -> None:
        """
        The README's first Python block (the Basic Example) is
        examples/basic.py character for character, and that file runs to
        completion with its assertions holding.
        """
        code = readme_blocks("python")[0]
        self.assertIn('send_to(2, b"\\x01\\x02\\x03")', code)
        example = ROOT / "examples" / "basic.py"
        self.assertEqual(example.read_text(), code)
        result = run([sys.executable, str(example)])
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_quick_start(self) -> None:
        """
        The README opens with a two-command quick start: one runs the demo, one
        the test suite (the same command .ci/run calls).
        """
        [quick] = readme_blocks("sh")[:1]
        commands = [line for line in quick.splitlines() if line.strip()]
        self.assertEqual(len(commands), 2)
        self.assertIn("ilm demo", commands[0])
        self.assertIn("twisted.trial tests", commands[1])
        self.assertIn(commands[1], (ROOT / ".ci" / "run").read_text())
