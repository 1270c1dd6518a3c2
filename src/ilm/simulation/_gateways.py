"""
The simulator's multi-gateway mode: one logical node served by several
gateway processes sharing one store that enforces epochs, a remote node
streaming to it with every gateway as an address of its peer, and the
faults of such a deployment.

- **The store** (:class:`SharedStore`): the node's committed state (an
  :class:`ilm.backends.InMemoryStorage`) and a lease row per stream
  (owner, epoch, expiry in the store's time, which is the simulation's
  clock).  Every commit checks, at the instant it applies, that each
  stream it writes bookkeeping for still has the epoch the writing gateway
  was granted (0 for a stream it never took); a mismatch fails the whole
  commit with :class:`ilm.backends.Fenced` and applies nothing.
- **A gateway's backend** (:class:`GatewayBackend`): ``IBackend`` and
  ``IStreamOwnership`` over the shared store, every operation taking a
  request latency (to the store) and an answer latency (back), with local
  deadlines counted from when a request was sent, as
  :class:`ilm.backends.PostgresBackend` counts them.  A gateway
  partitioned from the store has every request fail (nothing applied); a
  crashed gateway's requests in flight apply or not, as the seed decides,
  and it hears no answer.
- **Faults**: a gateway killed (and restarted 0 to 2 s later, a new
  process over the same store); a gateway cut off from the store for 0.1
  to 4 s (often longer than the lease: it keeps running, deposed, with its
  link to the remote node); the link between the remote node and a
  gateway cut.
- **Invariants**, checked as the run goes and at the end: every delivery
  happens while the delivering gateway holds the stream in the store's
  view of its own lease (its local window), no two gateways have a
  delivery in progress for the stream at the same time, deliveries are in
  order with repeats only right after a take-over, and (once the faults
  stop) every message the remote node sent is delivered and acknowledged.

``run_gateway_seed(seed)`` runs one seed; ``python -m ilm.simulation
--gateways --seeds N`` runs many (docs/simulation.md, docs/scaling.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer, provider

from ilm._backoff import Backoff
from ilm._config import Config
from ilm._message import Message
from ilm._messenger import ILM
from ilm._peerid import PeerId
from ilm._store import CommitResult, StoreBatch, StoredState
from ilm.backends._memory import InMemoryBackend, InMemoryStorage
from ilm.backends._ownership import (
    Fenced,
    IStreamOwnership,
    LeaseHeld,
    Renewal,
    SharedCommitResult,
    StreamTaken,
)
from ilm.errors import StoreError
from ilm.interfaces import IBackend
from ilm.network import LinkSettings, StreamNetwork
from ilm.simulation._pipes import Switchboard
from ilm.simulation._store import ScheduledCalls
from ilm.simulation._world import aside
from ilm.testing import crash

__all__ = [
    "GatewayBackend",
    "GatewaySeedResult",
    "SharedStore",
    "run_gateway_seed",
    "run_gateway_seeds",
]

REMOTE: PeerId = 1
NODE: PeerId = 2
TOPOLOGIES = ("remote dials", "gateways dial", "both dial")


class Unreachable(StoreError):
    """The gateway cannot reach the store (a partition): nothing applied."""


@attr.s(auto_attribs=True)
class _Lease:
    owner: str | None = None
    epoch: int = 0
    expires_at: float = 0.0


class SharedStore:
    """
    The store every gateway of the node shares: committed state, lease
    rows, and the store's clock (the simulation's).
    """

    def __init__(self, clock: Clock, lease_duration: float) -> None:
        self.clock = clock
        self.lease_duration = lease_duration
        self.storage = InMemoryStorage()
        self.leases: dict[PeerId, _Lease] = {}
        self.fenced = 0

    def lease(self, peer_id: PeerId) -> _Lease:
        return self.leases.setdefault(peer_id, _Lease())

    def apply(
        self,
        gateway: str,
        epochs: dict[PeerId, int],
        batch: StoreBatch,
        shared: bool = False,
    ) -> Any:
        """
        Apply a commit of ``gateway`` (granted ``epochs``) now, fenced;
        ``shared``: its messages go where each outbox ends, and the result
        says where.
        """
        written = (
            set(batch.acked)
            | {peer for peer, _ in batch.delivered}
            | {peer for peer, _ in batch.retired}
            | {peer for peer, _ in batch.forgotten}
        )
        stale = {
            peer: (self.lease(peer).epoch, self.lease(peer).owner)
            for peer in written
            if epochs.get(peer, 0) != self.lease(peer).epoch
        }
        if stale:
            self.fenced += 1
            raise Fenced(stale)
        if not shared:
            return self.storage.apply(batch)
        positions = {}
        for peer, (_, contents) in list(batch.messages.items()):
            box = self.storage.outboxes.get(peer)
            first = (box.last if box is not None else 0) + 1
            batch.messages[peer] = (first, contents)
            positions[peer] = (first, first + len(contents) - 1)
        result = self.storage.apply(batch)
        return SharedCommitResult(result.released_bytes, positions)


@implementer(IBackend, IStreamOwnership)
class GatewayBackend(ScheduledCalls, InMemoryBackend):
    """
    One gateway's view of the :class:`SharedStore`, with latencies, a
    partition switch and a crash.
    """

    def __init__(
        self,
        store: SharedStore,
        gateway: str,
        latency: Callable[[], float],
        land: Callable[[], bool],
    ) -> None:
        super().__init__(store.storage)
        self.store = store
        self.gateway = gateway
        self.lease_duration = store.lease_duration
        self.clock = store.clock
        self.latency = latency
        self.land = land
        self.partitioned = False
        self.crashed = False
        #: Per stream held: (epoch, deliver_from, valid_until), local clock.
        self.held: dict[PeerId, tuple[int, float, float]] = {}
        self._calls: list[IDelayedCall] = []
        self._applying: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        return self.clock.seconds()

    # -- the two legs of every request -----------------------------------------

    def _request(
        self, apply: Callable[[], Any], answer: Callable[[Any], Any] | None = None
    ) -> Deferred[Any]:
        """
        Send a request: it reaches the store after one latency (and applies
        there unless partitioned), and its answer comes back after another.
        """
        d: Deferred[Any] = Deferred()
        if self.crashed or self.closed:
            self._later(0, lambda: d.errback(StoreError("the store is closed")))
            return d

        def at_store() -> None:
            self._applying.remove(at_store)
            if self.partitioned:
                self._later(self.latency(), lambda: d.errback(Unreachable("cut off")))
                return
            try:
                result = apply()
            except StoreError as error:
                failure = error
                self._later(self.latency(), lambda: d.errback(failure))
                return

            def back() -> None:
                if self.partitioned:
                    # Applied, but the answer is lost: the gateway learns
                    # nothing (its deadlines stay where they were).
                    d.errback(Unreachable("answer lost"))
                    return
                try:
                    d.callback(answer(result) if answer is not None else result)
                except Exception:
                    d.errback()

            self._later(self.latency(), back)

        self._applying.append(at_store)
        self._later(self.latency(), at_store)
        return d

    def crash(self) -> None:
        """
        The gateway dies: requests that had not reached the store apply or
        not (as the seed says); no answer is heard.
        """
        self.crashed = True
        pending, self._applying = list(self._applying), []
        self._cancel_calls()
        self.partitioned_at_crash = self.partitioned
        for at_store in pending:
            if not self.partitioned and self.land():
                self._applying.append(at_store)
                at_store()
        self._cancel_calls()

    # -- IBackend ------------------------------------------------------------------

    def open(self) -> Deferred[StoredState]:
        self.closed = False
        return self._request(self.store.storage.state)

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        return self._commit(batch, shared=False)

    def commit_shared(self, batch: StoreBatch) -> Deferred[SharedCommitResult]:
        return self._commit(batch, shared=True)

    def _commit(self, batch: StoreBatch, shared: bool) -> Deferred[Any]:
        epochs = {peer: held[0] for peer, held in self.held.items()}
        snapshot = StoreBatch(
            messages={p: (f, list(c)) for p, (f, c) in batch.messages.items()},
            acked=dict(batch.acked),
            delivered=dict(batch.delivered),
            retired=set(batch.retired),
            forgotten=set(batch.forgotten),
        )

        def fenced_answer(result: Any) -> Any:
            return result

        d = self._request(
            lambda: self.store.apply(self.gateway, epochs, snapshot, shared),
            fenced_answer,
        )

        def forget_fenced(failure: Any) -> Any:
            if failure.check(Fenced):
                for peer in failure.value.streams:
                    self.held.pop(peer, None)
            return failure

        return d.addErrback(forget_fenced)

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        return self._request(
            lambda: list(self.store.storage.read(peer_id, after, limit, max_bytes))
        )

    def close(self) -> Deferred[None]:
        self.closed = True
        for peer in list(self.held):
            self._release_now(peer)
        return succeed(None)

    # -- IStreamOwnership -----------------------------------------------------------

    def acquire(self, peer_id: PeerId, take_over: bool = True) -> Deferred[StreamTaken]:
        sent = self.monotonic()
        store = self.store

        def apply() -> tuple[int, str | None, int, float, StoredState]:
            now = self.clock.seconds()
            lease = store.lease(peer_id)
            live = lease.owner is not None and lease.expires_at > now
            if not take_over and live and lease.owner != self.gateway:
                raise LeaseHeld(peer_id, lease.owner or "", lease.epoch, 0.0)
            remaining = (
                lease.expires_at - now if live and lease.owner != self.gateway else 0.0
            )
            previous = (lease.owner, lease.epoch)
            lease.owner = self.gateway
            lease.epoch += 1
            lease.expires_at = now + self.lease_duration
            return (
                lease.epoch,
                previous[0],
                previous[1],
                remaining,
                store.storage.state(),
            )

        def answer(result: tuple[int, str | None, int, float, StoredState]) -> Any:
            epoch, owner, previous_epoch, remaining, state = result
            arrived = self.monotonic()
            valid_until = sent + self.lease_duration
            self.held[peer_id] = (epoch, arrived + remaining, valid_until)
            outbound = next((r for r in state.outbound if r.peer_id == peer_id), None)
            inbound = tuple(r for r in state.inbound if r.peer_id == peer_id)
            return StreamTaken(
                peer_id,
                epoch,
                owner,
                previous_epoch,
                remaining,
                valid_until,
                outbound,
                inbound,
            )

        before = self.held.get(peer_id)

        def not_taken(failure: Any) -> Any:
            # As the contract says: a failed acquire leaves this backend
            # without the stream, whatever the store holds; unless another
            # acquire granted it meanwhile (PostgresBackend runs them one
            # at a time, so a failure there never follows a later grant).
            if self.held.get(peer_id) is before:
                self.held.pop(peer_id, None)
            return failure

        return self._request(apply, answer).addErrback(not_taken)

    def renew(self) -> Deferred[Renewal]:
        sent = self.monotonic()
        mine = dict(self.held)

        def apply() -> tuple[set[PeerId], set[PeerId]]:
            now = self.clock.seconds()
            renewed, lost = set(), set()
            for peer, (epoch, _, _) in mine.items():
                lease = self.store.lease(peer)
                if lease.owner == self.gateway and lease.epoch == epoch:
                    lease.expires_at = now + self.lease_duration
                    renewed.add(peer)
                else:
                    lost.add(peer)
            return renewed, lost

        def answer(result: tuple[set[PeerId], set[PeerId]]) -> Renewal:
            renewed, lost = result
            valid_until = sent + self.lease_duration
            for peer in renewed:
                held = self.held.get(peer)
                if held is not None and held[0] == mine[peer][0]:
                    self.held[peer] = (held[0], held[1], valid_until)
            for peer in lost:
                if self.held.get(peer, (None,))[0] == mine[peer][0]:
                    self.held.pop(peer, None)
            return Renewal(frozenset(renewed), frozenset(lost), valid_until)

        return self._request(apply, answer)

    def _release_now(self, peer_id: PeerId) -> Deferred[bool]:
        held = self.held.pop(peer_id, None)
        if held is None:
            return succeed(False)
        epoch = held[0]

        def apply() -> bool:
            lease = self.store.lease(peer_id)
            if lease.owner == self.gateway and lease.epoch == epoch:
                lease.owner = None
                lease.expires_at = self.clock.seconds()
                return True
            return False

        return self._request(apply)

    def release(self, peer_id: PeerId) -> Deferred[bool]:
        return self._release_now(peer_id)

    def holds(self, peer_id: PeerId) -> bool:
        held = self.held.get(peer_id)
        if held is None:
            return False
        return held[1] <= self.monotonic() < held[2]

    def delivery_window(self, peer_id: PeerId) -> tuple[float, float] | None:
        held = self.held.get(peer_id)
        return None if held is None else (held[1], held[2])

    def owned(self) -> frozenset[PeerId]:
        return frozenset(self.held)

    def claimable(
        self, limit: int = 1000, peers: Iterable[PeerId] = ()
    ) -> Deferred[list[PeerId]]:
        wanted = set(peers)
        store = self.store

        def look() -> list[PeerId]:
            now = self.clock.seconds()
            waiting = {
                r.peer_id
                for r in store.storage.state().outbound
                if r.last_position > r.acked
            }
            listed = []
            for peer in sorted(waiting | (wanted & set(store.leases)), key=repr):
                lease = store.leases.get(peer)
                if lease is None or lease.owner is None or lease.expires_at <= now:
                    listed.append(peer)
            return listed[:limit]

        return self._request(look)

    def outbound_state(self, peer_id: PeerId) -> Deferred[Any]:
        def look() -> Any:
            state = self.store.storage.state()
            return next((r for r in state.outbound if r.peer_id == peer_id), None)

        return self._request(look)

    def watch(self, callback: Callable[[PeerId], None]) -> Deferred[None]:
        return succeed(None)


# -- the run ------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class GatewaySeedResult:
    """One seed's outcome: its violations (none is a pass) and its figures."""

    seed: int
    violations: list[str]
    sent: int
    delivered: int
    repeats: int
    takeovers: int
    fenced: int
    faults: dict[str, int]
    trace: list[str]
    #: Messages the gateways sent to node 1 (through any gateway) that
    #: node 1 got.
    sent_back: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class _Gateway:
    """One gateway process: its backend, network and ILM node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.node: ILM | None = None
        self.backend: GatewayBackend | None = None
        self.network: StreamNetwork | None = None
        self.restarts = 0
        self.in_progress = 0


class GatewayWorld:
    """One seed's world: the remote node, the gateways, the shared store."""

    def __init__(
        self, seed: int, gateways: int = 2, topology: str | None = None
    ) -> None:
        self.seed = seed
        rng = self.random = random.Random(seed)
        self.clock = Clock()
        self.trace: list[str] = []
        self.violations: list[str] = []
        self.faults: dict[str, int] = {}
        self.lease = rng.choice([0.3, 1.0, 3.0])
        self.store = SharedStore(self.clock, self.lease)
        self.store_latency = rng.choice([0.0005, 0.005, 0.03])
        self.board = Switchboard(self.clock, latency=rng.choice([0.0005, 0.002, 0.01]))
        keepalive = rng.choice([0.05, 0.2])
        self.settings = LinkSettings(
            handshake_timeout=rng.choice([0.3, 1.0]),
            keepalive_interval=keepalive,
            idle_timeout=keepalive * rng.choice([2, 4]),
            reconnect=Backoff(
                initial=rng.choice([0.005, 0.05]), maximum=rng.choice([0.1, 0.5])
            ),
        )
        self.config = Config(
            window=rng.choice([2, 8, 64, 4096]),
            retransmit_timeout=rng.choice([0.05, 0.3]),
            handshake_retry=rng.choice([0.05, 0.3]),
            ack_delay=rng.choice([0.005, 0.05]),
            store_retry=rng.choice([0.01, 0.1]),
            max_store_retry=0.5,
            delivery_retry=0.01,
            max_delivery_retry=0.2,
            ack_interval=aside(rng).choice([0.0, 0.01, 0.05, 0.3]),
        )
        self.async_delivery = rng.random() < 0.5
        self.key = rng.randbytes(32)
        self.names = [f"gw-{chr(ord('a') + i)}" for i in range(gateways)]
        self.gateways = {name: _Gateway(name) for name in self.names}
        # Deliveries: (time, gateway, epoch, message id), in the order they
        # began.
        self.deliveries: list[tuple[float, str, int, int]] = []
        self.delivering: dict[str, float] = {}
        self.takeovers = 0
        self.remote: ILM | None = None
        self.receipts: list[Deferred[Any]] = []
        self.accepted: list[int] = []
        self.sent = 0
        # Messages the gateways send to node 1.
        self.back_sent: dict[str, int] = {}
        self.back_accepted: set[bytes] = set()
        self.back_delivered: list[bytes] = []
        self.back_last: dict[str, int] = {}
        # Who dials whom: node 1 dials the gateways (each an address of its
        # peer), the gateways dial node 1 (each has it as a configured
        # peer: only the owner of its stream dials it), or both.  Drawn
        # apart from the rest, so that a seed with node 1 dialling runs as
        # it did before the gateways could dial.
        if topology is None:
            topology = random.Random(f"topology {seed}").choice(TOPOLOGIES)
        self.topology = topology

    def note(self, text: str) -> None:
        self.trace.append(f"{self.clock.seconds():9.4f} {text}")

    def violation(self, text: str) -> None:
        self.note(f"VIOLATION {text}")
        self.violations.append(f"at {self.clock.seconds():.4f}: {text}")

    # -- nodes --------------------------------------------------------------------

    def start_remote(self) -> None:
        dials = self.topology != "gateways dial"
        network = StreamNetwork(
            REMOTE,
            listen=[]
            if self.topology == "remote dials"
            else [self.board.server("remote")],
            peers={NODE: [self.board.client(n, source="remote") for n in self.names]}
            if dials
            else {},
            keys={NODE: self.key},
            settings=self.settings,
            reactor=self.clock,
            random=random.Random(self.random.getrandbits(64)).random,
            random_bytes=random.Random(self.random.getrandbits(64)).randbytes,
        )
        node = ILM(
            InMemoryBackend(),
            self._back,
            network,
            config=self.config,
            clock=self.clock,
        )
        node.startService()
        self.remote = node

    def start_gateway(self, name: str) -> None:
        gateway = self.gateways[name]
        rng = random.Random(self.random.getrandbits(64))
        backend = GatewayBackend(
            self.store,
            name,
            latency=lambda: rng.uniform(0, 2 * self.store_latency),
            land=lambda: rng.random() < 0.5,
        )
        network = StreamNetwork(
            NODE,
            listen=[self.board.server(name)],
            peers={REMOTE: self.board.client("remote", source=name)}
            if self.topology != "remote dials"
            else {},
            keys={REMOTE: self.key},
            settings=self.settings,
            reactor=self.clock,
            random=rng.random,
            random_bytes=rng.randbytes,
        )
        node = ILM(
            backend, self._delivery(gateway, backend), network, config=self.config,
            clock=self.clock,
        )  # fmt: skip
        gateway.node, gateway.backend, gateway.network = node, backend, network

        def failed(reason: Any) -> None:
            # As a supervisor would: the process exits, and is started
            # again a moment later.
            self.note(f"{name} failed to start: {reason.getErrorMessage()}")
            if gateway.node is node:
                self.kill(name)
                self.clock.callLater(rng.uniform(0.05, 1.0), self._restart, name)

        node.when_started().addErrback(failed)
        node.startService()
        self.note(f"{name} started (restart {gateway.restarts})")
        gateway.restarts += 1

    def _delivery(self, gateway: _Gateway, backend: GatewayBackend) -> Any:
        def deliver(message: Message) -> Deferred[None] | None:
            name = gateway.name
            now = self.clock.seconds()
            if not backend.holds(REMOTE):
                self.violation(
                    f"{name} delivers {message.message_id} without its lease"
                )
            for other, since in self.delivering.items():
                if other != name:
                    self.violation(
                        f"{name} delivers {message.message_id} while {other} has "
                        f"a delivery in progress since {since:.4f}"
                    )
            epoch = backend.held.get(REMOTE, (0, 0.0, 0.0))[0]
            self.deliveries.append((now, name, epoch, message.message_id))
            if not self.async_delivery:
                return None
            self.delivering[name] = now
            d: Deferred[None] = Deferred()

            def done() -> None:
                if self.delivering.get(name) == now:
                    del self.delivering[name]
                d.callback(None)

            call = self.clock.callLater(self.random.uniform(0, 0.02), done)
            gateway.in_progress_call = call  # type: ignore[attr-defined]
            return d

        return deliver

    def kill(self, name: str) -> None:
        gateway = self.gateways[name]
        if gateway.node is None or gateway.backend is None:
            return
        self.note(f"{name} killed")
        self.count("kill")
        crash(gateway.node)
        gateway.backend.crash()
        assert gateway.network is not None
        gateway.network.abort()
        call = getattr(gateway, "in_progress_call", None)
        if call is not None and call.active():
            call.cancel()
        self.delivering.pop(name, None)
        gateway.node = gateway.backend = gateway.network = None

    def count(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    # -- faults ---------------------------------------------------------------------

    def fault(self) -> None:
        rng = self.random
        name = rng.choice(self.names)
        gateway = self.gateways[name]
        kind = rng.choice(["kill", "kill", "partition", "partition", "cut", "freeze"])
        if kind == "kill":
            if gateway.node is None:
                return
            self.kill(name)
            self.clock.callLater(rng.uniform(0, 2.0), self._restart, name)
        elif kind == "partition":
            backend = gateway.backend
            if backend is None or backend.partitioned:
                return
            span = rng.choice([0.1, 0.5, 1.0, 4.0]) * rng.uniform(0.5, 1.0)
            self.note(f"{name} cut off from the store for {span:.3f} s")
            self.count("partition")
            backend.partitioned = True

            def heal() -> None:
                if not backend.crashed:
                    backend.partitioned = False
                    self.note(f"{name} reaches the store again")

            self.clock.callLater(span, heal)
        elif kind == "freeze":
            self.freeze(name)
        else:
            pipes = self.board.pipes_between("remote", name)
            if not pipes:
                return
            self.note(f"link remote-{name} cut")
            self.count("cut")
            for pipe in pipes:
                pipe.cut()

    def freeze(self, name: str) -> None:
        """
        The gateway stops answering, as a process stopped (SIGSTOP) or
        frozen (a VM paused) would look from outside: nothing it writes to
        the remote node or to the store gets through, nothing reaches it,
        for 0.1 to 4 s (often past its lease); then everything flows again,
        and it carries on, possibly deposed.
        """
        gateway = self.gateways[name]
        backend = gateway.backend
        if backend is None or backend.partitioned:
            return
        rng = self.random
        span = rng.choice([0.1, 0.5, 1.0, 4.0]) * rng.uniform(0.5, 1.0)
        pipes = self.board.pipes_between("remote", name)
        self.note(f"{name} frozen for {span:.3f} s ({len(pipes)} connection(s))")
        self.count("freeze")
        backend.partitioned = True
        for pipe in pipes:
            for side in (0, 1):
                pipe.stall(side)

        def thaw() -> None:
            for pipe in pipes:
                for side in (0, 1):
                    pipe.stall(side, False)
            if not backend.crashed:
                backend.partitioned = False
                self.note(f"{name} runs again")

        self.clock.callLater(span, thaw)

    def _restart(self, name: str) -> None:
        if self.gateways[name].node is None:
            self.start_gateway(name)

    healed_all = False

    def send(self) -> None:
        assert self.remote is not None
        index = self.sent
        self.sent += 1
        d = self.remote.send_to(NODE, b"%d" % index)

        def accepted(receipt: Any) -> None:
            self.accepted.append(index)

        d.addCallbacks(accepted, lambda failure: None)
        self.receipts.append(d)

    def send_back(self) -> None:
        """
        A gateway, any running one, sends to node 1 (whether or not it
        serves node 1's link): the store puts the message at the end of
        the shared outbox, and the owner transmits it.
        """
        running = [g for g in self.gateways.values() if g.node is not None]
        if not running:
            return
        gateway = self.random.choice(running)
        assert gateway.node is not None
        count = self.back_sent[gateway.name] = self.back_sent.get(gateway.name, 0) + 1
        contents = f"{gateway.name}:{count}".encode()
        d = gateway.node.send_to(REMOTE, contents)

        def accepted(receipt: Any) -> None:
            self.back_accepted.add(contents)

        d.addCallbacks(accepted, lambda failure: None)

    def _back(self, message: Message) -> None:
        """Node 1's delivery target: what the gateways sent it."""
        expected = len(self.back_delivered) + 1
        if message.message_id != expected:
            self.violation(
                f"node 1 got message {message.message_id} from node 2 after "
                f"{expected - 1}"
            )
        name, _, count = message.contents.decode().partition(":")
        last = self.back_last.get(name, 0)
        if int(count) <= last:
            self.violation(
                f"node 1 got {message.contents!r} after {name}:{last}: out of "
                f"the order {name} sent them in"
            )
        self.back_last[name] = int(count)
        self.back_delivered.append(message.contents)

    # -- run -----------------------------------------------------------------------

    def run(self) -> None:
        rng = self.random
        self.note(
            f"seed {self.seed}: lease {self.lease}s, store latency "
            f"{self.store_latency}s, network latency {self.board.latency}s, "
            f"window {self.config.window}, async delivery {self.async_delivery}, "
            f"{self.topology}"
        )
        for name in self.names:
            self.start_gateway(name)
        self.start_remote()
        chaos = rng.uniform(2.0, 8.0)
        messages = rng.randint(20, 300)
        for _ in range(messages):
            self.clock.callLater(rng.uniform(0, chaos), self.send)
        for _ in range(rng.choice([0, 10, 50])):
            self.clock.callLater(rng.uniform(0, chaos), self.send_back)
        rate = rng.choice([0.5, 2.0, 5.0])
        t = rng.expovariate(rate)
        while t < chaos:
            self.clock.callLater(t, self.fault)
            t += rng.expovariate(rate)
        self.clock.callLater(chaos, self.heal)
        self.advance_until(lambda: self.done(), limit=chaos + 300.0)
        self.final_checks()
        for name in self.names:
            self.kill(name)
        if self.remote is not None:
            crash(self.remote)

    def heal(self) -> None:
        self.healed_all = True
        self.note("faults stop: every gateway up and reaching the store")
        for name, gateway in self.gateways.items():
            if gateway.node is None:
                self.start_gateway(name)
            elif gateway.backend is not None:
                gateway.backend.partitioned = False

    def done(self) -> bool:
        if not self.healed_all or self.remote is None:
            return False
        if len(self.receipts) < self.sent or not all(d.called for d in self.receipts):
            return False
        if not self.back_accepted <= set(self.back_delivered):
            return False
        return self.remote.pending_outbound().get(NODE, 0) == 0

    def advance_until(self, condition: Callable[[], bool], limit: float) -> None:
        clock = self.clock
        while not condition():
            calls = clock.getDelayedCalls()
            if not calls or clock.seconds() > limit:
                self.violation("liveness: not everything delivered and acknowledged")
                return
            step = max(0.0, min(c.getTime() for c in calls) - clock.seconds())
            clock.advance(step)

    def final_checks(self) -> None:
        """
        In order, exactly once, except repeats at the start of a new grant
        (a take-over: the stream restarted from the store), at most a
        window of them; every accepted message delivered.
        """
        delivered: list[int] = []
        epoch = -1
        fresh = False
        repeats = 0
        for _, name, granted, message_id in self.deliveries:
            expected = len(delivered) + 1
            if granted != epoch:
                epoch, fresh = granted, True
            if message_id == expected:
                delivered.append(message_id)
                fresh = False
            elif message_id < expected:
                if not fresh:
                    self.violation(
                        f"{name} repeats {message_id} (after {expected - 1}) "
                        f"within epoch {granted}, not after a take-over"
                    )
                if expected - message_id > self.config.window:
                    self.violation(
                        f"{name} goes back from {expected - 1} to {message_id}: "
                        f"more than a window ({self.config.window})"
                    )
                repeats += 1
            else:
                self.violation(f"{name} delivers {message_id} after {expected - 1}")
        missing = sorted(i + 1 for i in self.accepted if i + 1 > len(delivered))
        if missing:
            self.violation(f"accepted but never delivered: {missing[:10]}")
        lost = sorted(self.back_accepted - set(self.back_delivered))
        if lost:
            self.violation(f"sent by a gateway, never delivered to node 1: {lost[:5]}")
        if len(set(self.back_delivered)) != len(self.back_delivered):
            self.violation("node 1 got a message from node 2 twice")
        # No ping-pong: the stream changes hands (a claim, a link) a few
        # times per fault, not at every link of gateways taking it from
        # each other.
        epochs = self.store.lease(REMOTE).epoch
        faults = sum(self.faults.values())
        if epochs > 3 * faults + 4 * len(self.names):
            self.violation(
                f"{epochs} epochs for {faults} faults: gateways take the "
                f"stream from each other"
            )
        self.repeats = repeats
        self.delivered = len(delivered)


# ILM log events that mean something went wrong, whatever the faults.
_BAD_EVENTS = frozenset(
    {
        "internal_error",
        "messages_lost",
        "protocol_violation",
        # (Not outbox_read_failed: a gateway cut off from the store fails
        # its reads, and retries.)
        "link_protocol_violation",
        "authentication_failed",
        "spoofed_peer",
    }
)


def run_gateway_seed(
    seed: int,
    gateways: int = 2,
    events: bool = False,
    topology: str | None = None,
) -> GatewaySeedResult:
    """
    Run one multi-gateway seed.  ILM's log events are watched while it
    runs (an event that means a bug is a violation; with ``events``, every
    one goes to the trace), and an error logged anywhere else is a
    violation too.

    :return: its :class:`GatewaySeedResult` (``ok`` when no violation).
    """
    import ilm._dial_claims
    import ilm._lease_keeper
    import ilm._nodelog
    import ilm._ownership_guard
    import ilm.network._stream

    world = GatewayWorld(seed, gateways, topology)
    loggers = (
        ilm._nodelog.log,
        ilm.network._stream.log,
        ilm._ownership_guard.log,
        ilm._dial_claims.log,
        ilm._lease_keeper.log,
    )

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        name = event.get("ilm_event")
        if events:
            namespace = str(event.get("log_namespace", ""))
            world.note(f"[{namespace}] {formatEvent(event)}")
        if name in _BAD_EVENTS:
            world.violation(f"{name}: {formatEvent(event)}")

    @provider(ILogObserver)
    def elsewhere(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None and event.get("log_logger") not in (
            loggers
        ):
            world.violation(f"error logged: {formatEvent(event)}")

    saved = [log.observer for log in loggers]
    for log in loggers:
        log.observer = observe
    globalLogPublisher.addObserver(elsewhere)
    try:
        world.run()
    except Exception as e:  # pragma: no cover - reported, not raised
        import traceback

        world.violations.append(
            f"exception: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        )
    finally:
        for log, observer in zip(loggers, saved, strict=True):
            log.observer = observer
        globalLogPublisher.removeObserver(elsewhere)
    return GatewaySeedResult(
        seed=seed,
        violations=world.violations,
        sent=world.sent,
        delivered=getattr(world, "delivered", 0),
        repeats=getattr(world, "repeats", 0),
        takeovers=world.store.lease(REMOTE).epoch,
        fenced=world.store.fenced,
        faults=dict(world.faults),
        trace=world.trace,
        sent_back=len(world.back_delivered),
    )


def run_gateway_seeds(
    start: int, count: int, gateways: int, out: IO[str], verbose: bool = False
) -> int:
    """
    ``python -m ilm.simulation --gateways N``: run ``count`` seeds from
    ``start``, print each failed seed's violations and how to replay it,
    and a summary.

    :return: the exit status: 0 when every seed passed, 1 otherwise.
    """
    if gateways < 2:
        out.write("--gateways: at least 2\n")
        return 2
    totals: dict[str, int] = {}
    failed: list[int] = []
    began = time.perf_counter()
    for seed in range(start, start + count):
        result = run_gateway_seed(seed, gateways, events=verbose)
        if verbose:
            out.write(f"--- seed {seed}\n" + "\n".join(result.trace) + "\n")
        for key, value in (
            ("sent", result.sent),
            ("delivered", result.delivered),
            ("repeated", result.repeats),
            ("epochs", result.takeovers),
            ("fenced commits", result.fenced),
            ("sent by gateways", result.sent_back),
            *((f"fault {k}", v) for k, v in result.faults.items()),
        ):
            totals[key] = totals.get(key, 0) + value
        if not result.ok:
            failed.append(seed)
            out.write(f"seed {seed} FAILED:\n")
            for violation in result.violations[:10]:
                out.write(f"  {violation}\n")
            out.write(
                f"  replay: python -m ilm.simulation --gateways {gateways} "
                f"--seeds 1 --start {seed} --verbose\n"
            )
    seconds = time.perf_counter() - began
    figures = ", ".join(f"{k} {v:,}" for k, v in sorted(totals.items()))
    out.write(
        f"{count} multi-gateway seed(s) ({gateways} gateways) from {start}: "
        f"{len(failed)} with violations, in {seconds:.1f} s; {figures}\n"
    )
    return 1 if failed else 0
