"""
Link election, pure: what an authenticated connection becomes.

Each node keeps at most one link per peer.  When two nodes dial each other
at once, the node with the smaller id (the *decider*) chooses which
connection becomes the link and says so with LINK_UP; the other node
reports a link only on LINK_UP.  The rules, applied by
:class:`ilm.network.StreamNetwork` through these functions::

    authenticated connection, on the decider
      node stopping ........................................ REFUSE
      peer held off after a violation ...................... REFUSE_HELD
      a link exists
        same initiator as the link, or this node dialled ... REPLACE the link
        otherwise (the peer dialled, the link is ours) ..... DUPLICATE (close it)
      no link (a connection held for the peer is dropped as a duplicate)
        this node dialled it ............................... LINK
        the peer dialled it, our own dial in its handshake . HOLD it
        the peer dialled it, no dial of ours pending ....... LINK

    authenticated connection, on the other node ............. WAIT for LINK_UP
    LINK_UP received: a link exists -> REPLACE, else LINK (no LINK_UP sent)
    our dials ended while a connection is held: LINK the held one

So the connection initiated by the smaller id wins when both authenticate;
a connection replaces a link initiated by the same node (that node
redialled: it lost the old one); ILM sees one ``link_established`` per link.
"""

from __future__ import annotations

import enum

import attr

from ilm._peerid import PeerId, id_order_key

__all__ = [
    "Election",
    "Verdict",
    "decides",
    "on_authenticated",
    "on_link_up",
    "release_held",
]


class Verdict(enum.Enum):
    """What a connection becomes."""

    #: Close it: the node is stopping.
    REFUSE = "refuse"
    #: Close it: its peer is held off after a violation.
    REFUSE_HELD = "refuse_held"
    #: Keep it; the peer decides and will send LINK_UP.
    WAIT = "wait"
    #: It is the link.
    LINK = "link"
    #: It is the link; the current link is closed.
    REPLACE = "replace"
    #: Close it: the current link stays.
    DUPLICATE = "duplicate"
    #: Keep it aside: this node's own dial to the peer may still win.
    HOLD = "hold"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Election:
    """
    :ivar verdict: what the connection becomes.
    :ivar announce: send LINK_UP (this node decided) when it becomes the
        link.
    :ivar drop_held: close the connection held for the peer, as a
        duplicate (it lost to this one).
    """

    verdict: Verdict
    announce: bool = False
    drop_held: bool = False


def decides(local_id: PeerId, peer_id: PeerId) -> bool:
    """
    Whether this node chooses the link with ``peer_id`` (its id is the
    smaller).
    """
    return id_order_key(local_id) < id_order_key(peer_id)


def on_authenticated(
    *,
    running: bool,
    refused: bool,
    decider: bool,
    initiated: bool,
    link_initiated: bool | None,
    held: bool,
    dialling: bool,
) -> Election:
    """
    What a connection that just authenticated becomes.

    :param running: the node is running (not stopping).
    :param refused: the peer is held off after a violation.
    :param decider: this node decides (:func:`decides`).
    :param initiated: this node dialled the connection.
    :param link_initiated: whether this node dialled the current link with
        the peer (``None``: no link).
    :param held: a connection with the peer is held.
    :param dialling: a connection this node dialled to the peer is in its
        handshake.
    """
    if not running:
        return Election(Verdict.REFUSE)
    if refused:
        return Election(Verdict.REFUSE_HELD)
    if not decider:
        return Election(Verdict.WAIT)
    if link_initiated is not None:
        if initiated or link_initiated == initiated:
            return Election(Verdict.REPLACE, announce=True)
        return Election(Verdict.DUPLICATE)
    if not initiated and dialling:
        return Election(Verdict.HOLD, drop_held=held)
    return Election(Verdict.LINK, announce=True, drop_held=held)


def on_link_up(*, running: bool, linked: bool) -> Election:
    """
    What a connection becomes when the deciding peer's LINK_UP arrives.

    :param linked: a link with the peer exists.
    """
    if not running:
        return Election(Verdict.REFUSE)
    if linked:
        return Election(Verdict.REPLACE)
    return Election(Verdict.LINK)


def release_held(*, running: bool, held_waiting: bool) -> bool:
    """
    Whether a held connection becomes the link, once this node's dials to
    the peer have all ended (while one is in its handshake, the held
    connection stays held; otherwise it is no longer held either way).

    :param held_waiting: the held connection is still authenticated and
        open (not closed meanwhile).
    """
    return running and held_waiting
