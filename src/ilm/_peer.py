"""
One peer's protocol state and every decision about it, with no clock and
no I/O: :class:`PeerSession`.

The session knows the link phase, the outbound stream, the inbound
streams by incarnation and the retired incarnations.  It decides what a
RESUME (the session's hello), data, an ACK, a NACK or a durable delivery
mark change, what to answer and what to record; the messenger's pieces
(:mod:`ilm._sender`, :mod:`ilm._deliverer`, :mod:`ilm._committer`) carry
the decisions out.  Times come in as arguments.
"""

from __future__ import annotations

from attrs import define, field

from ilm._config import Config
from ilm._peerid import PeerId
from ilm._session import (
    PROTOCOL_VERSION,
    HeldTotal,
    Hello,
    InboundStream,
    NewIncarnations,
    OutboundStream,
    resume_inbound,
    resume_outbound,
)
from ilm.errors import UnexpectedFrame, UnsupportedVersion

__all__ = [
    "CLOSING",
    "DOWN",
    "HELLO_SENT",
    "READY",
    "HelloOutcome",
    "PeerSession",
]

#: Link phases: no link; a link, our RESUME sent, the peer's awaited; the
#: session handshake done; a link being closed for a violation.
DOWN = 0
HELLO_SENT = 1
READY = 2
CLOSING = 3


@define
class HelloOutcome:
    """
    What a RESUME from the peer decided.

    :ivar ready: the link became ready (the handshake completed now).
    :ivar reply: a RESUME is owed in reply.
    :ivar newly_acked: messages the peer's RESUME acknowledged.
    :ivar retired: incarnations of the peer retired by this RESUME.
    :ivar forgotten: retired incarnations forgotten to stay within the limit.
    :ivar mark: a delivery mark to record, ``(incarnation, position)``.
    :ivar lost: positions the peer no longer has and this node never
        delivered (``(first, last)``), skipped.
    :ivar jumped: the stream that skipped them.
    """

    ready: bool = False
    reply: bool = False
    newly_acked: int = 0
    retired: list[str] = field(factory=list)
    forgotten: list[str] = field(factory=list)
    mark: tuple[str, int] | None = None
    lost: tuple[int, int] | None = None
    jumped: InboundStream | None = None


