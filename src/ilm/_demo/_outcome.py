"""
What a demo run comes to, once its processes have stopped: the evidence of
each stream (what the receiving applications recorded, what the senders'
stores accepted) handed to the verifier (:mod:`ilm._demo._verify`), with
the run's figures and failures, as one :class:`~ilm._demo._verify.Summary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ilm._demo._http import RECEIVER, HttpLeg, leg_evidence
from ilm._demo._nodes import DemoNode
from ilm._demo._processes import log_errors
from ilm._demo._records import parse_records
from ilm._demo._verify import ReceiverLife, StreamEvidence, Summary, summarize

__all__ = ["leg_report", "node_evidence", "run_summary", "tampered"]


def node_evidence(sender: DemoNode, receiver: DemoNode) -> StreamEvidence:
    """
    What a stream between the nodes' applications did: the receiver's
    records (each of its processes a life, killed or not), the sender's
    store's count of accepted messages.
    """
    try:
        with open(receiver.records, "rb") as f:
            processes = parse_records(f.read())
    except FileNotFoundError:
        processes = []
    lives = []
    spawned = iter(receiver.pids)
    for process in processes:
        killed = False
        for pid, was_killed in spawned:
            if pid == process.pid:
                killed = was_killed
                break
        lives.append(ReceiverLife(process.deliveries, killed))
    return StreamEvidence(
        f"{sender.name} -> {receiver.name}",
        sent=sender.sent,
        accepted=sender.accepted,
        lives=tuple(lives),
    )


def run_summary(
    streams: Sequence[tuple[DemoNode, DemoNode]],
    leg: HttpLeg | None,
    *,
    messages: int,
    failures: Sequence[str],
    link_cuts: int,
    window: int,
    reconnects: int,
    seconds: float,
    seed: int,
    tamper: str | None,
) -> Summary:
    """
    The verified summary of a run whose nodes (and HTTP leg, if any) have
    stopped.

    :param streams: each stream's (sender, receiver).
    :param failures: what went wrong during the run.
    :param tamper: a fault to put into the first stream's evidence
        (:func:`tampered`), to show that the verifier catches it.
    """
    failures = list(failures)
    for sender, _ in streams:
        if not failures and sender.accepted < messages:
            failures.append(
                f"{sender.name} stored only {sender.accepted:,} of "
                f"{messages:,} messages"
            )
    nodes = [sender for sender, _ in streams]
    kills = {node.name: node.kills for node in nodes}
    logs = [node.stderr for node in nodes]
    evidence = [node_evidence(sender, receiver) for sender, receiver in streams]
    notes = []
    if leg is not None:
        if not failures and leg.accepted < leg.messages:
            failures.append(
                f"daemon A stored only {leg.accepted:,} of {leg.messages:,} "
                "messages posted to it"
            )
        if leg.receiver.bad_signatures:
            failures.append(
                f"{leg.receiver.bad_signatures:,} webhook request(s) with a bad "
                "or stale signature"
            )
        kills[RECEIVER] = leg.b.kills
        link_cuts += leg.cuts
        logs.extend(leg.logs())
        notes.append(_leg_note(leg))
        poster = leg.sender
        evidence.append(
            leg_evidence(
                leg.receiver,
                leg.b.pids,
                {} if poster is None else poster.stored_at,
                sent=0 if poster is None else poster.sent,
                accepted=leg.accepted,
            )
        )
    if tamper:
        evidence[0] = tampered(evidence[0], tamper)
    return summarize(
        evidence,
        window=window,
        link_cuts=link_cuts,
        kills=kills,
        reconnects=reconnects,
        seconds=seconds,
        seed=seed,
        failures=failures,
        node_errors=[line for path in logs for line in log_errors(path)],
        notes=notes,
    )


def leg_report(leg: HttpLeg) -> dict[str, Any]:
    """The HTTP leg's own figures, for the JSON summary."""
    sender = leg.sender
    return {
        "messages": leg.messages,
        "posted": 0 if sender is None else sender.sent,
        "answered_202": 0 if sender is None else sender.answered,
        "post_retries": 0 if sender is None else sender.retries,
        "accepted": leg.accepted,
        "delivered": leg.delivered,
        "webhook_requests": leg.receiver.requests,
        "bad_signatures": leg.receiver.bad_signatures,
        "link_cuts": leg.cuts,
        "kills": leg.b.kills,
        "reconnects": leg.reconnects(),
        "api": leg.api,
    }


def _leg_note(leg: HttpLeg) -> str:
    """The HTTP leg in one sentence, for the summary."""
    report = leg_report(leg)
    return (
        f"HTTP -> A -> B -> webhook: in over HTTP (POST "
        f"/v1/peers/B/messages to daemon A, an Idempotency-Key each: "
        f"{report['answered_202']:,} answered 202, "
        f"{report['post_retries']:,} retried), out over a webhook "
        f"(daemon B, {leg.receiver.requests:,} signed requests, "
        f"{leg.receiver.bad_signatures:,} bad signatures); link cuts "
        f"{leg.cuts}, SIGKILLs of daemon B {leg.b.kills}"
    )


def tampered(evidence: StreamEvidence, kind: str) -> StreamEvidence:
    """
    ``evidence`` with one fault put in, to show that the verifier catches it
    and the demo fails (``--tamper``, for tests): ``missing`` drops every
    delivery of one number, ``reorder`` swaps two deliveries, ``repeat``
    delivers one number twice in a row in the same process.
    """
    lives = list(evidence.lives)
    index = max(range(len(lives)), key=lambda i: len(lives[i].deliveries))
    life = lives[index]
    deliveries = list(life.deliveries)
    middle = len(deliveries) // 2
    if kind == "missing":
        number = deliveries[middle][1]
        for i, other in enumerate(lives):
            lives[i] = ReceiverLife(
                tuple(d for d in other.deliveries if d[1] != number), other.killed
            )
        return StreamEvidence(
            evidence.name, evidence.sent, evidence.accepted, tuple(lives)
        )
    if kind == "reorder":
        deliveries[middle], deliveries[middle + 1] = (
            deliveries[middle + 1],
            deliveries[middle],
        )
    elif kind == "repeat":
        deliveries.insert(middle + 1, deliveries[middle])
    else:
        raise ValueError(f"unknown tampering {kind!r}")
    lives[index] = ReceiverLife(tuple(deliveries), life.killed)
    return StreamEvidence(evidence.name, evidence.sent, evidence.accepted, tuple(lives))
