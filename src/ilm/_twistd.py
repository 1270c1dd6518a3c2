"""
``twistd ilm``: an ILM node as a daemon.

The node keeps its state in an SQLite store, listens on server endpoints,
keeps links to its configured peers (pre-shared keys and/or mutual TLS), and
appends every message it receives to a JSON-lines inbox file, exactly once
and in order per sender (see :class:`FileDelivery` for the one at-least-once
window).  Sending from the daemon itself is not offered yet: an application
that sends embeds :class:`ilm.ILM`.

Example::

    twistd -n ilm --id 2 --listen tcp:9000 --keys keys.txt \\
        --store node2.sqlite --inbox node2-inbox.jsonl
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import IO, Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._config import Config
from ilm._message import PeerId, check_peer_id
from ilm._messenger import ILM
from ilm.errors import ILMError
from ilm.interfaces import ILocalDelivery, IMessage

log = Logger(namespace="ilm.twistd")

__all__ = ["FileDelivery", "Options", "makeService", "parse_peer_id"]


def parse_peer_id(text: str) -> PeerId:
    """
    A peer id from the command line: decimal digits are an ``int`` id,
    anything else a ``str`` id (``str:`` forces a string, for ids made of
    digits).

    :raises usage.UsageError: if it is not a valid peer id.
    """
    value: object
    if text.startswith("str:"):
        value = text[4:]
    elif text.isascii() and text.isdigit():
        value = int(text)
    else:
        value = text
    try:
        return check_peer_id(value)
    except (TypeError, ILMError) as e:
        raise usage.UsageError(f"invalid peer id {text!r}: {e}") from None


def read_keys(path: str) -> dict[PeerId, bytes]:
    """
    Read pre-shared keys: one ``PEER_ID HEX_KEY`` per line; blank lines and
    lines starting with ``#`` are ignored.

    :raises usage.UsageError: if the file cannot be read or a line is wrong.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise usage.UsageError(f"cannot read the keys file {path!r}: {e}") from None
    keys: dict[PeerId, bytes] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise usage.UsageError(
                f"{path}:{number}: expected 'PEER_ID HEX_KEY', got {len(parts)} fields"
            )
        peer_id = parse_peer_id(parts[0])
        try:
            key = bytes.fromhex(parts[1])
        except ValueError:
            raise usage.UsageError(f"{path}:{number}: the key is not hex") from None
        if len(key) < 16:
            raise usage.UsageError(
                f"{path}:{number}: the key is {len(key)} bytes; at least 16 are "
                f"required (32 random bytes are recommended)"
            )
        if peer_id in keys:
            raise usage.UsageError(f"{path}:{number}: a second key for {peer_id!r}")
        keys[peer_id] = key
    return keys


