"""
The stream network's logic over in-memory pipes on a ``Clock``: links,
simultaneous dial, reconnection, keepalives, backpressure, stop, and what
happens to unauthenticated or hostile peers.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import ilm.errors
from ilm.errors import ILMError, LinkTimeout, ProtocolViolation


class LinkTimeoutErrorTests(SynchronousTestCase):
    def test_link_timeout_is_not_a_violation(self) -> None:
        """
        LinkTimeout is an ILMError, exported by ilm.errors, and not a
        ProtocolViolation (a silent peer broke no rule).
        """
        self.assertTrue(issubclass(LinkTimeout, ILMError))
        self.assertFalse(issubclass(LinkTimeout, ProtocolViolation))
        self.assertIn("LinkTimeout", ilm.errors.__all__)
