"""
The user documentation says what holds: the README's commands run as
written after its own quick start (the daemon's among them, for real), the
guide and the daemon's page are linked from it, and the guide lists every
log event ILM emits.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .test_stream_sockets import free_port

ROOT = Path(__file__).resolve().parent.parent


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def commands(block: str) -> list[str]:
    """
    The commands of a shell block, continuation lines joined, comments
    dropped.
    """
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def log_events() -> set[str]:
    """
    Every ``ilm_event`` name in the source: the constants given as
    ``ilm_event=...`` or as an error class's ``ilm_event``, and those
    returned by functions that choose one (``..._event``).
    """
    names: set[str] = set()
    for path in (ROOT / "src" / "ilm").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "ilm_event":
                if isinstance(node.value, ast.Constant):
                    names.add(node.value.value)
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == "ilm_event"
                and isinstance(node.value, ast.Constant)
            ):
                # An error class's event (``ilm_event: ClassVar[str] = ...``).
                names.add(node.value.value)
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_event"):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return) and isinstance(
                        inner.value, ast.Constant
                    ):
                        names.add(inner.value.value)
    return names


class ReadmeTests(SynchronousTestCase):
    def test_links(self) -> None:
        """
        The README links the guide and the daemon's page, and both exist.
        """
        readme = (ROOT / "README.md").read_text()
        for page in ("docs/guide.md", "docs/daemon.md"):
            self.assertTrue(f"]({page})" in readme, page)
            self.assertTrue((ROOT / page).exists(), page)

    def test_commands_use_the_quick_start_venv(self) -> None:
        """
        After the quick start (which installs into .venv without activating
        it), every command the README shows runs ILM's programs from
        .venv/bin: none assumes an activated environment.
        """
        readme = ROOT / "README.md"
        lines = [
            command for block in blocks(readme, "sh")[1:] for command in commands(block)
        ]
        programs = re.compile(r"(^|[;&|(]\s*)(python|twistd|ilm|pip|trial)\b")
        for command in lines:
            self.assertIsNone(programs.search(command), command)
        inline = re.findall(r"`((?:python|twistd|ilm|pip) [^`]*)`", readme.read_text())
        for span in inline:
            # Names of commands in prose (`twistd ilm`, `ilm demo`) are fine;
            # a command line with options is written as it runs.
            self.assertNotRegex(span, r"^(python|twistd) .*--", span)

    def test_daemon_command_runs(self) -> None:
        """
        The README's daemon commands, run as written (on a free port), make
        a keys file readable by its owner only and start a node that runs
        until SIGTERM stops it cleanly.
        """
        [block] = [b for b in blocks(ROOT / "README.md", "sh") if "twistd -n ilm" in b]
        keys_command, twistd_command = commands(block)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        subprocess.run(["bash", "-c", keys_command], cwd=directory, check=True)
        self.assertEqual(
            os.stat(os.path.join(directory, "keys.txt")).st_mode & 0o077, 0
        )
        bin_directory = Path(sys.executable).parent
        arguments = [
            argument.replace(".venv/bin/", f"{bin_directory}/")
            for argument in shlex.split(twistd_command)
        ]
        port = free_port()
        arguments = [a.replace("tcp:9001", f"tcp:{port}") for a in arguments]
        log_path = os.path.join(directory, "out.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*arguments[:1], "--pidfile=", *arguments[1:]],
                cwd=directory,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while "ILM node 2 running" not in Path(log_path).read_text():
                self.assertIsNone(process.poll(), Path(log_path).read_text())
                self.assertLess(time.monotonic(), deadline, "the node never ran")
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(60), -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.assertIn("ILM node 2 stopped", Path(log_path).read_text())


class GuideTests(SynchronousTestCase):
    def test_every_log_event_listed(self) -> None:
        """
        The guide (or, for the daemon's own events, docs/daemon.md) names
        every ``ilm_event`` the source emits.
        """
        listed = (ROOT / "docs" / "guide.md").read_text() + (
            ROOT / "docs" / "daemon.md"
        ).read_text()
        events = log_events()
        self.assertIn("link_established", events)
        self.assertIn("spoofed_peer", events)
        missing = sorted(name for name in events if f"`{name}`" not in listed)
        self.assertEqual(missing, [])

    def test_every_error_names_a_listed_event(self) -> None:
        """
        Every ILM error class names, in ``ilm_event``, a log event the
        guide (or docs/daemon.md) lists.
        """
        import ilm.errors

        listed = (ROOT / "docs" / "guide.md").read_text() + (
            ROOT / "docs" / "daemon.md"
        ).read_text()
        for name in ilm.errors.__all__:
            error = getattr(ilm.errors, name)
            self.assertIn(f"`{error.ilm_event}`", listed, name)
        self.assertEqual(ilm.errors.StoreCorrupt.ilm_event, "store_broken")

    def test_examples_exist(self) -> None:
        """
        Every example file the guide links exists, and the guide's code
        quoted from them is theirs.
        """
        guide = (ROOT / "docs" / "guide.md").read_text()
        linked = set(re.findall(r"\(\.\./(examples/[\w.]+)\)", guide))
        self.assertEqual(linked, {"examples/sender.py", "examples/receiver.py"})
        sender = (ROOT / "examples" / "sender.py").read_text()
        for line in (
            "done = node.last_message_id(RECEIVER)",
            "receipt = await node.send_to(RECEIVER, payload(number))",
            "assert receipt.message_id == number",
        ):
            self.assertIn(line, guide)
            self.assertIn(line, sender)
        receiver = (ROOT / "examples" / "receiver.py").read_text()
        self.assertIn('"INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)"', receiver)
        self.assertIn('"INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)"', guide)
