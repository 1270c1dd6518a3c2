"""
The daemon's doors for other programs: the HTTP API and the metrics
endpoint it serves, and the delivery target it hands messages to (an inbox
file, a webhook or a command).

:func:`check_sidecar_options` checks the options of ``twistd ilm`` that
choose them, before anything is created; :func:`make_delivery` builds the
chosen target; :class:`SiteService` listens for one ``twisted.web`` site and
says, through a Deferred, whether it could.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web.server import Site

from ilm.errors import ConfigurationError

__all__ = [
    "DEFAULT_API",
    "DEFAULT_INBOX",
    "DEFAULT_TOKEN_FILE",
    "SiteService",
    "check_sidecar_options",
    "exposed_secret",
    "local_endpoint",
]

DEFAULT_API = "tcp:8780:interface=127.0.0.1"
"""Where ``twistd ilm`` serves its HTTP API unless ``--api`` says otherwise."""

DEFAULT_TOKEN_FILE = "ilm-api.token"
"""The API's bearer token file, relative to twistd's ``--rundir``."""

DEFAULT_INBOX = "ilm-inbox.jsonl"
"""The inbox file when neither ``--webhook`` nor ``--exec`` is given."""

_PORT = re.compile(r"[0-9]+")

# Bits that make a secret readable or writable by users other than its
# owner: any write by the group or the world, and read by the world.  A
# group read is allowed: giving a dedicated group (Debian's ssl-cert, say)
# read access to a key is a deliberate choice.
_EXPOSED_SECRET = stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH


def exposed_secret(path: str, what: str) -> str | None:
    """
    :return: why the secret file at ``path`` is refused (others can read or
        write it), or ``None``.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # reading it reports the problem
    if mode & _EXPOSED_SECRET:
        return (
            f"the {what} {path} can be read or written by other users (mode "
            f"{mode:04o}): run 'chmod 600 {path}'"
        )
    return None


def local_endpoint(text: str) -> str:
    """
    A server endpoint string in which a TCP port with no ``interface`` is
    bound to the loopback interface: ``8780`` and ``tcp:8780`` become
    ``tcp:8780:interface=127.0.0.1``.  Listening on other interfaces takes
    an explicit ``interface=`` (``tcp:8780:interface=0.0.0.0``): the API
    and the metrics are local unless the operator says otherwise.
    """
    if _PORT.fullmatch(text):
        return f"tcp:{text}:interface=127.0.0.1"
    kind, _, rest = text.partition(":")
    if kind.lower() in ("tcp", "tcp6") and "interface=" not in rest:
        loopback = "::1" if kind.lower() == "tcp6" else "127.0.0.1"
        return f"{text}:interface={loopback}"
    return text


def _check_endpoint(option: str, text: str, problems: list[str]) -> str | None:
    from twisted.internet import reactor

    endpoint = local_endpoint(text)
    try:
        serverFromString(reactor, endpoint)
    except (ValueError, TypeError, KeyError) as e:
        problems.append(
            f"--{option} {text!r}: not a server endpoint ({e}); for example "
            f"'tcp:8780:interface=127.0.0.1', or 'none'"
        )
        return None
    return endpoint


def _read_secret_file(path: str, problems: list[str]) -> str | None:
    exposed = exposed_secret(path, "webhook secret file")
    if exposed is not None:
        problems.append(f"--webhook-secret-file: {exposed}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        problems.append(f"--webhook-secret-file {path}: {e.strerror or e}")
        return None


def check_sidecar_options(options: Any, problems: list[str]) -> None:
    """
    Check and complete the options that choose the API, the metrics and the
    delivery target; every problem is appended to ``problems`` as a line.

    Afterwards ``options["api"]`` and ``options["metrics"]`` are endpoint
    strings or ``None``, ``options["inbox"]`` is set unless a webhook or a
    command delivers, and ``options["webhook-secret"]`` holds the signing
    key (or ``None``).
    """
    from ilm._webhook import webhook_secret

    api = options["api"]
    if api.lower() == "none":
        options["api"] = None
    else:
        options["api"] = _check_endpoint("api", api, problems)
    metrics = options["metrics"]
    if metrics is not None:
        options["metrics"] = (
            None
            if metrics.lower() == "none"
            else _check_endpoint("metrics", metrics, problems)
        )
    if options["metrics-per-peer"] and options["metrics"] is None:
        problems.append("--metrics-per-peer needs --metrics ENDPOINT")

    chosen = [
        f"--{name}"
        for name in ("inbox", "webhook", "exec")
        if options[name] is not None
    ]
    if len(chosen) > 1:
        problems.append(
            f"{' and '.join(chosen)}: give one delivery target (each message "
            f"is delivered to exactly one)"
        )
    if not chosen:
        options["inbox"] = DEFAULT_INBOX
    options["webhook-secret"] = None
    url = options["webhook"]
    if url is not None and not url.startswith(("http://", "https://")):
        problems.append(f"--webhook {url!r}: must be an http:// or https:// URL")
    secret_path = options["webhook-secret-file"]
    if secret_path is not None:
        if url is None:
            problems.append("--webhook-secret-file needs --webhook URL")
        text = _read_secret_file(options.path(secret_path), problems)
        if text is not None:
            try:
                options["webhook-secret"] = webhook_secret(text)
            except ConfigurationError as e:
                problems.append(f"--webhook-secret-file {secret_path}: {e}")
    command = options["exec"]
    if command is not None:
        from ilm._exec import ExecDelivery

        try:
            ExecDelivery(command, None)
        except ConfigurationError as e:
            problems.append(str(e))


class SiteService(Service):
    """
    Listen on ``endpoint`` with ``site`` while running.

    :ivar listening: fires with the port once listening, or fails with why
        not (the daemon then exits with status 1).
    """

    def __init__(self, what: str, endpoint: str, site: Site, reactor: Any) -> None:
        self.what = what
        self.endpoint = endpoint
        self.site = site
        self._reactor = reactor
        self._port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        d = serverFromString(reactor, self.endpoint).listen(self.site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self.listening.callback(port)

    def _failed(self, reason: Failure) -> None:
        error = reason.value
        cause = getattr(error, "socketError", error)
        if isinstance(cause, OSError) and cause.strerror:
            message = cause.strerror
        else:
            message = reason.getErrorMessage()
        self.listening.errback(
            ConfigurationError(f"{self.what} on {self.endpoint}: {message}")
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self._port = self._port, None
        stop = getattr(self.site, "stop", None)
        if stop is not None:
            stop()
        if port is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        result = port.stopListening()
        if isinstance(result, Deferred):
            result.addBoth(lambda _: d.callback(None))
        else:
            d.callback(None)
        return d