@implementer(ILocalDelivery)
class FileDelivery:
    """
    Deliver each message as one JSON line appended to a file::

        {"source": 1, "destination": 2, "message_id": 7,
         "incarnation": "…", "contents": "<base64>"}

    The line is written and flushed before :meth:`deliver` returns (and,
    with ``fsync=True``, synced to disk), so a message is in the file before
    ILM records its delivery.  A process killed between the two finds the
    message again after the restart: the same ``incarnation`` and
    ``message_id`` then appear twice (the at-least-once window of
    ``docs/protocol.md``); a reader that skips lines whose ``(source,
    incarnation, message_id)`` it has seen gets exactly once.

    A failed write (a full disk, say) raises: ILM holds that sender's stream
    and retries with backoff, losing nothing.
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def deliver(self, message: IMessage) -> None:
        self.open()
        assert self._file is not None
        record = {
            "source": message.source_id,
            "destination": message.destination_id,
            "message_id": message.message_id,
            "incarnation": getattr(message, "source_incarnation", None),
            "contents": base64.b64encode(message.contents).decode("ascii"),
        }
        line = json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"
        try:
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError:
            # What was half written stays half written: reopen, so the next
            # attempt starts a fresh line after it.
            self.close()
            raise


class Options(usage.Options):
    """
    Options of ``twistd ilm``.
    """

    synopsis = "--id ID [--listen ENDPOINT ...] [--peer ID=ENDPOINT ...] [options]"
    longdesc = (
        "Run an ILM node: durable, exactly-once, ordered messaging with its "
        "peers. Messages received are appended to the inbox file as JSON "
        "lines. Peer ids made of digits are integers (prefix str: for a "
        "string id of digits)."
    )

    optParameters = [
        ["id", None, None, "This node's id (required)."],
        ["store", None, "ilm.sqlite", "The SQLite store of this node."],
        ["inbox", None, "ilm-inbox.jsonl", "Append received messages here."],
        ["keys", None, None, "Pre-shared keys file: 'PEER_ID HEX_KEY' per line."],
        ["tls-certificate", None, None, "PEM certificate of this node (mutual TLS)."],
        ["tls-key", None, None, "PEM private key of this node."],
        ["tls-ca", None, None, "PEM CA certificate(s) that issue peer certificates."],
        ["window", None, None, "Messages in flight per peer (default 4096).", int],
    ]
    optFlags = [
        ["fsync", None, "fsync the inbox after each message (survives power loss)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["peers"] = {}
        self["pins"] = {}

    def opt_listen(self, endpoint: str) -> None:
        """Accept links on ENDPOINT (serverFromString syntax); repeatable."""
        self["listen"].append(endpoint)

    def opt_peer(self, value: str) -> None:
        """Keep a link to peer ID at ENDPOINT: ID=ENDPOINT; repeatable."""
        peer, sep, endpoint = value.partition("=")
        if not sep or not endpoint:
            raise usage.UsageError(f"--peer wants ID=ENDPOINT, not {value!r}")
        peer_id = parse_peer_id(peer)
        if peer_id in self["peers"]:
            raise usage.UsageError(f"peer {peer_id!r} is given twice")
        self["peers"][peer_id] = endpoint

    def opt_pin(self, value: str) -> None:
        """Pin peer ID's TLS certificate: ID=SHA256_FINGERPRINT; repeatable."""
        peer, sep, fingerprint = value.partition("=")
        if not sep or not fingerprint:
            raise usage.UsageError(f"--pin wants ID=FINGERPRINT, not {value!r}")
        self["pins"][parse_peer_id(peer)] = fingerprint

    def postOptions(self) -> None:
        if self["id"] is None:
            raise usage.UsageError("--id is required")
        self["id"] = parse_peer_id(self["id"])
        if self["id"] in self["peers"]:
            raise usage.UsageError("a node does not dial itself")
        self["keys"] = read_keys(self["keys"]) if self["keys"] is not None else None
        tls_given = [self[name] is not None for name in ("tls-certificate", "tls-key")]
        if any(tls_given) and not all(tls_given):
            raise usage.UsageError("--tls-certificate and --tls-key go together")
        if not all(tls_given) and (self["tls-ca"] is not None or self["pins"]):
            raise usage.UsageError(
                "--tls-ca and --pin need --tls-certificate and --tls-key"
            )
        if self["keys"] is None and not all(tls_given):
            raise usage.UsageError(
                "links are always authenticated: give --keys, or "
                "--tls-certificate and --tls-key"
            )
        if self["window"] is not None and self["window"] < 1:
            raise usage.UsageError("--window must be at least 1")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise usage.UsageError(f"cannot read the {what} {path!r}: {e}") from None


def _tls(options: Mapping[str, Any]) -> Any:
    if options["tls-certificate"] is None:
        return None
    from ilm.network import TLSCredentials

    ca = options["tls-ca"]
    try:
        return TLSCredentials.from_pem(
            _read(options["tls-certificate"], "TLS certificate"),
            _read(options["tls-key"], "TLS key"),
            peer_fingerprints=options["pins"],
            ca_certificates=_read(ca, "CA certificates") if ca is not None else None,
        )
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"bad TLS material: {e}") from None


class NodeService(MultiService):
    """
    The daemon's service: the ILM node and its inbox.  If the node cannot
    start (its store locked or unreadable, an address taken, the inbox not
    writable), the failure is logged and the process stops with exit
    status 1.
    """

    def __init__(self, node: ILM, inbox: FileDelivery, reactor: Any = None) -> None:
        MultiService.__init__(self)
        self.node = node
        self.inbox = inbox
        MultiService.addService(self, node)
        self._reactor = reactor
        self.failed: Failure | None = None

    def startService(self) -> None:
        try:
            self.inbox.open()
        except OSError:
            self._start_failed(Failure())
            return
        MultiService.startService(self)
        self.node.when_started().addErrback(self._start_failed)

    def stopService(self) -> Any:
        d: Deferred[None] = MultiService.stopService(self)
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: object) -> object:
        self.inbox.close()
        return result

    def _start_failed(self, reason: Failure) -> None:
        self.failed = reason
        log.critical(
            "the ILM node could not start ({error}); stopping",
            error=reason.getErrorMessage(),
            ilm_event="daemon_start_failed",
        )
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        reactor.callLater(0, reactor.stop)


def makeService(options: Mapping[str, Any], reactor: Any = None) -> IService:
    """
    Build the ``twistd ilm`` service from parsed :class:`Options`.
    """
    from ilm.backends import SQLiteBackend
    from ilm.network import StreamNetwork

    network = StreamNetwork(
        options["id"],
        listen=options["listen"],
        peers=options["peers"],
        keys=options["keys"],
        tls=_tls(options),
        reactor=reactor,
    )
    inbox = FileDelivery(options["inbox"], fsync=options["fsync"])
    config = Config() if options["window"] is None else Config(window=options["window"])
    node = ILM(
        SQLiteBackend(options["store"], reactor=reactor),
        inbox,
        network,
        config=config,
        clock=reactor,
    )
    return NodeService(node, inbox, reactor)
