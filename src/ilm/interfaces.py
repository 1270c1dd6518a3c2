"""
The contracts between ILM and what it is plugged into.

- :class:`IMessage`: a message as the application sees it.
- :class:`ILocalDelivery`: where received messages go (the application).
- :class:`IBackend`: where ILM keeps what must survive a crash.
- :class:`INetwork` and :class:`IFrameReceiver`: how frames travel between
  nodes, and how the network reports links and frames back to ILM.

Peer ids are ``int`` (in ``[0, 2**63)``) or ``str`` (1 to 255 UTF-8 bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from ilm._peerid import PeerId
    from ilm._store import CommitResult, StoreBatch, StoredState


class IMessage(Interface):
    """
    One application message.
    """

    source_id = Attribute("The id of the node that sent the message.")
    destination_id = Attribute("The id of the node the message is for.")
    message_id = Attribute(
        "An ``int`` the sender assigned: the message's position in the ordered "
        "stream from ``source_id`` to ``destination_id`` (1, 2, 3, ...). "
        "Unique within one incarnation of the sender's store."
    )
    contents = Attribute("The payload, ``bytes``.")


class ILocalDelivery(Interface):
    """
    The application end of ILM: receives every message exactly once per
    sender, in the order the sender sent them.
    """

    def deliver(message: IMessage) -> Deferred[object] | None:
        """
        Hand one message to the application.

        Return ``None`` when the message has been taken, or a ``Deferred`` that
        fires when it has.  Raising, or a ``Deferred`` that fails, means "not
        delivered": ILM logs the failure and delivers the same message again
        later (with backoff), holding back every later message from the same
        sender until it succeeds.  Messages from other senders are not held.

        ILM never calls ``deliver`` for a message while an earlier one from the
        same sender is still pending.
        """


class IBatchDelivery(ILocalDelivery):
    """
    A delivery target that takes several messages from one sender at once:
    for an application that stores what it receives in one transaction per
    batch, or hands it on in bulk, and should not pay for a call (and a
    Deferred) per message.

    ILM calls :meth:`deliver_many` instead of ``deliver`` when the target
    provides this interface.
    """

    def deliver_many(messages: Sequence[IMessage]) -> Deferred[object] | None:
        """
        Hand consecutive messages from one sender (one incarnation of it) to
        the application, in order: ``messages[i + 1].message_id ==
        messages[i].message_id + 1``.  A call carries at most what is queued
        from that sender, which the receive window bounds.

        The rule of ``ILocalDelivery.deliver`` applies to the whole list:
        ``None`` or a ``Deferred`` that fires means every message was taken;
        raising or a failing ``Deferred`` means none was: ILM delivers the
        same messages again later (with backoff), perhaps in a list of a
        different length, holding back later messages from the same sender.
        A target that can take only part of a list must therefore take all
        or nothing (one transaction), or de-duplicate by ``message_id``.

        ILM never calls it while an earlier call for the same sender is
        still pending.
        """


class IBackend(Interface):
    """
    Durable storage for one node: the outbox, the inbound delivery marks and
    the per-peer protocol state.

    Durability contract:

    - ``open`` returns the state as of the last successful ``commit``; a
      crash at any moment loses only batches whose ``commit`` Deferred had not
      fired.
    - ``commit`` applies a whole :class:`ilm.StoreBatch` atomically: when its
      Deferred fires, everything in the batch is durable; when it fails,
      nothing of the batch was applied, with one exception:
      :class:`ilm.errors.StoreInDoubt` says the batch may or may not have been
      applied (the commit's own I/O failed).  A backend that reports it must
      refuse every later ``commit`` until it is opened again, so that no
      position is reused on a guess (reads may go on: ILM transmits only
      positions it knows are stored); ``open`` then returns what is really
      stored.
    - ILM never calls ``commit`` again before the previous call's Deferred has
      fired, so batches are applied in the order they were committed.
    - ``read_outbound`` sees everything committed before it was called.
    - ILM acknowledges a message to its sender only after the ``commit`` that
      recorded its delivery mark has fired, and transmits a message only after
      the ``commit`` that stored it has fired.
    """

    def open() -> Deferred[StoredState]:
        """
        Open (creating if needed) the store.

        :return: a ``Deferred`` firing with an :class:`ilm.StoredState`.  A new
            store gets a fresh random incarnation id, persisted before this
            fires.  Each peer's retired incarnations come in the order they
            were retired (ILM forgets the oldest first).  Fails with a
            :class:`ilm.errors.StoreError` subclass.
        """

    def commit(batch: StoreBatch) -> Deferred[CommitResult]:
        """
        Durably and atomically apply an :class:`ilm.StoreBatch` (its
        ``forgotten`` records are deleted before its marks and retirements
        apply).  Check it first with :func:`ilm._store.check_batch`, as the
        bundled backends do: a batch that fails the check applies nothing.

        :return: a ``Deferred`` firing with an :class:`ilm.CommitResult` once
            the batch is durable, or failing with a
            :class:`ilm.errors.StoreError` (nothing applied), or with
            :class:`ilm.errors.StoreInDoubt` (perhaps applied; the backend
            refuses further commits until reopened).
        """

    def read_outbound(
        peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        """
        Read stored outbound messages to ``peer_id``.

        ILM asks for what its cache has room for, and keeps all it gets:
        a backend should not read (from disk, over a network) contents it
        will not return, so that what a backlog costs to read is what is
        sent.

        :return: a ``Deferred`` firing with a list of ``bytes``: the
            contents at positions ``after + 1``, ``after + 2``, ... in order,
            at most ``limit`` of them and at most ``max_bytes`` bytes of
            contents in all, except that the first is returned whatever its
            size (so a message larger than ``max_bytes`` is read alone);
            stopping early at the end of the outbox.  Positions at or below
            the peer's acknowledged point are not returned.
            (:func:`ilm._store.within_bytes` applies the byte limit to a
            list.)
        """

    def close() -> Deferred[None]:
        """
        Release the store.  Returns a ``Deferred`` that fires when closed.
        """


class IFrameReceiver(Interface):
    """
    What a network reports to ILM.  ILM provides it; networks call it.

    For each peer there is at most one link at a time.  Frames sent on a link
    arrive in order or not at all (a network may drop or duplicate frames;
    ILM recovers), and no frame of a link is reported after its
    ``link_lost``.
    """

    def link_established(peer_id: PeerId) -> None:
        """
        A link to ``peer_id`` is up; frames may now be exchanged with it.
        """

    def link_lost(peer_id: PeerId, reason: Failure) -> None:
        """
        The link to ``peer_id`` is gone.  ``reason`` is a ``Failure``.
        """

    def frame_received(peer_id: PeerId, frame: bytes) -> None:
        """
        A frame arrived from ``peer_id`` on its current link.  ``peer_id`` is
        the peer the network authenticated, never a value read from the frame.
        """

    # A receiver may also have ``frames_received(peer_id, frames)``: several
    # frames from ``peer_id``, in order (a ``list`` of ``bytes``), as one
    # call; the same as ``frame_received`` for each, in turn.  A network that
    # reads several frames at once (the stream network: those of one socket
    # read) may call it instead, so that the receiver handles them together;
    # ILM's receiver takes consecutive MESSAGES frames as one run.  Networks
    # that do not simply call ``frame_received``.

    def link_paused(peer_id: PeerId) -> None:
        """
        The link to ``peer_id`` cannot take more data for now; ILM writes
        nothing more to it until ``link_resumed`` (neither data nor
        replies: it keeps at most one ACK, NACK and HELLO it owes, and
        sends them on resume).
        """

    def link_resumed(peer_id: PeerId) -> None:
        """
        The link to ``peer_id`` can take data again.
        """


class INetwork(Interface):
    """
    A custom network layer: carries ILM frames between this node and its
    peers.
    """

    local_id = Attribute("This node's id.")

    # A network that limits the size of the frames it carries may also expose
    # ``max_frame_size`` (an ``int``): ILM then refuses, when it is created, a
    # ``Config`` whose frames could exceed it.
    #
    # A network that knows it can never have a link to some peers (a stream
    # network authenticates only peers it has a key, a certificate pin or a
    # certificate authority for) may also expose ``can_link(peer_id) ->
    # bool``: ILM then refuses sends to a peer for which it returns ``False``
    # with :class:`ilm.errors.UnknownPeer` instead of storing them forever.
    # Networks where any peer may appear later omit it (or return ``True``).
    #
    # A network that dials a fixed set of peers may also expose
    # ``dialled_peers() -> frozenset[PeerId]``: ILM's start line then says
    # how many it dials (the network logs who and where).
    #
    # Such a network may also expose ``hold_dials()``, ``dial(peer_id)`` and
    # ``stop_dialling(peer_id)``: with a store shared by several gateways
    # (``ilm.backends.IStreamOwnership``), ILM then holds every dial and has
    # a configured peer dialled only while this gateway owns its stream
    # (docs/scaling.md).

    def start(receiver: IFrameReceiver) -> Deferred[None] | None:
        """
        Begin reporting links and frames to ``receiver``.

        :return: ``None`` or a ``Deferred`` that fires once started.
        """

    def stop() -> Deferred[None] | None:
        """
        Close every link and stop.  No events are reported after the returned
        ``Deferred`` (or ``None``) fires.
        """

    def connected_peers() -> frozenset[PeerId]:
        """
        :return: a ``frozenset`` of the ids of peers with a link up now.
        """

    def send_frames(peer_id: PeerId, frames: Sequence[bytes]) -> None:
        """
        Send a sequence of frames (``bytes``) to ``peer_id`` on its current
        link, in order.  Frames for a peer without a link are discarded.
        """

    def close_link(peer_id: PeerId, reason: Exception) -> None:
        """
        Close the current link to ``peer_id`` because of ``reason`` (usually a
        :class:`ilm.errors.ProtocolViolation`).  ``link_lost`` follows.
        """


__all__ = [
    "IBackend",
    "IBatchDelivery",
    "IFrameReceiver",
    "ILocalDelivery",
    "IMessage",
    "INetwork",
]
