"""
The demo's HTTP leg: numbered messages go **in** over HTTP to one
``twistd ilm`` daemon and come **out** of another through a signed webhook,
while the receiving daemon is SIGKILLed and restarted and their link is cut.

- **Two daemons.**  Daemon A and daemon B are real ``twistd -n ilm``
  processes (ids ``A`` and ``B``), each with its own SQLite store in the
  run's directory, linked with a pre-shared key generated for the run.
  A serves its HTTP API on a free loopback port (its bearer token in the
  file the daemon creates, mode 0600).  A dials B through a :class:`Relay`
  in the driver, which cuts their link; B delivers every message to a
  webhook in the driver, signed with a secret generated for the run.
- **In over HTTP.**  :class:`HttpSender` POSTs the numbers 1..N (the demo's
  64-byte checksummed messages) to ``/v1/peers/B/messages`` on A, several
  requests in flight, each with an ``Idempotency-Key`` of its own.  A POST
  that gets no answer, or ``429``/``503``, is sent again with the same key
  (A answers a retried key with its first answer: nothing is stored twice);
  A is never killed, so every POST ends with an answer.  A POST answered
  ``202`` tells the message's position in A's stream to B
  (``message_id``); concurrent POSTs are stored in the order A took them,
  so the sender keeps, per number, the position A gave it.
- **Out over a webhook.**  :class:`WebhookReceiver` (a ``twisted.web``
  resource) checks each request's ``webhook-signature`` (Standard Webhooks:
  HMAC-SHA256 of ``id.timestamp.body``, computed with
  :func:`ilm._webhook.sign`) and timestamp, decodes the message, records the
  delivery (in the demo's record format, and with its ``webhook-id``) and
  answers ``200``.  Each of B's processes gets its own webhook URL
  (``/hook/<life>``), so every request is counted in the life of the process
  that sent it, even one read after that process was killed.
- **Verified like the other streams.**  Each delivery's number is replaced by
  the position A gave that number, so the verifier
  (:mod:`ilm._demo._verify`) checks the webhook's deliveries against A's
  store exactly as it checks the other streams (nothing missing, nothing
  reordered, repeats only in the window after a kill of B), plus the
  ``webhook-id`` of each repeat against its first delivery's.
- **Faults.**  The seeded plan (:mod:`ilm._demo._plan`) kills B and cuts the
  link at thresholds of webhook deliveries; the sender may not POST more
  than 5 % of the leg past the next fault's threshold until it happened.
  A killed B is restarted at once on its store.  While B is down the relay
  holds A's connection attempts, so A's link comes back as soon as B is.

A daemon reads nothing on its standard input; its end (the driver gone,
even SIGKILLed) makes it exit, so no daemon outlives the driver.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ilm._demo._plan import CUT, Fault, FaultSchedule, fault_plan
from ilm._demo._processes import (
    ChildProcess,
    Supervised,
    kill_now,
    stop_processes,
    tail,
)
from ilm._demo._progress import RateMeter
from ilm._demo._records import RecordWriter, decode, encode
from ilm._demo._relay import Relay
from ilm._demo._verify import ReceiverLife, StreamEvidence
from ilm._webhook import sign

STREAM = "HTTP -> A -> B -> webhook"
SENDER = "daemon A"
RECEIVER = "daemon B"
# Seconds a webhook's timestamp may differ from this clock (as in the
# Standard Webhooks libraries).
TOLERANCE = 300
# What daemon B logs once its node runs (and listens).
_RUNNING = b" running (incarnation "
# Runs twistd in a process that exits when its standard input ends.
_TWISTD = (
    "import os, threading\n"
    "def _watch():\n"
    "    while os.read(0, 4096):\n"
    "        pass\n"
    "    os._exit(1)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "from twisted.scripts.twistd import run\n"
    "run()\n"
)


_TWISTD_OPTIONS = ("-n", "--pidfile=", "--logfile=-")


class HttpLegError(Exception):
    """
    Daemon A refused a message for good (an answer other than ``202``,
    ``429`` or ``503``).
    """


def free_port() -> int:
    """
    A free loopback TCP port below the ephemeral range: no outgoing
    connection takes it between this check and the daemon binding it.
    """
    low, high = 10000, 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = max(int(f.read().split()[0]), 12000)
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


class WebhookReceiver(Resource):
    """
    The receiving application of the HTTP leg: the webhook daemon B POSTs
    each message to.  Each request's signature and timestamp are checked,
    its message decoded and recorded, with its ``webhook-id``, in the life
    (B's process) its URL names; the answer is ``200`` (also for a request
    that does not check out: it is recorded as corrupt and fails the run).

    :param key: the webhook secret's signing key.
    :param now_ns: CLOCK_MONOTONIC, as in the messages.
    :param wall: the Unix time, for the timestamps.
    """

    isLeaf = True

    def __init__(
        self,
        key: bytes,
        now_ns: Callable[[], int] = time.monotonic_ns,
        wall: Callable[[], float] = time.time,
    ) -> None:
        Resource.__init__(self)
        self._key = key
        self._now_ns = now_ns
        self._wall = wall
        #: Per life: (position, number, sent_ns, received_ns) per delivery.
        self.lives: dict[int, list[tuple[int, int | None, int, int]]] = {}
        #: Per life: each delivery's ``webhook-id``.
        self.ids: dict[int, list[str]] = {}
        self._writers: dict[int, RecordWriter] = {}
        self.positions: set[int] = set()
        self.requests = 0
        self.bad_signatures = 0

    def open_life(self, life: int, records: str, pid: int) -> None:
        """
        Get ready for requests from B's process ``life`` (its ``pid``),
        recorded in the file ``records`` too.
        """
        self.lives.setdefault(life, [])
        self.ids.setdefault(life, [])
        self._writers[life] = RecordWriter(records, pid, self._now_ns())

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def verified(self, request: Request, body: bytes) -> bool:
        """
        Whether ``request`` carries a valid signature of ``body`` made now.
        """
        identity = _header(request, b"webhook-id")
        timestamp = _header(request, b"webhook-timestamp")
        signatures = _header(request, b"webhook-signature")
        try:
            stamp = int(timestamp)
        except ValueError:
            return False
        if not identity or abs(self._wall() - stamp) > TOLERANCE:
            return False
        expected = sign(self._key, identity, stamp, body)
        return any(_same(expected, signature) for signature in signatures.split())

    def render_POST(self, request: Request) -> bytes:
        received_ns = self._now_ns()
        self.requests += 1
        path = request.postpath or []
        life = int(path[1]) if len(path) == 2 and path[1].isdigit() else -1
        if path[:1] != [b"hook"] or life not in self.lives:
            request.setResponseCode(404)
            return b"no such hook\n"
        assert request.content is not None
        body = request.content.read()
        decoded = decode(body)
        if not self.verified(request, body):
            self.bad_signatures += 1
            decoded = None
        elif _header(request, b"ilm-source") != "A":
            decoded = None
        try:
            position = int(_header(request, b"ilm-message-id"))
        except ValueError:
            position = 0
        number, sent_ns = decoded if decoded is not None else (None, 0)
        self.lives[life].append((position, number, sent_ns, received_ns))
        self.ids[life].append(_header(request, b"webhook-id"))
        writer = self._writers.get(life)
        if writer is not None:
            writer.delivered(position, number, sent_ns, received_ns)
        if number is not None:
            self.positions.add(position)
        return b""


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return "" if value is None else value.decode("latin-1")


def _same(expected: str, given: str) -> bool:
    import hmac

    return hmac.compare_digest(expected.encode(), given.encode())


class HttpSender:
    """
    POSTs the numbers 1..``messages`` to daemon A's API for B, up to
    ``concurrency`` requests in flight, each with its own
    ``Idempotency-Key``; retries a POST that got no answer (or ``429``,
    ``503``) with the same key; never goes past its credit.

    ``stored_at`` maps each number to the position (``message_id``) A
    answered for it.

    :param client: a treq ``HTTPClient``.
    :param url: ``http://HOST:PORT/v1/peers/B/messages``.
    :param token: A's bearer token.
    :param run: makes this run's keys unique.
    """

    def __init__(
        self,
        reactor: Any,
        client: Any,
        url: str,
        token: str,
        messages: int,
        credit: int,
        run: str,
        *,
        concurrency: int = 32,
        now_ns: Callable[[], int] = time.monotonic_ns,
        retry_delay: float = 0.05,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._url = url
        self._token = token
        self._messages = messages
        self._credit = credit
        self._run = run
        self._concurrency = concurrency
        self._now_ns = now_ns
        self._retry_delay = retry_delay
        self._waiters: list[Deferred[None]] = []
        self.sent = 0  # the highest number handed to a POST
        self.stored_at: dict[int, int] = {}
        self.retries = 0
        self.stopped = False

    @property
    def answered(self) -> int:
        return len(self.stored_at)

    def set_credit(self, credit: int) -> None:
        """Let the sender go up to number ``credit``."""
        self._credit = max(self._credit, credit)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stop(self) -> None:
        """Post nothing more (the run is ending)."""
        self.stopped = True
        self.set_credit(self._messages)

    async def run(self) -> None:
        """
        POST every number until A answered each.

        :raises HttpLegError: if A refused one for good.
        """
        workers = [
            Deferred.fromCoroutine(self._worker()) for _ in range(self._concurrency)
        ]
        for ok, result in await DeferredList(workers, consumeErrors=True):
            if not ok:
                assert isinstance(result, Failure)
                self.stop()
                result.raiseException()

    async def _worker(self) -> None:
        while not self.stopped and self.sent < self._messages:
            if self.sent >= min(self._credit, self._messages):
                waiter: Deferred[None] = Deferred()
                self._waiters.append(waiter)
                await waiter
                continue
            self.sent += 1
            await self._post(self.sent)

    async def _post(self, number: int) -> None:
        body = encode(number, self._now_ns())
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Idempotency-Key": f"ilm-demo-{self._run}-{number}",
            "Content-Type": "application/octet-stream",
        }
        while not self.stopped:
            try:
                response = await self._client.post(
                    self._url, data=body, headers=headers, timeout=30
                )
                text: bytes = await response.content()
            except Exception:
                # No answer: the same key again, while A lives.
                self.retries += 1
                await deferLater(self._reactor, self._retry_delay)
                continue
            if response.code == 202:
                self.stored_at[number] = int(json.loads(text)["message_id"])
                return
            if response.code in (429, 503):
                self.retries += 1
                await deferLater(self._reactor, self._retry_delay)
                continue
            raise HttpLegError(
                f"daemon A answered {response.code} to the POST of message "
                f"{number}: {text[:300].decode('utf-8', 'replace')}"
            )


class _DaemonProcess(ChildProcess):
    """
    One process of a daemon: its log to a file, its start noticed.
    """

    def __init__(self, daemon: Daemon) -> None:
        ChildProcess.__init__(self)
        self.daemon = daemon
        self.running = False
        self._tail = b""

    def outReceived(self, data: bytes) -> None:
        self.daemon.log(data)
        if not self.running:
            seen = self._tail + data
            if _RUNNING in seen:
                self.running = True
                self.daemon.leg.daemon_running(self.daemon, self)
            self._tail = seen[-len(_RUNNING) :]

    def errReceived(self, data: bytes) -> None:
        self.daemon.log(data)

    def process_ended(self, reason: Failure) -> None:
        self.daemon.leg.daemon_ended(self.daemon, self, reason)


class Daemon(Supervised):
    """
    One ``twistd -n ilm`` daemon across its processes.
    """

    process: _DaemonProcess | None

    def __init__(self, leg: HttpLeg, name: str, directory: str) -> None:
        Supervised.__init__(self)
        self.leg = leg
        self.name = name
        self.directory = directory
        self.log_path = os.path.join(directory, "twistd.log")

    def log(self, data: bytes) -> None:
        try:
            with open(self.log_path, "ab") as f:
                f.write(data)
        except OSError:
            pass  # its directory is gone already

    def spawn(self, reactor: Any, arguments: list[str]) -> _DaemonProcess:
        process = _DaemonProcess(self)
        self.start(
            reactor,
            process,
            ["-c", _TWISTD, *_TWISTD_OPTIONS, *arguments],
            path=self.directory,
        )
        return process

    @property
    def running(self) -> bool:
        process = self.process
        if process is None or self.killing:
            return False
        return process.alive and process.running


class DaemonApi:
    """
    Daemon A's HTTP API, as the leg uses it: waiting until it is ready,
    one persistent connection pool, and the status of A's link to B.

    :ivar status: A's last answer for peer B (``GET /v1/peers/B``).
    """

    def __init__(self, reactor: Any, port: int) -> None:
        self._reactor = reactor
        self.url = f"http://127.0.0.1:{port}"
        self.client: Any = None
        self.token = ""
        self.status: dict[str, Any] = {}
        self._pool: Any = None

    async def wait_ready(self, alive: Callable[[], bool]) -> None:
        """
        Wait until ``/readyz`` answers ``200``, or ``alive()`` is false.
        """
        import treq

        while alive():
            try:
                response = await treq.get(
                    self.url + "/readyz", persistent=False, timeout=5
                )
                await response.content()
                if response.code == 200:
                    return
            except Exception:
                pass  # not listening yet
            await deferLater(self._reactor, 0.05)

    def connect(self, token: str) -> None:
        """Use bearer ``token`` on a persistent pool from now on."""
        import treq.client
        from twisted.web.client import Agent, HTTPConnectionPool

        self._pool = HTTPConnectionPool(self._reactor, persistent=True)
        self._pool.maxPersistentPerHost = 64
        self._pool.retryAutomatically = False
        self.client = treq.client.HTTPClient(Agent(self._reactor, pool=self._pool))
        self.token = token

    async def peer_status(self) -> dict[str, Any] | None:
        """
        :return: A's status of peer B (also kept in :attr:`status`), or
            ``None`` if A did not answer ``200``.
        """
        import treq

        response = await self.client.get(
            f"{self.url}/v1/peers/B",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=5,
        )
        status: dict[str, Any] = json.loads(await treq.content(response))
        if response.code != 200:
            return None
        self.status = status
        return status

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()


class _Host(Protocol):
    """What the leg needs from the demo's driver."""

    def event(self, text: str) -> None: ...

    def finish(self, failure: str | None) -> None: ...

    def evaluate(self) -> None: ...


