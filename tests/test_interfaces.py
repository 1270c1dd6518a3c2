"""
Every interface provider passes verifyObject; the public modules re-export
the private implementations.
"""

from __future__ import annotations

import importlib

import attr
from twisted.application.service import IService
from twisted.internet.defer import DeferredQueue
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

import ilm
from ilm import ILM, CallableDelivery, Message, QueueDelivery, as_delivery
from ilm._link import PeerRouter
from ilm._message import make_message
from ilm.interfaces import IBackend, IFrameReceiver, ILocalDelivery, IMessage, INetwork
from ilm.testing import InMemoryBackend, InMemoryNetwork, TestMessage


class ProviderTests(SynchronousTestCase):
    def test_backends(self) -> None:
        """
        InMemoryBackend provides IBackend.
        """
        verifyObject(IBackend, InMemoryBackend())

    def test_networks(self) -> None:
        """
        The in-memory network's nodes provide INetwork; ILM's link-event sink
        provides IFrameReceiver.
        """
        network = InMemoryNetwork(Clock())
        verifyObject(INetwork, network.add_peer(1))
        node = ILM(InMemoryBackend(), print, network.add_peer(2), clock=Clock())
        verifyObject(IFrameReceiver, node._router)
        self.assertIsInstance(node._router, PeerRouter)
        verifyObject(IService, node)

    def test_internal_providers(self) -> None:
        """
        The simulator's delivery target and the fuzz command's frame receiver
        provide their interfaces.
        """
        from ilm.network.fuzz import _NothingExpected
        from ilm.simulation._world import _Delivery

        verifyObject(IFrameReceiver, _NothingExpected())
        verifyObject(
            ILocalDelivery,
            _Delivery(None, None, None, False),  # type: ignore[arg-type]
        )

    def test_messages(self) -> None:
        """
        Message and TestMessage provide IMessage.
        """
        verifyObject(IMessage, Message(1, 2, 3, b"x"))
        verifyObject(IMessage, TestMessage(1, 2))
        verifyClass(IMessage, Message)

    def test_make_message(self) -> None:
        """
        ``make_message`` (the receiving path's) makes what ``Message`` makes:
        equal, same hash and repr, frozen; ``Message`` has nothing its
        ``__init__`` would run besides setting the fields.
        """
        made = make_message("a", 2, 3, b"x" * 40, "ab" * 16)
        plain = Message("a", 2, 3, b"x" * 40, "ab" * 16)
        self.assertEqual(made, plain)
        self.assertEqual(hash(made), hash(plain))
        self.assertEqual(repr(made), repr(plain))
        self.assertIs(type(made), Message)
        self.assertRaises(
            attr.exceptions.FrozenInstanceError, setattr, made, "message_id", 4
        )
        for field in attr.fields(Message):
            self.assertIsNone(field.validator)
            self.assertIsNone(field.converter)
        self.assertFalse(hasattr(Message, "__attrs_post_init__"))
        self.assertFalse(hasattr(Message, "__attrs_pre_init__"))

    def test_delivery_adapters(self) -> None:
        """
        A DeferredQueue and a callable adapt to ILocalDelivery; a provider is
        used as is; anything else is refused.
        """
        queue: DeferredQueue[object] = DeferredQueue()
        adapted = as_delivery(queue)
        self.assertIsInstance(adapted, QueueDelivery)
        verifyObject(ILocalDelivery, adapted)
        self.assertIsInstance(ILocalDelivery(queue), QueueDelivery)
        function = as_delivery(print)
        self.assertIsInstance(function, CallableDelivery)
        verifyObject(ILocalDelivery, function)
        self.assertIs(as_delivery(adapted), adapted)
        self.assertRaises(TypeError, as_delivery, 42)


class PublicNameTests(SynchronousTestCase):
    def test_reexports(self) -> None:
        """
        Every name in a public module's __all__ exists and, where it comes
        from a private module, is that private object.
        """
        for module_name in (
            "ilm",
            "ilm.testing",
            "ilm.backends",
            "ilm.network",
            "ilm.errors",
            "ilm.interfaces",
        ):
            module = importlib.import_module(module_name)
            for name in module.__all__:
                value = getattr(module, name)
                origin = getattr(value, "__module__", None)
                if origin and origin.startswith("ilm."):
                    owner = importlib.import_module(origin)
                    self.assertIs(
                        getattr(owner, name, value), value, (module_name, name)
                    )
        self.assertIs(ilm.ILM, importlib.import_module("ilm._messenger").ILM)
