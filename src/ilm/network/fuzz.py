"""
Fuzz the stream transport's decoders, the link handshake and ILM's session
layer behind an authenticated link.

Usage::

    python -m ilm.network.fuzz [--inputs 1000000] [--seed N]
        [--protocol-share 0.1] [--session-share 0.1]
        [--store {memory,sqlite,both}]

Each input is one of:

- random bytes, or valid link frames with mutations (bytes flipped,
  inserted or removed, lengths changed, truncation);
- valid ILM session frames (HELLO, DATA, ACK, NACK), each mutated the same
  way, wrapped in well-formed CARRY link frames, so that the session decoders
  see the damage.

Every input is fed in random chunks to
:class:`ilm.network._wire.FrameParser`, every frame body to its decoder and
every session frame to its session decoder.  The only exceptions allowed are
:class:`ilm.errors.ProtocolViolation` subclasses.

A share of the inputs (``--protocol-share``) also goes to a responder
:class:`ilm.network.ILMProtocol` over an in-memory transport: no exception
may escape it, it may not log an internal error, and an unauthenticated peer
may receive nothing but a CHALLENGE and deliver nothing to ILM.

Another share (``--session-share``) is sent by a peer that first
authenticates properly: through a real link into a running ILM node (with
messages of its own for that peer in its outbox).  With ``--store both``
(the default) each such input goes to one of two nodes, one with an
in-memory store and one with a real SQLite file (``--store memory`` or
``--store sqlite`` picks one).  No exception may escape, no internal error
may be logged, the store may never fail a commit (nothing a peer sends may
break the store), and what the node delivers from each of the peer's
incarnations must be consecutive positions, none twice, however damaged the
frames.

Progress goes to standard error (a bar on a terminal, a line per tenth
otherwise); the closing line, with the counts, to standard output.  Exits 1
with the seed and the offending input (hex) on the first failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

import ilm.network._wire as _wire
from ilm import _frames
from ilm._peerid import PeerId
from ilm._session import PROTOCOL_VERSION, Hello
from ilm._store import CommitResult, StoreBatch, StoredState
from ilm.errors import ProtocolViolation, ShutdownTimeout
from ilm.interfaces import IBackend, IFrameReceiver, IMessage

_DECODERS: dict[int, Callable[[bytes], object]] = {
    _wire.LINK_HELLO: _wire.decode_hello,
    _wire.LINK_CHALLENGE: _wire.decode_challenge,
    _wire.LINK_PROOF: lambda body: _wire.decode_mac(body, "PROOF"),
    _wire.LINK_ACCEPT: lambda body: _wire.decode_mac(body, "ACCEPT"),
    _wire.LINK_UP: lambda body: _wire.check_empty(body, "LINK_UP"),
    _wire.CARRY: _wire.decode_carry,
    _wire.LINK_PING: lambda body: _wire.decode_token(body, "LINK_PING"),
    _wire.LINK_PONG: lambda body: _wire.decode_token(body, "LINK_PONG"),
}


_SESSION_DECODERS: dict[int, Callable[[bytes], object]] = {
    _frames.RESUME: _frames.decode_resume,
    _frames.MESSAGES: lambda frame: _frames.decode_messages(frame, 1 << 20),
    _frames.ACK: _frames.decode_ack,
    _frames.NACK: _frames.decode_nack,
}

_INTERESTING = [0, 1, 2, 3, 5, 64, 1000, 2**32 - 1, 2**63, 2**64 - 1]


def _incarnation(n: int) -> str:
    return f"{n:032x}"


def _position(rng: random.Random, expected: int = 1) -> int:
    """
    A position: mostly the one the receiver expects or close to it.
    """
    roll = rng.random()
    if roll < 0.6:
        return expected
    if roll < 0.85:
        return min(_frames.MAX_POSITION, max(1, expected + rng.randint(-3, 3)))
    return rng.choice(_INTERESTING)


def _hello(
    rng: random.Random, incarnation: str, known: str | None, expected: int
) -> bytes:
    first = max(1, _position(rng, expected))
    return _frames.encode_resume(
        Hello(
            version=PROTOCOL_VERSION if rng.random() < 0.95 else rng.randrange(4),
            incarnation=incarnation,
            window=rng.choice([1, 4, 64, 4096, 2**32 - 1]),
            window_bytes=rng.choice([1, 1024, 4 << 20, 2**32 - 1]),
            first_unacked=first,
            last_position=min(
                _frames.MAX_POSITION,
                first - 1 + rng.choice([0, 1, 5, 1000, 2**40]),
            ),
            known_incarnation=rng.choice([None, known, known, _incarnation(0)]),
            delivered=rng.choice([0, 0, _position(rng), _position(rng, 50)]),
            reply_requested=rng.random() < 0.5,
            max_message_size=rng.choice([1, 64, 1 << 20, 2**32 - 1]),
        )
    )


def _session_frame(rng: random.Random, known: str | None, expected: int) -> bytes:
    """
    A valid session frame other than HELLO, with plausible values.
    """
    kind = rng.randrange(10)
    if kind < 7:
        count = rng.randint(1, 5)
        contents = [rng.randbytes(rng.randint(0, 24)) for _ in range(count)]
        first = _position(rng, expected)
        if first + count - 1 > _frames.MAX_POSITION:
            first = _frames.MAX_POSITION
            contents = contents[:1]
        return b"".join(_frames.encode_messages(first, contents, 1 << 20))
    if kind < 9:
        delivered = _position(rng, rng.choice([1, 25, 50]))
        received = min(_frames.MAX_POSITION, delivered + rng.choice([0, 0, 1, 7]))
        return _frames.encode_ack(delivered, received)
    return _frames.encode_nack(_position(rng, rng.choice([1, 25, 50])))


def _mutate(rng: random.Random, data: bytearray, least: int) -> None:
    for _ in range(rng.randint(least, 4)):
        if not data:
            break
        mutation = rng.randrange(6)
        position = rng.randrange(len(data))
        if mutation == 0:
            data[position] ^= 1 << rng.randrange(8)
        elif mutation == 1:
            data[position] = rng.randrange(256)
        elif mutation == 2:
            data.insert(position, rng.randrange(256))
        elif mutation == 3:
            del data[position]
        elif mutation == 4:
            del data[position:]
        else:
            # Rewrite a length prefix-sized field with an interesting value.
            value = rng.choice([0, 1, 2, 1023, 1024, 1025, 2**31, 2**32 - 1])
            data[position : position + 4] = value.to_bytes(4, "big")


def session_input(
    rng: random.Random,
    incarnation: str = _incarnation(1),
    known: str | None = None,
    expected: int = 1,
) -> bytes:
    """
    One fuzz input of session frames in well-formed CARRY link frames: a
    HELLO from ``incarnation`` (naming ``known``, the receiver's
    incarnation), then DATA mostly at ``expected`` and on, ACKs and NACKs;
    each frame mutated or not.
    """
    expected = min(expected, _frames.MAX_POSITION)
    frames = [_hello(rng, incarnation, known, expected)]
    for _ in range(rng.randint(0, 5)):
        frame = _session_frame(rng, known, expected)
        if frame[0] == _frames.MESSAGES and int.from_bytes(frame[3:11]) == expected:
            expected = min(
                _frames.MAX_POSITION, expected + int.from_bytes(frame[11:15])
            )
        frames.append(frame)
    out = []
    for frame in frames:
        if rng.random() < 0.3:
            damaged = bytearray(frame)
            _mutate(rng, damaged, 1)
            frame = bytes(damaged)
        if frame:
            out.append(_wire.carry_header(len(frame)) + frame)
    return b"".join(out)


def _random_id(rng: random.Random) -> PeerId:
    if rng.random() < 0.5:
        return rng.choice([0, 1, 2, 2**63 - 1, rng.randrange(2**63)])
    return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(1, 12)))


def _valid_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return _wire.encode_hello(
            _wire.LinkHello(
                _wire.LINK_VERSION, rng.randbytes(32), _random_id(rng), _random_id(rng)
            )
        )
    if kind == 1:
        return _wire.encode_challenge(rng.randbytes(32))
    if kind == 2:
        return _wire.encode_frame(
            _wire.LINK_PROOF, rng.choice([b"", rng.randbytes(32)])
        )
    if kind == 3:
        return _wire.encode_frame(
            _wire.LINK_ACCEPT, rng.choice([b"", rng.randbytes(32)])
        )
    if kind == 4:
        return _wire.encode_frame(_wire.LINK_UP)
    if kind == 5:
        body = rng.randbytes(rng.randint(1, 64))
        return _wire.carry_header(len(body)) + body
    if kind == 6:
        return _wire.encode_ping(rng.randrange(2**64))
    return _wire.encode_pong(rng.randrange(2**64))


def make_input(rng: random.Random) -> bytes:
    """
    One fuzz input.
    """
    style = rng.random()
    if style < 0.2:
        return rng.randbytes(rng.randint(0, 64))
    if style < 0.5:
        return session_input(rng)
    data = bytearray(b"".join(_valid_frame(rng) for _ in range(rng.randint(1, 4))))
    _mutate(rng, data, 0 if style < 0.6 else 1)
    return bytes(data)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    if not data or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(1, 4)))
    pieces, start = [], 0
    for cut in [*cuts, len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


def decode(rng: random.Random, data: bytes, limit: int) -> int:
    """
    Parse and decode ``data`` fed in random chunks.

    :return: the number of frames decoded before the end or a violation.
    """
    parser = _wire.FrameParser(limit)
    frames = 0
    try:
        for chunk in _chunks(rng, data):
            parser.feed(chunk)
            while (frame := parser.next_frame()) is not None:
                kind, body = frame
                _DECODERS[kind](body)
                frames += 1
                if kind == _wire.CARRY:
                    try:
                        _SESSION_DECODERS[_frames.frame_type(body)](body)
                    except ProtocolViolation:
                        pass
    except ProtocolViolation:
        pass
    return frames


@implementer(IFrameReceiver)
class _NothingExpected:
    """
    A frame receiver for a node no authenticated peer ever reaches.
    """

    def __init__(self) -> None:
        self.events = 0

    def link_established(self, peer_id: object) -> None:
        self.events += 1

    def link_lost(self, peer_id: object, reason: object) -> None:
        self.events += 1

    def frame_received(self, peer_id: object, frame: bytes) -> None:
        self.events += 1

    def link_paused(self, peer_id: object) -> None:
        self.events += 1

    def link_resumed(self, peer_id: object) -> None:
        self.events += 1


# Events that no input may cause: a bug, or a store broken by what a peer
# sent.
_FORBIDDEN_EVENTS = frozenset(
    {"internal_error", "store_commit_failed", "store_broken", "outbox_read_failed"}
)


@implementer(ILogObserver)
class _InternalErrors:
    def __init__(
        self,
        found: list[LogEvent],
        lost: list[LogEvent] | None = None,
        forgotten: set[str] | None = None,
    ):
        self._found = found
        self._lost = lost
        self._forgotten = forgotten

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("ilm_event")
        if kind in _FORBIDDEN_EVENTS:
            self._found.append(event)
        elif kind == "stream_jumped" and self._lost is not None:
            self._lost.append(event)
        elif kind == "incarnation_forgotten" and self._forgotten is not None:
            self._forgotten.add(event["incarnation"])


def _describe(event: LogEvent) -> str:
    failure = event.get("log_failure")
    what = event.get("ilm_event")
    if failure is not None:
        return f"{what}: {failure.getTraceback()}"
    return f"{what}: {event.get('log_format')} {event.get('error', '')}"


@implementer(IBackend)
class SynchronousSQLite:
    """
    A real :class:`ilm.backends.SQLiteBackend` file whose operations finish
    before they return (through a :class:`ilm.simulation.Gate`), so that a
    node on a ``Clock`` can use it input after input.
    """

    def __init__(self, path: str) -> None:
        from ilm.backends._sqlite import SQLiteBackend
        from ilm.simulation._gate import Gate

        self.gate = Gate()
        self.inner = SQLiteBackend(path, synchronous="NORMAL", reactor=self.gate)

    def _now(self, d: Deferred[Any]) -> Deferred[Any]:
        result = self.gate.wait(d)
        return fail(result) if isinstance(result, Failure) else succeed(result)

    def open(self) -> Deferred[StoredState]:
        return self._now(self.inner.open())

    def commit(
        self, batch: StoreBatch, *args: Any, **kwargs: Any
    ) -> Deferred[CommitResult]:
        return self._now(self.inner.commit(batch, *args, **kwargs))

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, *args: Any, **kwargs: Any
    ) -> Deferred[list[bytes]]:
        return self._now(
            self.inner.read_outbound(peer_id, after, limit, *args, **kwargs)
        )

    def close(self) -> Deferred[None]:
        return self._now(self.inner.close())

    def release(self) -> None:
        """
        Close the file and stop SQLite's threads, whatever the node did.
        """
        self.gate.wait(self.inner.close())


class _ProtocolFuzzer:
    """
    Feeds inputs to responder protocols of a node with pre-shared keys.
    """

    def __init__(self) -> None:
        from ilm.network._stream import ILMFactory, StreamNetwork

        self.clock = Clock()
        self.network = StreamNetwork(
            2, keys={1: b"k" * 32, 3: b"j" * 32}, reactor=self.clock
        )
        self.receiver = _NothingExpected()
        self.network._receiver = self.receiver
        self.network._running = True
        self.factory = ILMFactory(self.network, None)
        self.internal_errors: list[LogEvent] = []
        self._observer = _InternalErrors(self.internal_errors)
        globalLogPublisher.addObserver(self._observer)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observer)

    def run(self, rng: random.Random, data: bytes) -> str | None:
        """
        :return: a description of what went wrong, or ``None``.
        """
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        for chunk in _chunks(rng, data):
            protocol.dataReceived(chunk)
        protocol.connectionLost()
        self.clock.advance(60)
        if self.internal_errors:
            return f"internal error: {self.internal_errors[0].get('log_failure')}"
        if self.receiver.events:
            return "an unauthenticated peer reached ILM"
        written = frames_of(transport.value())
        if any(kind != _wire.LINK_CHALLENGE for kind, _ in written) or len(written) > 1:
            return f"an unauthenticated peer was sent {written!r}"
        return None


_FUZZ_KEY = b"session fuzzing pre-shared key 0"


class _SessionFuzzer:
    """
    Sends inputs as an authenticated peer (node 1) into a running ILM node
    (node 2) over a real link, one link per input.
    """

    def __init__(self, store: str = "memory") -> None:
        from ilm import ILM
        from ilm._backoff import Backoff
        from ilm.network._handshake import PreSharedKeys
        from ilm.network._stream import ILMFactory, LinkSettings, StreamNetwork
        from ilm.testing import InMemoryBackend

        self.store = store
        self.clock = Clock()
        # Violations close links; keep the refusal that follows one short so
        # that the next input's link is accepted.  The inputs are untagged
        # link frames (they aim at the session layer behind the link).
        self.network = StreamNetwork(
            2,
            keys={1: _FUZZ_KEY},
            settings=LinkSettings(
                refusal=Backoff(initial=0.001, maximum=0.001),
                refusal_reset=0.001,
                frame_integrity=False,
            ),
            reactor=self.clock,
        )
        self.delivered: dict[str, int] = {}
        self.deliveries = 0
        self.problems: list[str] = []
        # The peer may say it no longer has positions the node has not
        # delivered (as after the node lost its store): the node logs
        # stream_jumped and carries on after them.  Only such a jump may
        # skip positions.
        self.lost: list[LogEvent] = []
        self._lost_seen = 0
        self._generation = 1
        self.runs = 0
        self.internal_errors: list[LogEvent] = []
        # Retired incarnations the node forgot (beyond
        # Config.max_retired_incarnations): one that comes back is a new
        # stream, which may start anywhere (docs/protocol.md).
        self.forgotten: set[str] = set()
        self._observer = _InternalErrors(
            self.internal_errors, self.lost, self.forgotten
        )
        globalLogPublisher.addObserver(self._observer)
        self._directory: str | None = None
        self._sqlite: SynchronousSQLite | None = None
        backend: IBackend
        if store == "sqlite":
            self._directory = tempfile.mkdtemp(prefix="ilm-fuzz-")
            backend = self._sqlite = SynchronousSQLite(
                os.path.join(self._directory, "node.sqlite")
            )
        else:
            backend = InMemoryBackend()
        self.node = ILM(backend, self._deliver, self.network, clock=self.clock)
        self.node.startService()
        self.clock.advance(0)
        for n in range(50):
            self.node.send_to(1, b"to the fuzzing peer %d" % n)
        self.clock.advance(0)
        self.factory = ILMFactory(self.network, None)
        self._keys = PreSharedKeys({2: _FUZZ_KEY})
        self.links = 0

    def make_input(self, rng: random.Random) -> bytes:
        """
        An input from the fuzzing peer's current incarnation (now and then a
        new one, or an older, retired one).
        """
        if rng.random() < 0.02:
            self._generation += 1
        generation = self._generation
        if generation > 1 and rng.random() < 0.05:
            generation = rng.randrange(1, generation)
        incarnation = _incarnation(generation)
        expected = self.delivered.get(incarnation, 0) + 1
        return session_input(rng, incarnation, self.node.incarnation, expected)

    def close(self) -> None:
        """
        Stop the node (closing its store) and delete the store's files.
        """
        try:
            # Its messages to the fuzzing peer are never all acknowledged:
            # the shutdown times out at once, as it should.
            self.node.shutdown(0).addErrback(
                lambda failure: failure.trap(ShutdownTimeout)
            )
            self.clock.advance(1)
        finally:
            globalLogPublisher.removeObserver(self._observer)
            if self._sqlite is not None:
                self._sqlite.release()
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)

    def _deliver(self, message: IMessage) -> None:
        incarnation = message.source_incarnation  # type: ignore[attr-defined]
        if incarnation in self.forgotten:
            self.forgotten.discard(incarnation)
            self.delivered.pop(incarnation, None)
        # A stream the node did not know starts where its sender says its
        # unacknowledged positions start.
        last = self.delivered.get(incarnation)
        position = message.message_id
        jumped = len(self.lost) > self._lost_seen
        self._lost_seen = len(self.lost)
        if last is not None and (
            position <= last or (position != last + 1 and not jumped)
        ):
            self.problems.append(
                f"delivered position {position} of incarnation {incarnation} "
                f"after {last}"
            )
        self.delivered[incarnation] = position
        self.deliveries += 1

    def _authenticate(self, transport: StringTransport, protocol: object) -> bool:
        from ilm.network._handshake import LinkHandshake

        handshake = LinkHandshake(
            1, 2, keys=self._keys, certificates=False, frame_integrity=False
        )
        for frame in handshake.start():
            protocol.dataReceived(frame)  # type: ignore[attr-defined]
        seen = 0
        for _ in range(4):
            written = frames_of(transport.value())
            for kind, body in written[seen:]:
                if kind in (_wire.LINK_UP, _wire.CARRY, _wire.LINK_PING):
                    continue
                for reply in handshake.receive(kind, body, lambda: 2):
                    protocol.dataReceived(reply)  # type: ignore[attr-defined]
            seen = len(written)
            if handshake.done:
                break
        if not handshake.done:
            return False
        # The smaller id decides which connection is the link.
        protocol.dataReceived(_wire.encode_frame(_wire.LINK_UP))  # type: ignore[attr-defined]
        return protocol.state == "open"  # type: ignore[attr-defined, no-any-return]

    def run(self, rng: random.Random, data: bytes) -> str | None:
        """
        :return: a description of what went wrong, or ``None``.
        """
        self.runs += 1
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        if not self._authenticate(transport, protocol):
            return "a properly authenticated peer got no link"
        self.links += 1
        for chunk in _chunks(rng, data):
            protocol.dataReceived(chunk)
            self.clock.advance(0)
        self.clock.advance(rng.choice([0, 0.001, 0.5]))
        protocol.connectionLost()
        self.clock.advance(1)
        if self.internal_errors:
            return f"{self.store} store node: {_describe(self.internal_errors[0])}"
        if self.problems:
            return f"{self.store} store node: {self.problems[0]}"
        return None


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    parser = _wire.FrameParser(1 << 20)
    parser.feed(data)
    out = []
    while (frame := parser.next_frame()) is not None:
        out.append(frame)
    return out


STORES = ("memory", "sqlite", "both")
"""What ``--store`` accepts."""


def build_parser() -> argparse.ArgumentParser:
    """
    The command line of ``python -m ilm.network.fuzz``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m ilm.network.fuzz",
        description="Fuzz the stream transport's frame decoders, the link "
        "handshake (an unauthenticated listener) and ILM's session layer "
        "behind an authenticated link (a running node with an in-memory and "
        "one with an SQLite store), and check that bad input only ever gives "
        "a typed protocol violation: no internal error, no store failure, no "
        "message delivered twice or out of order. See docs/security.md.",
        epilog="Progress goes to standard error, the closing counts to "
        "standard output. On the first failure the command prints the seed "
        "and the input (hex) and exits with status 1.",
    )
    parser.add_argument(
        "--inputs",
        type=int,
        default=1_000_000,
        help="how many inputs to run (default 1,000,000: about a minute)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the seed of the inputs (default: a random one, printed at the end)",
    )
    parser.add_argument(
        "--protocol-share",
        type=float,
        default=0.1,
        help="share of inputs also fed to an unauthenticated responder protocol "
        "(default 0.1)",
    )
    parser.add_argument(
        "--session-share",
        type=float,
        default=0.1,
        help="share of inputs for which session frames are also sent by an "
        "authenticated peer into a running ILM node (default 0.1)",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="both",
        help="the store of the node the session inputs go to: in memory, a "
        "real SQLite file, or both (default: each input goes to one of them)",
    )
    return parser


