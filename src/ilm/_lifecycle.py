"""
A node's life: start, drain with a deadline, stop, crash.

The states are a typed automat machine (as Twisted's ``ClientService``
keeps its own), over the node's :class:`ilm._node.NodeCore`::

    new --start--> starting --opened--> running --stop--> stopping
    starting, running, stopping --start_failed--> failed
    new, starting, stopping, failed --stopped--> stopped
    any state --crash--> stopped

:class:`NodeLife` drives it: it opens the store, loads the peers, starts
the network, holds the sends made before the start, and runs the shutdown
(drain until a deadline, commit the marks while the links are up, stop the
network, let deliveries settle, commit again, close the store).  A
transition the machine does not list raises ``automat.NoTransition``: a
bug, never a path a caller can take.  Machine inputs cost about a
microsecond: they are made on rare events only, never per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from ilm._link import PeerRouter
from ilm._node import NodeCore
from ilm._nodelog import log
from ilm._observer import OneShotObserver
from ilm._peer import DOWN
from ilm._peerid import PeerId
from ilm._store import StoredState
from ilm.errors import NotRunning, ShutdownTimeout, StoreError

#: Seconds the store is given to close at the end of a shutdown, beyond
#: the shutdown's own timeout if that leaves less.
CLOSE_GRACE = 5.0

__all__ = ["NodeLife"]

NEW = "new"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"

_PEERS_SHOWN = 20


class _Life(Protocol):
    """The machine's inputs."""

    def state(self) -> str:
        """The state's name (``ILM.state``)."""

    def start(self) -> None:
        """``startService``: open the store."""

    def opened(self) -> None:
        """The store opened and the peers are loaded: start the network."""

    def start_failed(self) -> None:
        """The store or the network could not start."""

    def stop(self) -> None:
        """The shutdown begins draining."""

    def stopped(self) -> None:
        """The node is stopped (or gave up a start still in progress)."""

    def crash(self) -> None:
        """Stop dead (tests and the simulator)."""


def _build() -> Callable[[NodeCore], _Life]:
    machine = TypeMachineBuilder(_Life, NodeCore)
    new = machine.state(NEW)
    starting = machine.state(STARTING)
    running = machine.state(RUNNING)
    stopping = machine.state(STOPPING)
    failed = machine.state(FAILED)
    stopped = machine.state(STOPPED)
    for state, name in (
        (new, NEW),
        (starting, STARTING),
        (running, RUNNING),
        (stopping, STOPPING),
        (failed, FAILED),
        (stopped, STOPPED),
    ):
        state.upon(_Life.state).loop().returns(name)
    new.upon(_Life.start).to(starting).returns(None)
    for state in (starting, running, stopping):
        state.upon(_Life.start).loop().returns(None)
    starting.upon(_Life.opened).to(running).returns(None)

    def ended(name: str) -> Callable[[_Life, NodeCore], None]:
        def end(life: _Life, core: NodeCore) -> None:
            core.ended = f"ILM node {core.local_id!r} {name}"

        return end

    for state in (starting, running, stopping):
        state.upon(_Life.start_failed).to(failed)(ended(FAILED))
    for state in (failed, stopped):
        state.upon(_Life.start_failed).loop().returns(None)
    running.upon(_Life.stop).to(stopping).returns(None)
    for state in (new, starting, stopping, failed):
        state.upon(_Life.stopped).to(stopped)(ended(STOPPED))
    stopped.upon(_Life.stopped).loop().returns(None)
    for state in (new, starting, running, stopping, failed):
        state.upon(_Life.crash).to(stopped)(ended(STOPPED))
    stopped.upon(_Life.crash).loop().returns(None)
    return machine.build()


_machine = _build()


class _Abandoned(Exception):
    """
    Unwinds a shutdown in progress when the node is abandoned (crashed).
    """


class RunningFlag(Protocol):
    """The node's ``IService``, as far as its ``running`` flag goes."""

    running: int


