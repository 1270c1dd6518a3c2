"""
ILM, Intersession Layer Messaging for Twisted.

Every message handed to :meth:`ILM.send_to` is stored until the peer has
durably received it, and is delivered to the peer's application exactly once
and in send order, across disconnects, reconnects and crashes of either side.
"""

from ilm._config import Config
from ilm._delivery import (
    BatchQueueDelivery,
    CallableDelivery,
    QueueDelivery,
    as_delivery,
)
from ilm._exec import ExecDelivery
from ilm._message import Message, PeerId
from ilm._messenger import ILM, Receipt
from ilm._status import (
    LINK_CONNECTING,
    LINK_DOWN,
    LINK_UP,
    Histogram,
    NetworkStats,
    NodeStats,
    PeerStatus,
)
from ilm._store import (
    CommitResult,
    InboundRecord,
    OutboundRecord,
    StoreBatch,
    StoredState,
)
from ilm._webhook import WebhookDelivery, WebhookFailed, webhook_secret
from ilm.backends._sqlite import SQLiteBackend

__version__ = "0.1.0"

__all__ = [
    "ILM",
    "LINK_CONNECTING",
    "LINK_DOWN",
    "LINK_UP",
    "BatchQueueDelivery",
    "CallableDelivery",
    "CommitResult",
    "Config",
    "ExecDelivery",
    "Histogram",
    "InboundRecord",
    "Message",
    "NetworkStats",
    "NodeStats",
    "OutboundRecord",
    "PeerId",
    "PeerStatus",
    "QueueDelivery",
    "Receipt",
    "SQLiteBackend",
    "StoreBatch",
    "StoredState",
    "WebhookDelivery",
    "WebhookFailed",
    "__version__",
    "as_delivery",
    "webhook_secret",
]
