"""
ILM nodes on SQLite stores (real files, real threads, the real reactor):
a path is enough to get the durable default store, and a store that runs
out of space refuses new messages without losing accepted ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ilm import ILM, Message, SQLiteBackend
from ilm.backends._sqlite import inspect_store
from ilm.network import InMemoryNetwork


class Inbox:
    """
    A delivery target that records messages and fires waiters when a count
    is reached.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        for waiter in list(self._waiters):
            if len(self.messages) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def wait_for(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.messages) >= count:
            d.callback(None)
        else:
            self._waiters.append((count, d))
        return d

    def contents(self) -> list[bytes]:
        return [m.contents for m in self.messages]


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class PathBackendTests(TestCase):
    def directory(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    async def test_path_means_sqlite(self) -> None:
        """
        ILM(path, ...) and ILM.create(path, ...) with a ``str`` or a
        ``pathlib.Path`` use an SQLiteBackend on that file: two such nodes
        exchange messages, and after a shutdown the files hold the delivery
        marks and an empty outbox.
        """
        directory = self.directory()
        network = InMemoryNetwork(the_reactor())
        inbox1, inbox2 = Inbox(), Inbox()
        node = ILM(os.path.join(directory, "one.sqlite"), inbox1, network.add_peer(1))
        self.assertIsInstance(node._backend, SQLiteBackend)
        node.startService()
        other = await ILM.create(
            Path(directory) / "two.sqlite", inbox2, network.add_peer(2)
        )
        await node.when_started()
        receipt = await node.send_to(2, b"from one")
        await other.send_to(1, b"from two")
        await receipt.acknowledged
        await inbox1.wait_for(1)
        await node.shutdown()
        await other.shutdown()
        self.assertEqual(inbox2.contents(), [b"from one"])
        self.assertEqual(inbox1.contents(), [b"from two"])
        one = inspect_store(os.path.join(directory, "one.sqlite"))
        self.assertEqual(one.incarnation, node.incarnation)
        self.assertEqual(
            [(r.peer_id, r.acked, r.last_position) for r in one.outbound], [(2, 1, 1)]
        )
        self.assertEqual(
            [(r.peer_id, r.incarnation, r.delivered) for r in one.inbound],
            [(2, other.incarnation, 1)],
        )
