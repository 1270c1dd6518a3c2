"""
:class:`LeanDeferred`: the ``Deferred`` that ``send_to`` returns, one
object where a plain ``Deferred`` is two until a callback is added.

A ``send_to`` Deferred waits in its peer's outbox until the next group
commit, and a fast sender may have a few hundred thousand of them waiting
(its application usually drops them, or keeps only the last).  Each object
the garbage collector tracks that lives that long is promoted to its oldest
generation and makes full collections come sooner and last longer.  A plain
``Deferred`` is two such objects, itself and its list of callbacks; a
``LeanDeferred`` makes that list only when something reads it (a callback
is added, or it fires), and keeps it in a slot.  It is a ``Deferred`` in
every other respect.

Twisted keeps the list in the private attribute ``_callbacks`` and sets
only it and ``_canceller`` in ``Deferred.__init__``: :func:`lean_deferreds`
checks that at import, and where it does not hold (another Twisted),
``send_to`` returns plain Deferreds.  ``tests/test_lean_deferred.py`` runs
Twisted's ways of using a Deferred against this one.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar
from weakref import getweakrefcount

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["LeanDeferred", "lean_deferreds", "new_deferred", "unobserved"]

# CPython's reference counts (other interpreters have none to read).
_getrefcount = getattr(sys, "getrefcount", None)

_T = TypeVar("_T")


class LeanDeferred(Deferred[_T]):
    """
    A ``Deferred`` without a canceller whose callbacks list is made when
    first needed.

    The list lives in a slot, not in the instance's ``__dict__``: CPython
    keeps a class's instance attributes in one shared layout, and an
    instance that set ``_callbacks`` at another point of its life than the
    others (before firing rather than after) would get a dictionary object
    of its own, one more tracked object.
    """

    __slots__ = ("_lean_callbacks",)

    _canceller = None

    def __init__(self) -> None:
        self._lean_callbacks: list[Any] | None = None
        if self.debug:
            # Debugging records where each Deferred was made.
            Deferred.__init__(self)

    def callback(self, result: Any) -> None:
        """
        Fire.  With nothing added to run (the usual ``send_to`` Deferred,
        which the application dropped), only what ``Deferred.callback``
        would leave is set, in the order it sets it; anything else goes
        through ``Deferred.callback``.
        """
        if (
            self._lean_callbacks is None
            and not self.called
            and not self.paused
            and not self.debug
            and not isinstance(result, Failure)
        ):
            self.called = True
            self._canceller = None
            self.result = result
            self._chainedTo = None
            return
        Deferred.callback(self, result)

    @property  # type: ignore[override]
    def _callbacks(self) -> list[Any]:
        callbacks = self._lean_callbacks
        if callbacks is None:
            callbacks = self._lean_callbacks = []
        return callbacks

    @_callbacks.setter
    def _callbacks(self, callbacks: list[Any]) -> None:
        self._lean_callbacks = callbacks


def unobserved(d: object) -> bool:
    """
    Whether nothing could ever see ``d`` fire: a :class:`LeanDeferred`
    with nothing added to it, no weak reference to it, and no reference
    but the caller's own, held in one local name (the caller has let go
    of every other).  Then firing it would only make a result that is
    freed with it, unseen: the usual ``send_to`` Deferred, which the
    application dropped.  Only CPython's reference counts can tell;
    elsewhere this is never true.
    """
    return (
        type(d) is LeanDeferred
        and d._lean_callbacks is None  # type: ignore[attr-defined]
        and _getrefcount is not None
        # The caller's name, this call's argument and getrefcount's own.
        and _getrefcount(d) == 3
        and not getweakrefcount(d)
    )


def lean_deferreds() -> bool:
    """
    Whether this Twisted's ``Deferred.__init__`` sets only what
    :class:`LeanDeferred` stands in for, and firing one with nothing added
    sets only what :meth:`LeanDeferred.callback` sets.
    """
    d: Deferred[int] = Deferred()
    if set(vars(d)) != {"_callbacks", "_canceller"}:
        return False
    d.callback(0)
    return vars(d) == {
        "_callbacks": [],
        "called": True,
        "_canceller": None,
        "result": 0,
        "_chainedTo": None,
    }


#: What ``send_to`` makes its Deferreds with.
new_deferred: type[Deferred[Any]] = LeanDeferred if lean_deferreds() else Deferred
