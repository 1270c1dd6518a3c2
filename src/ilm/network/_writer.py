"""
:class:`LinkWriter`: what one connection writes, and its flow control
while paused.

Session frames go out each in a CARRY link frame (tagged on a link with
frame integrity), a whole batch in one write: straight to the socket when
it is small and the TCP transport holds nothing (:meth:`LinkWriter.attach`),
else through the transport's ``writeSequence``.  While the link
is paused (its transport's buffer is full: the peer is not reading),
LINK_PONGs are not written but owed (only the latest); the bytes written
to the peer and received from it are counted, and once either passes
``LinkSettings.max_unsent_bytes`` the connection is to stop reading from
the peer (so that it can neither provoke more replies nor keep the link
alive by sending) until its buffer drains.  The writer counts and writes;
the protocol decides what to do about a peer that does not read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import ITransport
from twisted.internet.tcp import Connection

import ilm.network._wire as _wire

__all__ = ["DIRECT_LIMIT", "LinkWriter"]

DIRECT_LIMIT = 4096
"""
The largest write that goes straight to an idle TCP socket (see
:meth:`LinkWriter.attach`); larger ones are Twisted's to write.
"""


class LinkWriter:
    """
    :param limit: ``max_unsent_bytes``.

    :ivar transport: where to write (``None`` until connected).
    :ivar sealer: tags frames once the link is authenticated with frame
        integrity (``None``: untagged).
    :ivar sent: whether anything was written since the keepalive last
        cleared it.
    :ivar paused: whether the transport's buffer is full.
    :ivar unsent: bytes written to the peer since the link paused.
    :ivar unread: bytes received from the peer since the link paused.
    :ivar pending_pong: the token of the LINK_PONG owed (``None``: none).
    :ivar reading_stopped: whether the connection stopped reading from the
        peer.
    """

    __slots__ = (
        "_limit",
        "_socket",
        "paused",
        "pending_pong",
        "reading_stopped",
        "sealer",
        "sent",
        "transport",
        "unread",
        "unsent",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._socket: Any = None
        self.transport: ITransport | None = None
        self.sealer: _wire.FrameSealer | None = None
        self.sent = False
        self.paused = False
        self.unsent = 0
        self.unread = 0
        self.pending_pong: int | None = None
        self.reading_stopped = False

    def attach(self, transport: ITransport) -> None:
        """
        Write to ``transport`` from now on.

        On a plain TCP connection (Twisted's own, without TLS), a small
        write finds the transport's buffer empty most of the time (an ACK,
        one message of a peer sending at its own pace): it then goes to the
        socket at once, in one ``send``, instead of into the buffer, which
        costs two ``epoll`` changes and a reactor turn per write.  Whatever
        the socket does not take, and every write while the transport holds
        data, goes through the transport as before, so bytes keep their
        order.
        """
        self.transport = transport
        self._socket = (
            transport.getHandle() if isinstance(transport, Connection) else None
        )

    def _put(self, parts: list[bytes]) -> None:
        transport: Any = self.transport
        socket = self._socket
        if (
            socket is not None
            and not transport._tempDataLen
            and not transport.dataBuffer
            and transport.connected
            and not transport.disconnecting
            and not transport.TLS
            and not transport._writeDisconnected
        ):
            data = b"".join(parts)
            if len(data) <= DIRECT_LIMIT:
                try:
                    sent = socket.send(data)
                except OSError:
                    # EAGAIN, or a failing connection: the transport's
                    # own write finds out and reports it.
                    sent = 0
                if sent < len(data):
                    transport.write(data[sent:])
                return
        transport.writeSequence(parts)

    def send_session_frames(self, frames: Iterable[bytes]) -> bool:
        """
        Write session frames, each in a CARRY link frame, in one
        ``writeSequence``.

        :return: whether to stop reading from the peer (paused, and past
            the limit).
        """
        parts: list[bytes] = []
        sealer = self.sealer
        if sealer is not None:
            extend = parts.extend
            carry_parts = sealer.carry_parts
            for frame in frames:
                extend(carry_parts(frame))
        else:
            header = _wire.carry_header
            append = parts.append
            for frame in frames:
                append(header(len(frame)))
                append(frame)
        if not parts:
            return False
        self.sent = True
        over = self.paused and self.wrote(sum(map(len, parts)))
        self._put(parts)
        return over

    def send(self, kind: int, body: bytes = b"") -> bool:
        """
        Write one link frame (tagged if the link is).

        :return: as :meth:`send_session_frames`.
        """
        sealer = self.sealer
        frame = (
            sealer.seal(kind, body)
            if sealer is not None
            else _wire.encode_frame(kind, body)
        )
        return self.write([frame])

    def write(self, frames: list[bytes]) -> bool:
        """
        Write encoded link frames as they are.

        :return: as :meth:`send_session_frames`.
        """
        self.sent = True
        transport = self.transport
        if transport is None:
            return False
        over = self.paused and self.wrote(sum(map(len, frames)))
        self._put(frames)
        return over

    def pause(self) -> None:
        """
        The transport's buffer is full: count from zero.
        """
        self.paused = True
        self.unsent = self.unread = 0

    def resume(self) -> int | None:
        """
        The transport's buffer drained.

        :return: the token of the LINK_PONG owed, to write now (``None``:
            none).
        """
        self.paused = False
        self.unsent = self.unread = 0
        token, self.pending_pong = self.pending_pong, None
        return token

    def wrote(self, size: int) -> bool:
        """
        ``size`` more bytes are written while paused.

        :return: whether to stop reading from the peer.
        """
        self.unsent += size
        return self.unsent > self._limit

    def read(self, size: int) -> bool:
        """
        ``size`` more bytes arrived while paused (the peer sends but does
        not read).

        :return: whether to stop reading from the peer, whatever the layer
            above writes in reply.
        """
        self.unread += size
        return self.unread > self._limit
