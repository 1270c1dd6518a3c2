"""
``twistd ilm``: an ILM node as a daemon.

The node keeps its state in an SQLite store (or PostgreSQL), listens on
server endpoints, keeps links to its configured peers (pre-shared keys
and/or mutual TLS), takes messages to send through its HTTP API
(:mod:`ilm._api`) and hands every message it receives, exactly once and in
order per sender, to one target: a JSON-lines inbox file
(:class:`FileDelivery`, which documents the one at-least-once window), a
webhook (:class:`ilm.WebhookDelivery`) or a command
(:class:`ilm.ExecDelivery`).  It can serve Prometheus metrics
(:mod:`ilm._metrics`).  The options choosing the API, metrics and target
are checked in :mod:`ilm._sidecar`.

The whole configuration is checked when the options are parsed, before
twistd creates anything (pid file, log file, store, inbox): every problem is
one line on standard error, and the process exits with status 1.  A node
that then cannot start (its store locked, its port taken) logs one line
saying why, removes its pid file and exits with status 1.  See
``docs/daemon.md``.

Example::

    twistd -n ilm --id 2 --listen tcp:9000 --keys keys.txt \\
        --store node2.sqlite --inbox node2-inbox.jsonl
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._config import Config
from ilm._messenger import ILM
from ilm._peerid import PeerId, peer_id_from_text
from ilm._sidecar import (
    DEFAULT_API,
    DEFAULT_TOKEN_FILE,
    SiteService,
    check_sidecar_options,
    exposed_secret,
)
from ilm._twistd_checks import (
    check_files,
    check_store,
    check_tls,
    check_window,
    is_postgres,
    os_reason,
    redact_dsn,
)
from ilm.errors import ILMError
from ilm.interfaces import ILocalDelivery, IMessage

log = Logger(namespace="ilm.twistd")

__all__ = [
    "DEFAULT_UMASK",
    "FileDelivery",
    "Options",
    "json_log_observer",
    "makeService",
    "parse_peer_id",
    "read_keys",
]

DEFAULT_UMASK = 0o077
"""
The file creation mask the daemon uses unless twistd's ``--umask`` gives
one: the inbox, the log, the pid file and the store are readable by their
owner only.
"""

_MIN_KEY_SIZE = 16

_SIGNED_NUMBER = re.compile(r"[+-][0-9]+")


def parse_peer_id(text: str) -> PeerId:
    """
    A peer id from the command line, in the text form of
    :mod:`ilm._peerid` (the same as in the HTTP API's URLs): decimal digits
    are an ``int`` id, ``str:`` forces a string (for ids made of digits),
    percent-encoding escapes anything else (``node%20a``).  A signed number
    (``-5``) and an id with spaces around it are refused: they are almost
    always a mistake (``str:-5`` is the text id).

    :raises usage.UsageError: if it is not a valid peer id.
    """
    if _SIGNED_NUMBER.fullmatch(text):
        raise usage.UsageError(
            f"invalid peer id {text!r}: integer ids are 0 to 2**63-1 (write "
            f"'str:{text}' for the text id {text!r})"
        )
    if text != text.strip():
        raise usage.UsageError(f"invalid peer id {text!r}: spaces around it")
    try:
        return peer_id_from_text(text)
    except (TypeError, ILMError) as e:
        raise usage.UsageError(f"invalid peer id {text!r}: {e}") from None


def read_keys(
    path: str, local_id: PeerId | None = None, problems: list[str] | None = None
) -> dict[PeerId, bytes]:
    """
    Read pre-shared keys: one ``PEER_ID HEX_KEY`` per line; blank lines and
    lines starting with ``#`` are ignored.

    The file must not be readable or writable by other users, no key may
    be for ``local_id`` (a key is shared with a peer: this node's id is in
    the *peer's* file), and no key may be given to two peers.

    :param problems: if given, every problem is appended to it (one line
        each) and the keys of the good lines are returned; otherwise the
        first problem raises.
    :raises usage.UsageError: on the first problem, if ``problems`` is not
        given.
    """
    found: list[str] = []
    keys: dict[PeerId, bytes] = {}
    exposed = exposed_secret(path, "keys file")
    if exposed is not None:
        found.append(exposed)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        found.append(f"cannot read the keys file {path}: {os_reason(e)}")
        lines = []
    owners: dict[bytes, PeerId] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2:
            found.append(
                f"{where}: expected 'PEER_ID HEX_KEY', got {len(parts)} fields"
            )
            continue
        try:
            peer_id = parse_peer_id(parts[0])
        except usage.UsageError as e:
            found.append(f"{where}: {e}")
            continue
        try:
            key = bytes.fromhex(parts[1])
        except ValueError:
            found.append(f"{where}: the key is not hex")
            continue
        if len(key) < _MIN_KEY_SIZE:
            found.append(
                f"{where}: the key is {len(key)} bytes; at least {_MIN_KEY_SIZE} "
                f"are required (32 random bytes are recommended)"
            )
        elif peer_id == local_id:
            found.append(
                f"{where}: a key for this node's own id {peer_id!r}; a key is "
                f"listed under the id of the peer it is shared with"
            )
        elif peer_id in keys:
            found.append(f"{where}: a second key for {peer_id!r}")
        elif key in owners:
            found.append(
                f"{where}: the key of {peer_id!r} is also the key of "
                f"{owners[key]!r}; each peer needs its own key"
            )
        else:
            keys[peer_id] = key
            owners[key] = peer_id
    if problems is not None:
        problems.extend(found)
    elif found:
        raise usage.UsageError(found[0])
    return keys


@implementer(ILocalDelivery)
class FileDelivery:
    """
    Deliver each message as one JSON line appended to a file::

        {"source": 1, "destination": 2, "message_id": 7,
         "incarnation": "…", "contents": "<base64>"}

    The line is written (and, with ``fsync=True``, synced to disk) before
    :meth:`deliver` returns, so a message is in the file before ILM records
    its delivery.  A process killed between the two finds the message again
    after the restart: the same ``incarnation`` and ``message_id`` then
    appear twice (the at-least-once window of ``docs/protocol.md``); a
    reader that skips lines whose ``(source, incarnation, message_id)`` it
    has seen gets exactly once.

    Every line in the file is whole JSON:

    - a write that fails (a full disk, say) is undone: the file is cut back
      to its length before it, and :meth:`deliver` raises, so ILM holds that
      sender's stream and retries with backoff.  The file stays open, so the
      retry after space comes back succeeds;
    - :meth:`open` cuts off a trailing partial line (left by a process killed
      in the middle of a write) before anything is appended.  Its message's
      delivery was never recorded, so ILM delivers it again.

    The file is created with mode ``0600`` (readable by its owner only).

    :param path: the file to append to.
    :param fsync: sync the file after each line (survives power loss).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._fd: int | None = None

    def open(self) -> None:
        """
        Open the file (creating it ``0600``) and cut off a trailing partial
        line.  Nothing happens if it is open already.

        :raises OSError: if the file cannot be opened or repaired.
        """
        if self._fd is not None:
            return
        fd = os.open(
            self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            self._cut_partial_line(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        """
        Close the file (it is opened again by the next delivery).
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _cut_partial_line(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        os.ftruncate(fd, keep)
        if self.fsync:
            os.fsync(fd)
        log.warn(
            "inbox {path}: cut off a partial last line of {removed} bytes (left "
            "by a process stopped in the middle of a write; its message is "
            "delivered again)",
            path=self.path,
            removed=size - keep,
            ilm_event="inbox_partial_line_removed",
        )

    def deliver(self, message: IMessage) -> None:
        self.open()
        fd = self._fd
        assert fd is not None
        record = {
            "source": message.source_id,
            "destination": message.destination_id,
            "message_id": message.message_id,
            "incarnation": getattr(message, "source_incarnation", None),
            "contents": base64.b64encode(message.contents).decode("ascii"),
        }
        line = json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"
        before = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._undo(fd, before)
            raise

    def _undo(self, fd: int, size: int) -> None:
        """
        Cut the file back to ``size`` after a failed write.  If even that
        fails, close it: :meth:`open` cuts the partial line off before the
        next attempt appends anything.
        """
        try:
            os.ftruncate(fd, size)
        except OSError:
            self.close()


class Options(usage.Options):
    """
    Options of ``twistd ilm``.

    Parsing checks the whole configuration: every problem found is one line
    of the :class:`usage.UsageError` raised.  Under twistd the lines go to
    standard error and the process exits with status 1 (twistd would print
    its whole usage text first); ``--help`` shows the usage.

    After parsing, ``options["keys"]`` holds the keys read from the file (or
    ``None``), ``options["tls"]`` the :class:`ilm.network.TLSCredentials`
    (or ``None``) and ``options.warnings`` what the node should say when
    it starts.
    """

    synopsis = "--id ID [--listen ENDPOINT ...] [--peer ID=ENDPOINT ...] [options]"
    longdesc = (
        "Run an ILM node: durable, exactly-once, ordered messaging with its "
        "peers. Messages received are appended to the inbox file as JSON "
        "lines. Peer ids made of digits are integers (prefix str: for a "
        "string id of digits). Relative paths are relative to twistd's "
        "--rundir. Files are created readable by their owner only (umask 077 "
        "unless twistd's --umask gives another). See docs/daemon.md."
    )

    optParameters = [
        ["id", None, None, "This node's id (required)."],
        [
            "store",
            None,
            "ilm.sqlite",
            "The node's store: an SQLite file, or a PostgreSQL URI "
            "(postgresql://user@host/db) shared by the node's gateways.",
        ],
        [
            "gateway",
            None,
            None,
            "With a PostgreSQL store: this process's name among the node's "
            "gateways (default: the host name).",
        ],
        [
            "schema",
            None,
            "ilm",
            "With a PostgreSQL store: the schema holding ILM's tables (created "
            "if missing).",
        ],
        [
            "inbox",
            None,
            None,
            "Append received messages to this JSON-lines file (the default "
            "delivery target: ilm-inbox.jsonl).",
        ],
        [
            "webhook",
            None,
            None,
            "Deliver each received message as an HTTP POST to this URL "
            "(Standard Webhooks headers), instead of the inbox.",
        ],
        [
            "webhook-secret-file",
            None,
            None,
            "File holding the webhook signing secret, whsec_<base64> (chmod 600).",
        ],
        [
            "exec",
            None,
            None,
            "Deliver each received message by running this command with it on "
            "standard input (exit status 0 = delivered), instead of the inbox.",
        ],
        [
            "api",
            None,
            DEFAULT_API,
            "Serve the HTTP API on this endpoint ('none': no API). A TCP port "
            "without interface= is bound to 127.0.0.1.",
        ],
        [
            "api-token-file",
            None,
            DEFAULT_TOKEN_FILE,
            "The API's bearer token; created (mode 0600, random) if missing.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint (default: "
            "off). A TCP port without interface= is bound to 127.0.0.1.",
        ],
        [
            "keys",
            None,
            None,
            "Pre-shared keys file: 'PEER_ID HEX_KEY' per line, one key per "
            "peer; not readable by other users (chmod 600).",
        ],
        ["tls-certificate", None, None, "PEM certificate of this node (mutual TLS)."],
        ["tls-key", None, None, "PEM private key of this node (chmod 600)."],
        ["tls-ca", None, None, "PEM CA certificate(s) that issue peer certificates."],
        ["window", None, None, "Messages in flight per peer (default 16384)."],
        [
            "log-format",
            None,
            "text",
            "text, or json: one JSON object per line, where twistd logs "
            "(--logfile; standard output with -n).",
        ],
    ]
    optFlags = [
        ["fsync", None, "fsync the inbox after each message (survives power loss)."],
        [
            "metrics-per-peer",
            None,
            "Also export one series per peer (label peer): mind the "
            "cardinality with many peers.",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["peers"] = {}
        self["pins"] = {}
        self["tls"] = None
        self.warnings: list[str] = []
        self.keys_path: str | None = None
        self._problems: list[str] = []

    def opt_version(self) -> None:
        """Display ILM's version and exit."""
        from ilm._cli import version_text

        print(version_text())
        sys.exit(0)

    def opt_listen(self, endpoint: str) -> None:
        """Accept links on ENDPOINT (serverFromString syntax); repeatable."""
        self["listen"].append(endpoint)

    def opt_peer(self, value: str) -> None:
        """
        Keep a link to peer ID at ENDPOINT: ID=ENDPOINT; repeatable (given
        several times for one ID: that peer's addresses, dialled in turn).
        """
        peer, sep, endpoint = value.partition("=")
        if not sep or not endpoint:
            self._problems.append(
                f"--peer {value!r}: expected ID=ENDPOINT, such as "
                f"'1=tcp:host=10.0.0.1:port=9001'"
            )
            return
        try:
            peer_id = parse_peer_id(peer)
        except usage.UsageError as e:
            self._problems.append(f"--peer {value!r}: {e}")
            return
        addresses = self["peers"].setdefault(peer_id, [])
        if endpoint in addresses:
            self._problems.append(
                f"--peer: endpoint {endpoint!r} of peer {peer_id!r} is given twice"
            )
            return
        addresses.append(endpoint)

    def opt_pin(self, value: str) -> None:
        """Pin peer ID's TLS certificate: ID=SHA256_FINGERPRINT; repeatable."""
        peer, sep, fingerprint = value.partition("=")
        if not sep or not fingerprint:
            self._problems.append(f"--pin {value!r}: expected ID=FINGERPRINT")
            return
        try:
            self["pins"][parse_peer_id(peer)] = fingerprint
        except usage.UsageError as e:
            self._problems.append(f"--pin {value!r}: {e}")

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse and check the options.  Under twistd (``self.parent`` set), a
        problem is printed as one line per problem on standard error and the
        process exits with status 1.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            for line in str(e).splitlines():
                sys.stderr.write(f"twistd ilm: {line}\n")
            sys.stderr.write("twistd ilm: 'twistd ilm --help' lists the options\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    # -- checks ----------------------------------------------------------------

    def path(self, path: str) -> str:
        """
        ``path`` as the node will see it: relative to twistd's ``--rundir``.
        """
        parent = self.parent
        rundir = parent.get("rundir") if parent is not None else None
        if rundir and not os.path.isabs(path):
            return os.path.join(os.path.abspath(rundir), path)
        return path

    def postOptions(self) -> None:
        problems = self._problems
        local_id = self._check_id(problems)
        keys = None
        keys_read = False
        self.keys_path = self["keys"]
        if self.keys_path is not None:
            before = len(problems)
            keys = read_keys(self.path(self.keys_path), local_id, problems)
            keys_read = len(problems) == before
        self["keys"] = keys
        tls = check_tls(self, problems)
        self["tls"] = tls
        if keys is None and self["tls-certificate"] is None:
            problems.append(
                "links are always authenticated: give --keys, or "
                "--tls-certificate and --tls-key"
            )
        if keys_read and not keys and self["tls-certificate"] is None:
            problems.append(
                f"the keys file {self.keys_path} holds no key and TLS is not "
                f"used: no peer could ever be authenticated"
            )
        self._check_endpoints(problems, local_id, keys if keys_read else None, tls)
        check_window(self, problems)
        check_store(self, problems)
        check_sidecar_options(self, problems)
        check_files(self, problems)
        self._check_log_format(problems)
        if problems:
            raise usage.UsageError("\n".join(problems))

    def _check_id(self, problems: list[str]) -> PeerId | None:
        if self["id"] is None:
            problems.append("--id is required")
            return None
        try:
            self["id"] = parse_peer_id(self["id"])
        except usage.UsageError as e:
            problems.append(f"--id: {e}")
            return None
        local_id: PeerId = self["id"]
        if local_id in self["peers"]:
            problems.append(f"--peer {local_id!r}: a node does not dial itself")
        return local_id

    def _check_endpoints(
        self,
        problems: list[str],
        local_id: PeerId | None,
        keys: dict[PeerId, bytes] | None,
        tls: Any,
    ) -> None:
        """
        Every endpoint string parses, every dialled peer could be
        authenticated, and the node could have a link at all.
        """
        from twisted.internet import reactor

        from ilm.network import StreamNetwork

        # Each endpoint alone, so that every bad one is reported; the
        # network parses them exactly as it will when the node runs.
        probe_id: PeerId = local_id if local_id is not None else "probe"
        for endpoint in self["listen"]:
            try:
                StreamNetwork(probe_id, listen=[endpoint], keys={}, reactor=reactor)
            except ILMError as e:
                problems.append(f"--listen: {e}")
        for peer_id, addresses in self["peers"].items():
            if peer_id == local_id:
                continue
            for endpoint in addresses:
                try:
                    StreamNetwork(
                        probe_id,
                        peers={peer_id: endpoint},
                        keys={peer_id: b"\0" * _MIN_KEY_SIZE},
                        reactor=reactor,
                    )
                except ILMError as e:
                    problems.append(f"--peer: {e}")
            if keys is not None and peer_id not in keys:
                problems.append(
                    f"--peer {peer_id!r}: the keys file has no key for peer "
                    f"{peer_id!r}; add a line '{peer_id} HEX_KEY' with the key "
                    f"peer {peer_id!r} lists under this node's id"
                )
            if tls is not None and not tls.can_identify(peer_id):
                problems.append(
                    f"--peer {peer_id!r}: TLS cannot identify peer {peer_id!r}: "
                    f"give --pin {peer_id}=FINGERPRINT or --tls-ca"
                )
        if not self["listen"] and not self["peers"]:
            problems.append(
                "the node neither listens (--listen) nor dials a peer (--peer): "
                "it could never have a link; give at least one"
            )
        if problems or local_id is None:
            return
        try:
            StreamNetwork(
                local_id,
                listen=self["listen"],
                peers=self["peers"],
                keys=keys,
                tls=tls,
                reactor=reactor,
            )
        except (ILMError, ValueError) as e:
            problems.append(str(e))
            return
        if keys is not None and not self["listen"]:
            unused = sorted(
                (repr(p) for p in keys if p not in self["peers"]),
            )
            if unused:
                self.warnings.append(
                    f"the keys of {', '.join(unused)} are never used: the node "
                    f"does not listen (--listen) and does not dial them (--peer)"
                )

    def _check_log_format(self, problems: list[str]) -> None:
        """
        ``--log-format json`` fills in twistd's ``--logger`` with
        :func:`json_log_observer`, which writes where twistd would.
        """
        log_format = self["log-format"]
        if log_format not in ("text", "json"):
            problems.append(f"--log-format {log_format!r}: expected text or json")
            return
        parent = self.parent
        if log_format == "text" or parent is None:
            return
        if parent.get("logger") is not None or parent.get("syslog"):
            problems.append(
                "--log-format json chooses twistd's logger: leave out twistd's "
                "--logger and --syslog"
            )
            return
        logfile, nodaemon = parent.get("logfile"), bool(parent.get("nodaemon"))
        if logfile == "-" and not nodaemon:
            problems.append(
                "--log-format json: a daemon cannot log to standard output "
                "(give -n, or --logfile FILE)"
            )
            return
        _json_log_settings[:] = [logfile, nodaemon]
        parent["logger"] = f"{__name__}.json_log_observer"


# twistd's --logfile and -n, for json_log_observer (twistd calls a logger
# factory without arguments).
_json_log_settings: list[Any] = [None, False]


def json_log_observer() -> Any:
    """
    The log observer of ``twistd ilm --log-format json`` (twistd's
    ``--logger``): every event as one JSON object per line, written where
    twistd writes its text log: standard output with ``-n`` (or
    ``--logfile -``), else ``--logfile`` (default ``twistd.log``), rotated
    as twistd rotates its own (at 1,000,000 bytes, and on SIGUSR1).
    """
    import signal

    from twisted.logger import jsonFileLogObserver
    from twisted.python.logfile import LogFile

    logfile, nodaemon = _json_log_settings
    if logfile == "-" or (not logfile and nodaemon):
        return jsonFileLogObserver(sys.stdout, recordSeparator="")
    output = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(output.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return jsonFileLogObserver(output, recordSeparator="")  # type: ignore[arg-type]


class NodeService(MultiService):
    """
    The daemon's service: the ILM node, its delivery target (the inbox file,
    a webhook or a command) and the sites it serves (the HTTP API, the
    metrics).

    If the node cannot start (its store locked or unreadable, an address
    taken, the inbox not writable), one line says why, the pid file is
    removed and the process exits with status 1.  When twistd daemonizes,
    the process that launched it waits until the node runs (or fails), so
    ``twistd ilm`` itself exits with status 1 on a failed start.

    :param delivery: the node's ``ILocalDelivery``; its ``open()`` (if it
        has one) runs first, its ``close()`` last.
    :param sites: the sites to serve; the node has started only once every
        one of them listens.
    :param twistd: twistd's own options (``ServerOptions``) when run by
        twistd: where its pid file and its start-status pipe are.
    """

    def __init__(
        self,
        node: ILM,
        delivery: Any,
        reactor: Any = None,
        *,
        twistd: Any = None,
        warnings: tuple[str, ...] = (),
        store: str = "",
        sites: tuple[SiteService, ...] = (),
    ) -> None:
        MultiService.__init__(self)
        self.node = node
        self.delivery = delivery
        MultiService.addService(self, node)
        self.sites = sites
        for site in sites:
            MultiService.addService(self, site)
        self._reactor = reactor
        self._twistd = twistd
        self._warnings = warnings
        self._store = store
        self._status_pipe: int | None = None
        self.failed: Failure | None = None

    def startService(self) -> None:
        from ilm import __version__

        twistd = self._twistd
        if twistd is not None and twistd.get("statusPipe") is not None:
            # twistd tells the process that launched it "started" as soon as
            # startService returns; take the pipe over and say so only once
            # the node runs (or say why it did not).
            self._status_pipe = twistd["statusPipe"]
            twistd["statusPipe"] = None
        delivery = self.delivery
        log.info(
            "twistd ilm {version}: node {node_id!r}, store {store}, delivery to "
            "{delivery}",
            version=__version__,
            node_id=self.node.local_id,
            store=self._store,
            delivery=_describe(delivery),
            inbox=getattr(delivery, "path", None),
            fsync=getattr(delivery, "fsync", None),
            ilm_event="daemon_starting",
        )
        for warning in self._warnings:
            log.warn("{warning}", warning=warning, ilm_event="daemon_config_warning")
        if isinstance(delivery, FileDelivery):
            try:
                delivery.open()
            except OSError as e:
                self._start_failed(
                    Failure(), f"the inbox {delivery.path}: {e.strerror}"
                )
                return
            _warn_if_exposed(delivery.path)
        MultiService.startService(self)
        waits: list[Deferred[Any]] = [self.node.when_started()]
        waits.extend(site.listening for site in self.sites)
        gatherResults(waits, consumeErrors=True).addCallbacks(
            self._started, self._start_failed
        )

    def stopService(self) -> Any:
        d: Deferred[None] = MultiService.stopService(self)
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: object) -> object:
        close = getattr(self.delivery, "close", None)
        if close is None:
            return result
        closed = close()
        if isinstance(closed, Deferred):
            return closed.addBoth(lambda _: result)
        return result

    def _started(self, result: object) -> None:
        for site in self.sites:
            log.info(
                "serving {what} on {endpoint}",
                what=site.what,
                endpoint=site.endpoint,
                ilm_event="daemon_serving",
            )
        self._report_status(b"0")

    def _start_failed(self, reason: Failure, error: str | None = None) -> None:
        if isinstance(reason.value, FirstError):
            reason = reason.value.subFailure
        self.failed = reason
        if error is None:
            error = reason.getErrorMessage()
        log.critical(
            "the ILM node could not start ({error}); exiting with status 1",
            error=error,
            error_type=type(reason.value).__name__,
            ilm_event="daemon_start_failed",
        )
        # The pid file goes before the launcher (when twistd daemonized)
        # hears of the failure: it is stale from now on.
        self._remove_pid_file()
        self._report_status(b"1 " + error.encode("ascii", "backslashreplace"))
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.addSystemEventTrigger("after", "shutdown", self._exit_failed)
        reactor.callLater(0, reactor.stop)

    def _report_status(self, status: bytes) -> None:
        pipe, self._status_pipe = self._status_pipe, None
        if pipe is None:
            return
        try:
            # The launcher reads at most 100 bytes.
            os.write(pipe, status[:100])
            os.close(pipe)
        except OSError:
            pass

    def _remove_pid_file(self) -> None:
        """
        Remove twistd's pid file (twistd itself would only after a clean
        stop), if it names this process.
        """
        pidfile = self._twistd.get("pidfile") if self._twistd is not None else None
        if not pidfile:
            return
        try:
            with open(pidfile) as f:
                ours = int(f.read().strip() or 0) == os.getpid()
            if ours:
                os.remove(pidfile)
        except (OSError, ValueError):
            pass

    def _exit_failed(self) -> None:
        """
        After a failed start, once the reactor has stopped: exit with
        status 1.
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)


def _warn_if_exposed(path: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warn(
            "the inbox {path} can be read by other users (mode {mode}); run "
            "'chmod 600 {path}'",
            path=path,
            mode=f"{mode:04o}",
            ilm_event="inbox_exposed",
        )


def _describe(delivery: object) -> str:
    if isinstance(delivery, FileDelivery):
        return f"the inbox {delivery.path} (fsync {delivery.fsync})"
    return repr(delivery)


def _make_delivery(options: Mapping[str, Any], reactor: Any) -> Any:
    """
    The delivery target the options chose: a webhook, a command or the
    inbox file.
    """
    if options["webhook"] is not None:
        from ilm._webhook import WebhookDelivery

        return WebhookDelivery(
            options["webhook"], _reactor(reactor), secret=options["webhook-secret"]
        )
    if options["exec"] is not None:
        from ilm._exec import ExecDelivery

        return ExecDelivery(options["exec"], _reactor(reactor))
    return FileDelivery(options["inbox"], fsync=bool(options["fsync"]))


def _make_store(options: Mapping[str, Any], reactor: Any) -> Any:
    if is_postgres(options["store"]):
        from ilm.backends import PostgresBackend

        return PostgresBackend(
            options["store"],
            node_id=options["id"],
            gateway=options["gateway"],
            schema=options["schema"],
            reactor=reactor,
        )
    from ilm.backends import SQLiteBackend

    return SQLiteBackend(options["store"], reactor=reactor)


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def _sites(
    options: Mapping[str, Any], node: ILM, network: Any, reactor: Any
) -> tuple[SiteService, ...]:
    """
    The HTTP API and the metrics sites the options ask for.
    """
    from ilm import __version__

    clock = _reactor(reactor)
    sites = []
    if options["api"] is not None:
        from ilm._api import ApiSite, read_or_create_token

        token = read_or_create_token(options.path(options["api-token-file"]))  # type: ignore[attr-defined]
        site = ApiSite(
            node, token, clock, store=redact_dsn(options["store"]), version=__version__
        )
        sites.append(SiteService("the HTTP API", options["api"], site, reactor))
    if options["metrics"] is not None:
        from twisted.web.server import Site

        from ilm._metrics import MetricsResource, NodeCollector, node_registry

        registry = node_registry(
            NodeCollector(
                node,
                clock,
                network,
                per_peer=bool(options["metrics-per-peer"]),
                version=__version__,
            )
        )
        resource = MetricsResource(registry, clock)
        metrics = Site(resource)
        metrics.noisy = False
        metrics.stop = resource.stop  # type: ignore[attr-defined]
        sites.append(SiteService("metrics", options["metrics"], metrics, reactor))
    return tuple(sites)


def makeService(options: Mapping[str, Any], reactor: Any = None) -> IService:
    """
    Build the ``twistd ilm`` service from parsed :class:`Options`.

    Under twistd, this also sets the file creation mask (twistd's
    ``--umask``, else :data:`DEFAULT_UMASK`) before twistd opens its log
    and pid files.
    """
    from ilm.network import StreamNetwork

    twistd = getattr(options, "parent", None)
    if twistd is not None:
        umask = twistd.get("umask")
        os.umask(DEFAULT_UMASK if umask is None else umask)
    network = StreamNetwork(
        options["id"],
        listen=options["listen"],
        peers=options["peers"],
        keys=options["keys"],
        tls=options["tls"],
        reactor=reactor,
    )
    delivery = _make_delivery(options, reactor)
    config = Config() if options["window"] is None else Config(window=options["window"])
    node = ILM(
        _make_store(options, reactor),
        delivery,
        network,
        config=config,
        clock=reactor,
    )
    return NodeService(
        node,
        delivery,
        reactor,
        twistd=twistd,
        warnings=tuple(getattr(options, "warnings", ())),
        store=redact_dsn(options["store"]),
        sites=_sites(options, node, network, reactor),
    )
