"""
Fuzz the stream transport's decoder and link handshake.

Usage::

    python -m ilm.network.fuzz [--inputs 1000000] [--seed N] [--protocol-share 0.1]

Each input is random bytes, or valid link frames with mutations (bytes
flipped, inserted or removed, lengths changed, truncation), fed in random
chunks to :class:`ilm.network._wire.FrameParser`, and every frame body to
its decoder.  The only exceptions allowed are
:class:`ilm.errors.ProtocolViolation` subclasses.  A share of the inputs
also goes to a responder :class:`ilm.network.ILMProtocol` over an
in-memory transport: no exception may escape it, it may not log an internal
error, and an unauthenticated peer may receive nothing but a CHALLENGE and
deliver nothing to ILM.

Prints the number of inputs run; exits 1 with the offending input (hex) on
the first failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from ilm._message import PeerId
from ilm.errors import ProtocolViolation
from ilm.interfaces import IFrameReceiver
from ilm.network import _wire

_DECODERS: dict[int, Callable[[bytes], object]] = {
    _wire.HELLO: _wire.decode_hello,
    _wire.CHALLENGE: _wire.decode_challenge,
    _wire.PROOF: lambda body: _wire.decode_mac(body, "PROOF"),
    _wire.ACCEPT: lambda body: _wire.decode_mac(body, "ACCEPT"),
    _wire.LINK_UP: lambda body: _wire.check_empty(body, "LINK_UP"),
    _wire.DATA: _wire.decode_data,
    _wire.PING: lambda body: _wire.decode_token(body, "PING"),
    _wire.PONG: lambda body: _wire.decode_token(body, "PONG"),
}


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
        return _wire.encode_frame(_wire.PROOF, rng.choice([b"", rng.randbytes(32)]))
    if kind == 3:
        return _wire.encode_frame(_wire.ACCEPT, rng.choice([b"", rng.randbytes(32)]))
    if kind == 4:
        return _wire.encode_frame(_wire.LINK_UP)
    if kind == 5:
        body = rng.randbytes(rng.randint(1, 64))
        return _wire.data_header(len(body)) + body
    if kind == 6:
        return _wire.encode_ping(rng.randrange(2**64))
    return _wire.encode_pong(rng.randrange(2**64))


def make_input(rng: random.Random) -> bytes:
    """
    One fuzz input.
    """
    style = rng.random()
    if style < 0.25:
        return rng.randbytes(rng.randint(0, 64))
    data = bytearray(b"".join(_valid_frame(rng) for _ in range(rng.randint(1, 4))))
    for _ in range(rng.randint(0 if style < 0.4 else 1, 4)):
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


@implementer(ILogObserver)
class _InternalErrors:
    def __init__(self, found: list[LogEvent]) -> None:
        self._found = found

    def __call__(self, event: LogEvent) -> None:
        if event.get("ilm_event") == "internal_error":
            self._found.append(event)


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
        if any(kind != _wire.CHALLENGE for kind, _ in written) or len(written) > 1:
            return f"an unauthenticated peer was sent {written!r}"
        return None


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    parser = _wire.FrameParser(1 << 20)
    parser.feed(data)
    out = []
    while (frame := parser.next_frame()) is not None:
        out.append(frame)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--protocol-share",
        type=float,
        default=0.1,
        help="share of inputs also fed to a responder protocol (default 0.1)",
    )
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    fuzzer = _ProtocolFuzzer()
    started = time.perf_counter()
    frames = protocol_runs = 0
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
            except Exception as error:
                print(
                    f"FAILED on input {count} (seed {seed}): "
                    f"{type(error).__name__}: {error}\ninput: {data.hex()}"
                )
                return 1
            if count % 200_000 == 0:
                print(f"  {count:,} inputs...", flush=True)
    finally:
        fuzzer.close()
    elapsed = time.perf_counter() - started
    print(
        f"{options.inputs:,} inputs fuzzed (seed {seed}) in {elapsed:.1f} s: "
        f"{frames:,} frames decoded, {protocol_runs:,} inputs also run through "
        f"a responder protocol; no failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
