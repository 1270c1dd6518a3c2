"""
Networks: how ILM frames travel between nodes.

- :class:`InMemoryNetwork`: in-process, with fault controls, for tests.
- :class:`StreamNetwork`: over Twisted stream endpoints (TCP, TLS, UNIX
  sockets, endpoint plugins), with authenticated links
  (:class:`PreSharedKeys`, :class:`TLSCredentials`), reconnection
  (:class:`Backoff`), keepalives and limits (:class:`LinkSettings`); why a
  peer cannot be reached (:meth:`StreamNetwork.link_error`, a
  :class:`DialFailure`).
  :class:`ILMProtocol` and :class:`ILMFactory` are its Twisted protocol and
  factory.
"""

from ilm._backoff import Backoff
from ilm.network._dial_failure import DialFailure
from ilm.network._handshake import PreSharedKeys
from ilm.network._memory import FaultPolicy, InMemoryNetwork, InMemoryPeerNetwork
from ilm.network._protocol import ILMFactory, ILMProtocol
from ilm.network._settings import LinkSettings
from ilm.network._stream import StreamNetwork
from ilm.network._tls import TLSCredentials, fingerprint, node_uri

__all__ = [
    "Backoff",
    "DialFailure",
    "FaultPolicy",
    "ILMFactory",
    "ILMProtocol",
    "InMemoryNetwork",
    "InMemoryPeerNetwork",
    "LinkSettings",
    "PreSharedKeys",
    "StreamNetwork",
    "TLSCredentials",
    "fingerprint",
    "node_uri",
]