class HttpLeg:
    """
    The HTTP leg of one demo run (see the module docstring).

    :param host: the driver: events, failures, and a nudge when the leg is
        done.
    :param directory: the run's temporary directory.
    :param messages: messages on the leg.
    :param cuts: link cuts between the daemons.
    :param kills: SIGKILLs of daemon B.
    """

    def __init__(
        self,
        host: _Host,
        reactor: Any,
        directory: str,
        *,
        messages: int,
        seed: int,
        cuts: int,
        kills: int,
    ) -> None:
        self.host = host
        self.reactor = reactor
        self.directory = directory
        self.messages = messages
        self.faults = FaultSchedule(
            fault_plan(seed ^ 0x4854, messages, cuts, kills, (RECEIVER,)), messages
        )
        self.a = Daemon(self, SENDER, os.path.join(directory, "daemon-a"))
        self.b = Daemon(self, RECEIVER, os.path.join(directory, "daemon-b"))
        self.relay = Relay(reactor, hold=True)
        secret = os.urandom(32)
        self.receiver = WebhookReceiver(secret)
        self._secret = secret
        self.webhook_port: Any = None
        self.api_port = free_port()
        self._api = DaemonApi(reactor, self.api_port)
        self.b_port = 0
        self.life = 0
        self.cuts = 0
        self.sender: HttpSender | None = None
        self.accepted = 0
        self.pending = 0
        self.linked = False
        self.link_times: set[float] = set()
        self._fault_time = 0.0
        self._at_fault = -1
        self._poll: LoopingCall | None = None
        self._polling = False
        self._done = False
        self._stopping = False
        self._rate = RateMeter()
        self.failed = False

    # -- starting --------------------------------------------------------------

    def describe(self) -> str:
        cuts, kills = self.planned()
        return (
            f"HTTP leg: {self.messages:,} more messages go in over HTTP (POST "
            f"/v1/peers/B/messages to daemon A's API on 127.0.0.1:{self.api_port}, "
            f"an Idempotency-Key each) and out of daemon B through a signed "
            f"webhook (two twistd ilm daemons, linked through a relay on port "
            f"{self.relay.port}); {cuts} link cut{'s' if cuts != 1 else ''} and "
            f"{kills} SIGKILL{'s' if kills != 1 else ''} of daemon B on the way."
        )

    async def start(self) -> None:
        """
        Start both daemons, then the sender once A's API is ready.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint

        for daemon in (self.a, self.b):
            os.makedirs(daemon.directory, mode=0o700)
        key = os.urandom(32).hex()
        _private(os.path.join(self.a.directory, "keys"), f"B {key}\n")
        _private(os.path.join(self.b.directory, "keys"), f"A {key}\n")
        import base64

        _private(
            os.path.join(self.b.directory, "webhook.secret"),
            "whsec_" + base64.b64encode(self._secret).decode() + "\n",
        )
        site = Site(self.receiver)
        site.noisy = False
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.webhook_port = await endpoint.listen(site)
        self.spawn_b()
        self.a.spawn(
            self.reactor,
            [
                "ilm", "--id", "A", "--keys", "keys", "--store", "a.sqlite",
                "--peer", f"B=tcp:host=127.0.0.1:port={self.relay.port}",
                "--api", f"tcp:{self.api_port}:interface=127.0.0.1",
            ],
        )  # fmt: skip
        await self._api.wait_ready(self._a_alive)
        if self._stopping or not self._a_alive():
            return  # daemon_ended has said why
        with open(os.path.join(self.a.directory, "ilm-api.token")) as f:
            token = f.read().strip()
        self._api.connect(token)
        self.sender = HttpSender(
            self.reactor,
            self._api.client,
            f"{self.api}/v1/peers/B/messages",
            token,
            self.messages,
            self.faults.credit(),
            os.urandom(8).hex(),
        )
        self._poll = LoopingCall(self._poll_status)
        self._poll.clock = self.reactor
        self._poll.start(0.05)
        await self.sender.run()

    @property
    def api(self) -> str:
        return self._api.url

    def _a_alive(self) -> bool:
        process = self.a.process
        return not self._stopping and process is not None and process.alive

    def spawn_b(self) -> None:
        self.life += 1
        self.b_port = free_port()
        port = self.webhook_port.getHost().port
        self.b.spawn(
            self.reactor,
            [
                "ilm", "--id", "B", "--keys", "keys", "--store", "b.sqlite",
                "--listen", f"tcp:{self.b_port}:interface=127.0.0.1",
                "--api", "none",
                "--webhook", f"http://127.0.0.1:{port}/hook/{self.life}",
                "--webhook-secret-file", "webhook.secret",
            ],
        )  # fmt: skip
        assert self.b.process is not None
        self.receiver.open_life(
            self.life,
            os.path.join(self.b.directory, f"webhook.{self.life}.records"),
            self.b.process.pid,
        )

    # -- what the daemons do ---------------------------------------------------

    def daemon_running(self, daemon: Daemon, process: _DaemonProcess) -> None:
        if daemon is self.b and process is daemon.process and not daemon.killing:
            self.relay.retarget(self.b_port)
            if len(daemon.pids) > 1:
                self.host.event(
                    f"daemon B is back (pid {process.pid}) on its store; daemon A's "
                    f"link to it comes up again"
                )

    def daemon_ended(
        self, daemon: Daemon, process: _DaemonProcess, reason: Failure
    ) -> None:
        if process is not daemon.process:
            return
        if daemon is self.b:
            self.relay.retarget(None)
        if daemon.killing:
            daemon.killing = False
            if not (self._stopping or self._done):
                self.spawn_b()
            return
        if self._stopping:
            return
        how = reason.value if process.status is None else f"status {process.status}"
        self.failed = True
        self.host.finish(
            f"{daemon.name} (pid {process.pid}) exited on its own ({how}); "
            f"its log: {tail(daemon.log_path)}"
        )

    async def _status(self) -> None:
        status = await self._api.peer_status()
        if status is None:
            return
        self.accepted = max(self.accepted, int(status["last_message_id"]))
        self.pending = int(status["pending"])
        self.linked = status["link"] == "up"
        since = status.get("link_since")
        if self.linked and since is not None:
            self.link_times.add(float(since))

    def _poll_status(self) -> None:
        if self._polling or self._stopping:
            return
        self._polling = True
        d = Deferred.fromCoroutine(self._status())
        d.addErrback(lambda _: None)  # A is busy or stopping: next time

        def polled(_: object) -> None:
            self._polling = False
            self.evaluate()

        d.addCallback(polled)

    # -- deciding --------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Distinct messages the webhook got."""
        return len(self.receiver.positions)

    def linked_again(self) -> bool:
        """
        Whether B runs and A's link to it came up since the previous fault.
        """
        since = self._api.status.get("link_since")
        return (
            self.b.running
            and self.linked
            and since is not None
            and float(since) > self._fault_time
        )

    def done(self) -> bool:
        """
        Whether the leg is over: every message accepted, acknowledged and at
        the webhook, after the last fault.
        """
        sender = self.sender
        return (
            sender is not None
            and self.faults.next() is None
            and sender.answered == self.messages
            and self.accepted == self.messages
            and self.pending == 0
            and self.delivered >= self.messages
            and self.linked_again()
        )

    def evaluate(self) -> None:
        if self._done or self._stopping:
            return
        self._rate.sample(time.monotonic(), self.delivered)
        fault = self.faults.next()
        if fault is not None:
            if self.fault_due(fault):
                self.inject(fault)
            return
        if self.done():
            self._done = True
            self.host.evaluate()

    def fault_due(self, fault: Fault) -> bool:
        if not self.linked_again() or not self.relay.linked():
            return False
        if not self.faults.reached(self.delivered, fault):
            return False
        return self.delivered > self._at_fault or self.delivered >= self.faults.credit()

    def inject(self, fault: Fault) -> None:
        self.faults.take()
        self._at_fault = self.delivered
        self._fault_time = time.time()
        self.linked = False
        so_far = (
            f"at the webhook so far: {self.delivered:,}, accepted by A: "
            f"{self.accepted:,}"
        )
        if fault.kind == CUT:
            aborted = self.relay.cut()
            self.cuts += 1
            self.host.event(
                f"link cut between daemon A and daemon B: aborted {aborted} TCP "
                f"connection(s) ({so_far})"
            )
        else:
            self.relay.retarget(None)
            pid = self.b.kill()
            self.host.event(
                f"SIGKILL daemon B (pid {pid}) and restart it on its store ({so_far})"
            )
        if self.sender is not None:
            self.sender.set_credit(self.faults.credit())

    # -- showing ---------------------------------------------------------------

    def rate(self) -> float:
        return self._rate.rate()

    def reconnects(self) -> int:
        """How many times A's link to B came up again (as A's status said)."""
        return max(0, len(self.link_times) - 1)

    def figures(self) -> tuple[int, ...]:
        sender = self.sender
        return (
            0 if sender is None else sender.answered,
            self.accepted,
            self.delivered,
            len(self.link_times),
        )

    def planned(self) -> tuple[int, int]:
        """Cuts, kills planned."""
        return self.faults.planned(CUT), self.faults.planned(RECEIVER)

    def stalled(self) -> str:
        """Where the leg stands, for the driver's message when a run stalls."""
        return (
            f"HTTP leg: faults left {self.faults.pending}, daemon B running "
            f"{self.b.running}, linked {self.linked}, accepted {self.accepted:,}, "
            f"pending {self.pending:,}, at the webhook {self.delivered:,}; logs: "
            f"{tail(self.a.log_path)} / {tail(self.b.log_path)}"
        )

    # -- ending ----------------------------------------------------------------

    async def stop(self, kill: bool, grace: float) -> list[str]:
        """
        Stop both daemons: SIGTERM (SIGKILL after ``grace`` seconds), or
        SIGKILL at once.

        :return: what went wrong (a daemon that did not stop cleanly).
        """
        if not kill and self.sender is not None and self._a_alive():
            try:
                await self._status()  # the final count of what A accepted
            except Exception:
                pass
        self._stopping = True
        if self.sender is not None:
            self.sender.stop()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        stopped = await stop_processes(self.reactor, (self.a, self.b), kill, grace)
        await self.relay.close()
        await self._api.close()
        if self.webhook_port is not None:
            await self.webhook_port.stopListening()
        self.receiver.close()
        failures = []
        if not kill:
            for daemon, process in stopped:
                # twistd ends a run stopped by SIGTERM by raising it again,
                # so that its exit says how it was stopped.
                if process.status != 0 and process.signalled != signal.SIGTERM:
                    status = process.status
                    how = (
                        f"signal {process.signalled}"
                        if status is None
                        else f"status {status}"
                    )
                    failures.append(
                        f"{daemon.name} did not stop cleanly ({how}); its log: "
                        f"{tail(daemon.log_path)}"
                    )
        return failures

    def kill_all(self) -> None:
        for daemon in (self.a, self.b):
            if daemon.process is not None:
                daemon.process.signal("KILL")

    def kill_now(self) -> None:
        """
        After the reactor stopped: SIGKILL any daemon process left.
        """
        kill_now((self.a, self.b))

    def logs(self) -> list[str]:
        return [self.a.log_path, self.b.log_path]


def leg_evidence(
    receiver: WebhookReceiver,
    pids: list[tuple[int, bool]],
    stored_at: dict[int, int],
    *,
    sent: int,
    accepted: int,
) -> StreamEvidence:
    """
    The HTTP leg's evidence for the verifier: per life of daemon B (its
    process ``pids[life - 1]``, killed or not), each webhook delivery with
    its number replaced by the position daemon A answered for that number
    (``None``, a corrupt delivery, if A never answered for it), and its
    ``webhook-id``; ``accepted`` is A's count.  A delivery checks out when
    the webhook got, at position *p*, the message A said it stored at *p*.
    """
    lives = []
    for life in sorted(receiver.lives):
        deliveries = tuple(
            (
                position,
                None if number is None else stored_at.get(number),
                sent_ns,
                received_ns,
            )
            for position, number, sent_ns, received_ns in receiver.lives[life]
        )
        killed = pids[life - 1][1] if life - 1 < len(pids) else False
        lives.append(ReceiverLife(deliveries, killed, tuple(receiver.ids[life])))
    return StreamEvidence(STREAM, sent=sent, accepted=accepted, lives=tuple(lives))


def _private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
