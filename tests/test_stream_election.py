"""
The link election (``ilm.network._election``), pure: every combination of
its inputs against the table of the rules, and the properties the table
is for.
"""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from ilm.network._election import (
    Election,
    Verdict,
    decides,
    on_authenticated,
    on_link_up,
    release_held,
)

BOOLS = (False, True)


def expected(
    running: bool,
    refused: bool,
    decider: bool,
    initiated: bool,
    link_initiated: bool | None,
    held: bool,
    dialling: bool,
) -> Election:
    """
    The rules, written as a table (first matching row wins); ``*`` rows
    list the inputs they depend on.
    """
    rows: list[tuple[bool, Election]] = [
        (not running, Election(Verdict.REFUSE)),
        (refused, Election(Verdict.REFUSE_HELD)),
        (not decider, Election(Verdict.WAIT)),
        # A link exists: a redial by the link's initiator, or our own
        # connection, replaces it; the peer's connection to our link loses.
        (link_initiated is not None and initiated, Election(Verdict.REPLACE, True)),
        (link_initiated is False and not initiated, Election(Verdict.REPLACE, True)),
        (link_initiated is True and not initiated, Election(Verdict.DUPLICATE)),
        # No link: ours wins over a held one; the peer's waits for ours.
        (initiated, Election(Verdict.LINK, True, drop_held=held)),
        (dialling, Election(Verdict.HOLD, drop_held=held)),
        (True, Election(Verdict.LINK, True, drop_held=held)),
    ]
    return next(election for matches, election in rows if matches)


class ElectionTableTests(SynchronousTestCase):
    def test_every_combination(self) -> None:
        """
        All 192 combinations of an authenticated connection's situation
        give the table's verdict.
        """
        count = 0
        for combination in itertools.product(
            BOOLS, BOOLS, BOOLS, BOOLS, (None, False, True), BOOLS, BOOLS
        ):
            running, refused, decider, initiated, link, held, dialling = combination
            got = on_authenticated(
                running=running,
                refused=refused,
                decider=decider,
                initiated=initiated,
                link_initiated=link,
                held=held,
                dialling=dialling,
            )
            self.assertEqual(got, expected(*combination), combination)
            count += 1
        self.assertEqual(count, 192)

    def test_properties(self) -> None:
        """
        Whatever the situation: a running node never holds or links a
        refused peer's connection; a duplicate or a replacement happens only
        with a link; a held connection is dropped only when another
        connection wins; the non-decider only waits; LINK_UP is announced
        exactly when this node decided and the connection becomes the link.
        """
        for combination in itertools.product(
            BOOLS, BOOLS, BOOLS, (None, False, True), BOOLS, BOOLS
        ):
            refused, decider, initiated, link, held, dialling = combination
            got = on_authenticated(
                running=True,
                refused=refused,
                decider=decider,
                initiated=initiated,
                link_initiated=link,
                held=held,
                dialling=dialling,
            )
            if refused:
                self.assertEqual(got.verdict, Verdict.REFUSE_HELD)
            elif not decider:
                self.assertEqual(got.verdict, Verdict.WAIT)
            if got.verdict in (Verdict.REPLACE, Verdict.DUPLICATE):
                self.assertIsNotNone(link)
            if got.drop_held:
                self.assertTrue(held)
                self.assertIn(got.verdict, (Verdict.LINK, Verdict.HOLD))
            self.assertEqual(
                got.announce, got.verdict in (Verdict.LINK, Verdict.REPLACE)
            )

    def test_simultaneous_dials(self) -> None:
        """
        Both nodes dialled and both connections authenticated, on the
        decider: whichever authenticates first, the one it initiated wins.
        """
        # Ours first: it becomes the link; the peer's then loses.
        ours = on_authenticated(
            running=True,
            refused=False,
            decider=True,
            initiated=True,
            link_initiated=None,
            held=False,
            dialling=False,
        )
        self.assertEqual(ours.verdict, Verdict.LINK)
        theirs = on_authenticated(
            running=True,
            refused=False,
            decider=True,
            initiated=False,
            link_initiated=True,
            held=False,
            dialling=False,
        )
        self.assertEqual(theirs.verdict, Verdict.DUPLICATE)
        # Theirs first, ours in its handshake: theirs is held; ours drops it.
        theirs = on_authenticated(
            running=True,
            refused=False,
            decider=True,
            initiated=False,
            link_initiated=None,
            held=False,
            dialling=True,
        )
        self.assertEqual(theirs.verdict, Verdict.HOLD)
        ours = on_authenticated(
            running=True,
            refused=False,
            decider=True,
            initiated=True,
            link_initiated=None,
            held=True,
            dialling=False,
        )
        self.assertEqual(ours, Election(Verdict.LINK, True, drop_held=True))

    def test_link_up(self) -> None:
        """
        On the other node, LINK_UP makes the connection the link (replacing
        any), without announcing; a stopping node refuses it.
        """
        self.assertEqual(on_link_up(running=True, linked=False), Election(Verdict.LINK))
        self.assertEqual(
            on_link_up(running=True, linked=True), Election(Verdict.REPLACE)
        )
        for linked in BOOLS:
            self.assertEqual(
                on_link_up(running=False, linked=linked), Election(Verdict.REFUSE)
            )

    def test_release_held(self) -> None:
        """
        A held connection becomes the link once our dials ended, only if
        the node runs and the connection still waits.
        """
        table = {
            (running, waiting): release_held(running=running, held_waiting=waiting)
            for running in BOOLS
            for waiting in BOOLS
        }
        self.assertEqual(
            table,
            {
                (False, False): False,
                (False, True): False,
                (True, False): False,
                (True, True): True,
            },
        )

    def test_decides(self) -> None:
        """
        The node with the smaller id decides: ints before strs, ints by
        value, strs by their UTF-8 bytes; exactly one of two nodes decides.
        """
        self.assertTrue(decides(1, 2))
        self.assertFalse(decides(2, 1))
        self.assertTrue(decides(99, "a"))
        self.assertTrue(decides("a", "b"))
        self.assertTrue(decides("z", "é"))
        for a, b in itertools.permutations([1, 7, 2**62, "a", "é", "b"], 2):
            self.assertNotEqual(decides(a, b), decides(b, a), (a, b))
