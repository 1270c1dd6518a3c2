"""
Tests for :mod:`ilm._dial_claims` on its own: the two rules for the links
of configured peers (the claims and the dialling are tested through the
guard in ``tests.test_ownership_guard``, ``DiallingTests``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm._dial_claims import DialClaims
from ilm._peerid import PeerId


class LinkRulesTests(SynchronousTestCase):
    def claims(self, owned: set[PeerId], initiated: set[PeerId]) -> DialClaims:
        """Claims for configured peer 7, never started."""
        return DialClaims(
            peers=frozenset({7}),
            owned=lambda: frozenset(owned),
            live=lambda peer_id: peer_id in owned,
            initiated=lambda peer_id: peer_id in initiated,
            claimable=lambda peers: Deferred(),
            acquire=lambda peer_id: Deferred(),
            claiming=lambda peer_id: None,
            claimed=lambda peer_id, token, taken: None,
            dial=lambda peer_id, wanted: None,
            clock=Clock(),
        )

    def test_takes_over(self) -> None:
        """
        Only a link this gateway dialled to a configured peer does not take
        the stream from a live lease elsewhere; any link the peer dialled,
        or with a peer that is not configured, does.
        """
        self.assertFalse(self.claims(set(), {7}).takes_over(7))
        self.assertTrue(self.claims(set(), set()).takes_over(7))
        self.assertTrue(self.claims(set(), {2}).takes_over(2))

    def test_keeps(self) -> None:
        """
        The lease outlives the link only for a configured peer whose stream
        this gateway owns.
        """
        self.assertTrue(self.claims({7}, set()).keeps(7))
        self.assertFalse(self.claims(set(), set()).keeps(7))
        self.assertFalse(self.claims({2}, set()).keeps(2))
