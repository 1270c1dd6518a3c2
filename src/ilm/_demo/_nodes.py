"""
The demo's two nodes as the driver sees them: :class:`DemoNode`, one node
across its processes (its files, what it last reported), and
:class:`NodeProcess`, one of its processes (its reports in, its stderr to a
file).  What the reports mean to the run is the driver's business
(:class:`NodeHost`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Protocol

from twisted.python.failure import Failure

from ilm._demo._processes import ChildProcess, Supervised
from ilm._demo._relay import Relay

__all__ = ["DemoNode", "NodeHost", "NodeProcess"]


class NodeHost(Protocol):
    """What a node's processes tell the driver."""

    def reported(
        self, node: DemoNode, process: NodeProcess, report: dict[str, Any]
    ) -> None: ...

    def ended(self, node: DemoNode, process: NodeProcess, reason: Failure) -> None: ...


class NodeProcess(ChildProcess):
    """
    One process of a node: its reports (JSON lines on its stdout) in, its
    stderr to a file, and credit out on its stdin.
    """

    def __init__(self, node: DemoNode) -> None:
        ChildProcess.__init__(self)
        self.node = node
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                self.node.noise(line)
                continue
            self.node.host.reported(self.node, self, report)

    def errReceived(self, data: bytes) -> None:
        try:
            with open(self.node.stderr, "ab") as f:
                f.write(data)
        except OSError:
            sys.stderr.buffer.write(data)  # its directory is gone already

    def process_ended(self, reason: Failure) -> None:
        self.node.host.ended(self.node, self, reason)

    def send(self, line: str) -> None:
        """Write ``line`` to the process's stdin."""
        if self.alive and self.transport is not None:
            self.transport.write(line.encode() + b"\n")


class DemoNode(Supervised):
    """
    One node across its processes, and what it reported.

    :param relay: the relay in front of this node.
    """

    process: NodeProcess | None

    def __init__(
        self, host: NodeHost, node_id: int, peer: int, directory: str, relay: Relay
    ) -> None:
        Supervised.__init__(self)
        self.host = host
        self.id = node_id
        self.peer = peer
        self.name = f"node {node_id}"
        self.relay = relay
        self.store = os.path.join(directory, f"node{node_id}.sqlite")
        self.records = os.path.join(directory, f"node{node_id}.records")
        self.stderr = os.path.join(directory, f"node{node_id}.stderr")
        self.ready = False
        self.linked = False
        self.links_before = 0  # links counted by earlier processes
        self.links = 0
        self.sent = 0
        self.accepted = 0
        self.pending = 0
        self.delivered = 0  # the highest number of the peer's stream delivered
        self.error: str | None = None

    def spawn(
        self,
        reactor: Any,
        *,
        key_file: str,
        peer_port: int,
        messages: int,
        credit: int,
        directory: str,
    ) -> None:
        """
        Start a process of this node (:mod:`ilm._demo._node`), dialling its
        peer through the relay on ``peer_port``.
        """
        arguments = [
            "-m", "ilm._demo._node",
            "--id", str(self.id),
            "--peer", str(self.peer),
            "--store", self.store,
            "--records", self.records,
            "--key-file", key_file,
            "--dial", f"tcp:host=127.0.0.1:port={peer_port}",
            "--messages", str(messages),
            "--credit", str(credit),
            "--directory", directory,
        ]  # fmt: skip
        self.ready = False
        self.linked = False
        self.start(reactor, NodeProcess(self), arguments)

    def noise(self, line: bytes) -> None:
        """A line on the process's stdout that is not a report: to its log."""
        with open(self.stderr, "ab") as f:
            f.write(b"stdout: " + line + b"\n")

    def update(self, report: dict[str, Any]) -> None:
        self.sent = max(self.sent, int(report.get("sent", 0)))
        self.accepted = max(self.accepted, int(report.get("accepted", 0)))
        self.sent = max(self.sent, self.accepted)
        if "pending" in report:
            self.pending = int(report["pending"])
        self.delivered = max(self.delivered, int(report.get("delivered", 0)))
        if "linked" in report:
            self.linked = bool(report["linked"])
        self.links = max(self.links, int(report.get("links", 0)))

    @property
    def total_links(self) -> int:
        return self.links_before + self.links
