"""core/clock.py: the clock deadlines are measured on (twin of core/clock.pxi).

Owns: monotonic() and Clock.
Touches: nothing else.

Unlike the compiled parts, the pure ones read monotonic() at each use, not the turn's
Clock.now: a pure turn may take milliseconds (up to RECV_BATCH messages a socket), and
one reading per turn would date arrivals, expiries and outcomes that much earlier than
the pure core always has. BrokerCore still sets Clock.now at each turn, as the
compiled one does.
"""

from __future__ import annotations

import time

monotonic = time.monotonic
"""The clock deadlines are measured on (CLOCK_MONOTONIC, seconds)."""


class Clock:
    """The current loop turn's clock reading: BrokerCore sets ``now`` at each turn
    (and after each poll)."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0
