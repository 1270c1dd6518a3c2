"""
The ``ilm`` command (also ``python -m ilm``).

- ``ilm demo``: two node processes stream to each other through link cuts
  and SIGKILLs, and the result is verified (see :mod:`ilm._demo`).
- ``ilm inspect PATH [--json]``: what an SQLite store holds, read-only and
  without taking its lock (so it works on the store of a running node), and
  whether a live process holds it.  ``ilm inspect postgresql://...
  [--json] [--node ID] [--schema NAME]``: the same per node of a PostgreSQL
  store, with each stream's lease and each gateway's liveness, from one
  read-only transaction.
- ``ilm reincarnate PATH``: give a store restored from a backup a new
  incarnation (refused while a process holds the store).
- ``ilm send PEER [FILE|-]`` and ``ilm status [PEER]``: send a message
  through a running node's HTTP API, and show its peers (see
  :mod:`ilm._client`).
- ``ilm --version``: ILM's version (``twistd ilm --version`` prints the
  same line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from ilm._client import add_send_arguments, add_status_arguments
from ilm._demo import add_arguments as add_demo_arguments


def version_text() -> str:
    """
    The version line of ``ilm --version`` and ``twistd ilm --version``:
    ILM's version, then Twisted's and Python's.
    """
    import platform

    import twisted
    from ilm import __version__

    return (
        f"ilm {__version__} (Twisted {twisted.__version__}, "
        f"Python {platform.python_version()})"
    )


def _demo(args: argparse.Namespace) -> int:
    from ilm._demo import run

    return run(args)


def _send(args: argparse.Namespace) -> int:
    from ilm._client import send

    return send(args)


def _status(args: argparse.Namespace) -> int:
    from ilm._client import status

    return status(args)


_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _inspect(args: argparse.Namespace) -> int:
    from ilm._peerid import peer_id_from_text
    from ilm.errors import ILMError, StoreError

    postgres = args.path.startswith(_POSTGRES_SCHEMES)
    if not postgres and (args.node is not None or args.schema is not None):
        print(
            "ilm inspect: --node and --schema apply to a PostgreSQL store "
            "(postgresql://...)",
            file=sys.stderr,
        )
        return 2
    try:
        if postgres:
            from ilm.backends._pg_inspect import inspect_postgres

            node = None if args.node is None else peer_id_from_text(args.node)
            report: Any = inspect_postgres(
                args.path, schema=args.schema or "ilm", node_id=node
            )
        else:
            from ilm.backends._sqlite import inspect_store

            report = inspect_store(args.path)
    except (StoreError, ILMError) as e:
        print(f"ilm inspect: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if postgres:
        now = report.database_time
        data, write = postgres_report_json, write_postgres_report
    else:
        now = time.time()
        data, write = report_json, write_report
    if args.json:
        json.dump(data(report, now), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        write(report, now, sys.stdout)
    return 0


def _reincarnate(args: argparse.Namespace) -> int:
    from ilm.backends._sqlite import reincarnate_store
    from ilm.errors import StoreError

    try:
        old, new = reincarnate_store(args.path)
    except StoreError as e:
        print(f"ilm reincarnate: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: incarnation {old} replaced by {new}; its peers will take "
        f"its pending messages for a new stream"
    )
    return 0


def _holder_text(holder: Any) -> str:
    if holder.held is None:
        return "cannot tell whether a process holds it"
    if not holder.held:
        return "no live process holds it"
    pid = f" (pid {holder.pid})" if holder.pid is not None else ""
    return f"held by a live process{pid}"


def _age(stored_at: float | None, now: float) -> float | None:
    return None if stored_at is None else round(max(0.0, now - stored_at), 3)


def report_json(report: Any, now: float) -> dict[str, Any]:
    """
    A store report as JSON-ready data.  Peer ids keep their type: ``2`` and
    ``"2"`` are different peers.  ``oldest_pending_age`` is in seconds
    (``null`` when nothing is pending).
    """
    return {
        "path": report.path,
        "schema_version": report.schema_version,
        "incarnation": report.incarnation,
        "held": report.holder.held,
        "held_by_pid": report.holder.pid,
        **_streams_json(report, now),
    }


def _streams_json(report: Any, now: float) -> dict[str, Any]:
    """The ``outbound`` and ``inbound`` entries of a store's or a node's report."""
    return {
        "outbound": [
            {
                "peer_id": out.peer_id,
                "pending": out.pending,
                "pending_bytes": out.pending_bytes,
                "acked": out.acked,
                "last_position": out.last_position,
                "oldest_pending_age": _age(out.oldest_stored_at, now),
            }
            for out in report.outbound
        ],
        "inbound": [
            {
                "peer_id": mark.peer_id,
                "incarnation": mark.incarnation,
                "delivered": mark.delivered,
                "retired": mark.retired,
            }
            for mark in report.inbound
        ],
    }


def write_report(report: Any, now: float, out: TextIO) -> None:
    """
    Write a store report for people.  Peer ids are shown as Python literals
    (``2`` and ``'2'`` are different peers).
    """
    out.write(f"ILM store {report.path}\n")
    out.write(f"  schema version {report.schema_version}\n")
    out.write(f"  incarnation {report.incarnation}\n")
    out.write(f"  {_holder_text(report.holder)}\n")
    _write_streams(report, now, out, "")


def _write_streams(report: Any, now: float, out: TextIO, indent: str) -> None:
    """The outbound and inbound sections of a store's or a node's report."""
    out.write(
        f"{indent}outbound (messages stored, awaiting the peer's acknowledgement):\n"
    )
    if not report.outbound:
        out.write(f"{indent}  none\n")
    for box in report.outbound:
        if box.pending:
            age = _age(box.oldest_stored_at, now)
            out.write(
                f"{indent}  peer {box.peer_id!r}: {box.pending:,} pending "
                f"(positions {box.acked + 1:,}..{box.last_position:,}, "
                f"{box.pending_bytes:,} bytes), oldest stored {age:,.1f} s ago\n"
            )
        else:
            out.write(
                f"{indent}  peer {box.peer_id!r}: none pending "
                f"(all {box.last_position:,} acknowledged)\n"
            )
    out.write(f"{indent}inbound (delivery marks, per peer incarnation):\n")
    if not report.inbound:
        out.write(f"{indent}  none\n")
    for mark in report.inbound:
        retired = " (retired)" if mark.retired else ""
        out.write(
            f"{indent}  peer {mark.peer_id!r} incarnation {mark.incarnation}: "
            f"delivered up to {mark.delivered:,}{retired}\n"
        )


def _expires_in(lease: Any, now: float) -> float | None:
    if lease.expires_at is None:
        return None
    return round(float(lease.expires_at) - now, 3)


def postgres_report_json(report: Any, now: float) -> dict[str, Any]:
    """
    A PostgreSQL store report as JSON-ready data: per node, what
    :func:`report_json` gives for an SQLite store, the leases and the
    gateways' liveness.  Times are the database's: ``database_time``,
    ``expires_at`` and ``opened_at`` in seconds since the epoch,
    ``expires_in`` in seconds from ``database_time`` (negative once
    expired; ``null`` for a stream never taken), ``opened_age`` in seconds
    before it.
    """
    return {
        "database": report.database,
        "schema": report.schema,
        "schema_version": report.schema_version,
        "database_time": report.database_time,
        "nodes": [
            {
                "node_id": node.node_id,
                "incarnation": node.incarnation,
                **_streams_json(node, now),
                "leases": [
                    {
                        "peer_id": lease.peer_id,
                        "owner": lease.owner,
                        "epoch": lease.epoch,
                        "expires_at": lease.expires_at,
                        "expires_in": _expires_in(lease, now),
                        "live": lease.live,
                    }
                    for lease in node.leases
                ],
                "gateways": [
                    {
                        "name": gateway.name,
                        "opened_at": gateway.opened_at,
                        "opened_age": _age(gateway.opened_at, now),
                        "expires_at": gateway.expires_at,
                        "expires_in": _expires_in(gateway, now),
                        "live": gateway.live,
                    }
                    for gateway in node.gateways
                ],
            }
            for node in report.nodes
        ],
    }


def _expiry_text(expires_in: float) -> str:
    if expires_in > 0:
        return f"expires in {expires_in:,.1f} s"
    return f"expired {-expires_in:,.1f} s ago"


def _lease_text(lease: Any, now: float) -> str:
    owner = "no owner" if lease.owner is None else f"owner {lease.owner!r}"
    expires_in = _expires_in(lease, now)
    when = "never taken" if expires_in is None else _expiry_text(expires_in)
    live = "live" if lease.live else "not live"
    return f"peer {lease.peer_id!r}: {owner}, epoch {lease.epoch:,}, {when} ({live})"


def _gateway_text(gateway: Any, now: float) -> str:
    opened = f"opened {max(0.0, now - gateway.opened_at):,.1f} s ago"
    when = _expiry_text(gateway.expires_at - now)
    live = "live" if gateway.live else "not live"
    return f"gateway {gateway.name!r}: {opened}, {when} ({live})"


def write_postgres_report(report: Any, now: float, out: TextIO) -> None:
    """
    Write a PostgreSQL store report for people: per node, what
    :func:`write_report` shows for an SQLite store, each stream's lease
    and each gateway's liveness (times in the database's clock).
    """
    out.write(f"ILM PostgreSQL store, schema {report.schema!r} at {report.database}\n")
    out.write(f"  schema version {report.schema_version}\n")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(report.database_time))
    out.write(f"  database time {stamp} UTC\n")
    if not report.nodes:
        out.write("no nodes\n")
    for node in report.nodes:
        out.write(f"node {node.node_id!r}\n")
        out.write(f"  incarnation {node.incarnation}\n")
        _write_streams(node, now, out, "  ")
        out.write("  leases (stream ownership, database time):\n")
        if not node.leases:
            out.write("    none\n")
        for lease in node.leases:
            out.write(f"    {_lease_text(lease, now)}\n")
        out.write("  gateways (liveness, database time):\n")
        if not node.gateways:
            out.write("    none\n")
        for gateway in node.gateways:
            out.write(f"    {_gateway_text(gateway, now)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ilm",
        description="Intersession Layer Messaging for Twisted.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=version_text(),
        help="print ILM's version and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="two node processes stream to each other through link cuts and "
        "kill -9; the result is verified",
    )
    add_demo_arguments(demo)
    demo.set_defaults(run=_demo)
    inspect = commands.add_parser(
        "inspect",
        help="show what a store holds, SQLite or PostgreSQL (read-only; works "
        "while nodes run)",
        description="Show what a store holds: an SQLite store's file, or a "
        "PostgreSQL store given as postgresql://... (every node in it, or the "
        "one --node names, with each stream's lease). Read-only: it takes no "
        "lock and writes nothing, so it works while nodes and gateways run.",
    )
    inspect.add_argument(
        "path", help="the store's file, or a PostgreSQL URI (postgresql://...)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    inspect.add_argument(
        "--node",
        metavar="ID",
        help="PostgreSQL: show only this node (an id as text: 7, str:7, orders)",
    )
    inspect.add_argument(
        "--schema",
        metavar="NAME",
        help="PostgreSQL: the schema holding ILM's tables (default: ilm)",
    )
    inspect.set_defaults(run=_inspect)
    reincarnate = commands.add_parser(
        "reincarnate",
        help="give a store restored from a backup a new incarnation "
        "(refused while a process holds it)",
        description="Give the SQLite store PATH a new incarnation. A store "
        "restored from a backup must get one before its node starts: its "
        "peers have already seen positions beyond the backup, and would take "
        "new messages at those positions for duplicates. With a new "
        "incarnation they start a new stream from its pending messages "
        "(which may arrive a second time, told apart by source_incarnation). "
        "Refused while a live process holds the store.",
    )
    reincarnate.add_argument("path", help="the store's file")
    reincarnate.set_defaults(run=_reincarnate)
    send = commands.add_parser(
        "send",
        help="send a message through a running node's HTTP API",
        description="Send FILE (or standard input) to PEER through the HTTP API "
        "of a running 'twistd ilm' node. Exit status: 0 stored (or "
        "acknowledged, with --wait acknowledged), 1 refused, 2 bad usage, 3 "
        "the node could not be reached.",
    )
    add_send_arguments(send)
    send.set_defaults(run=_send)
    status = commands.add_parser(
        "status",
        help="show a running node's peers: links, pending messages, held deliveries",
    )
    add_status_arguments(status)
    status.set_defaults(run=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