class PeerSession:
    """
    One peer's protocol state: pure, every input an argument.
    """

    __slots__ = (
        "_config",
        "held",
        "hold_reported",
        "inbound",
        "incarnations",
        "link",
        "max_message",
        "out",
        "owed_ack",
        "owed_hello",
        "owed_nack",
        "paused",
        "peer_id",
        "peer_incarnation",
        "retired",
        "seen_incarnation",
        "sendable",
    )

    def __init__(self, peer_id: PeerId, out: OutboundStream, config: Config) -> None:
        self.peer_id = peer_id
        self._config = config
        self.out = out
        self.inbound: list[InboundStream] = []
        # Retired incarnations, oldest retirement first.
        self.retired: dict[str, None] = {}
        # What the streams of all its incarnations hold together.
        self.held = HeldTotal(
            config.window, config.window_bytes + config.max_frame_size
        )
        self.incarnations = NewIncarnations(
            config.max_new_incarnations, config.new_incarnation_period
        )
        self.link = DOWN
        self.paused = False
        # Whether the network said it could ever link to this peer (asked
        # once, at the first send).
        self.sendable = False
        # Replies not written while the link is paused, sent on resume: an
        # ACK, the last NACK position, a RESUME (1; 2: asking for a reply).
        self.owed_ack = False
        self.owed_nack = 0
        self.owed_hello = 0
        self.hold_reported = False
        self.max_message = config.max_message_size
        self.peer_incarnation: str | None = None
        # The last incarnation seen in a RESUME (kept after the link went).
        self.seen_incarnation: str | None = None

    def current_stream(self) -> InboundStream | None:
        return self.inbound[-1] if self.inbound else None

    def add_stream(self, incarnation: str, delivered: int) -> InboundStream:
        """
        A stream from the peer's ``incarnation`` (from the store, or new).
        """
        config = self._config
        stream = InboundStream(
            incarnation,
            delivered,
            window=config.window,
            window_bytes=config.window_bytes,
            max_frame_size=config.max_frame_size,
            held=self.held,
        )
        self.inbound.append(stream)
        return stream

    def hello(self, local_incarnation: str, reply_requested: bool) -> Hello:
        """
        The RESUME this node sends the peer now.
        """
        out = self.out
        stream = self.current_stream()
        config = self._config
        return Hello(
            version=PROTOCOL_VERSION,
            incarnation=local_incarnation,
            window=config.window,
            window_bytes=config.window_bytes,
            first_unacked=out.acked + 1,
            last_position=out.stored,
            known_incarnation=stream.incarnation if stream is not None else None,
            delivered=stream.marked if stream is not None else 0,
            reply_requested=reply_requested,
            max_message_size=config.max_message_size,
        )

    def on_hello(
        self, hello: Hello, local_incarnation: str, now: float
    ) -> HelloOutcome:
        """
        The peer's RESUME arrived.

        :raises ProtocolViolation: (before changing anything) if it breaks
            the protocol.
        """
        if hello.version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"peer speaks protocol version {hello.version}; this node speaks "
                f"{PROTOCOL_VERSION}"
            )
        if self.link == READY:
            if hello.incarnation != self.peer_incarnation:
                raise UnexpectedFrame(
                    "peer changed incarnation in the middle of a link"
                )
            return HelloOutcome(reply=hello.reply_requested)
        incarnation = hello.incarnation
        stream = None
        for candidate in self.inbound:
            if candidate.incarnation == incarnation:
                stream = candidate
        resume = resume_inbound(
            hello,
            stream.marked if stream is not None else None,
            incarnation in self.retired,
        )
        out = self.out
        resume_after = resume_outbound(hello, local_incarnation, out.acked, out.stored)
        if stream is None:
            self.incarnations.admit(now, incarnation)
        # Decided; from here on nothing raises.
        outcome = HelloOutcome(ready=True, reply=hello.reply_requested)
        if stream is None:
            for old in self.inbound:
                self.retired.pop(old.incarnation, None)
                self.retired[old.incarnation] = None
                outcome.retired.append(old.incarnation)
            self.inbound = [old for old in self.inbound if old.queue]
            stream = self.add_stream(incarnation, resume.delivered)
            outcome.mark = (incarnation, resume.delivered)
            outcome.forgotten = self.forget_retired()
        elif self.inbound[-1] is not stream:
            self.inbound.remove(stream)
            self.inbound.append(stream)
        if resume.lost is not None:
            stream.jump(resume.delivered)
            outcome.lost = resume.lost
            outcome.jumped = stream
            outcome.mark = (incarnation, resume.delivered)
        self.peer_incarnation = incarnation
        self.seen_incarnation = incarnation
        self.link = READY
        outcome.newly_acked = out.link_ready(
            resume_after, hello.window, hello.window_bytes, hello.max_message_size
        )
        self.max_message = min(self._config.max_message_size, hello.max_message_size)
        return outcome

    def ack(self) -> tuple[int, int] | None:
        """
        :return: what an ACK sent now says (``(delivered, received)``), or
            ``None`` if none may be sent (no ready link for the current
            incarnation's stream).
        """
        stream = self.current_stream()
        if (
            self.link != READY
            or stream is None
            or stream.incarnation != self.peer_incarnation
        ):
            return None
        return stream.marked, stream.received

    def marked(self, incarnation: str, position: int) -> bool:
        """
        The delivery mark ``position`` of the peer's ``incarnation`` is
        durable.

        :return: whether it is the current stream's (to acknowledge).
        """
        for stream in self.inbound:
            if stream.incarnation == incarnation:
                if position > stream.marked:
                    stream.marked = position
                if stream is self.inbound[-1]:
                    return True
        return False

    def unstarve(self, stream: InboundStream) -> int:
        """
        ``stream`` dropped data that did not fit in what the peer's
        incarnations hold together: once the older streams have drained, or
        half the budget is free, ask the peer to send it again.

        :return: the position to NACK (0: not yet).
        """
        held = stream.held
        if len(self.inbound) > 1 and (
            held.messages * 2 > held.max_messages or held.bytes * 2 > held.max_bytes
        ):
            return 0
        if self.link != READY or stream.incarnation != self.peer_incarnation:
            return 0
        stream.starved = False
        return stream.received + 1

    def drop_drained_streams(self) -> list[str]:
        """
        Forget the streams of old incarnations that are delivered and
        marked.

        :return: the retired incarnations forgotten to stay within the limit.
        """
        if len(self.inbound) > 1:
            current = self.inbound[-1]
            self.inbound = [
                s
                for s in self.inbound
                if s is current or s.queue or s.delivered > s.marked
            ]
            if len(self.retired) > self._config.max_retired_incarnations:
                return self.forget_retired()
        return []

    def forget_retired(self) -> list[str]:
        """
        Keep at most ``max_retired_incarnations`` retired incarnations:
        forget the oldest retirements, except those whose messages are still
        being delivered.  A forgotten incarnation that comes back is taken
        for a new one (docs/protocol.md says what that costs).

        :return: the incarnations forgotten.
        """
        excess = len(self.retired) - self._config.max_retired_incarnations
        if excess <= 0:
            return []
        draining = {stream.incarnation for stream in self.inbound}
        forgotten = []
        for incarnation in list(self.retired):
            if excess <= 0:
                break
            if incarnation in draining:
                continue
            del self.retired[incarnation]
            forgotten.append(incarnation)
            excess -= 1
        return forgotten

    def link_lost(self) -> None:
        """
        The link went down.
        """
        self.link = DOWN
        self.paused = False
        self.owed_ack = False
        self.owed_nack = 0
        self.owed_hello = 0
        self.hold_reported = False
        self.peer_incarnation = None
        self.out.link_lost()
