"""
Command delivery: each message handed to a program on its standard input.

:class:`ExecDelivery` is an :class:`ilm.interfaces.ILocalDelivery` for
scripts: for every message it runs the command (no shell: the command line
is split like a POSIX shell would, and run directly), writes the message's
bytes to the program's standard input and closes it.  Exit status 0 means
delivered; any other status, a signal, or running longer than the timeout
(the program is then killed) fails the delivery with
:class:`ilm.errors.DeliveryFailed`, and ILM runs it again later for the same
message, holding back later messages from that sender.

The program's environment carries the message's identity, so a program can
drop repeats inside the at-least-once window:

- ``ILM_SOURCE``: the sender's id as text (``docs/daemon.md``: digits are an
  int id, ``str:`` forces a string, percent-encoding for the rest);
- ``ILM_SOURCE_INCARNATION``, ``ILM_MESSAGE_ID``;
- ``ILM_DEDUP_ID``: the same value as the webhook's ``webhook-id``.
"""

from __future__ import annotations

import os
import shlex
import signal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import peer_id_to_text
from ilm._webhook import webhook_id
from ilm.errors import ConfigurationError, DeliveryFailed
from ilm.interfaces import ILocalDelivery, IMessage

__all__ = ["ExecDelivery"]

_KEPT_OUTPUT = 4096


class _Run(ProcessProtocol):
    def __init__(self, body: bytes, done: Deferred[Failure], limit: int) -> None:
        self._body = body
        self.done = done
        self.output = b""
        self._limit = limit
        self.timer: IDelayedCall | None = None
        self.timed_out = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._body)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._keep(data)

    def errReceived(self, data: bytes) -> None:
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        if len(self.output) < self._limit:
            self.output += data[: self._limit - len(self.output)]

    def kill(self) -> None:
        self.timer = None
        self.timed_out = True
        try:
            assert self.transport is not None
            self.transport.signalProcess(signal.SIGKILL)  # type: ignore[attr-defined]
        except Exception:
            pass

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.done.errback(reason)


@implementer(ILocalDelivery)
class ExecDelivery:
    """
    Deliver each message by running ``command`` with it on standard input.

    :param command: the command line (split with :func:`shlex.split`).
    :param reactor: provides ``spawnProcess`` and ``callLater``.
    :param timeout: seconds a run may take before it is killed and counted
        as failed.
    """

    def __init__(self, command: str, reactor: Any, *, timeout: float = 30.0) -> None:
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise ConfigurationError(f"--exec command {command!r}: {e}") from None
        if not argv:
            raise ConfigurationError("--exec needs a command")
        if not timeout > 0:
            raise ConfigurationError(f"exec timeout must be positive, not {timeout}")
        self.argv = argv
        self.timeout = timeout
        self._reactor = reactor

    def deliver(self, message: IMessage) -> Deferred[object]:
        """
        Run the command for ``message``; fires once it exited with status 0,
        fails with :class:`DeliveryFailed` otherwise.
        """
        env = dict(os.environ)
        env.update(
            ILM_SOURCE=peer_id_to_text(message.source_id),
            ILM_SOURCE_INCARNATION=getattr(message, "source_incarnation", "") or "",
            ILM_MESSAGE_ID=str(message.message_id),
            ILM_DEDUP_ID=webhook_id(message),
        )
        ended: Deferred[Failure] = Deferred()
        run = _Run(message.contents, ended, _KEPT_OUTPUT)
        try:
            self._reactor.spawnProcess(run, self.argv[0], self.argv, env=env)
        except OSError as e:
            raise DeliveryFailed(f"cannot run {self.argv[0]!r}: {e}") from e
        run.timer = self._reactor.callLater(self.timeout, run.kill)
        return ended.addBoth(self._ended, run)

    def _ended(self, reason: Failure, run: _Run) -> object:
        if reason.check(ProcessDone):
            return None
        output = run.output.decode("utf-8", "replace").strip()
        if run.timed_out:
            what = f"ran longer than {self.timeout} s and was killed"
        elif reason.check(ProcessTerminated):
            value = reason.value
            what = (
                f"was killed by signal {value.signal}"  # type: ignore[union-attr]
                if value.signal is not None  # type: ignore[union-attr]
                else f"exited with status {value.exitCode}"  # type: ignore[union-attr]
            )
        else:
            what = f"failed: {reason.getErrorMessage()}"
        raise DeliveryFailed(
            f"{self.argv[0]} {what}" + (f": {output[-200:]}" if output else "")
        )

    def __repr__(self) -> str:
        return f"ExecDelivery({shlex.join(self.argv)!r})"
