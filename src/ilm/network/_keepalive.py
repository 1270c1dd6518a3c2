"""
:class:`Keepalive`: one link's keepalive.  Once the link is up, a LINK_PING
goes out after every ``keepalive_interval`` in which nothing was written;
a link on which nothing arrived (or nothing was read, while reading from a
peer that does not read is stopped) for ``idle_timeout`` is dead, typically
half-open after a host or network failure.  It also answers the peer's
LINK_PINGs (:meth:`Keepalive.link_frame`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall

import ilm.network._wire as _wire
from ilm._peerid import PeerId
from ilm.errors import UnexpectedFrame
from ilm.network._settings import LinkSettings
from ilm.network._writer import LinkWriter

__all__ = ["Keepalive"]


class Keepalive:
    """
    :param settings: the intervals.
    :param writer: the link's writer (whether anything was written, and its
        flow control state).
    :param later: ``later(delay, function)`` schedules ``function`` on the
        connection's clock (guarded).
    :param send: writes a link frame (kind, body).
    :param dead: the link is dead, for the given reason.

    :ivar received: whether anything arrived since the last interval (set
        by the connection on every read).
    """

    __slots__ = (
        "_call",
        "_dead",
        "_later",
        "_send",
        "_settings",
        "_silent_ticks",
        "_tokens",
        "_writer",
        "peer_id",
        "received",
    )

    def __init__(
        self,
        settings: LinkSettings,
        writer: LinkWriter,
        later: Callable[[float, Callable[[], object]], IDelayedCall],
        send: Callable[[int, bytes], None],
        dead: Callable[[str], None],
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._later = later
        self._send = send
        self._dead = dead
        self._call: IDelayedCall | None = None
        self._silent_ticks = 0
        self._tokens = itertools.count(1)
        self.peer_id: PeerId | None = None
        self.received = False

    def start(self, peer_id: PeerId | None) -> None:
        """
        The link is up: tick every ``keepalive_interval``.
        """
        self.peer_id = peer_id
        self._call = self._later(self._settings.keepalive_interval, self._tick)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _tick(self) -> None:
        self._call = None
        dead = self.silence()
        if dead is not None:
            self._dead(dead)
            return
        writer = self._writer
        if not writer.sent and not writer.paused:
            self._send(_wire.LINK_PING, _wire.encode_token(next(self._tokens)))
        writer.sent = False
        self._call = self._later(self._settings.keepalive_interval, self._tick)

    def link_frame(self, kind: int, body: bytes) -> None:
        """
        A link frame other than a session frame arrived on the open link:
        a LINK_PING is answered, a LINK_PONG (or an empty CARRY) checked.

        :raises ProtocolViolation: the frame is malformed, or has no
            business on an open link.
        """
        if kind == _wire.LINK_PING:
            token = _wire.decode_token(body, "LINK_PING")
            if self._writer.paused:
                # The peer is not reading: owe it one LINK_PONG (the latest),
                # written when the link resumes, instead of one per LINK_PING.
                self._writer.pending_pong = token
            else:
                self._send(_wire.LINK_PONG, _wire.encode_token(token))
        elif kind == _wire.LINK_PONG:
            _wire.decode_token(body, "LINK_PONG")
        elif kind == _wire.CARRY:
            _wire.decode_carry(body)
        else:
            raise UnexpectedFrame(
                f"{_wire.FRAME_NAMES[kind]} frame on a link that is up"
            )

    def silence(self) -> str | None:
        """
        One keepalive interval passed: count it as silent unless something
        arrived (and was read) in it.

        :return: why the link is dead, once silent for ``idle_timeout``
            (``None``: alive).
        """
        settings = self._settings
        writer = self._writer
        heard, self.received = self.received, False
        if heard and not writer.reading_stopped:
            self._silent_ticks = 0
            return None
        self._silent_ticks += 1
        if self._silent_ticks * settings.keepalive_interval < settings.idle_timeout:
            return None
        if writer.reading_stopped:
            return (
                f"peer {self.peer_id!r} read nothing of the {writer.unsent} bytes "
                f"waiting for it for {settings.idle_timeout} s while this node "
                f"had stopped reading from it"
            )
        return (
            f"nothing received from {self.peer_id!r} for "
            f"{settings.idle_timeout} s: the link is dead (half-open)"
        )
