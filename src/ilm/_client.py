"""
``ilm send`` and ``ilm status``: the command line's client of a running
node's HTTP API (``twistd ilm --api``), with treq.

Where the node is and its token come from options or the environment:

- ``--api URL`` or ``ILM_API`` (default ``http://127.0.0.1:8780``);
- ``--token-file PATH`` or ``ILM_API_TOKEN_FILE`` (default
  ``ilm-api.token``, the daemon's default, in the current directory), or
  the token itself in ``ILM_API_TOKEN``.

Exit status: 0 done; 1 the node refused or failed (its error code is
printed); 2 bad usage; 3 the node could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from ilm._peerid import PeerId, peer_id_from_text, peer_id_to_text

__all__ = ["add_send_arguments", "add_status_arguments", "send", "status"]

DEFAULT_URL = "http://127.0.0.1:8780"
DEFAULT_TOKEN_FILE = "ilm-api.token"

_TIMEOUT = 30.0


class _Unreachable(Exception):
    """The node's API did not answer."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        metavar="URL",
        default=None,
        help=f"the node's API (default: $ILM_API, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=None,
        help="the API token file (default: $ILM_API_TOKEN_FILE, else "
        f"./{DEFAULT_TOKEN_FILE}; $ILM_API_TOKEN gives the token itself)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON answer")


def add_send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peer", help="the destination peer id (str:ID for digits)")
    parser.add_argument(
        "file",
        nargs="?",
        default="-",
        help="the message: a file, or - (the default) for standard input",
    )
    parser.add_argument(
        "--wait",
        choices=("stored", "acknowledged"),
        default="stored",
        help="answer once the message is stored (default), or once the peer "
        "acknowledged it",
    )
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        default=None,
        help="send the same KEY again to retry without storing the message twice",
    )
    _add_common(parser)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peer", nargs="?", default=None, help="one peer (default: all)")
    _add_common(parser)