class _Progress:
    """
    Progress on a text stream: a bar redrawn on a terminal, a line per
    tenth otherwise.
    """

    def __init__(self, stream: IO[str], total: int) -> None:
        self.stream = stream
        self.total = total
        self.started = time.perf_counter()
        self.tty = stream.isatty()
        self.last = 0.0
        self.next_tenth = 1

    def update(self, done: int) -> None:
        if self.tty:
            now = time.perf_counter()
            if now - self.last < 0.2 and done < self.total:
                return
            self.last = now
            self.stream.write("\r" + self._bar(done, now))
            if done == self.total:
                self.stream.write("\n")
        else:
            if done * 10 < self.next_tenth * self.total:
                return
            while done * 10 >= self.next_tenth * self.total:
                self.next_tenth += 1
            self.stream.write(self._bar(done, time.perf_counter()) + "\n")
        self.stream.flush()

    def interrupt(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, done: int, now: float) -> str:
        width = 30
        filled = width * done // self.total
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate else 0.0
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} "
            f"inputs, {rate:,.0f}/s, {elapsed:.0f}s elapsed, ~{left:.0f}s left"
        )


def main(
    argv: list[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    ``python -m ilm.network.fuzz``.

    :return: the exit status: 0 when no input found a problem, 1 otherwise.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    # argparse writes help and usage errors to sys.stdout and sys.stderr:
    # send them where this run's output goes.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        options = parser.parse_args(argv)
        if options.inputs < 1:
            parser.error("--inputs must be at least 1")
        for name in ("protocol_share", "session_share"):
            if not 0 <= getattr(options, name) <= 1:
                parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    stores = ["memory", "sqlite"] if options.store == "both" else [options.store]
    fuzzer = _ProtocolFuzzer()
    sessions = {store: _SessionFuzzer(store) for store in stores}
    progress = _Progress(err, options.inputs)
    started = time.perf_counter()
    frames = protocol_runs = 0
    count = 0
    try:
        for count in range(1, options.inputs + 1):
            data = make_input(rng)
            try:
                frames += decode(rng, data, rng.choice([64, 1024, 1 << 20]))
                if rng.random() < options.protocol_share:
                    protocol_runs += 1
                    problem = fuzzer.run(rng, data)
                    if problem is not None:
                        raise AssertionError(problem)
                if rng.random() < options.session_share:
                    session = sessions[rng.choice(stores)]
                    data = session.make_input(rng)
                    problem = session.run(rng, data)
                    if problem is not None:
                        raise AssertionError(problem)
            except Exception as error:
                progress.interrupt()
                if not isinstance(error, AssertionError):
                    traceback.print_exc(file=err)
                out.write(
                    f"FAILED on input {count} (seed {seed}): "
                    f"{type(error).__name__}: {error}\ninput: {data.hex()}\n"
                )
                return 1
            progress.update(count)
    except KeyboardInterrupt:
        progress.interrupt()
        out.write(f"interrupted after {count - 1:,} inputs (seed {seed})\n")
        return 1
    finally:
        fuzzer.close()
        for session in sessions.values():
            session.close()
    elapsed = time.perf_counter() - started
    runs = sum(s.runs for s in sessions.values())
    links = sum(s.links for s in sessions.values())
    delivered = sum(s.deliveries for s in sessions.values())
    gaps = sum(len(s.lost) for s in sessions.values())
    per_store = ", ".join(
        f"{s.runs:,} into the node with the {name} store"
        for name, s in sessions.items()
    )
    out.write(
        f"{options.inputs:,} inputs fuzzed (seed {seed}) in {elapsed:.1f} s: "
        f"{frames:,} frames decoded, {protocol_runs:,} inputs also run through "
        f"a responder protocol, {runs:,} session inputs sent by an "
        f"authenticated peer into a running ILM node ({links:,} links, "
        f"{delivered:,} messages delivered, {gaps:,} announced gaps; "
        f"{per_store}); no failure\n"
    )
    return 0


if __name__ == "__main__":
    from twisted.logger import globalLogBeginner

    # The inputs make the node log violations by the thousand: keep them
    # off the terminal (the checks above observe the events themselves).
    globalLogBeginner.beginLoggingTo(
        [_InternalErrors([])], discardBuffer=True, redirectStandardIO=False
    )
    sys.exit(main())
