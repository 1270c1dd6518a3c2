"""
Tunable limits and timings, with their documented defaults.
"""

from __future__ import annotations

from typing import Any

import attr


def _positive(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _u32(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    _positive(instance, attribute, value)
    if value > 2**32 - 1:
        raise ValueError(
            f"{attribute.name} must fit in 32 bits (the handshake carries it), "
            f"not {value!r}"
        )


def _not_negative(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Config:
    """
    Limits and timings of one ILM node.  Every field has a default; pass only
    what you want to change: ``Config(window=1024)``.

    Flow control
        ``window`` / ``window_bytes``: at most this many messages (bytes) sent
        to one peer and not yet acknowledged by it.  The receiver announces
        its own window in the handshake and the sender uses the smaller one.
        A single message larger than ``window_bytes`` is still sent alone.

    Limits
        ``max_message_size``: largest ``contents`` accepted by ``send_to``.
        ``max_outbox_messages`` / ``max_outbox_bytes``: per peer, messages
        accepted but not yet acknowledged; ``send_to`` fails with
        :class:`ilm.errors.OutboxFull` beyond them.  With a store shared
        by several gateways, they count every gateway's messages as the
        store held them at the last look (docs/scaling.md).
        ``max_frame_size``: largest frame sent or accepted (the wire layer
        refuses larger frames with :class:`ilm.errors.FrameTooLarge`).

    Incarnations of a peer (a peer that comes back with a new store)
        ``max_new_incarnations`` per ``new_incarnation_period`` seconds: how
        many new incarnations one peer may present; one more is refused
        with :class:`ilm.errors.TooManyIncarnations` (its link is closed and
        the network's refusal backoff applies).
        ``max_retired_incarnations``: how many replaced incarnations of one
        peer are remembered (and refused if they come back); beyond that
        the oldest is forgotten (see docs/protocol.md for what that costs).

    Timings (seconds)
        ``retransmit_timeout`` (doubling up to ``max_retransmit_timeout``):
        how long sent data may go unconfirmed before it is sent again.
        ``handshake_retry``: how often the handshake is repeated while the
        peer's has not arrived (lossy networks).
        ``ack_delay``: how soon a receiver confirms data it holds but could
        not yet deliver.
        ``ack_interval``: the shortest time between two acknowledgements
        of committed delivery marks to one peer while its data keeps
        arriving.  The first after a quiet spell goes at once, as does one
        whose marks cover everything received from the peer; what commits
        make durable within the interval is acknowledged once at its end
        (up to an eighth of it later), or at once when a quarter of the
        sender's window waits for it.  Fewer ACK frames with many busy
        peers; a streaming sender's ``acknowledged`` receipts fire up to
        that much later.  0 acknowledges after every commit.  Keep it well
        below the peers' ``retransmit_timeout``.
        ``mark_delay``: how long a delivery mark may wait for more deliveries
        to share its commit (fewer fsyncs; acknowledgements leave that much
        later, and a receiver crash can repeat that much more).  With many
        busy peers a mark may wait longer: 0.1 ms per peer whose marks the
        last commit carried (0.1 s with 1,000), so that commits, whose
        reactor cost grows with the peers they carry, stay a small share
        of it.
        ``delete_delay``: how long the deletion of acknowledged messages may
        wait to share a commit (a crash before it only causes resends that
        the peer takes as duplicates).  Sends never wait: a commit starts as
        soon as the previous one has finished.
        ``delivery_retry`` (doubling up to ``max_delivery_retry``): backoff
        after the delivery target fails.
        ``store_retry`` (doubling up to ``max_store_retry``): backoff after a
        failed commit of acknowledgements or delivery marks.
        ``shutdown_timeout``: default for ``stopService``.
    """

    window: int = attr.ib(default=16384, validator=_u32)
    window_bytes: int = attr.ib(default=4 * 1024 * 1024, validator=_u32)
    max_message_size: int = attr.ib(default=1024 * 1024, validator=_u32)
    max_outbox_messages: int = attr.ib(default=1_000_000, validator=_positive)
    max_outbox_bytes: int = attr.ib(default=256 * 1024 * 1024, validator=_positive)
    max_frame_size: int = attr.ib(default=1024 * 1024 + 4096, validator=_positive)
    max_new_incarnations: int = attr.ib(default=4, validator=_positive)
    new_incarnation_period: float = attr.ib(default=60.0, validator=_positive)
    max_retired_incarnations: int = attr.ib(default=32, validator=_positive)
    read_batch: int = attr.ib(default=1024, validator=_positive)
    retransmit_timeout: float = attr.ib(default=1.0, validator=_positive)
    max_retransmit_timeout: float = attr.ib(default=30.0, validator=_positive)
    handshake_retry: float = attr.ib(default=1.0, validator=_positive)
    ack_delay: float = attr.ib(default=0.1, validator=_positive)
    ack_interval: float = attr.ib(default=0.2, validator=_not_negative)
    mark_delay: float = attr.ib(default=0.002, validator=_not_negative)
    delete_delay: float = attr.ib(default=0.05, validator=_not_negative)
    delivery_retry: float = attr.ib(default=0.1, validator=_positive)
    max_delivery_retry: float = attr.ib(default=30.0, validator=_positive)
    store_retry: float = attr.ib(default=0.1, validator=_positive)
    max_store_retry: float = attr.ib(default=10.0, validator=_positive)
    shutdown_timeout: float = attr.ib(default=30.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.max_frame_size < self.max_message_size + 64:
            raise ValueError(
                "max_frame_size must exceed max_message_size by at least 64 "
                "bytes of framing"
            )
