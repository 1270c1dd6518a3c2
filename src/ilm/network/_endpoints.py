"""
Endpoints from configuration: ``serverFromString``/``clientFromString``
strings parsed when the network is made (a malformed one fails there,
naming the option), and peer addresses as plain text for logs and the
per-source caps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

from ilm._peerid import PeerId
from ilm.errors import ConfigurationError

__all__ = [
    "PeerAddresses",
    "address_text",
    "client_endpoint",
    "client_endpoints",
    "server_endpoint",
]

PeerAddresses: TypeAlias = (
    "str | IStreamClientEndpoint | list[str | IStreamClientEndpoint]"
    " | tuple[str | IStreamClientEndpoint, ...]"
)
"""A peer's entry in ``StreamNetwork(peers=...)``: one endpoint or several."""


def _check_port(endpoint: object, description: str, server: bool) -> None:
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not (0 if server else 1) <= port <= 65535:
        raise ValueError(f"port {port} is out of range")


def server_endpoint(
    reactor: Any, description: str | IStreamServerEndpoint
) -> IStreamServerEndpoint:
    """
    A listening endpoint from ``serverFromString`` syntax (or as given).

    :raises ConfigurationError: naming the string and what is wrong with it.
    """
    if not isinstance(description, str):
        return description
    return _parse(  # type: ignore[no-any-return]
        serverFromString,
        reactor,
        description,
        f"listen endpoint {description!r}",
        "'tcp:9001' or 'tcp:9001:interface=127.0.0.1'",
    )


def client_endpoint(
    reactor: Any, peer_id: PeerId, description: str | IStreamClientEndpoint
) -> IStreamClientEndpoint:
    """
    A peer's endpoint from ``clientFromString`` syntax (or as given).

    :raises ConfigurationError: naming the peer, the string and what is
        wrong with it.
    """
    if not isinstance(description, str):
        if not IStreamClientEndpoint.providedBy(description):
            raise ConfigurationError(
                f"the endpoint of peer {peer_id!r} must be a string or an "
                f"IStreamClientEndpoint, not {type(description).__name__}"
            )
        return description
    return _parse(  # type: ignore[no-any-return]
        clientFromString,
        reactor,
        description,
        f"endpoint of peer {peer_id!r}, {description!r},",
        "'tcp:host=10.0.0.2:port=9001'",
    )


_Endpoint = TypeVar("_Endpoint")


def _parse(
    parse: Callable[[Any, str], _Endpoint],
    reactor: Any,
    description: str,
    what: str,
    examples: str,
) -> _Endpoint:
    """
    ``parse(reactor, description)`` (``serverFromString`` or
    ``clientFromString``), its port checked.

    :raises ConfigurationError: saying that ``what`` is not valid, why, and
        the syntax expected (with ``examples``).
    """
    try:
        endpoint = parse(reactor, description)
        _check_port(endpoint, description, server=parse is serverFromString)
    except Exception as e:
        raise ConfigurationError(
            f"{what} is not valid: {_reason(e)} (expected {parse.__name__} "
            f"syntax, such as {examples})"
        ) from None
    return endpoint


def client_endpoints(
    reactor: Any, peer_id: PeerId, addresses: PeerAddresses
) -> list[tuple[IStreamClientEndpoint, str]]:
    """
    A peer's endpoints, each with its description for the log (the string,
    or the endpoint's type): one, or several from a list or tuple (dialled
    in turn).  Every one is checked now.

    :raises ConfigurationError: naming the peer and the first bad endpoint;
        also for an empty list or a repeated string.
    """
    if isinstance(addresses, list | tuple):
        given = list(addresses)
        if not given:
            raise ConfigurationError(f"peer {peer_id!r} has an empty list of endpoints")
    else:
        given = [addresses]
    endpoints = []
    seen: set[str] = set()
    for description in given:
        if isinstance(description, str):
            if description in seen:
                raise ConfigurationError(
                    f"endpoint of peer {peer_id!r}, {description!r}, is given twice"
                )
            seen.add(description)
        endpoints.append(
            (
                client_endpoint(reactor, peer_id, description),
                description
                if isinstance(description, str)
                else type(description).__name__,
            )
        )
    return endpoints


def _reason(error: Exception) -> str:
    if isinstance(error, TypeError) and "missing" in str(error):
        # clientFromString("tcp:host=h") -> "__init__() missing 1 required
        # positional argument: 'port'"
        return "a required part is missing (" + str(error).split("missing ", 1)[1] + ")"
    return str(error) or type(error).__name__


def address_text(address: object) -> tuple[str, str]:
    """
    :return: ``(host, "host:port")`` of a peer address as plain strings
        (``host`` keys the per-source caps and log limits; a UNIX socket's
        peers are all one source, ``"unix"``).
    """
    if isinstance(address, IPv4Address):
        return address.host, f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return address.host, f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return "unix", f"unix:{name}" if name else "unix"
    text = str(address)
    return text, text
