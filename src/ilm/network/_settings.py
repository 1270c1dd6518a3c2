"""
:class:`LinkSettings`: the limits and timings of a stream network's links,
checked when they are made.
"""

from __future__ import annotations

from typing import Any

import attr

from ilm._backoff import Backoff

__all__ = ["DEFAULT_MAX_FRAME", "LinkSettings"]

DEFAULT_MAX_FRAME = 1024 * 1024 + 4096
"""The default largest session frame: 1 MiB of message and 4 KiB of head."""


def _positive(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class LinkSettings:
    """
    Limits and timings of stream links (seconds).

    - ``max_frame_size``: the largest ILM session frame accepted; at least
      the node's ``Config.max_frame_size`` (ILM refuses to run over a
      network with a smaller limit).  A longer length prefix
      closes the link (:class:`ilm.errors.FrameTooLarge`) before anything is
      buffered.  Before authentication the limit is 1 KiB.
    - ``handshake_timeout``: a connection must be authenticated and chosen
      as the link within this time, else it is aborted
      (:class:`ilm.errors.LinkTimeout`).
    - ``keepalive_interval``: a PING goes out after an interval in which
      nothing was sent; the peer answers PONG.
    - ``idle_timeout``: a link on which nothing at all arrived for this long
      is dead (a half-open connection) and is aborted
      (:class:`ilm.errors.LinkTimeout`).
    - ``close_grace``: how long a clean close may take before the
      connection is aborted.
    - ``frame_integrity``: on links authenticated by pre-shared keys
      without TLS, every frame after the handshake carries a 16-byte tag
      (keyed BLAKE2b over a frame counter, the type and the body) so that
      a frame altered, dropped, replayed, reordered or injected on the way
      closes the link (:class:`ilm.errors.FrameAuthenticationFailed`).
      Both nodes must use the same value: a link between nodes that differ
      is refused (:class:`ilm.errors.FrameIntegrityMismatch`), never
      downgraded.  TLS links ignore it (TLS protects its frames).
    - ``max_unsent_bytes``: once a link is paused (its transport's buffer
      is full: the peer is not reading), what this node writes to the peer
      and what it receives from it are counted; once either passes this
      many bytes the node stops reading from the peer (so that it can
      neither provoke more replies nor keep the link alive by sending)
      until the buffer drains, and drops the link if that takes
      ``idle_timeout`` (:class:`ilm.errors.LinkTimeout`).  While paused,
      PONGs are not written: only the latest is kept, and sent when the
      link resumes.  What a paused link holds is thus at most the
      transport's buffer when it paused (64 KiB for TCP, plus the write
      that filled it) and ``max_unsent_bytes`` more.
    - ``max_unauthenticated``, ``max_unauthenticated_per_host``: at most
      this many incoming connections may be in their handshake at once, in
      total and from one source address (host); a connection beyond either
      is aborted as soon as it is accepted
      (:class:`ilm.errors.ConnectionLimitReached`, logged rate-limited),
      so that strangers cannot take every file descriptor.  Connections
      over a UNIX socket all count as one source.
    - ``key_search_rate``: key trials per second (one HMAC each) that the
      node may spend trying a stranger's failed proof against every
      configured key to name the node that made it
      (:class:`ilm.errors.SpoofedPeer`); beyond it the refusal is reported
      as :class:`ilm.errors.AuthenticationFailed` without the search.
      Searches happen only with at most 256 keys.  0 turns them off.
    - ``refusal_log_interval``, ``refusal_log_sources``: refusals of
      connections (failed authentication, spoofed ids, handshake timeouts,
      TLS failures, connection caps, violations) are logged in full the
      first time for each (event, source address), then summarised once
      per interval; at most ``refusal_log_sources`` keys are tracked (the
      rest share one), so they produce at most ``2 * (refusal_log_sources
      + 1)`` lines per interval.
    - ``reconnect``: the :class:`Backoff` between connection attempts.
    - ``refusal``: the :class:`Backoff` after ILM closed a link to a peer
      for a protocol violation: for that long, this node neither dials the
      peer nor accepts its connections, growing with each violation in a row
      (a peer refused for good, say for a stale incarnation, is retried
      slowly instead of every few milliseconds).  The count starts again
      once a link has stayed up for ``refusal_reset``.
    """

    max_frame_size: int = attr.ib(default=DEFAULT_MAX_FRAME, validator=_positive)
    handshake_timeout: float = attr.ib(default=10.0, validator=_positive)
    keepalive_interval: float = attr.ib(default=5.0, validator=_positive)
    idle_timeout: float = attr.ib(default=15.0, validator=_positive)
    close_grace: float = attr.ib(default=5.0, validator=_positive)
    reconnect: Backoff = attr.ib(factory=Backoff)
    refusal: Backoff = attr.ib(factory=lambda: Backoff(initial=0.5, maximum=60.0))
    refusal_reset: float = attr.ib(default=60.0, validator=_positive)
    frame_integrity: bool = True
    max_unsent_bytes: int = attr.ib(default=1024 * 1024, validator=_positive)
    max_unauthenticated: int = attr.ib(default=64, validator=_positive)
    max_unauthenticated_per_host: int = attr.ib(default=8, validator=_positive)
    key_search_rate: float = 1024.0
    refusal_log_interval: float = attr.ib(default=60.0, validator=_positive)
    refusal_log_sources: int = attr.ib(default=32, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.key_search_rate < 0:
            raise ValueError(
                f"key_search_rate must not be negative, not {self.key_search_rate!r}"
            )
        if self.idle_timeout < 2 * self.keepalive_interval:
            raise ValueError(
                "idle_timeout must be at least twice keepalive_interval, or a "
                "live but quiet peer would be taken for dead"
            )
