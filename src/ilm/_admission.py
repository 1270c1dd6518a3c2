"""
Whether a send may go ahead: :class:`Admission`, the one check of
``send_to``'s slow path and of ``send_many`` (the node's state, this node's
own id, the message size, a peer the network can never reach, the peer's
outbox limits), with sends made before the start held in line and every
refusal counted by reason (``stats().refused``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail

from ilm._lifecycle import NodeLife
from ilm._link import PeerRouter
from ilm._node import NodeCore
from ilm._peerid import PeerId
from ilm._sender import PeerSender
from ilm.errors import (
    MessageTooLarge,
    NotRunning,
    OutboxFull,
    SendRefused,
    SendToSelf,
    UnknownPeer,
)

__all__ = ["Admission", "as_bytes_list"]


def as_bytes_list(contents: Iterable[bytes]) -> list[bytes]:
    """
    ``send_many``'s messages as a list of ``bytes``.

    :raises TypeError: if ``contents`` is one bytes-like value or a string,
        or holds something that is not bytes-like.
    """
    if isinstance(contents, bytes | bytearray | memoryview | str):
        raise TypeError("contents must be an iterable of bytes, not one value")
    messages = []
    for each in contents:
        if type(each) is not bytes:
            if not isinstance(each, bytes | bytearray | memoryview):
                raise TypeError(f"contents must be bytes, not {type(each).__name__}")
            each = bytes(each)
        messages.append(each)
    return messages


class Admission:
    """
    The admission check of one node's sends.
    """

    def __init__(self, core: NodeCore, router: PeerRouter, life: NodeLife) -> None:
        self._core = core
        self._router = router
        self._life = life

    def not_accepting(
        self, peer_id: PeerId, count: int, send: Callable[[], Deferred[Any]]
    ) -> Deferred[Any]:
        """
        A send while the node does not accept them: held until the start
        (``send`` is made then), or refused.
        """
        life = self._life
        held = life.hold(send, count)
        if held is not None:
            return held
        if life.shutting_down:
            refusal: SendRefused = NotRunning(
                f"ILM node {self._core.local_id!r} is shutting down"
            )
        elif life.state in ("new", "starting"):
            refusal = OutboxFull(
                peer_id, "messages", self._core.config.max_outbox_messages
            )
        else:
            refusal = NotRunning(f"ILM node {self._core.local_id!r} is {life.state}")
        return self.refuse(refusal)

    def admit(
        self, peer_id: PeerId, count: int, size: int, largest: int
    ) -> PeerSender | SendRefused:
        """
        Whether ``count`` messages of ``size`` bytes together (the largest
        ``largest``) may be sent to ``peer_id`` now.

        :return: the peer's sender, or the refusal.
        """
        if peer_id == self._core.local_id:
            return SendToSelf(f"{peer_id!r} is this node's own id")
        limit = self._core.config.max_message_size
        if largest > limit:
            return MessageTooLarge(largest, limit)
        peer = self._core.peers.get(peer_id)
        if peer is None or not peer.sendable:
            if not self._core.linkable(peer_id):
                return UnknownPeer(
                    f"the network can never have a link to peer {peer_id!r} "
                    f"(a {type(peer_id).__name__}): no key, certificate pin "
                    f"or certificate authority could authenticate it; "
                    f"check the peer id"
                )
            if peer is None:
                peer = self._router.new_peer(peer_id)
            peer.sendable = True
        return peer.sender.refusal(count, size, largest) or peer.sender

    def refuse(self, refusal: SendRefused) -> Deferred[Any]:
        """
        A send refused: counted by reason (``stats().refused``).
        """
        self._core.count_refusal(refusal.reason)
        return fail(refusal)