class NodeLife:
    """
    Starts and stops one node.

    :param service: the node's ``IService`` (its ``running`` is cleared
        when the node stops or fails).
    """

    def __init__(
        self,
        core: NodeCore,
        router: PeerRouter,
        *,
        service: RunningFlag,
    ) -> None:
        self._core = core
        self._router = router
        self._committer = router.committer
        self._service = service
        self._machine = _machine(core)
        #: Whether sends are accepted (running, no shutdown asked).
        self.accepting = False
        self.started_at: float | None = None
        self._started: OneShotObserver[None] = OneShotObserver()
        self._start_failure: Failure | None = None
        self._early: list[tuple[Callable[[], Deferred[Any]], Deferred[Any]]] = []
        self._early_count = 0
        self._shutdown: OneShotObserver[None] | None = None
        self._shutdown_result: Failure | None = None
        self._backend_open = False
        self._abandoned = False
        self._start_abandoned = False

    @property
    def state(self) -> str:
        return self._machine.state()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown is not None

    def may_commit(self) -> bool:
        return self._machine.state() in (RUNNING, STOPPING)

    def hold(
        self, send: Callable[[], Deferred[Any]], count: int
    ) -> Deferred[Any] | None:
        """
        A send of ``count`` messages made before the start: ``send`` is
        made once the node runs, in the order the sends were made.

        :return: a Deferred with ``send``'s outcome, or ``None`` if it cannot
            be held (the node is not new or starting, or too many messages
            are held).
        """
        if self.state not in (NEW, STARTING) or self._shutdown is not None:
            return None
        if self._early_count + count > self._core.config.max_outbox_messages:
            return None
        d: Deferred[Any] = Deferred()
        self._early.append((send, d))
        self._early_count += count
        return d

    # -- start -----------------------------------------------------------------

    def startable(self) -> bool:
        """
        :return: whether :meth:`start` would start the node (it is new).
        :raises NotRunning: if it stopped or failed: a node starts once.
        """
        state = self.state
        if state in (STOPPED, FAILED):
            raise NotRunning(
                f"ILM node {self._core.local_id!r} has {state}; a node cannot be "
                f"started again: create a new one"
            )
        return state == NEW

    def start(self) -> None:
        """
        Open the store, then start the network (the node is new).
        """
        self._machine.start()
        d = maybeDeferred(self._core.backend.open)
        d.addCallback(self._opened)
        d.addCallbacks(self._running, self._start_failed)
        d.addErrback(self._core.unexpected, "starting")

    def when_started(self) -> Deferred[None]:
        if self._start_failure is not None:
            return fail(self._start_failure)
        if self.state in (RUNNING, STOPPING, STOPPED):
            return succeed(None)
        return self._started.when_fired()

    def _opened(self, state: StoredState) -> object:
        core, router = self._core, self._router
        self._backend_open = True
        if self._start_abandoned:
            raise NotRunning("shut down before its store had opened")
        core.incarnation = state.incarnation
        now = core.clock.seconds()
        ids = [r.peer_id for r in state.outbound] + [r.peer_id for r in state.inbound]
        if core.local_id in ids:
            raise StoreError(
                f"this store holds state for a peer with this node's own id "
                f"{core.local_id!r}: it belongs to another node"
            )
        for record in state.outbound:
            peer = router.add_peer(record.peer_id, record.acked, record.last_position)
            peer.sender.outbox_bytes = record.pending_bytes
            if record.last_position > record.acked:
                peer.sender.accept_times.append((record.last_position, now))
        for inbound in state.inbound:
            peer = core.peers.get(inbound.peer_id) or router.new_peer(inbound.peer_id)
            if inbound.retired:
                peer.retired[inbound.incarnation] = None
            else:
                peer.add_stream(inbound.incarnation, inbound.delivered)
        for peer in core.peers.values():
            # A store written with a larger limit (or by an older ILM).
            forgotten = peer.forget_retired()
            if forgotten:
                router.forgotten(peer, forgotten)
        self._machine.opened()
        return core.network.start(router)

    def _running(self, _: object) -> None:
        core = self._core
        if self._start_abandoned:
            stopping = maybeDeferred(core.network.stop)
            stopping.addErrback(core.unexpected, "stopping a network started too late")
            self._start_failed(
                Failure(NotRunning("shut down before its network had started"))
            )
            return
        if self.state != RUNNING:
            return
        stored = sorted(core.peers, key=lambda p: (type(p) is str, p))
        dialled = core.dialled_peers()
        log.info(
            "ILM node {local_id!r} running (incarnation {incarnation}): its store "
            "holds state for {stored_count} peer(s)"
            + (" {stored_peers}" if stored else "")
            + ", {pending} message(s) pending"
            + ("; its network dials {dialled_count} peer(s)" if dialled else ""),
            local_id=core.local_id,
            incarnation=core.incarnation,
            stored_count=len(stored),
            stored_peers=stored[:_PEERS_SHOWN],
            pending=sum(peer.sender.outbox_count for peer in core.peers.values()),
            dialled_count=len(dialled) if dialled is not None else None,
            dialled_peers=(
                sorted(dialled, key=lambda p: (type(p) is str, p))[:_PEERS_SHOWN]
                if dialled is not None
                else None
            ),
            ilm_event="started",
        )
        self.accepting = self._shutdown is None
        self.started_at = core.clock.seconds()
        # Sends made before the start take their positions before anything a
        # start callback sends.
        early, self._early = self._early, []
        self._early_count = 0
        for send, d in early:
            send().chainDeferred(d)
        if self._router.streams is not None:
            self._router.streams.guard.start()
        self._started.fire(None)

    def _start_failed(self, reason: Failure) -> None:
        core = self._core
        self._machine.start_failed()
        self._start_failure = reason
        self._service.running = 0
        core.stop_limiter()
        if self._start_abandoned:
            pass
        elif reason.check(StoreError, CannotListenError):
            # Expected (a store locked or unreadable, an address taken):
            # the reason says it all, a traceback would only hide it.
            log.critical(
                "ILM node {local_id!r} failed to start: {error}",
                local_id=core.local_id,
                error=reason.getErrorMessage(),
                error_type=type(reason.value).__name__,
                ilm_event="start_failed",
            )
        else:
            log.failure(
                "ILM node {local_id!r} failed to start",
                reason,
                local_id=core.local_id,
                ilm_event="start_failed",
            )
        self._started.fire(reason)
        early, self._early = self._early, []
        self._early_count = 0
        if early:
            refusal = NotRunning(
                f"ILM node {core.local_id!r} did not start: {reason.getErrorMessage()}"
            )
            refusal.__cause__ = reason.value
            for _, d in early:
                core.count_refusal(refusal.reason)
                d.errback(refusal)
        if self._backend_open:
            self._backend_open = False
            closing = maybeDeferred(core.backend.close)
            closing.addErrback(core.unexpected, "closing the store after failing")

    # -- stop ------------------------------------------------------------------

    def shutdown(self, timeout: float) -> Deferred[None]:
        if self._shutdown is not None:
            if self.state == STOPPED:
                failure = self._shutdown_result
                return fail(failure) if failure is not None else succeed(None)
            return self._shutdown.when_fired()
        self._shutdown = OneShotObserver()
        self.accepting = False
        if self.state in (NEW, FAILED):
            self._machine.stopped()
            self._shutdown.fire(None)
            return succeed(None)
        deadline = self._core.clock.seconds() + timeout
        result = Deferred.fromCoroutine(self._stop(timeout, deadline))
        result.addBoth(self._shutdown_finished)
        return result

    def _shutdown_finished(self, result: object) -> object:
        if isinstance(result, Failure) and result.check(_Abandoned):
            result = Failure(NotRunning(f"ILM node {self._core.local_id!r} crashed"))
        elif isinstance(result, Failure):
            self._shutdown_result = result
            if not result.check(ShutdownTimeout):
                log.failure("shutdown failed", result, ilm_event="shutdown_failed")
        assert self._shutdown is not None
        self._shutdown.fire(result if isinstance(result, Failure) else None)
        return result

    async def _stop(self, timeout: float, deadline: float) -> None:
        core, router, committer = self._core, self._router, self._committer
        clock = core.clock
        # shutdown() may be called from inside a delivery (a DeferredQueue
        # fires its getter synchronously from put()): let that call stack
        # finish, so the delivery is recorded, before anything else.
        turn: Deferred[None] = Deferred()
        clock.callLater(0, turn.callback, None)
        await turn
        if self._abandoned:
            raise _Abandoned()
        if self.state == STARTING:
            started = await self._within(self.when_started(), deadline, quiet=True)
            if not started:
                # The store or the network is still opening: give up on the
                # start; whatever completes later is closed again at once.
                self._start_abandoned = True
                self._machine.stopped()
                self._service.running = 0
                raise ShutdownTimeout(timeout, {})
        if self.state == FAILED:
            self._machine.stopped()
            return
        self._machine.stop()
        self._service.running = 0
        early, self._early = self._early, []
        self._early_count = 0
        for _, d in early:
            refusal = NotRunning("ILM is shutting down")
            core.count_refusal(refusal.reason)
            d.errback(refusal)
        drained = True
        if not core.is_drained():
            drained = await self._within(core.drained.when_fired(), deadline)
        # Commit outstanding delivery marks while the links are still up, so
        # that their acknowledgements reach the peers before we go.
        idle = await self._within(committer.barrier(), deadline)
        drained = drained and idle
        # The ACKs paced to leave later leave now, while the links are up.
        for peer in core.peers.values():
            peer.acks.flush()
        pending = self.pending()
        grace = max(deadline, clock.seconds() + 1.0)
        closed = await self._within(maybeDeferred(core.network.stop), grace)
        for peer_id in list(core.peers):
            router.lost(peer_id, Failure(NotRunning("ILM is shutting down")))
        # Let a delivery in progress finish, start no new one, and commit the
        # marks of everything delivered so that it is not delivered again.
        core.deliveries_allowed = False
        for peer in core.peers.values():
            peer.deliverer.stop_retrying()
        settled = True
        if core.delivering():
            settled = await self._within(core.settled.when_fired(), grace)
        committed = await self._within(committer.barrier(), grace)
        self._machine.stopped()
        self._stop_everything()
        # The store gets at least CLOSE_GRACE to close (a checkpoint of a
        # large WAL takes a while), but a close that never ends (its thread
        # gone) must not hold the shutdown, and the process, forever.
        closing = maybeDeferred(core.backend.close)
        closing.addErrback(
            lambda failure: log.failure(
                "closing the store failed", failure, ilm_event="store_close_failed"
            )
        )
        store_closed = await self._within(
            closing, max(grace, clock.seconds() + CLOSE_GRACE), quiet=True
        )
        if not store_closed:
            log.error(
                "the store did not close within {seconds:.0f}s: ILM node "
                "{local_id!r} stops without waiting for it",
                seconds=CLOSE_GRACE,
                local_id=core.local_id,
                ilm_event="store_close_timeout",
            )
        log.info(
            "ILM node {local_id!r} stopped",
            local_id=core.local_id,
            ilm_event="stopped",
        )
        if not (drained and closed and settled and committed and store_closed):
            raise ShutdownTimeout(timeout, pending or self.pending())

    def pending(self) -> dict[PeerId, int]:
        """Per peer, the messages awaiting acknowledgement (none omitted)."""
        return {
            pid: peer.sender.outbox_count
            for pid, peer in self._core.peers.items()
            if peer.sender.outbox_count
        }

    def _stop_everything(self) -> None:
        core = self._core
        self._committer.stop()
        self._router.ack_schedule.stop()
        if self._router.streams is not None:
            self._router.streams.guard.stop()
        core.stop_limiter()
        detail = f"ILM node {core.local_id!r} stopped"
        for peer in core.peers.values():
            peer.cancel_handshake()
            peer.deliverer.cancel_timers()
            peer.sender.stop(detail)

    def abandon(self) -> None:
        """
        Stop dead, as if the process had been killed: cancel every timer,
        start no more I/O, touch neither the backend nor the network.  For
        crash tests and the simulator (see :func:`ilm.testing.crash`).
        """
        core = self._core
        self._abandoned = True
        self._machine.crash()
        self._service.running = 0
        self.accepting = False
        core.deliveries_allowed = False
        self._early = []
        self._early_count = 0
        for peer in core.peers.values():
            peer.link = DOWN
            peer.cancel_timers()
            peer.sender.waiters = []
        self._committer.stop()
        self._router.ack_schedule.stop()
        if self._router.streams is not None:
            self._router.streams.guard.stop(crashed=True)
        core.stop_limiter()

    async def _within(
        self, d: Deferred[Any], deadline: float, quiet: bool = False
    ) -> bool:
        """
        Wait for ``d`` until ``deadline``; return whether it fired in time.
        A failure of ``d`` counts as fired, and is logged unless ``quiet``.
        """
        clock = self._core.clock
        outcome: Deferred[bool] = Deferred()
        remaining = max(0.0, deadline - clock.seconds())

        def expired() -> None:
            if not outcome.called:
                outcome.callback(False)

        timer = clock.callLater(remaining, expired)

        def done(result: object) -> None:
            if isinstance(result, Failure) and not quiet:
                log.failure("error during shutdown", result, ilm_event="shutdown_error")
            if not outcome.called:
                if timer.active():
                    timer.cancel()
                outcome.callback(True)

        d.addBoth(done)
        in_time = await outcome
        if self._abandoned:
            raise _Abandoned()
        return in_time
