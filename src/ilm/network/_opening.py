"""
:class:`LinkOpening`: how one connection becomes a link, from its first
frame to the owner's choice.  It drives the connection's
:class:`~ilm.network._handshake.LinkHandshake` (starts it, feeds it the
frames received while handshaking, switches the frame codecs to the keys it
agreed), checks the deciding peer's LINK_UP, times the whole opening out,
and says why a dialled connection closed before it became the link.

The :class:`~ilm.network._protocol.ILMProtocol` keeps the connection's
state and asks this object only before the link is open: nothing here is on
the path of a session frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

import ilm.network._wire as _wire
from ilm._peerid import PeerId
from ilm.errors import LinkTimeout, ProtocolViolation, UnexpectedFrame
from ilm.network._dial_failure import never_linked
from ilm.network._election import decides
from ilm.network._handshake import LinkHandshake, PreSharedKeys
from ilm.network._states import HANDSHAKING
from ilm.network._tls import TLSCredentials, certificate_identity
from ilm.network._writer import LinkWriter

__all__ = ["LinkOpening"]


class LinkOpening:
    """
    The opening of one connection (see the module docstring).

    :param handshake: the connection's link handshake.
    :param local_id: this node's id.
    :param keys: the node's pre-shared keys, if it uses any.
    :param tls: the node's TLS credentials, if it uses TLS.
    :param timeout: seconds from the connection to the owner's choice.
    :param writer: where the handshake's frames go.
    :param parser: where received frames come from (its opener is set once
        the handshake agreed frame keys).
    """

    def __init__(
        self,
        handshake: LinkHandshake,
        *,
        local_id: PeerId,
        keys: PreSharedKeys | None,
        tls: TLSCredentials | None,
        timeout: float,
        writer: LinkWriter,
        parser: _wire.FrameParser,
    ) -> None:
        self._handshake = handshake
        self._local_id = local_id
        self._keys = keys
        self._tls = tls
        self._timeout = timeout
        self._writer = writer
        self._parser = parser
        self._timer: IDelayedCall | None = None

    @property
    def claimed_id(self) -> PeerId | None:
        """The id the peer claims (``None``: it claimed none yet)."""
        return self._handshake.claimed_id

    def start(
        self,
        later: Callable[[float, Callable[[], None]], IDelayedCall],
        expired: Callable[[], None],
    ) -> None:
        """
        Start the timeout (``expired`` is called through ``later`` when it
        runs out) and send the handshake's first frames, if this side
        speaks first.

        :raises ProtocolViolation: the handshake cannot start.
        """
        self._timer = later(self._timeout, expired)
        frames = self._handshake.start()
        if frames:
            self._writer.write(frames)

    def cancel(self) -> None:
        """Stop the timeout: the link is open, or the connection closed."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def expired(self) -> None:
        """The timeout ran out (its call is no longer pending)."""
        self._timer = None

    def timed_out(self, state: str) -> LinkTimeout:
        """
        :return: why a connection still in ``state`` when the timeout ran
            out is closed.
        """
        stage = (
            self._handshake.state
            if state == HANDSHAKING
            else "waiting for the link to be chosen"
        )
        return LinkTimeout(
            f"link handshake not complete within {self._timeout} s (state: {stage})"
        )

    def receive(self, kind: int, body: bytes, transport: Any) -> PeerId | None:
        """
        A frame received while handshaking: the handshake's replies are
        written; once it is done, the codecs use the frame keys it agreed.

        :return: the authenticated peer, once this frame completed the
            handshake; else ``None`` (see :attr:`refusal`).
        :raises ProtocolViolation: the frame breaks the handshake.
        """
        handshake = self._handshake
        replies = handshake.receive(
            kind, body, lambda: self._certificate_identity(transport)
        )
        if replies:
            self._writer.write(replies)
        if handshake.refusal is not None or not handshake.done:
            return None
        keys = handshake.frame_keys
        if keys is not None:
            self._writer.sealer = _wire.FrameSealer(keys[0])
            self._parser.opener = _wire.FrameOpener(keys[1])
        return handshake.peer_id

    @property
    def refusal(self) -> ProtocolViolation | None:
        """
        Why the handshake refused the peer after replying (the reply, this
        node's proof, must reach the peer before the connection closes).
        """
        return self._handshake.refusal

    def link_up(self, kind: int, body: bytes, peer_id: PeerId) -> None:
        """
        A frame received once authenticated, before the owner's choice:
        only the deciding peer's LINK_UP may come now.

        :raises ProtocolViolation: it is anything else.
        """
        if kind == _wire.LINK_UP and not decides(self._local_id, peer_id):
            _wire.check_empty(body, "LINK_UP")
            return
        raise UnexpectedFrame(
            f"{_wire.FRAME_NAMES[kind]} frame while waiting for the link to be chosen"
        )

    def never_linked(self, was: str, reason: Failure) -> BaseException:
        """
        :return: what a dialled connection lost in state ``was``, before it
            became the link, most likely means.
        """
        return never_linked(
            was,
            self._handshake.state,
            reason,
            local_id=self._local_id,
            keys=self._keys is not None,
            tls=self._tls is not None,
        )

    def _certificate_identity(self, transport: Any) -> PeerId:
        tls = self._tls
        assert tls is not None
        return certificate_identity(transport, tls)
