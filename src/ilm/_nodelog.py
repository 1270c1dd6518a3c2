"""
The logger every piece of a node logs through (namespace ``ilm``), in a
leaf module so that each piece can import it and an observer (the
simulator's) can hear them all by replacing one logger's observer.
"""

from __future__ import annotations

from twisted.logger import Logger

__all__ = ["log"]

log = Logger(namespace="ilm")
