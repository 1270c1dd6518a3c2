"""
Admission caps on incoming connections still in their link handshake: at
most ``LinkSettings.max_unauthenticated`` in total and
``max_unauthenticated_per_host`` from one source address, so that strangers
cannot take every file descriptor.  A connection beyond either cap is
aborted as soon as it is accepted (``ConnectionLimitReached``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

__all__ = ["Admission"]


class Admission:
    """
    The unauthenticated incoming connections and their source hosts.

    :param max_total: the cap in total.
    :param max_per_host: the cap per source host.
    """

    def __init__(self, max_total: int, max_per_host: int) -> None:
        self._max_total = max_total
        self._max_per_host = max_per_host
        self._hosts: dict[Hashable, str] = {}
        self._per_host: Counter[str] = Counter()

    def admit(self, connection: Hashable, host: str) -> str | None:
        """
        Count ``connection`` from ``host`` as unauthenticated, unless that
        would pass a cap.

        :return: ``None`` if admitted, else which limit it would pass, in
            words.
        """
        total = len(self._hosts)
        from_host = self._per_host[host]
        if total >= self._max_total:
            return f"{total} unauthenticated connections are open (the limit)"
        if from_host >= self._max_per_host:
            return (
                f"{from_host} unauthenticated connections from {host} are open "
                f"(the limit per source address)"
            )
        self._hosts[connection] = host
        self._per_host[host] += 1
        return None

    def release(self, connection: Hashable) -> None:
        """
        ``connection`` is no longer unauthenticated (or is gone).
        """
        host = self._hosts.pop(connection, None)
        if host is not None:
            left = self._per_host[host] - 1
            if left > 0:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def __len__(self) -> int:
        return len(self._hosts)
