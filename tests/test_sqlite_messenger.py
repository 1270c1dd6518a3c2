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
from ilm.backends import InMemoryBackend
from ilm.backends._sqlite import inspect_store
from ilm.errors import ShutdownTimeout, StoreFull
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


class StoreFullTests(TestCase):
    async def test_full_store_refuses_then_recovers(self) -> None:
        """
        With its SQLite store at its size limit, a node's send_to fails with
        StoreFull while ILM keeps running: messages accepted before are
        still delivered, in order; once the limit is raised, sends succeed
        again and take the next positions (the failed ones are reused).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        reactor = the_reactor()
        network = InMemoryNetwork(reactor)
        backend = SQLiteBackend(
            os.path.join(directory, "sender.sqlite"), max_size=64 * 1024
        )
        inbox = Inbox()
        sender = await ILM.create(backend, lambda m: None, network.add_peer(1))
        self.addCleanup(sender.shutdown, 5)
        receiver = await ILM.create(InMemoryBackend(), inbox, network.add_peer(2))
        self.addCleanup(receiver.shutdown, 5)
        network.cut(1, 2)
        accepted = [b"early %d " % i + b"." * 100 for i in range(20)]
        receipts = [await d for d in [sender.send_to(2, p) for p in accepted]]
        too_big = [sender.send_to(2, b"B" * 200_000), sender.send_to(2, b"small")]
        for d in too_big:
            await self.assertFailure(d, StoreFull)
        later = await sender.send_to(2, b"fits")
        self.assertEqual(later.message_id, 21)
        network.restore(1, 2)
        await receipts[-1].acknowledged
        await later.acknowledged
        await inbox.wait_for(21)
        self.assertEqual(inbox.contents(), [*accepted, b"fits"])
        self.assertEqual([m.message_id for m in inbox.messages], list(range(1, 22)))
        await backend.set_max_size(None)
        big = await sender.send_to(2, b"B" * 200_000)
        self.assertEqual(big.message_id, 22)
        await big.acknowledged
        await inbox.wait_for(22)
        self.assertEqual(inbox.contents()[-1], b"B" * 200_000)
        self.assertEqual(len(inbox.messages), 22)
        # The refused commit was logged (store_commit_failed).
        self.assertEqual(len(self.flushLoggedErrors(StoreFull)), 1)


class RestoredBackupTests(TestCase):
    timeout = 60

    async def test_restored_store_needs_a_new_incarnation(self) -> None:
        """
        A sender's store restored from a backup taken before its last sends
        is refused by the receiver (PeerStoreRegressed: the receiver has
        delivered positions beyond the backup, which the restored store
        would reuse).  After ``reincarnate_store`` the same restored store
        starts a new stream: every message sent after the restore arrives,
        under the new incarnation.
        """
        from twisted.logger import globalLogPublisher

        from ilm.backends._sqlite import reincarnate_store

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "sender.sqlite")
        backup = os.path.join(directory, "backup.sqlite")
        reactor = the_reactor()
        # The link refused below comes back (to nobody) a millisecond later,
        # not half a second after the test has ended.
        network = InMemoryNetwork(reactor, reconnect_delay=0.001)
        inbox = Inbox()
        receiver = await ILM.create(InMemoryBackend(), inbox, network.add_peer(2))
        self.addCleanup(receiver.shutdown, 5)

        async def sender_sends(contents: list[bytes]) -> ILM:
            sender = await ILM.create(path, lambda m: None, network.add_peer(1))
            receipts = [await sender.send_to(2, c) for c in contents]
            await receipts[-1].acknowledged
            await sender.shutdown(5)
            return sender

        first = await sender_sends([b"a%d" % i for i in range(5)])
        Path(backup).write_bytes(Path(path).read_bytes())
        await sender_sends([b"b%d" % i for i in range(5)])
        await inbox.wait_for(10)
        Path(path).write_bytes(Path(backup).read_bytes())

        refused: Deferred[dict[str, Any]] = Deferred()

        def observe(event: dict[str, Any]) -> None:
            if event.get("ilm_event") == "protocol_violation" and not refused.called:
                # No more attempts: the link stays cut until the store has
                # its new incarnation.
                network.cut(1, 2)
                refused.callback(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        restored = await ILM.create(path, lambda m: None, network.add_peer(1))
        self.assertEqual(restored.incarnation, first.incarnation)
        await restored.send_to(2, b"after restore")
        event = await refused.addTimeout(30, reactor)
        self.assertEqual(event["kind"], "PeerStoreRegressed")
        await restored.shutdown(1).addErrback(lambda f: f.trap(ShutdownTimeout))
        network.restore(1, 2)

        old, new = reincarnate_store(path)
        self.assertEqual(old, first.incarnation)
        reborn = await ILM.create(path, lambda m: None, network.add_peer(1))
        self.addCleanup(reborn.shutdown, 5)
        self.assertEqual(reborn.incarnation, new)
        last = await reborn.send_to(2, b"after reincarnation")
        await last.acknowledged
        await inbox.wait_for(12)
        tail = [(m.source_incarnation, m.contents) for m in inbox.messages[10:]]
        self.assertEqual(tail, [(new, b"after restore"), (new, b"after reincarnation")])
        self.assertEqual(
            [m.contents for m in inbox.messages[:10]],
            [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(5)],
        )