def _settings(args: argparse.Namespace) -> tuple[str, str]:
    """
    :return: the API's base URL and the token.
    :raises SystemExit: (status 2) with a message if there is no token.
    """
    url = (args.api or os.environ.get("ILM_API") or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        _usage(args, f"--api {url!r}: expected an http:// or https:// URL")
    token = os.environ.get("ILM_API_TOKEN") if args.token_file is None else None
    if not token:
        path = (
            args.token_file
            or os.environ.get("ILM_API_TOKEN_FILE")
            or DEFAULT_TOKEN_FILE
        )
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            _usage(
                args,
                f"cannot read the API token file {path}: {e.strerror or e} (give "
                f"--token-file, or set ILM_API_TOKEN_FILE or ILM_API_TOKEN)",
            )
    assert token is not None
    return url, token


def _usage(args: argparse.Namespace, message: str) -> None:
    print(f"ilm {args.command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _peer(args: argparse.Namespace, text: str) -> PeerId:
    try:
        return peer_id_from_text(text)
    except ValueError as e:
        _usage(args, f"invalid peer id {text!r}: {e}")
        raise AssertionError("unreachable") from None


async def _request(
    reactor: Any,
    method: str,
    url: str,
    token: str,
    body: bytes | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[int, Any]:
    import treq
    from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
    from twisted.web._newclient import ResponseNeverReceived

    all_headers = Headers({b"Authorization": [f"Bearer {token}".encode()]})
    for name, values in (headers or {}).items():
        all_headers.setRawHeaders(name, values)
    try:
        response = await treq.request(
            method,
            url,
            data=body,
            headers=all_headers,
            timeout=_TIMEOUT,
            reactor=reactor,
        )
        content = await response.content()
    except (ConnectError, DNSLookupError, TimeoutError, ResponseNeverReceived) as e:
        raise _Unreachable(str(e) or type(e).__name__) from None
    try:
        value = json.loads(content)
    except ValueError:
        value = {
            "error": {
                "code": "bad_answer",
                "message": content[:200].decode("utf-8", "replace"),
            }
        }
    return response.code, value


def _run(args: argparse.Namespace, work: Any) -> int:
    from twisted.internet.task import react

    result: list[int] = []

    async def main(reactor: Any) -> None:
        try:
            result.append(await work(reactor))
        except _Unreachable as e:
            url = args.api or os.environ.get("ILM_API") or DEFAULT_URL
            print(
                f"ilm {args.command}: cannot reach the node's API at {url}: {e} "
                f"(is 'twistd ilm' running, with --api? give --api URL or set "
                f"ILM_API)",
                file=sys.stderr,
            )
            result.append(3)

    try:
        react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0] if result else 1


def _refused(args: argparse.Namespace, code: int, value: Any, out: TextIO) -> int:
    if args.json:
        json.dump(value, out)
        out.write("\n")
    error = value.get("error", {}) if isinstance(value, dict) else {}
    print(
        f"ilm {args.command}: {error.get('code', 'error')} (HTTP {code}): "
        f"{error.get('message', '')}",
        file=sys.stderr,
    )
    return 1


def send(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """
    ``ilm send PEER [FILE|-]``.
    """
    peer = _peer(args, args.peer)
    url, token = _settings(args)
    if args.file == "-":
        body = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                body = f.read()
        except OSError as e:
            _usage(args, f"cannot read {args.file}: {e.strerror or e}")
    target = f"{url}/v1/peers/{peer_id_to_text(peer)}/messages"
    if args.wait == "acknowledged":
        target += "?wait=acknowledged"
    headers = {}
    if args.idempotency_key is not None:
        headers[b"Idempotency-Key"] = [args.idempotency_key.encode("utf-8")]

    async def work(reactor: Any) -> int:
        code, value = await _request(reactor, "POST", target, token, body, headers)
        if code not in (200, 202):
            return _refused(args, code, value, out)
        if args.json:
            json.dump(value, out)
            out.write("\n")
        else:
            what = "acknowledged" if value.get("acknowledged") else "stored"
            out.write(
                f"message {value['message_id']} to peer {value['peer']}: {what}\n"
            )
        return 0

    return _run(args, work)


def status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """
    ``ilm status [PEER]``.
    """
    target = "/v1/peers"
    if args.peer is not None:
        target += "/" + peer_id_to_text(_peer(args, args.peer))
    url, token = _settings(args)

    async def work(reactor: Any) -> int:
        code, node = await _request(reactor, "GET", url + "/v1/node", token)
        if code != 200:
            return _refused(args, code, node, out)
        code, value = await _request(reactor, "GET", url + target, token)
        if code != 200:
            return _refused(args, code, value, out)
        peers = value["peers"] if args.peer is None else [value]
        if args.json:
            json.dump({"node": node, "peers": peers}, out, indent=2)
            out.write("\n")
            return 0
        _write_status(node, peers, out)
        return 0

    return _run(args, work)


def _write_status(
    node: dict[str, Any], peers: list[dict[str, Any]], out: TextIO
) -> None:
    out.write(
        f"node {node['id']} ({node['state']}, up {node['uptime_s']:.0f} s, "
        f"ilm {node['version']}), store {node['store']}\n"
    )
    if not peers:
        out.write("  no peers\n")
    for p in peers:
        link = p["link"]
        if p.get("link_for_s") is not None:
            link += f" for {p['link_for_s']:.0f} s"
        line = (
            f"  peer {p['peer_id']}: link {link}; pending {p['pending']:,} "
            f"({p['pending_bytes']:,} B"
        )
        if p.get("oldest_pending_age") is not None:
            line += f", oldest {p['oldest_pending_age']:.1f} s"
        line += (
            f"), in flight {p['in_flight']:,}, acknowledged up to "
            f"{p['last_acknowledged']:,}; delivered {p['delivered']:,}"
        )
        if p["delivery_held"]:
            line += (
                f"; DELIVERY HELD for {p.get('held_for_s') or 0:.0f} s after "
                f"{p['delivery_retries']} failure(s): {p['delivery_held_reason']}"
            )
        if p["link"] != "up" and p.get("last_link_error"):
            line += f"; last link error: {p['last_link_error']}"
        out.write(line + "\n")
