"""
Delivery targets: adapters that let a ``DeferredQueue`` or a plain callable
stand where an :class:`ilm.interfaces.ILocalDelivery` is expected.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    QueueOverflow,
    ensureDeferred,
)
from twisted.python.components import registerAdapter
from zope.interface import implementer

from ilm.interfaces import IBatchDelivery, ILocalDelivery, IMessage


@implementer(ILocalDelivery)
class QueueDelivery:
    """
    Deliver by putting each message on a ``DeferredQueue``.

    A queue created with a ``size`` refuses messages when full
    (``QueueOverflow``); ILM treats that as a failed delivery and retries
    with backoff, holding later messages from the same sender back.

    ILM hands a queue whose ``put`` and ``get`` are ``DeferredQueue``'s
    own several messages at a time (:meth:`put_run`): the same items in the
    same order as one ``put`` each, without waking the consumer once per
    message.
    """

    def __init__(self, queue: DeferredQueue[Any]) -> None:
        self.queue = queue

    def deliver(self, message: IMessage) -> None:
        self.queue.put(message)

    def runs(self) -> bool:
        """
        Whether :meth:`put_run` may stand for ``deliver`` called once per
        message: the queue's ``put`` and ``get`` are ``DeferredQueue``'s own
        (a subclass that overrides them gets every message through its
        ``put``).
        """
        kind = type(self.queue)
        return kind.put is DeferredQueue.put and kind.get is DeferredQueue.get

    def put_run(self, messages: Sequence[IMessage]) -> int:
        """
        Put the first of ``messages`` on the queue, in order, as many as
        ``put`` called for each in turn would take at least, and return
        how many that was.

        What the consumers see is what they would see after as many
        ``put`` calls: the items in the same order, each waiting ``get``
        given the next one.  The difference is the cost: the run is queued
        first and the waiting ``get`` calls are given their items after, so a
        consumer woken by the first takes the rest with ``get`` calls that
        return at once (``await queue.get()`` does not suspend), instead of
        being woken once per message.

        :raises QueueOverflow: if the queue, created with a ``size``, takes
            not even the first (as ``put`` would).
        """
        queue = self.queue
        pending = queue.pending
        waiting = queue.waiting
        count = len(messages)
        size = queue.size
        if size is not None:
            # A put hands its item to a waiting get, or queues it below
            # the size.
            room = len(waiting) + size - len(pending)
            if room <= 0:
                raise QueueOverflow()
            if count > room:
                count = room
                messages = messages[:count]
        pending.extend(messages)
        while waiting and pending:
            waiting.pop(0).callback(pending.pop(0))
        return count

    def __repr__(self) -> str:
        return f"QueueDelivery({self.queue!r})"


@implementer(IBatchDelivery)
class BatchQueueDelivery:
    """
    Deliver by putting lists of messages on a ``DeferredQueue``: each item
    the consumer gets is a list of consecutive messages from one sender
    (:class:`ilm.interfaces.IBatchDelivery`), one ``get`` for many messages.

    A queue created with a ``size`` counts lists, not messages; a full one
    refuses the list (``QueueOverflow``) and ILM retries with backoff.
    """

    def __init__(self, queue: DeferredQueue[Any]) -> None:
        self.queue = queue

    def deliver(self, message: IMessage) -> None:
        self.queue.put([message])

    def deliver_many(self, messages: Sequence[IMessage]) -> None:
        self.queue.put(list(messages))

    def __repr__(self) -> str:
        return f"BatchQueueDelivery({self.queue!r})"


@implementer(ILocalDelivery)
class CallableDelivery:
    """
    Deliver by calling ``function(message)``.

    The function may return ``None``, a ``Deferred`` or a coroutine (an
    ``async def`` function); raising or failing means "not delivered";
    any other value means delivered (:func:`delivery_outcome`).
    """

    def __init__(self, function: Callable[[IMessage], object]) -> None:
        self.function = function

    def deliver(self, message: IMessage) -> Deferred[Any] | None:
        return delivery_outcome(self.function(message))

    def __repr__(self) -> str:
        return f"CallableDelivery({self.function!r})"


registerAdapter(QueueDelivery, DeferredQueue, ILocalDelivery)


def delivery_outcome(result: object) -> Deferred[Any] | None:
    """
    The one rule for what a delivery returned, the same for an
    ``ILocalDelivery`` provider's ``deliver`` and for a plain callable:

    - a ``Deferred``: delivered once it fires; not delivered if it fails;
    - an awaitable (an ``async def`` function's coroutine): the same, run
      by ``ensureDeferred``;
    - anything else (``None``, ``42``, the cursor ``execute`` returned):
      delivered, now.  Returning normally means the message was taken, as
      ``docs/guide.md`` says; only raising or a failing Deferred means "not
      delivered".

    :return: ``None`` (delivered) or a Deferred that settles the delivery.
    """
    if result is None:
        return None
    if isinstance(result, Deferred):
        return result
    if inspect.isawaitable(result):
        return ensureDeferred(result)  # type: ignore[arg-type]
    return None


def as_delivery(target: object) -> ILocalDelivery:
    """
    Turn a delivery target into an :class:`ILocalDelivery`.

    Accepts a provider of ``ILocalDelivery``, anything adaptable to it (a
    ``DeferredQueue``), or a callable taking one message.

    :raises TypeError: for anything else.
    """
    if ILocalDelivery.providedBy(target):
        return target  # type: ignore[return-value]
    adapted = ILocalDelivery(target, None)
    if adapted is not None:
        return adapted  # type: ignore[no-any-return]
    if callable(target):
        return CallableDelivery(target)
    raise TypeError(
        "the delivery target must provide ILocalDelivery, be a DeferredQueue "
        f"or be callable, not {type(target).__name__}"
    )
